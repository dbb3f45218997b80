"""Closed-form tests of the sharpness-aware transforms (SAM, ASAM, Fisher-SAM, RandomSAM,
MixSAM, VSAM, m-sharpness) on quadratics, convergence runs, and equality with a
hand-written two-pass SAM step on a Flax MLP with BatchNorm."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import transforms as T

THETA = np.array([1.0, -2.0, 0.5])
CENTER = np.array([0.2, 0.1, -0.3])
DIAGONAL = np.diag([1.0, 4.0, 9.0])
_Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))
DENSE = _Q @ np.diag([0.5, 2.0, 7.0]) @ _Q.T
CURVATURES = {"diagonal": DIAGONAL, "dense": DENSE}


def _quadratic_grad_fn(curvature, center=CENTER):
    curvature = jnp.asarray(curvature, jnp.float32)
    center = jnp.asarray(center, jnp.float32)
    return jax.grad(lambda w: 0.5 * (w - center) @ curvature @ (w - center))


def _one_update(tx, grad_fn, params, key=None, state=None):
    state = tx.init(params) if state is None else state
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn, key=key)


# Directions on quadratics: output = g + A eps ------------------------------------------


def _sam_eps(g, theta, rho):
    return rho * g / np.linalg.norm(g)


def _asam_paper_eps(g, theta, rho, eta=0.01):
    scale = np.abs(theta) + eta
    return rho * scale**2 * g / np.linalg.norm(scale * g)


def _asam_davda54_eps(g, theta, rho):
    return rho * theta**2 * g / np.linalg.norm(theta * g)


def _fisher_eps(g, theta, rho, eta=1.0):
    fisher = 1.0 + eta * g**2
    return rho * (g / fisher) / np.sqrt(np.sum(g**2 / fisher))


RULES = {
    "sam": (lambda rho: T.sam(rho), _sam_eps),
    "asam_paper": (lambda rho: T.asam(rho, eta=0.01), _asam_paper_eps),
    "asam_davda54": (lambda rho: T.asam(rho, form="davda54"), _asam_davda54_eps),
    "fisher_sam": (lambda rho: T.fisher_sam(rho, eta=1.0), _fisher_eps),
}


@pytest.mark.parametrize("curvature_name", list(CURVATURES))
@pytest.mark.parametrize("rule", list(RULES))
def test_direction_matches_closed_form_on_quadratic(rule, curvature_name):
    factory, eps_formula = RULES[rule]
    curvature = CURVATURES[curvature_name]
    grad_fn = _quadratic_grad_fn(curvature)

    @jax.jit
    def step(w, rho):  # rho traced: one compilation for every radius
        return _one_update(factory(rho), grad_fn, w)[0]

    g = curvature @ (THETA - CENTER)
    for rho in (0.05, 0.5):
        expected = g + curvature @ eps_formula(g, THETA, rho)
        actual = step(jnp.asarray(THETA, jnp.float32), rho)
        # atol: float32 cancellation in g + A eps for the smallest component.
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * np.abs(g).max())


def test_sam_uses_the_global_norm_over_all_leaves():
    grad_fn = _quadratic_grad_fn(DIAGONAL)
    split = lambda w: {"a": w[:2], "b": w[2:]}
    join = lambda tree: jnp.concatenate([tree["a"], tree["b"]])
    tree_grad_fn = lambda tree: split(grad_fn(join(tree)))
    theta = jnp.asarray(THETA, jnp.float32)
    flat = jax.jit(lambda w: _one_update(T.sam(0.3), grad_fn, w)[0])(theta)
    tree = jax.jit(lambda t: _one_update(T.sam(0.3), tree_grad_fn, t)[0])(split(theta))
    np.testing.assert_allclose(join(tree), flat, rtol=1e-6)
    g = DIAGONAL @ (THETA - CENTER)
    np.testing.assert_allclose(flat, g + DIAGONAL @ _sam_eps(g, THETA, 0.3), rtol=1e-5)


ZERO_RADIUS = {
    "sam": lambda: T.sam(0.0),
    "asam_paper": lambda: T.asam(0.0),
    "asam_davda54": lambda: T.asam(0.0, form="davda54"),
    "fisher_sam": lambda: T.fisher_sam(0.0),
    "mix_sam": lambda: T.mix_sam(0.0, kappa=2.0),
}


@pytest.mark.parametrize("rule", list(ZERO_RADIUS))
def test_zero_radius_equals_base_optimizer_bit_for_bit(rule):
    grad_fn = _quadratic_grad_fn(DENSE)
    base = optax.sgd(0.1, momentum=0.9)
    chained = optax.chain(ZERO_RADIUS[rule](), optax.sgd(0.1, momentum=0.9))

    def run(tx):
        def body(carry, key):
            w, state = carry
            updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn, key=key)
            return (optax.apply_updates(w, updates), state), w

        w0 = jnp.asarray(THETA, jnp.float32)
        keys = jax.random.split(jax.random.key(0), 5)
        return jax.lax.scan(body, (w0, tx.init(w0)), keys)[1]

    np.testing.assert_array_equal(jax.jit(lambda: run(chained))(), jax.jit(lambda: run(base))())


@pytest.mark.parametrize("rule", ["sam", "asam_paper", "asam_davda54", "fisher_sam", "mix_sam"])
def test_zero_gradient_gives_no_nan(rule):
    factory = {**{k: v[0] for k, v in RULES.items()}, "mix_sam": lambda rho: T.mix_sam(rho, 0.0)}
    grad_fn = _quadratic_grad_fn(DIAGONAL)
    at_optimum = jnp.asarray(CENTER, jnp.float32)
    updates, _ = jax.jit(
        lambda w: _one_update(factory[rule](0.1), grad_fn, w, key=jax.random.key(0))
    )(at_optimum)
    np.testing.assert_array_equal(updates, np.zeros(3))


# Rethinking-SAM ----------------------------------------------------------------------

IDENTITY_GRAD_FN = jax.grad(lambda w: 0.5 * jnp.sum(w**2))  # grad_fn(w + eps) = w + eps


def test_mix_sam_with_zero_kappa_equals_sam():
    grad_fn = _quadratic_grad_fn(DENSE)
    theta = jnp.asarray(THETA, jnp.float32)
    mixed = jax.jit(lambda w: _one_update(T.mix_sam(0.2, 0.0), grad_fn, w, jax.random.key(3))[0])
    plain = jax.jit(lambda w: _one_update(T.sam(0.2), grad_fn, w)[0])
    np.testing.assert_allclose(mixed(theta), plain(theta), rtol=1e-6)


def test_mix_sam_matches_closed_form_and_has_norm_rho_for_any_kappa():
    theta = jnp.linspace(-1.0, 2.0, 50)
    key = jax.random.key(7)
    rho = 0.3

    @jax.jit
    def perturbation(kappa):
        return _one_update(T.mix_sam(rho, kappa), IDENTITY_GRAD_FN, theta, key)[0] - theta

    xi = np.asarray(T.normal_like(key, theta), np.float64)
    g = np.asarray(theta, np.float64)
    for kappa in (0.0, 0.3, 3.0, 100.0):
        eps = np.asarray(perturbation(kappa), np.float64)
        v = np.sqrt(50) * g / np.linalg.norm(g) + kappa * xi  # the paper's form
        u = np.sqrt(50) * v / np.linalg.norm(v)
        np.testing.assert_allclose(eps, rho * u / np.sqrt(50), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.linalg.norm(eps), rho, rtol=1e-5)
    # Large kappa: nearly a random direction (cosine with g close to that of xi).
    eps = np.asarray(perturbation(100.0), np.float64)
    assert abs(eps @ g) / (np.linalg.norm(eps) * np.linalg.norm(g)) < 0.1


def test_random_sam_is_isotropic_gaussian_with_std_rho_over_sqrt_d():
    dimension = 20_000
    theta = jnp.zeros(dimension)
    key = jax.random.key(11)
    rho = 0.5
    eps = jax.jit(lambda w: _one_update(T.random_sam(rho), IDENTITY_GRAD_FN, w, key)[0] - w)(theta)
    np.testing.assert_allclose(eps, rho * T.normal_like(key, theta) / np.sqrt(dimension), rtol=1e-6)
    std = rho / np.sqrt(dimension)
    standard_error = std / np.sqrt(2 * dimension)
    assert abs(float(jnp.std(eps)) - std) < 4 * standard_error
    assert abs(float(jnp.mean(eps))) < 4 * std / np.sqrt(dimension)


def _vsam_penalty(m, prior_variance, num_data):
    return (jnp.sum(m**-2) / prior_variance + jnp.sum(jnp.log(m**2))) / (2 * num_data)


def _vsam_objective(m, g, rho, prior_variance, num_data):
    sharpness = rho * jnp.sqrt(jnp.sum(g**2 / m**2))
    return sharpness + _vsam_penalty(m, prior_variance, num_data)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_vsam_with_constant_m_is_sam_with_radius_rho_over_c(scale):
    grad_fn = _quadratic_grad_fn(DENSE)
    tx = T.vsam(rho=0.4, learning_rate_m=0.0, num_data=10, m_init=scale)
    updates, state = jax.jit(lambda w: _one_update(tx, grad_fn, w))(jnp.asarray(THETA, jnp.float32))
    g = DENSE @ (THETA - CENTER)
    expected = g + DENSE @ _sam_eps(g, THETA, 0.4 / scale)
    np.testing.assert_allclose(updates, expected, rtol=1e-5)
    np.testing.assert_array_equal(state.inverse_scale, np.full(3, scale))


def test_vsam_two_steps_match_hand_written_recursion():
    rho, learning_rate_m, prior_variance, num_data = 0.3, 0.05, 0.5, 20
    grad_fn = _quadratic_grad_fn(DIAGONAL)
    tx = T.vsam(rho, learning_rate_m, prior_variance, num_data=num_data, m_init=1.5)
    step = jax.jit(lambda w, s: _one_update(tx, grad_fn, w, state=s))
    w = jnp.asarray(THETA, jnp.float32)
    state = tx.init(w)
    m = np.full(3, 1.5)
    theta = THETA.copy()
    for _ in range(2):
        g = DIAGONAL @ (theta - CENTER)
        root = np.sqrt(np.sum(g**2 / m**2))
        m_gradient = -rho * g**2 / m**3 / root + (1 / m - 1 / (m**3 * prior_variance)) / num_data
        m = m - learning_rate_m * m_gradient  # M is updated before perturbing
        eps = rho * (g / m**2) / np.sqrt(np.sum(g**2 / m**2))
        expected = g + DIAGONAL @ eps
        updates, state = step(w, state)
        np.testing.assert_allclose(updates, expected, rtol=1e-5)
        np.testing.assert_allclose(state.inverse_scale, m, rtol=1e-5)
        theta = theta - 0.1 * expected
        w = w - 0.1 * updates
    assert np.ptp(m) > 1e-3  # M became non-uniform, so the ellipsoid was exercised


def test_vsam_m_gradient_matches_autodiff_and_vanishes_at_prior():
    rho, prior_variance, num_data = 0.7, 0.25, 30
    m = jnp.array([0.5, 1.0, 3.0, 2.0])
    g = jnp.array([0.3, -1.0, 0.2, 0.0])
    closed, autodiff = jax.jit(
        lambda m, g: (
            T.vsam_inverse_scale_gradient(
                g, m, rho=rho, prior_variance=prior_variance, num_data=num_data
            ),
            jax.grad(_vsam_objective)(m, g, rho, prior_variance, num_data),
        )
    )(m, g)
    np.testing.assert_allclose(closed, autodiff, rtol=1e-5)

    # With g = 0 only the KL penalty acts: stationary at M^2 = 1/prior_variance (= 4), and
    # pulling M towards it from both sides (the entropy sign is right).
    @jax.jit
    def penalty_gradients(m, num_data):
        closed = T.vsam_inverse_scale_gradient(
            jnp.zeros_like(m), m, rho=rho, prior_variance=prior_variance, num_data=num_data
        )
        return closed, jax.grad(_vsam_penalty)(m, prior_variance, num_data)

    for gradient in penalty_gradients(jnp.full(2, 2.0), num_data):
        np.testing.assert_allclose(gradient, 0.0, atol=1e-8)
    around, autodiff = penalty_gradients(jnp.array([1.0, 3.0]), 1)
    np.testing.assert_allclose(around, autodiff, rtol=1e-5)
    assert around[0] < 0 < around[1]


def test_vsam_default_m_init_is_sqrt_d_over_rho():
    params = {"a": jnp.zeros((4, 5)), "b": jnp.zeros(5)}
    state = T.vsam(rho=0.5, num_data=10).init(params)
    for leaf in jax.tree.leaves(state.inverse_scale):
        np.testing.assert_allclose(leaf, np.sqrt(25) / 0.5, rtol=1e-6)


# m-sharpness ---------------------------------------------------------------------------

POINTS = np.random.default_rng(1).normal(size=(8, 3))
THETA_M = POINTS.mean(axis=0) + np.array([0.1, -0.2, 0.15])  # sub-batch gradients disagree


def _batch_loss(w, batch):
    residual = w[None] - batch["x"]
    return 0.5 * jnp.mean(
        jnp.einsum("bi,ij,bj->b", residual, jnp.asarray(DENSE, jnp.float32), residual)
    )


def _m_sharpness_update(tx, params, key=None):
    batch = {"x": jnp.asarray(POINTS, jnp.float32)}
    grad_fn = lambda w: jax.grad(_batch_loss)(w, batch)
    split_grad_fn = T.make_split_grad_fn(lambda w, b, i: jax.grad(_batch_loss)(w, b), batch)
    return tx.update(
        grad_fn(params),
        tx.init(params),
        params,
        grad_fn=grad_fn,
        split_grad_fn=split_grad_fn,
        key=key,
    )[0]


def _hand_m_sharpness(eps_formula, num_sub_batches, rho):
    outputs = []
    for sub_batch in np.split(POINTS, num_sub_batches):
        g = DENSE @ (THETA_M - sub_batch.mean(axis=0))
        outputs.append(g + DENSE @ eps_formula(g, THETA_M, rho))
    return np.mean(outputs, axis=0)


def test_m_sharpness_with_one_sub_batch_equals_plain_sam():
    theta = jnp.asarray(THETA_M, jnp.float32)
    split = jax.jit(lambda w: _m_sharpness_update(T.sam(0.2, num_sub_batches=1), w))(theta)
    plain = jax.jit(lambda w: _m_sharpness_update(T.sam(0.2), w))(theta)
    np.testing.assert_allclose(split, plain, rtol=1e-6)
    np.testing.assert_allclose(plain, _hand_m_sharpness(_sam_eps, 1, 0.2), rtol=1e-5)


@pytest.mark.parametrize("num_sub_batches", [2, 4])
@pytest.mark.parametrize("rule", ["sam", "asam_paper"])
def test_m_sharpness_is_mean_of_per_sub_batch_sam_gradients(rule, num_sub_batches):
    factory = {"sam": T.sam, "asam_paper": lambda rho, **kw: T.asam(rho, eta=0.01, **kw)}[rule]
    eps_formula = RULES[rule][1]
    theta = jnp.asarray(THETA_M, jnp.float32)
    tx = factory(0.2, num_sub_batches=num_sub_batches)
    actual = jax.jit(lambda w: _m_sharpness_update(tx, w))(theta)
    expected = _hand_m_sharpness(eps_formula, num_sub_batches, 0.2)
    np.testing.assert_allclose(actual, expected, rtol=1e-5)
    # ... which differs from one perturbation for the whole batch.
    assert np.max(np.abs(expected - _hand_m_sharpness(eps_formula, 1, 0.2))) > 1e-3


def test_m_sharpness_draws_independent_noise_per_sub_batch():
    theta = jnp.asarray(THETA_M, jnp.float32)
    key = jax.random.key(5)
    actual = jax.jit(lambda w: _m_sharpness_update(T.random_sam(0.5, num_sub_batches=2), w, key))(
        theta
    )
    outputs = []
    for sub_batch, sub_key in zip(np.split(POINTS, 2), jax.random.split(key, 2), strict=True):
        eps = 0.5 * np.asarray(T.normal_like(sub_key, theta)) / np.sqrt(3)
        outputs.append(DENSE @ (THETA_M + eps - sub_batch.mean(axis=0)))
    np.testing.assert_allclose(actual, np.mean(outputs, axis=0), rtol=1e-5)


def test_axis_name_averages_perturbed_gradients_over_devices():
    # Two simulated devices (vmap with an axis name), each with half of the batch and its
    # own clean gradient: per-device sharpness, then pmean == m-sharpness with m = 2.
    halves = jnp.asarray(POINTS.reshape(2, 4, 3), jnp.float32)
    tx = T.sam(0.2, axis_name="devices")

    def device_step(w, points):
        grad_fn = lambda v: jax.grad(_batch_loss)(v, {"x": points})
        return tx.update(grad_fn(w), tx.init(w), w, grad_fn=grad_fn)[0]

    theta = jnp.asarray(THETA_M, jnp.float32)
    outputs = jax.jit(jax.vmap(device_step, in_axes=(None, 0), axis_name="devices"))(theta, halves)
    expected = _hand_m_sharpness(_sam_eps, 2, 0.2)
    np.testing.assert_allclose(outputs[0], expected, rtol=1e-5)
    np.testing.assert_allclose(outputs[1], expected, rtol=1e-5)


# Convergence -------------------------------------------------------------------------


def _minimise(loss, w0, tx, num_steps):
    grad_fn = jax.grad(loss)

    def body(carry, _):
        w, state = carry
        updates, state = tx.update(grad_fn(w), state, w, grad_fn=grad_fn)
        return (optax.apply_updates(w, updates), state), None

    return jax.lax.scan(body, (w0, tx.init(w0)), length=num_steps)[0][0]


def test_sam_with_sgd_converges_on_a_parabola():
    loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * (w - jnp.array([1.0, -2.0])) ** 2)
    tx = optax.chain(T.sam(0.05), optax.sgd(0.1, momentum=0.5))
    w = jax.jit(lambda: _minimise(loss, jnp.array([4.0, 3.0]), tx, 2_000))()
    np.testing.assert_allclose(w, [1.0, -2.0], atol=3e-2)


def test_sam_with_sgd_converges_on_rosenbrock():
    loss = lambda w: (1.0 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2
    # SAM's fixed point is biased away from the optimum by O(rho) on this curved valley
    # (rho = 0.01 stops near (0.89, 0.79)); a small radius lands within tolerance.
    tx = optax.chain(T.sam(0.002), optax.sgd(1e-3, momentum=0.9))
    w = jax.jit(lambda: _minimise(loss, jnp.array([-1.0, 1.5]), tx, 20_000))()
    np.testing.assert_allclose(w, [1.0, 1.0], atol=3e-2)


# Equality with a hand-written two-pass SAM step (Flax MLP with BatchNorm) -------------


class _BatchNormMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(8)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        return nn.Dense(3)(x)


def test_chain_equals_hand_written_two_pass_sam_step_with_batchnorm():
    model = _BatchNormMLP()
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(3, 16, 5)), jnp.float32)  # three batches of 16
    labels = jnp.asarray(rng.integers(0, 3, size=(3, 16)))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(inputs[0])
    params, batch_stats = variables["params"], variables["batch_stats"]
    rho, learning_rate, momentum = 0.1, 0.05, 0.9

    def loss_fn(params, batch_stats, x, y):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    tx = optax.chain(T.sam(rho), optax.sgd(learning_rate, momentum=momentum))

    def library_step(params, batch_stats, opt_state, x, y):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        grad_fn = lambda p: jax.grad(loss_fn, has_aux=True)(p, batch_stats, x, y)[0]  # BN discarded
        updates, opt_state = tx.update(grads, opt_state, params, grad_fn=grad_fn, value=loss)
        return optax.apply_updates(params, updates), new_stats, opt_state

    def hand_step(params, batch_stats, trace, x, y):
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x, y)  # pass 1
        norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
        perturbed = jax.tree.map(lambda p, g: p + rho * g / (norm + 1e-12), params, grads)
        ascent_grads, _ = jax.grad(loss_fn, has_aux=True)(perturbed, batch_stats, x, y)  # pass 2
        trace = jax.tree.map(lambda t, g: g + momentum * t, trace, ascent_grads)
        params = jax.tree.map(lambda p, t: p - learning_rate * t, params, trace)
        return params, new_stats, trace

    def sgd_step(params, batch_stats, x, y):
        grads, new_stats = jax.grad(loss_fn, has_aux=True)(params, batch_stats, x, y)
        return jax.tree.map(lambda p, g: p - learning_rate * g, params, grads), new_stats

    @jax.jit
    def run_all(params, batch_stats):
        def body(carry, batch):
            library, hand = carry
            library = library_step(*library, *batch)
            hand = hand_step(*hand, *batch)
            return (library, hand), (library[:2], hand[:2])

        library = (params, batch_stats, tx.init(params))
        hand = (params, batch_stats, jax.tree.map(jnp.zeros_like, params))
        _, (library_path, hand_path) = jax.lax.scan(body, (library, hand), (inputs, labels))
        return library_path, hand_path, sgd_step(params, batch_stats, inputs[0], labels[0])

    library_path, hand_path, sgd_first = run_all(params, batch_stats)
    for ours, theirs in zip(jax.tree.leaves(library_path), jax.tree.leaves(hand_path), strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    # BatchNorm statistics moved (from the clean passes only: equal to plain SGD's first
    # step), and the SAM parameters differ from plain SGD's.
    first_stats = library_path[1]["BatchNorm_0"]["mean"][0]
    np.testing.assert_allclose(first_stats, sgd_first[1]["BatchNorm_0"]["mean"], rtol=1e-6)
    assert not np.allclose(first_stats, batch_stats["BatchNorm_0"]["mean"])
    first_params = jax.tree.map(lambda x: x[0], library_path[0])
    difference = jax.tree.map(lambda a, b: jnp.max(jnp.abs(a - b)), first_params, sgd_first[0])
    assert max(float(x) for x in jax.tree.leaves(difference)) > 1e-5
