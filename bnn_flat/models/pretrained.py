"""Pretrained backbones: read weight files and import torchvision ResNets and timm ViTs.

Bayesian transfer learning (SA-BMA and friends) starts from an ImageNet backbone. This module
reads weight files written by PyTorch tooling and maps them onto our Flax modules:

* :func:`load_state_dict` reads ``.safetensors`` (with a small NumPy reader of our own, no
  ``safetensors`` or ``torch`` package needed) and ``.npz`` files into ``{name: ndarray}``;
  :func:`save_safetensors` writes the same format.
* :func:`import_torchvision_resnet` maps a torchvision ``resnet18/34/50`` state dict onto
  :class:`~bnn_flat.models.resnet_imagenet.ImageNetResNet`; :func:`import_timm_vit` maps a
  timm ``vit_*`` state dict onto :class:`~bnn_flat.models.vit.VisionTransformer`.
* :func:`load_pretrained` does both steps and returns ``(params, model_state)`` in the format
  of :func:`bnn_flat.models.make_apply`.

Name and layout mapping (torch name on the left, Flax path on the right)::

    conv1.weight            (O, I, H, W)  ->  params/conv1/kernel          (H, W, I, O)
    bn1.weight / bn1.bias                 ->  params/bn1/scale, bias
    bn1.running_mean / running_var        ->  batch_stats/bn1/mean, var
    bn1.num_batches_tracked               ->  (skipped)
    layer1.0.conv1.weight                 ->  params/layer1_0/conv1/kernel
    layer2.0.downsample.0 / .1            ->  params/layer2_0/downsample_conv, downsample_bn
    fc.weight               (out, in)     ->  params/fc/kernel             (in, out)
    blocks.3.attn.qkv.weight              ->  params/blocks_3/attn/qkv/kernel
    blocks.3.norm1.weight                 ->  params/blocks_3/norm1/scale
    cls_token, pos_embed                  ->  params/cls_token, pos_embed  (unchanged)

Every import checks that the file holds exactly the tensors the module needs, with the right
shapes, and reports all missing, unexpected and misshaped tensors by name in one
``ValueError``. Imported arrays are float32.

With ``include_head=False`` (transfer to new classes) the classifier tensors of the file
(``fc.*`` or ``head.*``) are ignored, and the head is taken from ``initial_params``, the
freshly initialised parameters of the module (from :func:`bnn_flat.models.init`).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from bnn_flat.models.bridge import init as _init_model
from bnn_flat.models.resnet_imagenet import ImageNetResNet
from bnn_flat.models.vit import VisionTransformer
from bnn_flat.types import ModelState, Params, PRNGKey

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_state_dict",
    "save_safetensors",
    "expected_state_dict_shapes",
    "import_torchvision_resnet",
    "import_timm_vit",
    "load_pretrained",
    "interpolate_position_embedding",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel (RGB) mean of ImageNet images in [0, 1], used by torchvision and most timm
ResNet weights."""

IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel (RGB) standard deviation matching :data:`IMAGENET_MEAN`."""

# safetensors dtype codes -> little-endian NumPy dtypes (BF16 is decoded separately).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_MAX_HEADER_BYTES = 100_000_000
_MAX_LISTED = 20


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a weight file into a dict of NumPy arrays.

    Supported formats, chosen by the file suffix:

    * ``.safetensors``: F64, F32, F16, BF16, I64, I32, I16, I8, U8 and BOOL tensors. BF16
      tensors are returned as float32 (exactly: the 16 bits become the high half of a
      float32); every other dtype is kept.
    * ``.npz``: NumPy archives (``numpy.savez``), loaded without pickle.

    PyTorch pickles (``.pt``, ``.pth``, ``.bin``) are not read; convert them once with
    ``safetensors.torch.save_file`` (see ``docs/pretrained.md``).

    Args:
      path: Path of the file.

    Returns:
      ``{name: array}`` in the file's order.

    Example:
      >>> import os, tempfile, numpy as np
      >>> from bnn_flat.models import pretrained
      >>> path = os.path.join(tempfile.mkdtemp(), "weights.safetensors")
      >>> pretrained.save_safetensors(path, {"fc.bias": np.arange(3, dtype=np.float32)})
      >>> pretrained.load_state_dict(path)
      {'fc.bias': array([0., 1., 2.], dtype=float32)}
    """
    path = os.fspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".safetensors", ".npz"):
        hint = ""
        if suffix in (".pt", ".pth", ".bin", ".ckpt"):
            hint = (
                " (a PyTorch pickle: convert it with safetensors.torch.save_file, see "
                "docs/pretrained.md)"
            )
        raise ValueError(
            f"unknown weight file format {suffix!r} for {path}{hint}; supported: .safetensors, .npz"
        )
    if not os.path.isfile(path):
        raise ValueError(f"weight file not found: {path}")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    return _read_safetensors(path)


