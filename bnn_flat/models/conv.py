"""Convolutions whose gradients stay fast inside compiled loops on XLA:CPU.

XLA:CPU runs a convolution through its fast (Eigen) kernel only when the convolution is in the
canonical channels-last form: input ``(batch, spatial..., features)``, kernel
``(spatial..., in, out)``, output ``(batch, spatial..., features)``. The convolutions that
``jax.grad`` emits for the kernel gradient (batch and feature axes swapped) and for the input
gradient (kernel in ``(spatial..., out, in)`` order) are not canonical. At the top level of a
jitted function XLA rewrites them into canonical form, but not inside a loop body such as the
``lax.scan`` over the batches of an epoch, where they run 20-70x slower (JAX issue #12868).

:func:`conv_general_dilated` computes exactly the same numbers as
:func:`jax.lax.conv_general_dilated`, and has a custom JVP whose tangent convolutions are
written on explicitly transposed operands, with dimension numbers chosen so that JAX's own
transpose rules produce canonical convolutions. Reverse mode, forward mode, forward-over-reverse
(Hessian-vector products), reverse-over-reverse and ``vmap`` all work; the gradients are
bit-identical to JAX's.

Convolutions with few input terms per output (``in_features x kernel size <= 32``, e.g. the
first layer of an image model: 1 x 5 x 5 for LeNet on greyscale images, 3 x 3 x 3 for a ResNet
stem) compute their *value* as a sum of shifted input slices times kernel rows, one fused
element-wise loop, instead of Eigen's convolution: Eigen packs image patches element by
element when the channel count is small, and a LeNet training step on CPU spent a third of its
time in that forward convolution (39 -> 28 ms per step without it). The derivative
convolutions stay canonical Eigen convolutions; results equal lax's up to float summation
order. Other convolutions zero-pad their input and output features to a multiple of
:data:`FEATURE_ALIGNMENT` (8 floats, one AVX vector) when that adds at most a third more work:
Eigen then packs whole vectors (LeNet's 6 -> 16 convolution and its input gradient run
1.4-1.5x faster); the padded outputs are sliced off, so values and gradients are unchanged.

**oneDNN.** Even in canonical form, Eigen's convolution kernels (image-patch packing plus a
generic matrix-multiply kernel) are slower than the JIT-generated kernels of oneDNN, which
PyTorch uses on the same CPU. ``implementation="onednn"`` runs 2-D float32 convolutions, their
input gradients and their kernel gradients as XLA custom calls into oneDNN
(:mod:`bnn_flat._native`, compiled on first use; :mod:`bnn_flat._native.conv` has the JAX
primitive with its JVP, transpose and batching rules, so every order of differentiation and
``vmap`` work). Other convolutions (1-D/3-D, other dtypes, input dilation) take the canonical
form. Measured on a 2-core machine (round-robin, 7-9 rounds): ResNet-20 SGD step 0.83-0.91x
the canonical form's, LeNet 0.91-1.04x.

``implementation="auto"`` uses oneDNN on a single CPU device when it is available, the
canonical form on other CPU setups (XLA's SPMD partitioner cannot split a custom call, so
sharded programs keep XLA's convolutions), and plain :func:`jax.lax.conv_general_dilated`
elsewhere (GPU/TPU compilers pick their own layouts). :class:`Conv` is a drop-in replacement
for :class:`flax.linen.Conv` with the same parameters.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bnn_flat import _native
from bnn_flat._fusion import fence

__all__ = [
    "FEATURE_ALIGNMENT",
    "IMPLEMENTATIONS",
    "SHIFTED_SUM_MAX_TERMS",
    "Conv",
    "conv_general_dilated",
    "resolve_implementation",
]

IMPLEMENTATIONS = ("auto", "onednn", "canonical", "lax")
"""Accepted ``implementation`` strings.

