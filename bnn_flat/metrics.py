r"""Evaluation metrics for Bayesian model averages.

Classification metrics take **log-probabilities** of shape ``(num_data, num_classes)``, the
output of :mod:`bnn_flat.bma` (the log of the averaged predictive), and integer ``labels`` of
shape ``(num_data,)``. Per-member metrics (mutual information, disagreement) take the stacked
member log-probabilities of shape ``(num_members, num_data, num_classes)``.

Conventions (fixed here once, because published code disagrees; see ``algorithms.md`` section 11):

* The prediction is ``argmax`` of the log-probabilities (first index on ties) and the
  **confidence** is its probability, ``exp(max_c log_probs[:, c])``.
* **Equal-width bins.** Edges ``e_k = jnp.linspace(0, 1, num_bins + 1)`` in the computation
  dtype. Bin ``k`` is the half-open interval ``(e_k, e_{k+1}]``, except that bin 0 also holds
  confidence exactly 0, i.e. bin 0 is ``[0, e_1]``. A confidence exactly on an inner edge goes to
  the bin *below* it (with 4 bins, 0.5 is in bin 1 = ``(0.25, 0.5]``). Confidences that round to
  slightly above 1 go to the last bin.
* **Equal-mass bins** (ACE). The confidences are sorted ascending (stable sort: ties keep their
  input order) and cut into ``num_bins`` consecutive groups whose sizes differ by at most one,
  the larger groups first (the ``numpy.array_split`` / ``torch.tensor_split`` convention:
  the first ``num_data % num_bins`` groups hold ``ceil(num_data / num_bins)`` points). Tied
  confidences may therefore fall into different groups. With ``num_data < num_bins`` some groups
  are empty.
* **ECE** (``norm="l1"``): :math:`\sum_k \frac{n_k}{N} |\mathrm{acc}_k - \mathrm{conf}_k|`.
  **MCE** (``norm="max"``): :math:`\max_{k: n_k > 0} |\mathrm{acc}_k - \mathrm{conf}_k|`.
  Empty bins contribute nothing. Values are fractions, not percentages.
* **NLL** is ``-mean log p_y`` of the given log-probabilities, with no epsilon.
* **OOD scores** are oriented so that *higher means more likely out-of-distribution*; OOD is
  the positive class for AUROC, AUPR and FPR95.

Input checks. Shapes, dtypes and option strings are always checked. Value checks (NaN, labels
in range, rows of ``log_probs`` normalised, positive variances) need concrete arrays: they run
when a function is called eagerly and are skipped when it is traced inside an outer
``jax.jit``. Every function except :func:`reliability_diagram_data` and :func:`summary`
(which return host values) can be used under ``jax.jit`` with its options (``num_bins``,
``binning``, ``norm``, ``score``, ``tpr``) static.

Compilation. All classification metrics for one ``num_bins`` come from one compiled table
(and AUROC, AUPR and FPR from another), so an eager evaluation compiles once per input shape
rather than once per metric; under an outer ``jax.jit`` the unused entries are removed.

References:
  * Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (ECE, MCE).
  * Nixon et al., "Measuring Calibration in Deep Learning", CVPR Workshops 2019 (ACE).
  * Murphy, "A New Vector Partition of the Probability Score", J. Appl. Meteorology 1973.
  * Stephenson et al., "Two Extra Components in the Brier Score Decomposition",
    Weather and Forecasting 2008.
  * Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution
    Examples", ICLR 2017 (max-probability score, AUROC, AUPR).
  * Depeweg et al., "Decomposition of Uncertainty in Bayesian Deep Learning", ICML 2018
    (mutual information as epistemic uncertainty).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "BrierDecomposition",
    "accuracy",
    "nll",
    "brier",
    "brier_decomposition",
    "calibration_error",
    "ece",
    "mce",
    "ace",
    "reliability_diagram_data",
    "ood_scores",
    "auroc",
    "aupr",
    "fpr_at_tpr",
    "ood_metrics",
    "misclassification_auroc",
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "disagreement",
    "disagreement_per_datum",
    "gaussian_nll",
    "rmse",
    "summary",
]

_BINNINGS = ("equal_width", "equal_mass")
_NORMS = ("l1", "max")
_OOD_SCORES = ("max_prob", "entropy", "mutual_information")


class BrierDecomposition(NamedTuple):
    """Murphy's decomposition of the top-label Brier score on binned confidence.

    Attributes:
      reliability: :math:`\\frac1N \\sum_k n_k (\\bar f_k - \\bar o_k)^2`; lower is better.
      resolution: :math:`\\frac1N \\sum_k n_k (\\bar o_k - \\bar o)^2`; higher is better.
      uncertainty: :math:`\\bar o (1 - \\bar o)`, the variance of the correctness indicator.
    """

    reliability: jax.Array
    resolution: jax.Array
    uncertainty: jax.Array


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _is_concrete(*arrays: jax.Array) -> bool:
    return not any(isinstance(array, jax.core.Tracer) for array in arrays)


def _host(array: jax.Array) -> np.ndarray:
    """A NumPy copy for value checks (float64 stays float64, other floats become float32).

    Value checks run in NumPy so that eager calls compile nothing beyond the metric itself.
    """
    values = np.asarray(array)
    if values.dtype in (np.float64, np.float32) or np.issubdtype(values.dtype, np.integer):
        return values
    return values.astype(np.float32)  # float16, bfloat16


def _float_array(values: ArrayLike, name: str) -> jax.Array:
    array = jnp.asarray(values)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}.")
    dtype = jnp.promote_types(array.dtype, jnp.float32)
    return array if array.dtype == dtype else array.astype(dtype)


def _check_choice(value: object, name: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {', '.join(options)}.")


def _check_num_bins(num_bins: object) -> None:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int | np.integer):
        raise ValueError(f"num_bins must be a Python int, got {num_bins!r}.")
    if num_bins < 1:
        raise ValueError(f"num_bins must be at least 1, got {num_bins}.")


def _check_log_prob_values(log_probs: jax.Array, name: str, input_dtype: jnp.dtype) -> None:
    """Checks NaN, +inf and normalisation over the last axis (eager calls only)."""
    if not _is_concrete(log_probs):
        return
    values = _host(log_probs)
    if np.isnan(values).any():
        raise ValueError(f"{name} contains NaN.")
    if (values == np.inf).any():
        raise ValueError(f"{name} contains +inf; log-probabilities are at most 0.")
    tolerance = max(1e-3, 16 * float(jnp.finfo(input_dtype).eps))
    # Normalised rows cannot overflow exp; logits may, which the check then reports.
    with np.errstate(over="ignore", divide="ignore"):
        deviation = float(np.max(np.abs(np.log(np.sum(np.exp(values), axis=-1)))))
    if not deviation <= tolerance:
        raise ValueError(
            f"{name} must be normalised log-probabilities (logsumexp over classes = 0); the "
            f"largest |logsumexp| is {deviation:.3g}. Pass jax.nn.log_softmax(logits)."
        )


def _validate_log_probs(log_probs: ArrayLike, name: str = "log_probs") -> jax.Array:
    input_dtype = jnp.asarray(log_probs).dtype
    array = _float_array(log_probs, name)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must have shape (num_data, num_classes), got shape {tuple(array.shape)}."
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}).")
    _check_log_prob_values(array, name, input_dtype)
    return array


def _validate_member_log_probs(
    member_log_probs: ArrayLike, name: str = "member_log_probs", min_members: int = 1
) -> jax.Array:
    input_dtype = jnp.asarray(member_log_probs).dtype
    array = _float_array(member_log_probs, name)
    if array.ndim != 3:
        raise ValueError(
            f"{name} must have shape (num_members, num_data, num_classes), got shape "
            f"{tuple(array.shape)}."
        )
    if 0 in array.shape:
        raise ValueError(f"{name} is empty (shape {tuple(array.shape)}).")
    if array.shape[0] < min_members:
        raise ValueError(f"{name} needs at least {min_members} members, got {array.shape[0]}.")
    _check_log_prob_values(array, name, input_dtype)
    return array


def _validate_labels(labels: ArrayLike, num_data: int, num_classes: int) -> jax.Array:
    array = jnp.asarray(labels)
    if not jnp.issubdtype(array.dtype, jnp.integer):
        raise ValueError(f"labels must be an integer array, got dtype {array.dtype}.")
    if array.shape != (num_data,):
        raise ValueError(
            f"labels must have shape ({num_data},) to match log_probs, got shape "
            f"{tuple(array.shape)}."
        )
    if _is_concrete(array):
        values = np.asarray(array)
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"labels must lie in [0, {num_classes - 1}] for {num_classes} classes, "
                f"got values in [{low}, {high}]."
            )
    return array


def _validate_classification(
    log_probs: ArrayLike, labels: ArrayLike
) -> tuple[jax.Array, jax.Array]:
    log_probs = _validate_log_probs(log_probs)
    labels = _validate_labels(labels, *log_probs.shape)
    return log_probs, labels


def _validate_members_match(
    member_log_probs: ArrayLike, log_probs: jax.Array, name: str
) -> jax.Array:
    members = _validate_member_log_probs(member_log_probs, name)
    if members.shape[1:] != log_probs.shape:
        raise ValueError(
            f"{name} must have shape (num_members, {log_probs.shape[0]}, {log_probs.shape[1]}) "
            f"to match the log-probabilities, got shape {tuple(members.shape)}."
        )
    return members


def _validate_scores(scores: ArrayLike, name: str) -> jax.Array:
    array = jnp.asarray(scores)
    if not (jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)):
        raise ValueError(f"{name} must be a real-valued array, got dtype {array.dtype}.")
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(array.shape)}.")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty.")
    dtype = jnp.promote_types(array.dtype, jnp.float32)
    array = array if array.dtype == dtype else array.astype(dtype)
    if _is_concrete(array) and np.isnan(_host(array)).any():
        raise ValueError(f"{name} contains NaN.")
    return array


def _validate_regression(mean: ArrayLike, targets: ArrayLike) -> tuple[jax.Array, jax.Array]:
    mean = _float_array(mean, "mean")
    targets = _float_array(targets, "targets")
    if mean.shape != targets.shape:
        raise ValueError(
            f"mean and targets must have the same shape, got {tuple(mean.shape)} and "
            f"{tuple(targets.shape)}."
        )
    if mean.ndim == 0 or mean.shape[0] == 0 or mean.size == 0:
        raise ValueError(f"mean must have a non-empty leading data axis, got shape {mean.shape}.")
    for name, array in (("mean", mean), ("targets", targets)):
        if _is_concrete(array) and np.isnan(_host(array)).any():
            raise ValueError(f"{name} contains NaN.")
    return mean, targets


# --------------------------------------------------------------------------------------------
# Kernels (validated inputs only)
# --------------------------------------------------------------------------------------------


def _confidence_and_correct(log_probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, ...]:
    confidence = jnp.exp(jnp.max(log_probs, axis=-1))
    correct = (jnp.argmax(log_probs, axis=-1) == labels).astype(log_probs.dtype)
    return confidence, correct


def _equal_mass_bin_ids(num_data: int, num_bins: int) -> np.ndarray:
    sizes = np.full(num_bins, num_data // num_bins)
    sizes[: num_data % num_bins] += 1
    return np.repeat(np.arange(num_bins), sizes)


def _bin_sums(
    confidence: jax.Array, correct: jax.Array, num_bins: int, binning: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-bin count, sum of confidences and sum of correctness indicators."""
    if binning == "equal_width":
        # Bin k is (edges[k], edges[k + 1]]: guess from ceil(B c) - 1, then correct the guess
        # (off by at most one through rounding) against the stored edges themselves.
        edges = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)
        guess = jnp.ceil(confidence * num_bins).astype(jnp.int32) - 1
        bin_ids = jnp.clip(guess, 0, num_bins - 1)
        bin_ids = jnp.where((bin_ids > 0) & (confidence <= edges[bin_ids]), bin_ids - 1, bin_ids)
        too_low = (bin_ids < num_bins - 1) & (confidence > edges[bin_ids + 1])
        bin_ids = jnp.where(too_low, bin_ids + 1, bin_ids)
    else:
        order = jnp.argsort(confidence, stable=True)
        confidence, correct = confidence[order], correct[order]
        bin_ids = jnp.asarray(_equal_mass_bin_ids(confidence.shape[0], num_bins))
    columns = jnp.stack([jnp.ones_like(confidence), confidence, correct], axis=1)
    sums = jax.ops.segment_sum(columns, bin_ids, num_segments=num_bins)
    return sums[:, 0], sums[:, 1], sums[:, 2]


