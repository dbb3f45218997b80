"""SGLD noise, SGHMC and cyclical schedules: exact noise scales, Gaussian targets whose
stationary moments are known in closed form, and schedule values."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from bnn_flat import transforms as T


def test_langevin_noise_variance_is_two_lr_temperature_over_n():
    learning_rate, num_data, temperature = 0.05, 200, 1.5
    dimension = 100_000
    tx = optax.chain(
        optax.sgd(learning_rate), T.langevin_noise(learning_rate, num_data, temperature)
    )
    zeros = jnp.zeros(dimension)
    updates, _ = jax.jit(lambda k: tx.update(zeros, tx.init(zeros), zeros, key=k))(
        jax.random.key(0)
    )
    variance = 2 * learning_rate * temperature / num_data
    assert abs(float(jnp.var(updates)) - variance) < 4 * variance * np.sqrt(2 / dimension)
    assert abs(float(jnp.mean(updates))) < 4 * np.sqrt(variance / dimension)


def test_langevin_noise_follows_learning_rate_and_temperature_schedules_exactly():
    num_data = 10
    learning_rate = optax.linear_schedule(0.1, 0.01, 3)
    temperature = lambda count: jnp.where(count >= 1, 2.0, 0.0)  # no noise at step 0
    tx = T.langevin_noise(learning_rate, num_data, temperature)
    gradient = jnp.array([1.0, -2.0, 0.5])
    keys = jax.random.split(jax.random.key(1), 3)

    def body(state, key):
        updates, state = tx.update(gradient, state, key=key)
        return state, updates

    final_state, updates = jax.jit(lambda: jax.lax.scan(body, tx.init(gradient), keys))()
    for step in range(3):
        std = np.sqrt(2 * float(learning_rate(step)) * float(temperature(step)) / num_data)
        expected = gradient + std * T.normal_like(keys[step], gradient)
        np.testing.assert_allclose(updates[step], expected, rtol=1e-6)
    np.testing.assert_array_equal(updates[0], gradient)
    assert int(final_state.count) == 3


def _gaussian_problem():
    """Per-datum loss U = 0.5 (w - mean)^T P (w - mean) / N, target exp(-N U / T)."""
    precision = np.array([[2.0, 0.6], [0.6, 1.0]])
    mean = np.array([1.0, -0.5])
    num_data = 10
    grad_fn = lambda w: (
        jnp.asarray(precision, jnp.float32) @ (w - jnp.asarray(mean, jnp.float32)) / num_data
    )
    return precision, mean, num_data, grad_fn


def _run_chains(tx, grad_fn, start, num_chains, num_steps, key):
    def chain(key):
        def body(carry, step_key):
            w, state = carry
            updates, state = tx.update(grad_fn(w), state, w, key=step_key)
            return (optax.apply_updates(w, updates), state), None

        w0 = jnp.asarray(start, jnp.float32)
        keys = jax.random.split(key, num_steps)
        return jax.lax.scan(body, (w0, tx.init(w0)), keys)[0][0]

    return np.asarray(jax.jit(jax.vmap(chain))(jax.random.split(key, num_chains)), np.float64)


def _assert_moments(samples, mean, covariance):
    """Sample mean and covariance within 4 standard errors of the exact values."""
    count = len(samples)
    mean_error = np.sqrt(np.diag(covariance) / count)
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - mean), 4 * mean_error)
    empirical = np.cov(samples, rowvar=False)
    variances = np.diag(covariance)
    covariance_error = np.sqrt((np.outer(variances, variances) + covariance**2) / count)
    np.testing.assert_array_less(np.abs(empirical - covariance), 4 * covariance_error)


def test_sgld_samples_a_gaussian_target():
    precision, mean, num_data, grad_fn = _gaussian_problem()
    learning_rate, temperature = 0.1, 1.0
    tx = optax.chain(
        optax.sgd(learning_rate), T.langevin_noise(learning_rate, num_data, temperature)
    )
    samples = _run_chains(tx, grad_fn, mean, 4000, 600, jax.random.key(2))
    # Exact stationary covariance of the discretised chain w' = (I - hP) w + sqrt(2hT) xi,
    # h = lr / N (it differs from the target T P^-1 by O(h)).
    step = learning_rate / num_data
    transition = np.eye(2) - step * precision
    stationary = scipy.linalg.solve_discrete_lyapunov(
        transition, 2 * step * temperature * np.eye(2)
    )
    np.testing.assert_allclose(stationary, np.linalg.inv(precision), rtol=0.05)
    _assert_moments(samples, mean, stationary)


def test_sghmc_with_zero_temperature_is_heavy_ball_sgd():
    _, mean, _, grad_fn = _gaussian_problem()
    learning_rate, friction = 0.3, 0.2
    sghmc = T.sghmc(learning_rate, 10, friction=friction, temperature=0.0)
    heavy_ball = optax.sgd(learning_rate, momentum=1.0 - friction)
    start = mean + np.array([2.0, -1.0])
    key = jax.random.key(0)
    ours = _run_chains(sghmc, grad_fn, start, 1, 5, key)
    reference = _run_chains(heavy_ball, grad_fn, start, 1, 5, key)
    np.testing.assert_allclose(ours, reference, rtol=1e-6)
    assert np.abs(ours - start).max() > 1e-2


def test_sghmc_noise_enters_the_momentum_with_variance_two_alpha_lr_t_over_n():
    learning_rate, num_data, friction, temperature = 0.05, 40, 0.3, 2.0
    tx = T.sghmc(learning_rate, num_data, friction=friction, temperature=temperature)
    gradient = jnp.array([0.5, -1.0, 2.0])
    key = jax.random.key(4)
    updates, state = jax.jit(lambda: tx.update(gradient, tx.init(gradient), key=key))()
    std = np.sqrt(2 * friction * learning_rate * temperature / num_data)
    expected = -learning_rate * gradient + std * T.normal_like(key, gradient)
    np.testing.assert_allclose(updates, expected, rtol=1e-6)
    np.testing.assert_array_equal(state.momentum, updates)


def test_sghmc_samples_a_gaussian_target():
    precision, mean, num_data, grad_fn = _gaussian_problem()
    learning_rate, friction, temperature = 0.1, 0.2, 1.0
    tx = T.sghmc(learning_rate, num_data, friction=friction, temperature=temperature)
    samples = _run_chains(tx, grad_fn, mean, 4000, 600, jax.random.key(5))
    # Exact stationary covariance of the linear recursion on x = (w, v):
    # v' = (1 - a) v - h P (w - mean) + s xi,  w' = w + v',  h = lr / N, s^2 = 2 a lr T / N.
    step = learning_rate / num_data
    identity = np.eye(2)
    transition = np.block(
        [
            [identity - step * precision, (1 - friction) * identity],
            [-step * precision, (1 - friction) * identity],
        ]
    )
    noise = np.vstack([identity, identity])
    variance = 2 * friction * learning_rate * temperature / num_data
    stationary = scipy.linalg.solve_discrete_lyapunov(transition, variance * noise @ noise.T)[
        :2, :2
    ]
    np.testing.assert_allclose(stationary, temperature * np.linalg.inv(precision), rtol=0.1)
    _assert_moments(samples, mean, stationary)


# Cyclical schedules ------------------------------------------------------------------


def test_cyclical_schedule_values():
    init_value, final_value = 0.1, 0.01
    schedule = T.cyclical_schedule(init_value, num_steps=10, num_cycles=3, final_value=final_value)
    steps = jnp.arange(12)
    values = jax.jit(jax.vmap(schedule))(steps)
    cycle_length = 4  # ceil(10 / 3)
    position = (np.arange(12) % cycle_length) / cycle_length
    expected = final_value + 0.5 * (init_value - final_value) * (1 + np.cos(np.pi * position))
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(values)[[0, 4, 8]], init_value, rtol=1e-6)
    np.testing.assert_allclose(values[2], (init_value + final_value) / 2, rtol=1e-6)
    assert np.all(np.diff(np.asarray(values[:4])) < 0)


def test_is_sampling_phase():
    phase = jax.jit(
        jax.vmap(
            lambda t: T.is_sampling_phase(t, num_steps=10, num_cycles=2, exploration_fraction=0.6)
        )
    )(jnp.arange(10))
    expected = [False, False, False, True, True] * 2  # positions 0, .2, .4, .6, .8
    assert np.asarray(phase).tolist() == expected


def test_cyclical_langevin_adds_noise_only_while_sampling():
    options = dict(num_steps=8, num_cycles=2, exploration_fraction=0.5)
    learning_rate = T.cyclical_schedule(0.1, options["num_steps"], options["num_cycles"])
    temperature = lambda count: T.is_sampling_phase(count, **options).astype(jnp.float32)
    tx = optax.chain(optax.sgd(learning_rate), T.langevin_noise(learning_rate, 5, temperature))
    gradient = jnp.ones(4)
    keys = jax.random.split(jax.random.key(6), 8)

    def body(state, key):
        updates, state = tx.update(gradient, state, gradient, key=key)
        return state, updates

    _, updates = jax.jit(lambda: jax.lax.scan(body, tx.init(gradient), keys))()
    for step in range(8):
        drift = -float(learning_rate(step)) * gradient
        is_noisy = step % 4 >= 2
        np.testing.assert_equal(bool(np.allclose(updates[step], drift, rtol=1e-6)), not is_noisy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_steps=3, num_cycles=4), "num_cycles"),
        (dict(num_steps=0, num_cycles=1), "num_steps"),
        (dict(num_steps=10, num_cycles=2.5), "num_cycles"),
    ],
)
def test_cyclical_helpers_reject_bad_counts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        T.cyclical_schedule(0.1, **kwargs)
    with pytest.raises(ValueError, match=message):
        T.is_sampling_phase(0, **kwargs, exploration_fraction=0.5)


def test_is_sampling_phase_rejects_bad_fraction():
    with pytest.raises(ValueError, match="exploration_fraction"):
        T.is_sampling_phase(0, num_steps=10, num_cycles=2, exploration_fraction=1.5)
