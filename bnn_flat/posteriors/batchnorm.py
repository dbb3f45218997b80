r"""BatchNorm re-estimation for weight-space posterior samples (SWAG, VI, Laplace, ...).

A weight sample :math:`\theta_s` comes without BatchNorm statistics of its own: the running
statistics in the family state belong to the training iterate, and using them with other
weights degrades predictions badly. SWAG therefore recomputes, for every sample, the
statistics over one pass of the training data (``bn_update`` in the reference code, a
cumulative average with momentum :math:`b/(n+b)`). :func:`reestimate_batch_stats` does
that pass in one compiled program (``lax.scan`` over batches) and returns the *exact*
data-weighted average of the per-batch statistics

.. math:: \mu = \sum_j \frac{b_j}{N}\,\mu_j, \qquad
          v = \sum_j \frac{b_j}{N}\,\big(v_j + (\mu_j - \mu)^2\big)
          \quad\text{(``variance="pooled"``)},

where :math:`\mu_j, v_j` are the batch mean and (biased) batch variance of batch :math:`j`
of size :math:`b_j`. For the first BatchNorm layer these are exactly the mean and variance
of its inputs over the whole data set; deeper layers see inputs normalised with batch
statistics, as in the reference. ``variance="average"`` averages the batch variances
instead (:math:`v = \sum_j \tfrac{b_j}{N} v_j`, the reference ``bn_update`` behaviour).

How the per-batch statistics are read from an opaque model: every model-state leaf is
assumed to be a running average :math:`r \leftarrow m\,r + (1-m)\,t` of a batch statistic
:math:`t` (Flax ``BatchNorm``: ``mean`` and ``var``, :math:`m` = momentum). Running the model
in training mode from a zero state returns :math:`(1-m)\,t_j`; one extra pass from a
nonzero state measures :math:`m` per entry, so :math:`t_j` is recovered without knowing the
momentum (to float32 rounding amplified by :math:`1/(1-m)`: relative errors of about
:math:`10^{-6}` for :math:`m = 0.9`). Leaves that the training pass leaves unchanged
(:math:`m = 1`) and non-float leaves keep their input values. Pooled variances are used for
every ``var`` leaf that has a ``mean`` sibling of the same shape (the Flax layout); other
leaves are averaged.

:func:`sample_with_batch_stats` draws posterior samples and re-estimates the statistics of
each of them (``lax.map``, one sample at a time), returning ``(samples, model_states)`` for
:func:`bnn_flat.bma.predict` with :func:`bnn_flat.bma.model_predict_fn` and
``per_sample_state=True``.

References:
  Maddox, Izmailov, Garipov, Vetrov, Wilson. A Simple Baseline for Bayesian Uncertainty in
  Deep Learning. NeurIPS 2019 (``utils.bn_update``).
  Ioffe, Szegedy. Batch Normalization. ICML 2015.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnn_flat.types import ApplyFn, ModelState, Params, Posterior, PRNGKey

__all__ = ["VARIANCE_MODES", "reestimate_batch_stats", "sample_with_batch_stats"]

VARIANCE_MODES = ("pooled", "average")

# Entries whose measured retention 1 - m is below this are treated as not updated by the
# training pass (m = 1) and keep their input value.
_MIN_RETENTION = 1e-6


def reestimate_batch_stats(
    apply_fn: ApplyFn,
    params: Params,
    model_state: ModelState,
    inputs: jax.Array,
    *,
    batch_size: int,
    key: PRNGKey | None = None,
    variance: str = "pooled",
) -> ModelState:
    """BatchNorm statistics of ``params`` from one pass over ``inputs``, in one program.

    The inputs are split in data order into ``N // batch_size`` batches of ``batch_size``
    (scanned) and, if ``N`` is not a multiple, one last smaller batch; each batch is weighted
    by its size, so the result is exact for any ``N``. The compiled program is cached per
    ``apply_fn`` (pass the same function object to avoid recompiling), ``batch_size``,
    ``variance`` and input shape.

    Args:
      apply_fn: model in the bnn_flat contract (run with ``train=True``).
      params: the weights whose statistics are wanted.
      model_state: a model state of the right structure (its values only matter for leaves
        the training pass does not update); ``{}`` is returned unchanged.
      inputs: training inputs ``(N, ...)``.
      batch_size: examples per batch, in ``1..N``.
      key: dropout key for models with dropout (folded per batch); ``None`` otherwise.
      variance: ``"pooled"`` (exact full-data variance for the first BatchNorm layer) or
        ``"average"`` (mean of the batch variances, the reference SWAG behaviour).

    Returns:
      The re-estimated model state (same structure, shapes and dtypes).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> def apply(params, state, x, *, train, key):  # running mean of x @ w, momentum 0.9
      ...     h = x @ params["w"]
      ...     return h, {"mean": 0.9 * state["mean"] + 0.1 * h.mean(0)} if train else state
      >>> x = jnp.arange(10.0).reshape(5, 2)
      >>> state = reestimate_batch_stats(apply, {"w": jnp.ones((2, 1))}, {"mean": jnp.zeros(1)},
      ...                                x, batch_size=2)
      >>> round(float(state["mean"][0]), 4)  # mean of x @ w over all 5 rows (batches 2, 2, 1)
      9.0
    """
    if not jax.tree.leaves(model_state):
        return model_state
    _check_arguments(inputs, batch_size, variance)
    return _reestimate_jit(
        apply_fn, params, model_state, inputs, key, batch_size=int(batch_size), variance=variance
    )


def sample_with_batch_stats(
    key: PRNGKey,
    posterior: Posterior,
    state: Any,
    apply_fn: ApplyFn,
    inputs: jax.Array,
    *,
    num_samples: int,
    batch_size: int,
    variance: str = "pooled",
) -> tuple[Params, ModelState]:
    """Posterior samples with their own re-estimated BatchNorm statistics.

    Draws ``posterior.sample(key, state, num_samples)`` and runs
    :func:`reestimate_batch_stats` for each sample (``lax.map``, bounded memory; each
    sample gets its own dropout key), all in one compiled program.

    Args:
      key: PRNG key (split into the sampling key and the dropout keys).
      posterior: a family whose samples are parameters (SWAG, VI, Laplace, ensembles).
      state: the family's state; for an ensemble, the first member's model state is used
        as the structure template.
      apply_fn: model in the bnn_flat contract (static).
      inputs: training inputs ``(N, ...)`` for the statistics pass.
      num_samples: samples to draw (per member for ensembles).
      batch_size: examples per batch of the statistics pass.
      variance: see :func:`reestimate_batch_stats`.

    Returns:
      ``(samples, model_states)``, both stacked on a leading sample axis; pass the pair to
      ``bma.predict(bma.model_predict_fn(apply_fn, per_sample_state=True), pair, x)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bnn_flat import bma, objectives
      >>> from bnn_flat.posteriors import swag
      >>> def apply(params, state, x, *, train, key):
      ...     h = x @ params["w"]
      ...     if train:
      ...         return h, {"mean": 0.9 * state["mean"] + 0.1 * h.mean(0)}
      ...     return h - state["mean"], state
      >>> loss_fn = objectives.classification_loss(apply, num_data=8)
      >>> family = swag.build(loss_fn, optax.sgd(0.1), start_step=1, collect_every=1, rank=2)
      >>> state = family.init({"w": jnp.eye(2)}, {"mean": jnp.zeros(2)})
      >>> x = jax.random.normal(jax.random.key(0), (8, 2))
      >>> batch = {"inputs": x, "labels": jnp.zeros(8, jnp.int32)}
      >>> for step in range(3):
      ...     state, _ = family.update(jax.random.key(step), state, batch)
      >>> samples, states = sample_with_batch_stats(
      ...     jax.random.key(1), family, state, apply, x, num_samples=4, batch_size=4)
      >>> states["mean"].shape
      (4, 2)
      >>> predict_fn = bma.model_predict_fn(apply, per_sample_state=True)
      >>> bma.predict(predict_fn, (samples, states), x).shape
      (8, 2)
    """
    _check_arguments(inputs, batch_size, variance)
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or num_samples < 1
    ):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")
    return _sample_jit(
        key,
        posterior,
        state,
        apply_fn,
        inputs,
        num_samples=int(num_samples),
        batch_size=int(batch_size),
        variance=variance,
    )


@functools.partial(
    jax.jit, static_argnames=("posterior", "apply_fn", "num_samples", "batch_size", "variance")
)
def _sample_jit(
    key: PRNGKey,
    posterior: Posterior,
    state: Any,
    apply_fn: ApplyFn,
    inputs: jax.Array,
    *,
    num_samples: int,
    batch_size: int,
    variance: str,
) -> tuple[Params, ModelState]:
    from bnn_flat.posteriors import ensemble

    sample_key, dropout_key = jax.random.split(key)
    samples = posterior.sample(sample_key, state, num_samples)
    template = state.model_state
    if isinstance(state, ensemble.EnsembleState):
        template = jax.tree.map(lambda x: x[0], template)
    if not jax.tree.leaves(template):
        num = jax.tree.leaves(samples)[0].shape[0]
        return samples, jax.tree.map(lambda x: jnp.broadcast_to(x, (num, *x.shape)), template)
    num = jax.tree.leaves(samples)[0].shape[0]
    keys = jax.random.split(dropout_key, num)

    def one(sample_and_key):
        params, sample_key = sample_and_key
        return _reestimate(
            apply_fn,
            params,
            template,
            inputs,
            sample_key,
            batch_size=batch_size,
            variance=variance,
        )

    return samples, jax.lax.map(one, (samples, keys))


def _reestimate(
    apply_fn: ApplyFn,
    params: Params,
    model_state: ModelState,
    inputs: jax.Array,
    key: PRNGKey | None,
    *,
    batch_size: int,
    variance: str,
) -> ModelState:
    num_examples = inputs.shape[0]
    num_full = num_examples // batch_size
    remainder = num_examples - num_full * batch_size
    leaves, treedef = jax.tree.flatten(model_state)
    is_float = [jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in leaves]
    zero_state = treedef.unflatten(
        [jnp.zeros_like(x) if f else x for x, f in zip(leaves, is_float, strict=True)]
    )
    if key is None:
        keys = [None] * (num_full + 1)
        full_keys = None
    else:
        keys = jax.random.split(key, num_full + 1)
        full_keys = keys[:num_full]

    def raw_stats(state: ModelState, batch: jax.Array, batch_key: PRNGKey | None) -> list:
        _, new_state = apply_fn(params, state, batch, train=True, key=batch_key)
        return treedef.flatten_up_to(new_state)

    # Per-batch (1 - m) t_j from a zero state, full batches scanned in one loop.
    stacked = []
    weights = []
    if num_full:  # always true, since batch_size <= N
        full = inputs[: num_full * batch_size].reshape(num_full, batch_size, *inputs.shape[1:])

        def body(carry, xs):
            batch, batch_key = xs
            return carry, raw_stats(zero_state, batch, batch_key)

        _, scanned = jax.lax.scan(body, None, (full, full_keys))
        stacked.append(scanned)
        weights.append(jnp.full((num_full,), batch_size / num_examples, jnp.float32))
    if remainder:
        last = raw_stats(zero_state, inputs[num_full * batch_size :], keys[num_full])
        stacked.append([x[None] for x in last])
        weights.append(jnp.full((1,), remainder / num_examples, jnp.float32))
    per_batch = [jnp.concatenate(parts, axis=0) for parts in zip(*stacked, strict=True)]
    weights = jnp.concatenate(weights)

    # Momentum m per entry: from state c > 0 the pass returns m c + (1 - m) t_0.
    first = [x[0] for x in per_batch]
    probe = [
        (1.0 + jnp.abs(r)).astype(x.dtype) if f else x
        for r, x, f in zip(first, leaves, is_float, strict=True)
    ]
    probed = raw_stats(treedef.unflatten(probe), inputs[:batch_size], keys[0])
    retention = [
        (1.0 - (p - r) / c) if f else None
        for p, r, c, f in zip(probed, first, probe, is_float, strict=True)
    ]

    # Batch statistics t_j and their weighted average.
    batch_stats = [
        r / jnp.where(jnp.abs(q) < _MIN_RETENTION, 1.0, q)[None] if f else r
        for r, q, f in zip(per_batch, retention, is_float, strict=True)
    ]
    averaged = [
        jnp.tensordot(weights.astype(t.dtype), t, axes=1) if f else None
        for t, f in zip(batch_stats, is_float, strict=True)
    ]
    if variance == "pooled":
        for var_index, mean_index in _variance_pairs(model_state).items():
            if not (is_float[var_index] and is_float[mean_index]):
                continue
            means = batch_stats[mean_index]
            spread = jnp.square(means - averaged[mean_index][None])
            averaged[var_index] = jnp.tensordot(
                weights.astype(means.dtype), batch_stats[var_index] + spread, axes=1
            )
    result = []
    for index, leaf in enumerate(leaves):
        if not is_float[index]:
            result.append(leaf)
            continue
        updated = jnp.abs(retention[index]) >= _MIN_RETENTION
        result.append(jnp.where(updated, averaged[index], leaf).astype(leaf.dtype))
    return treedef.unflatten(result)


_reestimate_jit = jax.jit(_reestimate, static_argnames=("apply_fn", "batch_size", "variance"))


def _variance_pairs(model_state: ModelState) -> dict[int, int]:
    """Leaf index of every ``var`` leaf -> leaf index of its ``mean`` sibling (same shape)."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(model_state)
    index = {}
    for position, (path, leaf) in enumerate(with_paths):
        if path and isinstance(path[-1], jax.tree_util.DictKey):
            index[(jax.tree_util.keystr(path[:-1]), path[-1].key)] = (position, np.shape(leaf))
    pairs = {}
    for (parent, name), (position, shape) in index.items():
        mean = index.get((parent, "mean"))
        if name == "var" and mean is not None and mean[1] == shape:
            pairs[position] = mean[0]
    return pairs


def _check_arguments(inputs: jax.Array, batch_size: int, variance: str) -> None:
    if variance not in VARIANCE_MODES:
        raise ValueError(f"variance must be one of {VARIANCE_MODES}, got {variance!r}.")
    shape = np.shape(inputs)
    if len(shape) < 1 or shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch (N, ...), got shape {shape}.")
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or not 1 <= batch_size <= shape[0]
    ):
        raise ValueError(
            f"batch_size must be an integer in 1..{shape[0]} (the number of inputs), "
            f"got {batch_size!r}."
        )
    if not isinstance(inputs, jax.core.Tracer) and jnp.issubdtype(
        jnp.result_type(inputs), jnp.inexact
    ):
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(inputs)))):
            raise ValueError("inputs contain NaN or infinite values.")