@functools.partial(jax.jit, static_argnames=("num_bins",))
def _classification_table(
    log_probs: jax.Array, labels: jax.Array, num_bins: int
) -> dict[str, jax.Array]:
    """Every classification metric at once.

    Public functions pick their entry, so an eager session compiles one program per
    (shape, ``num_bins``) instead of one per metric; under an outer ``jax.jit`` the unused
    entries are dead code and XLA removes them.
    """
    confidence, correct = _confidence_and_correct(log_probs, labels)
    num_data = confidence.shape[0]
    one_hot = jax.nn.one_hot(labels, log_probs.shape[-1], dtype=log_probs.dtype)
    base_rate = jnp.mean(correct)
    table = {
        "accuracy": base_rate,
        "nll": -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1)),
        "brier": jnp.mean(jnp.sum((jnp.exp(log_probs) - one_hot) ** 2, axis=-1)),
    }
    for binning in _BINNINGS:
        counts, confidence_sums, correct_sums = _bin_sums(confidence, correct, num_bins, binning)
        safe_counts = jnp.maximum(counts, 1.0)
        gaps = jnp.abs(correct_sums - confidence_sums)
        mean_forecast = confidence_sums / safe_counts
        mean_outcome = correct_sums / safe_counts
        table[f"{binning}/l1"] = jnp.sum(gaps) / num_data
        table[f"{binning}/max"] = jnp.max(jnp.where(counts > 0, gaps / safe_counts, 0.0))
        table[f"{binning}/reliability"] = (
            jnp.sum(counts * (mean_forecast - mean_outcome) ** 2) / num_data
        )
        table[f"{binning}/resolution"] = (
            jnp.sum(counts * (mean_outcome - base_rate) ** 2) / num_data
        )
        table[f"{binning}/counts"] = counts
        table[f"{binning}/confidence_sums"] = confidence_sums
        table[f"{binning}/correct_sums"] = correct_sums
    table["uncertainty"] = base_rate * (1.0 - base_rate)
    return table


