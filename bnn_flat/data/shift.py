"""Procedural distribution shift: rotated, noisy, blurred, translated, low-contrast images.

Shifts act on **raw** images (for the digits, pixel values 0..16) and, for the digits, are
followed by the clean training split's standardisation, so a model sees a shifted image
exactly as it would see a clean one. Severity 0 is the identity for every kind; severities
1..5 follow this table (``SEVERITY_TABLE``):

============  =======================================  ====  ====  ====  ====  ====
kind          parameter                                1     2     3     4     5
============  =======================================  ====  ====  ====  ====  ====
rotation      angle in degrees, random sign per image  15    30    45    60    90
noise         Gaussian std, digits pixel units (0..16) 1.0   2.0   3.0   4.5   6.0
blur          Gaussian sigma in pixels                 0.5   0.75  1.0   1.25  1.5
translation   distance in pixels, random direction     0.5   1.0   1.5   2.0   2.5
contrast      factor c in ``m + c (x - m)``            0.7   0.5   0.4   0.3   0.2
============  =======================================  ====  ====  ====  ====  ====

Details: rotation (:func:`scipy.ndimage.rotate`) and translation (:func:`scipy.ndimage.shift`)
use bilinear interpolation (``order=1``) and fill uncovered pixels with 0 (the background);
blur is :func:`scipy.ndimage.gaussian_filter` over the two spatial axes with zero padding;
contrast shrinks each image towards its own mean ``m``. The noise std scales with
``value_range / 16`` so the table also applies to images on other scales. Noise is
**not clipped** to the valid pixel range: clipping would change the noise distribution
pixel by pixel (most digit pixels are 0, where clipping would halve the noise), so the
documented std is exactly the std of the added noise. The other kinds stay within the
input's range by construction.
"""

from __future__ import annotations

import jax
import numpy as np
from scipy import ndimage

from bnn_flat.data.dataset import Dataset, _numpy_rng
from bnn_flat.data.digits import (
    DIGITS_MAX_VALUE,
    _format_images,
    _normalization_from_train,
    _split_digits,
)

__all__ = ["SHIFT_KINDS", "MAX_SEVERITY", "SEVERITY_TABLE", "shift_images", "load_shifted_digits"]

SHIFT_KINDS = ("rotation", "noise", "blur", "translation", "contrast")
"""The supported kinds of shift, in a fixed order (used to derive per-kind seeds)."""

MAX_SEVERITY = 5
"""Severities run from 1 to ``MAX_SEVERITY``; 0 is the identity."""

SEVERITY_TABLE: dict[str, tuple[float, ...]] = {
    "rotation": (15.0, 30.0, 45.0, 60.0, 90.0),
    "noise": (1.0, 2.0, 3.0, 4.5, 6.0),
    "blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "translation": (0.5, 1.0, 1.5, 2.0, 2.5),
    "contrast": (0.7, 0.5, 0.4, 0.3, 0.2),
}
"""Parameter of each kind at severities 1..5 (see the module docstring for units)."""


