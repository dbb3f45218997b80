"""LeNet-5 style convolutional network.

Two 5x5 convolutions (6 and 16 channels), each followed by the activation and 2x2 pooling, then
dense layers of 120 and 84 units and a linear classifier. Both convolutions use ``'SAME'``
padding, so the network runs on 8x8 digits as well as 28x28 MNIST and 32x32 CIFAR images (the
first dense layer then sees 64, 784 and 1024 features: 16 channels of a quarter-size image).

References:
  LeCun, Bottou, Bengio, Haffner (1998). Gradient-based learning applied to document
  recognition. Proceedings of the IEEE.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from bnn_flat.models.conv import Conv
from bnn_flat.models.pooling import avg_pool, max_pool

__all__ = ["LeNet", "lenet"]

_POOLINGS = ("max", "average")


class LeNet(nn.Module):
    """LeNet-5 style CNN for NHWC images.

    Parameters are named ``conv_0``, ``conv_1``, ``dense_0``, ``dense_1`` and ``output``.
    Dropout (if any) follows the activations of the two hidden dense layers.

    Attributes:
      num_classes: Number of output logits.
      dropout_rate: Dropout probability after each hidden dense layer (inverted dropout).
      pooling: ``"max"`` or ``"average"`` 2x2 pooling with stride 2
        (:mod:`bnn_flat.models.pooling`: the values and gradients of Flax's pooling, with
        element-wise derivatives).
      activation: Element-wise nonlinearity.
      conv: Factory of convolution modules with the signature of :class:`flax.linen.Conv`;
        swap it for a faster implementation without changing the parameter layout. The
        default, :class:`bnn_flat.models.conv.Conv`, keeps gradients fast inside compiled
        loops on CPU and is plain ``lax`` convolution elsewhere.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.LeNet(num_classes=10)
      >>> params, state = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 1)))
      >>> logits, _ = models.make_apply(module)(params, state, jnp.ones((2, 8, 8, 1)), train=False)
      >>> logits.shape
      (2, 10)
    """

    num_classes: int
    dropout_rate: float = 0.0
    pooling: str = "max"
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    conv: Callable[..., nn.Module] = Conv

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Images of shape ``(batch, height, width, channels)``, at least 4x4 pixels.
          train: Whether dropout is active (needs the ``"dropout"`` RNG stream).

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        _check_images(inputs)
        pool = max_pool if self.pooling == "max" else avg_pool
        x = inputs
        for index, features in enumerate((6, 16)):
            x = self.conv(features, (5, 5), padding="SAME", name=f"conv_{index}")(x)
            x = self.activation(x)
            x = pool(x, (2, 2))
        x = x.reshape(x.shape[0], -1)
        for index, features in enumerate((120, 84)):
            x = nn.Dense(features, name=f"dense_{index}")(x)
            x = self.activation(x)
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return nn.Dense(self.num_classes, name="output")(x)

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to a network with ``params``.

        Checks the rank, the number of channels against the first convolution and the image
        size against the first dense layer.

        Args:
          params: The ``"params"`` collection of this module (one member, not a stack).
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat import models
          >>> module = models.LeNet(num_classes=10)
          >>> params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 1)))
          >>> module.validate_inputs(params, jnp.ones((3, 8, 8, 1)))  # fine: no error
        """
        _check_images(inputs)
        try:
            channels = params["conv_0"]["kernel"].shape[-2]
            dense_features = params["dense_0"]["kernel"].shape[-2]
        except (KeyError, TypeError, IndexError):
            return  # unusual parameter tree: let Flax report any mismatch
        if inputs.shape[-1] != channels:
            raise ValueError(
                f"LeNet parameters expect {channels} input channels, got inputs of shape "
                f"{inputs.shape} ({inputs.shape[-1]} channels)"
            )
        got = 16 * (inputs.shape[1] // 4) * (inputs.shape[2] // 4)
        if got != dense_features:
            raise ValueError(
                f"LeNet parameters were made for images giving {dense_features} features after "
                f"the convolutions; inputs of shape {inputs.shape} give {got}"
            )


def _check_images(inputs: jax.Array) -> None:
    if inputs.ndim != 4:
        raise ValueError(
            f"LeNet expects images of shape (batch, height, width, channels), got shape "
            f"{inputs.shape}"
        )
    if inputs.shape[1] < 4 or inputs.shape[2] < 4:
        raise ValueError(f"LeNet needs images of at least 4x4 pixels, got shape {inputs.shape}")


def lenet(
    num_classes: int,
    *,
    dropout_rate: float = 0.0,
    pooling: str = "max",
    activation: Callable[[jax.Array], jax.Array] = nn.relu,
) -> LeNet:
    """Builds a :class:`LeNet`.

    Args:
      num_classes: Number of output logits.
      dropout_rate: Dropout probability after each hidden dense layer.
      pooling: ``"max"`` or ``"average"``.
      activation: Element-wise nonlinearity.

    Returns:
      The (unbound) Flax module.

    Example:
      >>> from bnn_flat import models
      >>> models.lenet(10, pooling="average").pooling
      'average'
    """
    return LeNet(
        num_classes=num_classes, dropout_rate=dropout_rate, pooling=pooling, activation=activation
    )