def _entropy(log_probs: jax.Array) -> jax.Array:
    finite = log_probs > -jnp.inf
    safe_log_probs = jnp.where(finite, log_probs, 0.0)
    return -jnp.sum(jnp.where(finite, jnp.exp(safe_log_probs) * safe_log_probs, 0.0), axis=-1)


_predictive_entropy = jax.jit(_entropy)


@jax.jit
def _expected_entropy(member_log_probs: jax.Array) -> jax.Array:
    return jnp.mean(_entropy(member_log_probs), axis=0)


@jax.jit
def _mutual_information(member_log_probs: jax.Array) -> jax.Array:
    num_members = member_log_probs.shape[0]
    mean_log_probs = jax.nn.logsumexp(member_log_probs, axis=0) - math.log(num_members)
    finite = member_log_probs > -jnp.inf
    safe_log_probs = jnp.where(finite, member_log_probs, 0.0)
    # p_mc > 0 implies mean_c >= p_mc / S > 0, so the difference is finite where used.
    log_ratio = jnp.where(finite, safe_log_probs - mean_log_probs, 0.0)
    kl = jnp.sum(jnp.where(finite, jnp.exp(safe_log_probs) * log_ratio, 0.0), axis=-1)
    return jnp.maximum(jnp.mean(kl, axis=0), 0.0)


@jax.jit
def _disagreement_per_datum(member_log_probs: jax.Array) -> jax.Array:
    num_members, _, num_classes = member_log_probs.shape
    predictions = jnp.argmax(member_log_probs, axis=-1)
    votes = jnp.sum(jax.nn.one_hot(predictions, num_classes, dtype=jnp.int32), axis=0)
    num_pairs = num_members * (num_members - 1)  # ordered pairs; integer counts stay exact
    disagreeing_pairs = num_pairs - jnp.sum(votes * (votes - 1), axis=-1)
    return disagreeing_pairs.astype(member_log_probs.dtype) / num_pairs


@functools.partial(jax.jit, static_argnames=("score",))
def _ood_scores(log_probs: jax.Array, member_log_probs: jax.Array | None, score: str) -> jax.Array:
    if score == "max_prob":
        return -jnp.exp(jnp.max(log_probs, axis=-1))
    if score == "entropy":
        return _entropy(log_probs)
    return _mutual_information(member_log_probs)


