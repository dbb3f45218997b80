"""Offline loading of prepared TensorFlow Datasets (MNIST, CIFAR, SVHN, ...) into memory.

:func:`load_tfds` reads through :func:`tfds.data_source`, the random-access reader of
ArrayRecord files, which works **without TensorFlow**. It never downloads: it first asks
``tfds.builder(name, data_dir=...).is_prepared()`` (a local file check that takes
milliseconds) and raises :class:`DatasetNotFoundError` if the data is missing, then reads
with ``download=False``. (Calling ``tfds.data_source`` or ``tfds.load`` on a missing dataset
instead starts a download, which on a machine without network retries for minutes.)

Preparing data needs a machine with network access::

    python -m bnn_flat.data.prepare mnist cifar10 --data_dir /path/to/tensorflow_datasets

then copy that directory to the offline machine and pass ``data_dir=`` or set the
``TFDS_DATA_DIR`` environment variable. Data prepared by ``tfds.load`` in the default
TFRecord format cannot be read this way; prepare it again with :mod:`bnn_flat.data.prepare`
(which writes ArrayRecord files).

Preprocessing: images become ``float32`` in ``[0, 1]`` (integer images are divided by their
dtype's maximum, e.g. 255) and, for the datasets in ``CHANNEL_STATISTICS``, are then
standardised per channel, ``(x - mean_c) / std_c``, with the commonly used statistics of
each dataset's training split on the ``[0, 1]`` scale. Other datasets are only scaled.
"""

from __future__ import annotations

import os

import numpy as np

from bnn_flat.data.dataset import Dataset

__all__ = ["DatasetNotFoundError", "CHANNEL_STATISTICS", "load_tfds"]

CHANNEL_STATISTICS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
}
"""Per-channel ``(mean, std)`` of the training split on the ``[0, 1]`` scale, by base name.

These are the values in common use (the CIFAR-10 std is the population std of the pixels,
not the frequently copied ``(0.2023, 0.1994, 0.2010)``)."""


class DatasetNotFoundError(FileNotFoundError):
    """A TFDS dataset is not prepared (in ArrayRecord format) in the data directory."""


def load_tfds(
    name: str,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    as_supervised_keys: tuple[str, str] = ("image", "label"),
    max_examples: int | None = None,
    standardize: bool = True,
) -> Dataset:
    """Loads one split of a prepared TFDS dataset into memory, without network access.

    Args:
      name: The TFDS name, optionally with config and version (``"mnist"``,
        ``"cifar10:3.0.2"``, ``"svhn_cropped"``).
      split: A TFDS split string (``"train"``, ``"test"``, ``"train[:10%]"``, ...).
      data_dir: The TFDS data directory; ``None`` uses ``TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``.
      as_supervised_keys: The feature names of the input and of the label.
      max_examples: Read only the first ``max_examples`` examples of the split.
      standardize: Standardise per channel with ``CHANNEL_STATISTICS`` when the dataset is
        listed there; otherwise (or if false) inputs are only scaled to ``[0, 1]``.

    Returns:
      A :class:`Dataset` with ``float32`` inputs of shape ``(N, H, W, C)`` and ``int32``
      labels.

    Raises:
      DatasetNotFoundError: if the dataset is not prepared in ArrayRecord format under
        ``data_dir`` (raised after a local file check, without network access).
      ValueError: for an unknown dataset name, an unknown split or feature key, or a
        non-positive ``max_examples``.

    Example:
      >>> train = load_tfds("mnist", split="train", data_dir="/data/tfds")  # doctest: +SKIP
      >>> train.inputs.shape, train.inputs.dtype  # doctest: +SKIP
      ((60000, 28, 28, 1), dtype('float32'))
    """
    import tensorflow_datasets as tfds

    if max_examples is not None and (
        isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1
    ):
        raise ValueError(f"max_examples must be a positive integer or None, got {max_examples!r}.")
    input_key, label_key = as_supervised_keys
    builder = _prepared_builder(name, data_dir)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError as error:
        raise DatasetNotFoundError(
            f"{name} is prepared in {builder.data_dir} but not in the ArrayRecord format that "
            f"random access needs ({error}). {_how_to_prepare(name)}"
        ) from error
    except KeyError as error:
        splits = ", ".join(sorted(builder.info.splits)) or "none recorded"
        raise ValueError(f"{name} has no split {split!r}; available splits: {splits}.") from error
    count = len(source) if max_examples is None else min(len(source), max_examples)
    if count == 0:
        raise ValueError(f"split {split!r} of {name} has no examples.")
    first = source[0]
    for key in (input_key, label_key):
        if key not in first:
            raise ValueError(
                f"{name} has no feature {key!r}; features: {', '.join(sorted(first))}."
            )
    first_input = np.asarray(first[input_key])
    raw_inputs = np.empty((count, *first_input.shape), first_input.dtype)
    labels = np.empty((count,), np.int64)
    for index in range(count):
        example = first if index == 0 else source[index]
        value = np.asarray(example[input_key])
        if value.shape != first_input.shape:
            raise ValueError(
                f"{name}: example {index} has input shape {value.shape}, expected "
                f"{first_input.shape}; only fixed-shape inputs can be stacked."
            )
        raw_inputs[index] = value
        labels[index] = example[label_key]
    inputs = _scale_to_unit(raw_inputs)
    statistics = CHANNEL_STATISTICS.get(_base_name(name))
    if standardize and statistics is not None:
        inputs = _standardize(inputs, statistics, name)
    return Dataset(inputs=inputs, labels=labels.astype(np.int32))


def _prepared_builder(name: str, data_dir: str | os.PathLike | None):
    """``tfds.builder(name)`` if its data is prepared, else ``DatasetNotFoundError``."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"tensorflow_datasets knows no dataset named {name!r} and none is prepared in "
            f"{data_dir or 'the default data directory'}."
        ) from error
    if not builder.is_prepared():
        raise DatasetNotFoundError(
            f"{name} is not prepared in {builder.data_dir} (looked for dataset_info.json). "
            "bnn_flat never downloads data implicitly. " + _how_to_prepare(name)
        )
    return builder


def _how_to_prepare(name: str) -> str:
    return (
        "On a machine with network access run\n"
        f"    python -m bnn_flat.data.prepare {name} --data_dir DIR\n"
        "(it calls tfds.builder(name, file_format='array_record').download_and_prepare()), "
        "then copy DIR here and pass data_dir=DIR or set the TFDS_DATA_DIR environment "
        "variable."
    )


def _base_name(name: str) -> str:
    return name.split("/")[0].split(":")[0]


def _scale_to_unit(raw: np.ndarray) -> np.ndarray:
    if np.issubdtype(raw.dtype, np.integer):
        return (raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)).astype(np.float32)
    return raw.astype(np.float32)


def _standardize(
    inputs: np.ndarray, statistics: tuple[tuple[float, ...], tuple[float, ...]], name: str
) -> np.ndarray:
    mean = np.asarray(statistics[0], np.float32)
    std = np.asarray(statistics[1], np.float32)
    if inputs.ndim < 2 or inputs.shape[-1] != mean.shape[0]:
        raise ValueError(
            f"{name}: expected {mean.shape[0]} channels in the last axis, got inputs of shape "
            f"{inputs.shape}."
        )
    return ((inputs - mean) / std).astype(np.float32)
