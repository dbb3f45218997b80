"""SA-BMA transforms: the Gaussian Fisher, the paper and released forms, their reductions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from bnn_flat import objectives, transforms
from bnn_flat.posteriors import low_rank_vi, mean_field_vi
from bnn_flat.posteriors.mean_field_vi import inverse_softplus


def _inverse_softplus(x):
    return jnp.log(jnp.expm1(jnp.asarray(x, jnp.float32)))


def _low_rank_phi(key, dim=4, rank=2, factor_std=0.4):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "mean": {"a": jax.random.normal(k1, (dim - 1,)), "b": jnp.array([0.3])},
        "raw_scale": {
            "a": inverse_softplus(0.5) + 0.3 * jax.random.normal(k2, (dim - 1,)),
            "b": jnp.array([inverse_softplus(0.7)]),
        },
        "factor": {
            "a": factor_std * jax.random.normal(k3, (rank, dim - 1)),
            "b": factor_std * jnp.ones((rank, 1)),
        },
    }


def _flat(tree):
    return ravel_pytree(tree)[0]


def _dense_fisher(phi):
    """Reference Fisher by autodiff of the dense covariance: blocks Sigma^-1 and
    1/2 tr(A dS_i A dS_j) over the covariance parameters, in ravel_pytree order of phi."""
    flat, unravel = ravel_pytree(phi)

    def moments(vector):
        p = unravel(vector)
        mean = _flat(p["mean"])
        return mean, low_rank_vi.covariance_matrix(p) if "factor" in p else jnp.diag(
            _flat(mean_field_vi.standard_deviation(p)) ** 2
        )

    mean_jac = jax.jacfwd(lambda v: moments(v)[0])(flat)  # (d, P)
    cov_jac = jax.jacfwd(lambda v: moments(v)[1])(flat)  # (d, d, P)
    _, cov = moments(flat)
    a = jnp.linalg.inv(cov)
    mean_part = mean_jac.T @ a @ mean_jac
    left = jnp.einsum("ij,jkp->ikp", a, cov_jac)
    cov_part = 0.5 * jnp.einsum("ijp,jiq->pq", left, left)
    return mean_part + cov_part, unravel


def test_fisher_vector_product_matches_dense_fisher():
    phi = _low_rank_phi(jax.random.key(0))
    fisher, unravel = _dense_fisher(phi)
    basis = jnp.eye(fisher.shape[0])
    columns = jax.vmap(
        lambda e: _flat(transforms.posterior_fisher_vector_product(phi, unravel(e)))
    )(basis)
    np.testing.assert_allclose(
        columns.T, fisher, rtol=2e-4, atol=2e-4 * float(jnp.abs(fisher).max())
    )


def test_dense_fisher_matches_monte_carlo_score_outer_product():
    phi = _low_rank_phi(jax.random.key(1), dim=3, rank=2)
    fisher, _ = _dense_fisher(phi)
    draws = low_rank_vi.sample_variational(jax.random.key(2), phi, 200_000)
    scores = jax.vmap(lambda theta: _flat(jax.grad(low_rank_vi.log_density)(phi, theta)))(draws)
    outer = scores[:, :, None] * scores[:, None, :]
    estimate = outer.mean(0)
    standard_error = outer.std(0) / np.sqrt(scores.shape[0])
    assert np.all(np.abs(estimate - fisher) <= 4.5 * standard_error + 1e-4)
    # and the score has mean zero (sanity of the estimator)
    assert np.all(np.abs(scores.mean(0)) <= 4.5 * scores.std(0) / np.sqrt(scores.shape[0]))


def test_mean_field_fisher_is_closed_form():
    sigma = jnp.array([0.5, 1.5, 3.0])
    raw = _inverse_softplus(sigma)
    phi = {"mean": jnp.zeros(3), "raw_scale": raw}
    ones = {"mean": jnp.ones(3), "raw_scale": jnp.ones(3)}
    fv = transforms.posterior_fisher_vector_product(phi, ones)
    derivative = jax.nn.sigmoid(raw)
    np.testing.assert_allclose(fv["mean"], 1 / sigma**2, rtol=1e-5)
    np.testing.assert_allclose(fv["raw_scale"], 2 * derivative**2 / sigma**2, rtol=1e-5)
    fisher, _ = _dense_fisher(phi)
    np.testing.assert_allclose(np.diag(fisher)[3:], 2 * derivative**2 / sigma**2, rtol=1e-4)


def test_paper_direction_for_diagonal_gaussian_matches_closed_form():
    sigma = jnp.array([0.5, 1.5, 3.0])
    raw = _inverse_softplus(sigma)
    phi = {"mean": jnp.array([1.0, -2.0, 0.5]), "raw_scale": raw}
    g = {"mean": jnp.array([0.3, -1.0, 2.0]), "raw_scale": jnp.array([1.0, 0.5, -0.2])}
    rho = 0.7
    direction = transforms.sabma_direction(damping=0.0)(g, phi, None)
    derivative = jax.nn.sigmoid(raw)
    natural_mean = sigma**2 * g["mean"]
    natural_scale = g["raw_scale"] * sigma**2 / (2 * derivative**2)
    norm = jnp.sqrt(jnp.sum(g["mean"] * natural_mean) + jnp.sum(g["raw_scale"] * natural_scale))
    np.testing.assert_allclose(rho * direction["mean"], rho * natural_mean / norm, rtol=1e-5)
    np.testing.assert_allclose(rho * direction["raw_scale"], rho * natural_scale / norm, rtol=1e-5)


def _invariant_gradient(phi):
    """Gradient of a function of (mu, Sigma) only: orthogonal to the factor's rotations."""

    def f(p):
        cov = low_rank_vi.covariance_matrix(p)
        return jnp.sum(jnp.sin(3.0 * cov + 1.0)) + jnp.sum(jnp.cos(_flat(p["mean"])))

    return jax.grad(f)(phi)


