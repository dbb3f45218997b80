"""Temperature scaling: fitted T against a reference minimiser, statistics, conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

from bnn_flat import bma, calibration


def _reference_temperature(logits, labels, low=1e-2, high=1e2):
    """Bounded scalar minimisation of the float64 NLL over log T (independent of the Newton)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)

    def nll(log_temperature):
        scaled = logits / np.exp(log_temperature)
        log_probs = scaled - special.logsumexp(scaled, axis=1, keepdims=True)
        return -np.mean(log_probs[np.arange(len(labels)), labels])

    result = optimize.minimize_scalar(
        nll, bounds=(np.log(low), np.log(high)), method="bounded", options={"xatol": 1e-12}
    )
    return float(np.exp(result.x))


def _problem(seed, num_data, num_classes, logit_scale, sharpen):
    """Labels drawn from softmax(true_logits) (Gumbel-max); returns sharpened logits."""
    rng = np.random.default_rng(seed)
    true_logits = logit_scale * rng.standard_normal((num_data, num_classes))
    labels = np.argmax(true_logits + rng.gumbel(size=true_logits.shape), axis=1)
    return jnp.asarray(sharpen * true_logits, jnp.float32), jnp.asarray(labels, jnp.int32)


@pytest.mark.parametrize(
    "seed, num_classes, logit_scale, sharpen",
    [(0, 7, 2.0, 3.0), (1, 3, 1.5, 0.4), (2, 10, 4.0, 1.0), (3, 2, 1.0, 8.0)],
)
def test_fit_matches_scipy_minimiser(seed, num_classes, logit_scale, sharpen):
    logits, labels = _problem(seed, 600, num_classes, logit_scale, sharpen)
    fitted = float(calibration.fit_temperature(logits, labels))
    reference = _reference_temperature(logits, labels)
    assert abs(fitted - reference) <= 1e-4 * max(reference, 1.0), (fitted, reference)
    # The problem is far from trivial: T differs markedly from 1 except in the third case.
    if sharpen != 1.0:
        assert abs(np.log(reference)) > 0.3


def test_fit_is_a_stationary_point_of_the_nll():
    logits, labels = _problem(4, 400, 5, 2.0, 2.5)
    temperature = calibration.fit_temperature(logits, labels)
    slope = jax.grad(lambda t: calibration.temperature_nll(logits, labels, t))(temperature)
    assert abs(float(slope)) < 1e-5
    nll = calibration.temperature_nll(logits, labels, temperature)
    for factor in (0.98, 1.02):
        assert nll < calibration.temperature_nll(logits, labels, temperature * factor)


def test_calibrated_logits_give_unit_temperature():
    """Labels drawn from softmax(logits): the MLE of beta = 1/T is 1 within ~4 standard errors."""
    logits, labels = _problem(5, 20_000, 10, 2.5, 1.0)
    beta = 1.0 / float(calibration.fit_temperature(logits, labels))
    # Asymptotic standard error of the one-parameter MLE: sqrt(Var(score)) / (sqrt(N) f'').
    logits64 = np.asarray(logits, np.float64)
    probs = special.softmax(logits64, axis=1)
    expected = (probs * logits64).sum(axis=1)
    score = logits64[np.arange(len(labels)), np.asarray(labels)] - expected
    curvature = (probs * (logits64 - expected[:, None]) ** 2).sum(axis=1).mean()
    standard_error = score.std() / (np.sqrt(len(score)) * curvature)
    assert standard_error < 0.02  # the test has power
    assert abs(beta - 1.0) < 4 * standard_error, (beta, standard_error)


def test_bounds_when_minimiser_is_outside():
    logits = jnp.array([[5.0, 0.0], [0.0, 5.0], [3.0, -1.0]])
    separable = jnp.array([0, 1, 0])
    assert float(calibration.fit_temperature(logits, separable, min_temperature=0.05)) == (
        pytest.approx(0.05)
    )
    wrong = jnp.array([1, 0, 1])  # worse than uniform at every temperature
    assert float(calibration.fit_temperature(logits, wrong, max_temperature=50.0)) == (
        pytest.approx(50.0)
    )


def test_fit_under_jit_equals_eager():
    logits, labels = _problem(6, 300, 4, 2.0, 2.0)
    eager = calibration.fit_temperature(logits, labels)
    jitted = jax.jit(calibration.fit_temperature)(logits, labels)
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)