def save_safetensors(
    path: str | os.PathLike,
    arrays: Mapping[str, Any],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes arrays to a ``.safetensors`` file.

    Layout: an 8-byte little-endian header length, a JSON header
    ``{name: {"dtype", "shape", "data_offsets"}}`` (plus ``"__metadata__"`` when given) padded
    with spaces to a multiple of 8 bytes, then the raw little-endian tensor bytes.

    Args:
      path: Output path (overwritten).
      arrays: ``{name: array}`` of float64/32/16, bfloat16 (``ml_dtypes.bfloat16``, e.g.
        ``jnp.bfloat16``), int64/32/16/8, uint8 or bool arrays (NumPy or JAX).
      metadata: Optional string-to-string metadata stored in the header.

    Example:
      >>> import os, tempfile, numpy as np, jax.numpy as jnp
      >>> from bnn_flat.models import pretrained
      >>> path = os.path.join(tempfile.mkdtemp(), "half.safetensors")
      >>> pretrained.save_safetensors(path, {"w": np.array([1.5, -2.0], dtype=jnp.bfloat16)})
      >>> pretrained.load_state_dict(path)["w"]
      array([ 1.5, -2. ], dtype=float32)
    """
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays must be a mapping from names to arrays, got {type(arrays)}")
    if metadata is not None and (
        not isinstance(metadata, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise ValueError("metadata must be a mapping from strings to strings")
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    encoded = []
    offset = 0
    for name, value in arrays.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        array = np.asarray(value)
        code = _safetensors_code(name, array.dtype)
        if code == "BF16":
            array = array.view(np.uint16)
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header[name] = {
            "dtype": code,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        encoded.append(array)
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as file:
        file.write(len(header_bytes).to_bytes(8, "little"))
        file.write(header_bytes)
        for array in encoded:
            file.write(array.tobytes())


def expected_state_dict_shapes(
    module: nn.Module, *, include_head: bool = True
) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes (PyTorch layout) that a module imports.

    Derived from the module's own parameter tree (via ``jax.eval_shape``, no allocation).
    ResNet files may also hold ``*.num_batches_tracked`` counters, which the import ignores.

    Args:
      module: An :class:`~bnn_flat.models.resnet_imagenet.ImageNetResNet` (torchvision
        names) or a :class:`~bnn_flat.models.vit.VisionTransformer` (timm names).
      include_head: Whether to list the classifier (``fc.*`` or ``head.*``).

    Returns:
      ``{torch_name: torch_shape}``.

    Example:
      >>> from bnn_flat.models import pretrained
      >>> from bnn_flat.models.resnet_imagenet import resnet18
      >>> shapes = pretrained.expected_state_dict_shapes(resnet18(num_classes=10))
      >>> shapes["conv1.weight"], shapes["layer2.0.downsample.1.running_var"], shapes["fc.weight"]
      ((64, 3, 7, 7), (128,), (10, 512))
    """
    entries = _expected_entries(module)
    head = _head_prefix(module)
    return {
        name: entry[2]
        for name, entry in entries.items()
        if include_head or not name.startswith(head)
    }


def import_torchvision_resnet(
    state_dict: Mapping[str, Any],
    module: ImageNetResNet,
    *,
    include_head: bool = True,
    initial_params: Params | None = None,
) -> tuple[Params, Params]:
    """Maps a torchvision ResNet state dict onto an :class:`ImageNetResNet`.

    Convolution weights go from ``(out, in, h, w)`` to ``(h, w, in, out)``, linear weights
    from ``(out, in)`` to ``(in, out)``; BatchNorm ``weight``, ``bias``, ``running_mean`` and
    ``running_var`` become ``scale``, ``bias`` (params) and ``mean``, ``var`` (batch stats).
    ``num_batches_tracked`` counters are skipped.

    Args:
      state_dict: ``{torch_name: array}``, e.g. from :func:`load_state_dict`.
      module: The target module (its ``stage_sizes``, ``block``, ``width`` and
        ``num_classes`` fix the expected names and shapes).
      include_head: Import ``fc.weight`` and ``fc.bias`` too. With ``False`` the file's
        ``fc.*`` tensors are ignored and the head comes from ``initial_params``.
      initial_params: The module's freshly initialised ``params`` (from
        :func:`bnn_flat.models.init`); required when ``include_head`` is false.

    Returns:
      ``(params, batch_stats)``; use ``model_state = {"batch_stats": batch_stats}``.

    Raises:
      ValueError: If tensors are missing, unexpected, misshaped, not floating point or not
        finite; the message names them all.

    Example:
      >>> import numpy as np
      >>> from bnn_flat.models import pretrained
      >>> from bnn_flat.models.resnet_imagenet import ImageNetResNet
      >>> module = ImageNetResNet(stage_sizes=(1,), block="basic", num_classes=2, width=4)
      >>> shapes = pretrained.expected_state_dict_shapes(module)
      >>> state_dict = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
      >>> params, batch_stats = pretrained.import_torchvision_resnet(state_dict, module)
      >>> params["conv1"]["kernel"].shape, batch_stats["bn1"]["var"].shape
      ((7, 7, 3, 4), (4,))
    """
    if not isinstance(module, ImageNetResNet):
        raise ValueError(f"module must be an ImageNetResNet, got {type(module).__name__}")
    variables = _import(state_dict, module, include_head, initial_params)
    return variables["params"], variables["batch_stats"]


def import_timm_vit(
    state_dict: Mapping[str, Any],
    module: VisionTransformer,
    *,
    include_head: bool = True,
    initial_params: Params | None = None,
) -> Params:
    """Maps a timm ViT state dict onto a :class:`VisionTransformer`.

    The patch-embedding convolution goes from ``(out, in, h, w)`` to ``(h, w, in, out)``,
    linear weights (including the fused ``attn.qkv``, whose output order (q, k, v) x heads x
    head_dim our attention uses as well) from ``(out, in)`` to ``(in, out)``; LayerNorm
    ``weight`` becomes ``scale``; ``cls_token`` and ``pos_embed`` are copied.

    Args:
      state_dict: ``{timm_name: array}``, e.g. from :func:`load_state_dict`.
      module: The target module; its ``image_size`` must match the file's ``pos_embed``
        (else resample it first with :func:`interpolate_position_embedding`).
      include_head: Import ``head.weight`` and ``head.bias`` too. With ``False`` the file's
        ``head.*`` tensors are ignored and the head comes from ``initial_params``.
      initial_params: The module's freshly initialised ``params`` (from
        :func:`bnn_flat.models.init`); required when ``include_head`` is false.

    Returns:
      ``params`` (a ViT has no model state: use ``model_state = {}``).

    Raises:
      ValueError: If tensors are missing, unexpected, misshaped, not floating point or not
        finite; the message names them all.

    Example:
      >>> import numpy as np
      >>> from bnn_flat.models import pretrained
      >>> from bnn_flat.models.vit import VisionTransformer
      >>> module = VisionTransformer(num_classes=2, image_size=8, patch_size=4, dim=8,
      ...                            depth=1, num_heads=2)
      >>> shapes = pretrained.expected_state_dict_shapes(module)
      >>> state_dict = {name: np.ones(shape, np.float32) for name, shape in shapes.items()}
      >>> params = pretrained.import_timm_vit(state_dict, module)
      >>> params["blocks_0"]["attn"]["qkv"]["kernel"].shape
      (8, 24)
    """
    if not isinstance(module, VisionTransformer):
        raise ValueError(f"module must be a VisionTransformer, got {type(module).__name__}")
    return _import(state_dict, module, include_head, initial_params)["params"]


def load_pretrained(
    path: str | os.PathLike,
    module: ImageNetResNet | VisionTransformer,
    key: PRNGKey,
    sample_inputs: jax.Array,
    *,
    include_head: bool = True,
) -> tuple[Params, ModelState]:
    """Reads a weight file and imports it into a module, in the bridge's format.

    Dispatches on the module: torchvision names for :class:`ImageNetResNet`, timm names for
    :class:`VisionTransformer`. With ``include_head=False`` the module is first initialised
    with :func:`bnn_flat.models.init` (``key``, ``sample_inputs``) and keeps that fresh head;
    with ``include_head=True`` no initialisation runs and ``key`` is unused.

    Args:
      path: A ``.safetensors`` or ``.npz`` file (see :func:`load_state_dict`).
      module: The target module.
      key: PRNG key for the fresh head.
      sample_inputs: A batch of example inputs (only shape and dtype matter).
      include_head: Import the file's classifier (same classes) or keep a new one (transfer).

    Returns:
      ``(params, model_state)`` for :func:`bnn_flat.models.make_apply`: ``model_state`` is
      ``{"batch_stats": ...}`` for ResNets and ``{}`` for ViTs.

    Example:
      >>> import os, tempfile, jax, numpy as np, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models import pretrained
      >>> from bnn_flat.models.resnet_imagenet import ImageNetResNet
      >>> module = ImageNetResNet(stage_sizes=(1,), block="basic", num_classes=10, width=4)
      >>> shapes = pretrained.expected_state_dict_shapes(module)
      >>> path = os.path.join(tempfile.mkdtemp(), "backbone.safetensors")
      >>> pretrained.save_safetensors(
      ...     path, {name: np.ones(shape, np.float32) for name, shape in shapes.items()})
      >>> params, model_state = pretrained.load_pretrained(
      ...     path, module, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> params["fc"]["kernel"].shape, sorted(model_state)
      ((4, 10), ['batch_stats'])
    """
    if not isinstance(module, ImageNetResNet | VisionTransformer):
        raise ValueError(
            f"load_pretrained supports ImageNetResNet and VisionTransformer modules, got "
            f"{type(module).__name__}"
        )
    state_dict = load_state_dict(path)
    initial_params = None
    if not include_head:
        initial_params, _ = _init_model(module, key, sample_inputs)
    variables = _import(state_dict, module, include_head, initial_params)
    params = variables.pop("params")
    return params, variables


def interpolate_position_embedding(
    pos_embed: Any, grid_size: int, *, num_prefix_tokens: int = 1
) -> np.ndarray:
    """Resamples ViT position embeddings to another patch grid (another image size).

    The prefix (class token) embeddings are kept; the square grid of patch embeddings is
    resized bicubically (``jax.image.resize``). timm's own resampling uses PyTorch's bicubic
    kernel, whose coefficient differs (-0.75 against -0.5), so the values are close to but
    not identical with timm's.

    Args:
      pos_embed: Array of shape ``(1, num_prefix_tokens + g * g, dim)``.
      grid_size: The new grid side, ``image_size // patch_size``.
      num_prefix_tokens: Number of leading non-patch tokens (1 for the class token).

    Returns:
      A float32 array of shape ``(1, num_prefix_tokens + grid_size**2, dim)``.

    Example:
      >>> import numpy as np
      >>> from bnn_flat.models import pretrained
      >>> pos_embed = np.ones((1, 1 + 14 * 14, 8), np.float32)
      >>> resized = pretrained.interpolate_position_embedding(pos_embed, 24)
      >>> resized.shape, bool(np.allclose(resized, 1.0))
      ((1, 577, 8), True)
    """
    pos_embed = np.asarray(pos_embed, dtype=np.float32)
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive integer, got {grid_size!r}")
    if not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
        raise ValueError(
            f"num_prefix_tokens must be a non-negative integer, got {num_prefix_tokens!r}"
        )
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got shape {pos_embed.shape}")
    num_patches = pos_embed.shape[1] - num_prefix_tokens
    old_grid = math.isqrt(max(num_patches, 0))
    if num_patches < 1 or old_grid * old_grid != num_patches:
        raise ValueError(
            f"pos_embed of shape {pos_embed.shape} does not hold {num_prefix_tokens} prefix "
            f"tokens followed by a square grid of patches"
        )
    prefix = pos_embed[:, :num_prefix_tokens]
    grid = pos_embed[0, num_prefix_tokens:].reshape(old_grid, old_grid, -1)
    resized = jax.image.resize(grid, (grid_size, grid_size, grid.shape[-1]), method="bicubic")
    resized = np.asarray(resized, np.float32).reshape(1, grid_size * grid_size, -1)
    return np.concatenate([prefix, resized], axis=1)


# ----------------------------------------------------------------------------------------------
# Name mapping and checks.


def _head_prefix(module: nn.Module) -> str:
    return "fc." if isinstance(module, ImageNetResNet) else "head."


def _flax_template(module: nn.Module) -> dict[str, Any]:
    """Shapes of the module's variables, traced with ``jax.eval_shape`` (no allocation)."""
    if isinstance(module, ImageNetResNet):
        size = 32
    elif isinstance(module, VisionTransformer):
        size = module.image_size
    else:
        raise ValueError(
            f"expected an ImageNetResNet or a VisionTransformer, got {type(module).__name__}"
        )
    inputs = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), inputs)


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    """The PyTorch name of a Flax variable (see the module docstring's table)."""
    parts = []
    for part in path[:-1]:
        match = re.fullmatch(r"(layer\d+|blocks)_(\d+)", part)
        if match:
            parts.extend(match.groups())
        elif part == "downsample_conv":
            parts.extend(("downsample", "0"))
        elif part == "downsample_bn":
            parts.extend(("downsample", "1"))
        else:
            parts.append(part)
    leaf = path[-1]
    if collection == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}[leaf]
    else:
        leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    return ".".join([*parts, leaf])


