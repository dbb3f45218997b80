"""CIFAR-style residual networks (ResNet-20 and friends).

The CIFAR ResNet of He et al.: a 3x3 stem convolution with ``width`` channels, then stages of
basic blocks with ``width``, ``2 width``, ``4 width``, ... channels (every stage after the first
halves the resolution in its first block), global average pooling and a linear classifier.
With ``n`` blocks in each of three stages the depth is ``6 n + 2``; ResNet-20 has ``n = 3``.

A basic block is post-activation::

    y = norm(conv3x3(x)) -> relu -> dropout -> norm(conv3x3(.))
    out = relu(y + shortcut(x))

The shortcut is the identity, or a 1x1 convolution followed by a normalisation layer when the
number of channels or the resolution changes (projection shortcuts, the paper's option B, rather
than its zero-padding option A). Convolutions pad by one pixel on each side, as PyTorch's
reference implementations do; they have no bias unless ``norm="none"``.

Normalisation options:

* ``"batch"``: BatchNorm (momentum 0.9, epsilon 1e-5), batch statistics in training mode,
  running statistics (collection ``"batch_stats"``) in evaluation mode;
  :class:`bnn_flat.models.norm.BatchNorm`, with the parameters and values of Flax's.
* ``"group"``: GroupNorm with ``gcd(num_groups, channels)`` groups; no running statistics.
* ``"layer"``: LayerNorm over height, width and channels of each example, with a per-channel
  scale and bias; no running statistics.
* ``"none"``: no normalisation.

References:
  He, Zhang, Ren, Sun (2016). Deep residual learning for image recognition. CVPR.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnn_flat.models.conv import Conv
from bnn_flat.models.norm import BatchNorm

__all__ = ["ResNet", "ResNet20", "resnet20"]

_NORMS = ("batch", "group", "layer", "none")
_EPSILON = 1e-5
_BATCH_NORM_MOMENTUM = 0.9


class ResNet(nn.Module):
    """A CIFAR-style ResNet with any number of stages and blocks per stage.

    Parameters are named ``stem_conv``, ``stem_norm``, ``stage{i}_block{j}`` (each with
    ``conv_0``, ``norm_0``, ``conv_1``, ``norm_1`` and, for projection shortcuts,
    ``shortcut_conv`` and ``shortcut_norm``) and ``head``.

    Attributes:
      stage_sizes: Number of basic blocks in each stage, e.g. ``(3, 3, 3)`` for ResNet-20.
      num_classes: Number of output logits.
      norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
      width: Channels of the stem and the first stage; stage ``i`` has ``width * 2**i``.
      dropout_rate: Dropout probability inside every block (between the two convolutions) and
        before the classifier (inverted dropout).
      num_groups: Maximum number of GroupNorm groups (used when ``norm="group"``).
      conv: Factory of convolution modules with the signature of :class:`flax.linen.Conv`;
        swap it for a faster implementation without changing the parameter layout. The
        default, :class:`bnn_flat.models.conv.Conv`, keeps gradients fast inside compiled
        loops on CPU and is plain ``lax`` convolution elsewhere.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.ResNet(stage_sizes=(1, 1), num_classes=10, width=8)
      >>> params, state = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
      >>> sorted(state)
      ['batch_stats']
    """

    stage_sizes: Sequence[int]
    num_classes: int
    norm: str = "batch"
    width: int = 16
    dropout_rate: float = 0.0
    num_groups: int = 8
    conv: Callable[..., nn.Module] = Conv

    def __post_init__(self) -> None:
        if len(self.stage_sizes) == 0 or any(
            not isinstance(size, numbers.Integral) or size < 1 for size in self.stage_sizes
        ):
            raise ValueError(
                f"stage_sizes must be a non-empty sequence of positive integers, got "
                f"{self.stage_sizes}"
            )
        _validate_options(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Images of shape ``(batch, height, width, channels)``.
          train: Training mode: BatchNorm uses batch statistics and updates its running
            statistics; dropout is active (needs the ``"dropout"`` RNG stream).

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        return _resnet_forward(self, self.stage_sizes, inputs, train)

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to a network with ``params``.

        Args:
          params: The ``"params"`` collection of this module (one member, not a stack).
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat import models
          >>> module = models.ResNet(stage_sizes=(1,), num_classes=2, width=4)
          >>> params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
          >>> module.validate_inputs(params, jnp.ones((2, 32, 32, 3)))  # any size works
        """
        _validate_resnet_inputs(params, inputs)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (3 stages of 3 basic blocks; about 0.27M parameters at width 16).

    The same network as ``ResNet(stage_sizes=(3, 3, 3), ...)``, with the same parameter names.

    Attributes:
      num_classes: Number of output logits.
      norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
      width: Channels of the first stage (16 in the paper); stages have 1x, 2x, 4x.
      dropout_rate: Dropout probability inside every block and before the classifier.
      num_groups: Maximum number of GroupNorm groups (used when ``norm="group"``).
      conv: Factory of convolution modules with the signature of :class:`flax.linen.Conv`
        (default :class:`bnn_flat.models.conv.Conv`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.ResNet20(num_classes=10, width=4)
      >>> params, state = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 1)))
      >>> logits, _ = models.make_apply(module)(params, state, jnp.ones((2, 8, 8, 1)), train=False)
      >>> logits.shape
      (2, 10)
    """

    num_classes: int
    norm: str = "batch"
    width: int = 16
    dropout_rate: float = 0.0
    num_groups: int = 8
    conv: Callable[..., nn.Module] = Conv

    def __post_init__(self) -> None:
        _validate_options(self)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Images of shape ``(batch, height, width, channels)``.
          train: Training mode: BatchNorm uses batch statistics and updates its running
            statistics; dropout is active (needs the ``"dropout"`` RNG stream).

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        return _resnet_forward(self, (3, 3, 3), inputs, train)

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to a network with ``params``.

        Args:
          params: The ``"params"`` collection of this module (one member, not a stack).
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat import models
          >>> module = models.ResNet20(num_classes=10, width=4)
          >>> params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 3)))
          >>> module.validate_inputs(params, jnp.ones((2, 32, 32, 3)))  # fine: no error
        """
        _validate_resnet_inputs(params, inputs)


