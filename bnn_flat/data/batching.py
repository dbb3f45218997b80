"""Whole-epoch batching on device, for ``lax.scan`` training loops and padded evaluation.

:func:`epoch_batches` runs inside ``jax.jit``: it permutes the examples with
``jax.random.permutation`` and reshapes them into a stack of batches of static shape
``(num_batches, batch_size, ...)``, which ``lax.scan`` consumes one batch per step.

Training uses ``drop_remainder=True``: the last ``N mod batch_size`` examples of each
epoch's permutation are skipped. The permutation changes every epoch, so a different random
subset of at most ``batch_size - 1`` examples is skipped each time and no example is
systematically left out. With ``drop_remainder=False`` the last batch is completed with
copies of the first examples of the permutation and a boolean ``"mask"`` marks the real
entries; a loss must then weight its per-example terms by the mask.

:func:`eval_batches` keeps the data order, pads the last batch by repeating the final
example and returns the mask, so evaluation sees every example exactly once;
:func:`unbatch` undoes the batching of per-example outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["num_batches", "epoch_batches", "eval_batches", "unbatch"]


def num_batches(num_examples: int, batch_size: int, drop_remainder: bool = True) -> int:
    """Number of batches in one pass over ``num_examples`` examples.

    Args:
      num_examples: Number of examples (positive).
      batch_size: Examples per batch, in ``1..num_examples``.
      drop_remainder: Drop the incomplete last batch (``floor``) or keep it (``ceil``).

    Returns:
      ``num_examples // batch_size`` or ``ceil(num_examples / batch_size)``.

    Example:
      >>> num_batches(10, 3), num_batches(10, 3, drop_remainder=False)
      (3, 4)
    """
    _check_sizes(num_examples, batch_size)
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def epoch_batches(
    key: jax.Array,
    inputs: jax.Array,
    labels: jax.Array,
    batch_size: int,
    *,
    drop_remainder: bool = True,
) -> dict[str, jax.Array]:
    """Shuffles one epoch and stacks it into batches; usable inside ``jax.jit``.

    ``batch_size`` and ``drop_remainder`` must be static (Python values). The same key
    gives the same batches, and each example appears at most once.

    Args:
      key: A ``jax.random.key`` for the permutation.
      inputs: Array of shape ``(N, ...)``.
      labels: Array of shape ``(N,)`` or ``(N, ...)``.
      batch_size: Examples per batch, in ``1..N``.
      drop_remainder: If true, skip the last ``N mod batch_size`` examples of the
        permutation. If false, pad the last batch (see the module docstring) and add a
        ``"mask"`` entry.

    Returns:
      ``{"inputs": (B, batch_size, ...), "labels": (B, batch_size, ...)}`` with
      ``B = num_batches(N, batch_size, drop_remainder)``, plus ``"mask": (B, batch_size)``
      (bool) when ``drop_remainder`` is false.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x, y = jnp.arange(10.0)[:, None], jnp.arange(10)
      >>> batches = jax.jit(epoch_batches, static_argnums=3)(jax.random.key(0), x, y, 4)
      >>> batches["inputs"].shape, batches["labels"].shape
      ((2, 4, 1), (2, 4))
    """
    num_examples = _check_arrays(inputs, labels)
    count = num_batches(num_examples, batch_size, drop_remainder)
    permutation = jax.random.permutation(key, num_examples)
    total = count * batch_size
    if drop_remainder:
        indices = permutation[:total]
    else:
        indices = jnp.concatenate([permutation, permutation[: total - num_examples]])
    batches = _gather(inputs, labels, indices, count, batch_size)
    if not drop_remainder:
        batches["mask"] = (jnp.arange(total) < num_examples).reshape(count, batch_size)
    return batches


def eval_batches(inputs: jax.Array, labels: jax.Array, batch_size: int) -> dict[str, jax.Array]:
    """Splits data in order into padded batches with a mask; every example appears once.

    Args:
      inputs: Array of shape ``(N, ...)``.
      labels: Array of shape ``(N,)`` or ``(N, ...)``.
      batch_size: Examples per batch, in ``1..N``.

    Returns:
      ``{"inputs": (B, batch_size, ...), "labels": (B, batch_size, ...), "mask": (B,
      batch_size)}`` with ``B = ceil(N / batch_size)``. Entry ``j`` of batch ``b`` is
      example ``b * batch_size + j``; the padding repeats example ``N - 1`` and has mask
      false.

    Example:
      >>> import jax.numpy as jnp
      >>> batches = eval_batches(jnp.arange(5.0)[:, None], jnp.arange(5), 2)
      >>> batches["labels"].tolist(), batches["mask"].tolist()
      ([[0, 1], [2, 3], [4, 4]], [[True, True], [True, True], [True, False]])
    """
    num_examples = _check_arrays(inputs, labels)
    count = num_batches(num_examples, batch_size, drop_remainder=False)
    positions = jnp.arange(count * batch_size)
    indices = jnp.minimum(positions, num_examples - 1)
    batches = _gather(inputs, labels, indices, count, batch_size)
    batches["mask"] = (positions < num_examples).reshape(count, batch_size)
    return batches


def unbatch(batched: jax.Array, num_examples: int) -> jax.Array:
    """Inverse of :func:`eval_batches` for per-example outputs: drops the padding.

    Args:
      batched: Array of shape ``(B, batch_size, ...)``.
      num_examples: The number ``N`` of real examples, ``<= B * batch_size``.

    Returns:
      Array of shape ``(N, ...)`` in the original example order.

    Example:
      >>> import jax.numpy as jnp
      >>> unbatch(jnp.array([[0, 1], [2, 3], [4, 4]]), 5).tolist()
      [0, 1, 2, 3, 4]
    """
    if batched.ndim < 2:
        raise ValueError(f"batched must have shape (B, batch_size, ...), got {batched.shape}.")
    capacity = batched.shape[0] * batched.shape[1]
    if not 0 <= num_examples <= capacity:
        raise ValueError(f"num_examples must be in 0..{capacity}, got {num_examples}.")
    return batched.reshape(capacity, *batched.shape[2:])[:num_examples]


def _check_sizes(num_examples: int, batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ValueError(f"batch_size must be a Python int (static), got {batch_size!r}.")
    if num_examples <= 0:
        raise ValueError(f"there must be at least one example, got {num_examples}.")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the number of examples {num_examples}.")


def _check_arrays(inputs: jax.Array, labels: jax.Array) -> int:
    if jnp.ndim(inputs) < 1 or jnp.ndim(labels) < 1:
        raise ValueError("inputs and labels must have a leading example axis.")
    num_examples = jnp.shape(inputs)[0]
    if jnp.shape(labels)[0] != num_examples:
        raise ValueError(
            f"inputs have {num_examples} examples but labels have {jnp.shape(labels)[0]}."
        )
    return num_examples


def _gather(
    inputs: jax.Array, labels: jax.Array, indices: jax.Array, count: int, batch_size: int
) -> dict[str, jax.Array]:
    inputs = jnp.asarray(inputs)
    labels = jnp.asarray(labels)
    return {
        "inputs": inputs[indices].reshape(count, batch_size, *inputs.shape[1:]),
        "labels": labels[indices].reshape(count, batch_size, *labels.shape[1:]),
    }