def test_fisher_diagonal_matches_dense_fisher_and_is_the_default_preconditioner():
    phi = _low_rank_phi(jax.random.key(8))
    fisher, unravel = _dense_fisher(phi)
    geometry = sabma_geometry(phi)
    diagonal = geometry.covariance_fisher_diagonal()
    dense_diagonal = unravel(jnp.diag(fisher))
    np.testing.assert_allclose(diagonal["raw_scale"], _flat(dense_diagonal["raw_scale"]), rtol=1e-4)
    np.testing.assert_allclose(
        diagonal["factor"].reshape(-1),
        jax.vmap(lambda row: _flat(row))(dense_diagonal["factor"]).reshape(-1),
        rtol=1e-4,
    )
    g = _invariant_gradient(phi)
    damping = 1e-3
    solved = transforms.posterior_fisher_inverse_product(phi, g, damping=damping)
    np.testing.assert_allclose(
        _flat(solved["raw_scale"]),
        _flat(g["raw_scale"]) / (diagonal["raw_scale"] + damping * _mean_diagonal(diagonal)),
        rtol=1e-5,
    )
    cov = low_rank_vi.covariance_matrix(phi)
    np.testing.assert_allclose(_flat(solved["mean"]), cov @ _flat(g["mean"]), rtol=1e-5)


def _mean_diagonal(diagonal):
    values = jnp.concatenate([v.reshape(-1) for v in diagonal.values()])
    return jnp.mean(values)


def sabma_geometry(phi):
    from bnn_flat.transforms.sabma import _Geometry

    return _Geometry.build(phi)


