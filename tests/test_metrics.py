"""Tests of bnn_flat.metrics: hand-computed cases, identities and sklearn cross-checks."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bnn_flat import metrics

RTOL = 1e-5
ATOL = 1e-6


def _log(values):
    """Float32 log of probabilities given as nested lists or arrays (log 0 = -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(values, dtype=np.float32))


def _log_probs_from_confidence(confidences, num_classes=4):
    """Rows with probability ``c`` on class 0 and ``(1 - c) / (C - 1)`` on the others."""
    rows = []
    for confidence in confidences:
        rest = (1.0 - confidence) / (num_classes - 1)
        rows.append([confidence] + [rest] * (num_classes - 1))
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(rows)).astype(np.float32)


# Six points (confidence, correct); 0.5 and 0.75 sit exactly on edges of 4 equal-width bins.
_HAND_CONFIDENCE = [0.3, 0.5, 0.6, 0.75, 0.9, 1.0]
_HAND_CORRECT = [0, 1, 1, 0, 1, 1]
_SHUFFLE = [3, 0, 5, 1, 4, 2]  # input order, so equal-mass binning has to sort


@pytest.fixture(name="hand_case")
def _hand_case():
    confidence = [_HAND_CONFIDENCE[i] for i in _SHUFFLE]
    labels = jnp.asarray([0 if _HAND_CORRECT[i] else 1 for i in _SHUFFLE], dtype=jnp.int32)
    log_probs = _log_probs_from_confidence(confidence)
    # Precondition of the boundary tests: the recovered confidences are exactly the edges.
    recovered = np.exp(log_probs.max(axis=-1))
    assert recovered[_SHUFFLE.index(1)] == np.float32(0.5)
    assert recovered[_SHUFFLE.index(3)] == np.float32(0.75)
    return log_probs, labels


def _random_classification(seed, num_data=200, num_classes=5, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(num_data, num_classes))
    log_probs = log_softmax(logits, axis=-1).astype(np.float32)
    labels = rng.integers(0, num_classes, size=num_data).astype(np.int32)
    return log_probs, labels


def _random_members(seed, num_members=4, num_data=50, num_classes=6, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(num_members, num_data, num_classes))
    return log_softmax(logits, axis=-1).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------


def test_ece_equal_width_hand_case(hand_case):
    # Bins (0.25,0.5]: {0.3 W, 0.5 C} gap |0.5-0.4|=0.1; (0.5,0.75]: {0.6 C, 0.75 W} gap 0.175;
    # (0.75,1]: {0.9 C, 1.0 C} gap 0.05. ECE = (2/6)(0.1 + 0.175 + 0.05).
    log_probs, labels = hand_case
    np.testing.assert_allclose(metrics.ece(log_probs, labels, num_bins=4), 0.325 / 3, rtol=RTOL)
    # With [a, b) bins it would be (0.3 + 2 * 0.45 + 3 * 0.21667) / 6 = 0.308333.
    assert abs(float(metrics.ece(log_probs, labels, num_bins=4)) - 1.85 / 6) > 0.1


def test_mce_equal_width_hand_case(hand_case):
    log_probs, labels = hand_case
    np.testing.assert_allclose(metrics.mce(log_probs, labels, num_bins=4), 0.175, rtol=RTOL)
    np.testing.assert_allclose(
        metrics.calibration_error(log_probs, labels, num_bins=4, norm="max"), 0.175, rtol=RTOL
    )


def test_ece_single_bin_is_gap_of_means(hand_case):
    log_probs, labels = hand_case
    # |mean correct - mean confidence| = |4 - 4.05| / 6.
    np.testing.assert_allclose(
        metrics.ece(log_probs, labels, num_bins=1), 0.05 / 6, rtol=1e-4, atol=ATOL
    )


