r"""Bayesian transfer learning: trainable subsets, frozen parts and Gaussian priors.

SA-BMA (Lim et al. 2024) fine-tunes a pretrained network with a diagonal-plus-low-rank
Gaussian posterior over a *subset* of its parameters (by default the normalisation layers and
the classifier) and keeps the rest frozen, either at the pretrained mean or re-drawn from a
SWAG fit of the pretrained backbone at every forward pass. The SWAG fit is also the prior
("Bayesian transfer learning", following "Pre-Train Your Loss", Shwartz-Ziv et al. 2022).
This module is the plumbing for that scheme, as pure functions over Flax-style nested-dict
parameters:

* naming and selecting parameters: :func:`path_names`, :func:`select`, :func:`norm_and_head`;
* splitting a tree: :func:`partition` and its exact inverse :func:`merge`;
* Gaussian priors in the variational form of :mod:`bnn_flat.posteriors.low_rank_vi`,
  ``{"mean", "raw_scale", "factor"}`` with :math:`\sigma = \operatorname{softplus}(s)` and
  :math:`\Sigma = \operatorname{diag}(\sigma^2) + W^\top W`: :func:`prior_from_swag`,
  :func:`prior_from_moments`, :func:`extend_prior` (new heads), :func:`partition_prior`;
* training and predicting with a frozen part: :func:`with_frozen`, :func:`with_frozen_apply`,
  :func:`complete_samples`; and :func:`init_low_rank_vi_from_prior`.

A typical run (SA-BMA's ``--tr_layer nl_ll`` with the frozen part sampled from the prior)::

    prior = transfer.prior_from_swag(swag_state, scale=0.5)        # pretrained backbone
    prior = transfer.extend_prior(prior, params, new_std=1e-5**0.5, replace="head")
    mask = transfer.select(params, "norm_and_head")
    prior_train, prior_frozen = transfer.partition_prior(prior, mask)
    _, frozen = transfer.partition(prior["mean"], mask)
    loss = transfer.with_frozen(loss_fn, frozen, frozen_prior=prior_frozen, mode="sample")
    family = low_rank_vi.build(loss, optimizer, rank=..., ...)
    state = transfer.init_low_rank_vi_from_prior(prior_train, optimizer, model_state)
    ...
    samples = transfer.complete_samples(key, family.sample(key, state, 30), frozen,
                                        frozen_prior=prior_frozen, mode="sample")

**Sampling the frozen part.** Trainable and frozen parts are drawn *independently* from the
marginals of the prior (as SA-BMA does); the cross-covariance
:math:`W_\text{trainable}^\top W_\text{frozen}` of the joint prior is dropped.

**Large frozen backbones.** :func:`with_frozen` and :func:`with_frozen_apply` close over the
frozen arrays; under ``jax.jit`` closed-over arrays are compile-time constants. That is fine for
the models this library trains on CPU; for very large backbones pass the frozen part through
``model_state`` in a custom loss instead.

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Transfer Learning. arXiv 2406.15664.
  Shwartz-Ziv, Goldblum, Souri, Kapoor, Zhu, LeCun, Wilson. Pre-Train Your Loss: Easy
  Bayesian Transfer Learning with Informative Priors. NeurIPS 2022.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_flat.posteriors import low_rank_vi, mean_field_vi
from bnn_flat.posteriors import swag as swag_lib
from bnn_flat.types import ApplyFn, Batch, LossAux, LossFn, ModelState, Params, PRNGKey

__all__ = [
    "NORM_PATTERN",
    "PRESETS",
    "path_names",
    "select",
    "norm_and_head",
    "partition",
    "merge",
    "prior_from_swag",
    "prior_from_moments",
    "extend_prior",
    "partition_prior",
    "with_frozen",
    "with_frozen_apply",
    "complete_samples",
    "init_low_rank_vi_from_prior",
]

NORM_PATTERN = r"(?i)norm|(^|/|_)bn(\d|_|/|$)"
"""Normalisation layers: a path containing ``norm`` (any case: ``BatchNorm_0``, ``LayerNorm``,
``GroupNorm``, ``stem_norm``) or a ``bn`` token (``bn1``, ``layer1/0/bn2``, ``stem_bn``; not
``subnet``)."""

PRESETS: dict[str, tuple[str, ...]] = {
    "all": (r"",),
    "norm": (NORM_PATTERN,),
    "head": (r"(^|/)(fc|head)(/|$)",),
    "norm_and_head": (NORM_PATTERN, r"(^|/)(fc|head)(/|$)"),
}
"""Named rules for :func:`select`. ``"norm_and_head"`` is SA-BMA's default trainable subset
(``--tr_layer nl_ll``): normalisation layers plus a classifier module named exactly ``fc``
(torchvision-style ResNets) or ``head`` (ViTs and :mod:`bnn_flat.models`); ViT MLP layers
``fc1``/``fc2`` are not heads. SA-BMA matches the substring ``bn`` on torchvision names, which
misses the projection-shortcut BatchNorm (``downsample.1``); on ports that name it
``downsample_bn`` the preset selects it, so add ``exclude="downsample"`` to reproduce SA-BMA
exactly."""

_MODES = ("mean", "sample")
_NEW_MEANS = ("zero", "params")


# Names and selection ---------------------------------------------------------------------


def path_names(tree: Params) -> Params:
    """A tree of the same structure whose leaves are the ``"/"``-joined key paths.

    Dict keys are used as they are, sequence indices as numbers, attributes by name.

    Args:
      tree: any pytree (typically Flax ``params``).

    Returns:
      The same structure with string leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> path_names({"conv": {"kernel": jnp.zeros(2)}, "head": {"bias": jnp.zeros(1)}})
      {'conv': {'kernel': 'conv/kernel'}, 'head': {'bias': 'head/bias'}}
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: _join_path(path), tree)


