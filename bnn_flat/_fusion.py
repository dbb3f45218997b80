"""Stopping XLA from fusing a value's computation into its consumers (private).

XLA duplicates cheap elementwise producers into every consumer fusion. On XLA:CPU that can
make a step several times slower when the consumer is large and reuses the producer's
elements: a normalisation layer's random scale regenerated per activation element, or a
residual network's activations (normalisation, ReLU and skip additions of several blocks)
recomputed inside the layout transpose of every kernel-gradient convolution (ResNet-20: 190 of
the 330 ms of a step). ``lax.optimization_barrier`` does not stop this (XLA:CPU removes
barriers before fusion) and XLA inlines conditionals and loops it can prove run once.
:func:`computed_once` evaluates a value as the body of a ``while`` loop whose exit test XLA
cannot evaluate at compile time; loop results are materialised, so consumers read stored
values. :func:`fence` is the differentiable identity built on it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["computed_once", "fence"]


def computed_once(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, computed inside a loop so that it is stored before use.

    The loop always runs exactly once: its exit flag starts as ``never``, which is false for
    every input (no number is greater than itself, NaN included), so the result is exactly
    ``function(*args)``. Not reverse-differentiable (a ``while`` loop): use it for values
    that need no gradient, or through :func:`fence`.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.arange(3.0)
      >>> bool((computed_once(lambda v: jnp.sin(v) * 2, x) == jnp.sin(x) * 2).all())
      True
    """
    leaves = [leaf for leaf in jax.tree.leaves(args) if jnp.size(leaf) > 0]
    if not any(_staged(leaf) for leaf in leaves):
        # Eager execution runs each operation on its own (nothing to fuse), and a loop there
        # would be compiled anew at every call.
        return function(*args)
    probe = jnp.ravel(jnp.asarray(leaves[0]))[0]
    if jnp.issubdtype(probe.dtype, jax.dtypes.prng_key):
        probe = jnp.ravel(jax.random.key_data(probe))[0]
    never = probe > probe
    shapes = jax.eval_shape(function, *args)
    zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)
    _, values = jax.lax.while_loop(
        lambda carry: jnp.logical_not(carry[0]),
        lambda carry: (jnp.ones((), bool), function(*args)),
        (never, zeros),
    )
    return values


def _staged(value: Any) -> bool:
    """Whether ``value`` is being traced into a compiled program (``jit``, ``scan``, ...)."""
    try:
        from jax._src.interpreters.partial_eval import DynamicJaxprTracer
    except ImportError:  # pragma: no cover - private path moved: treat every tracer as staged
        return isinstance(value, jax.core.Tracer)
    while isinstance(value, jax.core.Tracer):
        if isinstance(value, DynamicJaxprTracer):
            return True
        # JVP and batching tracers wrap the value of the trace below them
        inner = getattr(value, "primal", None)
        if inner is None:
            inner = getattr(value, "val", None)
        if inner is None or inner is value:
            return False
        value = inner
    return False


@jax.custom_jvp
def fence(x: Any) -> Any:
    """The identity, with ``x`` stored before its consumers run; differentiable at any order.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> float(jax.grad(lambda x: jnp.sum(fence(x) ** 2))(jnp.array(3.0)))
      6.0
    """
    return computed_once(lambda value: jax.tree.map(lambda leaf: leaf + 0, value), x)


@fence.defjvp
def _fence_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return fence(x), x_dot