def test_equal_width_boundary_goes_to_lower_bin(hand_case):
    log_probs, labels = hand_case
    data = metrics.reliability_diagram_data(log_probs, labels, num_bins=4)
    # 0.5 joins 0.3 in (0.25, 0.5]; 0.75 joins 0.6 in (0.5, 0.75].
    np.testing.assert_array_equal(data["count"], [0, 2, 2, 2])
    np.testing.assert_allclose(data["confidence"][1:], [0.4, 0.675, 0.95], rtol=RTOL)
    np.testing.assert_allclose(data["accuracy"][1:], [0.5, 0.5, 1.0], rtol=RTOL)
    assert np.isnan(data["confidence"][0]) and np.isnan(data["accuracy"][0])
    np.testing.assert_allclose(data["bin_edges"], [0.0, 0.25, 0.5, 0.75, 1.0])


def test_equal_width_lowest_edge_in_first_bin():
    # Two classes at 0.5/0.5: confidence 0.5 is the top edge of bin 0 of 2 bins, and of bin 1
    # of 4 bins; with 1/C = 0.25 on 4 classes, 0.25 is the top edge of bin 0 of 4 bins.
    uniform_two = _log(np.full((1, 2), 0.5))
    uniform_four = _log(np.full((1, 4), 0.25))
    label = jnp.array([0])

    def counts(log_probs, num_bins):
        return metrics.reliability_diagram_data(log_probs, label, num_bins)["count"].tolist()

    assert counts(uniform_two, 2) == [1, 0]
    assert counts(uniform_two, 4) == [0, 1, 0, 0]
    assert counts(uniform_four, 4) == [1, 0, 0, 0]


@pytest.mark.parametrize("num_bins", [15, 20])
def test_equal_width_edges_belong_to_lower_bin(num_bins):
    # Confidences equal to the stored float32 edges, including ones such as 2/15 that are not
    # exactly representable: edge k (k >= 1) closes bin k - 1; 0 opens bin 0; 1 + ulp goes last.
    edges = np.asarray(jnp.linspace(0.0, 1.0, num_bins + 1, dtype=jnp.float32))
    confidence = np.r_[edges, np.nextafter(np.float32(1), np.float32(2))]
    bin_sums = jax.jit(metrics._bin_sums, static_argnums=(2, 3))
    counts, _, _ = bin_sums(confidence, np.zeros_like(confidence), num_bins, "equal_width")
    expected = np.ones(num_bins)
    expected[0] += 1  # 0 and e_1
    expected[-1] += 1  # 1 and 1 + ulp
    np.testing.assert_array_equal(counts, expected)
    # Just above an edge moves up a bin.
    above = np.nextafter(edges[1:-1], np.float32(2))
    counts, _, _ = bin_sums(above, np.zeros_like(above), num_bins, "equal_width")
    np.testing.assert_array_equal(counts, np.r_[0.0, np.ones(num_bins - 1)])


def test_ace_equal_mass_hand_case(hand_case):
    log_probs, labels = hand_case
    # 2 bins: {0.3 W, 0.5 C, 0.6 C} gap |2/3 - 1.4/3| = 0.2; {0.75 W, 0.9 C, 1.0 C} gap
    # |2/3 - 2.65/3| = 0.21667. ACE = (0.2 + 0.21667) / 2.
    np.testing.assert_allclose(
        metrics.ace(log_probs, labels, num_bins=2), (0.2 + 0.65 / 3) / 2, rtol=RTOL
    )
    # 5 bins, sizes [2, 1, 1, 1, 1]: gaps 0.1 (x2), 0.4, 0.75, 0.1, 0.0.
    np.testing.assert_allclose(metrics.ace(log_probs, labels, num_bins=5), 1.45 / 6, rtol=RTOL)
    np.testing.assert_allclose(
        metrics.calibration_error(log_probs, labels, num_bins=5, binning="equal_mass", norm="max"),
        0.75,
        rtol=RTOL,
    )


def test_ace_more_bins_than_data_uses_singletons(hand_case):
    log_probs, labels = hand_case
    # 8 bins over 6 points: six singletons and two empty bins; ACE = mean |correct - conf|.
    expected = (0.3 + 0.5 + 0.4 + 0.75 + 0.1 + 0.0) / 6
    np.testing.assert_allclose(metrics.ace(log_probs, labels, num_bins=8), expected, rtol=RTOL)