def resnet20(
    num_classes: int,
    *,
    norm: str = "batch",
    width: int = 16,
    dropout_rate: float = 0.0,
    num_groups: int = 8,
) -> ResNet20:
    """Builds a :class:`ResNet20`.

    Args:
      num_classes: Number of output logits.
      norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
      width: Channels of the first stage (16 in the paper).
      dropout_rate: Dropout probability inside every block and before the classifier.
      num_groups: Maximum number of GroupNorm groups.

    Returns:
      The (unbound) Flax module.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.resnet20(num_classes=10, norm="group")
      >>> shapes = jax.eval_shape(
      ...     lambda key: models.init(module, key, jnp.ones((1, 32, 32, 3))), jax.random.key(0))
      >>> models.num_params(shapes[0])
      272474
    """
    return ResNet20(
        num_classes=num_classes,
        norm=norm,
        width=width,
        dropout_rate=dropout_rate,
        num_groups=num_groups,
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (post-activation)."""

    features: int
    strides: int
    norm: str
    dropout_rate: float
    num_groups: int
    conv: Callable[..., nn.Module]

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        use_bias = self.norm == "none"
        y = _conv3x3(self.conv, self.features, self.strides, use_bias, "conv_0")(inputs)
        y = _normalize(self.norm, self.num_groups, train, "norm_0", y)
        y = nn.relu(y)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = _conv3x3(self.conv, self.features, 1, use_bias, "conv_1")(y)
        y = _normalize(self.norm, self.num_groups, train, "norm_1", y)
        shortcut = inputs
        if self.strides != 1 or inputs.shape[-1] != self.features:
            shortcut = self.conv(
                self.features,
                (1, 1),
                strides=(self.strides, self.strides),
                padding="VALID",
                use_bias=use_bias,
                kernel_init=nn.initializers.he_normal(),
                name="shortcut_conv",
            )(inputs)
            shortcut = _normalize(self.norm, self.num_groups, train, "shortcut_norm", shortcut)
        return nn.relu(y + shortcut)


def _resnet_forward(
    module: ResNet | ResNet20, stage_sizes: Sequence[int], inputs: jax.Array, train: bool
) -> jax.Array:
    """Shared body of :class:`ResNet` and :class:`ResNet20`; called inside a compact method."""
    _check_images(inputs)
    use_bias = module.norm == "none"
    x = _conv3x3(module.conv, module.width, 1, use_bias, "stem_conv")(inputs)
    x = _normalize(module.norm, module.num_groups, train, "stem_norm", x)
    x = nn.relu(x)
    for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
            x = _BasicBlock(
                features=module.width * 2**stage,
                strides=2 if stage > 0 and block == 0 else 1,
                norm=module.norm,
                dropout_rate=module.dropout_rate,
                num_groups=module.num_groups,
                conv=module.conv,
                name=f"stage{stage}_block{block}",
            )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(module.dropout_rate)(x, deterministic=not train)
    return nn.Dense(module.num_classes, name="head")(x)


def _conv3x3(
    conv: Callable[..., nn.Module], features: int, strides: int, use_bias: bool, name: str
) -> nn.Module:
    return conv(
        features,
        (3, 3),
        strides=(strides, strides),
        padding=((1, 1), (1, 1)),
        use_bias=use_bias,
        kernel_init=nn.initializers.he_normal(),
        name=name,
    )


def _normalize(norm: str, num_groups: int, train: bool, name: str, x: jax.Array) -> jax.Array:
    if norm == "batch":
        return BatchNorm(
            use_running_average=not train,
            momentum=_BATCH_NORM_MOMENTUM,
            epsilon=_EPSILON,
            name=name,
        )(x)
    if norm == "group":
        groups = math.gcd(num_groups, x.shape[-1])
        return nn.GroupNorm(num_groups=groups, epsilon=_EPSILON, name=name)(x)
    if norm == "layer":
        return nn.LayerNorm(
            reduction_axes=(-3, -2, -1), feature_axes=-1, epsilon=_EPSILON, name=name
        )(x)
    return x


def _validate_options(module: ResNet | ResNet20) -> None:
    if not isinstance(module.num_classes, numbers.Integral) or module.num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {module.num_classes}")
    if module.norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {module.norm!r}")
    if not isinstance(module.width, numbers.Integral) or module.width < 1:
        raise ValueError(f"width must be a positive integer, got {module.width}")
    if not 0.0 <= module.dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {module.dropout_rate}")
    if not isinstance(module.num_groups, numbers.Integral) or module.num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {module.num_groups}")


def _check_images(inputs: jax.Array) -> None:
    if inputs.ndim != 4 or inputs.shape[1] < 1 or inputs.shape[2] < 1:
        raise ValueError(
            f"ResNet expects images of shape (batch, height, width, channels), got shape "
            f"{inputs.shape}"
        )


def _validate_resnet_inputs(params: Any, inputs: jax.Array) -> None:
    _check_images(inputs)
    try:
        channels = params["stem_conv"]["kernel"].shape[-2]
    except (KeyError, TypeError, IndexError):
        return  # unusual parameter tree: let Flax report any mismatch
    if inputs.shape[-1] != channels:
        raise ValueError(
            f"ResNet parameters expect {channels} input channels, got inputs of shape "
            f"{inputs.shape} ({inputs.shape[-1]} channels)"
        )
