"""End-to-end: the main job on a tiny configuration, and its config validation."""

import json
import os

import numpy as np
import pytest

from experiments import train
from experiments.configs import default


def _tiny_config():
    config = default.get_config()
    config.train.num_epochs = 3
    config.model.hidden_sizes = (32,)
    config.ensemble.num_members = 2
    config.data.shift_kinds = ("rotation", "noise")
    config.data.shift_severities = (5,)
    config.methods = ("map", "deep_ensemble", "f_map")
    return config


@pytest.mark.slow
def test_main_job_writes_its_outputs(tmp_path):
    workdir = str(tmp_path / "run")
    summary = train.run(_tiny_config(), workdir)
    for name in ("config.json", "metrics.jsonl", "summary.json", "results.md", "reliability.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    assert set(summary) == {"map", "deep_ensemble", "f_map"}
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["map"]["test"]["accuracy"] == summary["map"]["test"]["accuracy"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert len(records) == 3 * 3 and {r["method"] for r in records} == set(summary)
    for name, result in summary.items():
        test = result["test"]
        assert test["accuracy"] > 0.85, (name, test)  # 3 epochs already learn digits
        for key in ("nll", "ece", "brier", "accuracy"):
            assert 0 <= test[key] < 5
        assert set(result["shifted"]) == {"rotation-5", "noise-5"}
        # distribution shift is real: lower accuracy, higher NLL at severity 5
        for shift in result["shifted"].values():
            assert shift["accuracy"] < test["accuracy"]
            assert shift["nll"] > test["nll"]
            assert 0.5 < shift["ood_auroc"] <= 1.0
        assert result["wall_seconds"] > 0
    assert "mutual_information" in summary["deep_ensemble"]["test"]
    with open(os.path.join(workdir, "results.md")) as f:
        assert f.read().count("\n") == 2 + 3


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.train.__setattr__("learning_rate", -0.1), "learning_rate"),
        (lambda c: c.__setattr__("methods", ()), "methods is empty"),
        (lambda c: c.__setattr__("methods", ("map", "hmc")), "unknown method 'hmc'"),
        (lambda c: c.model.__setattr__("name", "vgg"), "model.name"),
        (lambda c: c.sam.__setattr__("rho", -1.0), "sam.rho"),
        (lambda c: c.ensemble.__setattr__("num_members", 0), "num_members"),
    ],
)
def test_invalid_configs_fail_before_training(tmp_path, edit, message):
    config = _tiny_config()
    edit(config)
    with pytest.raises(train.ConfigError, match=message):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_unknown_keys_and_oversized_batches_are_rejected(tmp_path):
    config = _tiny_config()
    config.train.unlocked = True  # a typo-like unknown key
    with pytest.raises(train.ConfigError, match="unknown config keys: train.unlocked"):
        train.validate_config(config)
    config = _tiny_config()
    config.train.batch_size = 100_000
    with pytest.raises(train.ConfigError, match="batch_size"):
        train.run(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_rethinking_sam_toy_moves_the_minimum_to_the_wide_mode(tmp_path):
    from experiments import toy_rethinking_sam

    minima = toy_rethinking_sam.main(["--workdir", str(tmp_path), "--grid_size", "80"])
    assert minima["loss"]["theta0"] < -10  # the narrow, deeper mode at -20
    for name in ("mfvi", "ideal_sam", "one_step_sam"):
        assert 12 < minima[name]["theta0"] < 28, name  # the wide mode at +20
        assert minima[name]["theta1"] > 20, name
    assert (tmp_path / "landscape.png").stat().st_size > 0


@pytest.mark.slow
def test_bsam_two_moons_trains_and_writes_outputs(tmp_path):
    from experiments import bsam_two_moons

    try:
        summary = bsam_two_moons.main(["--workdir", str(tmp_path), "--num_epochs", "60"])
    finally:
        import jax

        jax.config.update("jax_enable_x64", False)
    assert summary["loss_last_epoch"] < 0.5 * summary["loss_first_epoch"]
    assert summary["train_accuracy_bma"] > 0.9
    assert summary["posterior_std_mean"] > 0
    assert (tmp_path / "boundaries.png").stat().st_size > 0


@pytest.mark.slow
def test_flat_bnn_runs_on_mock_tfds_data(tmp_path):
    """The real-data path of the flat-BNN experiment, on tfds mock data (no download)."""
    from unittest import mock

    import tensorflow_datasets as tfds

    from experiments import flat_bnn
    from experiments.configs import flat_bnn_cifar10_resnet20

    config = flat_bnn_cifar10_resnet20.get_config()
    config.seeds = (0,)
    config.families = ("swag", "mc_dropout")
    config.model.name = "mlp"  # keep the smoke test fast; resnet20 is the same code path
    config.data.corruptions = ("cifar10_corrupted/gaussian_noise_3",)
    config.train.num_epochs = 1
    config.train.batch_size = 16
    config.bma.num_samples = 3
    config.sharpness_examples = 64
    with (
        tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True),
    ):
        summary = flat_bnn.run(config, str(tmp_path))
    assert set(summary) == {"swag", "f_swag", "mc_dropout", "f_mc_dropout"}
    for result in summary.values():
        run = result["runs"][0]
        assert 0 <= run["accuracy"] <= 1 and np.isfinite(run["nll"])
        assert np.isfinite(run["shift_nll"]) and run["sharpness"] >= 0


@pytest.mark.slow
def test_flat_bnn_digits_tiny(tmp_path):
    from experiments import flat_bnn
    from experiments.configs import flat_bnn_digits

    config = flat_bnn_digits.get_config()
    config.seeds = (0,)
    config.families = ("swag_diag", "sgld", "mfvi", "deep_ensemble")
    config.train.num_epochs = 4
    config.bma.num_samples = 4
    config.sharpness_examples = 256
    summary = flat_bnn.run(config, str(tmp_path))
    assert len(summary) == 8
    for name, result in summary.items():
        assert result["mean"]["accuracy"] > 0.8, name
        assert result["mean"]["sharpness"] > 0, name
    assert (tmp_path / "results.md").read_text().count("\n") == 4 + 8