def test_equal_mass_ties_split_in_input_order():
    # Four equal confidences, two bins: the first two inputs (both correct) form bin 0.
    log_probs = _log_probs_from_confidence([0.6] * 4)
    labels = jnp.array([0, 0, 1, 1])
    np.testing.assert_allclose(
        metrics.calibration_error(log_probs, labels, num_bins=2, binning="equal_mass", norm="max"),
        0.6,
        rtol=RTOL,
    )
    np.testing.assert_allclose(metrics.ace(log_probs, labels, num_bins=2), 0.5, rtol=RTOL)


def test_perfectly_calibrated_bins_give_zero_ece():
    # Confidence 0.75 with 3 of 4 correct, confidence 1.0 always correct.
    log_probs = _log_probs_from_confidence([0.75, 1.0, 0.75, 0.75, 1.0, 1.0, 0.75, 1.0])
    labels = jnp.array([0, 0, 0, 1, 0, 0, 0, 0])
    for binning, num_bins in (("equal_width", 4), ("equal_mass", 2)):
        value = metrics.calibration_error(log_probs, labels, num_bins=num_bins, binning=binning)
        np.testing.assert_allclose(value, 0.0, atol=1e-6)
    # One bin mixes them: |7/8 - 7/8| is still 0, but two equal-width bins are not perfect
    # either, since (0.5, 1] holds everything; a 3-point equal-mass split is off by 1/16.
    np.testing.assert_allclose(metrics.ece(log_probs, labels, num_bins=1), 0.0, atol=1e-6)


def test_calibration_error_under_jit_matches_eager():
    log_probs, labels = _random_classification(0)

    @jax.jit
    def compiled(log_probs, labels):
        return (
            metrics.ece(log_probs, labels, num_bins=10),
            metrics.ace(log_probs, labels, num_bins=10),
            metrics.mce(log_probs, labels, num_bins=10),
        )

    eager = (
        metrics.ece(log_probs, labels, num_bins=10),
        metrics.ace(log_probs, labels, num_bins=10),
        metrics.mce(log_probs, labels, num_bins=10),
    )
    np.testing.assert_allclose(compiled(log_probs, labels), eager, rtol=RTOL, atol=ATOL)


def test_ece_matches_numpy_reference():
    log_probs, labels = _random_classification(1, num_data=300)
    probs = np.exp(np.asarray(log_probs, dtype=np.float64))
    confidence, correct = probs.max(1), (probs.argmax(1) == np.asarray(labels)).astype(float)
    edges = np.linspace(0.0, 1.0, 11)
    expected = 0.0
    for lower, upper in zip(edges[:-1], edges[1:], strict=True):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            expected += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    np.testing.assert_allclose(metrics.ece(log_probs, labels, num_bins=10), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Accuracy, NLL, Brier
# ----------------------------------------------------------------------------------------------


def test_accuracy_nll_brier_hand_case():
    log_probs = _log(np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]))
    labels = jnp.array([0, 2])
    np.testing.assert_allclose(metrics.accuracy(log_probs, labels), 0.5)
    np.testing.assert_allclose(
        metrics.nll(log_probs, labels), -(math.log(0.7) + math.log(0.25)) / 2, rtol=RTOL
    )
    # (0.3^2 + 0.2^2 + 0.1^2 + 0.5^2 + 0.25^2 + 0.75^2) / 2 = (0.14 + 0.875) / 2.
    np.testing.assert_allclose(metrics.brier(log_probs, labels), 0.5075, rtol=RTOL)


def test_nll_of_zero_probability_is_infinite():
    log_probs = _log(np.array([[1.0, 0.0]]))
    assert float(metrics.nll(log_probs, jnp.array([1]))) == math.inf
    assert float(metrics.nll(log_probs, jnp.array([0]))) == 0.0


def test_brier_decomposition_hand_case(hand_case):
    log_probs, labels = hand_case
    reliability, resolution, uncertainty = metrics.brier_decomposition(log_probs, labels, 4)
    # Bin means (forecast, outcome): (0.4, 0.5), (0.675, 0.5), (0.95, 1.0); base rate 2/3.
    np.testing.assert_allclose(reliability, (0.01 + 0.030625 + 0.0025) / 3, rtol=RTOL)
    np.testing.assert_allclose(resolution, 1 / 18, rtol=RTOL)
    np.testing.assert_allclose(uncertainty, 2 / 9, rtol=RTOL)
    # Binned forecast Brier: (0.16 + 0.36 + 0.675^2 + 0.325^2 + 2 * 0.05^2) / 6.
    np.testing.assert_allclose(
        reliability - resolution + uncertainty, 1.08625 / 6, rtol=RTOL, atol=ATOL
    )