def _rank_counts(scores: jax.Array, is_positive: jax.Array) -> dict[str, jax.Array]:
    """Per sorted score ``v``: negatives below ``v``, negatives at or below, positives below.

    Ties form groups of equal values. One sort and integer cumulative sums replace binary
    searches: the counts are exact and the program compiles quickly.
    """
    num_scores = scores.shape[0]
    sorted_scores, positive = jax.lax.sort((scores, is_positive.astype(jnp.int32)), num_keys=1)
    negative = 1 - positive
    positions = jnp.arange(num_scores)
    differs = sorted_scores[1:] != sorted_scores[:-1]
    first_of_group = jnp.concatenate([jnp.ones(1, dtype=bool), differs])
    last_of_group = jnp.concatenate([differs, jnp.ones(1, dtype=bool)])
    group_start = jax.lax.cummax(jnp.where(first_of_group, positions, 0))
    group_end = jax.lax.cummin(jnp.where(last_of_group, positions, num_scores), reverse=True)
    negatives_through = jnp.cumsum(negative)
    positives_through = jnp.cumsum(positive)
    return {
        "positive": positive,
        "positives_through": positives_through,
        "negatives_below": (negatives_through - negative)[group_start],
        "negatives_at_or_below": negatives_through[group_end],
        "positives_below": (positives_through - positive)[group_start],
    }


def _auroc_from_counts(
    counts: dict[str, jax.Array],
    num_negative: int | jax.Array,
    num_positive: int | jax.Array,
    dtype: jnp.dtype,
) -> jax.Array:
    # For each positive, the fraction of negatives below it, ties counting 1/2.
    wins = (counts["negatives_below"] + counts["negatives_at_or_below"]).astype(dtype)
    per_positive = jnp.where(counts["positive"] == 1, wins / (2.0 * num_negative), 0.0)
    return jnp.sum(per_positive) / num_positive


@functools.partial(jax.jit, static_argnames=("tpr",))
def _detection_table(
    scores_negative: jax.Array, scores_positive: jax.Array, tpr: float
) -> dict[str, jax.Array]:
    """AUROC, AUPR and FPR at ``tpr`` in one program (see :func:`_classification_table`)."""
    num_negative, num_positive = scores_negative.shape[0], scores_positive.shape[0]
    dtype = scores_positive.dtype
    is_positive = jnp.concatenate(
        [jnp.zeros(num_negative, dtype=bool), jnp.ones(num_positive, dtype=bool)]
    )
    counts = _rank_counts(jnp.concatenate([scores_negative, scores_positive]), is_positive)
    # AP: mean over positives of the precision of the threshold "score >= own score".
    true_positives = (num_positive - counts["positives_below"]).astype(dtype)
    false_positives = (num_negative - counts["negatives_below"]).astype(dtype)
    precision = true_positives / jnp.maximum(true_positives + false_positives, 1.0)
    aupr_value = jnp.sum(jnp.where(counts["positive"] == 1, precision, 0.0)) / num_positive
    # FPR: the threshold is the k-th largest positive, k = ceil(tpr m), i.e. the
    # (m - k + 1)-th smallest; the rounding guards against 0.95 * m landing just above an
    # integer. Negatives at or above it are those not strictly below it.
    num_detected = max(1, math.ceil(round(tpr * num_positive, 9)))
    position = jnp.argmax(counts["positives_through"] >= num_positive - num_detected + 1)
    false_positives_at_threshold = num_negative - counts["negatives_below"][position]
    false_positive_rate = false_positives_at_threshold.astype(dtype) / num_negative
    return {
        "auroc": _auroc_from_counts(counts, num_negative, num_positive, dtype),
        "aupr": aupr_value,
        "fpr": false_positive_rate,
    }


@jax.jit
def _misclassification_auroc(log_probs: jax.Array, labels: jax.Array) -> jax.Array:
    confidence, correct = _confidence_and_correct(log_probs, labels)
    is_wrong = correct == 0
    num_wrong = jnp.sum(is_wrong).astype(confidence.dtype)
    num_correct = confidence.shape[0] - num_wrong
    counts = _rank_counts(-confidence, is_wrong)
    return _auroc_from_counts(counts, num_correct, num_wrong, confidence.dtype)


# --------------------------------------------------------------------------------------------
# Accuracy, NLL, Brier
# --------------------------------------------------------------------------------------------


def accuracy(log_probs: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Fraction of data whose most probable class is the label.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.

    Returns:
      A scalar in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.3, 0.7]]))
      >>> float(accuracy(log_probs, jnp.array([0, 0])))
      0.5
    """
    return _classification_table(*_validate_classification(log_probs, labels), 15)["accuracy"]


def nll(log_probs: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Mean negative log-likelihood of the labels, :math:`-\\frac1N \\sum_i \\log p_{i, y_i}`.

    Computed straight from the log-probabilities, without an epsilon; a zero probability on a
    label gives ``inf``.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.

    Returns:
      A non-negative scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]]))
      >>> round(float(nll(log_probs, jnp.array([0, 1]))), 4)
      0.4904
    """
    return _classification_table(*_validate_classification(log_probs, labels), 15)["nll"]


def brier(log_probs: ArrayLike, labels: ArrayLike) -> jax.Array:
    """Multiclass Brier score, :math:`\\frac1N \\sum_i \\sum_c (p_{ic} - [y_i = c])^2`.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.

    Returns:
      A scalar in ``[0, 2]``.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
      >>> round(float(brier(log_probs, jnp.array([0]))), 4)
      0.14
    """
    return _classification_table(*_validate_classification(log_probs, labels), 15)["brier"]


