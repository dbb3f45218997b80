"""The main job: train several posterior families on one task and compare their BMA.

``run(config, workdir)`` is importable (tests call it on tiny configs); ``experiments.main``
is the command-line entry point. Outputs in ``workdir``:

* ``config.json``: the resolved configuration;
* ``metrics.jsonl``: one line per method and epoch (loss, batch metrics, seconds);
* ``summary.json``: per method, clean-test metrics, per-shift metrics, their mean and the
  wall time;
* ``results.md``: the Markdown table printed at the end;
* ``reliability.png``: reliability diagrams of every method on the clean test set.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from bnn_flat import bma, data, metrics, models, objectives, training, transforms
from bnn_flat.posteriors import bsam, ensemble, point

__all__ = ["run", "validate_config", "METHODS", "ConfigError"]


class ConfigError(ValueError):
    """An invalid experiment configuration (raised before any training)."""


def _sam(config: ConfigDict) -> optax.GradientTransformation:
    return transforms.sam(rho=config.sam.rho)


def _asam(config: ConfigDict) -> optax.GradientTransformation:
    return transforms.asam(rho=config.asam.rho, eta=config.asam.eta)


# name -> (is_ensemble, sharpness-aware transform factory or None). "f_" marks the flat
# version of a method: the same family with SAM in its optimizer chain. "bsam" is special:
# a full optimizer with its own Gaussian posterior (see _build_family).
METHODS: dict[str, tuple[bool, Callable[[ConfigDict], Any] | None]] = {
    "map": (False, None),
    "deep_ensemble": (True, None),
    "f_map": (False, _sam),
    "f_deep_ensemble": (True, _sam),
    "asam_map": (False, _asam),
    "bsam": (False, None),
}

_MODELS = ("mlp", "lenet", "resnet20")
_DATASETS = ("digits",)


def _schema() -> ConfigDict:
    from experiments.configs import default

    return default.get_config()


def _unknown_keys(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> list[str]:
    unknown = []
    for key in config.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            unknown.append(name)
        elif isinstance(config[key], ConfigDict) and isinstance(schema[key], ConfigDict):
            unknown += _unknown_keys(config[key], schema[key], name + ".")
    return unknown


def validate_config(config: ConfigDict) -> None:
    """Checks a configuration before any data is loaded or model trained.

    Raises:
      ConfigError: naming every problem found (unknown keys, bad values, unknown methods).
    """
    problems = []
    unknown = [k for k in _unknown_keys(config, _schema()) if k != "runner"]
    if unknown:
        problems.append(f"unknown config keys: {', '.join(sorted(unknown))}")
    train = config.get("train", ConfigDict())
    for name in ("learning_rate", "num_epochs", "batch_size"):
        value = train.get(name)
        if value is None or not isinstance(value, int | float) or value <= 0:
            problems.append(f"train.{name} must be a positive number, got {value!r}")
    for name in ("momentum", "weight_decay"):
        value = train.get(name, 0.0)
        if not isinstance(value, int | float) or value < 0 or not math.isfinite(value):
            problems.append(f"train.{name} must be a finite number >= 0, got {value!r}")
    if train.get("schedule") not in ("cosine", "constant"):
        problems.append(
            f"train.schedule must be 'cosine' or 'constant', got {train.get('schedule')!r}"
        )
    methods = tuple(config.get("methods", ()))
    if not methods:
        problems.append("methods is empty: name at least one of " + ", ".join(METHODS))
    for method in methods:
        if method not in METHODS:
            problems.append(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if config.get("model", {}).get("name") not in _MODELS:
        problems.append(f"model.name must be one of {_MODELS}, got {config.model.get('name')!r}")
    if config.get("data", {}).get("name") not in _DATASETS:
        problems.append(f"data.name must be one of {_DATASETS}, got {config.data.get('name')!r}")
    if config.ensemble.num_members < 1:
        problems.append(f"ensemble.num_members must be >= 1, got {config.ensemble.num_members}")
    for name in ("sam.rho", "asam.rho", "bsam.rho", "bsam.learning_rate", "bsam.damping"):
        section, field = name.split(".")
        if config[section][field] < 0:
            problems.append(f"{name} must be >= 0, got {config[section][field]}")
    if config.bma.num_samples < 1:
        problems.append(f"bma.num_samples must be >= 1, got {config.bma.num_samples}")
    if not 0 <= config.model.dropout_rate < 1:
        problems.append(f"model.dropout_rate must be in [0, 1), got {config.model.dropout_rate}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _load_data(config: ConfigDict) -> tuple[dict[str, data.Dataset], dict[str, data.Dataset]]:
    splits = data.load_digits(
        seed=config.seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
    )
    shifted = data.load_shifted_digits(
        seed=config.seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        kinds=tuple(config.data.shift_kinds),
        severities=tuple(config.data.shift_severities),
    )
    for name, dataset in {**splits, **shifted}.items():
        data.check_dataset(dataset, name)
    if config.train.batch_size > len(splits["train"].labels):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} exceeds the "
            f"{len(splits['train'].labels)} training examples"
        )
    return splits, shifted


def _make_model(config: ConfigDict, num_classes: int):
    if config.model.name == "mlp":
        return models.mlp(
            list(config.model.hidden_sizes),
            num_outputs=num_classes,
            dropout_rate=config.model.dropout_rate,
        )
    if config.model.name == "lenet":
        return models.lenet(num_classes=num_classes, dropout_rate=config.model.dropout_rate)
    return models.resnet20(
        num_classes=num_classes, norm=config.model.norm, dropout_rate=config.model.dropout_rate
    )


def _optimizer(config: ConfigDict, steps: int, transform_factory) -> optax.GradientTransformation:
    if config.train.schedule == "cosine":
        learning_rate = optax.cosine_decay_schedule(config.train.learning_rate, steps)
    else:
        learning_rate = config.train.learning_rate
    base = optax.sgd(learning_rate, momentum=config.train.momentum or None)
    if transform_factory is None:
        return base
    return optax.chain(transform_factory(config), base)


def _evaluate(key, family, state, apply_fn, test, shifted, config, num_samples):
    log_probs, members = bma.posterior_predictive(
        key, family, state, apply_fn, jnp.asarray(test.inputs), num_samples=num_samples
    )
    result = {
        "test": metrics.summary(
            log_probs,
            test.labels,
            num_bins=config.eval.num_bins,
            member_log_probs=members if members.shape[0] > 1 else None,
        )
    }
    shift_results = {}
    for name, dataset in shifted.items():
        shift_log_probs, shift_members = bma.posterior_predictive(
            key, family, state, apply_fn, jnp.asarray(dataset.inputs), num_samples=num_samples
        )
        summary = metrics.summary(shift_log_probs, dataset.labels, num_bins=config.eval.num_bins)
        ood = metrics.ood_metrics(
            log_probs,
            shift_log_probs,
            score=config.eval.ood_score,
            id_member_log_probs=members,
            ood_member_log_probs=shift_members,
        )
        summary.update({f"ood_{k}": float(v) for k, v in ood.items()})
        shift_results[name] = summary
    result["shifted"] = shift_results
    if shift_results:
        keys = next(iter(shift_results.values())).keys()
        result["shift_mean"] = {
            k: float(np.mean([r[k] for r in shift_results.values()])) for k in keys
        }
    result["reliability"] = metrics.reliability_diagram_data(
        log_probs, test.labels, num_bins=config.eval.num_bins
    )
    return result


def _train_method(name, config, splits, shifted, workdir, log) -> dict[str, Any]:
    is_ensemble, transform_factory = METHODS[name]
    train = splits["train"]
    num_train = len(train.labels)
    num_classes = int(train.labels.max()) + 1
    module = _make_model(config, num_classes)
    apply_fn = models.make_apply(module)
    prior_precision = objectives.weight_decay_to_prior_precision(
        config.train.weight_decay, num_train
    )
    steps = config.train.num_epochs * (num_train // config.train.batch_size)
    num_samples = 1
    if name == "bsam":
        # bSAM adds the prior itself (decay prior_precision / N): likelihood-only loss.
        loss_fn = objectives.classification_loss(apply_fn, num_data=num_train)
        learning_rate = config.bsam.learning_rate
        if config.train.schedule == "cosine":
            learning_rate = optax.cosine_decay_schedule(learning_rate, steps)
        optimizer = transforms.bsam(
            learning_rate,
            rho=config.bsam.rho,
            num_data=num_train,
            prior_precision=prior_precision,
            damping=config.bsam.damping,
        )
        family = bsam.build(loss_fn, optimizer, num_data=num_train)
        num_samples = config.bma.num_samples
    else:
        loss_fn = objectives.classification_loss(
            apply_fn, num_data=num_train, prior_precision=prior_precision
        )
        family = point.build(loss_fn, _optimizer(config, steps, transform_factory))
    # Every method starts from the same initialisation and sees the same data order, so a
    # method and its flat version differ only by the transform (a paired comparison).
    init_key, fit_key, eval_key = jax.random.split(jax.random.key(config.seed), 3)
    sample_inputs = jnp.asarray(train.inputs[:2])
    if is_ensemble:
        family = ensemble.build(family, independent_batches=True)
        params, model_state = models.init_ensemble(
            module, init_key, sample_inputs, config.ensemble.num_members
        )
    else:
        params, model_state = models.init(module, init_key, sample_inputs)
    state = family.init(params, model_state)

    begin = time.perf_counter()
    checkpoint_dir = None
    if config.train.checkpoint_every:
        checkpoint_dir = os.path.join(workdir, "checkpoints", name)
    result = training.fit(
        fit_key,
        family,
        state,
        (train.inputs, train.labels),
        num_epochs=config.train.num_epochs,
        batch_size=config.train.batch_size,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.train.checkpoint_every or 1,
        log_fn=lambda record: log({"method": name, **record}),
        description=name,
        member_batches=config.ensemble.num_members if is_ensemble else None,
    )
    jax.block_until_ready(result.state)
    train_seconds = time.perf_counter() - begin
    evaluation = _evaluate(
        eval_key, family, result.state, apply_fn, splits["test"], shifted, config, num_samples
    )
    evaluation["train_seconds"] = train_seconds
    evaluation["wall_seconds"] = time.perf_counter() - begin
    return evaluation


def _markdown_table(summary: dict[str, Any]) -> str:
    header = (
        "| method | acc | NLL | ECE | Brier | shift acc | shift NLL | shift ECE | OOD AUROC "
        "| wall s |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, result in summary.items():
        test, shift = result["test"], result.get("shift_mean", {})
        rows.append(
            f"| {name} | {100 * test['accuracy']:.2f} | {test['nll']:.4f} | {test['ece']:.4f} "
            f"| {test['brier']:.4f} | {100 * shift.get('accuracy', float('nan')):.2f} "
            f"| {shift.get('nll', float('nan')):.4f} | {shift.get('ece', float('nan')):.4f} "
            f"| {shift.get('ood_auroc', float('nan')):.4f} | {result['wall_seconds']:.1f} |"
        )
    return header + "\n".join(rows) + "\n"


def _plot_reliability(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rel = summary[name]["reliability"]
        edges = np.asarray(rel["bin_edges"])
        centres = 0.5 * (edges[1:] + edges[:-1])
        acc = np.nan_to_num(np.asarray(rel["accuracy"], dtype=float))
        ax.bar(centres, acc, width=edges[1] - edges[0], edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ax.set_title(f"{name}\nECE {summary[name]['test']['ece']:.4f}", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every method of ``config.methods`` and writes the outputs to ``workdir``.

    Args:
      config: a configuration shaped like ``experiments/configs/default.py``.
      workdir: output directory (created if missing).

    Returns:
      The summary dict (also written to ``summary.json``).
    """
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    splits, shifted = _load_data(config)

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    with open(metrics_path, "w") as metrics_file:

        def log(record):
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()

        full = {
            name: _train_method(name, config, splits, shifted, workdir, log)
            for name in config.methods
        }

    _plot_reliability(full, os.path.join(workdir, "reliability.png"))
    summary = {
        name: {k: v for k, v in result.items() if k != "reliability"}
        for name, result in full.items()
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _markdown_table(summary)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summary