def _numpy_bins(confidence, num_bins, binning):
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, num_bins + 1).astype(np.float32)
        return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, num_bins - 1)
    order = np.argsort(confidence, kind="stable")
    bin_ids = np.empty(len(confidence), dtype=int)
    for k, group in enumerate(np.array_split(order, num_bins)):
        bin_ids[group] = k
    return bin_ids


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("num_bins", [1, 3, 15])
def test_brier_decomposition_identity(binning, num_bins):
    log_probs, labels = _random_classification(2, num_data=257, num_classes=4, scale=1.5)
    parts = metrics.brier_decomposition(log_probs, labels, num_bins, binning=binning)
    confidence = np.exp(log_probs.max(axis=-1))
    correct = (log_probs.argmax(-1) == labels).astype(np.float64)
    confidence64 = confidence.astype(np.float64)
    bin_ids = _numpy_bins(confidence, num_bins, binning)
    mean_forecast = np.zeros(len(confidence))
    mean_outcome = np.zeros(len(confidence))
    for k in np.unique(bin_ids):
        mean_forecast[bin_ids == k] = confidence64[bin_ids == k].mean()
        mean_outcome[bin_ids == k] = correct[bin_ids == k].mean()
    binned_brier = np.mean((mean_forecast - correct) ** 2)
    combined = float(parts.reliability - parts.resolution + parts.uncertainty)
    np.testing.assert_allclose(combined, binned_brier, rtol=1e-5, atol=1e-6)
    # Stephenson et al.: unbinned = binned + within-bin variance - 2 within-bin covariance.
    unbinned = np.mean((confidence64 - correct) ** 2)
    within_variance = np.mean((confidence64 - mean_forecast) ** 2)
    within_covariance = np.mean((confidence64 - mean_forecast) * (correct - mean_outcome))
    np.testing.assert_allclose(
        combined + within_variance - 2 * within_covariance, unbinned, rtol=1e-5, atol=1e-6
    )
    if binning == "equal_width":
        # Reliability is the count-weighted squared gap, >= 0 and <= ECE (gaps are <= 1).
        ece_value = float(metrics.ece(log_probs, labels, num_bins=num_bins))
        assert 0.0 <= float(parts.reliability) <= ece_value + 1e-7


