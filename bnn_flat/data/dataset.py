"""The in-memory dataset type shared by every loader, and its validation.

A :class:`Dataset` is a NamedTuple of two NumPy arrays, so it is also a JAX pytree:
``jax.device_put(dataset)`` moves both arrays at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

__all__ = ["Dataset", "check_dataset"]


class Dataset(NamedTuple):
    """A supervised dataset held in memory.

    Attributes:
      inputs: ``float32`` array of shape ``(N, H, W, C)`` (images) or ``(N, D)`` (vectors).
      labels: ``int32`` class indices of shape ``(N,)``.
    """

    inputs: np.ndarray
    labels: np.ndarray


def check_dataset(dataset: Dataset, name: str = "dataset") -> None:
    """Raises ``ValueError`` if ``dataset`` is not a well-formed classification dataset.

    Checks: at least one example; ``inputs`` has a leading example axis and at least one
    feature axis; ``inputs`` and ``labels`` have the same length; inputs are finite;
    labels are a 1-D integer array of non-negative class indices.

    Args:
      dataset: The dataset to check.
      name: A name used in error messages (e.g. ``"train"``).

    Returns:
      None.

    Example:
      >>> import numpy as np
      >>> check_dataset(Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 2])), "toy")
    """
    inputs = np.asarray(dataset.inputs)
    labels = np.asarray(dataset.labels)
    if inputs.ndim < 2:
        raise ValueError(
            f"{name}: inputs must have shape (N, ...features), got shape {inputs.shape}."
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{name}: the dataset is empty.")
    if labels.ndim != 1:
        raise ValueError(f"{name}: labels must have shape (N,), got shape {labels.shape}.")
    if inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{name}: {inputs.shape[0]} inputs but {labels.shape[0]} labels; the lengths "
            "must match."
        )
    if not np.issubdtype(inputs.dtype, np.number):
        raise ValueError(f"{name}: inputs must be numeric, got dtype {inputs.dtype}.")
    if np.issubdtype(inputs.dtype, np.inexact) and not np.all(np.isfinite(inputs)):
        count = int(np.sum(~np.isfinite(inputs)))
        raise ValueError(f"{name}: inputs contain {count} NaN or infinite values.")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name}: labels must have an integer dtype, got {labels.dtype}.")
    if np.any(labels < 0):
        raise ValueError(f"{name}: labels must be non-negative, got minimum {labels.min()}.")


def _numpy_rng(key_or_seed: int | jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from an integer seed or a JAX PRNG key (typed or raw)."""
    if isinstance(key_or_seed, bool):
        raise ValueError("key_or_seed must be an int seed or a jax.random key, got a bool.")
    if isinstance(key_or_seed, int | np.integer):
        if key_or_seed < 0:
            raise ValueError(f"seed must be non-negative, got {key_or_seed}.")
        return np.random.default_rng(int(key_or_seed))
    array = key_or_seed
    if isinstance(array, jax.Array) and jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    words = np.asarray(array)
    if not np.issubdtype(words.dtype, np.unsignedinteger) or words.ndim != 1:
        raise ValueError(
            "key_or_seed must be an int seed or a single jax.random key, got an array of "
            f"dtype {words.dtype} and shape {words.shape}."
        )
    return np.random.default_rng([int(word) for word in words])