def select(
    tree: Params,
    include: str | Sequence[str],
    exclude: str | Sequence[str] = (),
    *,
    allow_unmatched: bool = False,
) -> Params:
    r"""A mask (tree of Python bools) selecting leaves by regular expressions on their paths.

    Rule language: every leaf has a path name ``"a/b/c"`` (:func:`path_names`). A leaf is
    selected when **some** ``include`` rule matches its path and **no** ``exclude`` rule does.
    A rule is either a preset name from :data:`PRESETS` (``"all"``, ``"norm"``, ``"head"``,
    ``"norm_and_head"``) or a Python regular expression applied with :func:`re.search`
    (so it matches anywhere unless anchored). Examples on a ResNet:

    * ``select(params, "all")``: everything;
    * ``select(params, "norm_and_head")``: SA-BMA's default (normalisation layers and head);
    * ``select(params, norm_and_head(head="Dense_2"))``: the same with a Flax-named head;
    * ``select(params, r"^stage2_", exclude=r"/bias$")``: the last stage without biases;
    * ``select(params, [r"(^|/)head/", r"^stem_"])``: two patterns, either may match.

    A rule that matches no path raises (it is almost always a typo), unless
    ``allow_unmatched``.

    Args:
      tree: any pytree.
      include: one rule or a sequence of rules.
      exclude: rules removing leaves from the selection.
      allow_unmatched: accept rules that match nothing.

    Returns:
      A tree of the structure of ``tree`` with ``True``/``False`` leaves.

    Raises:
      ValueError: on an empty ``include``, an invalid regular expression, or a rule that
        matches no path.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"bn1": {"scale": jnp.ones(2)}, "conv1": {"kernel": jnp.ones(2)},
      ...           "fc": {"bias": jnp.ones(2), "kernel": jnp.ones(2)}}
      >>> select(params, "norm_and_head", exclude="fc/bias")
      {'bn1': {'scale': True}, 'conv1': {'kernel': False}, 'fc': {'bias': False, 'kernel': True}}
    """
    include_rules = _as_rules(include, "include")
    exclude_rules = _as_rules(exclude, "exclude")
    if not include_rules:
        raise ValueError("include must name at least one rule (a preset or a pattern).")
    names, treedef = jax.tree.flatten(path_names(tree))
    if not names:
        raise ValueError("tree has no leaves to select from.")
    included = _match_rules(include_rules, names, "include", allow_unmatched)
    excluded = _match_rules(exclude_rules, names, "exclude", allow_unmatched)
    return treedef.unflatten([bool(i and not e) for i, e in zip(included, excluded, strict=True)])


def norm_and_head(head: str = "fc|head", norm: str = NORM_PATTERN) -> list[str]:
    """Patterns for SA-BMA's trainable subset: normalisation layers and a classifier.

    Args:
      head: a regular expression (alternatives allowed) for the classifier module name,
        matched against a *whole* path component (``"fc|head"``, ``"Dense_2"``).
      norm: pattern for normalisation layers (:data:`NORM_PATTERN`).

    Returns:
      ``[norm, head_pattern]``, ready for :func:`select`.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"Dense_0": {"kernel": jnp.ones(2)}, "LayerNorm_0": {"scale": jnp.ones(2)},
      ...           "Dense_1": {"kernel": jnp.ones(2)}}
      >>> select(params, norm_and_head(head="Dense_1"))
      {'Dense_0': {'kernel': False}, 'Dense_1': {'kernel': True}, 'LayerNorm_0': {'scale': True}}
    """
    for name, pattern in (("head", head), ("norm", norm)):
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{name} must be a non-empty regular expression, got {pattern!r}.")
        _compile(pattern)
    return [norm, rf"(^|/)({head})(/|$)"]


# Partition and merge ---------------------------------------------------------------------


def partition(tree: Params, mask: Params) -> tuple[dict, dict]:
    """Splits a nested dict into the selected (trainable) and the other (frozen) leaves.

    Both outputs are plain nested dicts of the original arrays, pruned of empty branches, so
    any posterior family can train the first. :func:`merge` is the exact inverse. Empty
    sub-dicts of ``tree`` (modules without parameters) are dropped.

    Args:
      tree: nested dicts (any :class:`~collections.abc.Mapping`) with array leaves.
      mask: a tree of the same structure with bool leaves (from :func:`select`).

    Returns:
      ``(trainable, frozen)``.

    Raises:
      ValueError: if ``tree`` is not a nested mapping or ``mask`` does not match it.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"bn": {"scale": jnp.ones(1)}, "conv": {"kernel": jnp.zeros(1)}}
      >>> trainable, frozen = partition(params, select(params, "norm"))
      >>> path_names(trainable), path_names(frozen)
      ({'bn': {'scale': 'bn/scale'}}, {'conv': {'kernel': 'conv/kernel'}})
      >>> merge(trainable, frozen) == params
      True
    """
    if not isinstance(tree, Mapping):
        raise ValueError(f"tree must be a nested dict of arrays, got {type(tree).__name__}.")
    _check_mask(tree, mask)
    return _partition(tree, mask, "")


