"""bSAM: the recursion against a hand-written numpy loop, m-sharpness, sampling helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import transforms as T

CURVATURE = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.3], [0.0, 0.3, 3.0]])
POINTS = np.random.default_rng(2).normal(size=(4, 3))
W0 = np.array([0.8, -0.5, 1.2])
HYPER = dict(rho=0.05, num_data=20, prior_precision=2.0, beta1=0.8, beta2=0.9, damping=0.1)
SCHEDULE = optax.linear_schedule(0.2, 0.05, 3)


def _loss(w, batch):
    residual = w[None] - batch["x"]
    quadratic = jnp.einsum("bi,ij,bj->b", residual, jnp.asarray(CURVATURE, jnp.float32), residual)
    return 0.5 * jnp.mean(quadratic) + 0.025 * jnp.sum(w**4)


def _numpy_grad(w, points):
    return CURVATURE @ (w - points.mean(axis=0)) + 0.1 * w**3


def _run_bsam(tx, num_steps, base_key, garbage_updates=False):
    batch = {"x": jnp.asarray(POINTS, jnp.float32)}
    grad_fn = lambda w: jax.grad(_loss)(w, batch)
    split_grad_fn = T.make_split_grad_fn(lambda w, b, i: jax.grad(_loss)(w, b), batch)

    def body(carry, step):
        w, state = carry
        incoming = jnp.full_like(w, 1e3) if garbage_updates else grad_fn(w)
        updates, state = tx.update(
            incoming,
            state,
            w,
            grad_fn=grad_fn,
            split_grad_fn=split_grad_fn,
            key=jax.random.fold_in(base_key, step),
        )
        w = optax.apply_updates(w, updates)
        return (w, state), (w, state)

    w0 = jnp.asarray(W0, jnp.float32)
    return jax.lax.scan(body, (w0, tx.init(w0)), jnp.arange(num_steps))[1]


def _numpy_bsam(num_steps, base_key, num_sub_batches=None):
    """The reference recursion (team-approx-bayes/bayesian-sam, optim.py) in float64."""
    rho, num_data = HYPER["rho"], HYPER["num_data"]
    beta1, beta2, damping = HYPER["beta1"], HYPER["beta2"], HYPER["damping"]
    decay = HYPER["prior_precision"] / num_data
    w, momentum, precision = W0.copy(), np.zeros(3), np.ones(3)
    path = []
    for step in range(num_steps):
        key = jax.random.fold_in(base_key, step)
        if num_sub_batches is None:
            keys, sub_batches = [key], [POINTS]
        else:
            keys = list(jax.random.split(key, num_sub_batches))
            sub_batches = np.split(POINTS, num_sub_batches)
        scales, perturbed_gradients = [], []
        for sub_key, points in zip(keys, sub_batches, strict=True):
            noise = np.asarray(T.normal_like(sub_key, jnp.zeros(3)), np.float64)
            noisy = w + np.sqrt(1.0 / (num_data * precision)) * noise
            gradient = _numpy_grad(noisy, points)
            perturbed_gradients.append(_numpy_grad(w + rho * gradient / precision, points))
            scales.append(np.sqrt(precision * gradient**2))
        perturbed_gradient = np.mean(perturbed_gradients, axis=0)
        momentum = beta1 * momentum + (1 - beta1) * (perturbed_gradient + decay * w)
        w = w - float(SCHEDULE(step)) * momentum / precision  # old precision
        precision = beta2 * precision + (1 - beta2) * (np.mean(scales, axis=0) + damping + decay)
        path.append((w, momentum, precision))
    return path


@pytest.mark.parametrize("num_sub_batches", [None, 2])
def test_bsam_recursion_matches_numpy_reference(num_sub_batches):
    tx = T.bsam(SCHEDULE, **HYPER, num_sub_batches=num_sub_batches)
    key = jax.random.key(17)
    ws, states = jax.jit(lambda: _run_bsam(tx, 3, key))()
    expected = _numpy_bsam(3, key, num_sub_batches)
    for step, (w, momentum, precision) in enumerate(expected):
        np.testing.assert_allclose(ws[step], w, rtol=1e-5)
        np.testing.assert_allclose(states.momentum[step], momentum, rtol=1e-5)
        np.testing.assert_allclose(states.precision[step], precision, rtol=1e-5)
    np.testing.assert_array_equal(states.count, [1, 2, 3])
    assert np.ptp(np.asarray(states.precision[-1])) > 1e-3  # s adapted per coordinate


def test_bsam_ignores_incoming_gradient():
    tx = T.bsam(SCHEDULE, **HYPER)
    key = jax.random.key(3)
    run = jax.jit(lambda garbage: _run_bsam(tx, 2, key, garbage_updates=garbage), static_argnums=0)
    np.testing.assert_array_equal(run(True)[0], run(False)[0])


def test_bsam_perturbation_is_rho_gradient_over_precision():
    # Linear loss: the gradient is constant, so g_eps = g and gm = (1 - beta1)(g + delta w).
    slope = jnp.array([1.0, -2.0, 0.5])
    grad_fn = jax.grad(lambda w: slope @ w)
    tx = T.bsam(0.1, rho=0.3, num_data=10, prior_precision=0.0, beta1=0.5, s_init=2.0)
    w = jnp.zeros(3)
    updates, state = jax.jit(
        lambda w: tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn, key=jax.random.key(0))
    )(w)
    np.testing.assert_allclose(updates, -0.1 * 0.5 * slope / 2.0, rtol=1e-6)
    expected_precision = 0.999 * 2.0 + 0.001 * (np.sqrt(2.0) * np.abs(slope) + 0.1)
    np.testing.assert_allclose(state.precision, expected_precision, rtol=1e-6)


def test_bsam_sample_and_posterior_scale():
    w = jnp.asarray(W0, jnp.float32)
    num_data = 20
    tx = optax.chain(
        optax.clip_by_global_norm(10.0), T.bsam(0.1, **{**HYPER, "num_data": num_data})
    )
    key = jax.random.key(9)
    _, chain_states = jax.jit(lambda: _run_bsam(tx, 2, key))()
    chain_state = jax.tree.map(lambda x: x[-1], chain_states)
    precision = chain_state[1].precision
    scale = T.bsam_posterior_scale(chain_state, num_data)
    np.testing.assert_allclose(scale, np.sqrt(1.0 / (num_data * np.asarray(precision))), rtol=1e-6)

    samples = jax.jit(lambda k: T.bsam_sample(k, w, chain_state, 4, num_data))(key)
    assert samples.shape == (4, 3)
    for index, sample_key in enumerate(jax.random.split(key, 4)):
        expected = w + scale * T.normal_like(sample_key, w)
        np.testing.assert_allclose(samples[index], expected, rtol=1e-6)

    many = jax.jit(lambda k: T.bsam_sample(k, w, chain_state, 4000, num_data))(key)
    standard_error = np.asarray(scale) / np.sqrt(4000)
    assert np.all(np.abs(np.mean(many, axis=0) - w) < 4 * standard_error)
    np.testing.assert_allclose(np.std(many, axis=0), scale, rtol=4 * np.sqrt(1 / (2 * 4000)))

    injected = optax.inject_hyperparams(T.bsam)(0.1, **HYPER)  # found inside inner_state
    np.testing.assert_allclose(
        T.bsam_posterior_scale(injected.init(w), 5), np.full(3, np.sqrt(1 / 5)), rtol=1e-6
    )


def test_bsam_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="BSAMState"):
        T.bsam_posterior_scale(optax.sgd(0.1).init(jnp.zeros(3)), 10)
    state = T.bsam(0.1, **HYPER).init(jnp.zeros(3))
    with pytest.raises(ValueError, match="num_samples"):
        T.bsam_sample(jax.random.key(0), jnp.zeros(3), state, 0, 10)