@pytest.mark.parametrize(
    "sigma, factor_scale",
    [(1e-3, 0.05), (1.0, 1e-4)],
    ids=["factor-dominates", "diagonal-dominates"],
)
def test_fisher_diagonal_is_accurate_when_one_part_dominates(sigma, factor_scale):
    """sigma = 1e-3 and |W| ~ 0.05 (a SWAG-like prior): the factor block of diag F in float32
    matches a float64 reference (the subtraction form W D^-1 - (W U) U^T lost every digit).
    sigma = 1 and |W| ~ 1e-4 (a fresh factor): diag(W Sigma^-1 W^T) ~ 1e-4 is taken from
    K x K matrices without cancellation (1 - diag(M^-1) would lose it)."""
    d, rank = 4000, 5
    factor = factor_scale * jax.random.normal(jax.random.key(11), (rank, d))
    std = jnp.full(d, sigma)
    phi = {
        "mean": jnp.zeros(d),
        "raw_scale": jnp.log(jnp.expm1(std)),
        "factor": factor,
    }
    got = jax.jit(lambda p: sabma_geometry(p).covariance_fisher_diagonal())(phi)
    w = np.asarray(factor, np.float64)
    variance = np.asarray(jax.nn.softplus(phi["raw_scale"]), np.float64) ** 2
    capacitance = np.eye(rank) + (w / variance) @ w.T
    b_rows = np.linalg.solve(capacitance, w / variance)  # W Sigma^-1
    inverse_diagonal = 1.0 / variance - np.einsum(
        "kd,kj,jd->d", w / variance, np.linalg.inv(capacitance), w / variance
    )
    quadratic = np.sum(w * b_rows, axis=1)
    expected = b_rows**2 + quadratic[:, None] * inverse_diagonal[None, :]
    np.testing.assert_allclose(got["factor"], expected, rtol=2e-3)
    # the per-leaf path of the default preconditioner divides by the same diagonal
    ones = jax.tree.map(jnp.ones_like, phi)
    solved = transforms.posterior_fisher_inverse_product(phi, ones, damping=0.0)
    np.testing.assert_allclose(solved["factor"], 1.0 / expected, rtol=2e-3)


def test_exact_solve_equals_dense_solve_and_fisher_norm_is_rho():
    phi = _low_rank_phi(jax.random.key(3))
    fisher, unravel = _dense_fisher(phi)
    g = _invariant_gradient(phi)
    damping = 1e-3
    size = fisher.shape[0]
    solved = transforms.posterior_fisher_inverse_product(
        phi, g, covariance_fisher="exact", damping=damping, cg_iterations=size + 5
    )
    mask = _flat(
        {
            "mean": jax.tree.map(jnp.zeros_like, phi["mean"]),
            "raw_scale": jax.tree.map(jnp.ones_like, phi["raw_scale"]),
            "factor": jax.tree.map(jnp.ones_like, phi["factor"]),
        }
    )
    absolute = damping * _mean_diagonal(sabma_geometry(phi).covariance_fisher_diagonal())
    damped = fisher + absolute * jnp.diag(mask)
    expected = jnp.linalg.solve(damped, _flat(g))
    np.testing.assert_allclose(
        _flat(solved), expected, rtol=1e-2, atol=1e-2 * jnp.abs(expected).max()
    )
    rho = 0.3
    direction = transforms.sabma_direction(
        covariance_fisher="exact", damping=damping, cg_iterations=size + 5
    )
    delta = rho * _flat(direction(g, phi, None))
    np.testing.assert_allclose(delta @ damped @ delta, rho**2, rtol=1e-2)


def test_perturbation_kl_matches_the_fisher_quadratic_form():
    # KL(q_{phi + Delta} || q_phi) ~ Delta^T F Delta / 2 for a small step
    phi = _low_rank_phi(jax.random.key(5))
    fisher, _ = _dense_fisher(phi)
    g = _invariant_gradient(phi)
    direction = transforms.sabma_direction(
        covariance_fisher="exact", damping=1e-3, cg_iterations=fisher.shape[0] + 5
    )(g, phi, None)
    rho = 1e-2
    moved = jax.tree.map(lambda p, d: p + rho * d, phi, direction)
    cov_new = low_rank_vi.covariance_matrix(moved)
    cov_old = low_rank_vi.covariance_matrix(phi)
    diff = _flat(moved["mean"]) - _flat(phi["mean"])
    inv = jnp.linalg.inv(cov_old)
    kl = 0.5 * (
        jnp.trace(inv @ cov_new)
        + diff @ inv @ diff
        - cov_old.shape[0]
        + jnp.linalg.slogdet(cov_old)[1]
        - jnp.linalg.slogdet(cov_new)[1]
    )
    delta = rho * _flat(direction)
    np.testing.assert_allclose(kl, 0.5 * delta @ fisher @ delta, rtol=0.05)
    assert 0.3 * rho**2 < kl < 0.6 * rho**2


