"""Tests of bnn_flat.data: digits splits, shifts, offline TFDS loading, batching, few-shot."""

import importlib.util
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.datasets import load_digits as sklearn_load_digits

from bnn_flat import data
from bnn_flat.data import Dataset
from bnn_flat.data.prepare import main as prepare_main
from bnn_flat.data.prepare import prepare_dataset

# --------------------------------------------------------------------------------------
# Dataset validation


def test_check_dataset_accepts_valid_and_rejects_each_defect():
    inputs = np.zeros((3, 2), np.float32)
    data.check_dataset(Dataset(inputs, np.array([0, 1, 2], np.int32)), "ok")
    bad_inputs = inputs.copy()
    bad_inputs[1, 0] = np.nan
    cases = [
        (Dataset(np.zeros((0, 2), np.float32), np.zeros((0,), np.int32)), "empty"),
        (Dataset(inputs, np.array([0, 1], np.int32)), "3 inputs but 2 labels"),
        (Dataset(bad_inputs, np.array([0, 1, 2], np.int32)), "1 NaN or infinite"),
        (Dataset(inputs, np.array([0.0, 1.5, 2.0])), "integer dtype"),
        (Dataset(inputs, np.array([0, -1, 2], np.int32)), "non-negative, got minimum -1"),
        (Dataset(inputs, np.zeros((3, 1), np.int32)), r"labels must have shape \(N,\)"),
        (Dataset(np.zeros((3,), np.float32), np.zeros(3, np.int32)), "inputs must have shape"),
    ]
    for dataset, message in cases:
        with pytest.raises(ValueError, match="^toy: .*" + message):
            data.check_dataset(dataset, "toy")


def test_check_dataset_rejects_infinity():
    inputs = np.zeros((2, 2), np.float32)
    inputs[0, 1] = np.inf
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        data.check_dataset(Dataset(inputs, np.array([0, 1], np.int32)), "x")


# --------------------------------------------------------------------------------------
# Digits


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.fixture(scope="module")
def raw_digits():
    return data.load_digits(seed=0, standardize=False)


def _sorted_rows(array):
    flat = np.asarray(array).reshape(array.shape[0], -1)
    return flat[np.lexsort(flat.T[::-1])]


def test_digits_split_sizes_partition_and_dtypes(digits, raw_digits):
    sizes = {name: split.labels.shape[0] for name, split in digits.items()}
    # Per class: test = round(0.25 n_c), val = round(0.15 n_c), summed over the 10 classes.
    assert sizes == {"train": 1077, "val": 269, "test": 451}
    assert sum(sizes.values()) == data.NUM_DIGITS == 1797
    for name, split in digits.items():
        data.check_dataset(split, name)
        assert split.inputs.shape == (sizes[name], 8, 8, 1)
        assert split.inputs.dtype == np.float32 and split.labels.dtype == np.int32
    # The three raw splits together are exactly scikit-learn's images (a partition).
    bunch = sklearn_load_digits()
    union = np.concatenate([raw_digits[name].inputs[..., 0] for name in ("train", "val", "test")])
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(bunch.images))
    all_labels = np.concatenate([raw_digits[name].labels for name in ("train", "val", "test")])
    np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(bunch.target))


def test_digits_split_is_stratified(digits):
    overall = np.bincount(sklearn_load_digits().target) / 1797
    for split in digits.values():
        proportions = np.bincount(split.labels, minlength=10) / split.labels.shape[0]
        assert np.max(np.abs(proportions - overall)) < 0.005


def test_digits_standardization_uses_train_constants(digits, raw_digits):
    train = digits["train"].inputs
    assert abs(float(train.mean())) < 1e-5
    assert float(train.std()) == pytest.approx(1.0, rel=1e-5)
    raw_train = raw_digits["train"].inputs.astype(np.float64)
    normalization = data.digits_normalization(seed=0)
    assert normalization.mean == pytest.approx(raw_train.mean(), rel=1e-12)
    assert normalization.std == pytest.approx(raw_train.std(), rel=1e-12)
    assert 4.0 < normalization.mean < 6.0 and 5.0 < normalization.std < 7.0
    for name in ("val", "test"):
        expected = (raw_digits[name].inputs - normalization.mean) / normalization.std
        np.testing.assert_allclose(digits[name].inputs, expected, rtol=1e-5, atol=1e-6)
    # Raw values are the 0..16 integers of the original data.
    assert raw_digits["test"].inputs.min() == 0.0 and raw_digits["test"].inputs.max() == 16.0


