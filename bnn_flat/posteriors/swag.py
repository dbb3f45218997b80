r"""SWAG: the Gaussian fitted to the iterates of SGD (or of any optax chain).

SWA-Gaussian (Maddox et al., 2019) runs an optimizer with a high constant or cyclical
learning rate and, from step ``start_step`` on, collects the iterate :math:`\theta_i` every
``collect_every`` steps. From :math:`n` collected iterates it keeps the running first and
second moments and the last :math:`K` deviations

.. math::
    \bar\theta_n = \frac{(n-1)\,\bar\theta_{n-1} + \theta_n}{n}, \qquad
    \overline{\theta^2}_n = \frac{(n-1)\,\overline{\theta^2}_{n-1} + \theta_n^2}{n}, \qquad
    D_{n \bmod K} = \theta_n - \bar\theta_n,

and approximates the posterior by

.. math::
    q(\theta) = \mathcal N\Big(\bar\theta,\;
        s\,\big(\operatorname{diag}(\sigma^2) + \tfrac{1}{K_e - 1} D^\top D\big)\Big),
    \qquad \sigma^2 = \max\big(\overline{\theta^2} - \bar\theta^2,\, v_{\min}\big),

with :math:`D` the :math:`K \times d` matrix of deviations, :math:`K_e = \min(n, K)` the
number of filled rows, :math:`s` the ``scale`` and :math:`v_{\min}` the ``var_clamp``. A
sample is

.. math:: \theta = \bar\theta + \sqrt{s}\,\Big(\sigma \odot z_1
          + \tfrac{1}{\sqrt{K_e - 1}} D^\top z_2\Big),
          \qquad z_1 \sim \mathcal N(0, I_d),\; z_2 \sim \mathcal N(0, I_K).

SWAG-Diag drops the :math:`D^\top z_2` term (``rank=0``, or ``diagonal_only=True`` to keep
collecting deviations but ignore them). SWA (Izmailov et al., 2018) is the mean
:math:`\bar\theta`, returned by :func:`swa_params`; the state's ``params`` field is the
optimizer's *current iterate*, not the SWA solution.

The flat version, F-SWAG (Nguyen et al., 2023), is this family with a sharpness-aware
transform in the chain: ``build(loss_fn, optax.chain(transforms.sam(0.05), optax.sgd(0.1,
momentum=0.9)), rank=20, start_step=..., collect_every=...)``.

Scale conventions (``scale`` multiplies the covariance, so the standard deviation is
multiplied by :math:`\sqrt{s}`):

* the SWAG paper and SA-BMA's own sampler use ``scale=0.5`` (our default);
* SA-BMA's SWAG baseline samples with ``scale=1``;
* F-BNN reports ``scale=0.1`` for SWAG and ``scale=0.2`` for SWAG-Diag;
* ``scale=0`` gives SWA (every sample is the mean; ``log_prob`` is then ``None``).

Differences from the reference PyTorch code:

* the low-rank denominator is :math:`\sqrt{K_e - 1}` with :math:`K_e = \min(n, K)` (the
  reference divides by :math:`\sqrt{K - 1}` even while fewer than :math:`K` deviations have
  been collected); with :math:`K_e \le 1` the denominator is 1 (the first deviation is
  always zero, because :math:`\bar\theta_1 = \theta_1`);
* :math:`D` is a preallocated ring buffer, so rows are stored in collection order modulo
  :math:`K`, not oldest first (the distribution does not depend on the row order);
* before the first collection the moments hold the initial parameters, so ``sample``
  returns the initial parameters instead of zeros; with :math:`n \le 1` the diagonal
  variance is exactly ``var_clamp``;
* ``log_prob`` is the exact density of the low-rank-plus-diagonal Gaussian (Woodbury
  identity and matrix determinant lemma on a :math:`K \times K` system).

BatchNorm statistics must be re-estimated for every sample (one pass over the training
data); see :func:`bnn_flat.posteriors.batchnorm.sample_with_batch_stats`.

References:
  Maddox, Izmailov, Garipov, Vetrov, Wilson. A Simple Baseline for Bayesian Uncertainty in
  Deep Learning. NeurIPS 2019.
  Izmailov, Podoprikhin, Garipov, Vetrov, Wilson. Averaging Weights Leads to Wider Optima
  and Better Generalization. UAI 2018.
  Nguyen, Tran, Ta, Le, Doan, Phung, Tran. Flat Seeking Bayesian Neural Networks.
  NeurIPS 2023.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bnn_flat._random import standard_normal
from bnn_flat.posteriors import point
from bnn_flat.posteriors._common import check_perturbed_dropout
from bnn_flat.types import Batch, Info, LossFn, ModelState, Params, Posterior, PRNGKey

__all__ = [
    "SWAGState",
    "build",
    "init",
    "update",
    "collect",
    "sample",
    "log_prob",
    "swa_params",
    "variance",
]


class SWAGState(NamedTuple):
    """State of the SWAG family.

    Attributes:
      params: the optimizer's current iterate (not the SWA mean; see :func:`swa_params`).
      model_state: BatchNorm statistics of the current iterate, or ``{}``.
      opt_state: optimizer state.
      step: number of updates done (int32 scalar).
      mean: running mean :math:`\\bar\\theta` of the collected iterates (the SWA solution).
      sq_mean: running mean of the squared collected iterates.
      deviations: ring buffer of the last ``K`` deviations :math:`\\theta_i - \\bar\\theta_i`,
        a pytree like ``params`` with a leading axis of size ``K`` (``0`` for SWAG-Diag).
      write_index: row of ``deviations`` written by the next collection (int32 scalar).
      num_collected: number :math:`n` of collected iterates (int32 scalar).
    """

    params: Params
    model_state: ModelState
    opt_state: optax.OptState
    step: jax.Array
    mean: Params
    sq_mean: Params
    deviations: Params
    write_index: jax.Array
    num_collected: jax.Array


def build(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    start_step: int,
    collect_every: int,
    rank: int = 20,
    scale: float = 0.5,
    var_clamp: float = 1e-30,
    diagonal_only: bool = False,
    perturbed_dropout: str = "fresh",
) -> Posterior:
    """Builds the SWAG family (SWAG-Diag with ``rank=0`` or ``diagonal_only=True``).

    The iterate after update number ``t`` is collected when ``t >= start_step`` and
    ``(t - start_step) % collect_every == 0``; for per-epoch collection as in the paper, use
    ``collect_every = steps_per_epoch`` and ``start_step = swa_start_epoch * steps_per_epoch``.

    Args:
      loss_fn: per-datum objective ``loss_fn(params, model_state, batch, key)``.
      optimizer: any optax chain (a sharpness-aware transform in it gives F-SWAG).
      start_step: first update whose iterate is collected (>= 0; 0 behaves like
        ``collect_every``, since the first iterate seen is that after update 1).
      collect_every: collection period in updates (>= 1).
      rank: number :math:`K` of deviations kept (0 gives SWAG-Diag and no buffer).
      scale: covariance multiplier used by ``sample`` and ``log_prob`` (see the module
        docstring for the conventions; 0 gives SWA).
      var_clamp: lower bound on the diagonal variance (> 0).
      diagonal_only: sample from the diagonal part only while still collecting deviations,
        so that SWAG and SWAG-Diag families built with the same ``rank`` share one state.
      perturbed_dropout: see :func:`bnn_flat.posteriors.point.build`.

    Returns:
      A :class:`bnn_flat.types.Posterior` over :class:`SWAGState`; ``log_prob`` is ``None``
      when ``scale == 0``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import objectives
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
      >>> loss_fn = objectives.classification_loss(apply, num_data=4)
      >>> family = build(loss_fn, optax.sgd(0.1), start_step=1, collect_every=1, rank=3)
      >>> state = family.init({"w": jnp.zeros((3, 2))}, {})
      >>> batch = {"inputs": jnp.ones((4, 3)), "labels": jnp.array([0, 1, 0, 0])}
      >>> for step in range(4):
      ...     state, info = family.update(jax.random.key(step), state, batch)
      >>> int(state.num_collected), state.deviations["w"].shape
      (4, (3, 3, 2))
      >>> family.sample(jax.random.key(0), state, 5)["w"].shape
      (5, 3, 2)
    """
    rank = _check_integer("rank", rank, minimum=0)
    start_step = _check_integer("start_step", start_step, minimum=0)
    collect_every = _check_integer("collect_every", collect_every, minimum=1)
    _check_scale_and_clamp(scale, var_clamp)
    if not isinstance(diagonal_only, bool):
        raise ValueError(f"diagonal_only must be a bool, got {diagonal_only!r}.")
    check_perturbed_dropout(perturbed_dropout)

    def init_fn(params: Params, model_state: ModelState | None = None) -> SWAGState:
        return init(params, model_state, optimizer, rank=rank)

    def update_fn(key: PRNGKey, state: SWAGState, batch: Batch) -> tuple[SWAGState, Info]:
        return update(
            key,
            state,
            batch,
            loss_fn,
            optimizer,
            start_step=start_step,
            collect_every=collect_every,
            perturbed_dropout=perturbed_dropout,
        )

    def sample_fn(key: PRNGKey, state: SWAGState, num_samples: int) -> Params:
        return sample(
            key,
            state,
            num_samples,
            scale=scale,
            var_clamp=var_clamp,
            diagonal_only=diagonal_only,
        )

    def log_prob_fn(state: SWAGState, params: Params) -> jax.Array:
        return log_prob(
            state, params, scale=scale, var_clamp=var_clamp, diagonal_only=diagonal_only
        )

    return Posterior(
        init=init_fn,
        update=update_fn,
        sample=sample_fn,
        log_prob=log_prob_fn if scale > 0 else None,
    )


def init(
    params: Params,
    model_state: ModelState | None,
    optimizer: optax.GradientTransformation,
    *,
    rank: int = 20,
) -> SWAGState:
    """Initial state: no iterate collected, moments set to the initial parameters.

    Args:
      params: initial parameters.
      model_state: BatchNorm statistics or ``None``/``{}``.
      optimizer: the optax chain (its state is initialised here).
      rank: size :math:`K` of the deviation buffer.

    Returns:
      A :class:`SWAGState` with ``num_collected == 0`` and a zero deviation buffer.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.ones(2)}, None, optax.sgd(0.1), rank=4)
      >>> state.deviations["w"].shape, int(state.num_collected)
      ((4, 2), 0)
    """
    rank = _check_integer("rank", rank, minimum=0)
    params = jax.tree.map(jnp.asarray, params)
    return SWAGState(
        params=params,
        model_state={} if model_state is None else model_state,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        mean=params,
        sq_mean=jax.tree.map(jnp.square, params),
        deviations=jax.tree.map(lambda x: jnp.zeros((rank, *x.shape), x.dtype), params),
        write_index=jnp.zeros((), jnp.int32),
        num_collected=jnp.zeros((), jnp.int32),
    )


def update(
    key: PRNGKey,
    state: SWAGState,
    batch: Batch,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    start_step: int,
    collect_every: int,
    perturbed_dropout: str = "fresh",
) -> tuple[SWAGState, Info]:
    """One optimizer step (as :func:`bnn_flat.posteriors.point.update`), then maybe collect.

    The new iterate is collected (:func:`collect`, under ``lax.cond``) when the new step
    count ``t`` satisfies ``t >= start_step`` and ``(t - start_step) % collect_every == 0``.

    Returns:
      ``(new_state, info)``.
    """
    point_state = point.PointState(
        params=state.params,
        model_state=state.model_state,
        opt_state=state.opt_state,
        step=state.step,
    )
    point_state, info = point.update(
        key, point_state, batch, loss_fn, optimizer, perturbed_dropout=perturbed_dropout
    )
    state = state._replace(
        params=point_state.params,
        model_state=point_state.model_state,
        opt_state=point_state.opt_state,
        step=point_state.step,
    )
    due = (state.step >= start_step) & ((state.step - start_step) % collect_every == 0)
    state = jax.lax.cond(due, lambda s: collect(s, s.params), lambda s: s, state)
    return state, info


def collect(state: SWAGState, params: Params) -> SWAGState:
    r"""Adds one iterate to the SWAG moments and the deviation ring buffer.

    .. math:: \bar\theta \leftarrow \frac{n\bar\theta + \theta}{n+1}, \quad
              \overline{\theta^2} \leftarrow \frac{n\overline{\theta^2} + \theta^2}{n+1},
              \quad D_{w} \leftarrow \theta - \bar\theta, \quad w \leftarrow (w+1) \bmod K.

    Only the moment fields change; the optimizer fields (``params``, ``opt_state``, ...)
    are left as they are, so this also collects snapshots made elsewhere (checkpoints).

    Args:
      state: a SWAG state.
      params: the iterate to collect (same structure as ``state.mean``).

    Returns:
      The state with ``mean``, ``sq_mean``, ``deviations``, ``write_index`` and
      ``num_collected`` updated.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), rank=2)
      >>> state = collect(state, {"w": jnp.array([1.0, 2.0])})
      >>> state = collect(state, {"w": jnp.array([3.0, 2.0])})
      >>> state.mean["w"], int(state.num_collected)
      (Array([2., 2.], dtype=float32), 2)
    """
    _check_same_shapes(state.mean, params, "params")
    count = state.num_collected.astype(jnp.float32)
    old_weight = count / (count + 1.0)
    new_weight = 1.0 / (count + 1.0)

    def moment(old, new):
        return (old * old_weight.astype(old.dtype) + new * new_weight.astype(old.dtype)).astype(
            old.dtype
        )

    mean = jax.tree.map(moment, state.mean, params)
    sq_mean = jax.tree.map(lambda old, new: moment(old, jnp.square(new)), state.sq_mean, params)
    buffer_rank = _rank(state)
    if buffer_rank == 0:
        deviations, write_index = state.deviations, state.write_index
    else:
        deviations = jax.tree.map(
            lambda buffer, x, m: buffer.at[state.write_index].set((x - m).astype(buffer.dtype)),
            state.deviations,
            params,
            mean,
        )
        write_index = (state.write_index + 1) % buffer_rank
    return state._replace(
        mean=mean,
        sq_mean=sq_mean,
        deviations=deviations,
        write_index=write_index.astype(jnp.int32),
        num_collected=state.num_collected + 1,
    )


def sample(
    key: PRNGKey,
    state: SWAGState,
    num_samples: int,
    *,
    scale: float = 0.5,
    var_clamp: float = 1e-30,
    diagonal_only: bool = False,
) -> Params:
    r"""Draws from the SWAG Gaussian (see the module docstring for the formula).

    Only the filled rows of the deviation buffer contribute (:math:`K_e = \min(n, K)`).
    Use this directly to sample one state at several scales without rebuilding the family.

    Args:
      key: PRNG key.
      state: a SWAG state.
      num_samples: number of samples (static).
      scale: covariance multiplier :math:`s` (>= 0).
      var_clamp: lower bound on the diagonal variance.
      diagonal_only: ignore the deviations (SWAG-Diag).

    Returns:
      Parameters stacked on a leading axis of size ``num_samples``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), rank=2)
      >>> for value in (1.0, 3.0, 2.0):
      ...     state = collect(state, {"w": jnp.full(2, value)})
      >>> sample(jax.random.key(0), state, 4, scale=0.5)["w"].shape
      (4, 2)
    """
    num_samples = _check_integer("num_samples", num_samples, minimum=1)
    _check_scale_and_clamp(scale, var_clamp)
    means, treedef = jax.tree.flatten(state.mean)
    sq_means = treedef.flatten_up_to(state.sq_mean)
    deviations = treedef.flatten_up_to(state.deviations)
    buffer_rank = _rank(state)
    low_rank = buffer_rank > 0 and not diagonal_only
    diagonal_key, low_rank_key = jax.random.split(key)
    # One draw for all leaves (a draw per leaf would compile one generator per leaf).
    sizes = [mean.size for mean in means]
    z1 = standard_normal(diagonal_key, (num_samples, sum(sizes)))
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    if low_rank:
        row_mask, denominator = _filled_rows(state)
        z2 = standard_normal(low_rank_key, (num_samples, buffer_rank)) * row_mask
    root_scale = math.sqrt(scale)
    samples = []
    for offset, mean, sq_mean, deviation in zip(offsets, means, sq_means, deviations, strict=True):
        std = jnp.sqrt(_variance(mean, sq_mean, state.num_collected, var_clamp))
        leaf_z1 = z1[:, offset : offset + mean.size].reshape(num_samples, *mean.shape)
        noise = std * leaf_z1.astype(mean.dtype)
        if low_rank:
            noise = noise + jnp.tensordot(z2.astype(mean.dtype), deviation, axes=1) / denominator
        samples.append(mean + root_scale * noise)
    return treedef.unflatten(samples)


def log_prob(
    state: SWAGState,
    params: Params,
    *,
    scale: float = 0.5,
    var_clamp: float = 1e-30,
    diagonal_only: bool = False,
) -> jax.Array:
    r"""Exact log-density of the SWAG Gaussian at ``params``.

    With :math:`A = s\operatorname{diag}(\sigma^2)`, :math:`U = \sqrt{s/(K_e-1)}\,D^\top`
    (filled rows only), :math:`r = \theta - \bar\theta` and
    :math:`M = I_K + U^\top A^{-1} U`:

    .. math:: \log q(\theta) = -\tfrac12\Big(d\log 2\pi + \log\det A + \log\det M
              + r^\top A^{-1} r - (U^\top A^{-1} r)^\top M^{-1} (U^\top A^{-1} r)\Big)

    (Woodbury identity and matrix determinant lemma; only a :math:`K \times K` Cholesky).

    Args:
      state: a SWAG state.
      params: one parameter pytree (no sample axis).
      scale: covariance multiplier :math:`s` (> 0).
      var_clamp: lower bound on the diagonal variance.
      diagonal_only: ignore the deviations (SWAG-Diag).

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(1)}, None, optax.sgd(0.1), rank=0)
      >>> for value in (-1.0, 1.0):
      ...     state = collect(state, {"w": jnp.array([value])})
      >>> round(float(log_prob(state, {"w": jnp.zeros(1)}, scale=1.0)), 4)  # N(0, 1) at 0
      -0.9189
    """
    _check_scale_and_clamp(scale, var_clamp)
    if scale == 0:
        raise ValueError("log_prob needs scale > 0 (scale 0 is a point mass, SWA).")
    _check_same_shapes(state.mean, params, "params")
    means, treedef = jax.tree.flatten(state.mean)
    sq_means = treedef.flatten_up_to(state.sq_mean)
    deviations = treedef.flatten_up_to(state.deviations)
    values = treedef.flatten_up_to(params)
    buffer_rank = _rank(state)
    low_rank = buffer_rank > 0 and not diagonal_only
    if low_rank:
        row_mask, denominator = _filled_rows(state)
    dimension = 0
    log_det = jnp.zeros((), jnp.float32)
    quadratic = jnp.zeros((), jnp.float32)
    projected = jnp.zeros((buffer_rank,), jnp.float32)  # U^T A^{-1} r
    gram = jnp.zeros((buffer_rank, buffer_rank), jnp.float32)  # U^T A^{-1} U
    for mean, sq_mean, deviation, value in zip(means, sq_means, deviations, values, strict=True):
        dimension += mean.size
        diagonal = (scale * _variance(mean, sq_mean, state.num_collected, var_clamp)).astype(
            jnp.float32
        )
        residual = (value - mean).astype(jnp.float32)
        log_det = log_det + jnp.sum(jnp.log(diagonal))
        quadratic = quadratic + jnp.sum(jnp.square(residual) / diagonal)
        if low_rank:
            factor = (
                deviation.astype(jnp.float32)
                * row_mask.reshape((-1,) + (1,) * mean.ndim)
                * (math.sqrt(scale) / denominator)
            )
            weighted = factor / diagonal
            projected = projected + jnp.tensordot(weighted, residual, axes=mean.ndim)
            axes = (tuple(range(1, mean.ndim + 1)), tuple(range(1, mean.ndim + 1)))
            gram = gram + jnp.tensordot(weighted, factor, axes=axes)
    if low_rank:
        cholesky = jnp.linalg.cholesky(jnp.eye(buffer_rank, dtype=jnp.float32) + gram)
        log_det = log_det + 2.0 * jnp.sum(jnp.log(jnp.diagonal(cholesky)))
        solved = jax.scipy.linalg.solve_triangular(cholesky, projected, lower=True)
        quadratic = quadratic - jnp.sum(jnp.square(solved))
    return -0.5 * (dimension * math.log(2.0 * math.pi) + log_det + quadratic)


def swa_params(state: SWAGState) -> Params:
    """The SWA solution: the mean of the collected iterates.

    Its BatchNorm statistics are not ``state.model_state`` (those belong to the current
    iterate); re-estimate them with
    :func:`bnn_flat.posteriors.batchnorm.reestimate_batch_stats`.

    Args:
      state: a SWAG state.

    Returns:
      The mean parameters (the initial parameters before any collection).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(1)}, None, optax.sgd(0.1), rank=0)
      >>> state = collect(collect(state, {"w": jnp.ones(1)}), {"w": 3 * jnp.ones(1)})
      >>> swa_params(state)["w"]
      Array([2.], dtype=float32)
    """
    return state.mean


def variance(state: SWAGState, var_clamp: float = 1e-30) -> Params:
    r"""The diagonal variance :math:`\sigma^2 = \max(\overline{\theta^2} - \bar\theta^2, v_{\min})`.

    Args:
      state: a SWAG state.
      var_clamp: lower bound :math:`v_{\min}` (> 0).

    Returns:
      A pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> state = init({"w": jnp.zeros(1)}, None, optax.sgd(0.1), rank=0)
      >>> state = collect(collect(state, {"w": jnp.ones(1)}), {"w": 3 * jnp.ones(1)})
      >>> variance(state)["w"]
      Array([1.], dtype=float32)
    """
    _check_scale_and_clamp(1.0, var_clamp)
    return jax.tree.map(
        lambda m, s: _variance(m, s, state.num_collected, var_clamp), state.mean, state.sq_mean
    )


def _rank(state: SWAGState) -> int:
    """Size :math:`K` of the deviation buffer (static: read from shapes)."""
    leaves = jax.tree.leaves(state.deviations)
    return leaves[0].shape[0] if leaves else 0


def _variance(
    mean: jax.Array, sq_mean: jax.Array, num_collected: jax.Array, var_clamp: float
) -> jax.Array:
    # With n <= 1 the variance is exactly zero; sq_mean - mean^2 would leave rounding
    # noise of order eps * mean^2 (XLA may fuse it into a multiply-add).
    clamp = jnp.asarray(var_clamp, mean.dtype)
    return jnp.where(num_collected > 1, jnp.maximum(sq_mean - jnp.square(mean), clamp), clamp)


def _filled_rows(state: SWAGState) -> tuple[jax.Array, jax.Array]:
    """Mask of the filled buffer rows and the denominator ``sqrt(max(K_e - 1, 1))``."""
    buffer_rank = _rank(state)
    row_mask = (jnp.arange(buffer_rank) < state.num_collected).astype(jnp.float32)
    filled = jnp.minimum(state.num_collected, buffer_rank)
    denominator = jnp.sqrt(jnp.maximum(filled - 1, 1).astype(jnp.float32))
    return row_mask, denominator


def _check_integer(name: str, value: int, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _check_scale_and_clamp(scale: float, var_clamp: float) -> None:
    if not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}.")
    if not isinstance(var_clamp, numbers.Real) or not math.isfinite(var_clamp) or var_clamp <= 0:
        raise ValueError(f"var_clamp must be a finite number > 0, got {var_clamp!r}.")


def _check_same_shapes(reference: Params, params: Params, name: str) -> None:
    reference_leaves, reference_tree = jax.tree.flatten(reference)
    leaves, tree = jax.tree.flatten(params)
    if tree != reference_tree:
        raise ValueError(
            f"{name} must have the structure of the SWAG parameters: expected {reference_tree}, "
            f"got {tree}."
        )
    for expected, got in zip(reference_leaves, leaves, strict=True):
        if jnp.shape(expected) != jnp.shape(got):
            raise ValueError(
                f"{name} has a leaf of shape {jnp.shape(got)} where the SWAG parameters have "
                f"{jnp.shape(expected)}."
            )