def _is_transposed(path: tuple[str, ...]) -> bool:
    return path[-1] == "kernel"


def _to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if _is_transposed(path) and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if _is_transposed(path) and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def _to_flax_layout(path: tuple[str, ...], array: np.ndarray) -> np.ndarray:
    if _is_transposed(path) and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if _is_transposed(path) and array.ndim == 2:
        return array.T
    return array


def _expected_entries(
    module: nn.Module, template: Mapping[str, Any] | None = None
) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``{torch_name: (collection, flax_path, torch_shape)}`` for every variable."""
    if template is None:
        template = _flax_template(module)
    entries = {}
    for collection, tree in template.items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            name = _torch_name(collection, path)
            entries[name] = (collection, path, _to_torch_shape(path, leaf.shape))
    return entries


def _import(
    state_dict: Mapping[str, Any],
    module: nn.Module,
    include_head: bool,
    initial_params: Params | None,
) -> dict[str, Any]:
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"state_dict must be a mapping from names to arrays, got {type(state_dict)}"
        )
    if not isinstance(include_head, bool):
        raise ValueError(f"include_head must be a bool, got {include_head!r}")
    template = _flax_template(module)
    entries = _expected_entries(module, template)
    head = _head_prefix(module)
    if not include_head:
        if initial_params is None:
            raise ValueError(
                "include_head=False needs initial_params: the module's freshly initialised "
                "params (e.g. from bnn_flat.models.init), whose head is kept"
            )
        entries = {name: entry for name, entry in entries.items() if not name.startswith(head)}

    def ignored(name: str) -> bool:
        return name.endswith(".num_batches_tracked") or (not include_head and name.startswith(head))

    arrays = {name: np.asarray(value) for name, value in state_dict.items()}
    missing = [name for name in entries if name not in arrays]
    unexpected = [
        f"{name} {tuple(array.shape)}"
        for name, array in arrays.items()
        if name not in entries and not ignored(name)
    ]
    problems = []
    for name, (_, _, shape) in entries.items():
        if name not in arrays:
            continue
        array = arrays[name]
        if tuple(array.shape) != shape:
            problems.append(f"shape mismatch for {name}: file {tuple(array.shape)}, model {shape}")
        elif not np.issubdtype(array.dtype, np.floating) and array.dtype != ml_dtypes.bfloat16:
            problems.append(f"{name} has dtype {array.dtype}, expected floating point")
        elif not np.all(np.isfinite(array.astype(np.float32, copy=False))):
            problems.append(f"{name} has non-finite values (NaN or infinity)")
    if name_hint := _position_embedding_hint(module, arrays, entries):
        problems.append(name_hint)
    errors = []
    if missing:
        errors.append(_listing("missing", missing))
    if unexpected:
        errors.append(_listing("unexpected", unexpected))
    errors.extend(problems[:_MAX_LISTED])
    if len(problems) > _MAX_LISTED:
        errors.append(f"... and {len(problems) - _MAX_LISTED} more problems")
    if errors:
        raise ValueError(
            f"state dict does not match {type(module).__name__}:\n  " + "\n  ".join(errors)
        )

    flat: dict[str, dict[tuple[str, ...], jax.Array]] = {}
    for name, (collection, path, _) in entries.items():
        array = _to_flax_layout(path, arrays[name].astype(np.float32, copy=False))
        flat.setdefault(collection, {})[path] = jax.device_put(np.ascontiguousarray(array))
    if not include_head:
        head_template = template["params"][head[:-1]]
        fresh = initial_params.get(head[:-1]) if isinstance(initial_params, Mapping) else None
        fresh_flat = traverse_util.flatten_dict(fresh) if isinstance(fresh, Mapping) else {}
        for path, leaf in traverse_util.flatten_dict(head_template).items():
            value = fresh_flat.get(path)
            if value is None or tuple(np.shape(value)) != tuple(leaf.shape):
                raise ValueError(
                    f"initial_params must hold the module's head {head[:-1]}/{'/'.join(path)} "
                    f"of shape {tuple(leaf.shape)}, got "
                    f"{None if value is None else tuple(np.shape(value))}"
                )
            flat["params"][(head[:-1], *path)] = jnp.asarray(value, jnp.float32)
    return {collection: traverse_util.unflatten_dict(tree) for collection, tree in flat.items()}


def _position_embedding_hint(
    module: nn.Module, arrays: Mapping[str, np.ndarray], entries: Mapping[str, Any]
) -> str | None:
    if "pos_embed" not in arrays or "pos_embed" not in entries:
        return None
    if tuple(arrays["pos_embed"].shape) == entries["pos_embed"][2]:
        return None
    return (
        "pos_embed was trained at another image size: resample it with "
        "interpolate_position_embedding(state_dict['pos_embed'], "
        f"{module.image_size // module.patch_size}) before importing"
    )


def _listing(label: str, names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{label} ({len(names)}): {shown}{more}"


# ----------------------------------------------------------------------------------------------
# safetensors.


def _safetensors_code(name: str, dtype: np.dtype) -> str:
    if dtype == ml_dtypes.bfloat16:
        return "BF16"
    for code, candidate in _SAFETENSORS_DTYPES.items():
        if code != "BF16" and dtype.kind == candidate.kind and dtype.itemsize == candidate.itemsize:
            return code
    raise ValueError(f"tensor {name!r} has dtype {dtype}, which safetensors files cannot hold")


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        header_size = int.from_bytes(prefix, "little")
        if header_size > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(
                f"{path} is not a safetensors file (header length {header_size} exceeds the "
                f"file size {size})"
            )
        try:
            header = json.loads(file.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} has a corrupt safetensors header: {error}") from error
        if not isinstance(header, dict):
            raise ValueError(f"{path} has a corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_start = 8 + header_size
        data_size = size - data_start
        result = {}
        for name, info in header.items():
            dtype, shape, begin, end = _parse_entry(path, name, info)
            count = math.prod(shape)
            if end - begin != count * dtype.itemsize or not 0 <= begin <= end <= data_size:
                raise ValueError(
                    f"{path}: tensor {name!r} has data_offsets [{begin}, {end}] inconsistent "
                    f"with shape {tuple(shape)}, dtype {info['dtype']} and {data_size} data bytes"
                )
            file.seek(data_start + begin)
            array = np.fromfile(file, dtype=dtype, count=count).reshape(shape)
            if info["dtype"] == "BF16":
                array = (array.astype(np.uint32) << 16).view(np.float32)
            result[name] = array.astype(array.dtype.newbyteorder("="), copy=False)
    return result


def _parse_entry(path: str, name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    try:
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        shape = tuple(int(dimension) for dimension in info["shape"])
        begin, end = (int(offset) for offset in info["data_offsets"])
    except KeyError as error:
        if isinstance(info, dict) and "dtype" in info and error.args[0] == info["dtype"]:
            raise ValueError(
                f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}; supported: "
                f"{sorted(_SAFETENSORS_DTYPES)}"
            ) from error
        raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {info}") from error
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: malformed header entry for tensor {name!r}: {info}") from error
    if any(dimension < 0 for dimension in shape):
        raise ValueError(f"{path}: tensor {name!r} has a negative dimension in {shape}")
    return dtype, shape, begin, end