def merge(trainable: Params, frozen: Params, *, like: Params | None = None) -> dict:
    """Joins two disjoint nested dicts; the inverse of :func:`partition`.

    Args:
      trainable: nested dict of arrays.
      frozen: nested dict of arrays with no path in common with ``trainable``.
      like: optional reference tree: the result must have its structure (same paths), and
        takes its key order.

    Returns:
      The union as a nested dict.

    Raises:
      ValueError: if a path is in both, a path is a leaf in one and a branch in the other,
        or the union does not have the structure of ``like``.

    Example:
      >>> merge({"head": {"w": 1.0}}, {"body": {"w": 2.0}})
      {'head': {'w': 1.0}, 'body': {'w': 2.0}}
    """
    for name, value in (("trainable", trainable), ("frozen", frozen)):
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a nested dict, got {type(value).__name__}.")
    merged = _merge(trainable, frozen, "")
    if like is not None:
        if not isinstance(like, Mapping):
            raise ValueError(f"like must be a nested dict, got {type(like).__name__}.")
        merged = _reorder_like(merged, like, "")
    return merged


# Priors ----------------------------------------------------------------------------------


def prior_from_swag(
    swag_state: swag_lib.SWAGState,
    *,
    scale: float = 0.5,
    rank: int | None = None,
    min_std: float = 1e-6,
    var_clamp: float = 1e-30,
) -> dict[str, Params]:
    r"""The SWAG Gaussian as a prior in low-rank-VI form ``{"mean", "raw_scale", "factor"}``.

    SWAG's covariance is :math:`c\,(\operatorname{diag}(v) + D^\top D/(K_e-1))` with the
    filled deviation rows :math:`D` (:math:`K_e = \min(n, K)` of them; see
    :mod:`bnn_flat.posteriors.swag`). It maps to

    .. math:: \mu = \bar\theta, \qquad \sigma = \max\big(\sqrt{c\,v},\ \sigma_{\min}\big),
              \qquad W = \sqrt{c / \max(K_e - 1, 1)}\; D,

    with unfilled rows of the buffer set to zero. ``rank`` keeps the ``rank`` most recently
    collected deviations (and uses :math:`K_e = \min(n, \text{rank})`, as a SWAG run with a
    buffer of that size would) or, when larger than the buffer, pads with zero rows (which
    do not change the covariance; a zero row is a stationary point of the expected factor
    gradient in VI). A SWAG-Diag state (no buffer) gives one zero row unless ``rank`` says
    otherwise. ``min_std`` floors :math:`\sigma` so that densities stay finite in float32
    (SWAG's own floor ``var_clamp`` is 1e-30); it is the only departure from the SWAG
    covariance.

    Args:
      swag_state: a :class:`bnn_flat.posteriors.swag.SWAGState` with at least one collection.
      scale: SWAG's covariance multiplier :math:`c > 0` (SA-BMA samples its prior with 0.5).
      rank: number of factor rows; ``None`` keeps the buffer size (SA-BMA's
        ``--low_rank=-1``).
      min_std: floor :math:`\sigma_{\min} > 0` on the diagonal standard deviation.
      var_clamp: SWAG's floor on the diagonal variance.

    Returns:
      ``{"mean", "raw_scale", "factor"}`` (factor leaves ``(rank, *leaf.shape)``).

    Raises:
      ValueError: on a non-positive ``scale``/``min_std``, a ``rank`` < 1, or a state that
        has collected nothing.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from bnn_flat.posteriors import swag, low_rank_vi
      >>> state = swag.init({"w": jnp.zeros(2)}, None, optax.sgd(0.1), rank=2)
      >>> for w in ([1.0, 0.0], [3.0, 2.0], [2.0, 4.0]):
      ...     state = swag.collect(state, {"w": jnp.array(w)})
      >>> prior = prior_from_swag(state, scale=1.0)
      >>> prior["mean"]["w"], prior["factor"]["w"].shape
      (Array([2., 2.], dtype=float32), (2, 2))
      >>> import numpy as np  # covariance diag(v) + D^T D / (2 - 1):
      >>> print(np.asarray(low_rank_vi.covariance_matrix(prior)).round(3))
      [[1.667 1.   ]
       [1.    7.667]]
    """
    _check_positive_real("scale", scale)
    _check_positive_real("min_std", min_std)
    buffer_rank = _factor_rank(swag_state.deviations)
    if rank is None:
        rank = max(buffer_rank, 1)
    rank = _check_positive_int("rank", rank)
    num_collected = swag_state.num_collected
    if _is_concrete(num_collected) and int(num_collected) < 1:
        raise ValueError("swag_state has collected no iterate; a SWAG prior needs n >= 1.")
    variance = swag_lib.variance(swag_state, var_clamp)
    raw_scale = jax.tree.map(
        lambda m, v: _raw_scale_from_std(jnp.sqrt(scale * _wide(v)), min_std, m.dtype),
        swag_state.mean,
        variance,
    )
    kept = min(rank, buffer_rank)
    if kept > 0:
        # Rows of the `kept` most recent collections: write_index - 1, write_index - 2, ...
        offsets = jnp.arange(kept)
        rows = (swag_state.write_index - 1 - offsets) % buffer_rank
        row_mask = (offsets < num_collected).astype(jnp.float32)
        filled = jnp.minimum(num_collected, kept)
        coefficient = jnp.sqrt(scale / jnp.maximum(filled - 1, 1).astype(jnp.float32))
        weights = row_mask * coefficient

    def leaf_factor(mean, deviations):
        shape = (rank, *mean.shape)
        if kept == 0:
            return jnp.zeros(shape, mean.dtype)
        taken = jnp.take(_wide(deviations), rows, axis=0)
        taken = taken * weights.reshape((kept,) + (1,) * mean.ndim)
        padding = jnp.zeros((rank - kept, *mean.shape), taken.dtype)
        return jnp.concatenate([taken, padding], axis=0).astype(mean.dtype)

    factor = jax.tree.map(leaf_factor, swag_state.mean, swag_state.deviations)
    return {"mean": swag_state.mean, "raw_scale": raw_scale, "factor": factor}


