"""Non-overlapping max and average pooling written with reshapes and element-wise ops.

:func:`flax.linen.max_pool` lowers to ``reduce_window``. Its derivative is a
``select_and_gather_add``, which XLA:CPU emits as a variadic ``reduce_window`` that carries an
integer index array per window position, and in reverse mode a ``select_and_scatter``. When
the window equals the stride and there is no padding (LeNet's 2x2 pooling), pooling is a
reshape followed by a reduction over the window axes, and its derivative is element-wise:

* :func:`max_pool` returns exactly :func:`flax.linen.max_pool`'s values, and its tangent is
  the tangent of the *first* maximal element of each window in row-major order, the element
  that ``reduce_window``'s derivative selects, so gradients are identical too, ties included
  (ReLU outputs often tie at zero);
* :func:`avg_pool` is the window mean (equal to :func:`flax.linen.avg_pool` up to float
  summation order).

Rows and columns beyond the last whole window are dropped, as ``'VALID'`` pooling does. The
max is a :func:`jax.custom_jvp`, so every order of forward and reverse differentiation works.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

__all__ = ["max_pool", "avg_pool"]


def max_pool(inputs: jax.Array, window_shape: Sequence[int]) -> jax.Array:
    """Max pooling over non-overlapping windows (stride = window, ``'VALID'`` padding).

    Args:
      inputs: array ``(batch, spatial..., features)``.
      window_shape: window size per spatial axis (also the stride).

    Returns:
      ``(batch, spatial // window..., features)``, equal to ``flax.linen.max_pool(inputs,
      window_shape, strides=window_shape)``, with the same derivatives.

    Raises:
      ValueError: if the rank does not match the window, a window size is not positive or
        larger than the input.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> max_pool(x, (2, 2))[0, :, :, 0]
      Array([[ 5.,  7.],
             [13., 15.]], dtype=float32)
    """
    window = _check(inputs, window_shape)
    return _max_pool(window, inputs)


def avg_pool(inputs: jax.Array, window_shape: Sequence[int]) -> jax.Array:
    """Average pooling over non-overlapping windows (stride = window, ``'VALID'`` padding).

    Args:
      inputs: array ``(batch, spatial..., features)``.
      window_shape: window size per spatial axis (also the stride).

    Returns:
      ``(batch, spatial // window..., features)``, the mean of each window.

    Raises:
      ValueError: as :func:`max_pool`.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
      >>> avg_pool(x, (2, 2))[0, :, :, 0]
      Array([[ 2.5,  4.5],
             [10.5, 12.5]], dtype=float32)
    """
    window = _check(inputs, window_shape)
    elements = _window_elements(inputs, window)
    return functools.reduce(jnp.add, elements) / len(elements)


def _check(inputs: jax.Array, window_shape: Sequence[int]) -> tuple[int, ...]:
    window = tuple(int(w) for w in window_shape)
    if inputs.ndim != len(window) + 2:
        raise ValueError(
            f"pooling with a {len(window)}-D window expects inputs of rank {len(window) + 2} "
            f"(batch, spatial..., features), got shape {inputs.shape}"
        )
    if any(w < 1 for w in window):
        raise ValueError(f"pooling window sizes must be positive, got {window}")
    spatial = inputs.shape[1:-1]
    if any(size < w for size, w in zip(spatial, window, strict=True)):
        raise ValueError(f"pooling window {window} is larger than the input {spatial}")
    return window


def _window_elements(inputs: jax.Array, window: tuple[int, ...]) -> list[jax.Array]:
    """Each window position (row-major) as a pooled-size array; partial windows dropped."""
    batch, *spatial, features = inputs.shape
    kept = tuple(slice(0, (size // w) * w) for size, w in zip(spatial, window, strict=True))
    inputs = inputs[(slice(None), *kept)]
    split_shape = [batch]
    for size, w in zip(spatial, window, strict=True):
        split_shape += [size // w, w]
    split = inputs.reshape(*split_shape, features)
    elements = []
    for offset in itertools.product(*(range(w) for w in window)):
        index = (slice(None),)
        for position in offset:
            index += (slice(None), position)
        elements.append(split[index])
    return elements


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _max_pool(window: tuple[int, ...], inputs: jax.Array) -> jax.Array:
    return functools.reduce(jnp.maximum, _window_elements(inputs, window))


@_max_pool.defjvp
def _max_pool_jvp(window, primals, tangents):
    (inputs,), (tangent,) = primals, tangents
    values = _window_elements(inputs, window)
    tangent_values = _window_elements(tangent, window)
    out = functools.reduce(jnp.maximum, values)
    # the tangent of the first maximal element (row-major), as reduce_window's derivative
    chosen = tangent_values[-1]
    for value, candidate in zip(values[-2::-1], tangent_values[-2::-1], strict=True):
        chosen = jnp.where(value == out, candidate, chosen)
    return out, chosen
