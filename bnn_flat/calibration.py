r"""Temperature scaling (Guo et al. 2017) for single models and BMA ensembles.

A temperature :math:`T > 0` rescales logits, :math:`p_T(y \mid x) = \operatorname{softmax}(l(x)
/ T)`, and is fitted on held-out data by minimising the mean negative log-likelihood

.. math:: f(\beta) = \frac1N \sum_i \Big(\operatorname{logsumexp}_c(\beta\, l_{ic})
          - \beta\, l_{i y_i}\Big), \qquad \beta = 1/T,

which is **convex in** :math:`\beta`, with

.. math:: f'(\beta) = \frac1N\sum_i \big(\mathbb{E}_{p_\beta}[l_i] - l_{i y_i}\big), \qquad
          f''(\beta) = \frac1N\sum_i \operatorname{Var}_{p_\beta}[l_i] \ge 0.

:func:`fit_temperature` finds the root of :math:`f'` by safeguarded Newton steps on
:math:`\beta` inside a bracket :math:`[1/T_{\max}, 1/T_{\min}]`: a Newton step that leaves the
current bracket (or meets :math:`f'' = 0`) is replaced by bisection, and the bracket shrinks
around the root at every step, so it converges for any data (quadratically near the root).
When :math:`f'` does not change sign in the bracket, the minimiser lies outside it and the
nearest bound is returned: :math:`T_{\min}` for separable data (the NLL keeps decreasing as
:math:`T \to 0`), :math:`T_{\max}` for logits no better than uniform.

Two conventions exist for a BMA ensemble with member logits :math:`l_s`
(:func:`temperature_scaled_log_probs`):

* ``"probabilities"`` (this library's default, consistent with :mod:`bnn_flat.bma`):
  :math:`\log \frac1S \sum_s \operatorname{softmax}(l_s / T)`;
* ``"mean_logits"`` (SA-BMA's released code): :math:`\log\operatorname{softmax}(\bar l / T)`,
  :math:`\bar l = \frac1S\sum_s l_s`. SA-BMA fits :math:`T` on the validation logits of a
  *single* posterior sample and applies it to the mean of the test logits of 30 samples
  (algorithms.md, pitfall 9). Report calibrated and uncalibrated results separately.

References:
  Guo, Pleiss, Sun, Weinberger. On Calibration of Modern Neural Networks. ICML 2017.
  Lim et al. Flat Posterior Does Matter For Bayesian Transfer Learning. arXiv 2406.15664.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "CONVENTIONS",
    "fit_temperature",
    "scale_logits",
    "temperature_scaled_log_probs",
    "temperature_nll",
]

CONVENTIONS = ("probabilities", "mean_logits")


def fit_temperature(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    min_temperature: float = 1e-2,
    max_temperature: float = 1e2,
    initial_temperature: float = 1.0,
    num_iterations: int = 50,
) -> jax.Array:
    r"""The temperature :math:`T` minimising the NLL of ``softmax(logits / T)``.

    Safeguarded Newton on :math:`\beta = 1/T` (see the module docstring), ``num_iterations``
    steps of a compiled ``fori_loop``; 50 steps reach float32 precision in practice (each
    step at least halves the bracket when Newton is rejected).

    Args:
      logits: ``(N, C)`` validation logits (``N >= 1``, ``C >= 2``), finite.
      labels: ``(N,)`` integer labels in ``[0, C)``.
      min_temperature: lower bound :math:`T_{\min} > 0` of the search.
      max_temperature: upper bound :math:`T_{\max} > T_{\min}`.
      initial_temperature: starting point (clipped into the bounds).
      num_iterations: number of safeguarded Newton steps (>= 1).

    Returns:
      A positive float32 scalar :math:`T`.

    Raises:
      ValueError: on wrong shapes or dtypes, empty arrays, non-finite logits, labels out of
        range, or invalid bounds.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> true_logits = 2.0 * jax.random.normal(jax.random.key(0), (4000, 5))
      >>> labels = jax.random.categorical(jax.random.key(1), true_logits)
      >>> temperature = fit_temperature(3.0 * true_logits, labels)  # 3x overconfident logits
      >>> 2.7 < float(temperature) < 3.3
      True
    """
    logits, labels = _validate(logits, labels)
    for name, value in (
        ("min_temperature", min_temperature),
        ("max_temperature", max_temperature),
        ("initial_temperature", initial_temperature),
    ):
        _check_positive(name, value)
    if not min_temperature < max_temperature:
        raise ValueError(
            f"min_temperature ({min_temperature}) must be below max_temperature "
            f"({max_temperature})."
        )
    if (
        isinstance(num_iterations, bool)
        or not isinstance(num_iterations, numbers.Integral)
        or num_iterations < 1
    ):
        raise ValueError(f"num_iterations must be an integer >= 1, got {num_iterations!r}.")
    beta = _fit_inverse_temperature(
        logits,
        labels,
        jnp.float32(1.0 / max_temperature),
        jnp.float32(1.0 / min_temperature),
        jnp.float32(1.0 / initial_temperature),
        int(num_iterations),
    )
    return 1.0 / beta


def temperature_nll(logits: ArrayLike, labels: ArrayLike, temperature: ArrayLike) -> jax.Array:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``.

    Args:
      logits: ``(N, C)`` logits.
      labels: ``(N,)`` integer labels.
      temperature: positive scalar.

    Returns:
      Scalar mean NLL (nats).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(temperature_nll(jnp.zeros((3, 4)), jnp.array([0, 1, 2]), 2.0)), 4)
      1.3863
    """
    logits, labels = _validate(logits, labels)
    log_probs = jax.nn.log_softmax(scale_logits(logits, temperature), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


def scale_logits(logits: ArrayLike, temperature: ArrayLike) -> jax.Array:
    """``logits / temperature``.

    Args:
      logits: any-shaped logits.
      temperature: positive scalar.

    Returns:
      The scaled logits (floating).

    Raises:
      ValueError: if ``temperature`` is not a scalar, or (when concrete) not finite and > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> scale_logits(jnp.array([2.0, 4.0]), 2.0)
      Array([1., 2.], dtype=float32)
    """
    temperature = _check_temperature(temperature)
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        logits = logits.astype(jnp.float32)
    return logits / temperature.astype(logits.dtype)


def temperature_scaled_log_probs(
    member_logits: ArrayLike,
    temperature: ArrayLike = 1.0,
    *,
    convention: str = "probabilities",
) -> jax.Array:
    r"""Log-probabilities of a temperature-scaled BMA of ``S`` members.

    * ``"probabilities"``: :math:`\log \frac1S \sum_s \operatorname{softmax}(l_s/T)`
      (``logsumexp`` over members minus :math:`\log S`, as :func:`bnn_flat.bma.predict`);
    * ``"mean_logits"``: :math:`\log\operatorname{softmax}\big(\frac1S\sum_s l_s / T\big)`
      (SA-BMA's released code).

    With ``S = 1`` both are :math:`\log\operatorname{softmax}(l_1/T)`.

    Args:
      member_logits: ``(S, N, C)`` member logits.
      temperature: positive scalar :math:`T`.
      convention: ``"probabilities"`` or ``"mean_logits"``.

    Returns:
      ``(N, C)`` log-probabilities.

    Raises:
      ValueError: on a shape other than ``(S, N, C)`` with ``S, N >= 1``, ``C >= 2``, an
        unknown convention or an invalid temperature.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.array([[[0.0, 2.0]], [[0.0, 0.0]]])  # S = 2 members, N = 1, C = 2
      >>> import numpy as np
      >>> log_p = temperature_scaled_log_probs(members, 1.0)  # log of the mean of softmaxes
      >>> print(np.exp(np.asarray(log_p)).round(4))
      [[0.3096 0.6904]]
      >>> log_p = temperature_scaled_log_probs(members, 1.0, convention="mean_logits")
      >>> print(np.exp(np.asarray(log_p)).round(4))
      [[0.2689 0.7311]]
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}.")
    member_logits = jnp.asarray(member_logits)
    if member_logits.ndim != 3 or 0 in member_logits.shape[:2] or member_logits.shape[2] < 2:
        raise ValueError(
            "member_logits must have shape (S, N, C) with S, N >= 1 and C >= 2, got "
            f"{member_logits.shape}."
        )
    scaled = scale_logits(member_logits, temperature)
    if convention == "mean_logits":
        return jax.nn.log_softmax(jnp.mean(scaled, axis=0), axis=-1)
    member_log_probs = jax.nn.log_softmax(scaled, axis=-1)
    num_members = member_logits.shape[0]
    return jax.scipy.special.logsumexp(member_log_probs, axis=0) - math.log(num_members)


# Private helpers -------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=5)
def _fit_inverse_temperature(
    logits: jax.Array,
    labels: jax.Array,
    low: jax.Array,
    high: jax.Array,
    start: jax.Array,
    num_iterations: int,
) -> jax.Array:
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    label_logits = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]

    def derivatives(beta):
        probs = jax.nn.softmax(beta * logits, axis=-1)
        expected = jnp.sum(probs * logits, axis=-1)
        second = jnp.sum(probs * jnp.square(logits - expected[:, None]), axis=-1)
        return jnp.mean(expected - label_logits), jnp.mean(second)

    def step(_, carry):
        low, high, beta = carry
        gradient, curvature = derivatives(beta)
        # f' is non-decreasing: a positive slope puts the root on the left.
        high = jnp.where(gradient > 0, beta, high)
        low = jnp.where(gradient > 0, low, beta)
        newton = beta - gradient / curvature
        accept = (curvature > 0) & jnp.isfinite(newton) & (newton > low) & (newton < high)
        beta = jnp.where(accept, newton, 0.5 * (low + high))
        return low, high, beta

    low_slope, _ = derivatives(low)
    high_slope, _ = derivatives(high)
    beta0 = jnp.clip(start, low, high)
    _, _, beta = jax.lax.fori_loop(0, num_iterations, step, (low, high, beta0))
    beta = jnp.where(low_slope >= 0, low, beta)  # minimiser at or beyond T_max
    beta = jnp.where(high_slope <= 0, high, beta)  # minimiser at or beyond T_min
    return beta.astype(jnp.float32)


def _validate(logits: ArrayLike, labels: ArrayLike) -> tuple[jax.Array, jax.Array]:
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {logits.shape}.")
    if logits.shape[0] == 0:
        raise ValueError("logits is empty (N = 0).")
    if logits.shape[1] < 2:
        raise ValueError(f"logits needs at least 2 classes, got shape {logits.shape}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"logits must be floating, got {logits.dtype}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match logits, got {labels.shape}."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}.")
    if _is_concrete(logits) and not np.isfinite(np.asarray(logits)).all():
        raise ValueError("logits contain NaN or infinite values.")
    if _is_concrete(labels):
        values = np.asarray(labels)
        if values.min() < 0 or values.max() >= logits.shape[1]:
            raise ValueError(
                f"labels must lie in [0, {logits.shape[1]}), got range "
                f"[{values.min()}, {values.max()}]."
            )
    return logits, labels


def _check_temperature(temperature: ArrayLike) -> jax.Array:
    temperature = jnp.asarray(temperature)
    if temperature.ndim != 0:
        raise ValueError(f"temperature must be a scalar, got shape {temperature.shape}.")
    if not jnp.issubdtype(temperature.dtype, jnp.floating):
        temperature = temperature.astype(jnp.float32)
    if _is_concrete(temperature):
        value = float(temperature)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be finite and > 0, got {value}.")
    return temperature


def _check_positive(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)