def brier_decomposition(
    log_probs: ArrayLike,
    labels: ArrayLike,
    num_bins: int = 15,
    *,
    binning: str = "equal_width",
) -> BrierDecomposition:
    """Murphy decomposition of the top-label Brier score on binned confidence.

    The forecast is the confidence :math:`f_i = \\max_c p_{ic}` and the outcome is the
    correctness indicator :math:`o_i = [\\arg\\max_c p_{ic} = y_i]`. With bins of the
    confidence (same conventions as :func:`calibration_error`), bin sizes :math:`n_k`, bin means
    :math:`\\bar f_k, \\bar o_k` and base rate :math:`\\bar o`:

    .. math::
        \\mathrm{REL} = \\tfrac1N \\sum_k n_k (\\bar f_k - \\bar o_k)^2, \\quad
        \\mathrm{RES} = \\tfrac1N \\sum_k n_k (\\bar o_k - \\bar o)^2, \\quad
        \\mathrm{UNC} = \\bar o (1 - \\bar o).

    Exact identity: ``REL - RES + UNC`` equals the Brier score of the *binned* forecast,
    :math:`\\frac1N \\sum_i (\\bar f_{k(i)} - o_i)^2`. The unbinned top-label Brier score
    :math:`\\frac1N \\sum_i (f_i - o_i)^2` differs from it by the within-bin variance of the
    forecast minus twice the within-bin covariance of forecast and outcome (Stephenson et al.
    2008), so the identity with the unbinned score holds only up to those two terms. This
    decomposes the top-label (binary) Brier score, not the multiclass :func:`brier`; for two
    classes the multiclass score is exactly twice the top-label one.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of confidence bins (at least 1).
      binning: ``"equal_width"`` or ``"equal_mass"``.

    Returns:
      ``BrierDecomposition(reliability, resolution, uncertainty)`` of scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.8, 0.2], [0.6, 0.4]]))
      >>> parts = brier_decomposition(log_probs, jnp.array([0, 1]), num_bins=1)
      >>> [round(float(value), 4) for value in parts]
      [0.04, 0.0, 0.25]
    """
    _check_num_bins(num_bins)
    _check_choice(binning, "binning", _BINNINGS)
    log_probs, labels = _validate_classification(log_probs, labels)
    table = _classification_table(log_probs, labels, num_bins)
    return BrierDecomposition(
        reliability=table[f"{binning}/reliability"],
        resolution=table[f"{binning}/resolution"],
        uncertainty=table["uncertainty"],
    )


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def calibration_error(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    binning: str = "equal_width",
    norm: str = "l1",
) -> jax.Array:
    """Top-label calibration error on binned confidence.

    ``norm="l1"`` gives :math:`\\sum_k \\frac{n_k}{N} |\\mathrm{acc}_k - \\mathrm{conf}_k|`
    (ECE; ACE with equal-mass bins) and ``norm="max"`` gives
    :math:`\\max_{k: n_k > 0} |\\mathrm{acc}_k - \\mathrm{conf}_k|` (MCE).

    Bins: ``"equal_width"`` uses edges ``linspace(0, 1, num_bins + 1)`` and intervals
    ``(a, b]``, bin 0 being ``[0, 1 / num_bins]``, so a confidence exactly on an inner edge
    counts in the lower bin. ``"equal_mass"`` sorts the confidences (stable) and splits them into
    ``num_bins`` consecutive groups whose sizes differ by at most one, larger groups first.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of bins (at least 1).
      binning: ``"equal_width"`` or ``"equal_mass"``.
      norm: ``"l1"`` (count-weighted mean gap) or ``"max"`` (largest gap over non-empty bins).

    Returns:
      A scalar in ``[0, 1]`` (a fraction, not a percentage).

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4]]))
      >>> round(float(calibration_error(log_probs, jnp.array([0, 1]), num_bins=2)), 4)
      0.25
    """
    _check_num_bins(num_bins)
    _check_choice(binning, "binning", _BINNINGS)
    _check_choice(norm, "norm", _NORMS)
    log_probs, labels = _validate_classification(log_probs, labels)
    return _classification_table(log_probs, labels, num_bins)[f"{binning}/{norm}"]


def ece(log_probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15) -> jax.Array:
    """Expected calibration error: equal-width bins ``(a, b]``, count-weighted L1 gap.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of equal-width bins.

    Returns:
      A scalar; see :func:`calibration_error`.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.75, 0.25], [0.75, 0.25]]))
      >>> float(ece(log_probs, jnp.array([0, 1])))
      0.25
    """
    return calibration_error(log_probs, labels, num_bins=num_bins, norm="l1")


def mce(log_probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15) -> jax.Array:
    """Maximum calibration error: equal-width bins ``(a, b]``, largest gap of a non-empty bin.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of equal-width bins.

    Returns:
      A scalar; see :func:`calibration_error`.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.75, 0.25], [1.0, 0.0]]))
      >>> float(mce(log_probs, jnp.array([1, 0]), num_bins=4))
      0.75
    """
    return calibration_error(log_probs, labels, num_bins=num_bins, norm="max")


def ace(log_probs: ArrayLike, labels: ArrayLike, *, num_bins: int = 15) -> jax.Array:
    """Adaptive calibration error: equal-mass bins, count-weighted L1 gap.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of equal-mass bins.

    Returns:
      A scalar; see :func:`calibration_error`.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.5, 0.5], [0.75, 0.25]]))
      >>> float(ace(log_probs, jnp.array([0, 0]), num_bins=2))
      0.375
    """
    return calibration_error(log_probs, labels, num_bins=num_bins, binning="equal_mass", norm="l1")