def prior_from_moments(
    mean: Params,
    variance: Params,
    factor: Params | None = None,
    *,
    rank: int = 1,
    min_std: float = 0.0,
) -> dict[str, Params]:
    r"""A Gaussian prior :math:`N(\mu, \operatorname{diag}(v) + W^\top W)` in variational form.

    Args:
      mean: :math:`\mu`, a pytree of float arrays.
      variance: :math:`v \ge 0`, structured like ``mean`` (e.g. SA-BMA's
        ``{model}_variance.pt``).
      factor: optional :math:`W`, leaves ``(K, *leaf.shape)``; ``None`` gives ``rank`` zero
        rows.
      rank: number of zero rows when ``factor`` is ``None``.
      min_std: floor on :math:`\sigma = \sqrt{v}`; the floored :math:`\sigma` must be > 0.

    Returns:
      ``{"mean", "raw_scale", "factor"}`` with :math:`\operatorname{softplus}(s) =
      \max(\sqrt v, \sigma_{\min})`.

    Raises:
      ValueError: on mismatched structures or shapes, inconsistent factor ranks, negative or
        NaN variances, or a zero standard deviation after the floor.

    Example:
      >>> import jax.numpy as jnp
      >>> from bnn_flat.posteriors import low_rank_vi, mean_field_vi
      >>> prior = prior_from_moments(jnp.zeros(2), jnp.array([1.0, 4.0]),
      ...                            jnp.array([[1.0, 1.0]]))
      >>> low_rank_vi.covariance_matrix(prior)
      Array([[2., 1.],
             [1., 5.]], dtype=float32)
    """
    _check_float_tree("mean", mean)
    _check_same_shapes(mean, variance, "variance")
    if not isinstance(min_std, numbers.Real) or not min_std >= 0 or not math.isfinite(min_std):
        raise ValueError(f"min_std must be a finite number >= 0, got {min_std!r}.")
    for name, leaf in zip(_leaf_names(variance), jax.tree.leaves(variance), strict=True):
        if _is_concrete(leaf):
            values = np.asarray(leaf, dtype=np.float64)
            if np.isnan(values).any() or (values < 0).any():
                raise ValueError(f"variance leaf {name!r} has negative or NaN entries.")
            if min_std == 0 and (values == 0).any():
                raise ValueError(
                    f"variance leaf {name!r} has zero entries; pass min_std > 0 to floor them."
                )
    raw_scale = jax.tree.map(
        lambda m, v: _raw_scale_from_std(jnp.sqrt(_wide(jnp.asarray(v))), min_std, m.dtype),
        mean,
        variance,
    )
    if factor is None:
        rank = _check_positive_int("rank", rank)
        factor = jax.tree.map(lambda m: jnp.zeros((rank, *jnp.shape(m)), m.dtype), mean)
    else:
        factor = _check_factor(mean, factor)
    return {"mean": mean, "raw_scale": raw_scale, "factor": factor}


