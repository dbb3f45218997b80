"""scikit-learn's embedded 8x8 handwritten digits: a stratified train/val/test split.

The 1,797 images ship with scikit-learn, so loading needs no network. Raw pixels are
integers from 0 to 16. :func:`load_digits` splits them per class with a seeded NumPy
generator and standardises every split with **one** global mean and standard deviation
computed over all pixels of the training split (not per pixel, not per split):

.. math:: x' = (x - \\mu_{train}) / \\sigma_{train}.

:func:`digits_normalization` returns those two constants, so that other views of the same
data (the shifted test sets of :mod:`bnn_flat.data.shift`) use the identical transform.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from bnn_flat.data.dataset import Dataset

__all__ = [
    "NUM_DIGITS",
    "DIGITS_MAX_VALUE",
    "Normalization",
    "load_digits",
    "digits_normalization",
]

NUM_DIGITS = 1797
"""Number of images in scikit-learn's digits dataset."""

DIGITS_MAX_VALUE = 16.0
"""Largest raw pixel value of the digits images (the smallest is 0)."""

_SPLITS = ("train", "val", "test")


class Normalization(NamedTuple):
    """A global affine standardisation ``(x - mean) / std``.

    Attributes:
      mean: The mean of all training pixels (raw scale).
      std: The standard deviation of all training pixels (raw scale).
    """

    mean: float
    std: float

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Standardises raw images.

        Args:
          images: Raw images of any shape.

        Returns:
          ``(images - mean) / std`` as ``float32``.

        Example:
          >>> Normalization(mean=2.0, std=4.0).apply(np.array([6.0])).tolist()
          [1.0]
        """
        return ((np.asarray(images, np.float32) - self.mean) / self.std).astype(np.float32)


def load_digits(
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    flatten: bool = False,
    standardize: bool = True,
) -> dict[str, Dataset]:
    """Loads the embedded digits as standardised train, val and test splits.

    The split is stratified: for each class, its examples are permuted with
    ``numpy.random.default_rng(seed)`` and ``round(n_c * test_fraction)`` go to test,
    ``round(n_c * val_fraction)`` to val and the rest to train. Within a split, examples
    keep scikit-learn's original order. With the defaults the sizes are 1,077 / 269 / 451.

    Args:
      seed: Seed of the split (non-negative).
      val_fraction: Fraction of each class in the validation split, in ``[0, 1)``.
      test_fraction: Fraction of each class in the test split, in ``[0, 1)``; the two
        fractions must sum to less than 1.
      flatten: Return inputs of shape ``(N, 64)`` instead of ``(N, 8, 8, 1)``.
      standardize: Standardise with the training split's global pixel mean and std (see
        :func:`digits_normalization`). If false, the raw 0..16 values are returned.

    Returns:
      ``{"train": Dataset, "val": Dataset, "test": Dataset}`` with ``float32`` inputs and
      ``int32`` labels.

    Example:
      >>> splits = load_digits(seed=0)
      >>> splits["train"].inputs.shape, splits["test"].labels.shape
      ((1077, 8, 8, 1), (451,))
    """
    images, labels, indices = _split_digits(seed, val_fraction, test_fraction)
    normalization = _normalization_from_train(images[indices["train"]])
    result = {}
    for split in _SPLITS:
        split_images = images[indices[split]]
        if standardize:
            split_images = normalization.apply(split_images)
        result[split] = Dataset(
            inputs=_format_images(split_images, flatten),
            labels=labels[indices[split]],
        )
    return result


def digits_normalization(
    *, seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.25
) -> Normalization:
    """The standardisation constants :func:`load_digits` uses for a given split.

    Args:
      seed: Seed of the split.
      val_fraction: Fraction of each class in the validation split.
      test_fraction: Fraction of each class in the test split.

    Returns:
      The :class:`Normalization` (mean and std over all training pixels, raw scale).

    Example:
      >>> normalization = digits_normalization(seed=0)
      >>> round(normalization.mean, 1), round(normalization.std, 1)
      (4.9, 6.0)
    """
    images, _, indices = _split_digits(seed, val_fraction, test_fraction)
    return _normalization_from_train(images[indices["train"]])


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 raw images ``(N, 8, 8)`` float32 in 0..16 and their int32 labels."""
    from sklearn.datasets import load_digits as _sklearn_load_digits

    bunch = _sklearn_load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int32)


def _split_digits(
    seed: int, val_fraction: float, test_fraction: float
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Raw images, labels and the sorted example indices of each split."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction}.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}."
        )
    images, labels = _raw_digits()
    rng = np.random.default_rng(int(seed))
    parts: dict[str, list[np.ndarray]] = {split: [] for split in _SPLITS}
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(np.floor(len(members) * test_fraction + 0.5))
        num_val = int(np.floor(len(members) * val_fraction + 0.5))
        parts["test"].append(members[:num_test])
        parts["val"].append(members[num_test : num_test + num_val])
        parts["train"].append(members[num_test + num_val :])
    indices = {split: np.sort(np.concatenate(parts[split])) for split in _SPLITS}
    if indices["train"].size == 0:
        raise ValueError("the training split is empty; lower val_fraction or test_fraction.")
    return images, labels, indices


def _normalization_from_train(train_images: np.ndarray) -> Normalization:
    pixels = np.asarray(train_images, np.float64)
    return Normalization(mean=float(pixels.mean()), std=float(pixels.std()))


def _format_images(images: np.ndarray, flatten: bool) -> np.ndarray:
    """(N, 8, 8) -> (N, 8, 8, 1) or (N, 64), float32."""
    images = np.asarray(images, np.float32)
    if flatten:
        return images.reshape(images.shape[0], -1)
    return images[..., None]
