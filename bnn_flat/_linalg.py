"""Products with a short (rank) axis that XLA:CPU's library GEMM runs slowly (private).

A low-rank Gaussian's factor is a (K, d) matrix with K ~ 5 and d up to millions. The K x K
Gram matrix ``W V^T`` and the K-row mixture ``M W`` are tiny matrix products with a huge
dimension; XLA:CPU runs them through its library GEMM at a fraction of memory bandwidth
(a (5, 269322) x (269322, 5) product: 3.3 ms, five matrix-vector products over the same
data: 1.7 ms; a (5, 5) x (5, 269322) product: ~3 ms, the unrolled sum: one fused pass).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gram", "small_matmul"]

_SMALL = 16


def gram(left: jax.Array, right: jax.Array) -> jax.Array:
    """``left @ right.T`` for (m, d) and (n, d); matrix-vector products when m or n is small.

    Example:
      >>> import jax.numpy as jnp
      >>> gram(jnp.ones((2, 3)), jnp.arange(6.0).reshape(2, 3))
      Array([[ 3., 12.],
             [ 3., 12.]], dtype=float32)
    """
    if min(left.shape[0], right.shape[0]) > _SMALL:
        return left @ right.T
    if left.shape[0] <= right.shape[0]:
        return jnp.stack([right @ row for row in left], axis=0)
    return jnp.stack([left @ row for row in right], axis=1)


def small_matmul(matrix: jax.Array, stacked: jax.Array) -> jax.Array:
    """``matrix @ stacked`` over the leading axis of ``stacked`` as fused multiply-adds.

    ``matrix`` is (m, K) and ``stacked`` (K, ...); the result is (m, ...).

    Example:
      >>> import jax.numpy as jnp
      >>> small_matmul(jnp.array([[1.0, 2.0]]), jnp.ones((2, 3)))
      Array([[3., 3., 3.]], dtype=float32)
    """
    if stacked.shape[0] > _SMALL:
        return jnp.tensordot(matrix, stacked, axes=1)
    shape = (-1,) + (1,) * (stacked.ndim - 1)
    return sum(matrix[:, j].reshape(shape) * stacked[j] for j in range(stacked.shape[0]))