def test_scale_logits_and_temperature_nll_by_hand():
    logits = jnp.array([[2.0, 0.0]])
    np.testing.assert_allclose(calibration.scale_logits(logits, 2.0), [[1.0, 0.0]])
    # -log softmax([1, 0])[0] = log(1 + e^-1)
    np.testing.assert_allclose(
        calibration.temperature_nll(logits, jnp.array([0]), 2.0), np.log1p(np.exp(-1.0)), 1e-6
    )


def test_conventions_agree_for_one_member():
    member_logits = jnp.asarray(3.0 * np.random.default_rng(7).standard_normal((1, 20, 6)))
    probabilities = calibration.temperature_scaled_log_probs(member_logits, 1.7)
    mean_logits = calibration.temperature_scaled_log_probs(
        member_logits, 1.7, convention="mean_logits"
    )
    np.testing.assert_allclose(probabilities, mean_logits, atol=1e-6)
    np.testing.assert_allclose(probabilities, jax.nn.log_softmax(member_logits[0] / 1.7), atol=1e-6)


def test_conventions_by_hand():
    members = jnp.array([[[0.0, 4.0]], [[2.0, 0.0]]])  # S=2, N=1, C=2, T=2
    # probabilities: mean of softmax([0, 2]) and softmax([1, 0]).
    first = np.exp([0.0, 2.0]) / np.exp([0.0, 2.0]).sum()
    second = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    np.testing.assert_allclose(
        np.exp(calibration.temperature_scaled_log_probs(members, 2.0)),
        [(first + second) / 2],
        rtol=1e-6,
    )
    # mean_logits: softmax(mean([0, 4], [2, 0]) / 2) = softmax([0.5, 1]).
    np.testing.assert_allclose(
        np.exp(calibration.temperature_scaled_log_probs(members, 2.0, convention="mean_logits")),
        [np.exp([0.5, 1.0]) / np.exp([0.5, 1.0]).sum()],
        rtol=1e-6,
    )


def test_probabilities_convention_equals_bma_predict():
    member_logits = jnp.asarray(2.0 * np.random.default_rng(8).standard_normal((5, 12, 4)))
    expected = bma.predict(lambda logits, _: logits / 0.7, member_logits, jnp.zeros((12, 1)))
    np.testing.assert_allclose(
        calibration.temperature_scaled_log_probs(member_logits, 0.7), expected, atol=1e-6
    )


@pytest.mark.parametrize(
    "logits, labels, match",
    [
        (jnp.zeros((3,)), jnp.zeros(3, jnp.int32), "shape"),
        (jnp.zeros((0, 3)), jnp.zeros(0, jnp.int32), "empty"),
        (jnp.zeros((3, 1)), jnp.zeros(3, jnp.int32), "2 classes"),
        (jnp.zeros((3, 2)), jnp.zeros(2, jnp.int32), "labels must have shape"),
        (jnp.zeros((3, 2)), jnp.zeros(3), "integers"),
        (jnp.array([[0.0, jnp.nan]] * 3), jnp.zeros(3, jnp.int32), "NaN"),
        (jnp.zeros((3, 2)), jnp.array([0, 2, 1]), r"\[0, 2\)"),
        (jnp.zeros((3, 2), jnp.int32), jnp.zeros(3, jnp.int32), "floating"),
    ],
)
def test_fit_temperature_rejects_bad_input(logits, labels, match):
    with pytest.raises(ValueError, match=match):
        calibration.fit_temperature(logits, labels)


def test_rejects_bad_options():
    logits, labels = jnp.zeros((2, 2)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="min_temperature"):
        calibration.fit_temperature(logits, labels, min_temperature=2.0, max_temperature=1.0)
    with pytest.raises(ValueError, match="num_iterations"):
        calibration.fit_temperature(logits, labels, num_iterations=0)
    with pytest.raises(ValueError, match="temperature"):
        calibration.scale_logits(logits, -1.0)
    with pytest.raises(ValueError, match="scalar"):
        calibration.scale_logits(logits, jnp.ones(2))
    with pytest.raises(ValueError, match="convention"):
        calibration.temperature_scaled_log_probs(logits[None], 1.0, convention="mean")
    with pytest.raises(ValueError, match=r"\(S, N, C\)"):
        calibration.temperature_scaled_log_probs(logits, 1.0)
