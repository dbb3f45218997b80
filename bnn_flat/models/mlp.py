"""Multilayer perceptron.

A stack of fully connected layers with an activation (and optional dropout) after every hidden
layer and a linear output layer. Image inputs are flattened, so the same module works on
``(batch, features)`` tables and ``(batch, height, width, channels)`` images.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """A fully connected network: ``Dense -> activation -> Dropout`` per hidden layer.

    Parameters are named ``hidden_0``, ``hidden_1``, ... and ``output``.

    Attributes:
      hidden_sizes: Width of each hidden layer (may be empty: a linear model).
      num_outputs: Width of the output layer (logits or regression outputs).
      dropout_rate: Probability of zeroing a hidden unit in training mode (inverted dropout:
        kept units are scaled by ``1 / (1 - dropout_rate)``).
      activation: Element-wise nonlinearity applied after every hidden layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = models.MLP(hidden_sizes=(32,), num_outputs=3)
      >>> params, model_state = models.init(module, jax.random.key(0), jnp.ones((2, 5)))
      >>> outputs, _ = models.make_apply(module)(params, model_state, jnp.ones((4, 5)), train=False)
      >>> outputs.shape
      (4, 3)
    """

    hidden_sizes: Sequence[int]
    num_outputs: int
    dropout_rate: float = 0.0
    activation: Callable[[jax.Array], jax.Array] = nn.relu

    def __post_init__(self) -> None:
        for size in self.hidden_sizes:
            if not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"hidden_sizes must be positive integers, got {self.hidden_sizes}")
        if not isinstance(self.num_outputs, numbers.Integral) or self.num_outputs < 1:
            raise ValueError(f"num_outputs must be a positive integer, got {self.num_outputs}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Array of shape ``(batch, ...)``; everything after the batch axis is
            flattened into features.
          train: Whether dropout is active (needs the ``"dropout"`` RNG stream).

        Returns:
          Array of shape ``(batch, num_outputs)``.
        """
        if inputs.ndim < 2:
            raise ValueError(
                f"MLP expects inputs of shape (batch, features...), got shape {inputs.shape}"
            )
        x = inputs.reshape(inputs.shape[0], -1)
        for index, size in enumerate(self.hidden_sizes):
            x = nn.Dense(size, name=f"hidden_{index}")(x)
            x = self.activation(x)
            x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        return nn.Dense(self.num_outputs, name="output")(x)

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to a network with ``params``.

        Args:
          params: The ``"params"`` collection of this module (one member, not a stack).
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat import models
          >>> module = models.MLP(hidden_sizes=(4,), num_outputs=2)
          >>> params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 3)))
          >>> module.validate_inputs(params, jnp.ones((5, 3)))  # fine: no error
        """
        if inputs.ndim < 2:
            raise ValueError(
                f"MLP expects inputs of shape (batch, features...), got shape {inputs.shape}"
            )
        first = "hidden_0" if self.hidden_sizes else "output"
        try:
            expected = params[first]["kernel"].shape[-2]
        except (KeyError, TypeError, IndexError):
            return  # unusual parameter tree: let Flax report any mismatch
        got = math.prod(inputs.shape[1:])
        if expected != got:
            raise ValueError(
                f"MLP parameters expect {expected} input features per example, got inputs of "
                f"shape {inputs.shape} ({got} features after flattening)"
            )


def mlp(
    hidden_sizes: Sequence[int],
    num_outputs: int,
    *,
    dropout_rate: float = 0.0,
    activation: Callable[[jax.Array], jax.Array] = nn.relu,
) -> MLP:
    """Builds an :class:`MLP`.

    Args:
      hidden_sizes: Width of each hidden layer.
      num_outputs: Width of the output layer.
      dropout_rate: Dropout probability after every hidden activation.
      activation: Element-wise nonlinearity.

    Returns:
      The (unbound) Flax module.

    Example:
      >>> from bnn_flat import models
      >>> module = models.mlp([100, 100], num_outputs=10, dropout_rate=0.1)
      >>> module.hidden_sizes
      (100, 100)
    """
    return MLP(
        hidden_sizes=tuple(hidden_sizes),
        num_outputs=num_outputs,
        dropout_rate=dropout_rate,
        activation=activation,
    )
