r"""Bayesian transfer learning: few-shot fine-tuning from a pretrained network and its prior.

The SA-BMA experiment (Lim et al. 2024) in one pipeline, at CPU scale on the embedded digits
and at accelerator scale on CIFAR-10/100 with an ImageNet-pretrained ResNet-18:

1. **Backbone and prior.** Either pretrain on a *source* task (digits 0-4) and fit SWAG
   there (``prior.kind="swag"``: the prior is the SWAG Gaussian, "Pre-Train Your Loss"), or
   load pretrained weights (``model.pretrained_path``) and centre an isotropic-plus-low-rank
   Gaussian at them (``prior.kind="isotropic"``; SA-BMA's ImageNet SWAG files are not
   distributed). The new classifier gets mean 0 and variance ``prior.head_variance``
   (:func:`bnn_flat.transfer.extend_prior`).
2. **Trainable subset.** :func:`bnn_flat.transfer.select` with ``transfer.trainable``
   (default: normalisation layers and the head, SA-BMA's ``nl_ll``); the rest is frozen at
   the prior mean (``transfer.frozen="mean"``) or re-drawn from the prior marginal at every
   step and for every BMA sample (``"sample"``, as the released code). Normalisation layers
   run in evaluation mode throughout: BatchNorm keeps the source statistics, so every method
   shares one model state.
3. **Methods** on the trainable subset, all started at the prior mean:
   ``sgd``, ``sam``, ``fsam`` (Fisher-SAM), ``bsam``, ``swag``, ``f_swag`` (SWAG with SAM),
   ``mfvi`` (mean-field VI), ``sgld``, ``low_rank_vi`` (diagonal-plus-low-rank VI started at
   the prior, no perturbation: the ablation of SA-BMA's transform), ``sabma`` (the same
   family with :func:`bnn_flat.transforms.sabma`, the paper's Fisher-metric perturbation)
   and ``sabma_released`` (:func:`bnn_flat.transforms.sabma_released`, the released code's
   per-block score step).
4. **Evaluation** of the BMA (``bma.num_samples`` samples; 1 for point methods) on the target
   test set and on shifted copies: accuracy, NLL, ECE (15 equal-width bins), Brier, each also
   after temperature scaling fitted on the few-shot validation split
   (:mod:`bnn_flat.calibration`; ``"predictive"`` scales the BMA log-probabilities,
   ``"mean_logits"`` the mean member logits as SA-BMA does), and the largest Hessian
   eigenvalue of the few-shot training loss (cross-entropy, over the trainable subset,
   Lanczos) averaged over ``sharpness.num_samples`` posterior samples.

``run(config, workdir)`` writes ``config.json``, ``summary.json`` (every run and the mean and
standard deviation over seeds, per shot count and method), ``results.md`` and
``transfer_nll.png``. Commands are in ``experiments/configs/transfer_*.py``.

References:
  Lim et al. Flat Posterior Does Matter For Bayesian Transfer Learning. arXiv 2406.15664.
  Shwartz-Ziv et al. Pre-Train Your Loss. NeurIPS 2022.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from bnn_flat import (
    bma,
    calibration,
    data,
    metrics,
    models,
    objectives,
    sharpness,
    training,
    transfer,
    transforms,
)
from bnn_flat.models import conv
from bnn_flat.models.resnet_imagenet import ImageNetResNet
from bnn_flat.posteriors import bsam as bsam_family
from bnn_flat.posteriors import low_rank_vi, mean_field_vi, point, sgmcmc, swag
from bnn_flat.types import ApplyFn, LossAux, ModelState, Params, PRNGKey

__all__ = ["METHODS", "METRICS", "TransferCNN", "validate_config", "run"]

METHODS = (
    "sgd",
    "sam",
    "fsam",
    "bsam",
    "swag",
    "f_swag",
    "mfvi",
    "sgld",
    "low_rank_vi",
    "sabma",
    "sabma_released",
)
"""Method names accepted in ``config.methods``."""

METRICS = (
    "accuracy",
    "nll",
    "ece",
    "brier",
    "nll_ts",
    "ece_ts",
    "brier_ts",
    "shift_accuracy",
    "shift_nll",
    "shift_ece",
    "shift_nll_ts",
    "shift_ece_ts",
    "val_nll",
    "val_nll_ts",
    "temperature",
    "hessian",
    "seconds",
)
"""Per-run numbers in ``summary.json`` (``_ts``: after temperature scaling)."""

_POINT_METHODS = ("sgd", "sam", "fsam")
_CONVENTIONS = ("predictive", "mean_logits")


class TransferCNN(nn.Module):
    """A small CNN with GroupNorm/LayerNorm layers and a classifier named ``head``.

    ``conv_0`` (``width`` channels) - ``norm_0`` - ReLU - 2x2 max pool - ``conv_1``
    (``2 width``) - ``norm_1`` - ReLU - 2x2 max pool - ``dense_0`` (``4 width``) - ``norm_2``
    (LayerNorm) - ReLU - ``head``. No running statistics, so the normalisation layers are
    plain affine maps of per-example statistics (SA-BMA's trainable ``nl`` layers).

    Attributes:
      num_classes: Number of logits.
      width: Channels of the first convolution.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> module = TransferCNN(num_classes=5, width=4)
      >>> params, state = models.init(module, jax.random.key(0), jnp.ones((1, 8, 8, 1)))
      >>> sorted(params), state
      (['conv_0', 'conv_1', 'dense_0', 'head', 'norm_0', 'norm_1', 'norm_2'], {})
    """

    num_classes: int
    width: int = 16

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Logits ``(batch, num_classes)`` of NHWC images."""
        del train
        x = inputs
        for index, features in enumerate((self.width, 2 * self.width)):
            x = conv.Conv(features, (3, 3), padding="SAME", name=f"conv_{index}")(x)
            x = nn.GroupNorm(num_groups=min(4, features), name=f"norm_{index}")(x)
            x = nn.max_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(4 * self.width, name="dense_0")(x)
        x = nn.relu(nn.LayerNorm(name="norm_2")(x))
        return nn.Dense(self.num_classes, name="head")(x)


# Configuration ---------------------------------------------------------------------------------


def _flat_keys(config: Any, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in config.items():
        path = f"{prefix}{name}"
        keys |= _flat_keys(value, path + ".") if isinstance(value, ConfigDict) else {path}
    return keys


def validate_config(config: ConfigDict) -> None:
    """Raises ``ValueError`` naming the first problem of a transfer config.

    Unknown keys (against :mod:`experiments.configs.transfer_digits`), unknown methods or
    option strings, empty seeds/shots/methods, non-positive sizes and rates, and a missing
    pretrained weight file are all rejected before anything runs.

    Args:
      config: The experiment config.

    Example:
      >>> from experiments.configs import transfer_digits
      >>> config = transfer_digits.get_config()
      >>> config.methods = ("sgd", "hmc")
      >>> try:
      ...     validate_config(config)
      ... except ValueError as error:
      ...     print(str(error)[:28])
      unknown methods ['hmc']; kno
    """
    from experiments.configs import transfer_digits

    unknown = sorted(_flat_keys(config) - _flat_keys(transfer_digits.get_config()))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    for name in ("seeds", "shots", "methods"):
        if not tuple(config[name]):
            raise ValueError(f"config.{name} is empty")
    bad = [m for m in config.methods if m not in METHODS]
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {', '.join(METHODS)}")
    if len(set(config.methods)) != len(config.methods):
        raise ValueError(f"config.methods has duplicates: {list(config.methods)}")
    for shots in config.shots:
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise ValueError(f"shots must be positive integers, got {list(config.shots)}")
    choices = {
        "model.name": (config.model.name, ("cnn", "resnet18")),
        "prior.kind": (config.prior.kind, ("swag", "isotropic")),
        "transfer.frozen": (config.transfer.frozen, ("mean", "sample")),
        "calibration.convention": (config.calibration.convention, _CONVENTIONS),
        "sabma.kl_target": (config.sabma.kl_target, ("isotropic", "prior")),
    }
    for name, (value, options) in choices.items():
        if value not in options:
            raise ValueError(f"{name} must be one of {options}, got {value!r}")
    positive = {
        "train.num_steps": config.train.num_steps,
        "train.batch_size": config.train.batch_size,
        "train.learning_rate": config.train.learning_rate,
        "bma.num_samples": config.bma.num_samples,
        "prior.rank": config.prior.rank,
        "prior.scale": config.prior.scale,
        "prior.head_variance": config.prior.head_variance,
        "sam.rho": config.sam.rho,
        "fsam.rho": config.fsam.rho,
        "bsam.learning_rate": config.bsam.learning_rate,
        "swag.learning_rate": config.swag.learning_rate,
        "swag.rank": config.swag.rank,
        "swag.num_collections": config.swag.num_collections,
        "vi.learning_rate": config.vi.learning_rate,
        "vi.prior_precision": config.vi.prior_precision,
        "vi.temperature": config.vi.temperature,
        "sgld.learning_rate": config.sgld.learning_rate,
        "sabma.learning_rate": config.sabma.learning_rate,
        "sabma.temperature": config.sabma.temperature,
        "sharpness.num_samples": config.sharpness.num_samples,
        "sharpness.num_iterations": config.sharpness.num_iterations,
        "sharpness.max_examples": config.sharpness.max_examples,
        "data.val_per_class": config.data.val_per_class,
    }
    for name, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")
    for name, value in (("sabma.rho", config.sabma.rho), ("train.momentum", config.train.momentum)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
    path = config.model.pretrained_path
    if config.model.name == "resnet18" and not path:
        raise ValueError("model.name='resnet18' needs model.pretrained_path (a weight file).")
    if path and not os.path.isfile(path):
        raise ValueError(
            f"model.pretrained_path {path!r} does not exist; convert torchvision weights with "
            "docs/pretrained.md and pass --config.model.pretrained_path=FILE."
        )
    if not path:
        if config.data.name != "digits" or not tuple(config.data.source_classes):
            raise ValueError(
                "without model.pretrained_path the backbone is pretrained on the source "
                "task, which needs data.name='digits' and non-empty data.source_classes."
            )
        overlap = set(config.data.source_classes) & set(config.data.target_classes)
        if overlap:
            raise ValueError(f"source and target classes overlap: {sorted(overlap)}")
    if config.prior.kind == "swag" and path:
        raise ValueError(
            "prior.kind='swag' fits SWAG on the source task; with a pretrained file use "
            "prior.kind='isotropic'."
        )
    if config.prior.kind == "swag" and config.source.swag_epochs < config.prior.rank:
        raise ValueError(
            f"source.swag_epochs ({config.source.swag_epochs}) must be >= prior.rank "
            f"({config.prior.rank}): SWAG collects once per epoch, and unfilled factor rows "
            "are zero (a singular Fisher for transforms.sabma)."
        )


# Data ------------------------------------------------------------------------------------------


class _Task(NamedTuple):
    source: data.Dataset | None
    pool: data.Dataset
    test: data.Dataset
    shifted: dict[str, data.Dataset]
    num_classes: int


def _load_task(config: ConfigDict) -> _Task:
    if config.data.name == "digits":
        splits = data.load_digits(seed=config.data_seed)
        shifted = data.load_shifted_digits(
            seed=config.data_seed,
            kinds=tuple(config.data.shift_kinds),
            severities=(config.data.shift_severity,),
        )
        classes = list(config.data.target_classes) or list(range(10))
        source = (
            data.select_classes(splits["train"], list(config.data.source_classes))
            if tuple(config.data.source_classes)
            else None
        )
        return _Task(
            source=source,
            pool=data.select_classes(splits["train"], classes),
            test=data.select_classes(splits["test"], classes),
            shifted={k: data.select_classes(v, classes) for k, v in shifted.items()},
            num_classes=len(classes),
        )
    kwargs = {"data_dir": config.data.data_dir}

    def limit(count):
        return {"max_examples": count} if count else {}

    pool = data.load_tfds(
        config.data.name, split="train", **kwargs, **limit(config.data.max_train_examples)
    )
    test = data.load_tfds(
        config.data.name, split="test", **kwargs, **limit(config.data.max_test_examples)
    )
    classes = list(config.data.target_classes)
    if classes:
        pool, test = data.select_classes(pool, classes), data.select_classes(test, classes)
    shifted = {}
    for kind in config.data.shift_kinds:
        images = data.shift_images(
            config.data_seed,
            test.inputs,
            kind,
            config.data.shift_severity,
            value_range=config.data.shift_value_range,
        )
        shifted[f"{kind}-{config.data.shift_severity}"] = data.Dataset(images, test.labels)
    for name in config.data.corruptions:
        corrupted = data.load_tfds(
            name, split="test", **kwargs, **limit(config.data.max_test_examples)
        )
        shifted[name] = data.select_classes(corrupted, classes) if classes else corrupted
    num_classes = len(classes) if classes else int(max(pool.labels.max(), test.labels.max())) + 1
    return _Task(source=None, pool=pool, test=test, shifted=shifted, num_classes=num_classes)


# Backbone and prior ----------------------------------------------------------------------------


def _module(config: ConfigDict, num_classes: int) -> nn.Module:
    if config.model.name == "cnn":
        return TransferCNN(num_classes=num_classes, width=config.model.width)
    return ImageNetResNet(
        stage_sizes=tuple(config.model.stage_sizes),
        block="basic",
        num_classes=num_classes,
        width=config.model.width,
    )


def _evaluation_mode(apply_fn: ApplyFn) -> ApplyFn:
    """The model with normalisation layers in evaluation mode (BatchNorm: fixed statistics)."""

    def apply(params, model_state, inputs, *, train, key):
        del train
        return apply_fn(params, model_state, inputs, train=False, key=key)

    return apply


def _backbone_and_prior(
    key: PRNGKey, config: ConfigDict, task: _Task, module: nn.Module
) -> tuple[dict, ModelState, dict]:
    """Pretrained parameters (new head at the prior mean 0), model state and prior."""
    init_key, pretrain_key = jax.random.split(key)
    sample_inputs = jnp.asarray(task.pool.inputs[:1])
    if config.model.pretrained_path:
        from bnn_flat.models import pretrained

        params, model_state = pretrained.load_pretrained(
            config.model.pretrained_path, module, init_key, sample_inputs, include_head=False
        )
        prior = transfer.prior_from_moments(
            params,
            jax.tree.map(lambda x: jnp.full_like(x, config.prior.std**2), params),
            _random_factor(params, config.prior.rank, config.prior.factor_std),
        )
    else:
        params, model_state, prior = _pretrain_on_source(pretrain_key, config, task)
    head_std = math.sqrt(config.prior.head_variance)
    prior = transfer.extend_prior(prior, params, new_std=head_std, replace=config.transfer.head)
    return prior["mean"], model_state, prior


def _random_factor(params: Params, rank: int, std: float) -> Params:
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    return treedef.unflatten(
        [
            std * jax.random.normal(k, (rank, *x.shape), x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ]
    )


def _pretrain_on_source(key: PRNGKey, config: ConfigDict, task: _Task):
    """SGD on the source classes, then SWAG over ``source.swag_epochs`` (once per epoch)."""
    source = task.source
    module = _module(config, len(config.data.source_classes))
    apply_fn = _evaluation_mode(models.make_apply(module))
    init_key, fit_key = jax.random.split(key)
    params, model_state = models.init(module, init_key, jnp.asarray(source.inputs[:1]))
    num_data = len(source.labels)
    batch_size = min(config.source.batch_size, num_data)
    steps_per_epoch = num_data // batch_size
    loss_fn = objectives.classification_loss(
        apply_fn,
        num_data=num_data,
        prior_precision=objectives.weight_decay_to_prior_precision(
            config.source.weight_decay, num_data
        ),
    )
    family = swag.build(
        loss_fn,
        optax.sgd(config.source.learning_rate, momentum=config.train.momentum),
        start_step=config.source.num_epochs * steps_per_epoch,
        collect_every=steps_per_epoch,
        rank=config.prior.rank,
        scale=config.prior.scale,
    )
    state = training.fit(
        fit_key,
        family,
        family.init(params, model_state),
        (source.inputs, source.labels),
        num_epochs=config.source.num_epochs + config.source.swag_epochs,
        batch_size=batch_size,
        progress=False,
    ).state
    prior = transfer.prior_from_swag(
        state, scale=config.prior.scale, rank=config.prior.rank, min_std=config.prior.min_std
    )
    # The source head has its own classes: the target gets a new one (extend_prior).
    target_module = _module(config, task.num_classes)
    target_params, _ = models.init(target_module, init_key, jnp.asarray(source.inputs[:1]))
    return target_params, state.model_state, _drop_head(prior, config.transfer.head)


def _drop_head(prior: dict, head_pattern: str) -> dict:
    mask = transfer.select(prior["mean"], head_pattern)
    return transfer.partition_prior(prior, jax.tree.map(lambda m: not m, mask))[0]


# Methods ---------------------------------------------------------------------------------------


class _Setup(NamedTuple):
    loss: Any  # per-datum loss over the trainable part, with a Gaussian prior
    likelihood: Any  # the same without prior (VI, bSAM)
    num_data: int
    batch_size: int
    num_epochs: int
    total_steps: int


def _family(method: str, config: ConfigDict, setup: _Setup, prior_train: dict):
    """``(family, initial_state_fn, num_bma_samples)`` of one method."""
    total = setup.total_steps
    momentum = config.train.momentum
    cosine = optax.cosine_decay_schedule(config.train.learning_rate, total)
    sgd = optax.sgd(cosine, momentum=momentum)
    num_samples = config.bma.num_samples

    def default_init(family):
        return lambda params, model_state: family.init(params, model_state)

    if method in _POINT_METHODS:
        perturbation = {
            "sgd": None,
            "sam": transforms.sam(config.sam.rho),
            "fsam": transforms.fisher_sam(config.fsam.rho, config.fsam.eta),
        }[method]
        optimizer = sgd if perturbation is None else optax.chain(perturbation, sgd)
        family = point.build(setup.loss, optimizer)
        return family, default_init(family), 1
    if method == "bsam":
        optimizer = transforms.bsam(
            optax.cosine_decay_schedule(config.bsam.learning_rate, total),
            rho=config.bsam.rho,
            num_data=setup.num_data,
            prior_precision=config.bsam.prior_precision,
            damping=config.bsam.damping,
            s_init=config.bsam.s_init,
            beta2=config.bsam.beta2,
        )
        family = bsam_family.build(setup.likelihood, optimizer, num_data=setup.num_data)
        return family, default_init(family), num_samples
    if method in ("swag", "f_swag"):
        constant = optax.sgd(config.swag.learning_rate, momentum=momentum)
        optimizer = (
            optax.chain(transforms.sam(config.sam.rho), constant)
            if method == "f_swag"
            else constant
        )
        start = total // 2
        family = swag.build(
            setup.loss,
            optimizer,
            start_step=start,
            collect_every=max(1, (total - start) // config.swag.num_collections),
            rank=config.swag.rank,
            scale=config.swag.scale,
        )
        return family, default_init(family), num_samples
    if method == "mfvi":
        family = mean_field_vi.build(
            setup.likelihood,
            optax.sgd(optax.cosine_decay_schedule(config.vi.learning_rate, total), momentum),
            num_data=setup.num_data,
            prior_precision=config.vi.prior_precision,
            temperature=config.vi.temperature,
            init_std=config.vi.init_std,
        )
        return family, default_init(family), num_samples
    if method == "sgld":
        burn_in = total // 2
        family = sgmcmc.sgld(
            setup.loss,
            learning_rate=config.sgld.learning_rate,
            num_data=setup.num_data,
            temperature=config.sgld.temperature,
            num_samples_max=num_samples,
            burn_in=burn_in,
            thin=max(1, (total - burn_in) // num_samples),
        )
        return family, default_init(family), num_samples
    # Low-rank VI started at the prior: plain, paper SA-BMA, released SA-BMA.
    schedule = optax.cosine_decay_schedule(
        config.sabma.learning_rate if method != "low_rank_vi" else config.vi.learning_rate, total
    )
    base = optax.sgd(schedule, momentum=momentum)
    if method == "sabma":
        optimizer = optax.chain(transforms.sabma(config.sabma.rho), base)
    elif method == "sabma_released":
        optimizer = optax.chain(transforms.sabma_released(config.sabma.released_rho), base)
    else:
        optimizer = base
    # KL target: N(0, 1/vi.prior_precision), or the transfer prior when the family has it.
    if config.sabma.kl_target == "prior":
        kl_kwargs = {"prior": prior_train}
    else:
        kl_kwargs = {"prior_precision": config.vi.prior_precision}
    family = low_rank_vi.build(
        setup.likelihood,
        optimizer,
        num_data=setup.num_data,
        rank=transfer._factor_rank(prior_train["factor"]),
        temperature=config.sabma.temperature,
        **kl_kwargs,
    )

    def init_from_prior(params, model_state):
        del params
        return transfer.init_low_rank_vi_from_prior(prior_train, optimizer, model_state)

    return family, init_from_prior, num_samples


# One run ---------------------------------------------------------------------------------------


def _run_one(
    key: PRNGKey,
    method: str,
    config: ConfigDict,
    splits: dict[str, data.Dataset],
    shifted: dict[str, data.Dataset],
    backbone: tuple[dict, ModelState, dict],
    apply_fn: ApplyFn,
) -> dict[str, float]:
    begin = time.perf_counter()
    params, model_state, prior = backbone
    train, val = splits["train"], splits["val"]
    mask = transfer.select(params, list(config.transfer.trainable), list(config.transfer.exclude))
    prior_train, prior_frozen = transfer.partition_prior(prior, mask)
    trainable, frozen = transfer.partition(params, mask)
    mode = config.transfer.frozen
    # The frozen part travels in the model state (not as compile-time constants), so the
    # compiled training step of a method does not depend on the seed's backbone.
    carried = {"model": model_state, "frozen": prior_frozen if mode == "sample" else frozen}
    num_data = len(train.labels)
    batch_size = min(config.train.batch_size, num_data)
    steps_per_epoch = num_data // batch_size
    num_epochs = max(1, math.ceil(config.train.num_steps / steps_per_epoch))

    def loss_over_trainable(prior_precision):
        full = objectives.classification_loss(
            apply_fn, num_data=num_data, prior_precision=prior_precision
        )
        return _with_frozen_state(full, mode)

    setup = _Setup(
        loss=loss_over_trainable(
            objectives.weight_decay_to_prior_precision(config.train.weight_decay, num_data)
        ),
        likelihood=loss_over_trainable(0.0),
        num_data=num_data,
        batch_size=batch_size,
        num_epochs=num_epochs,
        total_steps=num_epochs * steps_per_epoch,
    )
    family, init_fn, num_samples = _family(method, config, setup, prior_train)
    fit_key, sample_key, frozen_key, hessian_key = jax.random.split(key, 4)
    state = training.fit(
        fit_key,
        family,
        init_fn(trainable, carried),
        (train.inputs, train.labels),
        num_epochs=num_epochs,
        batch_size=batch_size,
        progress=False,
    ).state
    samples = transfer.complete_samples(
        frozen_key,
        family.sample(sample_key, state, num_samples),
        frozen,
        frozen_prior=prior_frozen if mode == "sample" else None,
        mode=mode,
    )

    def evaluate(inputs):
        size = config.eval_batch_size or len(inputs)
        parts = [
            _member_log_probs(samples, model_state, jnp.asarray(inputs[i : i + size]), apply_fn)
            for i in range(0, len(inputs), size)
        ]
        return jnp.concatenate(parts, axis=1)  # member log-probabilities (S, N, C)

    # One pass over all evaluation sets (one compilation): val, test, then the shifted sets.
    sets = [val, splits["test"], *shifted.values()]
    members = evaluate(np.concatenate([d.inputs for d in sets]))
    offsets = np.cumsum([0] + [len(d.labels) for d in sets])
    parts = [members[:, offsets[i] : offsets[i + 1]] for i in range(len(sets))]
    val_members, test_members, shifted_members = parts[0], parts[1], parts[2:]
    convention = config.calibration.convention
    val_log_probs = calibration.temperature_scaled_log_probs(val_members, 1.0)
    fit_logits = val_log_probs if convention == "predictive" else jnp.mean(val_members, axis=0)
    temperature = calibration.fit_temperature(fit_logits, val.labels)

    def scores(members, labels):
        plain = calibration.temperature_scaled_log_probs(members, 1.0)
        scaled = _scaled(members, temperature, convention)
        out = {
            "accuracy": metrics.accuracy(plain, labels),
            "nll": metrics.nll(plain, labels),
            "ece": metrics.ece(plain, labels),
            "brier": metrics.brier(plain, labels),
            "nll_ts": metrics.nll(scaled, labels),
            "ece_ts": metrics.ece(scaled, labels),
            "brier_ts": metrics.brier(scaled, labels),
        }
        return {k: float(v) for k, v in out.items()}

    result = scores(test_members, splits["test"].labels)
    shift_results = [
        scores(m, d.labels) for m, d in zip(shifted_members, shifted.values(), strict=True)
    ]
    for name in ("accuracy", "nll", "ece", "nll_ts", "ece_ts"):
        values = [r[name] for r in shift_results]
        result[f"shift_{name}"] = float(np.mean(values)) if values else float("nan")
    result["val_nll"] = float(metrics.nll(val_log_probs, val.labels))
    result["val_nll_ts"] = float(
        metrics.nll(_scaled(val_members, temperature, convention), val.labels)
    )
    result["temperature"] = float(temperature)
    result["hessian"] = _hessian(hessian_key, config, apply_fn, model_state, samples, mask, train)
    result["seconds"] = time.perf_counter() - begin
    return result


def _scaled(members: jax.Array, temperature: jax.Array, convention: str) -> jax.Array:
    if convention == "predictive":
        # Temperature on the BMA predictive: softmax(log p_bma / T).
        log_probs = calibration.temperature_scaled_log_probs(members, 1.0)
        return jax.nn.log_softmax(log_probs / temperature, axis=-1)
    return calibration.temperature_scaled_log_probs(members, temperature, convention=convention)


def _with_frozen_state(loss_fn, mode: str):
    """A loss over the trainable part; the frozen part (or its prior) is in the model state.

    The model state is ``{"model": ..., "frozen": ...}``: ``"frozen"`` holds the frozen
    parameters (``mode="mean"``) or their prior ``{"mean", "raw_scale", "factor"}``
    (``"sample"``: one draw per call, as :func:`bnn_flat.transfer.with_frozen`).
    """

    def loss(trainable, carried, batch, key):
        frozen = carried["frozen"]
        if mode == "sample":
            frozen_key, key = jax.random.split(key)
            draw = low_rank_vi.sample_variational(frozen_key, frozen, 1)
            frozen = jax.tree.map(lambda x: x[0], draw)
        value, aux = loss_fn(transfer.merge(trainable, frozen), carried["model"], batch, key)
        return value, LossAux({**carried, "model": aux.model_state}, aux.metrics)

    return loss


@functools.partial(jax.jit, static_argnums=3)
def _member_log_probs(samples, model_state, inputs, apply_fn):
    predict_fn = bma.model_predict_fn(apply_fn, model_state)
    return bma.predict(predict_fn, samples, inputs, return_members=True)[1]


def _hessian(key, config, apply_fn, model_state, samples, mask, train) -> float:
    """Top Hessian eigenvalue of the training cross-entropy over the trainable subset."""
    count = min(config.sharpness.num_samples, jax.tree.leaves(samples)[0].shape[0])
    first = jax.tree.map(lambda x: x[:count], samples)
    trainable, frozen = transfer.partition(first, mask)
    size = min(len(train.labels), config.sharpness.max_examples)
    dimension = sum(x[0].size for x in jax.tree.leaves(trainable))
    iterations = min(config.sharpness.num_iterations, dimension)
    return float(
        _top_eigenvalue(
            key,
            trainable,
            frozen,
            model_state,
            jnp.asarray(train.inputs[:size]),
            jnp.asarray(train.labels[:size]),
            apply_fn,
            iterations,
        )
    )


@functools.partial(jax.jit, static_argnums=(6, 7))
def _top_eigenvalue(key, trainable, frozen, model_state, inputs, labels, apply_fn, iterations):
    def loss(trainable_params, frozen_params):
        params = transfer.merge(trainable_params, frozen_params)
        logits, _ = apply_fn(params, model_state, inputs, train=False, key=None)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))

    statistic = sharpness.posterior_top_eigenvalue(
        key,
        loss,
        trainable,
        num_iterations=iterations,
        model_states=frozen,
        strategy="map",
        unroll=False,  # a few dozen examples: the compiled loop is fine and compiles fast
    )
    return statistic.mean


# Driver ----------------------------------------------------------------------------------------


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every (seed, shots, method) and writes the summary, the table and the plot.

    Args:
      config: See :mod:`experiments.configs.transfer_digits`.
      workdir: Output directory (created).

    Returns:
      ``{"<shots>": {method: {"runs": [...], "mean": {...}, "std": {...}}}, "wall_seconds"}``.
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    _enable_compilation_cache(config.compilation_cache_dir, workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    begin = time.perf_counter()
    task = _load_task(config)
    needed = max(config.shots) + config.data.val_per_class
    counts = np.bincount(task.pool.labels)
    if counts[counts > 0].min() < needed:
        raise ValueError(
            f"a target class has {counts[counts > 0].min()} examples in the pool, fewer than "
            f"max(shots) + data.val_per_class = {needed}"
        )
    runs: dict[int, dict[str, list]] = {s: {m: [] for m in config.methods} for s in config.shots}
    module = _module(config, task.num_classes)
    apply_fn = _evaluation_mode(models.make_apply(module))  # one object: jit caches hit
    for seed in config.seeds:
        backbone_key, run_key = jax.random.split(jax.random.key(seed))
        backbone = _backbone_and_prior(backbone_key, config, task, module)
        for shots in config.shots:
            train, val = data.few_shot_split(
                int(seed) * 1000 + shots,
                task.pool,
                shots,
                num_val_per_class=config.data.val_per_class,
            )
            splits = {"train": train, "val": val, "test": task.test}
            for index, method in enumerate(config.methods):
                key = jax.random.fold_in(jax.random.fold_in(run_key, shots), index)
                result = _run_one(key, method, config, splits, task.shifted, backbone, apply_fn)
                runs[shots][method].append(result)
                print(
                    f"seed={seed} shots={shots:3d} {method:15s} "
                    + " ".join(
                        f"{k}={result[k]:.4f}"
                        for k in ("accuracy", "nll", "ece", "shift_nll", "hessian")
                    ),
                    flush=True,
                )
    summary: dict[str, Any] = {}
    for shots, by_method in runs.items():
        summary[str(shots)] = {
            method: {
                "runs": results,
                "mean": {k: float(np.mean([r[k] for r in results])) for k in METRICS},
                "std": {k: float(np.std([r[k] for r in results])) for k in METRICS},
            }
            for method, results in by_method.items()
        }
    summary["wall_seconds"] = time.perf_counter() - begin
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _table(summary, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    _plot(summary, config, os.path.join(workdir, "transfer_nll.png"))
    print(table)
    return summary


def _enable_compilation_cache(setting: str, workdir: str) -> None:
    """JAX's persistent compilation cache (a process-wide setting; ``""`` leaves it alone).

    Every (method, shot count) compiles its own training step; with the frozen backbone in
    the model state the programs of later seeds are identical, so the cache turns their
    compilations into look-ups (about 3x faster overall on 2 CPU cores).
    """
    if not setting or jax.config.jax_compilation_cache_dir:
        return
    path = os.path.join(workdir, "jax_cache") if setting == "auto" else setting
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.3)


_COLUMNS = (
    ("acc %", "accuracy", 100.0),
    ("NLL", "nll", 1.0),
    ("ECE", "ece", 1.0),
    ("Brier", "brier", 1.0),
    ("NLL+TS", "nll_ts", 1.0),
    ("ECE+TS", "ece_ts", 1.0),
    ("shift acc %", "shift_accuracy", 100.0),
    ("shift NLL", "shift_nll", 1.0),
    ("shift NLL+TS", "shift_nll_ts", 1.0),
    ("λ_max", "hessian", 1.0),
)


def _table(summary: dict[str, Any], config: ConfigDict) -> str:
    lines = [
        f"mean ± std over {len(config.seeds)} seed(s); target classes "
        f"{list(config.data.target_classes) or 'all'}; shift = mean over "
        f"{list(config.data.shift_kinds) + list(config.data.corruptions)} at severity "
        f"{config.data.shift_severity}; +TS: temperature scaling fitted on the few-shot "
        f"validation split ({config.data.val_per_class}/class); λ_max: top Hessian eigenvalue "
        "of the training cross-entropy over the trainable subset, mean over "
        f"{config.sharpness.num_samples} posterior samples. Wall time "
        f"{summary['wall_seconds']:.0f} s.",
        "",
    ]
    for shots in config.shots:
        lines += [
            f"**{shots}-shot**",
            "",
            "| method | " + " | ".join(c[0] for c in _COLUMNS) + " |",
            "|---" * (len(_COLUMNS) + 1) + "|",
        ]
        for method, result in summary[str(shots)].items():
            mean, std = result["mean"], result["std"]
            cells = []
            for _, key, factor in _COLUMNS:
                digits = 1 if factor == 100.0 else (2 if key == "hessian" else 3)
                cells.append(f"{factor * mean[key]:.{digits}f} ± {factor * std[key]:.{digits}f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot(summary: dict[str, Any], config: ConfigDict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = list(config.shots)
    panels = (("nll", "target NLL"), ("shift_nll", "shifted-target NLL"), ("hessian", "λ_max"))
    figure, axes = plt.subplots(1, len(panels), figsize=(11, 3.4))
    for axis, (key, title) in zip(axes, panels, strict=True):
        for method in config.methods:
            means = [summary[str(s)][method]["mean"][key] for s in shots]
            stds = [summary[str(s)][method]["std"][key] for s in shots]
            style = "-" if method.startswith("sabma") else "--"
            axis.errorbar(
                shots,
                means,
                yerr=stds,
                label=method,
                linestyle=style,
                marker="o",
                markersize=3,
                linewidth=2 if method.startswith("sabma") else 1,
                capsize=2,
            )
        axis.set_xscale("log")
        axis.set_xticks(shots, [str(s) for s in shots])
        axis.set_xlabel("shots per class")
        axis.set_title(title)
        if key == "hessian":
            axis.set_yscale("log")
    axes[-1].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