def shift_images(
    key_or_seed: int | jax.Array,
    images: np.ndarray,
    kind: str,
    severity: int,
    *,
    value_range: float = DIGITS_MAX_VALUE,
) -> np.ndarray:
    """Applies one kind of distribution shift at one severity to a stack of raw images.

    Args:
      key_or_seed: A ``jax.random.key`` or a non-negative integer seed; it drives the
        rotation signs, translation directions and noise. Same seed, same output.
      images: Raw images of shape ``(N, H, W)`` or ``(N, H, W, C)``.
      kind: One of ``SHIFT_KINDS``.
      severity: An integer from 0 (identity) to ``MAX_SEVERITY``.
      value_range: Width of the raw pixel range (16 for the digits, 255 for 8-bit
        images); only the noise std depends on it, as ``table value * value_range / 16``.

    Returns:
      The shifted images, ``float32``, same shape as ``images``.

    Example:
      >>> import numpy as np
      >>> image = np.zeros((1, 8, 8), np.float32)
      >>> image[0, 2, 3] = 16.0
      >>> rotated = shift_images(0, image, "rotation", 5)  # 90 degrees, random sign
      >>> bool(np.allclose(rotated[0], np.rot90(image[0], 1), atol=1e-4)
      ...      or np.allclose(rotated[0], np.rot90(image[0], -1), atol=1e-4))
      True
    """
    images = np.asarray(images)
    if images.ndim not in (3, 4):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C), got {images.shape}.")
    if not np.issubdtype(images.dtype, np.number) or not np.all(np.isfinite(images)):
        raise ValueError("images must be finite numbers.")
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; known kinds: {', '.join(SHIFT_KINDS)}.")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
        raise ValueError(f"severity must be an integer, got {severity!r}.")
    if not 0 <= severity <= MAX_SEVERITY:
        raise ValueError(f"severity must be in 0..{MAX_SEVERITY}, got {severity}.")
    if not value_range > 0:
        raise ValueError(f"value_range must be positive, got {value_range}.")
    rng = _numpy_rng(key_or_seed)
    images = images.astype(np.float32)
    if severity == 0:
        return images.copy()
    parameter = SEVERITY_TABLE[kind][severity - 1]
    num_images = images.shape[0]
    if kind == "rotation":
        signs = rng.choice(np.array([-1.0, 1.0]), size=num_images)
        output = np.empty_like(images)
        for sign in (-1.0, 1.0):
            chosen = signs == sign
            if np.any(chosen):
                output[chosen] = ndimage.rotate(
                    images[chosen],
                    sign * parameter,
                    axes=(1, 2),
                    reshape=False,
                    order=1,
                    mode="constant",
                    cval=0.0,
                )
        return output
    if kind == "noise":
        std = parameter * value_range / DIGITS_MAX_VALUE
        return (images + std * rng.standard_normal(images.shape)).astype(np.float32)
    if kind == "blur":
        sigma = (0.0, parameter, parameter) + (0.0,) * (images.ndim - 3)
        return ndimage.gaussian_filter(images, sigma=sigma, mode="constant", cval=0.0)
    if kind == "translation":
        angles = rng.uniform(0.0, 2.0 * np.pi, size=num_images)
        output = np.empty_like(images)
        for index, angle in enumerate(angles):
            offset = (parameter * np.sin(angle), parameter * np.cos(angle))
            offset += (0.0,) * (images.ndim - 3)
            output[index] = ndimage.shift(images[index], offset, order=1, mode="constant", cval=0.0)
        return output
    # contrast
    means = images.mean(axis=tuple(range(1, images.ndim)), keepdims=True)
    return (means + parameter * (images - means)).astype(np.float32)


def load_shifted_digits(
    *,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    kinds: tuple[str, ...] = ("rotation", "noise", "blur"),
    severities: tuple[int, ...] = (1, 3, 5),
    flatten: bool = False,
) -> dict[str, Dataset]:
    """Shifted copies of the digits test split, standardised like the clean data.

    Each set holds the same images (in the same order) and labels as
    ``load_digits(seed=seed, ...)["test"]``, shifted on the raw 0..16 scale and then
    standardised with :func:`~bnn_flat.data.digits_normalization` of the same split. The
    randomness of set ``"<kind>-<severity>"`` is seeded by ``(seed, kind, severity)``
    only, so a set does not change when other kinds or severities are requested.

    Args:
      seed: Seed of the split (as in :func:`~bnn_flat.data.load_digits`) and of the shifts.
      val_fraction: Validation fraction of the split.
      test_fraction: Test fraction of the split.
      kinds: Kinds of shift, each in ``SHIFT_KINDS``.
      severities: Severities, each in ``0..MAX_SEVERITY``.
      flatten: Return inputs of shape ``(N, 64)`` instead of ``(N, 8, 8, 1)``.

    Returns:
      A dict keyed ``"<kind>-<severity>"`` (e.g. ``"rotation-3"``) of :class:`Dataset`.

    Example:
      >>> shifted = load_shifted_digits(seed=0, kinds=("blur",), severities=(1, 5))
      >>> sorted(shifted), shifted["blur-5"].inputs.shape
      (['blur-1', 'blur-5'], (451, 8, 8, 1))
    """
    for kind in kinds:
        if kind not in SHIFT_KINDS:
            raise ValueError(f"unknown shift kind {kind!r}; known kinds: {', '.join(SHIFT_KINDS)}.")
    for severity in severities:
        if isinstance(severity, bool) or not isinstance(severity, int | np.integer):
            raise ValueError(f"severities must be integers, got {severity!r}.")
        if not 0 <= severity <= MAX_SEVERITY:
            raise ValueError(f"severities must be in 0..{MAX_SEVERITY}, got {severity}.")
    images, labels, indices = _split_digits(seed, val_fraction, test_fraction)
    normalization = _normalization_from_train(images[indices["train"]])
    test_images = images[indices["test"]]
    test_labels = labels[indices["test"]]
    result = {}
    for kind in kinds:
        for severity in severities:
            shift_seed = int(
                np.random.SeedSequence(
                    [int(seed), SHIFT_KINDS.index(kind), int(severity)]
                ).generate_state(1)[0]
            )
            shifted = shift_images(shift_seed, test_images, kind, severity)
            result[f"{kind}-{severity}"] = Dataset(
                inputs=_format_images(normalization.apply(shifted), flatten),
                labels=test_labels.copy(),
            )
    return result