def test_binary_multiclass_brier_is_twice_top_label_brier():
    log_probs, labels = _random_classification(3, num_data=100, num_classes=2)
    probs = np.exp(np.asarray(log_probs, dtype=np.float64))
    correct = probs.argmax(1) == np.asarray(labels)
    top_label = np.mean((probs.max(1) - correct) ** 2)
    np.testing.assert_allclose(metrics.brier(log_probs, labels), 2 * top_label, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# OOD and misclassification detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_aupr_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    negative = rng.integers(0, 8, size=73).astype(np.float32)  # heavy ties
    positive = (rng.integers(0, 8, size=41) + rng.integers(0, 3, size=41)).astype(np.float32)
    targets = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    scores = np.r_[negative, positive]
    np.testing.assert_allclose(
        metrics.auroc(negative, positive), roc_auc_score(targets, scores), rtol=1e-6
    )
    np.testing.assert_allclose(
        metrics.aupr(negative, positive), average_precision_score(targets, scores), rtol=1e-6
    )


@pytest.mark.parametrize("tpr", [0.95, 0.8, 0.5, 1.0])
def test_fpr_at_tpr_matches_sklearn_roc_curve(tpr):
    rng = np.random.default_rng(4)
    negative = np.round(rng.normal(size=150), 1).astype(np.float32)
    positive = np.round(rng.normal(loc=1.0, size=60), 1).astype(np.float32)
    targets = np.r_[np.zeros(len(negative)), np.ones(len(positive))]
    false_rates, true_rates, _ = roc_curve(
        targets, np.r_[negative, positive], drop_intermediate=False
    )
    expected = false_rates[np.argmax(true_rates >= tpr - 1e-12)]
    np.testing.assert_allclose(metrics.fpr_at_tpr(negative, positive, tpr=tpr), expected)


def test_fpr95_hand_case():
    positive = np.arange(1.0, 21.0)  # 19 of 20 positives score >= 2: threshold 2
    negative = np.array([0.0, 1.0, 1.5, 2.0, 2.5, 3.0, 0.5, 0.2, -1.0, 5.0], dtype=np.float32)
    np.testing.assert_allclose(metrics.fpr_at_tpr(negative, positive), 0.4)
    # TPR 0.5 needs the 10 highest positives (threshold 11): only 5.0 is not below.
    np.testing.assert_allclose(metrics.fpr_at_tpr(negative, positive, tpr=0.5), 0.0)
    negative_high = np.where(np.arange(10) == 0, np.float32(12.0), negative)
    np.testing.assert_allclose(metrics.fpr_at_tpr(negative_high, positive, tpr=0.5), 0.1)


def test_separation_extremes():
    low, high = jnp.array([0.1, 0.2, 0.3]), jnp.array([0.5, 0.6])
    assert float(metrics.auroc(low, high)) == 1.0
    assert float(metrics.aupr(low, high)) == 1.0
    assert float(metrics.fpr_at_tpr(low, high)) == 0.0
    assert float(metrics.auroc(high, low)) == 0.0
    assert float(metrics.fpr_at_tpr(high, low)) == 1.0
    tied = np.zeros(4)
    assert float(metrics.auroc(tied, tied[:2])) == 0.5
    np.testing.assert_allclose(metrics.aupr(tied, tied[:2]), 2 / 6)


def test_auroc_hand_case_with_tie():
    # Pairs (neg, pos): (0.1, 0.4) win, (0.1, 0.9) win, (0.4, 0.4) tie, (0.4, 0.9) win.
    np.testing.assert_allclose(metrics.auroc(jnp.array([0.1, 0.4]), jnp.array([0.4, 0.9])), 3.5 / 4)


def test_ood_scores_and_metrics():
    id_log_probs = _log(np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]))
    ood_log_probs = _log(np.array([[0.5, 0.5], [0.75, 0.25]]))
    np.testing.assert_allclose(metrics.ood_scores(ood_log_probs), [-0.5, -0.75], rtol=RTOL)
    np.testing.assert_allclose(
        metrics.ood_scores(ood_log_probs, score="entropy"),
        [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))],
        rtol=RTOL,
    )
    result = metrics.ood_metrics(id_log_probs, ood_log_probs)
    # OOD max-probs 0.5 and 0.75 beat ID 0.9, 0.8; 0.75 loses to 0.7: AUROC 5/6.
    np.testing.assert_allclose(result["auroc"], 5 / 6, rtol=RTOL)
    # Ranked: 0.5 (OOD, P=1), 0.7 (ID), 0.75 (OOD, P=2/3); AP = (1 + 2/3) / 2.
    np.testing.assert_allclose(result["aupr"], 5 / 6, rtol=RTOL)
    # Threshold at TPR 1 is the score of 0.75 (-0.75); ID with -p >= -0.75: only 0.7.
    np.testing.assert_allclose(result["fpr95"], 1 / 3, rtol=RTOL)


def test_ood_metrics_with_mutual_information_score():
    id_members = _random_members(5, num_data=30, scale=0.5)
    ood_members = _random_members(6, num_data=20, scale=3.0)

    def average(members):
        return (logsumexp(members, axis=0) - math.log(members.shape[0])).astype(np.float32)

    result = metrics.ood_metrics(
        average(id_members),
        average(ood_members),
        score="mutual_information",
        id_member_log_probs=id_members,
        ood_member_log_probs=ood_members,
    )
    negative = metrics.mutual_information(id_members)
    positive = metrics.mutual_information(ood_members)
    np.testing.assert_allclose(result["auroc"], metrics.auroc(negative, positive), rtol=RTOL)
    np.testing.assert_allclose(result["aupr"], metrics.aupr(negative, positive), rtol=RTOL)
    np.testing.assert_allclose(result["fpr95"], metrics.fpr_at_tpr(negative, positive))
    assert float(result["auroc"]) > 0.9  # wild members disagree far more


