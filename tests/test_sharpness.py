"""Closed-form tests of bnn_flat.sharpness: HVPs, Lanczos, power iteration, Hutchinson,
stochastic Lanczos quadrature, SAM/ASAM sharpness and their posterior averages.

Quadratics 0.5 x^T A x with A = Q diag(lambda) Q^T of known spectrum give exact answers; a
tiny MLP is checked against its dense Hessian (jax.hessian)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from bnn_flat import models, sharpness

DIMENSION = 50
# Five well-separated top eigenvalues above a bulk in [0, 3].
TOP = np.array([10.0, 8.0, 6.5, 5.0, 4.0])
SPECTRUM = np.concatenate([TOP, np.linspace(3.0, 0.0, DIMENSION - 5)])


def _orthogonal(seed: int, dimension: int = DIMENSION) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dimension, dimension)))
    return q * np.sign(np.diag(r))


def _matrix(spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    q = _orthogonal(seed, len(spectrum))
    return (q * spectrum) @ q.T  # float64


MATRIX = _matrix(SPECTRUM)


def _split(x: jax.Array) -> dict[str, jax.Array]:
    """Splits a flat 50-vector into a pytree, to exercise pytree handling."""
    return {"a": x[:20], "b": x[20:].reshape(5, 6)}


def _join(tree: dict[str, jax.Array]) -> jax.Array:
    return jnp.concatenate([tree["a"], tree["b"].reshape(-1)])


def _quadratic_loss(matrix: np.ndarray, linear: np.ndarray | None = None):
    a = jnp.asarray(matrix, jnp.float32)
    b = jnp.zeros(a.shape[0]) if linear is None else jnp.asarray(linear, jnp.float32)

    def loss(params):
        x = _join(params)
        return 0.5 * x @ a @ x + b @ x

    return loss


def _matvec(matrix: np.ndarray):
    a = jnp.asarray(matrix, jnp.float32)
    return lambda v: _split(a @ _join(v))


PARAMS_LIKE = _split(jnp.zeros(DIMENSION))


# Hessian-vector products ---------------------------------------------------------------------


def test_hvp_of_quadratic_equals_matrix_times_vector():
    rng = np.random.default_rng(1)
    point = _split(jnp.asarray(rng.normal(size=DIMENSION), jnp.float32))
    vector = rng.normal(size=DIMENSION)
    result = jax.jit(functools.partial(sharpness.hvp, _quadratic_loss(MATRIX, np.ones(50))))(
        point, _split(jnp.asarray(vector, jnp.float32))
    )
    np.testing.assert_allclose(_join(result), MATRIX @ vector, rtol=1e-5, atol=1e-5)


def test_hvp_rejects_a_vector_of_another_structure():
    loss = _quadratic_loss(MATRIX)
    with pytest.raises(ValueError, match="tree structure"):
        sharpness.hvp(loss, PARAMS_LIKE, jnp.zeros(DIMENSION))
    with pytest.raises(ValueError, match="shape"):
        sharpness.hvp(loss, PARAMS_LIKE, {"a": jnp.zeros(20), "b": jnp.zeros((6, 5))})


# Lanczos and power iteration -----------------------------------------------------------------


def test_lanczos_tridiagonal_is_the_projection_and_basis_orthonormal():
    result = jax.jit(
        lambda key: sharpness.lanczos(key, _matvec(MATRIX), PARAMS_LIKE, 12, return_basis=True)
    )(jax.random.key(0))
    basis = np.asarray(result.basis, np.float64)
    assert basis.shape == (12, DIMENSION)
    np.testing.assert_allclose(basis @ basis.T, np.eye(12), atol=1e-5)
    tridiagonal = np.diag(result.alphas) + np.diag(result.betas, 1) + np.diag(result.betas, -1)
    np.testing.assert_allclose(basis @ MATRIX @ basis.T, tridiagonal, atol=2e-5)
    assert np.all(np.asarray(result.betas) > 0)


def test_top_eigenvalues_of_quadratic_match_known_spectrum():
    loss = _quadratic_loss(MATRIX, np.ones(DIMENSION))
    point = _split(jnp.ones(DIMENSION))
    top = jax.jit(
        lambda key, p: sharpness.top_hessian_eigenvalues(
            key, loss, p, k=5, num_iterations=30, return_eigenvectors=True
        )
    )(jax.random.key(3), point)
    np.testing.assert_allclose(top.eigenvalues, TOP, rtol=1e-4)
    assert int(top.num_hessian_vector_products) == 30
    # Ritz vectors: unit norm and A u = lambda u.
    vectors = np.stack(
        [np.asarray(_join(jax.tree.map(lambda x, i=i: x[i], top.eigenvectors))) for i in range(5)]
    )
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(vectors @ MATRIX, TOP[:, None] * vectors, atol=2e-3)


def test_plain_lanczos_without_reorthogonalisation_finds_the_top_eigenvalue():
    top = sharpness.top_hessian_eigenvalues(
        jax.random.key(0),
        _quadratic_loss(MATRIX),
        PARAMS_LIKE,
        k=1,
        num_iterations=25,
        reorthogonalize=False,
    )
    np.testing.assert_allclose(top.eigenvalues, TOP[:1], rtol=1e-4)


def test_lanczos_restarts_on_repeated_eigenvalues_and_finds_multiplicities():
    # Only three distinct eigenvalues: the Krylov space of a single start vector has
    # dimension 3, so Lanczos breaks down and must restart to see the multiplicities.
    spectrum = np.repeat([7.0, 2.0, 0.5], [3, 20, 27])
    matrix = _matrix(spectrum, seed=2)
    result = sharpness.lanczos(
        jax.random.key(0), _matvec(matrix), PARAMS_LIKE, 10, return_basis=True
    )
    betas = np.asarray(result.betas)
    assert betas[2] == 0.0  # the first breakdown is at step 3, stored as beta = 0
    basis = np.asarray(result.basis, np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(10), atol=1e-5)
    ritz = np.sort(
        np.linalg.eigvalsh(np.diag(result.alphas) + np.diag(betas, 1) + np.diag(betas, -1))
    )[::-1]
    # Ritz values lie in [0.5, 7] and 7 (multiplicity 3) is found three times.
    np.testing.assert_allclose(ritz[:3], [7.0, 7.0, 7.0], rtol=1e-4)
    assert ritz[-1] >= 0.5 - 1e-4 and ritz[3] <= 2.0 + 1e-4


def test_lanczos_with_full_iterations_recovers_the_whole_spectrum():
    result = sharpness.lanczos(jax.random.key(4), _matvec(MATRIX), PARAMS_LIKE, DIMENSION)
    tridiagonal = np.diag(result.alphas) + np.diag(result.betas, 1) + np.diag(result.betas, -1)
    np.testing.assert_allclose(
        np.sort(np.linalg.eigvalsh(tridiagonal)), np.sort(SPECTRUM), atol=1e-4
    )


def test_lanczos_initial_vector_in_an_eigenspace_gives_its_eigenvalue():
    q = _orthogonal(0)
    start = _split(jnp.asarray(3.0 * q[:, 2], jnp.float32))  # eigenvector of 6.5, unnormalised
    result = sharpness.lanczos(
        jax.random.key(0), _matvec(MATRIX), PARAMS_LIKE, 1, initial_vector=start
    )
    np.testing.assert_allclose(result.alphas, [6.5], rtol=1e-5)
    assert result.betas.shape == (0,)


def test_power_iteration_returns_eigenvalue_of_largest_magnitude():
    spectrum = SPECTRUM.copy()
    spectrum[-1] = -12.0  # largest magnitude is negative: power iteration returns it
    matrix = _matrix(spectrum, seed=5)
    result = jax.jit(lambda key: sharpness.power_iteration(key, _matvec(matrix), PARAMS_LIKE, 100))(
        jax.random.key(0)
    )
    np.testing.assert_allclose(result.eigenvalue, -12.0, rtol=1e-4)
    vector = np.asarray(_join(result.eigenvector), np.float64)
    np.testing.assert_allclose(np.linalg.norm(vector), 1.0, rtol=1e-5)
    q = _orthogonal(5)
    np.testing.assert_allclose(abs(vector @ q[:, -1]), 1.0, atol=1e-3)
    positive = sharpness.power_iteration(jax.random.key(1), _matvec(MATRIX), PARAMS_LIKE, 100)
    np.testing.assert_allclose(positive.eigenvalue, 10.0, rtol=1e-4)


def test_iteration_counts_are_validated():
    matvec = _matvec(MATRIX)
    with pytest.raises(ValueError, match="must not exceed the number of parameters"):
        sharpness.lanczos(jax.random.key(0), matvec, PARAMS_LIKE, DIMENSION + 1)
    with pytest.raises(ValueError, match="num_iterations must be a positive integer"):
        sharpness.lanczos(jax.random.key(0), matvec, PARAMS_LIKE, 0)
    with pytest.raises(ValueError, match="k \\(6\\) must not exceed"):
        sharpness.top_hessian_eigenvalues(
            jax.random.key(0), _quadratic_loss(MATRIX), PARAMS_LIKE, k=6, num_iterations=5
        )
    with pytest.raises(ValueError, match="num_probes must be at least 2"):
        sharpness.hutchinson_trace(jax.random.key(0), matvec, PARAMS_LIKE, 1)
    with pytest.raises(ValueError, match="params_like is empty"):
        sharpness.power_iteration(jax.random.key(0), lambda v: v, {}, 3)
    with pytest.raises(ValueError, match="start vector must be non-zero"):
        sharpness.lanczos(jax.random.key(0), matvec, PARAMS_LIKE, 3, initial_vector=PARAMS_LIKE)


# Hutchinson and stochastic Lanczos quadrature ------------------------------------------------


def test_hutchinson_trace_within_four_standard_errors():
    estimate = jax.jit(
        lambda key: sharpness.hutchinson_trace(key, _matvec(MATRIX), PARAMS_LIKE, 200)
    )(jax.random.key(0))
    trace = SPECTRUM.sum()
    # Rademacher variance of one probe: 2 * sum_{i != j} A_ij^2.
    off_diagonal = np.sum(MATRIX**2) - np.sum(np.diag(MATRIX) ** 2)
    expected_error = np.sqrt(2 * off_diagonal / 200)
    np.testing.assert_allclose(estimate.standard_error, expected_error, rtol=0.25)
    assert abs(float(estimate.trace) - trace) < 4 * float(estimate.standard_error)
    assert float(estimate.standard_error) > 0


def test_hutchinson_trace_is_exact_for_diagonal_matrices():
    diagonal = jnp.asarray(np.linspace(-2.0, 5.0, DIMENSION), jnp.float32)
    estimate = sharpness.hutchinson_trace(
        jax.random.key(0), lambda v: _split(diagonal * _join(v)), PARAMS_LIKE, 8
    )
    np.testing.assert_allclose(estimate.trace, float(np.sum(np.asarray(diagonal))), rtol=1e-6)
    assert float(estimate.standard_error) == 0.0


def test_slq_moments_match_normalised_traces():
    num_probes = 40
    result = jax.jit(
        lambda key: sharpness.spectral_density(
            key,
            _matvec(MATRIX),
            PARAMS_LIKE,
            num_iterations=15,
            num_probes=num_probes,
            grid=jnp.linspace(-2.0, 13.0, 3001),
            sigma=0.1,
        )
    )(jax.random.key(0))
    nodes = np.asarray(result.nodes, np.float64)
    weights = np.asarray(result.weights, np.float64)
    assert nodes.shape == weights.shape == (num_probes, 15)
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)  # moment 0 per probe
    for power, exact in ((1, np.trace(MATRIX)), (2, np.trace(MATRIX @ MATRIX))):
        per_probe = np.sum(weights * nodes**power, axis=1)
        standard_error = per_probe.std(ddof=1) / np.sqrt(num_probes)
        assert abs(per_probe.mean() - exact / DIMENSION) < 4 * standard_error + 1e-5
    # The smoothed density integrates to 1 and has mean tr(A)/d (nodes are exact moments).
    grid = np.asarray(result.grid)
    density = np.asarray(result.density, np.float64)
    spacing = grid[1] - grid[0]
    np.testing.assert_allclose(density.sum() * spacing, 1.0, rtol=1e-4)
    np.testing.assert_allclose(
        (grid * density).sum() * spacing, np.mean(np.sum(weights * nodes, axis=1)), rtol=1e-4
    )


def test_slq_on_rademacher_probes_is_exact_for_diagonal_first_moment():
    diagonal = jnp.asarray(np.linspace(0.0, 4.0, DIMENSION), jnp.float32)
    result = sharpness.spectral_density(
        jax.random.key(1),
        lambda v: _split(diagonal * _join(v)),
        PARAMS_LIKE,
        num_iterations=4,
        num_probes=3,
        grid=64,
    )
    first = np.sum(np.asarray(result.weights) * np.asarray(result.nodes), axis=1)
    np.testing.assert_allclose(first, 2.0, rtol=1e-5)  # mean of linspace(0, 4)
    assert result.grid.shape == (64,)
    assert float(result.grid[0]) < float(result.nodes.min())


def test_spectral_density_rejects_bad_options():
    matvec = _matvec(MATRIX)
    with pytest.raises(ValueError, match="sigma must be positive"):
        sharpness.spectral_density(
            jax.random.key(0), matvec, PARAMS_LIKE, num_iterations=3, num_probes=2, sigma=0.0
        )
    with pytest.raises(ValueError, match="grid must be a non-empty 1-D array"):
        sharpness.spectral_density(
            jax.random.key(0),
            matvec,
            PARAMS_LIKE,
            num_iterations=3,
            num_probes=2,
            grid=jnp.zeros((2, 2)),
        )


# Dense Hessian of a tiny MLP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_mlp():
    module = models.mlp([16, 8], num_outputs=3, activation=jnp.tanh)
    key_inputs, key_labels, key_init = jax.random.split(jax.random.key(0), 3)
    inputs = jax.random.normal(key_inputs, (40, 4))
    labels = jax.random.randint(key_labels, (40,), 0, 3)
    params, model_state = models.init(module, key_init, inputs[:1])
    apply_fn = models.make_apply(module)
    loss = sharpness.make_loss_for_hessian(apply_fn, model_state, inputs, labels)
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.jit(jax.hessian(lambda x: loss(unravel(x))))(flat), np.float64)
    return {
        "params": params,
        "loss": loss,
        "hessian": hessian,
        "unravel": unravel,
        "apply_fn": apply_fn,
        "model_state": model_state,
        "inputs": inputs,
        "labels": labels,
    }


def test_mlp_hvp_and_top_eigenvalues_match_dense_hessian(tiny_mlp):
    params, loss, hessian = tiny_mlp["params"], tiny_mlp["loss"], tiny_mlp["hessian"]
    dimension = hessian.shape[0]
    assert 200 <= dimension <= 300  # 4*16+16 + 16*8+8 + 8*3+3 = 243
    vector = np.random.default_rng(0).normal(size=dimension)

    @jax.jit
    def product_and_top(key, p, v):
        product = ravel_pytree(sharpness.hvp(loss, p, tiny_mlp["unravel"](v)))[0]
        top = sharpness.top_hessian_eigenvalues(key, loss, p, k=5, num_iterations=30)
        return product, top.eigenvalues

    product, top = product_and_top(jax.random.key(0), params, jnp.asarray(vector, jnp.float32))
    np.testing.assert_allclose(product, hessian @ vector, atol=1e-4)
    exact = np.sort(np.linalg.eigvalsh(hessian))[::-1][:5]
    np.testing.assert_allclose(top, exact, atol=1e-4)


def test_batched_loss_equals_full_loss_and_its_hvp(tiny_mlp):
    params = tiny_mlp["params"]
    batched = sharpness.make_loss_for_hessian(
        tiny_mlp["apply_fn"],
        tiny_mlp["model_state"],
        tiny_mlp["inputs"],
        tiny_mlp["labels"],
        batch_size=7,  # 40 = 5 * 7 + 5: the last batch is padded
    )
    np.testing.assert_allclose(batched(params), tiny_mlp["loss"](params), rtol=1e-6)
    vector = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(
        ravel_pytree(jax.jit(sharpness.hvp, static_argnums=0)(batched, params, vector))[0],
        tiny_mlp["hessian"] @ np.ones(tiny_mlp["hessian"].shape[0]),
        atol=1e-4,
    )


def test_loss_helper_options_and_prior():
    apply_fn = lambda p, s, x, *, train, key: (x @ p["w"], s)  # noqa: E731
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(6, 2)), jnp.float32)
    targets = jnp.asarray(np.random.default_rng(1).normal(size=(6, 1)), jnp.float32)
    params = {"w": jnp.array([[0.5], [-1.0]])}
    residual = np.asarray(targets - inputs @ params["w"])
    regression = sharpness.make_loss_for_hessian(
        apply_fn, {}, inputs, targets, "regression", prior_precision=2.0, num_data=10
    )
    expected = np.mean(0.5 * residual**2 + 0.5 * np.log(2 * np.pi)) + 0.5 * 2.0 * 1.25 / 10
    np.testing.assert_allclose(regression(params), expected, rtol=1e-6)
    # Hessian of the regression loss: X^T X / N + prior / num_data.
    product = sharpness.hvp(regression, params, {"w": jnp.array([[1.0], [0.0]])})
    x = np.asarray(inputs, np.float64)
    np.testing.assert_allclose(
        product["w"][:, 0], (x.T @ x / 6)[:, 0] + np.array([0.2, 0.0]), rtol=1e-5
    )
    custom = sharpness.make_loss_for_hessian(
        apply_fn, {}, inputs, targets, lambda out, y: jnp.abs(out - y)[:, 0], batch_size=4
    )
    np.testing.assert_allclose(custom(params), np.mean(np.abs(residual)), rtol=1e-6)


def test_loss_helper_rejects_bad_input():
    apply_fn = lambda p, s, x, *, train, key: (x @ p["w"], s)  # noqa: E731
    inputs, labels = jnp.ones((4, 2)), jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="loss must be one of"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs, labels, "hinge")
    with pytest.raises(ValueError, match="labels must have a leading axis of 4"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs, labels[:3])
    with pytest.raises(ValueError, match="NaN"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs.at[0, 0].set(jnp.nan), labels)
    with pytest.raises(ValueError, match="integer labels"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs, labels.astype(jnp.float32))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs, labels, batch_size=0)
    with pytest.raises(ValueError, match="non-empty batch"):
        sharpness.make_loss_for_hessian(apply_fn, {}, jnp.ones((0, 2)), labels[:0])
    with pytest.raises(ValueError, match="prior_precision must be non-negative"):
        sharpness.make_loss_for_hessian(apply_fn, {}, inputs, labels, prior_precision=-1.0)


class _BatchNormNet(nn.Module):
    """Dense -> BatchNorm -> tanh -> Dropout -> Dense: cheap to compile, has running stats."""

    @nn.compact
    def __call__(self, inputs, *, train):
        x = nn.Dense(8)(inputs)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.0)(x)
        x = nn.Dropout(0.5)(jnp.tanh(x), deterministic=not train)
        return nn.Dense(3)(x)


def test_batchnorm_loss_is_in_eval_mode_and_independent_of_batch_composition():
    module = _BatchNormNet()
    key_inputs, key_labels, key_init, key_dropout = jax.random.split(jax.random.key(0), 4)
    inputs = 1.0 + 2.0 * jax.random.normal(key_inputs, (12, 4))
    labels = jax.random.randint(key_labels, (12,), 0, 3)
    params, model_state = models.init(module, key_init, inputs[:1])
    apply_fn = models.make_apply(module)
    # Non-trivial running statistics (momentum 0: the statistics of these 12 inputs).
    _, model_state = apply_fn(params, model_state, inputs, train=True, key=key_dropout)
    assert float(jnp.abs(model_state["batch_stats"]["BatchNorm_0"]["mean"]).max()) > 0.1

    def make(x, y, batch_size=None):
        return sharpness.make_loss_for_hessian(apply_fn, model_state, x, y, batch_size=batch_size)

    permutation = np.random.default_rng(0).permutation(12)

    def train_loss(p, x, y):
        logits, _ = apply_fn(p, model_state, x, train=True, key=key_dropout)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    @jax.jit
    def values(p):
        logits, _ = apply_fn(p, model_state, inputs, train=False)
        return {
            "full": make(inputs, labels)(p),
            "shuffled": make(inputs[permutation], labels[permutation], 5)(p),
            "halves": 0.5 * (make(inputs[:6], labels[:6])(p) + make(inputs[6:], labels[6:])(p)),
            # Eval mode by hand: running statistics, no dropout.
            "by_hand": -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(12), labels]),
            "train_full": train_loss(p, inputs, labels),
            "train_halves": 0.5
            * (train_loss(p, inputs[:6], labels[:6]) + train_loss(p, inputs[6:], labels[6:])),
        }

    result = values(params)
    np.testing.assert_allclose(result["shuffled"], result["full"], rtol=1e-5)
    np.testing.assert_allclose(result["halves"], result["full"], rtol=1e-5)
    np.testing.assert_allclose(result["by_hand"], result["full"], rtol=1e-6)
    # Training mode (batch statistics) would depend on the batches: the halves differ.
    assert abs(float(result["train_halves"]) - float(result["train_full"])) > 1e-3


# SAM and adaptive sharpness ------------------------------------------------------------------


def _trust_region_maximum(matrix, gradient, rho):
    """max_{||e|| <= rho} g.e + 0.5 e^T A e for PSD A, by bisection on the secular equation."""
    values, vectors = np.linalg.eigh(matrix)
    g = vectors.T @ gradient
    low, high = values[-1] + 1e-12, values[-1] + np.linalg.norm(gradient) / rho + 1.0
    for _ in range(200):
        mu = 0.5 * (low + high)
        norm = np.linalg.norm(g / (mu - values))
        low, high = (mu, high) if norm > rho else (low, mu)
    e = vectors @ (g / (mu - values))
    return gradient @ e + 0.5 * e @ matrix @ e


POINT = np.random.default_rng(7).normal(size=DIMENSION)
LINEAR = np.random.default_rng(8).normal(size=DIMENSION)


def _quadratic_value(w):
    return 0.5 * w @ MATRIX @ w + LINEAR @ w


def test_one_step_sam_sharpness_equals_closed_form():
    loss = _quadratic_loss(MATRIX, LINEAR)
    gradient = MATRIX @ POINT + LINEAR
    sharp = jax.jit(lambda p, rho: sharpness.sam_sharpness(loss, p, rho))
    for rho in (0.05, 0.5):
        expected = _quadratic_value(POINT + rho * gradient / np.linalg.norm(gradient))
        expected -= _quadratic_value(POINT)
        actual = sharp(_split(jnp.asarray(POINT, jnp.float32)), rho)
        np.testing.assert_allclose(actual, expected, rtol=1e-4)


def test_multi_step_sam_sharpness_converges_to_the_exact_maximum():
    loss = _quadratic_loss(MATRIX, LINEAR)
    point = _split(jnp.asarray(POINT, jnp.float32))
    gradient = MATRIX @ POINT + LINEAR
    rho = 2.0
    exact = _trust_region_maximum(MATRIX, gradient, rho)
    one_step = float(sharpness.sam_sharpness(loss, point, rho))
    many = float(jax.jit(lambda p: sharpness.sam_sharpness(loss, p, rho, num_steps=200))(point))
    assert one_step < exact - 0.1  # one step is a strictly weaker lower bound here
    np.testing.assert_allclose(many, exact, rtol=1e-4)


def test_sam_sharpness_at_a_minimum_is_half_rho_squared_lambda_max():
    loss = _quadratic_loss(MATRIX)
    zero = _split(jnp.zeros(DIMENSION))
    rho = 0.3
    # Zero gradient: from epsilon_0 = 0 the ascent cannot start.
    assert float(sharpness.sam_sharpness(loss, zero, rho, num_steps=5)) == 0.0
    start = _split(jax.random.normal(jax.random.key(0), (DIMENSION,)))
    value = sharpness.sam_sharpness(loss, zero, rho, num_steps=100, initial_perturbation=start)
    np.testing.assert_allclose(value, 0.5 * rho**2 * TOP[0], rtol=1e-4)


def test_adaptive_sharpness_one_step_closed_form_and_scale_identity():
    loss = _quadratic_loss(MATRIX, LINEAR)
    gradient = MATRIX @ POINT + LINEAR
    rho, eta = 0.1, 0.05
    scale = np.abs(POINT) + eta
    epsilon = rho * scale**2 * gradient / np.linalg.norm(scale * gradient)
    expected = _quadratic_value(POINT + epsilon) - _quadratic_value(POINT)
    point = _split(jnp.asarray(POINT, jnp.float32))
    np.testing.assert_allclose(
        sharpness.adaptive_sharpness(loss, point, rho, eta), expected, rtol=1e-4
    )
    # With |w| = c everywhere and eta = 0 the ASAM ball is the SAM ball of radius c * rho.
    constant = _split(jnp.asarray(1.5 * np.sign(POINT), jnp.float32))
    for num_steps in (1, 10):
        np.testing.assert_allclose(
            sharpness.adaptive_sharpness(loss, constant, rho, num_steps=num_steps),
            sharpness.sam_sharpness(loss, constant, 1.5 * rho, num_steps=num_steps),
            rtol=1e-5,
        )


def test_sharpness_rejects_bad_radius_and_steps():
    loss = _quadratic_loss(MATRIX)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        sharpness.sam_sharpness(loss, PARAMS_LIKE, -0.1)
    with pytest.raises(ValueError, match="rho must be non-negative"):
        sharpness.sam_sharpness(loss, PARAMS_LIKE, float("nan"))
    with pytest.raises(ValueError, match="num_steps must be a positive integer"):
        sharpness.sam_sharpness(loss, PARAMS_LIKE, 0.1, num_steps=0)
    with pytest.raises(ValueError, match="step_size must be positive"):
        sharpness.sam_sharpness(loss, PARAMS_LIKE, 0.1, step_size=0.0)
    with pytest.raises(ValueError, match="eta must be non-negative"):
        sharpness.adaptive_sharpness(loss, PARAMS_LIKE, 0.1, eta=-1.0)
    assert float(sharpness.sam_sharpness(loss, _split(jnp.ones(DIMENSION)), 0.0)) == 0.0


# Posterior averages --------------------------------------------------------------------------


def test_posterior_sharpness_of_identical_samples_equals_the_single_value():
    loss = _quadratic_loss(MATRIX, LINEAR)
    point = _split(jnp.asarray(POINT, jnp.float32))
    single = float(sharpness.sam_sharpness(loss, point, 0.2, num_steps=3))
    samples = jax.tree.map(lambda x: jnp.stack([x] * 4), point)
    result = jax.jit(lambda key, s: sharpness.posterior_sharpness(key, loss, s, 0.2, num_steps=3))(
        jax.random.key(0), samples
    )
    np.testing.assert_allclose(result.mean, single, rtol=1e-6)
    assert float(result.std) == 0.0
    np.testing.assert_allclose(result.values, [single] * 4, rtol=1e-6)


def test_posterior_sharpness_of_different_samples_and_adaptive_and_states():
    loss = _quadratic_loss(MATRIX, LINEAR)
    rng = np.random.default_rng(3)
    stacked = jnp.asarray(rng.normal(size=(3, DIMENSION)), jnp.float32)
    samples = jax.vmap(_split)(stacked)
    singles = [float(sharpness.adaptive_sharpness(loss, _split(w), 0.1, 0.01)) for w in stacked]
    result = sharpness.posterior_sharpness(
        jax.random.key(0), loss, samples, 0.1, adaptive=True, eta=0.01
    )
    np.testing.assert_allclose(result.values, singles, rtol=1e-5)
    np.testing.assert_allclose(result.std, np.std(singles), rtol=1e-4)
    # Per-sample states are passed to the loss and not perturbed: loss(w, c) = c * L(w).
    factors = jnp.array([1.0, 2.0, 3.0])
    scaled = sharpness.posterior_sharpness(
        jax.random.key(0),
        lambda w, c: c * loss(w),
        samples,
        0.1,
        adaptive=True,
        eta=0.01,
        model_states=factors,
    )
    np.testing.assert_allclose(scaled.values, np.array(singles) * [1.0, 2.0, 3.0], rtol=1e-5)


def test_posterior_sharpness_random_start_reaches_the_maximum_at_a_minimum():
    loss = _quadratic_loss(MATRIX)
    samples = jax.tree.map(lambda x: jnp.stack([x, x]), _split(jnp.zeros(DIMENSION)))
    result = sharpness.posterior_sharpness(
        jax.random.key(0), loss, samples, 0.3, num_steps=100, random_start=True
    )
    np.testing.assert_allclose(result.values, [0.5 * 0.09 * TOP[0]] * 2, rtol=1e-4)
    with pytest.raises(ValueError, match="eta is only used with adaptive"):
        sharpness.posterior_sharpness(jax.random.key(0), loss, samples, 0.3, eta=0.1)
    with pytest.raises(ValueError, match="model_states has 3 samples, expected 2"):
        sharpness.posterior_sharpness(
            jax.random.key(0), lambda w, s: loss(w), samples, 0.3, model_states=jnp.zeros(3)
        )


def test_posterior_top_eigenvalue_averages_per_sample_values():
    # L(w) = sum w^4 / 12 has Hessian diag(w^2): the top eigenvalue is max w_i^2.
    loss = lambda w: jnp.sum(w["v"] ** 4) / 12  # noqa: E731
    rng = np.random.default_rng(0)
    stacked = rng.normal(size=(4, 12))
    expected = np.max(stacked**2, axis=1)
    result = jax.jit(
        lambda key, s: sharpness.posterior_top_eigenvalue(key, loss, s, num_iterations=12)
    )(jax.random.key(0), {"v": jnp.asarray(stacked, jnp.float32)})
    np.testing.assert_allclose(result.values, expected, rtol=1e-4)
    np.testing.assert_allclose(result.mean, expected.mean(), rtol=1e-4)
    np.testing.assert_allclose(result.std, expected.std(), rtol=1e-3)
    identical = sharpness.posterior_top_eigenvalue(
        jax.random.key(1),
        loss,
        {"v": jnp.asarray(np.stack([stacked[0]] * 3), jnp.float32)},
        num_iterations=12,
    )
    np.testing.assert_allclose(identical.values, [expected[0]] * 3, rtol=1e-4)
    np.testing.assert_allclose(identical.std, 0.0, atol=1e-5)


# Loop strategies (XLA:CPU convolutions in loops) ----------------------------------------------


def test_unrolled_loops_equal_compiled_loops():
    loss = _quadratic_loss(MATRIX, LINEAR)
    point = _split(jnp.asarray(POINT, jnp.float32))

    @functools.partial(jax.jit, static_argnums=0)
    def measures(unroll, key, point):
        top = sharpness.top_hessian_eigenvalues(
            key, loss, point, k=3, num_iterations=4, unroll=unroll
        )
        trace = sharpness.hutchinson_trace(key, _matvec(MATRIX), PARAMS_LIKE, 2, unroll=unroll)
        sharp = sharpness.sam_sharpness(loss, point, 0.5, num_steps=3, unroll=unroll)
        return jnp.concatenate([top.eigenvalues, jnp.stack([trace.trace, sharp])])

    key = jax.random.key(2)
    np.testing.assert_allclose(measures(True, key, point), measures(False, key, point), rtol=2e-5)


def test_batched_loss_unrolled_equals_scanned():
    apply_fn = lambda p, s, x, *, train, key: (jnp.tanh(x @ p["w"]) @ p["v"], s)  # noqa: E731
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 2, size=10), jnp.int32)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "v": jnp.ones((4, 2))}
    vector = jax.tree.map(jnp.ones_like, params)
    results = []
    for unroll in (True, False):
        loss = sharpness.make_loss_for_hessian(
            apply_fn, {}, inputs, labels, batch_size=4, unroll=unroll
        )
        results.append(ravel_pytree(sharpness.hvp(loss, params, vector))[0])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5, atol=1e-7)


def test_automatic_unroll_follows_backend_and_kernel_rank():
    conv_params = {"kernel": jnp.zeros((3, 3, 1, 4)), "bias": jnp.zeros(4)}
    dense_params = {"kernel": jnp.zeros((5, 4))}
    on_cpu = jax.default_backend() == "cpu"
    assert sharpness._resolve_unroll(None, conv_params) == on_cpu
    assert sharpness._resolve_unroll(None, dense_params) is False
    assert sharpness._resolve_unroll(True, dense_params) is True
    with pytest.raises(ValueError, match="unroll must be True, False or None"):
        sharpness.power_iteration(jax.random.key(0), _matvec(MATRIX), PARAMS_LIKE, 3, unroll="yes")


def test_posterior_python_strategy_equals_map():
    loss = _quadratic_loss(MATRIX, LINEAR)
    samples = jax.vmap(_split)(jnp.asarray(np.random.default_rng(4).normal(size=(3, 50))))
    samples = jax.tree.map(lambda x: x.astype(jnp.float32), samples)
    key = jax.random.key(5)
    for function, kwargs in (
        (sharpness.posterior_sharpness, {"rho": 0.1, "random_start": True}),
        (sharpness.posterior_top_eigenvalue, {"num_iterations": 3}),
    ):
        by_map = function(key, loss, samples, strategy="map", **kwargs)
        by_python = function(key, loss, samples, strategy="python", **kwargs)
        np.testing.assert_allclose(by_python.values, by_map.values, rtol=1e-5)
    with pytest.raises(ValueError, match="strategy='python' needs concrete samples"):
        jax.jit(
            lambda s: (
                sharpness.posterior_top_eigenvalue(
                    key, loss, s, num_iterations=4, strategy="python"
                ).mean
            )
        )(samples)
    with pytest.raises(ValueError, match="strategy must be one of"):
        sharpness.posterior_top_eigenvalue(key, loss, samples, strategy="vmap")