def reliability_diagram_data(
    log_probs: ArrayLike, labels: ArrayLike, num_bins: int = 15
) -> dict[str, np.ndarray]:
    """Per-bin statistics of equal-width bins ``(a, b]`` for a reliability diagram.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of equal-width bins.

    Returns:
      A dict of NumPy arrays: ``"confidence"`` and ``"accuracy"`` (per-bin means, NaN for empty
      bins), ``"count"`` (number of data per bin, integers) and ``"bin_edges"``
      (``num_bins + 1`` edges).

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.75, 0.25], [1.0, 0.0]]))
      >>> data = reliability_diagram_data(log_probs, jnp.array([1, 0]), num_bins=2)
      >>> data["count"].tolist(), data["accuracy"].tolist()
      ([0, 2], [nan, 0.5])
    """
    _check_num_bins(num_bins)
    log_probs, labels = _validate_classification(log_probs, labels)
    table = _classification_table(log_probs, labels, num_bins)
    counts, confidence_sums, correct_sums = (
        np.asarray(table[f"equal_width/{name}"], dtype=np.float64)
        for name in ("counts", "confidence_sums", "correct_sums")
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.where(counts > 0, confidence_sums / counts, np.nan)
        mean_accuracy = np.where(counts > 0, correct_sums / counts, np.nan)
    return {
        "confidence": mean_confidence,
        "accuracy": mean_accuracy,
        "count": np.rint(counts).astype(np.int64),
        "bin_edges": np.asarray(jnp.linspace(0.0, 1.0, num_bins + 1, dtype=log_probs.dtype)),
    }


# --------------------------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------------------------


def predictive_entropy(log_probs: ArrayLike) -> jax.Array:
    """Entropy of each predictive distribution, :math:`-\\sum_c p_c \\log p_c` (nats).

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.

    Returns:
      Entropies, shape ``(num_data,)``, in ``[0, log num_classes]``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(predictive_entropy(jnp.log(jnp.full((1, 4), 0.25)))[0]), 4)
      1.3863
    """
    return _predictive_entropy(_validate_log_probs(log_probs))


def expected_entropy(member_log_probs: ArrayLike) -> jax.Array:
    """Mean entropy of the members' predictives, :math:`\\frac1S \\sum_m H(p_m)` (aleatoric).

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``.

    Returns:
      Expected entropies, shape ``(num_data,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[1.0, 0.0]], [[0.5, 0.5]]]))
      >>> round(float(expected_entropy(members)[0]), 4)
      0.3466
    """
    return _expected_entropy(_validate_member_log_probs(member_log_probs))


def mutual_information(member_log_probs: ArrayLike) -> jax.Array:
    """Mutual information between the prediction and the model (epistemic uncertainty).

    :math:`I = H(\\bar p) - \\frac1S \\sum_m H(p_m)` with :math:`\\bar p = \\frac1S \\sum_m p_m`,
    computed in log space as the equal quantity :math:`\\frac1S \\sum_m \\mathrm{KL}(p_m \\|
    \\bar p)`, with :math:`\\log \\bar p` from ``logsumexp``, so no two large entropies are
    subtracted. Rounding can make it a tiny negative number; it is clamped at 0.

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``.

    Returns:
      Mutual information per datum in nats, shape ``(num_data,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]]))
      >>> round(float(mutual_information(members)[0]), 4)
      0.6931
    """
    return _mutual_information(_validate_member_log_probs(member_log_probs))


def disagreement_per_datum(member_log_probs: ArrayLike) -> jax.Array:
    """Fraction of member pairs whose most probable classes differ, per datum.

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``, with at least two members.

    Returns:
      Fractions in ``[0, 1]``, shape ``(num_data,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[0.9, 0.1]], [[0.8, 0.2]], [[0.3, 0.7]]]))
      >>> round(float(disagreement_per_datum(members)[0]), 4)
      0.6667
    """
    members = _validate_member_log_probs(member_log_probs, min_members=2)
    return _disagreement_per_datum(members)


def disagreement(member_log_probs: ArrayLike) -> jax.Array:
    """Mean over member pairs of the fraction of inputs on which their predictions differ.

    Equals the data mean of :func:`disagreement_per_datum`.

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``, with at least two members.

    Returns:
      A scalar in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.1, 0.9]]]))
      >>> float(disagreement(members))
      0.5
    """
    return jnp.mean(disagreement_per_datum(member_log_probs))


# --------------------------------------------------------------------------------------------
# Out-of-distribution and misclassification detection
# --------------------------------------------------------------------------------------------


def ood_scores(
    log_probs: ArrayLike,
    *,
    score: str = "max_prob",
    member_log_probs: ArrayLike | None = None,
) -> jax.Array:
    """Per-datum OOD scores; higher means more likely out-of-distribution.

    * ``"max_prob"``: minus the maximum predictive probability (Hendrycks & Gimpel 2017).
    * ``"entropy"``: predictive entropy of ``log_probs``.
    * ``"mutual_information"``: :func:`mutual_information` of ``member_log_probs`` (required).

    Args:
      log_probs: Log-probabilities of the averaged predictive, shape ``(num_data,
        num_classes)``.
      score: ``"max_prob"``, ``"entropy"`` or ``"mutual_information"``.
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``; needed for ``"mutual_information"``.

    Returns:
      Scores, shape ``(num_data,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.5, 0.5]]))
      >>> [round(float(value), 4) for value in ood_scores(log_probs)]
      [-0.9, -0.5]
    """
    _check_choice(score, "score", _OOD_SCORES)
    log_probs = _validate_log_probs(log_probs)
    members = None
    if member_log_probs is not None:
        members = _validate_members_match(member_log_probs, log_probs, "member_log_probs")
    elif score == "mutual_information":
        raise ValueError('score="mutual_information" needs member_log_probs.')
    return _ood_scores(log_probs, members, score)


def auroc(scores_negative: ArrayLike, scores_positive: ArrayLike) -> jax.Array:
    """Area under the ROC curve, exact and rank-based.

    :math:`P(s^+ > s^-) + \\tfrac12 P(s^+ = s^-)` over all (negative, positive) pairs, the
    Mann-Whitney statistic; equal to ``sklearn.metrics.roc_auc_score`` with ties.

    Args:
      scores_negative: Scores of the negatives (e.g. in-distribution), shape ``(n,)``.
      scores_positive: Scores of the positives (e.g. OOD), shape ``(m,)``.

    Returns:
      A scalar in ``[0, 1]``; 1 when every positive scores above every negative.

    Example:
      >>> import jax.numpy as jnp
      >>> float(auroc(jnp.array([0.1, 0.4]), jnp.array([0.4, 0.9])))
      0.875
    """
    scores_negative = _validate_scores(scores_negative, "scores_negative")
    scores_positive = _validate_scores(scores_positive, "scores_positive")
    dtype = jnp.promote_types(scores_negative.dtype, scores_positive.dtype)
    table = _detection_table(scores_negative.astype(dtype), scores_positive.astype(dtype), 0.95)
    return table["auroc"]


def aupr(scores_negative: ArrayLike, scores_positive: ArrayLike) -> jax.Array:
    """Average precision with the positives (e.g. OOD) as the positive class.

    :math:`\\mathrm{AP} = \\sum_t (R_t - R_{t-1}) P_t` over the distinct score thresholds
    ``score >= t``, without interpolation; equivalently the mean over positives of the precision
    at the threshold equal to their own score. Equal to
    ``sklearn.metrics.average_precision_score`` with ties.

    Args:
      scores_negative: Scores of the negatives, shape ``(n,)``.
      scores_positive: Scores of the positives, shape ``(m,)``.

    Returns:
      A scalar in ``(0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(aupr(jnp.array([0.1, 0.8]), jnp.array([0.5, 0.9]))), 4)
      0.8333
    """
    scores_negative = _validate_scores(scores_negative, "scores_negative")
    scores_positive = _validate_scores(scores_positive, "scores_positive")
    dtype = jnp.promote_types(scores_negative.dtype, scores_positive.dtype)
    table = _detection_table(scores_negative.astype(dtype), scores_positive.astype(dtype), 0.95)
    return table["aupr"]


def fpr_at_tpr(
    scores_negative: ArrayLike, scores_positive: ArrayLike, *, tpr: float = 0.95
) -> jax.Array:
    """False-positive rate at the first threshold whose true-positive rate reaches ``tpr``.

    With thresholds ``score >= t``, ``t`` is the largest value with
    ``TPR(t) >= tpr``: the ``k``-th largest positive score, ``k = ceil(tpr * m)``. The result
    is the fraction of negatives scoring ``>= t``, the smallest FPR attainable at that TPR
    (no interpolation). ``tpr=0.95`` gives FPR95.

    Args:
      scores_negative: Scores of the negatives (e.g. in-distribution), shape ``(n,)``.
      scores_positive: Scores of the positives (e.g. OOD), shape ``(m,)``.
      tpr: Target true-positive rate in ``(0, 1]``.

    Returns:
      A scalar in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> float(fpr_at_tpr(jnp.array([0.0, 0.5, 0.7, 0.9]), jnp.array([0.6, 0.8]), tpr=1.0))
      0.5
    """
    if isinstance(tpr, bool) or not isinstance(tpr, int | float | np.floating):
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}.")
    if not 0.0 < tpr <= 1.0:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}.")
    scores_negative = _validate_scores(scores_negative, "scores_negative")
    scores_positive = _validate_scores(scores_positive, "scores_positive")
    dtype = jnp.promote_types(scores_negative.dtype, scores_positive.dtype)
    negative, positive = scores_negative.astype(dtype), scores_positive.astype(dtype)
    return _detection_table(negative, positive, float(tpr))["fpr"]