``"onednn"``: 2-D float32 convolutions (and their gradients) run by oneDNN's JIT kernels
through an XLA custom call (:mod:`bnn_flat._native`; other convolutions take the
``"canonical"`` form); ``"canonical"``: the custom-JVP form (fast gradients inside loops on
XLA:CPU); ``"lax"``: plain :func:`jax.lax.conv_general_dilated`; ``"auto"``: ``"onednn"`` on
a single CPU device when the native kernel is available, ``"canonical"`` on other CPU setups,
``"lax"`` on GPU/TPU.
"""


def resolve_implementation(implementation: str) -> str:
    """The concrete implementation (``"onednn"``, ``"canonical"`` or ``"lax"``) a name stands for.

    ``"auto"`` picks ``"onednn"`` only when the default backend is a single CPU device: XLA's
    SPMD partitioner cannot split a custom call, so sharded (multi-device) programs keep the
    ``"canonical"`` XLA convolutions, which it partitions along the batch.

    Args:
      implementation: one of :data:`IMPLEMENTATIONS`.

    Returns:
      ``"onednn"``, ``"canonical"`` or ``"lax"``.

    Raises:
      ValueError: for an unknown name.
      RuntimeError: for ``"onednn"`` when the native kernel is unavailable (the message says
        why, e.g. no compiler or no oneDNN wheel).

    Example:
      >>> resolve_implementation("lax")
      'lax'
      >>> resolve_implementation("auto") in ("onednn", "canonical", "lax")
      True
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        if jax.default_backend() != "cpu":
            return "lax"
        if jax.device_count() == 1 and _native.onednn_available():
            return "onednn"
        return "canonical"
    if implementation == "onednn" and not _native.onednn_available():
        raise RuntimeError(f"implementation='onednn' is unavailable: {_native.status()['reason']}")
    return implementation


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """:func:`jax.lax.conv_general_dilated` with loop-friendly gradients on XLA:CPU.

    Same arguments and result as :func:`jax.lax.conv_general_dilated`. The custom-JVP form is
    used for channels-last convolutions (``dimension_numbers`` of the form ``("NHWC", "HWIO",
    "NHWC")`` for any number of spatial axes) without feature or batch groups; anything else
    falls back to the plain convolution.

    Args:
      lhs: input of shape ``(batch, spatial..., in_features)``.
      rhs: kernel of shape ``(spatial..., in_features, out_features)``.
      window_strides: stride per spatial axis.
      padding: ``"SAME"``, ``"VALID"`` or one ``(low, high)`` pair per spatial axis.
      lhs_dilation: input dilation per spatial axis (``None``: no dilation).
      rhs_dilation: kernel dilation per spatial axis (``None``: no dilation).
      dimension_numbers: as for :func:`jax.lax.conv_general_dilated`; ``None`` means the
        channels-first default of ``lax`` (and therefore the plain convolution).
      feature_group_count: feature groups (values other than 1 use the plain convolution).
      batch_group_count: batch groups (values other than 1 use the plain convolution).
      precision: passed to every convolution.
      preferred_element_type: passed to the plain convolution (forces it when not ``None``).
      implementation: one of :data:`IMPLEMENTATIONS`.

    Returns:
      The convolution, identical to :func:`jax.lax.conv_general_dilated`'s.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.ones((2, 5, 5, 3))
      >>> w = jnp.ones((3, 3, 3, 4))
      >>> y = conv_general_dilated(x, w, (1, 1), "SAME",
      ...                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      >>> y.shape, float(y[0, 2, 2, 0])
      ((2, 5, 5, 4), 27.0)
    """
    resolved = resolve_implementation(implementation)
    num_spatial = lhs.ndim - 2
    channels_last = _channels_last_numbers(lhs.ndim) if lhs.ndim >= 3 else None
    usable = (
        resolved in ("canonical", "onednn")
        and num_spatial >= 1
        and rhs.ndim == lhs.ndim
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == channels_last
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    )
    if not usable:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            batch_group_count=batch_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
        )
    ones = (1,) * num_spatial
    lhs_dilation = tuple(int(d) for d in lhs_dilation) if lhs_dilation is not None else ones
    rhs_dilation = tuple(int(d) for d in rhs_dilation) if rhs_dilation is not None else ones
    config = _Config(
        window_strides=tuple(int(s) for s in window_strides),
        padding=padding
        if isinstance(padding, str)
        else tuple((int(lo), int(hi)) for lo, hi in padding),
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        precision=precision,
    )
    if resolved == "onednn" and _onednn_supports(config, lhs, rhs):
        return _onednn_conv(config, lhs, rhs)
    if _uses_shifted_sum(config, lhs, rhs):
        return _canonical_conv(config, lhs, rhs)
    in_features, out_features = rhs.shape[-2:]
    in_padded, out_padded = _aligned(in_features), _aligned(out_features)
    if (in_padded, out_padded) == (in_features, out_features):
        return _canonical_conv(config, lhs, rhs)
    # zero features up to a multiple of FEATURE_ALIGNMENT: the same sums, and Eigen packs
    # whole vectors (LeNet's 6 -> 16 convolution and its input gradient: 1.4-1.5x faster)
    lhs = jnp.pad(lhs, [(0, 0)] * (lhs.ndim - 1) + [(0, in_padded - in_features)])
    rhs = jnp.pad(
        rhs,
        [(0, 0)] * (rhs.ndim - 2) + [(0, in_padded - in_features), (0, out_padded - out_features)],
    )
    return _canonical_conv(config, lhs, rhs)[..., :out_features]