def extend_prior(
    prior: dict[str, Params],
    params: Params,
    *,
    new_std: float,
    new_mean: str = "zero",
    replace: str | Sequence[str] = (),
    drop_extra: bool = False,
) -> dict[str, Params]:
    r"""Adds prior entries for parameters the prior does not cover (a new classifier).

    For every leaf of ``params`` whose path is absent from ``prior["mean"]`` or matches a
    ``replace`` pattern, the new prior has mean 0 (``new_mean="zero"``, SA-BMA's
    ``pretrained_set='source'``) or the leaf of ``params`` (``"params"``, e.g. a fresh
    initialisation), standard deviation ``new_std`` and zero factor rows. Other leaves keep
    their prior entries. The result follows the structure of ``params``.

    SA-BMA gives the new classifier variance ``alpha = 1e-5``, i.e. ``new_std = sqrt(1e-5)``.

    Args:
      prior: ``{"mean", "raw_scale", "factor"}`` over (part of) the parameters.
      params: nested dict of the target model's parameters.
      new_std: standard deviation :math:`> 0` of the new entries.
      new_mean: ``"zero"`` or ``"params"``.
      replace: patterns (:func:`re.search` on paths) of prior entries to replace (a
        pretrained head of another shape); each must match a path of ``params``.
      drop_extra: silently drop prior entries that ``params`` does not have (otherwise an
        error).

    Returns:
      A prior ``{"mean", "raw_scale", "factor"}`` structured like ``params``.

    Raises:
      ValueError: on an unknown ``new_mean``, a non-positive ``new_std``, a kept prior
        entry whose shape differs from the parameter's, or prior entries absent from
        ``params`` (without ``drop_extra``).

    Example:
      >>> import jax.numpy as jnp
      >>> prior = prior_from_moments({"body": jnp.zeros(2)}, {"body": jnp.ones(2)}, rank=3)
      >>> params = {"body": jnp.zeros(2), "head": jnp.array([0.5])}
      >>> new = extend_prior(prior, params, new_std=0.1, new_mean="params")
      >>> new["mean"]["head"], new["factor"]["head"].shape
      (Array([0.5], dtype=float32), (3, 1))
    """
    _check_prior(prior)
    if new_mean not in _NEW_MEANS:
        raise ValueError(f"new_mean must be one of {_NEW_MEANS}, got {new_mean!r}.")
    _check_positive_real("new_std", new_std)
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a nested dict, got {type(params).__name__}.")
    _check_float_tree("params", params)
    rank = _factor_rank(prior["factor"])
    replace_rules = [_compile(p) for p in _as_rules(replace, "replace")]
    param_names = jax.tree.leaves(path_names(params))
    for rule in replace_rules:
        if not any(rule.search(name) for name in param_names):
            raise ValueError(f"replace pattern {rule.pattern!r} matches no path of params.")
    prior_leaves = {
        name: (mean, raw, factor)
        for name, mean, raw, factor in zip(
            _leaf_names(prior["mean"]),
            jax.tree.leaves(prior["mean"]),
            jax.tree.leaves(prior["raw_scale"]),
            jax.tree.leaves(prior["factor"]),
            strict=True,
        )
    }
    extra = sorted(set(prior_leaves) - set(param_names))
    if extra and not drop_extra:
        raise ValueError(
            f"prior has entries that params does not have: {extra}; pass drop_extra=True to "
            "drop them (or rename the parameters)."
        )

    def entry(path, leaf):
        name = _join_path(path)
        if name in prior_leaves and not any(rule.search(name) for rule in replace_rules):
            mean, raw, factor = prior_leaves[name]
            if jnp.shape(mean) != jnp.shape(leaf):
                raise ValueError(
                    f"prior entry {name!r} has shape {jnp.shape(mean)} but the parameter has "
                    f"{jnp.shape(leaf)}; list it in replace= to give it a new prior."
                )
            return mean, raw, factor
        leaf = jnp.asarray(leaf)
        mean = leaf if new_mean == "params" else jnp.zeros_like(leaf)
        raw = jnp.full_like(leaf, mean_field_vi.inverse_softplus(new_std))
        return mean, raw, jnp.zeros((rank, *leaf.shape), leaf.dtype)

    entries = jax.tree_util.tree_map_with_path(entry, params)
    is_entry = lambda x: isinstance(x, tuple)  # noqa: E731
    return {
        key: jax.tree.map(lambda e, i=index: e[i], entries, is_leaf=is_entry)
        for index, key in enumerate(("mean", "raw_scale", "factor"))
    }


def partition_prior(
    prior: dict[str, Params], mask: Params
) -> tuple[dict[str, Params], dict[str, Params]]:
    r"""Splits a prior into the marginals over the selected and the other parameters.

    Mean, raw scale and factor are split leaf by leaf with the same mask; every factor leaf
    keeps its ``K`` rows, so the two factors are the column blocks :math:`W_a, W_b` of
    :math:`W` and each part is the exact marginal
    :math:`N(\mu_a, \operatorname{diag}(\sigma_a^2) + W_a^\top W_a)` of the prior.

    Args:
      prior: ``{"mean", "raw_scale", "factor"}``.
      mask: bool tree structured like ``prior["mean"]`` (from :func:`select`).

    Returns:
      ``(trainable_prior, frozen_prior)``, each ``{"mean", "raw_scale", "factor"}``.

    Example:
      >>> import jax.numpy as jnp
      >>> prior = prior_from_moments({"a": jnp.zeros(2), "b": jnp.zeros(3)},
      ...                            {"a": jnp.ones(2), "b": jnp.ones(3)}, rank=4)
      >>> trainable, frozen = partition_prior(prior, {"a": True, "b": False})
      >>> trainable["factor"]["a"].shape, sorted(frozen["mean"])
      ((4, 2), ['b'])
    """
    _check_prior(prior)
    if not isinstance(prior["mean"], Mapping):
        raise ValueError("prior['mean'] must be a nested dict to be partitioned.")
    _check_mask(prior["mean"], mask)
    parts = {key: _partition(prior[key], mask, "") for key in ("mean", "raw_scale", "factor")}
    return (
        {key: part[0] for key, part in parts.items()},
        {key: part[1] for key, part in parts.items()},
    )


