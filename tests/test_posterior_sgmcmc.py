"""SG-MCMC sample banks: Gaussian targets matched within Monte-Carlo error (ESS from the
autocorrelation), exact burn-in/thinning/ring-buffer bookkeeping, cyclical collection, the
F-SGLD step, independent chains and the family conformance row."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import bma, objectives, transforms
from bnn_flat.posteriors import ensemble, sgmcmc
from bnn_flat.types import LossAux
from tests.conftest import bn_mlp_apply, linear_apply

# A correlated 2-D Gaussian target ------------------------------------------------------
#
# Per-datum energy U(theta) = 0.5 (theta - m)^T P (theta - m) / N with P = COVARIANCE^-1,
# so exp(-N U / T) is exactly N(m, T * COVARIANCE).

COVARIANCE = np.array([[2.0, 0.9], [0.9, 1.0]])  # correlation 0.64
PRECISION = np.linalg.inv(COVARIANCE)
MEAN = np.array([1.0, -2.0])
NUM_DATA = 100
STEP = 0.01  # Langevin step in energy units, lr / N; discretisation bias < 0.6% of the cov
NUM_CHAINS = 128
BATCH = {"inputs": jnp.zeros((1, 1)), "labels": jnp.zeros((1,), jnp.int32)}  # unused


def gaussian_loss(params, model_state, batch, key):
    del batch, key
    offset = params["theta"] - jnp.asarray(MEAN, jnp.float32)
    energy = 0.5 * offset @ jnp.asarray(PRECISION, jnp.float32) @ offset / NUM_DATA
    return energy, LossAux(model_state, {})


def gaussian_gradient(theta):
    return (theta - MEAN) @ PRECISION / NUM_DATA


def effective_sample_size(chains: np.ndarray) -> float:
    """ESS of ``(num_chains, length)`` draws: C n / tau, with tau the integrated
    autocorrelation time (chain-averaged autocorrelation, Geyer's initial positive sequence)."""
    num_chains, length = chains.shape
    centred = chains - chains.mean()
    spectrum = np.fft.rfft(centred, 2 * length, axis=1)
    autocovariance = np.fft.irfft(spectrum * np.conj(spectrum), axis=1)[:, :length].mean(0)
    rho = autocovariance / autocovariance[0]
    pair_sums = rho[:-1:2] + rho[1::2]
    negative = np.flatnonzero(pair_sums < 0)
    cut = negative[0] if negative.size else pair_sums.size
    tau = max(2.0 * pair_sums[:cut].sum() - 1.0, 1.0)
    return num_chains * length / tau


def test_effective_sample_size_of_ar1_chains():
    # AR(1) with coefficient phi has tau = (1 + phi) / (1 - phi).
    phi, num_chains, length = 0.8, 64, 4000
    noise = np.random.default_rng(0).normal(size=(num_chains, length))
    chains = np.zeros_like(noise)
    for t in range(1, length):
        chains[:, t] = phi * chains[:, t - 1] + noise[:, t]
    expected = num_chains * length * (1 - phi) / (1 + phi)
    assert abs(effective_sample_size(chains) / expected - 1) < 0.1
    independent = noise
    assert abs(effective_sample_size(independent) / noise.size - 1) < 0.1


def gaussian_kl(mean_q, cov_q, mean_p, cov_p):
    """KL(N(mean_q, cov_q) || N(mean_p, cov_p))."""
    precision_p = np.linalg.inv(cov_p)
    offset = mean_p - mean_q
    return 0.5 * (
        np.trace(precision_p @ cov_q)
        + offset @ precision_p @ offset
        - len(mean_p)
        + np.linalg.slogdet(cov_p)[1]
        - np.linalg.slogdet(cov_q)[1]
    )


def assert_moments_within_monte_carlo_error(samples, mean, covariance):
    """``samples (chains, length, d)``; mean and covariance within 4 standard errors, the
    standard errors from the ESS of each coordinate and of each centred product."""
    flat = samples.reshape(-1, samples.shape[-1])
    empirical_mean = flat.mean(0)
    for i in range(len(mean)):
        error = flat[:, i].std() / np.sqrt(effective_sample_size(samples[..., i]))
        assert abs(empirical_mean[i] - mean[i]) < 4 * error, (i, empirical_mean[i], error)
    empirical_cov = np.cov(flat, rowvar=False)
    for i in range(len(mean)):
        for j in range(i, len(mean)):
            product = (samples[..., i] - empirical_mean[i]) * (samples[..., j] - empirical_mean[j])
            error = product.std() / np.sqrt(effective_sample_size(product))
            deviation = abs(empirical_cov[i, j] - covariance[i, j])
            assert deviation < 4 * error, (i, j, empirical_cov[i, j], covariance[i, j], error)
            assert error < 0.03 * np.sqrt(covariance[i, i] * covariance[j, j])  # test has power


def start_positions():
    """Chains start far from the target: N(m + (3, -3), 0.01 I)."""
    jitter = 0.1 * np.asarray(jax.random.normal(jax.random.key(100), (NUM_CHAINS, 2)))
    return MEAN + np.array([3.0, -3.0]) + jitter


def run_chains(family, key, num_steps):
    """``NUM_CHAINS`` independent chains (an ensemble), scanned for ``num_steps`` updates."""
    chains = ensemble.build(family)
    state = chains.init({"theta": jnp.asarray(start_positions(), jnp.float32)}, {})

    @jax.jit
    def run(state, key):
        step = lambda s, k: (chains.update(k, s, BATCH)[0], None)
        return jax.lax.scan(step, state, jax.random.split(key, num_steps))[0]

    state = run(state, key)
    samples = np.asarray(sgmcmc.collected(state)["theta"], np.float64)
    return state, samples.reshape(NUM_CHAINS, -1, 2)


def test_sgld_samples_a_correlated_gaussian():
    burn_in, thin, num_steps = 2000, 10, 20_000
    family = sgmcmc.sgld(
        gaussian_loss,
        learning_rate=STEP * NUM_DATA,
        num_data=NUM_DATA,
        num_samples_max=(num_steps - burn_in) // thin,
        burn_in=burn_in,
        thin=thin,
    )
    state, samples = run_chains(family, jax.random.key(0), num_steps)
    assert samples.shape == (NUM_CHAINS, 1800, 2)
    assert int(state.members.num_collected[0]) == 1800
    assert_moments_within_monte_carlo_error(samples, MEAN, COVARIANCE)
    start = start_positions()
    kl_start = gaussian_kl(start.mean(0), np.cov(start, rowvar=False), MEAN, COVARIANCE)
    flat = samples.reshape(-1, 2)
    kl_end = gaussian_kl(flat.mean(0), np.cov(flat, rowvar=False), MEAN, COVARIANCE)
    assert kl_start > 10.0
    assert kl_end < 2e-3
    assert kl_end < 1e-4 * kl_start


def test_sghmc_samples_a_correlated_gaussian():
    burn_in, thin, num_steps = 2000, 5, 12_000
    family = sgmcmc.sghmc(
        gaussian_loss,
        learning_rate=STEP * NUM_DATA,
        num_data=NUM_DATA,
        friction=0.1,
        num_samples_max=(num_steps - burn_in) // thin,
        burn_in=burn_in,
        thin=thin,
    )
    _, samples = run_chains(family, jax.random.key(1), num_steps)
    assert_moments_within_monte_carlo_error(samples, MEAN, COVARIANCE)
    flat = samples.reshape(-1, 2)
    assert gaussian_kl(flat.mean(0), np.cov(flat, rowvar=False), MEAN, COVARIANCE) < 2e-3


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_temperature_scales_the_covariance(sampler):
    temperature, burn_in, thin, num_steps = 0.25, 2000, 10, 12_000
    common = dict(
        learning_rate=STEP * NUM_DATA,
        num_data=NUM_DATA,
        temperature=temperature,
        num_samples_max=(num_steps - burn_in) // thin,
        burn_in=burn_in,
        thin=thin,
    )
    if sampler == "sgld":
        family = sgmcmc.sgld(gaussian_loss, **common)
    else:
        family = sgmcmc.sghmc(gaussian_loss, friction=0.1, **common)
    _, samples = run_chains(family, jax.random.key(2), num_steps)
    assert_moments_within_monte_carlo_error(samples, MEAN, temperature * COVARIANCE)
    # ... and it is clearly not the T = 1 covariance
    empirical = np.cov(samples.reshape(-1, 2), rowvar=False)
    assert np.all(np.abs(np.diag(empirical) / np.diag(COVARIANCE) - temperature) < 0.03)


# Exact bookkeeping with a fake sampler --------------------------------------------------


def step_index_optimizer():
    """A fake sampler: update number t sets every parameter to t."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None, **extra_args):
        new = jax.tree.map(lambda p: count.astype(p.dtype) - p, params)
        return new, count + 1

    return optax.GradientTransformationExtraArgs(init, update)


def counting_loss(params, model_state, batch, key):
    """Zero loss; the model state counts forward passes (after update t it is t + 1)."""
    del batch, key
    loss = 0.0 * sum(jnp.sum(x) for x in jax.tree.leaves(params))
    return loss, LossAux({"calls": model_state["calls"] + 1}, {})


def run_fake(family, num_steps):
    state = family.init({"a": jnp.array(-1.0), "b": -jnp.ones(2)}, {"calls": jnp.array(0.0)})

    @jax.jit
    def run(state):
        def step(s, k):
            s, _ = family.update(k, s, BATCH)
            return s, (s.num_collected, s.write_index)

        return jax.lax.scan(step, state, jax.random.split(jax.random.key(0), num_steps))

    return run(state)


def reference_bank(num_steps, num_samples_max, burn_in, thin, collect_when=lambda t: True):
    """Pure-Python ring buffer: slots, and (num_collected, write_index) after each update."""
    slots = [-1.0] * num_samples_max
    count, write, trace = 0, 0, []
    for t in range(num_steps):
        if t >= burn_in and (t - burn_in) % thin == 0 and collect_when(t):
            slots[write] = float(t)
            write = (write + 1) % num_samples_max
            count = min(count + 1, num_samples_max)
        trace.append((count, write))
    return slots, trace


def test_burn_in_thinning_and_ring_buffer_indices_are_exact():
    burn_in, thin, size, num_steps = 3, 2, 4, 15
    family = sgmcmc.build(
        counting_loss, step_index_optimizer(), num_samples_max=size, burn_in=burn_in, thin=thin
    )
    state, (counts, writes) = run_fake(family, num_steps)
    # collected updates 3, 5, 7, 9, 11, 13; 11 and 13 overwrote the oldest (3 and 5)
    np.testing.assert_array_equal(state.samples["a"], [11.0, 13.0, 7.0, 9.0])
    np.testing.assert_array_equal(
        state.samples["b"], np.repeat([[11.0], [13.0], [7.0], [9.0]], 2, 1)
    )
    np.testing.assert_array_equal(state.sample_model_states["calls"], [12.0, 14.0, 8.0, 10.0])
    assert int(state.num_collected) == 4 and int(state.write_index) == 2
    assert int(state.step) == num_steps and float(state.params["a"]) == num_steps - 1
    slots, trace = reference_bank(num_steps, size, burn_in, thin)
    np.testing.assert_array_equal(state.samples["a"], slots)
    assert list(zip(np.asarray(counts).tolist(), np.asarray(writes).tolist(), strict=True)) == trace
    assert trace[2] == (0, 0) and trace[3] == (1, 1) and trace[4] == (1, 1)
    # collected(): oldest first, model states aligned (made by the same update)
    params, model_states = sgmcmc.collected(state, with_model_states=True)
    np.testing.assert_array_equal(params["a"], [7.0, 9.0, 11.0, 13.0])
    np.testing.assert_array_equal(model_states["calls"], params["a"] + 1)


def test_partially_filled_bank_is_in_write_order():
    family = sgmcmc.build(counting_loss, step_index_optimizer(), num_samples_max=5, burn_in=1)
    state, _ = run_fake(family, 4)  # collected updates 1, 2, 3
    np.testing.assert_array_equal(state.samples["a"], [1.0, 2.0, 3.0, -1.0, -1.0])
    np.testing.assert_array_equal(sgmcmc.collected(state)["a"], [1.0, 2.0, 3.0])


def test_sample_draws_uniformly_from_the_filled_bank_inside_jit():
    family = sgmcmc.build(
        counting_loss, step_index_optimizer(), num_samples_max=4, burn_in=3, thin=2
    )
    # a private wrapper, so the compilation cache counted below is this test's alone
    sample = jax.jit(lambda key, state, n: family.sample(key, state, n), static_argnums=2)
    pairs = jax.jit(sgmcmc.sample_with_model_states, static_argnums=2)
    num_draws = 40_000
    # before any collection: copies of the current position
    early, _ = run_fake(family, 3)
    np.testing.assert_array_equal(sample(jax.random.key(1), early, 3)["a"], [2.0, 2.0, 2.0])
    # partially filled: only updates 3 and 5 can be drawn
    partial, _ = run_fake(family, 7)
    draws = np.asarray(sample(jax.random.key(2), partial, num_draws)["a"])
    assert set(np.unique(draws)) == {3.0, 5.0}
    assert abs((draws == 3.0).mean() - 0.5) < 4 * np.sqrt(0.25 / num_draws)
    # full, after overwrites: uniform over 7, 9, 11, 13
    full, _ = run_fake(family, 15)
    key = jax.random.key(3)
    draws = sample(key, full, num_draws)
    values = np.asarray(draws["a"])
    assert set(np.unique(values)) == {7.0, 9.0, 11.0, 13.0}
    for value in (7.0, 9.0, 11.0, 13.0):
        assert abs((values == value).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / num_draws)
    np.testing.assert_array_equal(draws["b"], np.repeat(values[:, None], 2, 1))
    params, model_states = pairs(key, full, num_draws)
    np.testing.assert_array_equal(params["a"], values)  # same key, same draws
    np.testing.assert_array_equal(model_states["calls"], values + 1)
    # num_collected is traced: one compilation per num_samples (3 and 40_000), whatever the
    # fill level of the bank
    assert sample._cache_size() == 2


def test_collect_when_with_the_cyclical_schedule_collects_only_in_sampling_phases():
    options = dict(num_steps=40, num_cycles=4, exploration_fraction=0.7)  # cycle length 10
    collect_when = functools.partial(transforms.is_sampling_phase, **options)
    family = sgmcmc.build(
        counting_loss,
        step_index_optimizer(),
        num_samples_max=16,
        burn_in=10,
        collect_when=collect_when,
    )
    state, _ = run_fake(family, 40)
    expected = [17, 18, 19, 27, 28, 29, 37, 38, 39]
    np.testing.assert_array_equal(sgmcmc.collected(state)["a"], expected)
    slots, _ = reference_bank(40, 16, 10, 1, lambda t: t % 10 >= 7)
    np.testing.assert_array_equal(state.samples["a"], slots)


def test_cyclical_sgld_steps_follow_the_schedule_and_noise_only_while_sampling():
    num_data, init_learning_rate, temperature, dimension = 50, 0.2, 2.0, 20_000
    options = dict(num_steps=20, num_cycles=2, exploration_fraction=0.5)
    zero_loss = lambda p, s, b, k: (0.0 * jnp.sum(p["theta"]), LossAux(s, {}))
    family = sgmcmc.cyclical_sgld(
        zero_loss,
        init_learning_rate=init_learning_rate,
        num_data=num_data,
        temperature=temperature,
        num_samples_max=10,
        thin=2,
        **options,
    )
    state = family.init({"theta": jnp.zeros(dimension)})

    @jax.jit
    def run(state):
        def step(s, k):
            s, _ = family.update(k, s, BATCH)
            return s, s.params["theta"]

        return jax.lax.scan(step, state, jax.random.split(jax.random.key(4), 20))

    state, positions = run(state)
    positions = np.asarray(positions, np.float64)
    increments = np.diff(np.concatenate([np.zeros((1, dimension)), positions]), axis=0)
    schedule = transforms.cyclical_schedule(init_learning_rate, 20, 2)
    for t in range(20):
        if t % 10 < 5:  # exploration: SGD on a zero gradient, no noise
            np.testing.assert_array_equal(increments[t], 0.0)
        else:
            variance = 2 * float(schedule(t)) * temperature / num_data
            sample_variance = increments[t].var()
            assert abs(sample_variance - variance) < 4 * variance * np.sqrt(2 / dimension), t
    # thin=2 from step 0 inside the sampling phases: updates 6, 8, 16, 18
    np.testing.assert_array_equal(sgmcmc.collected(state)["theta"], positions[[6, 8, 16, 18]])


# F-SGLD -------------------------------------------------------------------------------


def test_flat_sgld_is_the_sam_gradient_step_plus_the_sgld_noise():
    learning_rate, rho, temperature = 0.5, 0.3, 1.5
    theta = np.array([3.0, 1.0])
    key = jax.random.key(5)

    def one_step(temperature, perturbation):
        family = sgmcmc.sgld(
            gaussian_loss,
            learning_rate=learning_rate,
            num_data=NUM_DATA,
            temperature=temperature,
            num_samples_max=1,
            perturbation=perturbation,
        )
        state = family.init({"theta": jnp.asarray(theta, jnp.float32)})
        return np.asarray(jax.jit(family.update)(key, state, BATCH)[0].params["theta"])

    gradient = gaussian_gradient(theta)
    perturbed = theta + rho * gradient / np.linalg.norm(gradient)
    expected = theta - learning_rate * gaussian_gradient(perturbed)
    flat_cold = one_step(0.0, transforms.sam(rho))
    np.testing.assert_allclose(flat_cold, expected, rtol=1e-6)
    plain_cold = one_step(0.0, None)
    np.testing.assert_allclose(plain_cold, theta - learning_rate * gradient, rtol=1e-6)
    assert np.abs(flat_cold - plain_cold).max() > 1e-3
    # the noise is added after the step, unscaled by the SAM gradient: same key, same noise
    flat_noise = one_step(temperature, transforms.sam(rho)) - flat_cold
    plain_noise = one_step(temperature, None) - plain_cold
    np.testing.assert_allclose(flat_noise, plain_noise, rtol=1e-4, atol=1e-7)
    assert np.abs(flat_noise).min() > 1e-4


def test_flat_sgld_samples_differ_from_sgld():
    common = dict(
        learning_rate=STEP * NUM_DATA, num_data=NUM_DATA, num_samples_max=100, burn_in=500, thin=5
    )
    plain = sgmcmc.sgld(gaussian_loss, **common)
    flat = sgmcmc.sgld(gaussian_loss, perturbation=transforms.sam(0.5), **common)
    state_plain, _ = _scan(plain, 1000, jax.random.key(6), {"theta": jnp.asarray(MEAN)})
    state_flat, _ = _scan(flat, 1000, jax.random.key(6), {"theta": jnp.asarray(MEAN)})
    difference = np.abs(np.asarray(state_flat.samples["theta"] - state_plain.samples["theta"]))
    assert difference.mean() > 1e-2
    assert np.all(np.isfinite(np.asarray(state_flat.samples["theta"])))


# Several chains -------------------------------------------------------------------------


def test_four_chain_ensemble_has_independent_noise():
    learning_rate, num_steps = STEP * NUM_DATA, 600
    family = sgmcmc.sgld(
        gaussian_loss,
        learning_rate=learning_rate,
        num_data=NUM_DATA,
        num_samples_max=50,
        burn_in=100,
        thin=10,
    )
    chains = ensemble.build(family)
    start = np.tile(MEAN + np.array([1.0, 1.0]), (4, 1))  # identical starting points
    state = chains.init({"theta": jnp.asarray(start, jnp.float32)}, {})

    @jax.jit
    def run(state, key):
        def step(s, k):
            s, _ = chains.update(k, s, BATCH)
            return s, s.params["theta"]

        return jax.lax.scan(step, state, jax.random.split(key, num_steps))

    state, positions = run(state, jax.random.key(7))
    positions = np.concatenate([start[None], np.asarray(positions, np.float64)])  # (T+1, 4, 2)
    noise = positions[1:] - positions[:-1] + learning_rate * gaussian_gradient(positions[:-1])
    noise = noise / np.sqrt(2 * learning_rate / NUM_DATA)  # standard normal per coordinate
    flat = noise.transpose(1, 0, 2).reshape(4, -1)  # (chain, steps * 2)
    count = flat.shape[1]
    np.testing.assert_allclose(flat.var(axis=1), 1.0, atol=4 * np.sqrt(2 / count))
    correlation = np.corrcoef(flat)
    off_diagonal = correlation[~np.eye(4, dtype=bool)]
    assert np.all(np.abs(off_diagonal) < 4 / np.sqrt(count))
    # every chain filled its own bank; collected() concatenates chain-major
    assert np.asarray(state.members.num_collected).tolist() == [50] * 4
    banks = sgmcmc.collected(state)["theta"]
    assert banks.shape == (200, 2)
    np.testing.assert_array_equal(banks[50:100], sgmcmc.collected(_member(state, 1))["theta"])
    assert len(np.unique(np.asarray(banks)[:, 0])) == 200
    samples = chains.sample(jax.random.key(8), state, 3)
    assert samples["theta"].shape == (12, 2)


def _member(state, index):
    return jax.tree.map(lambda x: x[index], state.members)


# Conformance row ----------------------------------------------------------------------


def _scan(family, num_steps, key, params, model_state=None, batch=BATCH):
    state = family.init(params, model_state)

    @jax.jit
    def run(state, key):
        step = lambda s, k: family.update(k, s, batch)
        return jax.lax.scan(step, state, jax.random.split(key, num_steps))

    return run(state, key)


def _linear_params(key):
    k1, k2 = jax.random.split(key)
    return {"w": 0.1 * jax.random.normal(k1, (2, 3)), "b": 0.1 * jax.random.normal(k2, (3,))}


def test_conformance_row(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:64], "labels": labels[:64]}
    loss_fn = objectives.classification_loss(linear_apply, num_data=300, prior_precision=1.0)

    def make(perturbation=None):
        return sgmcmc.sgld(
            loss_fn,
            learning_rate=0.05,
            num_data=300,
            num_samples_max=6,
            burn_in=2,
            thin=2,
            perturbation=perturbation,
        )

    family = make()
    assert family.log_prob is None
    state = family.init(_linear_params(jax.random.key(0)), {})
    for field in ("params", "model_state", "step"):
        assert hasattr(state, field)
    update = jax.jit(family.update)
    new_state, info = update(jax.random.key(1), state, batch)
    new_state, info = update(jax.random.key(2), new_state, batch)
    assert update._cache_size() == 1  # compiled once
    assert np.isfinite(float(info.loss)) and "accuracy" in info.metrics
    assert jax.tree.structure(state) == jax.tree.structure(new_state)
    assert jax.eval_shape(lambda s: s, state) == jax.eval_shape(lambda s: s, new_state)
    cond_state = jax.jit(
        lambda s, flag: jax.lax.cond(
            flag, lambda s: family.update(jax.random.key(3), s, batch)[0], lambda s: s, s
        )
    )(new_state, True)
    assert jax.eval_shape(lambda s: s, cond_state) == jax.eval_shape(lambda s: s, state)
    assert int(cond_state.num_collected) == 1  # update index 2 was collected
    np.testing.assert_array_equal(cond_state.samples["w"][0], cond_state.params["w"])
    # sample: leading axis, drawn from the bank
    samples = jax.jit(family.sample, static_argnums=2)(jax.random.key(4), cond_state, 5)
    assert samples["w"].shape == (5, 2, 3) and samples["b"].shape == (5, 3)
    np.testing.assert_array_equal(samples["w"], np.broadcast_to(cond_state.params["w"], (5, 2, 3)))
    # vmap over keys: different noise per key
    keyed = jax.jit(jax.vmap(family.update, in_axes=(0, None, None)))(
        jax.random.split(jax.random.key(5), 3), new_state, batch
    )[0]
    assert keyed.samples["w"].shape == (3, 6, 2, 3)
    assert float(jnp.abs(keyed.params["w"][0] - keyed.params["w"][1]).max()) > 0
    # vmap over stacked states
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), new_state)
    vmapped = jax.jit(jax.vmap(family.update, in_axes=(None, 0, None)))(
        jax.random.key(6), stacked, batch
    )[0]
    expected = update(jax.random.key(6), new_state, batch)[0]
    np.testing.assert_allclose(vmapped.params["w"][1], expected.params["w"], rtol=1e-5, atol=1e-7)
    # the flat version runs and differs
    flat = make(transforms.sam(0.05))
    flat_state, _ = jax.jit(flat.update)(jax.random.key(1), flat.init(state.params, {}), batch)
    plain_state, _ = jax.jit(family.update)(jax.random.key(1), state, batch)
    difference = jnp.abs(flat_state.params["w"] - plain_state.params["w"]).max()
    assert float(difference) > 1e-6
    assert (
        jax.eval_shape(lambda s: s, flat_state).samples
        == jax.eval_shape(lambda s: s, plain_state).samples
    )


def test_sampler_with_batch_norm_stores_model_states_and_averages(blobs):
    inputs, labels = blobs
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300, prior_precision=1.0)
    family = sgmcmc.sghmc(
        loss_fn,
        learning_rate=0.05,
        num_data=300,
        friction=0.1,
        num_samples_max=8,
        burn_in=40,
        thin=5,
    )
    k1, k2 = jax.random.split(jax.random.key(9))
    params = {"w1": jax.random.normal(k1, (2, 8)), "w2": 0.3 * jax.random.normal(k2, (8, 3))}
    batch = {"inputs": inputs[::3], "labels": labels[::3]}
    state, _ = _scan(family, 76, jax.random.key(10), params, {"mean": jnp.zeros(8)}, batch)
    assert int(state.num_collected) == 8
    params_bank, state_bank = sgmcmc.collected(state, with_model_states=True)
    # updates 40, 45, ..., 75; the last one made the current position and model state
    np.testing.assert_array_equal(params_bank["w1"][-1], state.params["w1"])
    np.testing.assert_array_equal(state_bank["mean"][-1], state.model_state["mean"])
    assert float(jnp.abs(state_bank["mean"][0] - state_bank["mean"][-1]).max()) > 0
    predict_fn = bma.model_predict_fn(bn_mlp_apply, per_sample_state=True)
    log_probs, members = bma.predict(
        predict_fn, (params_bank, state_bank), inputs, return_members=True
    )
    np.testing.assert_allclose(
        log_probs, jax.scipy.special.logsumexp(members, 0) - np.log(8), atol=1e-5
    )
    assert float(jnp.mean(jnp.argmax(log_probs, -1) == labels)) > 0.8
    drawn, _ = bma.posterior_predictive(
        jax.random.key(11), family, state, bn_mlp_apply, inputs, num_samples=4
    )
    assert drawn.shape == (300, 3) and bool(jnp.all(jnp.isfinite(drawn)))


# Bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_samples_max=0), "num_samples_max"),
        (dict(num_samples_max=2.5), "num_samples_max"),
        (dict(num_samples_max=4, burn_in=-1), "burn_in"),
        (dict(num_samples_max=4, thin=0), "thin"),
        (dict(num_samples_max=4, collect_when="sampling"), "collect_when"),
        (dict(num_samples_max=4, perturbed_dropout="other"), "perturbed_dropout"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        sgmcmc.build(counting_loss, step_index_optimizer(), **options)


def test_bad_calls_raise():
    family = sgmcmc.build(
        counting_loss,
        step_index_optimizer(),
        num_samples_max=2,
        collect_when=lambda t: jnp.ones(3, bool),
    )
    state = family.init({"a": jnp.zeros(())}, {"calls": jnp.zeros(())})
    with pytest.raises(ValueError, match="scalar boolean"):
        family.update(jax.random.key(0), state, BATCH)
    with pytest.raises(ValueError, match="num_samples"):
        family.sample(jax.random.key(0), state, 0)
    with pytest.raises(ValueError, match="no sample has been collected"):
        sgmcmc.collected(state)
    with pytest.raises(ValueError, match="temperature"):
        sgmcmc.cyclical_sgld(
            counting_loss,
            init_learning_rate=0.1,
            num_data=10,
            num_steps=10,
            num_cycles=2,
            temperature=-1.0,
            num_samples_max=2,
        )
    with pytest.raises(ValueError, match="exploration_fraction"):
        sgmcmc.cyclical_sghmc(
            counting_loss,
            init_learning_rate=0.1,
            num_data=10,
            num_steps=10,
            num_cycles=2,
            exploration_fraction=1.5,
            num_samples_max=2,
        )
    with pytest.raises(ValueError, match="perturbation"):
        sgmcmc.sgld(
            counting_loss, learning_rate=0.1, num_data=10, num_samples_max=2, perturbation=0.05
        )