def ood_metrics(
    id_log_probs: ArrayLike,
    ood_log_probs: ArrayLike,
    *,
    score: str = "max_prob",
    id_member_log_probs: ArrayLike | None = None,
    ood_member_log_probs: ArrayLike | None = None,
) -> dict[str, jax.Array]:
    """OOD-detection metrics with OOD as the positive class.

    Args:
      id_log_probs: In-distribution log-probabilities, shape ``(n, num_classes)``.
      ood_log_probs: Out-of-distribution log-probabilities, shape ``(m, num_classes)``.
      score: See :func:`ood_scores`.
      id_member_log_probs: Member log-probabilities on the ID data, ``(S, n, num_classes)``;
        needed for ``score="mutual_information"``.
      ood_member_log_probs: Member log-probabilities on the OOD data, ``(S, m, num_classes)``.

    Returns:
      ``{"auroc": ..., "aupr": ..., "fpr95": ...}`` of scalars.

    Example:
      >>> import jax.numpy as jnp
      >>> id_log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.8, 0.2]]))
      >>> ood_log_probs = jnp.log(jnp.array([[0.5, 0.5], [0.6, 0.4]]))
      >>> float(ood_metrics(id_log_probs, ood_log_probs)["auroc"])
      1.0
    """
    id_log_probs = _validate_log_probs(id_log_probs, "id_log_probs")
    ood_log_probs = _validate_log_probs(ood_log_probs, "ood_log_probs")
    if id_log_probs.shape[1] != ood_log_probs.shape[1]:
        raise ValueError(
            "id_log_probs and ood_log_probs must have the same number of classes, got "
            f"{id_log_probs.shape[1]} and {ood_log_probs.shape[1]}."
        )
    negative = ood_scores(id_log_probs, score=score, member_log_probs=id_member_log_probs)
    positive = ood_scores(ood_log_probs, score=score, member_log_probs=ood_member_log_probs)
    table = _detection_table(negative, positive, 0.95)
    return {"auroc": table["auroc"], "aupr": table["aupr"], "fpr95": table["fpr"]}


