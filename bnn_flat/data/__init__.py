"""Datasets: embedded digits, distribution shift, offline TFDS, batching, few-shot splits.

* :func:`load_digits`: scikit-learn's 8x8 digits (no network), stratified and standardised.
* :func:`load_shifted_digits` / :func:`shift_images`: rotated, noisy, blurred, translated
  and low-contrast copies of the test split at severities 1..5.
* :func:`load_tfds`: MNIST, CIFAR, SVHN, ... from prepared ArrayRecord files, without
  TensorFlow and without ever downloading (``python -m bnn_flat.data.prepare`` prepares).
* :func:`epoch_batches` / :func:`eval_batches`: on-device batching for ``lax.scan``.
* :func:`few_shot_split` / :func:`select_classes`: few-shot and class-subset tasks.
"""

from bnn_flat.data.batching import epoch_batches, eval_batches, num_batches, unbatch
from bnn_flat.data.dataset import Dataset, check_dataset
from bnn_flat.data.digits import (
    DIGITS_MAX_VALUE,
    NUM_DIGITS,
    Normalization,
    digits_normalization,
    load_digits,
)
from bnn_flat.data.fewshot import few_shot_split, select_classes
from bnn_flat.data.shift import (
    MAX_SEVERITY,
    SEVERITY_TABLE,
    SHIFT_KINDS,
    load_shifted_digits,
    shift_images,
)
from bnn_flat.data.tfds_loader import CHANNEL_STATISTICS, DatasetNotFoundError, load_tfds

__all__ = [
    "Dataset",
    "check_dataset",
    "NUM_DIGITS",
    "DIGITS_MAX_VALUE",
    "Normalization",
    "load_digits",
    "digits_normalization",
    "SHIFT_KINDS",
    "MAX_SEVERITY",
    "SEVERITY_TABLE",
    "shift_images",
    "load_shifted_digits",
    "CHANNEL_STATISTICS",
    "DatasetNotFoundError",
    "load_tfds",
    "num_batches",
    "epoch_batches",
    "eval_batches",
    "unbatch",
    "few_shot_split",
    "select_classes",
]