def _onednn_supports(config: _Config, lhs: jax.Array, rhs: jax.Array) -> bool:
    return (
        lhs.ndim == 4
        and lhs.dtype == jnp.float32
        and rhs.dtype == jnp.float32
        and all(d == 1 for d in config.lhs_dilation)
        and min(lhs.shape) > 0
        and min(rhs.shape) > 0
    )


def _onednn_conv(config: _Config, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    from bnn_flat._native.conv import conv2d

    padding = _explicit_padding(config, lhs, rhs)
    if any(lo < 0 or hi < 0 for lo, hi in padding):  # cropping: oneDNN takes no negative pads
        return _canonical_conv(config, lhs, rhs)
    return conv2d(lhs, rhs, config.window_strides, padding, config.rhs_dilation)


def _dilated_kernel_size(config: _Config, rhs: jax.Array) -> tuple[int, ...]:
    kernel_size = rhs.shape[: rhs.ndim - 2]
    return tuple((k - 1) * d + 1 for k, d in zip(kernel_size, config.rhs_dilation, strict=True))


def _explicit_padding(config: _Config, lhs: jax.Array, rhs: jax.Array):
    """``config.padding`` as one ``(low, high)`` pair per spatial axis."""
    if not isinstance(config.padding, str):
        return config.padding
    return lax.padtype_to_pads(
        lhs.shape[1:-1], _dilated_kernel_size(config, rhs), config.window_strides, config.padding
    )


FEATURE_ALIGNMENT = 8
"""Feature counts are zero-padded to a multiple of this when that adds at most a third."""


def _aligned(features: int) -> int:
    padded = -(-features // FEATURE_ALIGNMENT) * FEATURE_ALIGNMENT
    return padded if 3 * padded <= 4 * features else features


class _Config(NamedTuple):
    """Static (hashable) configuration of one convolution."""

    window_strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    precision: Any

    def conv(self, lhs: jax.Array, rhs: jax.Array, numbers: lax.ConvDimensionNumbers) -> jax.Array:
        return lax.conv_general_dilated(
            lhs,
            rhs,
            self.window_strides,
            self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=numbers,
            precision=self.precision,
        )


def _channels_last_numbers(ndim: int) -> lax.ConvDimensionNumbers:
    spatial = tuple(range(1, ndim - 1))
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )


SHIFTED_SUM_MAX_TERMS = 32
"""Largest ``in_features x kernel size`` whose forward value is a fused sum of shifted slices."""


def _uses_shifted_sum(config: _Config, lhs: jax.Array, rhs: jax.Array) -> bool:
    terms = math.prod(rhs.shape[:-1])
    return (
        terms <= SHIFTED_SUM_MAX_TERMS
        and all(d == 1 for d in config.lhs_dilation)
        and lhs.dtype in (jnp.float32, jnp.float64)
        and rhs.dtype == lhs.dtype
    )


def _shifted_sum_conv(config: _Config, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    """The channels-last convolution as one fused sum over kernel taps and input features.

    ``y[n, p, o] = sum_{t, c} x_pad[n, p * stride + t * dilation, c] * w[t, c, o]``: each term
    is a strided slice of the padded input (one feature, broadcast over the output features)
    times a kernel row. The result is fenced so that consumers read it instead of re-running
    the sum per element.
    """
    num_spatial = lhs.ndim - 2
    kernel_size = rhs.shape[:num_spatial]
    dilated = _dilated_kernel_size(config, rhs)
    padding = _explicit_padding(config, lhs, rhs)
    padded = lax.pad(
        lhs,
        jnp.zeros((), lhs.dtype),
        [(0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)],
    )
    out_size = tuple(
        (size - k) // s + 1
        for size, k, s in zip(padded.shape[1:-1], dilated, config.window_strides, strict=True)
    )
    total = None
    for tap in itertools.product(*(range(k) for k in kernel_size)):
        start = [t * d for t, d in zip(tap, config.rhs_dilation, strict=True)]
        steps = zip(start, out_size, config.window_strides, strict=True)
        limit = [begin + (count - 1) * stride + 1 for begin, count, stride in steps]
        for feature in range(lhs.shape[-1]):
            window = lax.slice(
                padded,
                (0, *start, feature),
                (lhs.shape[0], *limit, feature + 1),
                (1, *config.window_strides, 1),
            )
            term = window * rhs[(*tap, feature)]
            total = term if total is None else total + term
    return fence(total)


def _forward(config: _Config, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    if _uses_shifted_sum(config, lhs, rhs):
        return _shifted_sum_conv(config, lhs, rhs)
    return config.conv(lhs, rhs, _channels_last_numbers(lhs.ndim))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _canonical_conv(config: _Config, lhs: jax.Array, rhs: jax.Array) -> jax.Array:
    return _forward(config, lhs, rhs)


@_canonical_conv.defjvp
def _canonical_conv_jvp(config: _Config, primals, tangents):
    lhs, rhs = primals
    lhs_dot, rhs_dot = tangents
    ndim = lhs.ndim
    spatial = tuple(range(1, ndim - 1))
    kernel_spatial = tuple(range(ndim - 2))
    output = _forward(config, lhs, rhs)
    # Input tangent with the kernel stored as (spatial..., out, in): JAX's transpose of this
    # convolution with respect to the input then reads the kernel as (spatial..., in, out).
    input_numbers = lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 2, ndim - 1, *kernel_spatial),
        out_spec=(0, ndim - 1, *spatial),
    )
    swapped_kernel = jnp.swapaxes(rhs, -1, -2)
    input_tangent = config.conv(lhs_dot, swapped_kernel, input_numbers)
    # Kernel tangent on the input stored as (in, spatial..., batch), the kernel tangent as
    # (in, spatial..., out) and the output as (spatial..., batch, out): JAX's transpose with
    # respect to the kernel is then the canonical convolution of the input (in as batch, batch
    # as features) with the output cotangent (spatial..., batch, out) as kernel.
    # The transpose runs inside `fence`'s loop: otherwise XLA fuses the producers of `lhs`
    # (normalisation, ReLU and skip additions of earlier blocks) into it and recomputes them
    # per element; with the fence it reads the stored input (ResNet-20 step ~1.5x faster).
    lhs_moved = fence(jnp.moveaxis(jnp.moveaxis(lhs, 0, -1), -2, 0))  # (in, spatial..., batch)
    rhs_dot_moved = jnp.moveaxis(rhs_dot, -2, 0)  # (in, spatial..., out)
    kernel_numbers = lax.ConvDimensionNumbers(
        lhs_spec=(ndim - 1, 0, *spatial),
        rhs_spec=(ndim - 1, 0, *spatial),
        out_spec=(ndim - 2, ndim - 1, *kernel_spatial),
    )
    kernel_tangent = config.conv(lhs_moved, rhs_dot_moved, kernel_numbers)
    kernel_tangent = jnp.moveaxis(kernel_tangent, -2, 0)  # (batch, spatial..., out)
    return output, input_tangent + kernel_tangent


def _canonical_padding(padding: Any, num_spatial: int) -> str | tuple[tuple[int, int], ...]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(
                f"Conv padding must be 'SAME', 'VALID', an int or (low, high) pairs, got "
                f"{padding!r}"
            )
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding),) * num_spatial
    pairs = []
    for item in padding:
        if isinstance(item, int):
            pairs.append((item, item))
        else:
            low, high = item
            pairs.append((int(low), int(high)))
    if len(pairs) == 1:
        pairs = pairs * num_spatial
    if len(pairs) != num_spatial:
        raise ValueError(
            f"Conv padding needs one entry per spatial axis ({num_spatial}), got {padding!r}"
        )
    return tuple(pairs)