def test_misclassification_auroc_matches_sklearn():
    log_probs, labels = _random_classification(7, num_data=300, num_classes=3)
    probs = np.exp(np.asarray(log_probs))
    wrong = probs.argmax(1) != np.asarray(labels)
    expected = roc_auc_score(wrong, -probs.max(1))
    np.testing.assert_allclose(metrics.misclassification_auroc(log_probs, labels), expected)
    compiled = jax.jit(metrics.misclassification_auroc)(log_probs, labels)
    np.testing.assert_allclose(compiled, expected, rtol=1e-6)


def test_auroc_under_jit():
    rng = np.random.default_rng(8)
    negative = rng.normal(size=40).astype(np.float32)
    positive = rng.normal(size=30).astype(np.float32)
    compiled = jax.jit(lambda a, b: metrics.fpr_at_tpr(a, b, tpr=0.9))(negative, positive)
    np.testing.assert_allclose(compiled, metrics.fpr_at_tpr(negative, positive, tpr=0.9))
    np.testing.assert_allclose(
        jax.jit(metrics.auroc)(negative, positive), metrics.auroc(negative, positive)
    )


# ----------------------------------------------------------------------------------------------
# Uncertainty
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 10, 1000])
def test_entropy_of_uniform_is_log_num_classes(num_classes):
    log_probs = log_softmax(np.zeros((3, num_classes), np.float32), axis=-1)
    np.testing.assert_allclose(
        metrics.predictive_entropy(log_probs), [math.log(num_classes)] * 3, rtol=1e-5
    )


