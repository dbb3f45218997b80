"""ImageNet residual networks with the torchvision architecture (ResNet-18, -34, -50).

The networks of He et al. as torchvision builds them ("ResNet v1.5"), so that torchvision's
ImageNet weights load without any change of meaning (see :mod:`bnn_flat.models.pretrained`):

* stem: 7x7 convolution with stride 2 and padding 3 (no bias), BatchNorm, ReLU, then a 3x3 max
  pool with stride 2 and padding 1 (the padding never wins the maximum);
* four stages of ``width``, ``2 width``, ``4 width`` and ``8 width`` channels (times 4 at the
  output of bottleneck blocks); every stage after the first halves the resolution in its first
  block;
* basic block (ResNet-18/34): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with two
  3x3 convolutions;
* bottleneck block (ResNet-50): 1x1 reduce, 3x3 (carrying the stride, the "v1.5" choice), 1x1
  expand, each followed by BatchNorm, ReLU after the first two and after the residual sum;
* shortcut: the identity, or a 1x1 convolution with the block's stride followed by BatchNorm
  when the shape changes;
* global average pooling and a linear classifier ``fc``.

Every convolution pads explicitly by ``kernel_size // 2`` on each side, as PyTorch does
("SAME" padding differs for stride 2 on even inputs). BatchNorm uses epsilon 1e-5 and a running
average momentum of 0.9 in Flax's convention (0.1 in PyTorch's). One difference remains in
training mode: Flax keeps the biased batch variance in the running variance, PyTorch the
unbiased one; evaluation mode is identical.

Parameter names follow torchvision's with ``.`` between a stage and a block index written as
``_``: ``conv1``, ``bn1``, ``layer1_0`` (containing ``conv1``, ``bn1``, ``conv2``, ``bn2``,
``conv3``, ``bn3``, ``downsample_conv``, ``downsample_bn``), ..., ``fc``.

References:
  He, Zhang, Ren, Sun (2016). Deep residual learning for image recognition. CVPR.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ImageNetResNet", "resnet18", "resnet34", "resnet50"]

_BLOCKS = ("basic", "bottleneck")
_EPSILON = 1e-5
_BATCH_NORM_MOMENTUM = 0.9
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ImageNetResNet(nn.Module):
    """A torchvision-architecture ResNet for ImageNet-sized (or smaller) images.

    Attributes:
      stage_sizes: Number of blocks in each of the stages, e.g. ``(2, 2, 2, 2)`` for
        ResNet-18 and ``(3, 4, 6, 3)`` for ResNet-34/50.
      block: ``"basic"`` (two 3x3 convolutions) or ``"bottleneck"`` (1x1, 3x3, 1x1 with an
        expansion of 4).
      num_classes: Number of output logits.
      width: Channels of the stem and of the first stage (64 in torchvision); stage ``i`` has
        ``width * 2**i`` inner channels.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models.resnet_imagenet import ImageNetResNet
      >>> module = ImageNetResNet(stage_sizes=(1, 1), block="basic", num_classes=5, width=8)
      >>> params, state = jax.eval_shape(
      ...     lambda key: models.init(module, key, jnp.ones((1, 16, 16, 3))), jax.random.key(0))
      >>> sorted(params)
      ['bn1', 'conv1', 'fc', 'layer1_0', 'layer2_0']
      >>> sorted(params["layer2_0"])
      ['bn1', 'bn2', 'conv1', 'conv2', 'downsample_bn', 'downsample_conv']
    """

    stage_sizes: Sequence[int]
    block: str
    num_classes: int
    width: int = 64

    def __post_init__(self) -> None:
        if len(self.stage_sizes) == 0 or any(
            isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1
            for size in self.stage_sizes
        ):
            raise ValueError(
                f"stage_sizes must be a non-empty sequence of positive integers, got "
                f"{self.stage_sizes}"
            )
        if self.block not in _BLOCKS:
            raise ValueError(f"block must be one of {_BLOCKS}, got {self.block!r}")
        _check_positive_integer("num_classes", self.num_classes)
        _check_positive_integer("width", self.width)
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Images of shape ``(batch, height, width, channels)`` (NHWC), normalised as
            the weights expect (ImageNet mean and standard deviation for torchvision weights).
          train: Training mode: BatchNorm uses batch statistics and updates its running
            statistics.

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        _check_images(inputs)
        x = _conv(self.width, 7, 2, "conv1")(inputs)
        x = _batch_norm(train, "bn1")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block_class = _BasicBlock if self.block == "basic" else _Bottleneck
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                x = block_class(
                    features=self.width * 2**stage,
                    strides=2 if stage > 0 and index == 0 else 1,
                    name=f"layer{stage + 1}_{index}",
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="fc")(x)

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to a network with ``params``.

        Args:
          params: The ``"params"`` collection of this module.
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat import models
          >>> from bnn_flat.models.resnet_imagenet import ImageNetResNet
          >>> module = ImageNetResNet(stage_sizes=(1,), block="basic", num_classes=2, width=4)
          >>> params, _ = jax.eval_shape(
          ...     lambda key: models.init(module, key, jnp.ones((1, 8, 8, 3))), jax.random.key(0))
          >>> module.validate_inputs(params, jnp.ones((2, 32, 32, 3)))  # any size works
        """
        _check_images(inputs)
        try:
            channels = params["conv1"]["kernel"].shape[-2]
        except (KeyError, TypeError, IndexError):
            return  # unusual parameter tree: let Flax report any mismatch
        if inputs.shape[-1] != channels:
            raise ValueError(
                f"ImageNetResNet parameters expect {channels} input channels, got inputs of "
                f"shape {inputs.shape} ({inputs.shape[-1]} channels)"
            )


