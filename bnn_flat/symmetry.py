r"""Weight-space symmetries: canonical forms, weight matching, MMD and functional diversity.

Two symmetries leave the function of a ReLU network unchanged (Laurent et al. 2024):

* **Permutations** of the hidden units of a layer,
  :math:`W_l \to \Pi_l W_l \Pi_{l-1}^\top`, :math:`b_l \to \Pi_l b_l`;
* **Scalings** of the hidden units (positive homogeneity of ReLU),
  :math:`W_l \to \operatorname{diag}(\lambda_l) W_l \operatorname{diag}(\lambda_{l-1})^{-1}`,
  :math:`b_l \to \lambda_l \odot b_l`, :math:`\lambda > 0`.

Because of them the weight posterior is a mixture of many copies of one "canonical" posterior.
This module removes them, so that posteriors can be compared where it matters:

* :func:`canonicalize_permutation` sorts the hidden units of every layer by a key and carries
  the permutation to everything that touches those units (next layer's input, biases,
  normalisation parameters and BatchNorm running statistics, the flattened dense layer of a
  CNN, every layer on a ResNet's residual stream); :func:`random_permutation` applies a random
  element of the same group.
* :func:`weight_matching` aligns one network to another (Ainsworth et al. 2023).
* :func:`canonicalize_scaling` picks the minimum-norm ("min-mass") member of the scaling orbit,
  or normalises the incoming weights of every unit; :func:`random_scaling` applies a random
  scaling.
* :func:`check_function_preserved` verifies on inputs that a transformation kept the function.
* :func:`mmd` and :func:`posterior_mmd` compare two sets of posterior samples with the MMDAgg
  kernels (optionally after canonicalisation, the paper's "NS" column); :func:`mmd_bandwidths`
  exposes the bandwidth rule.
* :func:`pairwise_mutual_information` and :func:`pairwise_disagreement` measure the functional
  diversity of every pair of members (the paper's "functional collapse").

Supported structures (parameter trees of :mod:`bnn_flat.models`):

* ``"mlp"``: ``{"hidden_0", ..., "output"}`` (:class:`~bnn_flat.models.MLP`) or a plain *layer
  list* ``[{"kernel": (in, out), "bias": (out,)}, ...]`` (``bias`` optional);
* ``"lenet"``: ``conv_0, conv_1, ..., dense_0, ..., output`` (:class:`~bnn_flat.models.LeNet`
  and any such stack of convolutions followed by a flatten and dense layers);
* ``"resnet"``: the CIFAR ResNets of :class:`~bnn_flat.models.ResNet` with batch, group,
  layer or no normalisation, identity and projection shortcuts (permutations only).

Every canonicalisation is pure JAX (``jit`` and ``vmap`` work, e.g. over posterior samples),
except :func:`weight_matching`, which runs the Hungarian algorithm on the host.

References:
  * Laurent, Aldea, Franchi (2024). A symmetry-aware exploration of Bayesian neural network
    posteriors. ICLR.
  * Ainsworth, Hayase, Srinivasa (2023). Git Re-Basin: merging models modulo permutation
    symmetries. ICLR.
  * Schrab, Kim, Albert, Laurent, Guedj, Gretton (2023). MMD aggregated two-sample test. JMLR.
  * Gretton, Borgwardt, Rasch, Schölkopf, Smola (2012). A kernel two-sample test. JMLR.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax.typing import ArrayLike

from bnn_flat import metrics
from bnn_flat.types import ApplyFn, ModelState, Params, PRNGKey

__all__ = [
    "canonicalize_permutation",
    "random_permutation",
    "weight_matching",
    "canonicalize_scaling",
    "random_scaling",
    "check_function_preserved",
    "mmd_bandwidths",
    "mmd",
    "posterior_mmd",
    "pairwise_mutual_information",
    "pairwise_disagreement",
]

_ARCHITECTURES = ("mlp", "lenet", "resnet")
_PERMUTATION_KEYS = ("max", "mean", "l2")
_RESNET_NORMS = ("batch", "group", "layer", "none")
_SCALING_METHODS = ("min_mass", "row_norm")
_KERNELS = ("gaussian", "laplace")
_DISTANCE_CHUNK_ELEMENTS = 2**23  # bound on the (rows, samples, dimension) difference tensor


# --------------------------------------------------------------------------------------------
# Structure: which tensor axes carry which hidden units
# --------------------------------------------------------------------------------------------


class _Member(NamedTuple):
    """One tensor axis indexed by the units of a permutation group.

    ``path`` starts at the root ``{"params": ..., "model_state": ...}``. A ``blocked`` axis is
    the flattened ``(positions, units)`` input of the dense layer after a convolution stack
    (the unit index is the minor one).
    """

    path: tuple[Any, ...]
    axis: int
    blocked: bool = False


class _Group(NamedTuple):
    """Hidden units that must be permuted together.

    ``num_blocks > 1`` (GroupNorm): the units form contiguous blocks that a permutation may
    only reorder as wholes or within themselves. ``key_path`` is the kernel whose last axis
    holds these units; its incoming weights define the sort key.
    """

    name: str
    size: int
    num_blocks: int
    key_path: tuple[Any, ...]
    members: tuple[_Member, ...]


class _Layer(NamedTuple):
    """A dense or convolutional layer of a sequential network (for scaling)."""

    path: tuple[Any, ...]
    is_conv: bool
    has_bias: bool
    in_units: int
    out_units: int
    blocked_input: bool


def _copy_tree(tree: Any) -> Any:
    """A copy with fresh, mutable containers (mappings become dicts, sequences lists)."""
    if isinstance(tree, Mapping):
        return {name: _copy_tree(value) for name, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_copy_tree(value) for value in tree]
    return tree


def _restore_containers(tree: Any, like: Any) -> Any:
    """Gives ``tree`` (from :func:`_copy_tree`) the sequence types of ``like``."""
    if isinstance(like, Mapping):
        return {name: _restore_containers(tree[name], like[name]) for name in like}
    if isinstance(like, tuple):
        return tuple(_restore_containers(a, b) for a, b in zip(tree, like, strict=True))
    if isinstance(like, list):
        return [_restore_containers(a, b) for a, b in zip(tree, like, strict=True)]
    return tree


def _get(root: Any, path: tuple[Any, ...]) -> Any:
    node = root
    for name in path:
        node = node[name]
    return node


def _set(root: Any, path: tuple[Any, ...], value: Any) -> None:
    _get(root, path[:-1])[path[-1]] = value


def _has(root: Any, path: tuple[Any, ...]) -> bool:
    node = root
    for name in path:
        if isinstance(node, Mapping) and name in node:
            node = node[name]
        elif isinstance(node, list) and isinstance(name, int) and 0 <= name < len(node):
            node = node[name]
        else:
            return False
    return True


def _path_name(path: tuple[Any, ...]) -> str:
    return "/".join(str(name) for name in path)


def _shape_of(root: Any, path: tuple[Any, ...]) -> tuple[int, ...]:
    if not _has(root, path):
        raise ValueError(f"expected a parameter at {_path_name(path)!r}, found none")
    shape = getattr(_get(root, path), "shape", None)
    if shape is None:
        raise ValueError(f"{_path_name(path)!r} must be an array, got {type(_get(root, path))}")
    return tuple(shape)


def _check_choice(value: object, name: str, options: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(options)}")


def _make_root(params: Params, model_state: ModelState | None) -> dict[str, Any]:
    if model_state is not None and not isinstance(model_state, Mapping):
        raise ValueError(f"model_state must be a dict of collections, got {type(model_state)}")
    if not isinstance(params, Mapping | list | tuple):
        raise ValueError(f"params must be a dict or a list of layers, got {type(params)}")
    return {"params": _copy_tree(params), "model_state": _copy_tree(model_state or {})}


def _finish(
    root: dict[str, Any], params: Params, model_state: ModelState | None
) -> tuple[Params, ModelState]:
    return (
        _restore_containers(root["params"], params),
        _restore_containers(root["model_state"], model_state or {}),
    )


# Sequential networks (MLP and LeNet-style CNNs) --------------------------------------------


def _numbered(names: Sequence[str], prefix: str) -> list[str]:
    """``prefix_0, prefix_1, ...`` among ``names``, checked to be consecutive."""
    found = sorted(
        (int(match.group(1)), name)
        for name in names
        if (match := re.fullmatch(re.escape(prefix) + r"_(\d+)", name))
    )
    indices = [index for index, _ in found]
    if indices != list(range(len(indices))):
        raise ValueError(f"layers {prefix}_i must be numbered 0, 1, 2, ...; got {indices}")
    return [name for _, name in found]


def _layer_entry(root: dict[str, Any], path: tuple[Any, ...], rank: int) -> tuple[int, int, bool]:
    layer = _get(root, path)
    if not isinstance(layer, Mapping) or "kernel" not in layer:
        raise ValueError(f"layer {_path_name(path)!r} must be a dict with a 'kernel'")
    unknown = set(layer) - {"kernel", "bias"}
    if unknown:
        raise ValueError(
            f"layer {_path_name(path)!r} has unsupported entries {sorted(unknown)}; only "
            f"'kernel' and 'bias' are understood"
        )
    shape = _shape_of(root, (*path, "kernel"))
    if len(shape) != rank:
        kind = "convolution (height, width, in, out)" if rank == 4 else "dense (in, out)"
        raise ValueError(
            f"kernel of {_path_name(path)!r} must be a {kind} kernel of rank {rank}, got shape "
            f"{shape} (for stacked samples or ensemble members, map with jax.vmap)"
        )
    has_bias = "bias" in layer
    if has_bias and _shape_of(root, (*path, "bias")) != (shape[-1],):
        raise ValueError(
            f"bias of {_path_name(path)!r} must have shape ({shape[-1]},), got "
            f"{_shape_of(root, (*path, 'bias'))}"
        )
    return shape[-2], shape[-1], has_bias


def _sequential_layers(root: dict[str, Any], architecture: str) -> list[_Layer]:
    """Parses an MLP or LeNet-style parameter tree into its chain of layers."""
    params = root["params"]
    if architecture == "mlp":
        if isinstance(params, list):
            if not params:
                raise ValueError("the layer list is empty")
            paths = [("params", index) for index in range(len(params))]
        else:
            hidden = _numbered(list(params), "hidden")
            unknown = set(params) - set(hidden) - {"output"}
            if unknown or "output" not in params:
                raise ValueError(
                    f"an 'mlp' parameter tree has layers hidden_0, hidden_1, ... and 'output'; "
                    f"got {sorted(params)}"
                )
            paths = [("params", name) for name in [*hidden, "output"]]
        ranks = [2] * len(paths)
    elif architecture == "lenet":
        if not isinstance(params, Mapping):
            raise ValueError("a 'lenet' parameter tree must be a dict")
        convs = _numbered(list(params), "conv")
        denses = _numbered(list(params), "dense")
        unknown = set(params) - set(convs) - set(denses) - {"output"}
        if unknown or "output" not in params or not convs:
            raise ValueError(
                f"a 'lenet' parameter tree has layers conv_0, ..., dense_0, ... and 'output' "
                f"(at least one convolution); got {sorted(params)}"
            )
        paths = [("params", name) for name in [*convs, *denses, "output"]]
        ranks = [4] * len(convs) + [2] * (len(denses) + 1)
    else:  # pragma: no cover - callers check the architecture
        raise ValueError(f"not a sequential architecture: {architecture!r}")

    layers = []
    for index, (path, rank) in enumerate(zip(paths, ranks, strict=True)):
        in_features, out_units, has_bias = _layer_entry(root, path, rank)
        in_units, blocked = in_features, False
        if index > 0:
            previous = layers[-1]
            if previous.is_conv and rank == 2:
                if in_features % previous.out_units:
                    raise ValueError(
                        f"{_path_name(path)!r} has {in_features} input features, not a multiple "
                        f"of the {previous.out_units} channels of {_path_name(previous.path)!r}"
                    )
                in_units, blocked = previous.out_units, True
            elif in_features != previous.out_units:
                raise ValueError(
                    f"{_path_name(path)!r} expects {in_features} inputs but "
                    f"{_path_name(previous.path)!r} has {previous.out_units} outputs"
                )
        layers.append(_Layer(path, rank == 4, has_bias, in_units, out_units, blocked))
    return layers


def _sequential_groups(layers: list[_Layer]) -> list[_Group]:
    groups = []
    for layer, following in zip(layers[:-1], layers[1:], strict=True):
        members = [_Member((*layer.path, "kernel"), -1)]
        if layer.has_bias:
            members.append(_Member((*layer.path, "bias"), 0))
        members.append(_Member((*following.path, "kernel"), -2, following.blocked_input))
        groups.append(
            _Group(
                _path_name(layer.path[1:]),
                layer.out_units,
                1,
                (*layer.path, "kernel"),
                tuple(members),
            )
        )
    return groups


# ResNets -----------------------------------------------------------------------------------


def _resnet_norm(root: dict[str, Any], norm: str | None) -> str:
    params, state = root["params"], root["model_state"]
    has_stats = "batch_stats" in state
    has_norm = "stem_norm" in params
    if norm is None:
        if has_stats:
            return "batch"
        if has_norm:
            raise ValueError(
                "the ResNet has normalisation parameters but no batch_stats: pass norm='group' "
                "(with num_groups) or norm='layer', or pass model_state for BatchNorm"
            )
        return "none"
    _check_choice(norm, "norm", _RESNET_NORMS)
    if norm != "batch" and has_stats:
        raise ValueError(f"norm={norm!r} but model_state holds BatchNorm statistics")
    if norm == "batch" and not has_stats:
        raise ValueError(
            "norm='batch' needs model_state with the 'batch_stats' collection: BatchNorm running "
            "statistics must be permuted together with the convolutions"
        )
    if (norm == "none") == has_norm:
        raise ValueError(
            f"norm={norm!r} does not match the parameters "
            f"({'with' if has_norm else 'without'} a 'stem_norm' layer)"
        )
    return norm


def _resnet_groups(root: dict[str, Any], norm: str | None, num_groups: int) -> list[_Group]:
    params = root["params"]
    if not isinstance(params, Mapping):
        raise ValueError("a 'resnet' parameter tree must be a dict")
    norm = _resnet_norm(root, norm)
    if norm == "group" and (
        isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral)
    ):
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if norm == "group" and num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups}")
    blocks = sorted(
        (int(match.group(1)), int(match.group(2)), name)
        for name in params
        if (match := re.fullmatch(r"stage(\d+)_block(\d+)", name))
    )
    expected_top = {"stem_conv", "head", *(name for *_, name in blocks)}
    if norm != "none":
        expected_top.add("stem_norm")
    if set(params) != expected_top:
        raise ValueError(
            f"a 'resnet' parameter tree has stem_conv, stem_norm (unless norm='none'), "
            f"stage{{i}}_block{{j}} and head; got unexpected or missing entries "
            f"{sorted(set(params) ^ expected_top)}"
        )

    records: list[dict[str, Any]] = []

    def new_group(name: str, key_path: tuple[Any, ...]) -> dict[str, Any]:
        size = _shape_of(root, key_path)[-1]
        num_blocks = math.gcd(num_groups, size) if norm == "group" else 1
        record = {"name": name, "size": size, "blocks": num_blocks, "key": key_path, "members": []}
        records.append(record)
        return record

    def conv_out(record: dict[str, Any], path: tuple[Any, ...]) -> None:
        _layer_entry(root, ("params", *path), 4)
        record["members"].append(_Member(("params", *path, "kernel"), -1))
        if _has(root, ("params", *path, "bias")):
            record["members"].append(_Member(("params", *path, "bias"), 0))

    def conv_in(record: dict[str, Any], path: tuple[Any, ...]) -> None:
        record["members"].append(_Member(("params", *path, "kernel"), -2))

    def norm_members(record: dict[str, Any], path: tuple[Any, ...]) -> None:
        if norm == "none":
            return
        node = _get(root, ("params", *path))
        if not isinstance(node, Mapping) or set(node) - {"scale", "bias"}:
            raise ValueError(f"normalisation layer {_path_name(path)!r} must hold scale and bias")
        for name in node:
            record["members"].append(_Member(("params", *path, name), 0))
        if norm == "batch":
            for name in ("mean", "var"):
                stats_path = ("model_state", "batch_stats", *path, name)
                if not _has(root, stats_path):
                    raise ValueError(f"model_state lacks the BatchNorm statistic {stats_path[1:]}")
                record["members"].append(_Member(stats_path, 0))

    stream = new_group("stream_stem", ("params", "stem_conv", "kernel"))
    conv_out(stream, ("stem_conv",))
    norm_members(stream, ("stem_norm",))
    stages = [stage for stage, _, _ in blocks]
    if stages and sorted(set(stages)) != list(range(max(stages) + 1)):
        raise ValueError(f"ResNet stages must be numbered 0, 1, ...; got {sorted(set(stages))}")
    for stage in set(stages):
        block_numbers = [block for s, block, _ in blocks if s == stage]
        if block_numbers != list(range(len(block_numbers))):
            raise ValueError(
                f"blocks of stage {stage} must be numbered 0, 1, ...; got {block_numbers}"
            )
    for _, _, name in blocks:
        block = params[name]
        core = {"conv_0", "conv_1"} | ({"norm_0", "norm_1"} if norm != "none" else set())
        shortcut = {"shortcut_conv"} | ({"shortcut_norm"} if norm != "none" else set())
        if not isinstance(block, Mapping) or set(block) not in (core, core | shortcut):
            got = sorted(block) if isinstance(block, Mapping) else type(block)
            raise ValueError(
                f"block {name!r} must hold {sorted(core)} and optionally {sorted(shortcut)}; "
                f"got {got}"
            )
        internal = new_group(f"{name}/conv_0", ("params", name, "conv_0", "kernel"))
        conv_in(stream, (name, "conv_0"))
        conv_out(internal, (name, "conv_0"))
        norm_members(internal, (name, "norm_0"))
        conv_in(internal, (name, "conv_1"))
        if "shortcut_conv" in block:
            conv_in(stream, (name, "shortcut_conv"))
            stream = new_group(f"stream_{name}", ("params", name, "shortcut_conv", "kernel"))
            conv_out(stream, (name, "shortcut_conv"))
            norm_members(stream, (name, "shortcut_norm"))
        conv_out(stream, (name, "conv_1"))
        norm_members(stream, (name, "norm_1"))
    _layer_entry(root, ("params", "head"), 2)
    stream["members"].append(_Member(("params", "head", "kernel"), -2))
    return [
        _Group(r["name"], r["size"], r["blocks"], r["key"], tuple(r["members"])) for r in records
    ]


def _check_groups(root: dict[str, Any], groups: list[_Group]) -> None:
    for group in groups:
        for member in group.members:
            shape = _shape_of(root, member.path)
            if len(shape) < abs(member.axis):
                raise ValueError(
                    f"{_path_name(member.path)!r} has shape {shape}, too few axes for axis "
                    f"{member.axis}"
                )
            length = shape[member.axis]
            if (member.blocked and length % group.size) or (
                not member.blocked and length != group.size
            ):
                raise ValueError(
                    f"axis {member.axis} of {_path_name(member.path)!r} (shape {shape}) does not "
                    f"match the {group.size} units of {group.name!r}"
                )


def _structure(
    root: dict[str, Any], architecture: str, norm: str | None, num_groups: int
) -> list[_Group]:
    _check_choice(architecture, "architecture", _ARCHITECTURES)
    if architecture == "resnet":
        groups = _resnet_groups(root, norm, num_groups)
    else:
        if norm is not None:
            raise ValueError(f"norm applies to architecture='resnet' only, got norm={norm!r}")
        groups = _sequential_groups(_sequential_layers(root, architecture))
    _check_groups(root, groups)
    return groups


# Permutation primitives --------------------------------------------------------------------


def _permute_axis(array: Any, permutation: Any, axis: int, size: int) -> Any:
    """Reorders the units of ``axis`` (the minor index of a ``(blocks, size)`` layout)."""
    take = np.take if isinstance(array, np.ndarray) else jnp.take
    axis = axis % array.ndim
    shape = array.shape
    split = (*shape[:axis], shape[axis] // size, size, *shape[axis + 1 :])
    return take(array.reshape(split), permutation, axis=axis + 1).reshape(shape)


def _apply_group(root: dict[str, Any], group: _Group, permutation: Any) -> None:
    for member in group.members:
        array = _get(root, member.path)
        if not isinstance(array, np.ndarray):
            array = jnp.asarray(array)
        _set(root, member.path, _permute_axis(array, permutation, member.axis, group.size))


def _unit_keys(kernel: jax.Array, key: str) -> jax.Array:
    incoming = jnp.asarray(kernel).reshape(-1, kernel.shape[-1])  # (fan_in, units)
    if key == "max":
        return incoming[0]
    if key == "mean":
        return jnp.mean(incoming, axis=0)
    return jnp.sqrt(jnp.sum(jnp.square(incoming), axis=0))


def _sort_permutation(keys: jax.Array, num_blocks: int) -> jax.Array:
    """Descending order of ``keys``; with blocks, sorted within blocks, blocks by their top."""
    if num_blocks == 1:
        return jnp.argsort(keys, descending=True, stable=True)
    block_size = keys.shape[0] // num_blocks
    blocked = keys.reshape(num_blocks, block_size)
    within = jnp.argsort(blocked, axis=1, descending=True, stable=True)
    tops = jnp.take_along_axis(blocked, within[:, :1], axis=1)[:, 0]
    order = jnp.argsort(tops, descending=True, stable=True)
    return (within[order] + (order * block_size)[:, None]).reshape(-1)


def _random_group_permutation(uniforms: jax.Array, size: int, num_blocks: int) -> jax.Array:
    """A uniformly random permutation mapping contiguous blocks onto blocks.

    ``uniforms`` holds ``num_blocks + size`` i.i.d. uniform numbers; sorting them gives uniform
    permutations (ties have probability ~0) with a far smaller program than
    ``jax.random.permutation``.
    """
    block_size = size // num_blocks
    order = jnp.argsort(uniforms[:num_blocks])
    within = jnp.argsort(uniforms[num_blocks:].reshape(num_blocks, block_size), axis=1)
    return (within + (order * block_size)[:, None]).reshape(-1)


# One compiled program per structure and shapes (eager calls would compile every small op).


@functools.partial(jax.jit, static_argnames=("groups", "key"))
def _sorted_by_key(root: dict[str, Any], groups: tuple[_Group, ...], key: str) -> dict[str, Any]:
    root = _copy_tree(root)
    for group in groups:
        keys = _unit_keys(_get(root, group.key_path), key)
        _apply_group(root, group, _sort_permutation(keys, group.num_blocks))
    return root


@functools.partial(jax.jit, static_argnames=("groups",))
def _randomly_permuted(
    key: PRNGKey, root: dict[str, Any], groups: tuple[_Group, ...]
) -> dict[str, Any]:
    root = _copy_tree(root)
    uniforms = jax.random.uniform(key, (sum(group.num_blocks + group.size for group in groups),))
    offset = 0
    for group in groups:
        count = group.num_blocks + group.size
        permutation = _random_group_permutation(
            uniforms[offset : offset + count], group.size, group.num_blocks
        )
        _apply_group(root, group, permutation)
        offset += count
    return root


@functools.partial(jax.jit, static_argnames=("groups",))
def _permuted(
    root: dict[str, Any], groups: tuple[_Group, ...], permutations: list[jax.Array]
) -> dict[str, Any]:
    root = _copy_tree(root)
    for group, permutation in zip(groups, permutations, strict=True):
        _apply_group(root, group, permutation)
    return root


# --------------------------------------------------------------------------------------------
# Permutations
# --------------------------------------------------------------------------------------------


def canonicalize_permutation(
    params: Params,
    model_state: ModelState | None = None,
    *,
    architecture: str = "mlp",
    key: str = "max",
    norm: str | None = None,
    num_groups: int = 8,
) -> tuple[Params, ModelState]:
    r"""Removes the permutation symmetry by sorting the hidden units of every layer.

    Layers are visited from input to output. For each group of hidden units the sort key is
    computed from the incoming weights of its defining kernel (after the earlier groups have
    been sorted, so the key sees canonically ordered inputs), the units are sorted in
    *descending* key order, and the permutation is applied to every tensor axis indexed by
    those units:

    * the layer's kernel (output axis) and bias;
    * the next layer's kernel (input axis); after a convolution stack the flattened dense
      input has layout ``(height, width, channels)``, so each block of ``channels`` features
      is permuted;
    * normalisation scale and bias and the BatchNorm running ``mean`` and ``var`` (in
      ``model_state["batch_stats"]``);
    * for ResNets, everything on one stage's **residual stream** shares one permutation (stem
      or projection-shortcut outputs, every block's ``conv_1``/``norm_1`` outputs, the next
      blocks' ``conv_0`` and shortcut inputs, the head's input); the stream key comes from the
      stem convolution (stage 0) or the stage's projection shortcut. Inside each block the
      ``conv_0`` channels are sorted separately. With GroupNorm, units are sorted within their
      contiguous groups and whole groups by their largest key, the only permutations that keep
      GroupNorm's function.

    Keys (``kernel`` has its output units on the last axis; "incoming weights" is
    ``kernel.reshape(-1, units)``):

    * ``"max"``: the first incoming weight, ``kernel[0, ..., 0, unit]`` (for a convolution the
      top-left tap of input channel 0), the "max" method of Laurent et al.'s code;
    * ``"mean"``: the mean incoming weight;
    * ``"l2"``: the L2 norm of the incoming weights (invariant to the order of the inputs).

    The result is exactly a permutation of the input (no arithmetic). Ties keep the current
    order, so networks with tied keys have no unique canonical form. Pure JAX: works under
    ``jax.jit`` and ``jax.vmap`` (e.g. over posterior samples).

    Args:
      params: A parameter tree of :mod:`bnn_flat.models` (see the module docstring) or, for
        ``architecture="mlp"``, a list of ``{"kernel", "bias"}`` layers.
      model_state: Model state with BatchNorm statistics (required for BatchNorm ResNets), or
        ``None``.
      architecture: ``"mlp"``, ``"lenet"`` or ``"resnet"``.
      key: ``"max"``, ``"mean"`` or ``"l2"``.
      norm: ResNet normalisation (``"batch"``, ``"group"``, ``"layer"``, ``"none"``); ``None``
        infers ``"batch"`` from ``model_state`` and ``"none"`` from the absence of normalisation
        parameters (group and layer normalisation cannot be told apart and must be named).
      num_groups: The ResNet's ``num_groups`` (with ``norm="group"``; each layer has
        ``gcd(num_groups, channels)`` groups, as in :mod:`bnn_flat.models.resnet`).

    Returns:
      ``(params, model_state)`` in canonical order, with the input's container types;
      ``model_state`` is ``{}`` if ``None`` was given.

    Example:
      >>> import jax.numpy as jnp
      >>> params = {"hidden_0": {"kernel": jnp.array([[1.0, 3.0, 2.0]]),
      ...                        "bias": jnp.array([0.1, 0.3, 0.2])},
      ...           "output": {"kernel": jnp.array([[10.0], [30.0], [20.0]]),
      ...                      "bias": jnp.zeros(1)}}
      >>> canonical, _ = canonicalize_permutation(params, architecture="mlp")
      >>> canonical["hidden_0"]["kernel"].tolist(), canonical["output"]["kernel"][:, 0].tolist()
      ([[3.0, 2.0, 1.0]], [30.0, 20.0, 10.0])
    """
    _check_choice(key, "key", _PERMUTATION_KEYS)
    root = _make_root(params, model_state)
    groups = tuple(_structure(root, architecture, norm, num_groups))
    return _finish(_sorted_by_key(root, groups, key), params, model_state)


def random_permutation(
    key: PRNGKey,
    params: Params,
    model_state: ModelState | None = None,
    *,
    architecture: str = "mlp",
    norm: str | None = None,
    num_groups: int = 8,
) -> tuple[Params, ModelState]:
    """Applies a uniformly random function-preserving permutation of the hidden units.

    Every group of units described in :func:`canonicalize_permutation` gets an independent
    random permutation (for GroupNorm: a random order of the groups and a random order
    within each group).

    Args:
      key: A PRNG key.
      params: A parameter tree (see :func:`canonicalize_permutation`).
      model_state: Model state with BatchNorm statistics, or ``None``.
      architecture: ``"mlp"``, ``"lenet"`` or ``"resnet"``.
      norm: ResNet normalisation; see :func:`canonicalize_permutation`.
      num_groups: The ResNet's ``num_groups`` (with ``norm="group"``).

    Returns:
      ``(params, model_state)`` of a network with the same function.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = [{"kernel": jnp.array([[1.0, 2.0, 3.0]])}, {"kernel": jnp.ones((3, 1))}]
      >>> permuted, _ = random_permutation(jax.random.key(0), params)
      >>> sorted(permuted[0]["kernel"][0].tolist())
      [1.0, 2.0, 3.0]
    """
    root = _make_root(params, model_state)
    groups = tuple(_structure(root, architecture, norm, num_groups))
    return _finish(_randomly_permuted(key, root, groups), params, model_state)


def weight_matching(
    params_a: Params,
    params_b: Params,
    model_state_b: ModelState | None = None,
    *,
    architecture: str = "mlp",
    norm: str | None = None,
    num_groups: int = 8,
    max_rounds: int = 50,
) -> tuple[Params, ModelState]:
    r"""Permutes network ``b`` to best align its weights with network ``a`` (weight matching).

    Maximises :math:`\langle \theta_a, \pi(\theta_b) \rangle` over the function-preserving
    permutations :math:`\pi` (equivalently minimises :math:`\|\theta_a - \pi(\theta_b)\|^2`), by
    coordinate ascent over the groups of hidden units (Ainsworth et al. 2023, Algorithm 1 with
    a fixed input-to-output sweep order): with the other permutations fixed, the best
    permutation of one group is a linear assignment problem,

    .. math:: \max_{P} \sum_{i} C_{i, P(i)}, \qquad
              C = \sum_{\text{tensors } T \ni \text{group}} T^a_{(i, :)} \, {T^b_{(k, :)}}^\top,

    solved exactly with :func:`scipy.optimize.linear_sum_assignment` (every tensor with an
    axis indexed by the group contributes, the group's axis moved to the front and the rest
    flattened; biases and normalisation parameters included, BatchNorm statistics not). Sweeps
    repeat until one changes nothing or ``max_rounds`` is reached; a permutation is replaced
    only if it strictly improves the objective, so the iteration terminates. For a permuted
    copy of ``a`` with distinct weights the optimum is exactly the inverse permutation.

    Runs on the host (NumPy and SciPy, float64 costs); not traceable by ``jax.jit``.

    Args:
      params_a: Reference parameters.
      params_b: Parameters to permute; same structure and shapes as ``params_a``.
      model_state_b: ``b``'s model state (BatchNorm statistics are permuted with it).
      architecture: ``"mlp"``, ``"lenet"`` or ``"resnet"`` (any normalisation but GroupNorm).
      norm: ResNet normalisation; see :func:`canonicalize_permutation`.
      num_groups: The ResNet's ``num_groups`` (with ``norm="group"``).
      max_rounds: Maximum number of sweeps over all groups.

    Returns:
      ``(params, model_state)``: ``b`` permuted (same function as ``b``).

    Raises:
      NotImplementedError: For GroupNorm ResNets with more than one group per layer (the
        assignment would have to keep groups together).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> a = [{"kernel": jax.random.normal(jax.random.key(0), (3, 5))},
      ...      {"kernel": jax.random.normal(jax.random.key(1), (5, 2))}]
      >>> b, _ = random_permutation(jax.random.key(2), a)
      >>> aligned, _ = weight_matching(a, b)
      >>> bool(jnp.all(aligned[0]["kernel"] == a[0]["kernel"]))
      True
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, numbers.Integral):
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds!r}")
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive integer, got {max_rounds}")
    structure_a = jax.tree.structure(params_a)
    if structure_a != jax.tree.structure(params_b):
        raise ValueError("params_a and params_b must have the same tree structure")
    for leaf_a, leaf_b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
        if np.shape(leaf_a) != np.shape(leaf_b):
            raise ValueError(
                f"params_a and params_b have leaves of different shapes: {np.shape(leaf_a)} and "
                f"{np.shape(leaf_b)}"
            )
    root_b = _make_root(params_b, model_state_b)
    groups = _structure(root_b, architecture, norm, num_groups)
    grouped = [group.name for group in groups if group.num_blocks > 1]
    if grouped:
        raise NotImplementedError(
            f"weight_matching does not support GroupNorm (groups {grouped}): the assignment "
            f"would have to keep normalisation groups together"
        )
    to_host = lambda tree: jax.tree.map(lambda leaf: np.asarray(leaf, dtype=np.float64), tree)
    host_a = {"params": to_host(_make_root(params_a, None)["params"])}
    host_b = {"params": to_host(root_b["params"])}
    permutations = [np.arange(group.size) for group in groups]

    def unit_rows(root: dict[str, Any], member: _Member, size: int) -> np.ndarray:
        array = _get(root, member.path)
        axis = member.axis % array.ndim
        split = (*array.shape[:axis], array.shape[axis] // size, size, *array.shape[axis + 1 :])
        return np.moveaxis(array.reshape(split), axis + 1, 0).reshape(size, -1)

    for _ in range(int(max_rounds)):
        changed = False
        for index, group in enumerate(groups):
            members = [member for member in group.members if member.path[0] == "params"]
            inverse = np.argsort(permutations[index])
            cost = np.zeros((group.size, group.size))
            for member in members:
                original = _permute_axis(
                    _get(host_b, member.path), inverse, member.axis, group.size
                )
                _set(host_b, member.path, original)
                cost += (
                    unit_rows(host_a, member, group.size) @ unit_rows(host_b, member, group.size).T
                )
            _, candidate = scipy.optimize.linear_sum_assignment(cost, maximize=True)
            rows = np.arange(group.size)
            current = permutations[index]
            if cost[rows, candidate].sum() > cost[rows, current].sum() * (1 + 1e-12) + 1e-12:
                permutations[index] = candidate
                changed = changed or not np.array_equal(candidate, current)
            for member in members:
                _set(
                    host_b,
                    member.path,
                    _permute_axis(
                        _get(host_b, member.path), permutations[index], member.axis, group.size
                    ),
                )
        if not changed:
            break
    permutations = [jnp.asarray(permutation) for permutation in permutations]
    return _finish(_permuted(root_b, tuple(groups), permutations), params_b, model_state_b)


# --------------------------------------------------------------------------------------------
# Scalings
# --------------------------------------------------------------------------------------------


def _scaling_layers(root: dict[str, Any], architecture: str) -> list[_Layer]:
    _check_choice(architecture, "architecture", _ARCHITECTURES)
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(root["params"])[0]]
    names = {
        str(getattr(entry, "key", getattr(entry, "idx", ""))) for path in paths for entry in path
    }
    if any("norm" in name for name in names) or "scale" in names:
        raise ValueError(
            "the scaling symmetry of normalised networks (BatchNorm, GroupNorm, LayerNorm) is "
            "degenerate: the incoming scale of a normalised unit is arbitrary, so min-mass has "
            "no minimiser; canonicalize_scaling needs a network without normalisation layers"
        )
    if architecture == "resnet":
        raise NotImplementedError(
            "scaling canonicalisation is not implemented for ResNets: the residual stream ties "
            "the scales of all its units across a stage; supported architectures: 'mlp', 'lenet'"
        )
    return _sequential_layers(root, architecture)