def test_digits_determinism_and_flatten(digits):
    again = data.load_digits(seed=0)
    other = data.load_digits(seed=1)
    for name in digits:
        np.testing.assert_array_equal(again[name].inputs, digits[name].inputs)
        np.testing.assert_array_equal(again[name].labels, digits[name].labels)
    assert other["test"].labels.shape == (451,)
    assert not np.array_equal(other["test"].inputs, digits["test"].inputs)
    assert data.digits_normalization(seed=1) != data.digits_normalization(seed=0)
    flat = data.load_digits(seed=0, flatten=True)
    np.testing.assert_array_equal(flat["val"].inputs, digits["val"].inputs.reshape(269, 64))


def test_digits_custom_fractions_and_errors():
    splits = data.load_digits(seed=3, val_fraction=0.0, test_fraction=0.5)
    assert splits["val"].labels.shape == (0,)
    assert splits["train"].labels.shape[0] + splits["test"].labels.shape[0] == 1797
    for kwargs, message in [
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "sum to less than 1|< 1"),
        ({"seed": -1}, "seed"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.load_digits(**kwargs)


# --------------------------------------------------------------------------------------
# Distribution shift


def _total_variation(images):
    """Anisotropic total variation of each image of an (N, H, W) stack."""
    vertical = np.abs(np.diff(images, axis=1)).sum(axis=(1, 2))
    horizontal = np.abs(np.diff(images, axis=2)).sum(axis=(1, 2))
    return vertical + horizontal


@pytest.fixture(scope="module")
def raw_test_images(raw_digits):
    return raw_digits["test"].inputs[..., 0]


def test_severity_zero_is_identity_for_every_kind(raw_test_images):
    for kind in data.SHIFT_KINDS:
        np.testing.assert_array_equal(
            data.shift_images(0, raw_test_images, kind, 0), raw_test_images
        )


def test_rotation_by_90_degrees_is_an_exact_quarter_turn(raw_test_images):
    rotated = data.shift_images(5, raw_test_images, "rotation", 5)
    directions = []
    for original, image in zip(raw_test_images, rotated, strict=True):
        if np.allclose(image, np.rot90(original, 1), atol=1e-4):
            directions.append(1)
        elif np.allclose(image, np.rot90(original, -1), atol=1e-4):
            directions.append(-1)
        else:
            raise AssertionError("a 90-degree rotation is not a quarter turn")
    # Random signs: both directions occur, roughly half each.
    assert 0.4 < np.mean(np.array(directions) == 1) < 0.6
    # A 4-D (N, H, W, C) stack gives the same result with the same seed.
    rotated_4d = data.shift_images(5, raw_test_images[..., None], "rotation", 5)
    np.testing.assert_allclose(rotated_4d[..., 0], rotated, atol=1e-6)


def test_rotation_preserves_the_pixel_range_and_grows_with_severity(raw_test_images):
    distances = []
    for severity in range(1, 6):
        rotated = data.shift_images(0, raw_test_images, "rotation", severity)
        assert rotated.min() >= 0.0 and rotated.max() <= 16.0 + 1e-4
        distances.append(np.abs(rotated - raw_test_images).mean())
    assert np.all(np.diff(distances) > 0)


def test_noise_std_matches_the_table(raw_test_images):
    count = raw_test_images.size  # 451 * 64 = 28,864 noise values
    for severity in range(1, 6):
        noisy = data.shift_images(severity, raw_test_images, "noise", severity)
        residual = (noisy - raw_test_images).astype(np.float64)
        expected = data.SEVERITY_TABLE["noise"][severity - 1]
        # The sample std has a standard error of about std / sqrt(2 count) = 0.42 %.
        assert residual.std() == pytest.approx(expected, rel=4 / np.sqrt(2 * count))
        assert abs(residual.mean()) < 4 * expected / np.sqrt(count)
    scaled = data.shift_images(1, raw_test_images, "noise", 2, value_range=255.0)
    assert np.std(scaled - raw_test_images) == pytest.approx(2.0 * 255 / 16, rel=0.02)


def test_blur_reduces_total_variation_monotonically(raw_test_images):
    variations = [
        _total_variation(data.shift_images(0, raw_test_images, "blur", severity)).mean()
        for severity in range(6)
    ]
    assert np.all(np.diff(variations) < 0)
    # Blur is deterministic: the seed does not matter.
    np.testing.assert_array_equal(
        data.shift_images(0, raw_test_images, "blur", 3),
        data.shift_images(9, raw_test_images, "blur", 3),
    )


def test_contrast_scales_the_deviation_from_the_image_mean(raw_test_images):
    for severity in (1, 5):
        factor = data.SEVERITY_TABLE["contrast"][severity - 1]
        shifted = data.shift_images(0, raw_test_images, "contrast", severity)
        np.testing.assert_allclose(
            shifted.mean(axis=(1, 2)), raw_test_images.mean(axis=(1, 2)), rtol=1e-5
        )
        np.testing.assert_allclose(
            shifted.std(axis=(1, 2)), factor * raw_test_images.std(axis=(1, 2)), rtol=1e-4
        )


def test_translation_moves_the_centre_of_mass_by_the_table_distance():
    image = np.zeros((3, 12, 12), np.float32)
    image[:, 5, 6] = 16.0
    rows, cols = np.mgrid[:12, :12]
    for severity in (2, 5):
        shifted = data.shift_images(7, image, "translation", severity)
        np.testing.assert_allclose(shifted.sum(axis=(1, 2)), 16.0, rtol=1e-5)
        centre_row = (shifted * rows).sum(axis=(1, 2)) / 16.0
        centre_col = (shifted * cols).sum(axis=(1, 2)) / 16.0
        distance = np.hypot(centre_row - 5.0, centre_col - 6.0)
        np.testing.assert_allclose(
            distance, data.SEVERITY_TABLE["translation"][severity - 1], rtol=1e-5
        )


def test_shift_images_seeding_and_errors(raw_test_images):
    first = data.shift_images(3, raw_test_images, "noise", 1)
    np.testing.assert_array_equal(first, data.shift_images(3, raw_test_images, "noise", 1))
    assert not np.array_equal(first, data.shift_images(4, raw_test_images, "noise", 1))
    key = jax.random.key(3)
    np.testing.assert_array_equal(
        data.shift_images(key, raw_test_images, "noise", 1),
        data.shift_images(key, raw_test_images, "noise", 1),
    )
    for args, message in [
        (("fog", 1), "unknown shift kind 'fog'"),
        (("noise", 6), "severity must be in 0..5"),
        (("noise", -1), "severity must be in 0..5"),
        (("noise", 1.5), "severity must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.shift_images(0, raw_test_images, *args)
    with pytest.raises(ValueError, match="shape"):
        data.shift_images(0, raw_test_images[0], "noise", 1)
    with pytest.raises(ValueError, match="seed"):
        data.shift_images(-2, raw_test_images, "noise", 1)


def test_shifted_digits_use_the_test_split_and_train_normalization(digits):
    shifted = data.load_shifted_digits(
        seed=0, kinds=("rotation", "noise", "blur"), severities=(0, 1, 3, 5)
    )
    assert sorted(shifted) == sorted(
        f"{kind}-{severity}" for kind in ("rotation", "noise", "blur") for severity in (0, 1, 3, 5)
    )
    test = digits["test"]
    for name, dataset in shifted.items():
        data.check_dataset(dataset, name)
        np.testing.assert_array_equal(dataset.labels, test.labels)
        assert dataset.inputs.shape == test.inputs.shape and dataset.inputs.dtype == np.float32
    # Severity 0 gives back the clean, standardised test inputs exactly.
    for kind in ("rotation", "noise", "blur"):
        np.testing.assert_allclose(shifted[f"{kind}-0"].inputs, test.inputs, atol=1e-6)
    # Noise in raw units = standardised difference * train std; its std is the table value.
    std = data.digits_normalization(seed=0).std
    residual = (shifted["noise-3"].inputs - test.inputs) * std
    assert residual.std() == pytest.approx(3.0, rel=0.03)
    # Blur on the same images: total variation decreases with severity.
    variations = [
        _total_variation(shifted[f"blur-{s}"].inputs[..., 0]).mean() for s in (0, 1, 3, 5)
    ]
    assert np.all(np.diff(variations) < 0)


def test_shifted_digits_are_deterministic_and_independent_of_other_requests():
    full = data.load_shifted_digits(seed=0, kinds=("rotation", "noise"), severities=(1, 3))
    alone = data.load_shifted_digits(seed=0, kinds=("noise",), severities=(3,))
    np.testing.assert_array_equal(alone["noise-3"].inputs, full["noise-3"].inputs)
    again = data.load_shifted_digits(seed=0, kinds=("rotation", "noise"), severities=(1, 3))
    for name in full:
        np.testing.assert_array_equal(again[name].inputs, full[name].inputs)
    other = data.load_shifted_digits(seed=1, kinds=("noise",), severities=(3,))
    assert not np.array_equal(other["noise-3"].inputs, full["noise-3"].inputs)
    flat = data.load_shifted_digits(seed=0, kinds=("noise",), severities=(3,), flatten=True)
    np.testing.assert_array_equal(flat["noise-3"].inputs, full["noise-3"].inputs.reshape(451, 64))
    with pytest.raises(ValueError, match="unknown shift kind 'snow'"):
        data.load_shifted_digits(kinds=("snow",))
    with pytest.raises(ValueError, match="severities must be in 0..5"):
        data.load_shifted_digits(severities=(7,))


# --------------------------------------------------------------------------------------
# TFDS: a real (generated) ArrayRecord dataset, mock_data for the named datasets, errors


class BnnFlatTestImages(tfds.core.GeneratorBasedBuilder):
    """A 14-example image dataset generated locally (registered as bnn_flat_test_images)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 5, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(10), "test": self._generate_examples(4)}

    def _generate_examples(self, count):
        for index in range(count):
            image = np.full((4, 5, 1), 20 * index + 5, np.uint8)
            image[0, 0, 0] = 255  # every image spans 5..255, i.e. [5/255, 1] after scaling
            yield index, {"image": image, "label": index % 3}


_TEST_DATASET = "bnn_flat_test_images"


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    path = prepare_dataset(_TEST_DATASET, data_dir=str(data_dir))
    assert path.endswith("bnn_flat_test_images/1.0.0")
    return data_dir


def test_load_tfds_reads_a_prepared_array_record_dataset(prepared_dir):
    train = data.load_tfds(_TEST_DATASET, split="train", data_dir=prepared_dir)
    data.check_dataset(train, "train")
    assert train.inputs.shape == (10, 4, 5, 1)
    assert train.inputs.dtype == np.float32 and train.labels.dtype == np.int32
    # Example i has value 20 i + 5 (scaled by 1/255) and label i mod 3; TFDS shuffles on
    # writing, so recover i from the value and check every example once.
    indices = np.rint((train.inputs[:, 1, 1, 0] * 255 - 5) / 20).astype(int)
    assert sorted(indices.tolist()) == list(range(10))
    np.testing.assert_array_equal(train.labels, indices % 3)
    np.testing.assert_allclose(train.inputs[:, 2, 3, 0], (20 * indices + 5) / 255, rtol=1e-6)
    assert train.inputs.max() == 1.0  # the 255 pixel; not standardised (unknown dataset)
    test = data.load_tfds(_TEST_DATASET, split="test", data_dir=str(prepared_dir))
    assert test.labels.shape == (4,)
    first = data.load_tfds(_TEST_DATASET, data_dir=prepared_dir, max_examples=3)
    np.testing.assert_array_equal(first.inputs, train.inputs[:3])
    sliced = data.load_tfds(_TEST_DATASET, split="train[:50%]", data_dir=prepared_dir)
    assert sliced.labels.shape == (5,)


def test_load_tfds_standardizes_with_channel_statistics(prepared_dir, monkeypatch):
    scaled = data.load_tfds(_TEST_DATASET, data_dir=prepared_dir)
    monkeypatch.setitem(data.CHANNEL_STATISTICS, _TEST_DATASET, ((0.5,), (0.25,)))
    standardized = data.load_tfds(_TEST_DATASET, data_dir=prepared_dir)
    np.testing.assert_allclose(standardized.inputs, (scaled.inputs - 0.5) / 0.25, atol=1e-6)
    unstandardized = data.load_tfds(_TEST_DATASET, data_dir=prepared_dir, standardize=False)
    np.testing.assert_array_equal(unstandardized.inputs, scaled.inputs)


def test_load_tfds_bad_arguments(prepared_dir):
    with pytest.raises(ValueError, match="split 'validation'"):
        data.load_tfds(_TEST_DATASET, split="validation", data_dir=prepared_dir)
    with pytest.raises(ValueError, match="no feature 'pixels'"):
        data.load_tfds(_TEST_DATASET, data_dir=prepared_dir, as_supervised_keys=("pixels", "label"))
    with pytest.raises(ValueError, match="max_examples"):
        data.load_tfds(_TEST_DATASET, data_dir=prepared_dir, max_examples=0)
    with pytest.raises(ValueError, match="no dataset named 'no_such_dataset_xyz'"):
        data.load_tfds("no_such_dataset_xyz", data_dir=prepared_dir)


def test_prepare_command_line_reuses_prepared_data(prepared_dir, capsys):
    assert prepare_main([_TEST_DATASET, "--data_dir", str(prepared_dir)]) == 0
    assert "prepared bnn_flat_test_images in" in capsys.readouterr().out


def test_load_tfds_fails_fast_without_prepared_data(tmp_path):
    start = time.monotonic()
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.load_tfds("mnist", split="train", data_dir=tmp_path)
    elapsed = time.monotonic() - start
    assert elapsed < 10.0  # a guard against download-retry loops, not a benchmark
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert "python -m bnn_flat.data.prepare mnist --data_dir DIR" in message
    assert "TFDS_DATA_DIR" in message and str(tmp_path) in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


@pytest.mark.parametrize(
    ("name", "shape", "num_classes"),
    [
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("cifar10", (32, 32, 3), 10),
        ("cifar100", (32, 32, 3), 100),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_load_tfds_with_mock_data(name, shape, num_classes):
    # mock_data(policy=USE_CODE) serves random examples through tfds.data_source without
    # TensorFlow, but points builders at a non-existent directory, so is_prepared() is
    # false there; it is patched to true to exercise the reading path.
    with (
        tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True),
    ):
        loaded = data.load_tfds(name, split="test")
        few = data.load_tfds(name, split="test", max_examples=5)
    data.check_dataset(loaded, name)
    assert loaded.inputs.shape == (12, *shape)
    assert loaded.inputs.dtype == np.float32 and loaded.labels.dtype == np.int32
    assert loaded.labels.min() >= 0 and loaded.labels.max() < num_classes
    mean, std = (np.asarray(v, np.float32) for v in data.CHANNEL_STATISTICS[name])
    unit = loaded.inputs * std + mean  # undo the standardisation: back to [0, 1]
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    assert unit.max() - unit.min() > 0.9  # random uint8 pixels cover most of the range
    np.testing.assert_allclose(np.round(unit * 255), unit * 255, atol=1e-3)  # k / 255 values
    np.testing.assert_array_equal(few.inputs, loaded.inputs[:5])
    if importlib.util.find_spec("tensorflow") is None:
        assert "tensorflow" not in sys.modules


# --------------------------------------------------------------------------------------
# Batching


def test_num_batches_and_errors():
    assert data.num_batches(10, 3) == 3
    assert data.num_batches(10, 3, drop_remainder=False) == 4
    assert data.num_batches(9, 3, drop_remainder=False) == 3
    assert data.num_batches(7, 7) == 1
    for batch_size, message in [(0, "positive"), (-2, "positive"), (11, "exceeds"), (2.0, "int")]:
        with pytest.raises(ValueError, match=message):
            data.num_batches(10, batch_size)


def test_epoch_batches_are_a_shuffled_subset_without_duplicates():
    n, batch_size = 23, 5
    inputs = jnp.arange(n, dtype=jnp.float32)[:, None] * 10.0
    labels = jnp.arange(n, dtype=jnp.int32)
    batches = data.epoch_batches(jax.random.key(0), inputs, labels, batch_size)
    assert batches["inputs"].shape == (4, 5, 1) and batches["labels"].shape == (4, 5)
    seen = np.asarray(batches["labels"]).ravel()
    assert len(set(seen.tolist())) == 20 and set(seen.tolist()) <= set(range(n))
    np.testing.assert_array_equal(np.asarray(batches["inputs"])[..., 0], 10.0 * seen.reshape(4, 5))
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    again = data.epoch_batches(jax.random.key(0), inputs, labels, batch_size)
    np.testing.assert_array_equal(again["labels"], batches["labels"])
    other = data.epoch_batches(jax.random.key(1), inputs, labels, batch_size)
    assert not np.array_equal(other["labels"], batches["labels"])
    # Over many epochs every example is skipped at some point (a different 3 each epoch).
    skipped = set()
    for epoch in range(50):
        epoch_labels = data.epoch_batches(jax.random.key(epoch), inputs, labels, batch_size)
        skipped |= set(range(n)) - set(np.asarray(epoch_labels["labels"]).ravel().tolist())
    assert skipped == set(range(n))


def test_epoch_batches_under_jit_and_scan_match_eager():
    inputs = jnp.arange(30, dtype=jnp.float32).reshape(10, 3)
    labels = jnp.arange(10, dtype=jnp.int32) % 4
    key = jax.random.key(42)
    eager = data.epoch_batches(key, inputs, labels, 4)
    jitted = jax.jit(data.epoch_batches, static_argnums=3)(key, inputs, labels, 4)
    for name in ("inputs", "labels"):
        np.testing.assert_array_equal(jitted[name], eager[name])

    @jax.jit
    def epoch_sum(key, inputs, labels):
        batches = data.epoch_batches(key, inputs, labels, 4)

        def step(total, batch):
            return total + batch["inputs"].sum(), batch["labels"].sum()

        return jax.lax.scan(step, 0.0, batches)

    total, label_sums = epoch_sum(key, inputs, labels)
    assert float(total) == pytest.approx(float(eager["inputs"].sum()), rel=1e-6)
    np.testing.assert_array_equal(label_sums, eager["labels"].sum(axis=1))


def test_epoch_batches_without_dropping_masks_the_padding():
    n = 10
    labels = jnp.arange(n, dtype=jnp.int32)
    batches = data.epoch_batches(
        jax.random.key(3), labels[:, None].astype(jnp.float32), labels, 4, drop_remainder=False
    )
    assert batches["labels"].shape == (3, 4) and batches["mask"].dtype == jnp.bool_
    mask = np.asarray(batches["mask"])
    assert mask.sum() == n and mask.ravel()[:n].all()
    real = np.asarray(batches["labels"])[mask]
    assert sorted(real.tolist()) == list(range(n))
    padding = np.asarray(batches["labels"]).ravel()[n:]
    np.testing.assert_array_equal(padding, np.asarray(batches["labels"]).ravel()[:2])


def test_eval_batches_cover_every_example_once_and_unbatch_inverts():
    n = 11
    inputs = jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)
    labels = jnp.arange(n, dtype=jnp.int32)
    batches = jax.jit(data.eval_batches, static_argnums=2)(inputs, labels, 4)
    assert batches["inputs"].shape == (3, 4, 2)
    mask = np.asarray(batches["mask"])
    np.testing.assert_array_equal(np.asarray(batches["labels"])[mask], np.arange(n))
    assert mask.sum() == n
    np.testing.assert_array_equal(data.unbatch(batches["inputs"], n), inputs)
    np.testing.assert_array_equal(data.unbatch(batches["labels"], n), labels)
    full = data.eval_batches(inputs, labels, 11)
    assert full["mask"].shape == (1, 11) and bool(full["mask"].all())


def test_batching_errors():
    inputs, labels = jnp.zeros((5, 2)), jnp.zeros((5,), jnp.int32)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="exceeds the number of examples 5"):
        data.epoch_batches(key, inputs, labels, 6)
    with pytest.raises(ValueError, match="positive"):
        data.epoch_batches(key, inputs, labels, 0)
    with pytest.raises(ValueError, match="labels have 4"):
        data.epoch_batches(key, inputs, labels[:4], 2)
    with pytest.raises(ValueError, match="positive"):
        data.eval_batches(inputs, labels, -1)
    with pytest.raises(ValueError, match="num_examples"):
        data.unbatch(jnp.zeros((2, 3)), 7)


# --------------------------------------------------------------------------------------
# Few-shot


def test_few_shot_split_exact_counts_disjoint_and_reproducible(digits):
    train = digits["train"]
    shots, val_shots = 5, 3
    few, val = data.few_shot_split(0, train, shots, num_val_per_class=val_shots)
    np.testing.assert_array_equal(np.bincount(few.labels), np.full(10, shots))
    np.testing.assert_array_equal(np.bincount(val.labels), np.full(10, val_shots))
    # Every selected image is a training image with its label; train and val are disjoint.
    rows = {row.tobytes(): label for row, label in zip(train.inputs, train.labels, strict=True)}
    few_rows = [row.tobytes() for row in few.inputs]
    val_rows = [row.tobytes() for row in val.inputs]
    assert all(rows[row] == label for row, label in zip(few_rows, few.labels, strict=True))
    assert not set(few_rows) & set(val_rows)
    again, again_val = data.few_shot_split(0, train, shots, num_val_per_class=val_shots)
    np.testing.assert_array_equal(again.inputs, few.inputs)
    np.testing.assert_array_equal(again_val.inputs, val.inputs)
    other, _ = data.few_shot_split(1, train, shots)
    assert not np.array_equal(other.inputs, few.inputs)
    keyed, _ = data.few_shot_split(jax.random.key(0), train, shots)
    np.testing.assert_array_equal(np.bincount(keyed.labels), np.full(10, shots))
    empty_val = data.few_shot_split(0, train, shots)[1]
    assert empty_val.inputs.shape == (0, 8, 8, 1) and empty_val.labels.shape == (0,)


def test_few_shot_split_on_selected_classes_and_errors():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2], np.int32)
    dataset = Dataset(np.arange(9, dtype=np.float32)[:, None], labels)
    few, _ = data.few_shot_split(4, dataset, 2, classes=[2, 0])
    np.testing.assert_array_equal(few.labels, [0, 0, 2, 2])
    assert set(few.inputs[:, 0].tolist()) <= {0.0, 1.0, 2.0, 5.0, 6.0, 7.0, 8.0}
    with pytest.raises(ValueError, match="class 1 has 2 examples but 2 train \\+ 1 val = 3"):
        data.few_shot_split(0, dataset, 2, num_val_per_class=1)
    with pytest.raises(ValueError, match="shots_per_class"):
        data.few_shot_split(0, dataset, 0)
    with pytest.raises(ValueError, match="classes \\[7\\] have no examples"):
        data.few_shot_split(0, dataset, 1, classes=[7])


def test_select_classes_builds_source_and_target_tasks(digits):
    test = digits["test"]
    source = data.select_classes(test, range(5))
    target = data.select_classes(test, [5, 6, 7, 8, 9])
    counts = np.bincount(test.labels)
    np.testing.assert_array_equal(np.bincount(source.labels), counts[:5])
    np.testing.assert_array_equal(np.bincount(target.labels), counts[5:])
    assert source.labels.dtype == np.int32
    assert source.labels.shape[0] + target.labels.shape[0] == 451
    # Relabelled 0..4 in the given order, same images in the same order.
    keep = test.labels >= 5
    np.testing.assert_array_equal(target.inputs, test.inputs[keep])
    np.testing.assert_array_equal(target.labels, test.labels[keep] - 5)
    reversed_order = data.select_classes(test, [9, 5])
    np.testing.assert_array_equal(
        reversed_order.labels, np.where(test.labels[np.isin(test.labels, [5, 9])] == 9, 0, 1)
    )
    kept = data.select_classes(test, [3, 4], relabel=False)
    assert set(kept.labels.tolist()) == {3, 4}
    with pytest.raises(ValueError, match="distinct"):
        data.select_classes(test, [1, 1])
    with pytest.raises(ValueError, match="not be empty"):
        data.select_classes(test, [])
    with pytest.raises(ValueError, match="classes \\[10\\] have no examples"):
        data.select_classes(test, [0, 10])


def test_public_api_is_exported():
    for name in data.__all__:
        assert hasattr(data, name), name
    assert issubclass(data.DatasetNotFoundError, FileNotFoundError)