def misclassification_auroc(log_probs: ArrayLike, labels: ArrayLike) -> jax.Array:
    """AUROC of detecting misclassified inputs by low maximum probability.

    Misclassified data are the positives and the score is minus the maximum probability, so
    this equals the AUROC of separating correct from wrong predictions by confidence. Ties
    count 1/2. Under ``jax.jit`` a batch with no correct or no wrong prediction gives NaN; an
    eager call raises instead.

    Args:
      log_probs: Log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.

    Returns:
      A scalar in ``[0, 1]``.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]]))
      >>> float(misclassification_auroc(log_probs, jnp.array([0, 1, 0])))
      1.0
    """
    log_probs, labels = _validate_classification(log_probs, labels)
    if _is_concrete(log_probs, labels):
        num_correct = int(np.sum(np.argmax(_host(log_probs), axis=-1) == np.asarray(labels)))
        if num_correct in (0, labels.shape[0]):
            raise ValueError(
                "misclassification_auroc needs at least one correct and one misclassified "
                f"prediction, got {num_correct} correct out of {labels.shape[0]}."
            )
    return _misclassification_auroc(log_probs, labels)


# --------------------------------------------------------------------------------------------
# Regression
# --------------------------------------------------------------------------------------------


def gaussian_nll(mean: ArrayLike, variance: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Mean Gaussian negative log-likelihood of the targets.

    Per datum :math:`\\sum_d \\tfrac12 [\\log 2\\pi + \\log \\sigma^2_d + (y_d - \\mu_d)^2 /
    \\sigma^2_d]`, summed over any trailing output axes (independent outputs) and averaged over
    the leading data axis.

    Args:
      mean: Predictive means, shape ``(num_data, ...)``.
      variance: Predictive variances, positive, broadcastable to ``mean`` (a scalar gives a
        homoscedastic model).
      targets: Targets, the shape of ``mean``.

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(gaussian_nll(jnp.zeros(2), jnp.ones(2), jnp.zeros(2))), 4)
      0.9189
    """
    mean, targets = _validate_regression(mean, targets)
    variance = _float_array(variance, "variance")
    try:
        broadcast_shape = jnp.broadcast_shapes(variance.shape, mean.shape)
    except ValueError:
        broadcast_shape = None
    if broadcast_shape != mean.shape:
        raise ValueError(
            f"variance of shape {tuple(variance.shape)} does not broadcast to the shape of "
            f"mean {tuple(mean.shape)}."
        )
    if _is_concrete(variance) and not (_host(variance) > 0).all():
        raise ValueError("variance must be positive (and not NaN) everywhere.")
    return _gaussian_nll(mean, variance, targets)


@jax.jit
def _gaussian_nll(mean: jax.Array, variance: jax.Array, targets: jax.Array) -> jax.Array:
    elementwise = 0.5 * (
        math.log(2 * math.pi) + jnp.log(variance) + (targets - mean) ** 2 / variance
    )
    elementwise = jnp.broadcast_to(elementwise, mean.shape)
    return jnp.mean(jnp.sum(elementwise.reshape(mean.shape[0], -1), axis=-1))


@jax.jit
def _rmse(mean: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean((mean - targets) ** 2))


def rmse(mean: ArrayLike, targets: ArrayLike) -> jax.Array:
    """Root mean squared error over all entries, :math:`\\sqrt{\\mathrm{mean}((\\mu - y)^2)}`.

    Args:
      mean: Predictions, shape ``(num_data, ...)``.
      targets: Targets, the same shape.

    Returns:
      A non-negative scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(rmse(jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0]))), 4)
      3.5355
    """
    return _rmse(*_validate_regression(mean, targets))


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def summary(
    log_probs: ArrayLike,
    labels: ArrayLike,
    *,
    num_bins: int = 15,
    ood_log_probs: ArrayLike | None = None,
    member_log_probs: ArrayLike | None = None,
) -> dict[str, float]:
    """The standard table of a Bayesian model average, as Python floats.

    Keys: ``accuracy``, ``nll``, ``ece`` (equal-width), ``mce`` (equal-width), ``ace``
    (equal-mass), ``brier`` (multiclass), all with ``num_bins`` bins; with ``ood_log_probs``
    also ``ood_auroc``, ``ood_aupr`` and ``ood_fpr95`` (score ``"max_prob"``, OOD positive);
    with ``member_log_probs`` also ``mutual_information`` (mean over the ID data, nats).

    Args:
      log_probs: In-distribution log-probabilities, shape ``(num_data, num_classes)``.
      labels: Integer labels, shape ``(num_data,)``.
      num_bins: Number of bins for ECE, MCE and ACE.
      ood_log_probs: Optional OOD log-probabilities, shape ``(num_ood, num_classes)``.
      member_log_probs: Optional member log-probabilities on the ID data,
        shape ``(num_members, num_data, num_classes)``.

    Returns:
      A dict from metric name to float.

    Example:
      >>> import jax.numpy as jnp
      >>> log_probs = jnp.log(jnp.array([[0.75, 0.25], [0.5, 0.5]]))
      >>> summary(log_probs, jnp.array([0, 1]), num_bins=4)["accuracy"]
      0.5
    """
    _check_num_bins(num_bins)
    log_probs, labels = _validate_classification(log_probs, labels)
    table = _classification_table(log_probs, labels, num_bins)
    results = {
        "accuracy": table["accuracy"],
        "nll": table["nll"],
        "ece": table["equal_width/l1"],
        "mce": table["equal_width/max"],
        "ace": table["equal_mass/l1"],
        "brier": table["brier"],
    }
    if ood_log_probs is not None:
        detection = ood_metrics(log_probs, ood_log_probs, score="max_prob")
        results.update({f"ood_{name}": value for name, value in detection.items()})
    if member_log_probs is not None:
        members = _validate_members_match(member_log_probs, log_probs, "member_log_probs")
        results["mutual_information"] = jnp.mean(_mutual_information(members))
    return {name: float(value) for name, value in results.items()}