def _per_axis(value: int | Sequence[int] | None, num_spatial: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * num_spatial
    if isinstance(value, int):
        return (value,) * num_spatial
    value = tuple(int(v) for v in value)
    if len(value) != num_spatial:
        raise ValueError(f"Conv {name} needs {num_spatial} entries, got {value}")
    return value


class Conv(nn.Module):
    """Channels-last convolution with the parameters of :class:`flax.linen.Conv`.

    The ``kernel`` (shape ``kernel_size + (in_features, features)``) and ``bias`` parameters
    have the names, shapes and default initialisers of :class:`flax.linen.Conv`, so the two are
    interchangeable (same initial values for the same key). The convolution itself is
    :func:`conv_general_dilated` with the chosen ``implementation``.

    Attributes:
      features: number of output channels.
      kernel_size: spatial size of the kernel (an int for 1-D, or a sequence).
      strides: stride per spatial axis (int or sequence).
      padding: ``"SAME"``, ``"VALID"``, an int, or ``(low, high)`` pairs per spatial axis.
      input_dilation: input dilation per spatial axis.
      kernel_dilation: kernel dilation per spatial axis.
      feature_group_count: feature groups (values other than 1 use the plain convolution).
      use_bias: add a learned per-channel bias.
      dtype: computation dtype (``None``: inferred from inputs and parameters).
      param_dtype: parameter dtype.
      precision: convolution precision.
      kernel_init: kernel initialiser.
      bias_init: bias initialiser.
      implementation: one of :data:`IMPLEMENTATIONS`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import flax.linen as nn
      >>> x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
      >>> ours = Conv(4, (3, 3), strides=2, padding=1)
      >>> flax_conv = nn.Conv(4, (3, 3), strides=2, padding=1)
      >>> params = ours.init(jax.random.key(1), x)
      >>> jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape,
      ...                                                 flax_conv.init(jax.random.key(1), x))
      True
      >>> bool(jnp.allclose(ours.apply(params, x), flax_conv.apply(params, x)))
      True
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] | None = 1
    padding: Any = "SAME"
    input_dilation: int | Sequence[int] | None = 1
    kernel_dilation: int | Sequence[int] | None = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    precision: Any = None
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros_init()
    implementation: str = "auto"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the convolution.

        Args:
          inputs: array of shape ``(batch, spatial..., in_features)``.

        Returns:
          Array of shape ``(batch, output spatial..., features)``.
        """
        kernel_size = (
            (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
        )
        num_spatial = len(kernel_size)
        if inputs.ndim != num_spatial + 2:
            raise ValueError(
                f"Conv with a {num_spatial}-D kernel expects inputs of rank {num_spatial + 2} "
                f"(batch, spatial..., features), got shape {inputs.shape}"
            )
        if self.features < 1:
            raise ValueError(f"Conv features must be positive, got {self.features}")
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(
                f"Conv input features ({in_features}) must be divisible by "
                f"feature_group_count ({self.feature_group_count})"
            )
        resolve_implementation(self.implementation)  # validates the option early
        kernel_shape = (*kernel_size, in_features // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        outputs = conv_general_dilated(
            inputs,
            kernel,
            _per_axis(self.strides, num_spatial, "strides"),
            _canonical_padding(self.padding, num_spatial),
            lhs_dilation=_per_axis(self.input_dilation, num_spatial, "input_dilation"),
            rhs_dilation=_per_axis(self.kernel_dilation, num_spatial, "kernel_dilation"),
            dimension_numbers=_channels_last_numbers(inputs.ndim),
            feature_group_count=self.feature_group_count,
            precision=self.precision,
            implementation=self.implementation,
        )
        if bias is not None:
            outputs = outputs + bias
        return outputs
