"""Fast standard-normal draws shared by the library (private).

Three XLA:CPU effects, all fixed here without changing any random value:

* JAX lowers the Threefry-2x32 hash on the CPU as a rolled five-iteration loop, so every
  round group reads and writes the whole counter array: a 269,328-value normal draw took
  4.6 ms, of which the hash is more than half. :func:`standard_normal` draws through a
  PRNG implementation whose bits are the same partitionable Threefry-2x32 bits written as
  straight-line code (:func:`_threefry_bits`), which XLA fuses with the counter iota and
  the inverse-erf transform into one pass: 2.0 ms for the same draw, bit for bit equal to
  ``jax.random.normal``. Other key implementations (``rbg``, ``unsafe_rbg``, custom ones)
  and the non-partitionable Threefry mode use ``jax.random.normal`` itself.
* XLA:CPU generates an odd number of normals 6-10x slower than an even number (rolled:
  26 ms against 2.6 ms for 269,327 values; straight-line: 12.9 ms against 1.8 ms), so
  :func:`standard_normal` draws an even count and trims it (with partitionable Threefry
  element ``i`` depends only on ``i``, so the trimmed values are those of the direct draw).
* XLA fuses the random-bit generation and inverse-erf of a draw into every elementwise
  consumer. When the noise perturbs a normalisation layer's scale, which is broadcast over a
  whole activation tensor, the draw is recomputed once per activation element: with
  trainable GroupNorm parameters a ResNet-20 VI step took 2.3-2.5x an SGD step instead of
  ~1x. Drawing through :func:`bnn_flat._fusion.computed_once` stops it
  (``lax.optimization_barrier`` does not: XLA:CPU drops barriers before fusion).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import random as jax_random

from bnn_flat._fusion import computed_once

__all__ = ["standard_normal"]


def standard_normal(
    key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32
) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, computed faster on XLA:CPU (module doc).

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
    if size == 0:
        return jnp.zeros(shape, dtype)
    padded = size + size % 2
    key_data = _threefry_key_data(key)
    if key_data is not None:
        key = jax.random.wrap_key_data(key_data, impl=_UNROLLED_THREEFRY)
    flat = computed_once(lambda k: jax.random.normal(k, (padded,), dtype), key)
    return flat[:size].reshape(shape)


# Threefry-2x32 (Salmon et al., SC 2011) with 20 rounds, as JAX's default PRNG uses it.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_KEY_SCHEDULE_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x: jax.Array, bits: int) -> jax.Array:
    return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def _threefry2x32(key0, key1, count0, count1):
    """The Threefry-2x32 block function, straight-line (five groups of four rounds)."""
    schedule = (key0, key1, key0 ^ key1 ^ _KEY_SCHEDULE_PARITY)
    x0 = count0 + schedule[0]
    x1 = count1 + schedule[1]
    for group in range(5):
        for rotation in _ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = _rotate_left(x1, rotation) ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _threefry_bits(key_data: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
    """JAX's partitionable Threefry bits: element ``i`` hashes the 64-bit counter ``i``."""
    size = math.prod(shape)
    if size >= 2**32:
        raise NotImplementedError("draws of 2**32 or more values use jax.random directly")
    low = jax.lax.iota(jnp.uint32, size)
    high = jnp.zeros((size,), jnp.uint32)
    bits0, bits1 = _threefry2x32(key_data[0], key_data[1], high, low)
    if bit_width == 64:
        wide = jnp.uint64
        bits = (bits0.astype(wide) << np.uint64(32)) | bits1.astype(wide)
    else:
        bits = (bits0 ^ bits1).astype({8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[bit_width])
    return bits.reshape(shape)


_THREEFRY = jax_random.threefry_prng_impl
_UNROLLED_THREEFRY = jax_random.define_prng_impl(
    key_shape=(2,),
    seed=_THREEFRY.seed,
    split=_THREEFRY.split,
    random_bits=_threefry_bits,
    fold_in=_THREEFRY.fold_in,
    name="bnn_flat_threefry2x32_unrolled",
    tag="ftu",
)


def _threefry_key_data(key: jax.Array) -> jax.Array | None:
    """The raw data of a single Threefry key whose draws the unrolled hash reproduces."""
    if not jax.config.jax_threefry_partitionable:
        return None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != () or str(jax.random.key_impl(key)) != "threefry2x32":
            return None
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        return None
    if str(jax.config.jax_default_prng_impl) != "threefry2x32":
        return None
    return key