# Frozen parts ----------------------------------------------------------------------------


def with_frozen(
    loss_fn: LossFn,
    frozen: Params,
    *,
    frozen_prior: dict[str, Params] | None = None,
    mode: str = "mean",
) -> LossFn:
    r"""A loss over the trainable part, with the frozen part fixed or re-sampled.

    * ``mode="mean"``: ``loss(trainable, s, batch, key) = loss_fn(merge(trainable, frozen),
      s, batch, key)``, the key passed on unchanged.
    * ``mode="sample"``: every call draws :math:`w_f \sim` ``frozen_prior`` (SA-BMA's frozen
      layers, "frozen but still sampled"); ``key`` is split into a key for :math:`w_f` and a
      key passed to ``loss_fn`` (dropout), so the two stay independent. In expectation over
      keys this is :math:`\mathbb{E}_{w_f}[\text{loss}(\text{trainable}, w_f)]`.

    Args:
      loss_fn: ``loss_fn(params, model_state, batch, key) -> (loss, LossAux)`` over the full
        parameters.
      frozen: nested dict of the frozen parameters (:func:`partition`).
      frozen_prior: ``{"mean", "raw_scale", "factor"}`` over the frozen parameters (the
        second output of :func:`partition_prior`); needed for ``"sample"``.
      mode: ``"mean"`` or ``"sample"``.

    Returns:
      A loss function of the same contract over the trainable parameters.

    Raises:
      ValueError: on an unknown mode, a missing or mismatched ``frozen_prior``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat.types import LossAux
      >>> def loss_fn(params, model_state, batch, key):
      ...     return params["a"] * params["b"], LossAux(model_state, {})
      >>> loss = with_frozen(loss_fn, {"b": jnp.array(3.0)})
      >>> float(loss({"a": jnp.array(2.0)}, {}, {}, jax.random.key(0))[0])
      6.0
    """
    _check_choice("mode", mode, _MODES)
    if not isinstance(frozen, Mapping):
        raise ValueError(f"frozen must be a nested dict, got {type(frozen).__name__}.")
    if mode == "sample":
        _check_frozen_prior(frozen, frozen_prior)

    def trainable_loss(
        trainable: Params, model_state: ModelState, batch: Batch, key: PRNGKey
    ) -> tuple[jax.Array, LossAux]:
        if mode == "mean":
            return loss_fn(merge(trainable, frozen), model_state, batch, key)
        frozen_key, loss_key = jax.random.split(key)
        frozen_draw = jax.tree.map(
            lambda x: x[0], low_rank_vi.sample_variational(frozen_key, frozen_prior, 1)
        )
        return loss_fn(merge(trainable, frozen_draw), model_state, batch, loss_key)

    return trainable_loss


def with_frozen_apply(apply_fn: ApplyFn, frozen: Params) -> ApplyFn:
    """A model over the trainable part with the frozen part fixed.

    Args:
      apply_fn: ``apply(params, model_state, inputs, *, train, key)`` over full parameters.
      frozen: nested dict of the frozen parameters.

    Returns:
      ``apply(trainable, model_state, inputs, *, train, key)``.

    Example:
      >>> import jax.numpy as jnp
      >>> apply = lambda p, s, x, *, train, key: (x @ p["w"] + p["b"], s)
      >>> apply_trainable = with_frozen_apply(apply, {"w": jnp.eye(2)})
      >>> apply_trainable({"b": jnp.ones(2)}, {}, jnp.ones((1, 2)), train=False, key=None)[0]
      Array([[2., 2.]], dtype=float32)
    """
    if not isinstance(frozen, Mapping):
        raise ValueError(f"frozen must be a nested dict, got {type(frozen).__name__}.")

    def apply_trainable(
        trainable: Params,
        model_state: ModelState,
        inputs: jax.Array,
        *,
        train: bool,
        key: PRNGKey | None,
    ) -> tuple[jax.Array, ModelState]:
        return apply_fn(merge(trainable, frozen), model_state, inputs, train=train, key=key)

    return apply_trainable