def test_mean_only_reduces_to_sam_with_radius_rho_sigma():
    sigma, rho = 0.4, 0.5
    phi = {
        "mean": {"w": jnp.array([1.0, -2.0, 0.5])},
        "raw_scale": {"w": jnp.full(3, _inverse_softplus(sigma))},
        "factor": {"w": jnp.zeros((2, 3))},
    }
    curvature = jnp.array([1.0, 3.0, 0.5])

    def objective(p):
        mean = p["mean"]["w"]
        return 0.5 * jnp.sum(curvature * mean**2) + jnp.sum(jax.nn.softplus(p["raw_scale"]["w"]))

    grad_fn = jax.grad(objective)
    tx = transforms.sabma(rho, perturb="mean")
    updates, _ = jax.jit(lambda p: tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn))(phi)
    reference = mean_field_vi.mean_only(transforms.sam(rho * sigma))
    expected, _ = reference.update(grad_fn(phi), reference.init(phi), phi, grad_fn=grad_fn)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    g = curvature * phi["mean"]["w"]
    np.testing.assert_allclose(
        updates["mean"]["w"],
        curvature * (phi["mean"]["w"] + rho * sigma * g / jnp.linalg.norm(g)),
        rtol=1e-5,
    )


def test_mean_perturbation_follows_the_bsam_direction():
    # q = N(w, diag(1 / (N s))): Delta_w = rho * (g / (N s)) / sqrt(g^T g / (N s))
    num_data, rho = 50, 0.2
    s = jnp.array([0.5, 2.0, 8.0, 1.0])
    phi = {
        "mean": jnp.array([0.1, 0.2, -0.3, 0.4]),
        "raw_scale": _inverse_softplus(1 / jnp.sqrt(num_data * s)),
    }
    g = {"mean": jnp.array([1.0, -1.0, 2.0, 0.5]), "raw_scale": jnp.zeros(4)}
    delta = rho * transforms.sabma_direction(perturb="mean")(g, phi, None)["mean"]
    bsam_epsilon = rho * g["mean"] / s  # bSAM's perturbation (fixed multiplier, no norm)
    cosine = jnp.dot(delta, bsam_epsilon) / (jnp.linalg.norm(delta) * jnp.linalg.norm(bsam_epsilon))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-5)
    natural = g["mean"] / (num_data * s)
    np.testing.assert_allclose(delta, rho * natural / jnp.sqrt(g["mean"] @ natural), rtol=1e-4)


def test_released_form_is_a_normalised_score_per_block():
    phi = _low_rank_phi(jax.random.key(6))
    theta = low_rank_vi.sample_variational(jax.random.key(7), phi, 2)
    rho = 0.25
    delta = transforms.released_perturbation(phi, rho, samples=theta)
    first = jax.tree.map(lambda x: x[0], theta)
    score = jax.grad(low_rank_vi.log_density)(phi, first)
    for block in ("mean", "raw_scale", "factor"):
        s = _flat(score[block])
        np.testing.assert_allclose(
            _flat(delta[block]), rho * s / jnp.linalg.norm(s), rtol=2e-4, atol=1e-6
        )
    np.testing.assert_allclose(jnp.linalg.norm(_flat(delta)), rho * np.sqrt(3), rtol=1e-5)