def resnet18(num_classes: int = 1000, *, width: int = 64) -> ImageNetResNet:
    """Builds torchvision's ResNet-18 (11,689,512 parameters with 1000 classes).

    Args:
      num_classes: Number of output logits.
      width: Channels of the stem and the first stage (64 in torchvision).

    Returns:
      The (unbound) Flax module.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models.resnet_imagenet import resnet18
      >>> shapes = jax.eval_shape(lambda key: models.init(
      ...     resnet18(), key, jnp.ones((1, 224, 224, 3))), jax.random.key(0))
      >>> models.num_params(shapes[0])
      11689512
    """
    return ImageNetResNet(
        stage_sizes=(2, 2, 2, 2), block="basic", num_classes=num_classes, width=width
    )


def resnet34(num_classes: int = 1000, *, width: int = 64) -> ImageNetResNet:
    """Builds torchvision's ResNet-34 (21,797,672 parameters with 1000 classes).

    Args:
      num_classes: Number of output logits.
      width: Channels of the stem and the first stage (64 in torchvision).

    Returns:
      The (unbound) Flax module.

    Example:
      >>> from bnn_flat.models.resnet_imagenet import resnet34
      >>> resnet34(num_classes=10).stage_sizes
      (3, 4, 6, 3)
    """
    return ImageNetResNet(
        stage_sizes=(3, 4, 6, 3), block="basic", num_classes=num_classes, width=width
    )


def resnet50(num_classes: int = 1000, *, width: int = 64) -> ImageNetResNet:
    """Builds torchvision's ResNet-50 v1.5 (25,557,032 parameters with 1000 classes).

    Args:
      num_classes: Number of output logits.
      width: Inner channels of the stem and the first stage (64 in torchvision); bottleneck
        outputs have four times as many.

    Returns:
      The (unbound) Flax module.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models.resnet_imagenet import resnet50
      >>> shapes = jax.eval_shape(lambda key: models.init(
      ...     resnet50(), key, jnp.ones((1, 224, 224, 3))), jax.random.key(0))
      >>> models.num_params(shapes[0])
      25557032
    """
    return ImageNetResNet(
        stage_sizes=(3, 4, 6, 3), block="bottleneck", num_classes=num_classes, width=width
    )


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision ``BasicBlock``)."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        y = _conv(self.features, 3, self.strides, "conv1")(inputs)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        return nn.relu(y + _shortcut(inputs, self.features, self.strides, train))


class _Bottleneck(nn.Module):
    """1x1, 3x3 (strided), 1x1 convolutions with expansion 4 (torchvision ``Bottleneck``)."""

    features: int
    strides: int

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        y = _conv(self.features, 1, 1, "conv1")(inputs)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = _conv(self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(_batch_norm(train, "bn2")(y))
        y = _conv(4 * self.features, 1, 1, "conv3")(y)
        y = _batch_norm(train, "bn3")(y)
        return nn.relu(y + _shortcut(inputs, 4 * self.features, self.strides, train))


def _shortcut(inputs: jax.Array, features: int, strides: int, train: bool) -> jax.Array:
    """Identity, or 1x1 convolution and BatchNorm when the shape changes (inside compact)."""
    if strides == 1 and inputs.shape[-1] == features:
        return inputs
    shortcut = _conv(features, 1, strides, "downsample_conv")(inputs)
    return _batch_norm(train, "downsample_bn")(shortcut)


def _conv(features: int, kernel_size: int, strides: int, name: str) -> nn.Conv:
    padding = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=((padding, padding), (padding, padding)),
        use_bias=False,
        kernel_init=_CONV_INIT,
        name=name,
    )


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=_BATCH_NORM_MOMENTUM,
        epsilon=_EPSILON,
        name=name,
    )


def _check_positive_integer(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_images(inputs: jax.Array) -> None:
    if inputs.ndim != 4 or inputs.shape[1] < 1 or inputs.shape[2] < 1 or inputs.shape[3] < 1:
        raise ValueError(
            f"ImageNetResNet expects images of shape (batch, height, width, channels), got "
            f"shape {inputs.shape}"
        )