def _check_activation(activation: Callable[[jax.Array], jax.Array]) -> None:
    if not callable(activation):
        raise ValueError(f"activation must be a callable, got {activation!r}")
    grid = np.linspace(-3.0, 3.0, 25, dtype=np.float32)
    try:
        # Evaluated eagerly even when canonicalize_scaling itself is traced (jit, vmap).
        with getattr(jax.core, "eval_context", contextlib.nullcontext)():
            values, doubled, halved = (
                np.asarray(activation(jnp.asarray(factor * grid))) for factor in (1.0, 2.0, 0.5)
            )
    except Exception as error:  # any failure means the activation cannot be verified
        raise ValueError(f"could not evaluate the activation on a test grid: {error}") from error
    homogeneous = np.allclose(doubled, 2.0 * values, rtol=1e-5, atol=1e-6) and np.allclose(
        halved, 0.5 * values, rtol=1e-5, atol=1e-6
    )
    if not homogeneous:
        raise ValueError(
            "the scaling symmetry needs a positively homogeneous activation (f(a x) = a f(x) for "
            "a > 0, e.g. ReLU or leaky ReLU); the given activation is not"
        )


def _layer_masses(root: dict[str, Any], layer: _Layer) -> tuple[jax.Array, jax.Array]:
    """Squared weights summed per (input unit, output unit), and squared biases."""
    kernel = jnp.asarray(_get(root, (*layer.path, "kernel")))
    squares = jnp.square(kernel)
    if layer.is_conv:
        masses = jnp.sum(squares, axis=(0, 1))
    elif layer.blocked_input:
        masses = jnp.sum(squares.reshape(-1, layer.in_units, layer.out_units), axis=0)
    else:
        masses = squares
    if layer.has_bias:
        bias_squares = jnp.square(jnp.asarray(_get(root, (*layer.path, "bias"))))
    else:
        bias_squares = jnp.zeros(layer.out_units, masses.dtype)
    return masses, bias_squares


