"""Laplace family: closed-form curvature, evidence and predictive checks, plus conformance.

The Laplace family has no optimizer (it accumulates curvature at a given MAP), so the
conformance item "chaining transforms.sam" does not apply: the flat version of Laplace is
Laplace fitted at a MAP trained with SAM, which needs no code in this family.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from scipy import stats

from bnn_flat import bma
from bnn_flat.posteriors import laplace
from tests.conftest import linear_apply

SIGMA = 0.5


# ----------------------------------------------------------------------------- fixtures


def _mlp_apply(params, model_state, inputs, *, train, key):
    """A one-hidden-layer tanh MLP with dict-of-dict parameters (last layer "output")."""
    del train, key
    hidden = jnp.tanh(inputs @ params["hidden"]["kernel"] + params["hidden"]["bias"])
    return hidden @ params["output"]["kernel"] + params["output"]["bias"], model_state


def _mlp_params(key, num_inputs=2, num_hidden=4, num_outputs=3):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "hidden": {
            "kernel": jax.random.normal(k1, (num_inputs, num_hidden)),
            "bias": 0.3 * jax.random.normal(k2, (num_hidden,)),
        },
        "output": {
            "kernel": jax.random.normal(k3, (num_hidden, num_outputs)),
            "bias": 0.3 * jax.random.normal(k4, (num_outputs,)),
        },
    }


def _regression_data(num=40, num_features=3, seed=0):
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(num, num_features)).astype(np.float32)
    weights = np.array([1.0, -2.0, 0.5], np.float32)[:num_features]
    targets = inputs @ weights + 0.3 + SIGMA * rng.normal(size=num).astype(np.float32)
    return inputs, targets.astype(np.float32)


def _augmented(inputs):
    return np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1).astype(np.float64)


def _blr_map(inputs, targets, prior_precision):
    """Exact posterior mean and precision of Bayesian linear regression on [x, 1]."""
    design = _augmented(inputs)
    precision = design.T @ design / SIGMA**2 + prior_precision * np.eye(design.shape[1])
    mean = np.linalg.solve(precision, design.T @ targets / SIGMA**2)
    return mean, precision


def _linear_params(mean):
    return {
        "w": jnp.asarray(mean[:-1, None], jnp.float32),
        "b": jnp.asarray(mean[-1:], jnp.float32),
    }


def _exact_log_evidence(inputs, targets, prior_precision):
    design = _augmented(inputs)
    covariance = SIGMA**2 * np.eye(len(inputs)) + design @ design.T / prior_precision
    return stats.multivariate_normal(np.zeros(len(inputs)), covariance).logpdf(targets)


def _fitted_regression(inputs, targets, prior_precision, **options):
    mean, _ = _blr_map(inputs, targets, prior_precision)
    family = laplace.build(
        linear_apply,
        likelihood="regression",
        num_data=options.pop("num_data", len(inputs)),
        prior_precision=prior_precision,
        noise_std=SIGMA,
        **options,
    )
    state = family.init(_linear_params(mean), {})
    state = laplace.fit(jax.random.key(0), state, linear_apply, inputs, targets, batch_size=16)
    return family, state


@functools.partial(jax.jit, static_argnums=0)
def _dense_ggn(apply_fn, params, inputs):
    """Sum over examples of J^T (diag p - p p^T) J, with J from jax.jacobian (ravel order)."""
    flat, unravel = ravel_pytree(params)
    logits_fn = lambda theta: apply_fn(unravel(theta), {}, inputs, train=False, key=None)[0]
    jacobian = jax.jacobian(logits_fn)(flat)  # (B, C, P)
    probs = jax.nn.softmax(logits_fn(flat))
    hessian = jax.vmap(jnp.diag)(probs) - probs[:, :, None] * probs[:, None, :]
    return jnp.einsum("bcp,bcd,bdq->pq", jacobian, hessian, jacobian)


def _last_layer_indices(params):
    """Positions of [output kernel (row-major), output bias] in ravel_pytree(params)."""
    flat, unravel = ravel_pytree(params)
    positions = unravel(jnp.arange(flat.size, dtype=jnp.float32))["output"]
    order = jnp.concatenate([positions["kernel"].reshape(-1), positions["bias"]])
    return np.asarray(order).astype(int)


def _blobs_batch(blobs, num):
    inputs, labels = blobs
    return inputs[:: 300 // num][:num], labels[:: 300 // num][:num]


# ------------------------------------------------------------ linear-Gaussian closed form


@pytest.mark.parametrize(
    "subset, covariance",
    [("last_layer", "full"), ("last_layer", "kron"), ("all", "full"), ("all", "diag")],
)
def test_linear_regression_precision_is_exact(subset, covariance):
    inputs, targets = _regression_data()
    prior = 2.0
    _, state = _fitted_regression(inputs, targets, prior, subset=subset, covariance=covariance)
    _, exact = _blr_map(inputs, targets, prior)  # order [w, b]
    assert int(state.num_seen) == 40 and int(state.step) == 3  # 16 + 16 + remainder 8
    precision = laplace.posterior_precision(state)
    if covariance == "diag":
        np.testing.assert_allclose(precision["w"][:, 0], np.diag(exact)[:-1], rtol=1e-5)
        np.testing.assert_allclose(precision["b"], np.diag(exact)[-1:], rtol=1e-5)
        return
    if subset == "all":  # ravel_pytree order of {"b", "w"}: bias first
        order = [3, 0, 1, 2]
        exact = exact[np.ix_(order, order)]
    np.testing.assert_allclose(precision, exact, rtol=1e-5, atol=1e-4)


def test_precision_scaling_with_partial_data_and_temperature():
    inputs, targets = _regression_data()
    # Half the data seen with num_data = 40: curvature * (40 / 20); then / T.
    _, state = _fitted_regression(
        inputs[:20],
        targets[:20],
        1.5,
        num_data=40,
        temperature=0.5,
        subset="last_layer",
        covariance="full",
    )
    design = _augmented(inputs[:20])
    expected = (2.0 * design.T @ design / SIGMA**2 + 1.5 * np.eye(4)) / 0.5
    np.testing.assert_allclose(laplace.posterior_precision(state), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "subset, covariance", [("last_layer", "full"), ("last_layer", "kron"), ("all", "full")]
)
def test_glm_predictive_equals_bayesian_linear_regression(subset, covariance):
    inputs, targets = _regression_data()
    prior = 0.7
    _, state = _fitted_regression(inputs, targets, prior, subset=subset, covariance=covariance)
    mean, precision = _blr_map(inputs, targets, prior)
    test_inputs = np.random.default_rng(5).normal(size=(7, 3)).astype(np.float32)
    out = laplace.glm_predictive(state, linear_apply, test_inputs, chunk_size=3)
    design = _augmented(test_inputs)
    function_variance = np.einsum("np,pq,nq->n", design, np.linalg.inv(precision), design)
    np.testing.assert_allclose(out["mean"][:, 0], design @ mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["function_variance"][:, 0], function_variance, rtol=1e-4)
    np.testing.assert_allclose(out["variance"][:, 0], function_variance + SIGMA**2, rtol=1e-5)
    np.testing.assert_allclose(out["covariance"][:, 0, 0], out["variance"][:, 0], rtol=1e-6)


def test_log_marginal_likelihood_equals_exact_evidence():
    inputs, targets = _regression_data()
    for prior in (0.1, 1.0, 10.0):
        _, state = _fitted_regression(
            inputs, targets, prior, subset="last_layer", covariance="kron"
        )
        np.testing.assert_allclose(
            laplace.log_marginal_likelihood(state),
            _exact_log_evidence(inputs, targets, prior),
            rtol=1e-5,
        )


def test_marglik_tuning_picks_the_exact_evidence_maximiser():
    inputs, targets = _regression_data()
    grid = np.logspace(-2, 2, 17)
    evidence = [_exact_log_evidence(inputs, targets, value) for value in grid]
    best = grid[int(np.argmax(evidence))]
    assert 0.01 < best < 100.0  # an interior optimum, so the test can fail
    # At the MAP of the best precision, tuning keeps it.
    _, state = _fitted_regression(inputs, targets, best, subset="last_layer", covariance="full")
    tuned = laplace.tune_prior_precision(state, grid=grid)
    np.testing.assert_allclose(tuned.prior_precision, best, rtol=1e-6)
    # From the far end of the grid, alternating MAP refits and tuning reach the maximiser.
    value = grid[0]
    for _ in range(8):
        _, state = _fitted_regression(
            inputs, targets, value, subset="last_layer", covariance="full"
        )
        value = float(laplace.tune_prior_precision(state, grid=grid).prior_precision)
    np.testing.assert_allclose(value, best, rtol=1e-6)


def test_val_nll_tuning_minimises_the_exact_predictive_nll():
    inputs, targets = _regression_data(num=30)
    valid_inputs, valid_targets = _regression_data(num=25, seed=3)
    _, state = _fitted_regression(inputs, targets, 1.0, subset="last_layer", covariance="full")
    grid = np.logspace(-3, 3, 13)
    mean, _ = _blr_map(inputs, targets, 1.0)  # the MAP stays fixed while tuning
    design, valid_design = _augmented(inputs), _augmented(valid_inputs)
    scores = []
    for value in grid:
        covariance = np.linalg.inv(design.T @ design / SIGMA**2 + value * np.eye(4))
        variance = np.einsum("np,pq,nq->n", valid_design, covariance, valid_design) + SIGMA**2
        scores.append(
            -stats.norm(valid_design @ mean, np.sqrt(variance)).logpdf(valid_targets).sum()
        )
    assert np.ptp(scores) > 0.1  # the grid matters
    tuned = laplace.tune_prior_precision(
        state,
        linear_apply,
        method="val_nll",
        grid=grid,
        validation_data=(valid_inputs, valid_targets),
        chunk_size=8,
    )
    np.testing.assert_allclose(tuned.prior_precision, grid[int(np.argmin(scores))], rtol=1e-6)


# ------------------------------------------------------------ neural-network curvature


def _fit_mlp(blobs, num, **options):
    inputs, labels = _blobs_batch(blobs, num)
    params = _mlp_params(jax.random.key(1))
    family = laplace.build(_mlp_apply, num_data=num, prior_precision=1.0, **options)
    state = family.init(params, {})
    state = laplace.fit(jax.random.key(0), state, _mlp_apply, inputs, labels, batch_size=5)
    return params, inputs, labels, state


def test_ggn_diag_full_and_last_layer_equal_the_dense_ggn(blobs):
    params, inputs, _, diag_state = _fit_mlp(blobs, 20, covariance="diag")
    dense = np.asarray(_dense_ggn(_mlp_apply, params, inputs))
    assert np.abs(dense).max() > 0.1
    np.testing.assert_allclose(ravel_pytree(diag_state.curvature)[0], np.diag(dense), atol=1e-5)
    _, _, _, full_state = _fit_mlp(blobs, 20, covariance="full")
    np.testing.assert_allclose(full_state.curvature, dense, atol=1e-5)
    _, _, _, last_state = _fit_mlp(blobs, 20, subset="last_layer", covariance="full")
    order = _last_layer_indices(params)
    np.testing.assert_allclose(last_state.curvature, dense[np.ix_(order, order)], atol=1e-5)


def test_empirical_fisher_is_the_sum_of_squared_per_example_gradients(blobs):
    params, inputs, labels, state = _fit_mlp(
        blobs, 20, curvature="empirical_fisher", covariance="diag"
    )

    def nll(p, x, y):
        logits = _mlp_apply(p, {}, x[None], train=False, key=None)[0][0]
        return -jax.nn.log_softmax(logits)[y]

    grad_fn = jax.jit(lambda p, x, y: ravel_pytree(jax.grad(nll)(p, x, y))[0])
    gradients = [grad_fn(params, x, y) for x, y in zip(inputs, labels, strict=True)]
    expected = np.sum(np.square(gradients), axis=0)
    np.testing.assert_allclose(ravel_pytree(state.curvature)[0], expected, rtol=1e-5, atol=1e-6)
    _, _, _, full_state = _fit_mlp(
        blobs, 20, curvature="empirical_fisher", subset="last_layer", covariance="full"
    )
    order = _last_layer_indices(params)
    outer = sum(np.outer(g[order], g[order]) for g in np.asarray(gradients))
    np.testing.assert_allclose(full_state.curvature, outer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("curvature", ["ggn", "empirical_fisher"])
def test_kron_is_exact_for_one_example(blobs, curvature):
    _, _, _, kron_state = _fit_mlp(
        blobs, 1, subset="last_layer", covariance="kron", curvature=curvature
    )
    _, _, _, full_state = _fit_mlp(
        blobs, 1, subset="last_layer", covariance="full", curvature=curvature
    )
    kron = laplace.posterior_precision(kron_state)
    assert np.abs(np.asarray(full_state.curvature)).max() > 0.01
    np.testing.assert_allclose(kron, laplace.posterior_precision(full_state), atol=1e-5)


def test_kron_approximates_the_last_layer_ggn_on_many_examples(blobs):
    _, _, _, kron_state = _fit_mlp(blobs, 20, subset="last_layer", covariance="kron")
    _, _, _, full_state = _fit_mlp(blobs, 20, subset="last_layer", covariance="full")
    factor_a, factor_g = kron_state.curvature
    kron = np.asarray(jnp.kron(factor_a, factor_g)) / 20
    exact = np.asarray(full_state.curvature)
    assert np.linalg.eigvalsh(kron).min() > -1e-5 * np.abs(kron).max()  # PSD
    relative = np.linalg.norm(kron - exact) / np.linalg.norm(exact)
    assert 1e-3 < relative < 0.6  # an approximation (0.42 here), not the exact matrix


# ------------------------------------------------------------ sampling and densities


@pytest.mark.parametrize(
    "subset, covariance", [("all", "diag"), ("last_layer", "full"), ("last_layer", "kron")]
)
def test_sample_covariance_and_log_prob_match_the_precision(blobs, subset, covariance):
    params, _, _, state = _fit_mlp(blobs, 20, subset=subset, covariance=covariance)
    num = 20_000
    samples = jax.jit(laplace.sample, static_argnums=2)(jax.random.key(3), state, num)
    precision = laplace.posterior_precision(state)
    if subset == "last_layer":
        flat = jnp.concatenate(
            [samples["output"]["kernel"].reshape(num, -1), samples["output"]["bias"]], axis=1
        )
        mean = np.concatenate([params["output"]["kernel"].ravel(), params["output"]["bias"]])
        covariance_matrix = np.linalg.inv(np.asarray(precision, np.float64))
        # the hidden layer stays at the MAP
        np.testing.assert_array_equal(samples["hidden"]["kernel"][7], params["hidden"]["kernel"])
    else:
        flat = jax.vmap(lambda p: ravel_pytree(p)[0])(samples)
        mean = np.asarray(ravel_pytree(params)[0])
        covariance_matrix = np.diag(1.0 / np.asarray(ravel_pytree(precision)[0], np.float64))
    flat = np.asarray(flat, np.float64)
    empirical = np.cov(flat, rowvar=False)
    std = np.sqrt(np.diag(covariance_matrix))
    np.testing.assert_array_less(np.abs(flat.mean(0) - mean), 4 * std / np.sqrt(num) + 1e-6)
    standard_error = np.sqrt(
        (np.outer(std**2, std**2) + covariance_matrix**2) / num
    )  # of a sample covariance entry
    np.testing.assert_array_less(np.abs(empirical - covariance_matrix), 4.5 * standard_error)
    one = jax.tree.map(lambda x: x[0], samples)
    expected = stats.multivariate_normal(mean, covariance_matrix).logpdf(flat[0])
    np.testing.assert_allclose(jax.jit(laplace.log_prob)(state, one), expected, rtol=1e-4)


@pytest.mark.parametrize("subset, covariance", [("last_layer", "full"), ("all", "diag")])
def test_classification_glm_predictive_probit_and_monte_carlo(blobs, subset, covariance):
    params, _, _, state = _fit_mlp(blobs, 20, subset=subset, covariance=covariance)
    test_inputs = blobs[0][1::50]
    flat, unravel = ravel_pytree(params)
    logits_fn = lambda theta: _mlp_apply(unravel(theta), {}, test_inputs, train=False, key=None)[0]
    jacobian = np.asarray(jax.jit(jax.jacobian(logits_fn))(flat))  # (M, C, P)
    precision = laplace.posterior_precision(state)
    if subset == "last_layer":
        jacobian = jacobian[:, :, _last_layer_indices(params)]
        covariance = np.linalg.inv(np.asarray(precision, np.float64))
    else:
        covariance = np.diag(1.0 / np.asarray(ravel_pytree(precision)[0], np.float64))
    function_cov = np.einsum("mcp,pq,mdq->mcd", jacobian, covariance, jacobian)
    logits = np.asarray(logits_fn(flat), np.float64)
    kappa = 1.0 / np.sqrt(1.0 + np.pi / 8.0 * np.einsum("mcc->mc", function_cov))
    expected = jax.nn.log_softmax(logits * kappa, axis=-1)
    probit = laplace.glm_predictive(state, _mlp_apply, test_inputs)
    np.testing.assert_allclose(probit, expected, atol=1e-5)
    # the uncertainty matters: the probit predictive is flatter than the MAP softmax
    map_probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    assert np.abs(np.exp(probit) - map_probs).max() > 1e-3
    if subset == "all":
        return
    # Monte Carlo over the linearised logits against a numpy reference with many draws.
    rng = np.random.default_rng(0)
    function_cov = 0.5 * (function_cov + function_cov.transpose(0, 2, 1))
    draws = np.stack(
        [
            rng.multivariate_normal(m, c, size=100_000, method="eigh", check_valid="ignore")
            for m, c in zip(logits, function_cov, strict=True)
        ]
    )
    reference = jax.nn.softmax(draws, axis=-1).mean(axis=1)
    monte_carlo = laplace.glm_predictive(
        state,
        _mlp_apply,
        test_inputs,
        link_approximation="mc",
        key=jax.random.key(1),
        num_samples=20_000,
    )
    # about 4 standard errors of a probability estimated from 20 000 and 100 000 draws
    np.testing.assert_allclose(np.exp(monte_carlo), reference, atol=0.015)


# ------------------------------------------------------------ flax models and auto-detection


def test_flax_mlp_last_layer_is_auto_detected_and_fits(blobs):
    from bnn_flat import models

    module = models.mlp([8], num_outputs=3)
    params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 2)))
    assert laplace.find_last_layer(params) == ("output",)
    apply_fn = models.make_apply(module)
    family = laplace.build(
        apply_fn, num_data=300, prior_precision=1.0, subset="last_layer", covariance="kron"
    )
    state = family.init(params, model_state)
    inputs, labels = blobs
    state = laplace.fit(jax.random.key(0), state, apply_fn, inputs, labels, batch_size=128)
    assert state.config.last_layer_path == ("output",) and int(state.num_seen) == 300
    log_probs = laplace.glm_predictive(state, apply_fn, inputs[:10])
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, rtol=1e-5)
    factor_a, factor_g = state.curvature
    assert factor_a.shape == (9, 9) and factor_g.shape == (3, 3)
    np.testing.assert_allclose(factor_a[-1, -1], 300.0)  # the bias augmentation counts examples


def test_fit_equals_a_loop_of_updates(blobs):
    inputs, labels = _blobs_batch(blobs, 12)
    family = laplace.build(_mlp_apply, num_data=12, covariance="diag")
    state = family.init(_mlp_params(jax.random.key(1)), {})
    fitted = laplace.fit(jax.random.key(0), state, _mlp_apply, inputs, labels, batch_size=5)
    looped = state
    update = jax.jit(family.update)
    for start in (0, 5, 10):
        batch = {"inputs": inputs[start : start + 5], "labels": labels[start : start + 5]}
        if start == 10:  # a short last batch, padded and masked by hand
            batch = {
                "inputs": jnp.concatenate([batch["inputs"], inputs[:3]]),
                "labels": jnp.concatenate([batch["labels"], labels[:3]]),
                "mask": jnp.arange(5) < 2,
            }
        looped, info = update(jax.random.key(0), looped, batch)
    for got, want in zip(jax.tree.leaves(fitted), jax.tree.leaves(looped), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    log_probs = jax.nn.log_softmax(_mlp_apply(state.params, {}, inputs, train=False, key=None)[0])
    np.testing.assert_allclose(
        fitted.log_likelihood, jnp.take_along_axis(log_probs, labels[:, None], 1).sum(), rtol=1e-5
    )


def test_bad_input_raises_value_errors(blobs):
    inputs, labels = _blobs_batch(blobs, 10)
    params = _mlp_params(jax.random.key(0))
    for options in (
        {"likelihood": "poisson"},
        {"curvature": "hessian"},
        {"subset": "some"},
        {"covariance": "lowrank"},
        {"covariance": "kron"},  # kron needs subset="last_layer"
        {"prior_precision": -1.0},
        {"prior_precision": float("nan")},
        {"temperature": 0.0},
        {"likelihood": "regression", "noise_std": None},
        {"last_layer_path": ("output",)},  # only with subset="last_layer"
    ):
        with pytest.raises(ValueError):
            laplace.build(_mlp_apply, num_data=10, **options)
    with pytest.raises(ValueError, match="num_data"):
        laplace.build(_mlp_apply, num_data=0)
    two_hidden = {**params, "other": params["hidden"]}
    del two_hidden["output"]
    with pytest.raises(ValueError, match="last_layer_path"):  # ambiguous: no "output"
        laplace.build(_mlp_apply, num_data=10, subset="last_layer").init(two_hidden, {})
    with pytest.raises(ValueError, match="does not exist"):
        laplace.build(
            _mlp_apply, num_data=10, subset="last_layer", last_layer_path=("missing",)
        ).init(params, {})
    wrong_layer = laplace.build(
        _mlp_apply, num_data=10, subset="last_layer", last_layer_path=("hidden",)
    )
    state = wrong_layer.init(params, {})
    with pytest.raises(ValueError, match="not the output layer"):
        wrong_layer.update(jax.random.key(0), state, {"inputs": inputs, "labels": labels})
    family = laplace.build(_mlp_apply, num_data=10)
    state = family.init(params, {})
    with pytest.raises(ValueError, match="batch size"):
        family.update(jax.random.key(0), state, {"inputs": inputs, "labels": labels[:3]})
    with pytest.raises(ValueError, match="integers"):
        family.update(jax.random.key(0), state, {"inputs": inputs, "labels": inputs[:, 0]})
    with pytest.raises(ValueError, match="empty"):
        laplace.fit(jax.random.key(0), state, _mlp_apply, inputs[:0], labels[:0], batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        laplace.fit(jax.random.key(0), state, _mlp_apply, inputs, labels, batch_size=0)
    with pytest.raises(ValueError, match="method"):
        laplace.tune_prior_precision(state, method="bayes")
    with pytest.raises(ValueError, match="validation_data"):
        laplace.tune_prior_precision(state, method="val_nll")
    with pytest.raises(ValueError, match="positive"):
        laplace.tune_prior_precision(state, grid=[1.0, -1.0])
    with pytest.raises(ValueError, match="key"):
        laplace.glm_predictive(state, _mlp_apply, inputs, link_approximation="mc")
    with pytest.raises(ValueError, match="link_approximation"):
        laplace.glm_predictive(state, _mlp_apply, inputs, link_approximation="laplace_bridge")


# ------------------------------------------------------------ family conformance


@pytest.mark.parametrize(
    "subset, covariance, curvature",
    [
        ("all", "diag", "ggn"),
        ("all", "full", "empirical_fisher"),
        ("last_layer", "kron", "ggn"),
    ],
)
def test_family_conformance(blobs, subset, covariance, curvature):
    inputs, labels = blobs
    batch = {"inputs": inputs[:16], "labels": labels[:16]}
    family = laplace.build(
        _mlp_apply,
        num_data=300,
        prior_precision=2.0,
        subset=subset,
        covariance=covariance,
        curvature=curvature,
    )
    params = _mlp_params(jax.random.key(0))
    state = family.init(params, {})
    for field in ("params", "model_state", "step"):
        assert field in state._fields
    # No optimizer: "chaining transforms.sam" does not apply to this family.
    assert "optimizer" not in inspect.signature(laplace.build).parameters

    update = jax.jit(family.update)
    new_state, info = update(jax.random.key(1), state, batch)
    new_state, info = update(jax.random.key(2), new_state, batch)
    assert update._cache_size() == 1  # compiled once
    assert int(new_state.step) == 2 and int(new_state.num_seen) == 32
    assert np.isfinite(float(info.loss)) and 0.0 <= float(info.metrics["accuracy"]) <= 1.0
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(got, want)  # the MAP never moves
    assert jax.eval_shape(lambda s: s, state) == jax.eval_shape(lambda s: s, new_state)
    routed = jax.lax.cond(True, lambda s: s, lambda s: state, new_state)
    for got, want in zip(jax.tree.leaves(routed), jax.tree.leaves(new_state), strict=True):
        np.testing.assert_array_equal(got, want)

    # sample: leading axis, vmapped over keys; last-layer variants move only the last layer
    keys = jax.random.split(jax.random.key(3), 3)
    samples = jax.jit(jax.vmap(lambda k: family.sample(k, new_state, 4)))(keys)
    assert jax.tree.structure(samples) == jax.tree.structure(params)
    assert samples["output"]["kernel"].shape == (3, 4, 4, 3)
    moved = np.abs(samples["output"]["kernel"] - params["output"]["kernel"]).max()
    assert moved > 1e-3
    assert (
        float(jnp.abs(samples["output"]["bias"][0, 0] - samples["output"]["bias"][1, 0]).max()) > 0
    )
    hidden_moved = np.abs(samples["hidden"]["kernel"] - params["hidden"]["kernel"]).max()
    assert (hidden_moved > 1e-3) == (subset == "all")
    log_density = family.log_prob(new_state, jax.tree.map(lambda x: x[0, 0], samples))
    assert np.isfinite(float(log_density))

    # vmap over stacked states (two prior precisions): a stronger prior gives a higher
    # density at the mode (larger log-determinant)
    stacked = jax.tree.map(lambda x: jnp.stack([x, x]), new_state)
    stacked = stacked._replace(prior_precision=jnp.array([2.0, 50.0]))

    @jax.jit
    def stacked_step(keys, states):
        states, _ = jax.vmap(family.update, in_axes=(0, 0, None))(keys, states, batch)
        return states, jax.vmap(family.log_prob, in_axes=(0, None))(states, params)

    stacked, densities = stacked_step(jax.random.split(jax.random.key(5), 2), stacked)
    np.testing.assert_array_equal(stacked.num_seen, [48, 48])
    assert float(densities[1]) > float(densities[0])


def test_bma_averages_laplace_samples(blobs):
    inputs, labels = blobs
    family = laplace.build(
        _mlp_apply, num_data=300, prior_precision=2.0, subset="last_layer", covariance="kron"
    )
    state = family.init(_mlp_params(jax.random.key(0)), {})
    state = laplace.fit(jax.random.key(1), state, _mlp_apply, inputs, labels, batch_size=100)
    log_probs, members = bma.posterior_predictive(
        jax.random.key(7), family, state, _mlp_apply, inputs[:20], num_samples=5
    )
    assert members.shape == (5, 20, 3)
    assert float(jnp.std(members, axis=0).mean()) > 1e-4  # a real posterior
    np.testing.assert_allclose(
        log_probs, jax.scipy.special.logsumexp(members, 0) - np.log(5), atol=1e-5
    )