def test_entropy_with_zero_probabilities_is_finite():
    log_probs = _log(np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    np.testing.assert_allclose(metrics.predictive_entropy(log_probs), [0.0, math.log(2)])


def test_mutual_information_zero_for_identical_members():
    members = np.broadcast_to(_random_members(9, num_members=1)[0], (5, 50, 6))
    np.testing.assert_allclose(metrics.mutual_information(members), np.zeros(50), atol=1e-6)


def test_mutual_information_two_disagreeing_members():
    members = _log(np.array([[[0.9, 0.1]], [[0.1, 0.9]]]))
    binary_entropy = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    expected = math.log(2) - binary_entropy  # 0.368064
    np.testing.assert_allclose(metrics.mutual_information(members), [expected], rtol=RTOL)
    np.testing.assert_allclose(metrics.expected_entropy(members), [binary_entropy], rtol=RTOL)
    # Confident opposite members (zero probabilities) give the full log 2.
    extreme = _log(np.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
    np.testing.assert_allclose(metrics.mutual_information(extreme), [math.log(2)], rtol=RTOL)


def test_mutual_information_random_nonnegative_and_equals_entropy_difference():
    members = _random_members(10, num_members=7, num_data=200, num_classes=10, scale=3.0)
    information = np.asarray(metrics.mutual_information(members))
    assert information.min() >= 0.0
    probs = np.exp(np.asarray(members, dtype=np.float64))
    mean = probs.mean(0)
    expected = -(mean * np.log(mean)).sum(-1) + (probs * np.log(probs)).sum(-1).mean(0)
    np.testing.assert_allclose(information, expected, atol=2e-5)
    average = (logsumexp(members, axis=0) - math.log(7)).astype(np.float32)
    np.testing.assert_allclose(
        information,
        metrics.predictive_entropy(average) - metrics.expected_entropy(members),
        atol=2e-5,
    )
    # Nearly identical members: the entropy difference is tiny but never negative.
    nearly = members[:1] + (np.random.default_rng(11).normal(size=(3, 1, 1)) * 1e-7)
    assert float(np.min(metrics.mutual_information(nearly.astype(np.float32)))) >= 0.0


def test_disagreement_hand_case():
    predictions = np.array([[0, 1, 2, 0], [0, 1, 1, 1], [0, 1, 1, 0]])
    members = _log(np.eye(3)[predictions] * 0.7 + 0.1)
    # Pairs: (0,1) differ on 2 of 4, (0,2) on 1, (1,2) on 1: mean (0.5 + 0.25 + 0.25) / 3.
    np.testing.assert_allclose(metrics.disagreement(members), 1 / 3, rtol=RTOL)
    np.testing.assert_allclose(
        metrics.disagreement_per_datum(members), [0.0, 0.0, 2 / 3, 2 / 3], rtol=RTOL
    )
    assert float(metrics.disagreement(members[:2, :2])) == 0.0


def test_disagreement_matches_pairwise_loop():
    members = _random_members(12, num_members=5, num_data=80, num_classes=3)
    predictions = members.argmax(axis=-1)
    fractions = [
        np.mean(predictions[i] != predictions[j]) for i in range(5) for j in range(i + 1, 5)
    ]
    np.testing.assert_allclose(metrics.disagreement(members), np.mean(fractions), rtol=RTOL)


# ----------------------------------------------------------------------------------------------
# Regression
# ----------------------------------------------------------------------------------------------


def test_gaussian_nll_hand_case():
    mean, variance, targets = jnp.array([0.0, 1.0]), jnp.array([1.0, 4.0]), jnp.array([1.0, 1.0])
    # Data: 0.5 (log 2 pi + 0 + 1) and 0.5 (log 2 pi + log 4 + 0).
    expected = 0.5 * math.log(2 * math.pi) + 0.25 * (1.0 + math.log(4.0))
    np.testing.assert_allclose(metrics.gaussian_nll(mean, variance, targets), expected, rtol=RTOL)
    # A scalar variance broadcasts; two output dimensions are summed per datum.
    np.testing.assert_allclose(
        metrics.gaussian_nll(np.zeros((3, 2)), 1.0, np.zeros((3, 2))),
        math.log(2 * math.pi),
        rtol=RTOL,
    )


def test_rmse_hand_case():
    np.testing.assert_allclose(
        metrics.rmse(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([1.0, 0.0, 3.0, 0.0])),
        math.sqrt(5.0),
        rtol=RTOL,
    )


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------


def test_summary_agrees_with_individual_functions():
    members = _random_members(13, num_members=3, num_data=60, num_classes=4)
    log_probs = (logsumexp(members, axis=0) - math.log(3)).astype(np.float32)
    labels = np.random.default_rng(13).integers(0, 4, size=60)
    ood_log_probs, _ = _random_classification(14, num_data=40, num_classes=4, scale=0.5)
    result = metrics.summary(
        log_probs, labels, num_bins=10, ood_log_probs=ood_log_probs, member_log_probs=members
    )
    expected = {
        "accuracy": metrics.accuracy(log_probs, labels),
        "nll": metrics.nll(log_probs, labels),
        "ece": metrics.ece(log_probs, labels, num_bins=10),
        "mce": metrics.mce(log_probs, labels, num_bins=10),
        "ace": metrics.ace(log_probs, labels, num_bins=10),
        "brier": metrics.brier(log_probs, labels),
        "ood_auroc": metrics.ood_metrics(log_probs, ood_log_probs)["auroc"],
        "ood_aupr": metrics.ood_metrics(log_probs, ood_log_probs)["aupr"],
        "ood_fpr95": metrics.ood_metrics(log_probs, ood_log_probs)["fpr95"],
        "mutual_information": jnp.mean(metrics.mutual_information(members)),
    }
    assert set(result) == set(expected)
    for name, value in result.items():
        assert type(value) is float, name
        np.testing.assert_allclose(value, float(expected[name]), rtol=1e-6, err_msg=name)
    basic = metrics.summary(log_probs, labels)
    assert set(basic) == {"accuracy", "nll", "ece", "mce", "ace", "brier"}
    np.testing.assert_allclose(basic["ece"], float(metrics.ece(log_probs, labels)), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------


def test_bad_classification_inputs_raise():
    log_probs, labels = _random_classification(15, num_data=10, num_classes=3)
    with pytest.raises(ValueError, match=r"labels must have shape \(10,\)"):
        metrics.accuracy(log_probs, labels[:9])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        metrics.nll(log_probs, np.where(np.arange(10) == 0, 3, labels))
    with pytest.raises(ValueError, match=r"labels must lie in"):
        metrics.ece(log_probs, np.where(np.arange(10) == 0, -1, labels))
    with pytest.raises(ValueError, match="labels must be an integer array"):
        metrics.brier(log_probs, labels.astype(np.float32))
    with pytest.raises(ValueError, match=r"shape \(num_data, num_classes\)"):
        metrics.accuracy(log_probs[0], labels)
    with pytest.raises(ValueError, match="empty"):
        metrics.accuracy(log_probs[:0], labels[:0])
    with pytest.raises(ValueError, match="normalised"):
        metrics.ece(log_probs + 1.0, labels)  # logits, not log-probabilities
    with pytest.raises(ValueError, match="NaN"):
        metrics.nll(np.where(np.arange(3) == 0, np.nan, log_probs), labels)
    with pytest.raises(ValueError, match="floating-point"):
        metrics.accuracy(np.zeros((10, 3), dtype=jnp.int32), labels)


@pytest.mark.parametrize("num_bins", [0, -3, 1.5, True])
def test_bad_num_bins_raise(num_bins):
    log_probs, labels = _random_classification(16, num_data=10)
    with pytest.raises(ValueError, match="num_bins"):
        metrics.calibration_error(log_probs, labels, num_bins=num_bins)
    with pytest.raises(ValueError, match="num_bins"):
        metrics.brier_decomposition(log_probs, labels, num_bins)
    with pytest.raises(ValueError, match="num_bins"):
        metrics.summary(log_probs, labels, num_bins=num_bins)


def test_unknown_option_strings_raise():
    log_probs, labels = _random_classification(17, num_data=10)
    with pytest.raises(ValueError, match="Unknown binning 'quantile'"):
        metrics.calibration_error(log_probs, labels, binning="quantile")
    with pytest.raises(ValueError, match="Unknown norm 'l2'"):
        metrics.calibration_error(log_probs, labels, norm="l2")
    with pytest.raises(ValueError, match="Unknown score 'energy'"):
        metrics.ood_scores(log_probs, score="energy")
    with pytest.raises(ValueError, match="needs member_log_probs"):
        metrics.ood_scores(log_probs, score="mutual_information")


def test_bad_member_and_score_inputs_raise():
    members = _random_members(18, num_members=3, num_data=10, num_classes=4)
    log_probs = members[0]
    with pytest.raises(ValueError, match=r"shape \(num_members, num_data, num_classes\)"):
        metrics.mutual_information(log_probs)
    with pytest.raises(ValueError, match="at least 2 members"):
        metrics.disagreement(members[:1])
    with pytest.raises(ValueError, match="to match the log-probabilities"):
        metrics.ood_scores(log_probs[:5], score="mutual_information", member_log_probs=members)
    with pytest.raises(ValueError, match="same number of classes"):
        metrics.ood_metrics(log_probs, _log(np.full((10, 2), 0.5)))
    with pytest.raises(ValueError, match="scores_positive is empty"):
        metrics.auroc(np.ones(3), np.ones(0))
    with pytest.raises(ValueError, match="one-dimensional"):
        metrics.aupr(np.ones((3, 1)), np.ones(2))
    with pytest.raises(ValueError, match="scores_negative contains NaN"):
        metrics.auroc(np.array([0.0, np.nan]), np.ones(2))
    with pytest.raises(ValueError, match="tpr must be"):
        metrics.fpr_at_tpr(np.ones(3), np.ones(2), tpr=0.0)
    all_correct_labels = log_probs.argmax(axis=-1)
    with pytest.raises(ValueError, match="at least one correct and one misclassified"):
        metrics.misclassification_auroc(log_probs, all_correct_labels)


def test_bad_regression_inputs_raise():
    with pytest.raises(ValueError, match="variance must be positive"):
        metrics.gaussian_nll(np.zeros(3), jnp.array([1.0, 0.0, 1.0]), np.zeros(3))
    with pytest.raises(ValueError, match="same shape"):
        metrics.rmse(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        metrics.gaussian_nll(np.zeros(3), np.ones(2), np.zeros(3))
    with pytest.raises(ValueError, match="targets contains NaN"):
        metrics.rmse(np.zeros(2), np.array([0.0, np.nan]))