def complete_samples(
    key: PRNGKey | None,
    trainable_samples: Params,
    frozen: Params,
    *,
    frozen_prior: dict[str, Params] | None = None,
    mode: str = "mean",
) -> dict:
    """Full-parameter samples for BMA from stacked samples of the trainable part.

    With ``mode="mean"`` every sample gets the frozen values (broadcast to the sample axis);
    with ``"sample"`` sample ``s`` gets its own independent draw from ``frozen_prior``. The
    result is a stack for :func:`bnn_flat.bma.predict`.

    Args:
      key: PRNG key for the frozen draws (may be ``None`` in ``"mean"`` mode).
      trainable_samples: nested dict, leaves with a leading sample axis ``S``.
      frozen: nested dict of the frozen parameters (no sample axis).
      frozen_prior: prior over the frozen parameters; needed for ``"sample"``.
      mode: ``"mean"`` or ``"sample"``.

    Returns:
      Nested dict of all parameters, every leaf with leading axis ``S``.

    Raises:
      ValueError: on an unknown mode, inconsistent sample axes or a missing prior.

    Example:
      >>> import jax.numpy as jnp
      >>> samples = complete_samples(None, {"b": jnp.arange(3.0)}, {"w": jnp.ones(2)})
      >>> samples["w"].shape, samples["b"].tolist()
      ((3, 2), [0.0, 1.0, 2.0])
    """
    _check_choice("mode", mode, _MODES)
    if not isinstance(trainable_samples, Mapping) or not isinstance(frozen, Mapping):
        raise ValueError("trainable_samples and frozen must be nested dicts.")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(trainable_samples)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of trainable_samples needs the same leading sample axis; got {sizes}."
        )
    (num_samples,) = sizes
    if num_samples == 0:
        raise ValueError("trainable_samples has zero samples.")
    if mode == "mean":
        frozen_samples = jax.tree.map(
            lambda x: jnp.broadcast_to(x, (num_samples, *jnp.shape(x))), frozen
        )
    else:
        if key is None:
            raise ValueError('mode="sample" needs a PRNG key.')
        _check_frozen_prior(frozen, frozen_prior)
        frozen_samples = low_rank_vi.sample_variational(key, frozen_prior, num_samples)
    return merge(trainable_samples, frozen_samples)


def init_low_rank_vi_from_prior(
    prior: dict[str, Params],
    optimizer: optax.GradientTransformation,
    model_state: ModelState | None = None,
) -> low_rank_vi.LowRankVIState:
    """A :class:`~bnn_flat.posteriors.low_rank_vi.LowRankVIState` starting at the prior.

    Mean, raw scale and factor are the prior's (SA-BMA initialises the posterior at the
    SWAG prior); the optimizer state is initialised on those values.

    Args:
      prior: ``{"mean", "raw_scale", "factor"}``.
      optimizer: the optimizer of the low-rank VI family.
      model_state: BatchNorm statistics or ``None``.

    Returns:
      The initial state (its rank is the prior's).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> prior = prior_from_moments({"w": jnp.ones(2)}, {"w": jnp.full(2, 0.25)}, rank=3)
      >>> state = init_low_rank_vi_from_prior(prior, optax.adam(1e-3))
      >>> state.factor["w"].shape, low_rank_vi.variational_parameters(state)["mean"]["w"]
      ((3, 2), Array([1., 1.], dtype=float32))
    """
    _check_prior(prior)
    rank = _factor_rank(prior["factor"])
    state = low_rank_vi.init(
        prior["mean"], model_state, optimizer, rank=rank, init_std=1.0, init_factor_std=0.0
    )
    state = state._replace(raw_scale=prior["raw_scale"], factor=prior["factor"])
    return state._replace(opt_state=optimizer.init(low_rank_vi.variational_parameters(state)))


# Private helpers -------------------------------------------------------------------------


def _join_path(path: tuple) -> str:
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            parts.append(entry.name)
        elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
            parts.append(str(entry.key))
        else:
            parts.append(str(entry))
    return "/".join(parts)


def _factor_rank(factor: Params) -> int:
    ranks = {jnp.shape(x)[0] for x in jax.tree.leaves(factor)}
    if len(ranks) != 1:
        raise ValueError(f"factor leaves need one common rank, got ranks {sorted(ranks)}.")
    return ranks.pop()


def _leaf_names(tree: Params) -> list[str]:
    return jax.tree.leaves(path_names(tree))


def _as_rules(rules: str | Sequence[str], name: str) -> list[str]:
    if isinstance(rules, str):
        rules = [rules]
    if not isinstance(rules, Sequence) or not all(isinstance(r, str) for r in rules):
        raise ValueError(f"{name} must be a string or a sequence of strings, got {rules!r}.")
    return list(rules)


def _compile(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid regular expression {pattern!r}: {error}.") from None


def _match_rules(
    rules: list[str], names: list[str], kind: str, allow_unmatched: bool
) -> list[bool]:
    hits = [False] * len(names)
    for rule in rules:
        patterns = [_compile(p) for p in PRESETS.get(rule, (rule,))]
        matched = [any(p.search(name) for p in patterns) for name in names]
        if not any(matched) and not allow_unmatched:
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"{kind} rule {rule!r} matches no parameter path (paths: {shown}).")
        hits = [h or m for h, m in zip(hits, matched, strict=True)]
    return hits


def _check_mask(tree: Params, mask: Params) -> None:
    tree_structure = jax.tree.structure(tree)
    mask_leaves, mask_structure = jax.tree.flatten(mask)
    if mask_structure != tree_structure:
        raise ValueError(
            f"mask must have the structure of the tree: expected {tree_structure}, got "
            f"{mask_structure}."
        )
    for leaf in mask_leaves:
        if not isinstance(leaf, bool | np.bool_):
            raise ValueError(f"mask leaves must be Python bools, got {leaf!r}.")