def test_released_form_ignores_the_loss_gradient_and_reuses_the_draw():
    sigma = jnp.array([0.5, 2.0])
    phi = {"mean": jnp.array([1.0, 0.0]), "raw_scale": _inverse_softplus(sigma)}
    theta = jnp.array([[2.0, 1.0]])

    def run(scale):
        grad_fn = jax.grad(lambda p: scale * jnp.sum(p["mean"] ** 2))
        tx = transforms.sabma_released(rho=0.1)
        captured = {}

        def recording(p):
            captured["point"] = p
            return grad_fn(p)

        tx.update(grad_fn(phi), tx.init(phi), phi, grad_fn=recording, samples=theta)
        return captured["point"]

    a, b = run(1.0), run(-7.0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    score_mean = (theta[0] - phi["mean"]) / sigma**2
    np.testing.assert_allclose(
        a["mean"] - phi["mean"], 0.1 * score_mean / jnp.linalg.norm(score_mean), rtol=1e-5
    )
    # diagonal Gaussian score of the raw scale: ((theta - mu)^2 / sigma^3 - 1 / sigma) sigma'
    residual = theta[0] - phi["mean"]
    score_scale = (residual**2 / sigma**3 - 1 / sigma) * jax.nn.sigmoid(phi["raw_scale"])
    np.testing.assert_allclose(
        a["raw_scale"] - phi["raw_scale"],
        0.1 * score_scale / jnp.linalg.norm(score_scale),
        rtol=1e-4,
    )


def test_released_form_draws_with_key_without_samples():
    phi = {"mean": jnp.zeros(3), "raw_scale": jnp.zeros(3)}
    grad_fn = jax.grad(lambda p: jnp.sum(p["mean"]))
    tx = transforms.sabma_released(0.1)
    with pytest.raises(ValueError, match="key="):
        tx.update(grad_fn(phi), tx.init(phi), phi, grad_fn=grad_fn)
    d1 = transforms.released_perturbation(phi, 0.1, key=jax.random.key(0))
    d2 = transforms.released_perturbation(phi, 0.1, key=jax.random.key(1))
    assert not np.allclose(d1["mean"], d2["mean"])
    np.testing.assert_allclose(jnp.linalg.norm(d1["mean"]), 0.1, rtol=1e-5)


def _regression_problem():
    x = jax.random.normal(jax.random.key(0), (32, 3))
    y = x @ jnp.array([1.0, -2.0, 0.5]) + 0.1 * jax.random.normal(jax.random.key(1), (32,))
    apply = lambda p, s, inputs, *, train, key: (inputs @ p["w"], s)  # noqa: E731
    loss_fn = objectives.regression_loss(apply, num_data=32)
    return {"inputs": x, "labels": y}, loss_fn, {"w": jnp.zeros(3)}


@pytest.mark.parametrize("make", ["paper", "paper_exact", "paper_mean", "released"])
def test_sabma_runs_through_low_rank_vi_and_differs_from_baseline(make):
    batch, loss_fn, params = _regression_problem()
    transform = {
        "paper": lambda: transforms.sabma(0.5),
        "paper_exact": lambda: transforms.sabma(0.5, covariance_fisher="exact", damping=1e-2),
        "paper_mean": lambda: transforms.sabma(0.5, perturb="mean"),
        "released": lambda: transforms.sabma_released(0.5),
    }[make]()
    flat = optax.chain(transform, optax.sgd(1e-2))
    family = low_rank_vi.build(
        loss_fn, flat, num_data=32, prior_precision=1.0, rank=2, init_std=0.1
    )
    base = low_rank_vi.build(
        loss_fn, optax.sgd(1e-2), num_data=32, prior_precision=1.0, rank=2, init_std=0.1
    )
    state = family.init(params)
    update = jax.jit(family.update)
    new_state, info = update(jax.random.key(0), state, batch)
    new_state, info = update(jax.random.key(1), new_state, batch)
    assert update._cache_size() == 1
    assert jnp.isfinite(info.loss)
    shapes = jax.eval_shape(family.update, jax.random.key(0), state, batch)[0]
    assert jax.tree.structure(shapes) == jax.tree.structure(state)
    base_state, _ = jax.jit(base.update)(jax.random.key(0), base.init(params), batch)
    first, _ = update(jax.random.key(0), state, batch)
    assert not np.allclose(first.params["w"], base_state.params["w"])
    # vmap over keys
    keys = jax.random.split(jax.random.key(2), 3)
    stacked, _ = jax.vmap(family.update, in_axes=(0, None, None))(keys, state, batch)
    assert stacked.params["w"].shape == (3, 3)


def test_sabma_trains_mean_field_vi_and_rho_zero_equals_base():
    batch, loss_fn, params = _regression_problem()
    base = mean_field_vi.build(loss_fn, optax.sgd(1e-2), num_data=32, prior_precision=1.0)
    zero = mean_field_vi.build(
        loss_fn,
        optax.chain(transforms.sabma(0.0), optax.sgd(1e-2)),
        num_data=32,
        prior_precision=1.0,
    )
    s0, _ = jax.jit(base.update)(jax.random.key(0), base.init(params), batch)
    s1, _ = jax.jit(zero.update)(jax.random.key(0), zero.init(params), batch)
    np.testing.assert_allclose(s0.params["w"], s1.params["w"], rtol=1e-6)
    np.testing.assert_allclose(s0.raw_scale["w"], s1.raw_scale["w"], rtol=1e-6)

    family = mean_field_vi.build(
        loss_fn,
        optax.chain(transforms.sabma(0.05), optax.adam(5e-2)),
        num_data=32,
        prior_precision=1.0,
    )
    state = family.init(params)
    from bnn_flat import training

    result = training.fit(
        jax.random.key(0),
        family,
        state,
        (batch["inputs"], batch["labels"]),
        num_epochs=150,
        batch_size=32,
        progress=False,
    )
    np.testing.assert_allclose(result.state.params["w"], [1.0, -2.0, 0.5], atol=0.1)


def test_zero_factor_rows_are_not_perturbed():
    phi = _low_rank_phi(jax.random.key(9))
    phi["factor"] = jax.tree.map(lambda w: w.at[1].set(0.0), phi["factor"])
    g = jax.tree.map(lambda x: jnp.cos(2.0 * x + 0.5), phi)
    direction = transforms.sabma_direction()(g, phi, None)
    for leaf in jax.tree.leaves(direction["factor"]):
        np.testing.assert_array_equal(leaf[1], 0.0)
        assert np.abs(leaf[0]).max() > 0
    # the perturbation still has unit Fisher norm over the perturbed entries
    for leaf in jax.tree.leaves(direction):
        assert np.all(np.isfinite(leaf))


def test_sabma_bad_inputs():
    with pytest.raises(ValueError, match="rho"):
        transforms.sabma(-1.0)
    with pytest.raises(ValueError, match="perturb"):
        transforms.sabma(0.1, perturb="scale")
    with pytest.raises(ValueError, match="damping"):
        transforms.sabma(0.1, damping=-1.0)
    with pytest.raises(ValueError, match="covariance_fisher"):
        transforms.sabma(0.1, covariance_fisher="full")
    with pytest.raises(ValueError, match="cg_iterations"):
        transforms.sabma(0.1, cg_iterations=0)
    tx = transforms.sabma(0.1)
    w = jnp.ones(3)
    with pytest.raises(ValueError, match="variational parameters"):
        tx.update(w, tx.init(w), w, grad_fn=lambda p: p)
    phi = {"mean": w, "raw_scale": w, "extra": w}
    with pytest.raises(ValueError, match="unknown variational-parameter entries"):
        tx.update(phi, tx.init(phi), phi, grad_fn=lambda p: p)
    with pytest.raises(ValueError, match="samples"):
        transforms.released_perturbation(
            {"mean": {"a": w}, "raw_scale": {"a": w}}, 0.1, samples=jnp.ones((1, 3))
        )
