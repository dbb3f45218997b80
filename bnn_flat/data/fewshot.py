"""Few-shot subsets and class-subset tasks (e.g. digits 0-4 as source, 5-9 as target).

:func:`select_classes` keeps some classes and, by default, renumbers them ``0..k-1`` in
the order given. :func:`few_shot_split` draws ``K`` training (and optionally ``V``
validation) examples per class at random with a seeded generator. Unlike the SA-BMA code,
which takes the *first* ``K`` indices of each class, the draw is random, so different
seeds give different few-shot tasks.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from bnn_flat.data.dataset import Dataset, _numpy_rng, check_dataset

__all__ = ["few_shot_split", "select_classes"]


def select_classes(dataset: Dataset, classes: Sequence[int], relabel: bool = True) -> Dataset:
    """Keeps the examples of the given classes.

    Args:
      dataset: The dataset to filter.
      classes: Distinct class labels, each present in ``dataset``.
      relabel: Renumber the kept classes so that ``classes[i]`` becomes label ``i``.

    Returns:
      A :class:`Dataset` with the examples of ``classes`` in their original order.

    Example:
      >>> import numpy as np
      >>> data = Dataset(np.arange(6.0)[:, None], np.array([0, 5, 6, 5, 9, 6], np.int32))
      >>> select_classes(data, [5, 6]).labels.tolist()
      [0, 1, 0, 1]
    """
    check_dataset(dataset, "dataset")
    classes = _check_classes(classes, dataset.labels)
    keep = np.isin(dataset.labels, classes)
    labels = np.asarray(dataset.labels)[keep]
    if relabel:
        lookup = {int(label): new for new, label in enumerate(classes)}
        labels = np.array([lookup[int(label)] for label in labels], np.int32)
    return Dataset(inputs=np.asarray(dataset.inputs)[keep], labels=labels.astype(np.int32))


def few_shot_split(
    key_or_seed: int | jax.Array,
    dataset: Dataset,
    shots_per_class: int,
    *,
    classes: Sequence[int] | None = None,
    num_val_per_class: int = 0,
) -> tuple[Dataset, Dataset]:
    """Draws ``shots_per_class`` training and ``num_val_per_class`` validation examples per class.

    For each class (in increasing label order) the class's examples are permuted with a
    generator seeded by ``key_or_seed``; the first ``shots_per_class`` go to train and the
    next ``num_val_per_class`` to val, so the two sets are disjoint. Labels are unchanged
    (use :func:`select_classes` first to renumber). Both outputs keep the original order.

    Args:
      key_or_seed: A ``jax.random.key`` or a non-negative integer seed.
      dataset: The pool to draw from.
      shots_per_class: Training examples per class (positive).
      classes: Classes to draw from; defaults to every label present in ``dataset``.
      num_val_per_class: Validation examples per class (non-negative).

    Returns:
      ``(train, val)``; ``val`` is empty (zero rows) when ``num_val_per_class`` is 0.

    Raises:
      ValueError: if a class has fewer than ``shots_per_class + num_val_per_class``
        examples, or on invalid arguments.

    Example:
      >>> import numpy as np
      >>> data = Dataset(np.arange(8.0)[:, None], np.array([0, 1] * 4, np.int32))
      >>> train, val = few_shot_split(0, data, 2, num_val_per_class=1)
      >>> np.bincount(train.labels).tolist(), np.bincount(val.labels).tolist()
      ([2, 2], [1, 1])
    """
    check_dataset(dataset, "dataset")
    for name, value, minimum in (
        ("shots_per_class", shots_per_class, 1),
        ("num_val_per_class", num_val_per_class, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    labels = np.asarray(dataset.labels)
    if classes is None:
        classes = np.unique(labels).tolist()
    classes = sorted(_check_classes(classes, labels))
    rng = _numpy_rng(key_or_seed)
    needed = shots_per_class + num_val_per_class
    train_parts, val_parts = [], []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if members.size < needed:
            raise ValueError(
                f"class {label} has {members.size} examples but {shots_per_class} train + "
                f"{num_val_per_class} val = {needed} were requested."
            )
        members = rng.permutation(members)
        train_parts.append(members[:shots_per_class])
        val_parts.append(members[shots_per_class:needed])
    train_indices = np.sort(np.concatenate(train_parts))
    val_indices = np.sort(np.concatenate(val_parts))
    inputs = np.asarray(dataset.inputs)
    return (
        Dataset(inputs=inputs[train_indices], labels=labels[train_indices].astype(np.int32)),
        Dataset(inputs=inputs[val_indices], labels=labels[val_indices].astype(np.int32)),
    )


def _check_classes(classes: Sequence[int], labels: np.ndarray) -> list[int]:
    if any(isinstance(label, bool) or int(label) != label for label in classes):
        raise ValueError(f"classes must be integer labels, got {list(classes)}.")
    classes = [int(label) for label in classes]
    if not classes:
        raise ValueError("classes must not be empty.")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {classes}.")
    missing = sorted(set(classes) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"classes {missing} have no examples in the dataset.")
    return classes