def _partition(tree: Mapping, mask: Mapping, prefix: str) -> tuple[dict, dict]:
    selected, others = {}, {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            left, right = _partition(value, mask[key], f"{prefix}{key}/")
            if left:
                selected[key] = left
            if right:
                others[key] = right
        elif mask[key]:
            selected[key] = value
        else:
            others[key] = value
    return selected, others


def _merge(left: Mapping, right: Mapping, prefix: str) -> dict:
    merged = dict(left)
    for key, value in right.items():
        if key not in merged:
            merged[key] = value
            continue
        if isinstance(merged[key], Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(merged[key], value, f"{prefix}{key}/")
        elif isinstance(merged[key], Mapping) or isinstance(value, Mapping):
            raise ValueError(
                f"path {prefix}{key!s} is a leaf in one tree and a branch in the other."
            )
        else:
            raise ValueError(f"path {prefix}{key!s} is in both trees (they must be disjoint).")
    return {
        key: dict(value) if isinstance(value, Mapping) and not isinstance(value, dict) else value
        for key, value in merged.items()
    }


def _reorder_like(merged: Mapping, like: Mapping, prefix: str) -> dict:
    if set(merged) != set(like):
        missing = sorted(f"{prefix}{k}" for k in set(like) - set(merged))
        extra = sorted(f"{prefix}{k}" for k in set(merged) - set(like))
        raise ValueError(f"merged tree does not match like: missing {missing}, unexpected {extra}.")
    result = {}
    for key, reference in like.items():
        value = merged[key]
        if isinstance(reference, Mapping) != isinstance(value, Mapping):
            raise ValueError(f"path {prefix}{key} is a leaf in one tree and a branch in the other.")
        result[key] = (
            _reorder_like(value, reference, f"{prefix}{key}/")
            if isinstance(reference, Mapping)
            else value
        )
    return result


def _raw_scale_from_std(std: jax.Array, min_std: float, dtype: Any) -> jax.Array:
    """Array inverse softplus ``s = σ + log(-expm1(-σ))``, stable for tiny and large σ."""
    std = jnp.maximum(std, min_std)
    return (std + jnp.log(-jnp.expm1(-std))).astype(dtype)


def _wide(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_real(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _check_choice(name: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}.")


def _check_float_tree(name: str, tree: Params) -> None:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} has no leaves.")
    for leaf_name, leaf in zip(_leaf_names(tree), leaves, strict=True):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"{name} leaf {leaf_name!r} must be a floating array, got {jnp.result_type(leaf)}."
            )


def _check_same_shapes(reference: Params, tree: Params, name: str) -> None:
    reference_leaves, reference_structure = jax.tree.flatten(reference)
    leaves, structure = jax.tree.flatten(tree)
    if structure != reference_structure:
        raise ValueError(
            f"{name} must have the structure of the mean: expected {reference_structure}, "
            f"got {structure}."
        )
    for leaf_name, expected, got in zip(
        _leaf_names(reference), reference_leaves, leaves, strict=True
    ):
        if jnp.shape(expected) != jnp.shape(got):
            raise ValueError(
                f"{name} leaf {leaf_name!r} has shape {jnp.shape(got)}, expected "
                f"{jnp.shape(expected)}."
            )


def _check_factor(mean: Params, factor: Params) -> Params:
    mean_leaves, mean_structure = jax.tree.flatten(mean)
    leaves, structure = jax.tree.flatten(factor)
    if structure != mean_structure:
        raise ValueError(
            f"factor must have the structure of the mean: expected {mean_structure}, got "
            f"{structure}."
        )
    ranks = set()
    for leaf_name, m, w in zip(_leaf_names(mean), mean_leaves, leaves, strict=True):
        if jnp.ndim(w) != jnp.ndim(m) + 1 or jnp.shape(w)[1:] != jnp.shape(m):
            raise ValueError(
                f"factor leaf {leaf_name!r} must have shape (rank, *{jnp.shape(m)}), got "
                f"{jnp.shape(w)}."
            )
        ranks.add(jnp.shape(w)[0])
    if len(ranks) != 1 or 0 in ranks:
        raise ValueError(f"factor leaves need one common rank >= 1, got ranks {sorted(ranks)}.")
    return factor


def _check_prior(prior: Any) -> None:
    if not isinstance(prior, Mapping) or set(prior) != {"mean", "raw_scale", "factor"}:
        keys = sorted(prior) if isinstance(prior, Mapping) else type(prior).__name__
        raise ValueError(f"prior must be a dict with keys mean, raw_scale, factor; got {keys}.")
    _check_same_shapes(prior["mean"], prior["raw_scale"], "prior raw_scale")
    _check_factor(prior["mean"], prior["factor"])


def _check_frozen_prior(frozen: Params, frozen_prior: dict[str, Params] | None) -> None:
    if frozen_prior is None:
        raise ValueError('mode="sample" needs frozen_prior (see partition_prior).')
    _check_prior(frozen_prior)
    _check_same_shapes(frozen, frozen_prior["mean"], "frozen_prior mean")
