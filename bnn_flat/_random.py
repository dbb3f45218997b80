"""Fast standard-normal draws shared by the library (private).

XLA:CPU generates an odd number of threefry normals about 10x slower than an even number
(measured on a 269,327-value draw: 26 ms against 2.6 ms). :func:`standard_normal` draws an
even count and trims it; with JAX's partitionable threefry (the default) the trimmed values
are exactly those of the direct draw, so no random stream changes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["standard_normal"]


def standard_normal(
    key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, drawn as an even count for speed.

    Args:
      key: PRNG key.
      shape: output shape.
      dtype: floating dtype.

    Returns:
      Standard normal values of ``shape``.

    Example:
      >>> import jax
      >>> a = standard_normal(jax.random.key(0), (3, 5))
      >>> bool((a == jax.random.normal(jax.random.key(0), (3, 5))).all())
      True
    """
    size = math.prod(shape)
    padded = size + size % 2
    return jax.random.normal(key, (padded,), dtype)[:size].reshape(shape)