def _rescale_layer(
    root: dict[str, Any], layer: _Layer, log_scale_in: jax.Array, log_scale_out: jax.Array
) -> None:
    """``W[j -> i] *= exp(s_out[i] - s_in[j])``, ``b[i] *= exp(s_out[i])``."""
    kernel = jnp.asarray(_get(root, (*layer.path, "kernel")))
    in_factor = jnp.exp(-log_scale_in).astype(kernel.dtype)
    out_factor = jnp.exp(log_scale_out).astype(kernel.dtype)
    if layer.blocked_input:
        in_factor = jnp.tile(in_factor, kernel.shape[-2] // layer.in_units)
    _set(root, (*layer.path, "kernel"), kernel * in_factor[:, None] * out_factor)
    if layer.has_bias:
        bias = jnp.asarray(_get(root, (*layer.path, "bias")))
        _set(root, (*layer.path, "bias"), bias * out_factor.astype(bias.dtype))


def _apply_log_scales(
    root: dict[str, Any], layers: list[_Layer], hidden_log_scales: list[jax.Array]
) -> None:
    dtype = hidden_log_scales[0].dtype if hidden_log_scales else jnp.float32
    log_scales = [
        jnp.zeros(layers[0].in_units, dtype),
        *hidden_log_scales,
        jnp.zeros(layers[-1].out_units, dtype),
    ]
    for index, layer in enumerate(layers):
        _rescale_layer(root, layer, log_scales[index], log_scales[index + 1])


def _edge_terms(
    log_masses: list[jax.Array], log_bias_squares: list[jax.Array], hidden: list[jax.Array]
) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per-edge terms ``M exp(2 (s_i - s_j))`` and per-unit bias terms ``b^2 exp(2 s_i)``."""
    dtype = log_masses[0].dtype
    scales = [
        jnp.zeros(log_masses[0].shape[0], dtype),
        *hidden,
        jnp.zeros(log_masses[-1].shape[1], dtype),
    ]
    edges = [
        jnp.exp(log_mass + 2.0 * (scales[index + 1][None, :] - scales[index][:, None]))
        for index, log_mass in enumerate(log_masses)
    ]
    biases = [
        jnp.exp(log_bias + 2.0 * scales[index + 1])
        for index, log_bias in enumerate(log_bias_squares)
    ]
    return edges, biases


def _split_hidden(vector: jax.Array, sizes: list[int]) -> list[jax.Array]:
    offsets = np.cumsum([0, *sizes])
    return [vector[offsets[k] : offsets[k + 1]] for k in range(len(sizes))]


@functools.partial(jax.jit, static_argnames=("tolerance", "max_iterations"))
def _min_mass_log_scales(
    masses: list[jax.Array],
    bias_squares: list[jax.Array],
    tolerance: float,
    max_iterations: int,
) -> list[jax.Array]:
    """Block coordinate descent on the convex min-mass objective in the log-scales.

    Unit ``i`` has incoming mass ``in_i`` (its edge terms plus its bias term, proportional to
    ``exp(2 s_i)``) and outgoing mass ``out_i`` (proportional to ``exp(-2 s_i)``). With its
    neighbours fixed, the exact minimiser over ``s_i`` is ``s_i + log(out_i / in_i) / 4``.
    Units of one layer do not interact, and a layer interacts only with its neighbours, so a
    sweep minimises all even hidden layers at once, then all odd ones. Every half-sweep
    decreases the objective; the iteration converges to the unique minimiser and stops when
    the largest relative imbalance ``|in - out| / (in + out)`` is at most ``tolerance``.
    """
    sizes = [mass.shape[1] for mass in masses[:-1]]
    dtype = jnp.result_type(masses[0].dtype, jnp.float32)
    log_masses = [jnp.log(mass.astype(dtype)) for mass in masses]  # log 0 = -inf: no edge
    log_bias_squares = [jnp.log(bias.astype(dtype)) for bias in bias_squares]

    def incoming_outgoing(hidden: list[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
        edges, biases = _edge_terms(log_masses, log_bias_squares, hidden)
        incoming = [jnp.sum(edges[k], axis=0) + biases[k] for k in range(len(sizes))]
        outgoing = [jnp.sum(edges[k + 1], axis=1) for k in range(len(sizes))]
        return incoming, outgoing

    start = [jnp.zeros(size, dtype) for size in sizes]
    incoming, outgoing = incoming_outgoing(start)
    # Units without incoming or outgoing weights have no minimiser; they keep their scale.
    active = [(into > 0) & (out > 0) for into, out in zip(incoming, outgoing, strict=True)]

    def imbalance(incoming: list[jax.Array], outgoing: list[jax.Array]) -> jax.Array:
        values = [
            jnp.where(mask, jnp.abs(into - out) / jnp.where(mask, into + out, 1.0), 0.0)
            for mask, into, out in zip(active, incoming, outgoing, strict=True)
        ]
        return jnp.max(jnp.concatenate(values), initial=0.0)

    def minimise_layers(hidden: list[jax.Array], parity: int):
        incoming, outgoing = incoming_outgoing(hidden)
        updated = []
        for k, (scales, mask) in enumerate(zip(hidden, active, strict=True)):
            if k % 2 == parity:
                ratio = jnp.where(mask, outgoing[k], 1.0) / jnp.where(mask, incoming[k], 1.0)
                scales = jnp.where(mask, scales + 0.25 * jnp.log(ratio), scales)
            updated.append(scales)
        return updated, incoming, outgoing

    def cond(state):
        _, iteration, current = state
        return (current > tolerance) & (iteration < max_iterations)

    def body(state):
        hidden, iteration, _ = state
        hidden, incoming, outgoing = minimise_layers(hidden, 0)
        if len(sizes) > 1:
            hidden, _, _ = minimise_layers(hidden, 1)
        return hidden, iteration + 1, imbalance(incoming, outgoing)

    hidden, _, _ = jax.lax.while_loop(
        cond, body, (start, jnp.asarray(0), imbalance(incoming, outgoing))
    )
    return hidden


def _row_norm_log_scales(
    masses: list[jax.Array], bias_squares: list[jax.Array], row_norm: float
) -> list[jax.Array]:
    previous = jnp.zeros(masses[0].shape[0], masses[0].dtype)
    hidden = []
    for mass, bias in zip(masses[:-1], bias_squares[:-1], strict=True):
        squared_norms = jnp.sum(mass * jnp.exp(-2.0 * previous)[:, None], axis=0) + bias
        positive = squared_norms > 0
        safe = jnp.where(positive, squared_norms, 1.0)
        previous = jnp.where(positive, math.log(row_norm) - 0.5 * jnp.log(safe), 0.0)
        hidden.append(previous)
    return hidden


def canonicalize_scaling(
    params: Params,
    *,
    architecture: str = "mlp",
    method: str = "min_mass",
    row_norm: float = 1.0,
    activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
    tolerance: float = 1e-5,
    max_iterations: int = 10_000,
) -> Params:
    r"""Removes the scaling symmetry of a ReLU network (no normalisation layers).

    Hidden unit :math:`i` of layer :math:`l` (a channel, for convolutions) gets a log-scale
    :math:`s_{l,i}`; the transformed network has
    :math:`W_{l,ij} \to W_{l,ij} e^{s_{l,i} - s_{l-1,j}}` and :math:`b_{l,i} \to b_{l,i}
    e^{s_{l,i}}`, with :math:`s = 0` on the inputs and outputs. Its function is unchanged for a
    positively homogeneous activation (max and average pooling commute with it).

    * ``"min_mass"`` (Laurent et al. 2024): the member of the orbit with the smallest squared
      norm,

      .. math:: \min_s \sum_l \sum_{ij} W_{l,ij}^2 e^{2(s_{l,i} - s_{l-1,j})}
                + \sum_l \sum_i b_{l,i}^2 e^{2 s_{l,i}},

      a strictly convex problem (sums of exponentials of linear functions), solved by exact
      block coordinate descent (with its neighbours fixed, a unit's objective is
      :math:`a e^{2 s} + c e^{-2 s}`, minimised at :math:`s = \tfrac14 \log(c / a)`; even and
      odd hidden layers alternate) until every unit's relative imbalance
      ``|in - out| / (in + out)`` is at most ``tolerance``. At the optimum every hidden unit
      balances: its incoming mass (squared incoming weights and bias) equals its outgoing mass
      (squared outgoing weights). The minimiser is unique on each orbit, so two rescalings of
      one network map to the same canonical network. Convolution weights count every spatial
      tap; the dense layer after a flatten counts every position of a channel.
    * ``"row_norm"`` (the toy of Laurent et al.'s supplementary code): layer by layer, each
      hidden unit's incoming weights and bias are rescaled to L2 norm ``row_norm``, the
      inverse scale moving to the next layer.

    Units with all-zero incoming or outgoing weights keep their scale. Pure JAX: works under
    ``jax.jit`` and ``jax.vmap``.

    Args:
      params: An ``"mlp"`` or ``"lenet"`` parameter tree (see the module docstring).
      architecture: ``"mlp"`` or ``"lenet"``.
      method: ``"min_mass"`` or ``"row_norm"``.
      row_norm: Target norm of the incoming rows for ``method="row_norm"``; positive.
      activation: The network's activation, checked numerically to be positively
        homogeneous (ReLU, leaky ReLU, identity).
      tolerance: Largest relative imbalance at which the solver stops (min-mass).
      max_iterations: Maximum number of sweeps over the layers (min-mass).

    Returns:
      The rescaled parameters (same structure and container types).

    Raises:
      ValueError: For normalisation layers (BatchNorm makes min-mass degenerate), an activation
        that is not positively homogeneous, or an unknown method.
      NotImplementedError: For ResNets (residual connections tie the scales of a stage).

    Example:
      >>> import jax.numpy as jnp
      >>> params = [{"kernel": jnp.array([[4.0]])}, {"kernel": jnp.array([[1.0]])}]
      >>> balanced = canonicalize_scaling(params)
      >>> round(float(balanced[0]["kernel"][0, 0]), 4), round(float(balanced[1]["kernel"][0, 0]), 4)
      (2.0, 2.0)
    """
    _check_choice(method, "method", _SCALING_METHODS)
    if not isinstance(row_norm, numbers.Real) or not (0.0 < row_norm < math.inf):
        raise ValueError(f"row_norm must be a positive finite number, got {row_norm!r}")
    if not isinstance(tolerance, numbers.Real) or not tolerance > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance!r}")
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, numbers.Integral):
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations!r}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be a positive integer, got {max_iterations}")
    _check_activation(activation)
    root = _make_root(params, None)
    layers = tuple(_scaling_layers(root, architecture))
    if len(layers) > 1:
        root = _canonically_scaled(
            root, layers, method, float(row_norm), float(tolerance), int(max_iterations)
        )
    return _restore_containers(root["params"], params)


@functools.partial(
    jax.jit, static_argnames=("layers", "method", "row_norm", "tolerance", "max_iterations")
)
def _canonically_scaled(
    root: dict[str, Any],
    layers: tuple[_Layer, ...],
    method: str,
    row_norm: float,
    tolerance: float,
    max_iterations: int,
) -> dict[str, Any]:
    root = _copy_tree(root)
    masses, bias_squares = zip(*(_layer_masses(root, layer) for layer in layers), strict=True)
    if method == "min_mass":
        hidden = _min_mass_log_scales(list(masses), list(bias_squares), tolerance, max_iterations)
    else:
        hidden = _row_norm_log_scales(list(masses), list(bias_squares), row_norm)
    _apply_log_scales(root, list(layers), list(hidden))
    return root


def random_scaling(
    key: PRNGKey, params: Params, *, architecture: str = "mlp", scale: float = 1.0
) -> Params:
    """Rescales every hidden unit by ``exp(scale * z)``, ``z ~ N(0, 1)``, keeping the function.

    The transformation of :func:`canonicalize_scaling` with random log-scales: a ReLU network
    without normalisation layers computes the same function afterwards.

    Args:
      key: A PRNG key.
      params: An ``"mlp"`` or ``"lenet"`` parameter tree.
      architecture: ``"mlp"`` or ``"lenet"``.
      scale: Standard deviation of the log-scales; non-negative.

    Returns:
      The rescaled parameters.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = [{"kernel": jnp.array([[2.0]])}, {"kernel": jnp.array([[3.0]])}]
      >>> scaled = random_scaling(jax.random.key(0), params)
      >>> round(float(scaled[0]["kernel"][0, 0] * scaled[1]["kernel"][0, 0]), 4)
      6.0
    """
    if not isinstance(scale, numbers.Real) or not (0.0 <= scale < math.inf):
        raise ValueError(f"scale must be a non-negative finite number, got {scale!r}")
    root = _make_root(params, None)
    layers = tuple(_scaling_layers(root, architecture))
    return _restore_containers(_randomly_scaled(key, root, layers, float(scale))["params"], params)


@functools.partial(jax.jit, static_argnames=("layers", "scale"))
def _randomly_scaled(
    key: PRNGKey, root: dict[str, Any], layers: tuple[_Layer, ...], scale: float
) -> dict[str, Any]:
    root = _copy_tree(root)
    sizes = [layer.out_units for layer in layers[:-1]]
    normals = scale * jax.random.normal(key, (sum(sizes),))
    hidden = _split_hidden(normals, sizes)
    _apply_log_scales(root, list(layers), hidden)
    return root


def check_function_preserved(
    apply_fn: ApplyFn,
    params_before: Params,
    params_after: Params,
    inputs: ArrayLike,
    atol: float = 1e-4,
    *,
    model_state_before: ModelState | None = None,
    model_state_after: ModelState | None = None,
) -> float:
    """Checks that two parameter settings give the same outputs (evaluation mode).

    Runs ``apply_fn(params, model_state, inputs, train=False, key=None)`` for both and
    compares the outputs elementwise.

    Args:
      apply_fn: A model in the library's ``apply`` form (:func:`bnn_flat.models.make_apply`).
      params_before: Original parameters.
      params_after: Transformed parameters.
      inputs: A batch of inputs, e.g. random ones.
      atol: Largest allowed absolute difference.
      model_state_before: Model state of the original (``None``: ``{}``).
      model_state_after: Model state of the transformed network (``None``: the original's).

    Returns:
      The maximum absolute difference of the outputs.

    Raises:
      ValueError: If the difference exceeds ``atol`` or is not finite.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.mlp([8], num_outputs=2)
      >>> params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 3)))
      >>> permuted, _ = random_permutation(jax.random.key(1), params)
      >>> inputs = jax.random.normal(jax.random.key(2), (16, 3))
      >>> check_function_preserved(models.make_apply(module), params, permuted, inputs) < 1e-5
      True
    """
    if not callable(apply_fn):
        raise ValueError(f"apply_fn must be callable, got {type(apply_fn)}")
    if not isinstance(atol, numbers.Real) or not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    state_before = {} if model_state_before is None else model_state_before
    state_after = state_before if model_state_after is None else model_state_after
    inputs = jnp.asarray(inputs)
    before, _ = apply_fn(params_before, state_before, inputs, train=False, key=None)
    after, _ = apply_fn(params_after, state_after, inputs, train=False, key=None)
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"outputs changed shape: {before.shape} -> {after.shape}")
    difference = float(np.max(np.abs(before - after), initial=0.0))
    if not math.isfinite(difference) or difference > atol:
        raise ValueError(
            f"the transformation changed the network function: max |difference| = {difference} "
            f"> atol = {atol}"
        )
    return difference


# --------------------------------------------------------------------------------------------
# MMD between sets of posterior samples
# --------------------------------------------------------------------------------------------


def _check_samples(samples: ArrayLike, name: str, minimum: int) -> jax.Array:
    array = jnp.asarray(samples)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must have shape (num_samples, dimension), got {array.shape}")
    if array.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0 (shape {array.shape})")
    if array.shape[0] < minimum:
        raise ValueError(f"{name} needs at least {minimum} samples, got {array.shape[0]}")
    # Value checks run in NumPy on concrete arrays (no compilation); skipped while tracing.
    if not isinstance(array, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(array))):
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _check_kernels(kernels: Sequence[str]) -> tuple[str, ...]:
    if isinstance(kernels, str):
        kernels = (kernels,)
    kernels = tuple(kernels)
    if not kernels:
        raise ValueError("kernels must name at least one kernel")
    for kernel in kernels:
        _check_choice(kernel, "kernel", _KERNELS)
    if len(set(kernels)) != len(kernels):
        raise ValueError(f"kernels must not repeat, got {kernels}")
    return kernels


def _check_positive_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pairwise_distances(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """L1 and L2 distances between the rows of ``a`` and of ``b``, by chunks of rows."""
    chunk = max(1, _DISTANCE_CHUNK_ELEMENTS // max(1, b.shape[0] * b.shape[1]))

    def row(point: jax.Array) -> tuple[jax.Array, jax.Array]:
        difference = b - point
        return (
            jnp.sum(jnp.abs(difference), axis=-1),
            jnp.sqrt(jnp.sum(difference * difference, axis=-1)),
        )

    return jax.lax.map(row, a, batch_size=min(chunk, a.shape[0]))


def _kernel_values(kernel: str, distances: jax.Array, bandwidths: jax.Array) -> jax.Array:
    scaled = distances[None] / bandwidths[:, None, None]
    return jnp.exp(-jnp.square(scaled)) if kernel == "gaussian" else jnp.exp(-scaled)


@functools.partial(jax.jit, static_argnames=("kernels", "num_bandwidths", "max_samples"))
def _bandwidths(
    x: jax.Array, y: jax.Array, kernels: tuple[str, ...], num_bandwidths: int, max_samples: int
) -> dict[str, jax.Array]:
    l1, l2 = _pairwise_distances(x[:max_samples], y[:max_samples])
    result = {}
    for kernel in kernels:
        distances = (l2 if kernel == "gaussian" else l1).reshape(-1)
        ordered = jnp.sort(distances)
        quantile = jnp.maximum(ordered[int(math.floor(0.05 * distances.shape[0]))], 0.1)
        smallest = jnp.where(ordered[0] < 0.1, quantile, ordered[0])
        lower = smallest / 2.0
        upper = 2.0 * jnp.maximum(ordered[-1], 0.3)
        exponents = jnp.arange(num_bandwidths, dtype=distances.dtype) / (num_bandwidths - 1)
        result[kernel] = lower * jnp.exp(exponents * jnp.log(upper / lower))
    return result


def mmd_bandwidths(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kernels: Sequence[str] = ("gaussian", "laplace"),
    num_bandwidths: int = 10,
    max_samples: int = 500,
) -> dict[str, jax.Array]:
    r"""The MMDAgg bandwidth grids (Schrab et al. 2023) for two sample sets.

    From the distances :math:`d` between the first ``max_samples`` rows of ``x`` and the first
    ``max_samples`` rows of ``y`` (all cross pairs; L2 distances for the Gaussian kernel, L1
    for the Laplace kernel):

    * :math:`\lambda_{\min} = \min d`, unless :math:`\min d < 0.1`, in which case it is the
      5% quantile (the sorted distance at index :math:`\lfloor 0.05 \cdot \#d \rfloor`) floored
      at 0.1;
    * :math:`\lambda_{\max} = \max(\max d, 0.3)`;
    * :math:`\lambda_i = \frac{\lambda_{\min}}{2} \left(\frac{4 \lambda_{\max}}
      {\lambda_{\min}}\right)^{i / (K - 1)}`, :math:`i = 0, \dots, K - 1`: a geometric grid from
      :math:`\lambda_{\min} / 2` to :math:`2 \lambda_{\max}`.

    Args:
      x: Samples, shape ``(m, dimension)``.
      y: Samples, shape ``(n, dimension)``.
      kernels: Any of ``"gaussian"`` and ``"laplace"``.
      num_bandwidths: ``K``, at least 2.
      max_samples: Rows of each set used for the distances.

    Returns:
      A dict from kernel name to its ``(num_bandwidths,)`` grid.

    Example:
      >>> import jax.numpy as jnp
      >>> grid = mmd_bandwidths(jnp.array([[0.0], [1.0]]), jnp.array([[3.0]]), num_bandwidths=3)
      >>> [round(float(value), 4) for value in grid["laplace"]]
      [1.0, 2.4495, 6.0]
    """
    kernels = _check_kernels(kernels)
    num_bandwidths = _check_positive_int(num_bandwidths, "num_bandwidths", 2)
    max_samples = _check_positive_int(max_samples, "max_samples", 1)
    x = _check_samples(x, "x", 1)
    y = _check_samples(y, "y", 1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape} and {y.shape}")
    dtype = jnp.result_type(x.dtype, y.dtype)
    return _bandwidths(x.astype(dtype), y.astype(dtype), kernels, num_bandwidths, max_samples)


@functools.partial(jax.jit, static_argnames=("kernels", "exclude_diagonal"))
def _kernel_means(
    a: jax.Array,
    b: jax.Array,
    bandwidths: dict[str, jax.Array],
    kernels: tuple[str, ...],
    exclude_diagonal: bool,
) -> dict[str, jax.Array]:
    """Mean kernel value between the rows of ``a`` and ``b``, per kernel and bandwidth."""
    l1, l2 = _pairwise_distances(a, b)
    result = {}
    for kernel in kernels:
        values = _kernel_values(kernel, l2 if kernel == "gaussian" else l1, bandwidths[kernel])
        rows, cols = values.shape[1:]
        if exclude_diagonal:
            off_diagonal = ~jnp.eye(rows, dtype=bool)
            total = jnp.sum(jnp.where(off_diagonal, values, 0.0), axis=(1, 2))
            result[kernel] = total / (rows * (rows - 1))
        else:
            result[kernel] = jnp.sum(values, axis=(1, 2)) / (rows * cols)
    return result


def mmd(
    x: ArrayLike,
    y: ArrayLike,
    *,
    kernels: Sequence[str] = ("gaussian", "laplace"),
    num_bandwidths: int = 10,
    unbiased: bool = True,
    max_samples: int = 500,
    bandwidths: Mapping[str, ArrayLike] | None = None,
) -> dict[str, jax.Array]:
    r"""Squared maximum mean discrepancy between two sample sets, over a grid of kernels.

    For each kernel :math:`k` (``"gaussian"``: :math:`e^{-\|u - v\|_2^2 / \lambda^2}`;
    ``"laplace"``: :math:`e^{-\|u - v\|_1 / \lambda}`) and bandwidth :math:`\lambda` of the
    MMDAgg grid (:func:`mmd_bandwidths`), the unbiased U-statistic

    .. math:: \widehat{\mathrm{MMD}}^2 = \frac{1}{m(m-1)} \sum_{i \ne i'} k(x_i, x_{i'})
              + \frac{1}{n(n-1)} \sum_{j \ne j'} k(y_j, y_{j'})
              - \frac{2}{mn} \sum_{i, j} k(x_i, y_j),

    which equals the permutation-formula estimator of MMDAgg (Schrab et al. 2023) at the
    identity permutation (as in Laurent et al.'s ``mmd_torch.py``). It can be slightly negative.
    ``unbiased=False`` gives the V-statistic (all pairs, including :math:`i = i'`), which is
    non-negative, and exactly 0 when ``x`` equals ``y`` (in eager calls; inside an outer
    ``jax.jit`` rounding may differ between the blocks). Values are MMD², not square-rooted,
    and not rescaled.

    Aggregation (the paper's choice is not documented; Laurent et al. report one number): the
    result holds the ``2 x num_bandwidths`` values and both their ``"max"`` (the most
    discriminative kernel, as in an aggregated test) and their ``"mean"``.

    Memory and time are quadratic in the number of samples and linear in the dimension.

    Args:
      x: Samples, shape ``(m, dimension)``; ``m >= 2`` for the unbiased estimator.
      y: Samples, shape ``(n, dimension)``.
      kernels: Any of ``"gaussian"`` and ``"laplace"``.
      num_bandwidths: Bandwidths per kernel, at least 2.
      unbiased: U-statistic (default) or V-statistic.
      max_samples: Rows of each set used to choose the bandwidths.
      bandwidths: Optional fixed grids ``{kernel: (num_bandwidths,) array}`` instead of the
        data-dependent rule (e.g. to compare several pairs of sets on one grid).

    Returns:
      A dict with, per kernel, ``kernel`` (MMD² per bandwidth) and ``kernel + "_bandwidths"``,
      and the scalars ``"max"`` and ``"mean"`` over all kernels and bandwidths.

    Example:
      >>> import jax
      >>> x = jax.random.normal(jax.random.key(0), (50, 2))
      >>> result = mmd(x, x + 3.0)
      >>> result["gaussian"].shape, bool(result["max"] > 0.5)
      ((10,), True)
    """
    kernels = _check_kernels(kernels)
    num_bandwidths = _check_positive_int(num_bandwidths, "num_bandwidths", 2)
    if not isinstance(unbiased, bool):
        raise ValueError(f"unbiased must be a bool, got {unbiased!r}")
    minimum = 2 if unbiased else 1
    x = _check_samples(x, "x", minimum)
    y = _check_samples(y, "y", minimum)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape} and {y.shape}")
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    if bandwidths is None:
        grids = mmd_bandwidths(
            x, y, kernels=kernels, num_bandwidths=num_bandwidths, max_samples=max_samples
        )
    else:
        if not isinstance(bandwidths, Mapping) or set(kernels) - set(bandwidths):
            raise ValueError(f"bandwidths must be a dict with an entry for each of {kernels}")
        grids = {}
        for kernel in kernels:
            grid = jnp.asarray(bandwidths[kernel], dtype)
            if grid.ndim != 1 or grid.shape[0] < 1:
                raise ValueError(f"bandwidths[{kernel!r}] must be a non-empty 1-D array")
            if not isinstance(grid, jax.core.Tracer) and not np.all(
                (np.asarray(grid) > 0) & np.isfinite(np.asarray(grid))
            ):
                raise ValueError(f"bandwidths[{kernel!r}] must be positive and finite")
            grids[kernel] = grid
    # Three calls of one compiled program (rather than one fused program): for equal sets the
    # three means are then bitwise equal, and the V-statistic is exactly 0.
    mean_xx = _kernel_means(x, x, grids, kernels, unbiased)
    mean_yy = _kernel_means(y, y, grids, kernels, unbiased)
    mean_xy = _kernel_means(x, y, grids, kernels, False)
    values = {
        kernel: mean_xx[kernel] + mean_yy[kernel] - 2.0 * mean_xy[kernel] for kernel in kernels
    }
    result: dict[str, jax.Array] = {}
    for kernel in kernels:
        result[kernel] = values[kernel]
        result[f"{kernel}_bandwidths"] = grids[kernel]
    stacked = jnp.concatenate([values[kernel] for kernel in kernels])
    result["max"] = jnp.max(stacked)
    result["mean"] = jnp.mean(stacked)
    return result


def _flatten_samples(samples: Any, name: str) -> jax.Array:
    leaves = jax.tree.leaves(samples)
    if not leaves:
        raise ValueError(f"{name} has no arrays")
    leaves = [jnp.asarray(leaf) for leaf in leaves]
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every leaf of {name} must have the same leading (sample) axis, got sizes {sizes}"
        )
    count = sizes.pop()
    return jnp.concatenate([leaf.reshape(count, -1) for leaf in leaves], axis=1)


def posterior_mmd(
    samples_a: Any,
    samples_b: Any,
    *,
    canonicalize: Callable[[Any], Any] | None = None,
    kernels: Sequence[str] = ("gaussian", "laplace"),
    num_bandwidths: int = 10,
    unbiased: bool = True,
    max_samples: int = 500,
    bandwidths: Mapping[str, ArrayLike] | None = None,
) -> dict[str, jax.Array]:
    """MMD between two posteriors given as stacked parameter samples (optionally symmetry-free).

    Each sample (a pytree slice along the leading axis) is optionally passed through
    ``canonicalize`` (applied with ``jax.vmap``, so it must be traceable, as
    :func:`canonicalize_permutation` and :func:`canonicalize_scaling` are), flattened into one
    vector (leaves in ``jax.tree.leaves`` order) and compared with :func:`mmd`. With a
    canonicalisation this is the "NS" (no symmetry) MMD of Laurent et al. (2024); remove
    scalings before permutations, since the permutation keys depend on the scales.

    Args:
      samples_a: A pytree whose leaves have a leading axis of ``m`` samples.
      samples_b: A pytree of the same structure with ``n`` samples.
      canonicalize: ``None`` or a function from one sample to a pytree, e.g.
        ``lambda p: canonicalize_permutation(p, architecture="mlp")[0]``.
      kernels: See :func:`mmd`.
      num_bandwidths: See :func:`mmd`.
      unbiased: See :func:`mmd`.
      max_samples: See :func:`mmd`.
      bandwidths: See :func:`mmd`.

    Returns:
      The dict of :func:`mmd`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.mlp([4], num_outputs=1)
      >>> samples, _ = models.init_ensemble(module, jax.random.key(0), jnp.ones((1, 2)), 8)
      >>> keys = jax.random.split(jax.random.key(1), 8)
      >>> shuffled, _ = jax.vmap(random_permutation)(keys, samples)
      >>> canonical = lambda p: canonicalize_permutation(p)[0]
      >>> float(posterior_mmd(samples, shuffled, canonicalize=canonical, unbiased=False)["max"])
      0.0
    """
    if jax.tree.structure(samples_a) != jax.tree.structure(samples_b):
        raise ValueError("samples_a and samples_b must have the same tree structure")
    if canonicalize is not None:
        if not callable(canonicalize):
            raise ValueError(f"canonicalize must be callable or None, got {canonicalize!r}")
        samples_a = jax.vmap(canonicalize)(samples_a)
        samples_b = jax.vmap(canonicalize)(samples_b)
    return mmd(
        _flatten_samples(samples_a, "samples_a"),
        _flatten_samples(samples_b, "samples_b"),
        kernels=kernels,
        num_bandwidths=num_bandwidths,
        unbiased=unbiased,
        max_samples=max_samples,
        bandwidths=bandwidths,
    )


# --------------------------------------------------------------------------------------------
# Functional diversity
# --------------------------------------------------------------------------------------------


def _check_member_log_probs(member_log_probs: ArrayLike) -> jax.Array:
    array = jnp.asarray(member_log_probs)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"member_log_probs must be floating point, got dtype {array.dtype}")
    if array.ndim != 3:
        raise ValueError(
            f"member_log_probs must have shape (num_members, num_data, num_classes), got "
            f"{array.shape}"
        )
    if 0 in array.shape:
        raise ValueError(f"member_log_probs is empty (shape {array.shape})")
    if array.shape[0] < 2:
        raise ValueError(f"member_log_probs needs at least 2 members, got {array.shape[0]}")
    if not isinstance(array, jax.core.Tracer) and np.any(
        np.isnan(np.asarray(array)) | (np.asarray(array) == np.inf)
    ):
        raise ValueError("member_log_probs contains NaN or +inf")
    return array


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _pairwise_mutual_information(members: jax.Array, batch_size: int) -> jax.Array:
    num_members = members.shape[0]
    rows, cols = np.triu_indices(num_members, 1)
    pairs = jnp.stack([jnp.asarray(rows), jnp.asarray(cols)], axis=1)
    per_pair = jax.lax.map(
        lambda pair: jnp.mean(metrics.mutual_information(members[pair])),
        pairs,
        batch_size=min(batch_size, pairs.shape[0]),
    )
    upper = jnp.zeros((num_members, num_members), per_pair.dtype).at[rows, cols].set(per_pair)
    return upper + upper.T


def pairwise_mutual_information(
    member_log_probs: ArrayLike, *, batch_size: int | None = None
) -> jax.Array:
    r"""Mutual information of every pair of members, averaged over inputs.

    For members :math:`a, b` with predictives :math:`p_a, p_b` on input :math:`x`,

    .. math:: I_{ab}(x) = H\left(\tfrac{p_a + p_b}{2}\right) - \tfrac12 \left(H(p_a) +
              H(p_b)\right),

    computed by :func:`bnn_flat.metrics.mutual_information` on the two members, and
    :math:`I_{ab} = \frac1N \sum_x I_{ab}(x)`. The distribution of :math:`I_{ab}` over pairs
    measures functional diversity (Laurent et al. 2024: in-distribution values concentrate
    near 0, "functional collapse"); take ``result[jnp.triu_indices(num_members, 1)]`` for the
    values of the distinct pairs. Each value lies in :math:`[0, \log 2]` nats.

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``, at least two members.
      batch_size: Pairs evaluated at once (bounds memory); ``None`` picks a size keeping about
        ``2**22`` probabilities in flight.

    Returns:
      The symmetric ``(num_members, num_members)`` matrix of :math:`I_{ab}`, zero diagonal.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.0]]]))
      >>> [[round(float(v), 4) for v in row] for row in pairwise_mutual_information(members)]
      [[0.0, 0.6931, 0.0], [0.6931, 0.0, 0.6931], [0.0, 0.6931, 0.0]]
    """
    members = _check_member_log_probs(member_log_probs)
    if batch_size is None:
        batch_size = max(1, 2**22 // (2 * members.shape[1] * members.shape[2]))
    batch_size = _check_positive_int(batch_size, "batch_size", 1)
    return _pairwise_mutual_information(members, batch_size)


@jax.jit
def _pairwise_disagreement(members: jax.Array) -> jax.Array:
    num_members, num_data, num_classes = members.shape
    predictions = jnp.argmax(members, axis=-1)

    def add_class(label, agreement):
        votes = (predictions == label).astype(jnp.float32)
        return agreement + votes @ votes.T

    agreement = jax.lax.fori_loop(
        0, num_classes, add_class, jnp.zeros((num_members, num_members), jnp.float32)
    )
    # Integer counts are exact in float32; dividing the disagreeing count keeps the diagonal 0.
    return ((num_data - agreement) / num_data).astype(members.dtype)


def pairwise_disagreement(member_log_probs: ArrayLike) -> jax.Array:
    """Fraction of inputs on which each pair of members predicts different classes.

    Predictions are ``argmax`` (first index on ties), as in
    :func:`bnn_flat.metrics.disagreement`, whose value equals the mean of this matrix over
    its off-diagonal entries.

    Args:
      member_log_probs: Member log-probabilities, shape ``(num_members, num_data,
        num_classes)``, at least two members.

    Returns:
      The symmetric ``(num_members, num_members)`` matrix of fractions, zero diagonal.

    Example:
      >>> import jax.numpy as jnp
      >>> members = jnp.log(jnp.array([[[0.9, 0.1], [0.9, 0.1]], [[0.9, 0.1], [0.2, 0.8]]]))
      >>> pairwise_disagreement(members).tolist()
      [[0.0, 0.5], [0.5, 0.0]]
    """
    return _pairwise_disagreement(_check_member_log_probs(member_log_probs))
