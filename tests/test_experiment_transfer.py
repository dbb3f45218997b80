"""End-to-end tests of the Bayesian transfer-learning experiment (experiments/transfer.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import calibration, models, transfer
from experiments import transfer as experiment
from experiments.configs import (
    transfer_cifar10_resnet18,
    transfer_cifar100_resnet18,
    transfer_digits,
)


def _tiny_digits_config():
    config = transfer_digits.get_config()
    config.seeds = (0,)
    config.shots = (5,)
    config.methods = ("sabma", "sabma_released")
    config.source.num_epochs = 8
    config.source.swag_epochs = 5
    config.train.num_steps = 30
    config.bma.num_samples = 4
    config.swag.num_collections = 4
    config.sharpness.num_samples = 2
    config.sharpness.num_iterations = 4
    config.compilation_cache_dir = ""  # no process-wide side effect in the test session
    return config


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.train.__setattr__("unlocked", 1), "unknown config keys: train.unlocked"),
        (lambda c: c.__setattr__("methods", ("sgd", "hmc")), "unknown methods"),
        (lambda c: c.__setattr__("shots", ()), "config.shots is empty"),
        (lambda c: c.__setattr__("shots", (0,)), "shots must be positive"),
        (lambda c: c.transfer.__setattr__("frozen", "random"), "transfer.frozen"),
        (lambda c: c.prior.__setattr__("kind", "laplace"), "prior.kind"),
        (lambda c: c.calibration.__setattr__("convention", "x"), "calibration.convention"),
        (lambda c: c.sam.__setattr__("rho", -0.1), "sam.rho"),
        (lambda c: c.model.__setattr__("name", "resnet18"), "needs model.pretrained_path"),
        (lambda c: c.model.__setattr__("pretrained_path", "/no/such.npz"), "does not exist"),
        (lambda c: c.data.__setattr__("source_classes", (4, 5)), "overlap"),
        (lambda c: c.source.__setattr__("swag_epochs", 2), "swag_epochs"),
    ],
)
def test_invalid_configs_are_rejected_before_any_work(tmp_path, edit, message):
    config = _tiny_digits_config()
    edit(config)
    with pytest.raises(ValueError, match=message):
        experiment.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_accelerator_configs_fail_fast_without_weights():
    for module in (transfer_cifar10_resnet18, transfer_cifar100_resnet18):
        config = module.get_config()
        assert config.data.name in ("cifar10", "cifar100") and config.shots == (10,)
        with pytest.raises(ValueError, match="needs model.pretrained_path"):
            experiment.validate_config(config)


def test_trainable_preset_selects_exactly_the_norm_layers_and_the_head():
    module = experiment.TransferCNN(num_classes=5, width=4)
    params, _ = models.init(module, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    trainable, frozen = transfer.partition(params, transfer.select(params, "norm_and_head"))
    assert sorted(trainable) == ["head", "norm_0", "norm_1", "norm_2"]
    assert sorted(frozen) == ["conv_0", "conv_1", "dense_0"]
    # GroupNorm/LayerNorm: scale and bias of 4, 8 and 16 channels; head 16 x 5 + 5
    size = sum(x.size for x in jax.tree.leaves(trainable))
    assert size == 2 * (4 + 8 + 16) + 16 * 5 + 5


def test_predictive_temperature_scaling_matches_its_definition():
    members = jax.random.normal(jax.random.key(0), (3, 7, 4)) * 3.0
    members = jax.nn.log_softmax(members, axis=-1)
    bma_log_probs = jax.scipy.special.logsumexp(members, axis=0) - np.log(3)
    # T = 1 is the plain BMA; T = 2 is softmax(log p / 2) of the BMA predictive.
    np.testing.assert_allclose(
        experiment._scaled(members, 1.0, "predictive"), bma_log_probs, atol=1e-5
    )
    expected = jax.nn.log_softmax(bma_log_probs / 2.0, axis=-1)
    np.testing.assert_allclose(experiment._scaled(members, 2.0, "predictive"), expected, atol=1e-5)
    mean_logits = calibration.temperature_scaled_log_probs(members, 2.0, convention="mean_logits")
    np.testing.assert_allclose(
        experiment._scaled(members, 2.0, "mean_logits"),
        jax.nn.log_softmax(jnp.mean(members, axis=0) / 2.0, axis=-1),
        atol=1e-5,
    )
    np.testing.assert_allclose(mean_logits, experiment._scaled(members, 2.0, "mean_logits"))


@pytest.mark.slow
def test_digits_transfer_end_to_end(tmp_path):
    config = _tiny_digits_config()
    summary = experiment.run(config, str(tmp_path))
    results = summary["5"]
    assert list(results) == list(config.methods)  # SA-BMA rows (both forms) are present
    for method, result in results.items():
        (run,) = result["runs"]
        assert set(run) == set(experiment.METRICS), method
        for name in ("accuracy", "ece", "ece_ts", "shift_accuracy"):
            assert 0.0 <= run[name] <= 1.0, (method, name, run[name])
        assert 0.0 <= run["brier"] <= 2.0 and run["hessian"] > 0, (method, run)
        # 5 target classes: chance is 20%; pretrained features + fine-tuning do far better
        assert run["accuracy"] > 0.45, (method, run["accuracy"])
        # the temperature minimises the validation NLL, and T = 1 is a candidate
        assert run["val_nll_ts"] <= run["val_nll"] + 1e-4, (method, run)
        assert np.isfinite(run["nll_ts"]) and run["temperature"] > 0
        # the shifted target (rotation and noise at severity 3) is harder
        assert run["shift_nll"] > run["nll"], (method, run)
    with open(tmp_path / "summary.json") as f:
        stored = json.load(f)
    assert stored["5"]["sabma"]["mean"]["nll"] == pytest.approx(results["sabma"]["mean"]["nll"])
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {method} |" in table for method in config.methods)
    assert 0 < os.path.getsize(tmp_path / "transfer_nll.png") < 200_000


@pytest.mark.slow
def test_resnet18_config_runs_on_mock_tfds_data_with_a_random_weight_file(tmp_path):
    """The accelerator path (TFDS data, pretrained ResNet, BatchNorm, sampled frozen part)."""
    from unittest import mock

    import tensorflow_datasets as tfds

    from bnn_flat.models import pretrained
    from bnn_flat.models.resnet_imagenet import ImageNetResNet

    config = transfer_cifar10_resnet18.get_config()
    config.model.stage_sizes = (1, 1)
    config.model.width = 4
    module = ImageNetResNet(stage_sizes=(1, 1), block="basic", num_classes=1000, width=4)
    rng = np.random.default_rng(0)
    weights = {
        name: (0.1 * rng.standard_normal(shape)).astype(np.float32)
        for name, shape in pretrained.expected_state_dict_shapes(module).items()
    }
    for name in weights:
        if name.endswith("running_var"):
            weights[name] = np.ones_like(weights[name])
    path = str(tmp_path / "resnet.safetensors")
    pretrained.save_safetensors(path, weights)
    config.model.pretrained_path = path
    config.seeds = (0,)
    config.shots = (2,)
    config.methods = ("sabma",)
    config.data.target_classes = (0, 1, 2)
    config.data.val_per_class = 2
    config.data.corruptions = ("cifar10_corrupted/gaussian_noise_3",)
    config.transfer.frozen = "sample"
    config.train.num_steps = 3
    config.bma.num_samples = 2
    config.sharpness.num_samples = 1
    config.sharpness.num_iterations = 2
    config.compilation_cache_dir = ""
    with (
        tfds.testing.mock_data(num_examples=90, policy=tfds.testing.MockPolicy.USE_CODE),
        mock.patch.object(tfds.core.DatasetBuilder, "is_prepared", lambda self: True),
    ):
        summary = experiment.run(config, str(tmp_path / "run"))
    for method in config.methods:
        (run,) = summary["2"][method]["runs"]
        assert 0.0 <= run["accuracy"] <= 1.0 and np.isfinite(run["nll"]), (method, run)
        assert np.isfinite(run["shift_nll"]) and np.isfinite(run["hessian"]), (method, run)
        assert run["val_nll_ts"] <= run["val_nll"] + 1e-4
