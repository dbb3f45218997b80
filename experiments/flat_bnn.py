"""The flat-seeking BNN table (Nguyen et al., NeurIPS 2023) at CPU scale.

For every family of ``config.families`` (SWAG, SWAG-Diag, MC dropout, deep ensemble, SGLD,
mean-field VI), trains the baseline and its flat version (the same family with
``transforms.sam`` in its optimizer chain; for VI, SAM on the mean, i.e. at the sampled
weights) for every seed, and reports the BMA accuracy, NLL, ECE, Brier and OOD AUROC on
shifted data, and the one-step SAM sharpness of posterior samples (mean and spread over
samples) on the training loss. The flat-seeking claim is that flat versions have lower
sharpness and no worse NLL/ECE.

``run(config, workdir)`` writes ``summary.json`` (per family, version and seed) and
``results.md`` (means ± standard deviations over seeds). See
``experiments/configs/flat_bnn_digits.py`` for the command.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from bnn_flat import bma, data, metrics, models, objectives, sharpness, training, transforms
from bnn_flat.posteriors import ensemble, mc_dropout, mean_field_vi, point, sgmcmc, swag
from experiments import train as main_job

__all__ = ["FAMILIES", "run"]

FAMILIES = ("swag", "swag_diag", "mc_dropout", "deep_ensemble", "sgld", "mfvi")
_METRICS = ("accuracy", "nll", "ece", "brier", "shift_nll", "ood_auroc", "sharpness")


def _build(family_name: str, flat: bool, config: ConfigDict, apply_fn, num_train: int):
    """Returns ``(family, num_bma_samples, needs_member_batches, kind)``."""
    steps_per_epoch = num_train // config.train.batch_size
    total_steps = config.train.num_epochs * steps_per_epoch
    prior_precision = objectives.weight_decay_to_prior_precision(
        config.train.weight_decay, num_train
    )
    loss_fn = objectives.classification_loss(
        apply_fn, num_data=num_train, prior_precision=prior_precision
    )
    sgd = optax.sgd(
        optax.cosine_decay_schedule(config.train.learning_rate, total_steps),
        momentum=config.train.momentum,
    )
    sam = transforms.sam(config.sam.rho)
    chain = optax.chain(sam, sgd) if flat else sgd
    num_samples = config.bma.num_samples
    if family_name in ("swag", "swag_diag"):
        constant = optax.sgd(config.swag.learning_rate, momentum=config.train.momentum)
        family = swag.build(
            loss_fn,
            optax.chain(sam, constant) if flat else constant,
            start_step=int(config.swag.start_fraction * total_steps),
            collect_every=steps_per_epoch,
            rank=config.swag.rank,
            scale=config.swag.scale if family_name == "swag" else config.swag.diag_scale,
            diagonal_only=family_name == "swag_diag",
        )
        return family, num_samples, None, "params"
    if family_name == "mc_dropout":
        return mc_dropout.build(loss_fn, chain), num_samples, None, "dropout"
    if family_name == "deep_ensemble":
        members = config.ensemble.num_members
        family = ensemble.build(point.build(loss_fn, chain), independent_batches=True)
        return family, 1, members, "ensemble"
    if family_name == "sgld":
        family = sgmcmc.sgld(
            loss_fn,
            learning_rate=config.sgld.learning_rate,
            num_data=num_train,
            temperature=config.sgld.temperature,
            num_samples_max=num_samples,
            burn_in=int(config.sgld.burn_in_fraction * total_steps),
            thin=max(1, int((1 - config.sgld.burn_in_fraction) * total_steps) // num_samples),
            perturbation=sam if flat else None,
        )
        return family, num_samples, None, "params"
    if family_name == "mfvi":
        likelihood_only = objectives.classification_loss(apply_fn, num_data=num_train)
        optimizer = optax.chain(mean_field_vi.mean_only(sam), sgd) if flat else sgd
        family = mean_field_vi.build(
            likelihood_only,
            optimizer,
            num_data=num_train,
            prior_precision=prior_precision,
            temperature=config.vi.temperature,
            init_std=config.vi.init_std,
        )
        return family, num_samples, None, "params"
    raise ValueError(f"unknown family {family_name!r}; known: {FAMILIES}")


def _run_one(family_name, flat, seed, config, splits, shifted) -> dict[str, float]:
    train = splits["train"]
    num_train = len(train.labels)
    dropout = config.mc_dropout.rate if family_name == "mc_dropout" else 0.0
    num_classes = int(max(train.labels.max(), splits["test"].labels.max())) + 1
    module = _make_model(config, num_classes, dropout)
    apply_fn = models.make_apply(module)
    family, num_samples, member_batches, kind = _build(
        family_name, flat, config, apply_fn, num_train
    )
    init_key, fit_key, sample_key, sharp_key = jax.random.split(jax.random.key(seed), 4)
    sample_inputs = jnp.asarray(train.inputs[:2])
    if kind == "ensemble":
        params, model_state = models.init_ensemble(module, init_key, sample_inputs, member_batches)
    else:
        params, model_state = models.init(module, init_key, sample_inputs)
    begin = time.perf_counter()
    state = training.fit(
        fit_key,
        family,
        family.init(params, model_state),
        (train.inputs, train.labels),
        num_epochs=config.train.num_epochs,
        batch_size=config.train.batch_size,
        member_batches=member_batches,
        progress=False,
    ).state

    if kind == "dropout":
        samples = family.sample(sample_key, state, num_samples)
        predict_fn = mc_dropout.predict_fn(apply_fn, state)
        # The weights are not random: measure the sharpness of the trained weights.
        sharp_samples = jax.tree.map(lambda x: x[None], state.params)
    else:
        samples = family.sample(sample_key, state, num_samples)
        predict_fn = bma.model_predict_fn(apply_fn, {})
        sharp_samples = samples

    def evaluate(inputs):
        return bma.predict(predict_fn, samples, jnp.asarray(inputs), return_members=True)

    log_probs, members = evaluate(splits["test"].inputs)
    result = {
        "accuracy": float(metrics.accuracy(log_probs, splits["test"].labels)),
        "nll": float(metrics.nll(log_probs, splits["test"].labels)),
        "ece": float(metrics.ece(log_probs, splits["test"].labels)),
        "brier": float(metrics.brier(log_probs, splits["test"].labels)),
    }
    shift_nll, aurocs = [], []
    for dataset in shifted.values():
        shift_log_probs, _ = evaluate(dataset.inputs)
        shift_nll.append(float(metrics.nll(shift_log_probs, dataset.labels)))
        aurocs.append(float(metrics.ood_metrics(log_probs, shift_log_probs)["auroc"]))
    result["shift_nll"] = float(np.mean(shift_nll)) if shift_nll else float("nan")
    result["ood_auroc"] = float(np.mean(aurocs)) if aurocs else float("nan")
    size = min(len(train.labels), config.get("sharpness_examples", 2000))
    loss = sharpness.make_loss_for_hessian(
        apply_fn, {}, train.inputs[:size], train.labels[:size], batch_size=min(size, 500)
    )
    sharp = sharpness.posterior_sharpness(sharp_key, loss, sharp_samples, config.sam.rho)
    result["sharpness"] = float(sharp.mean)
    result["sharpness_std"] = float(sharp.std)
    result["seconds"] = time.perf_counter() - begin
    return result


def _make_model(config: ConfigDict, num_classes: int, dropout_rate: float):
    name = config.model.get("name", "mlp")
    if name == "mlp":
        return models.mlp(
            list(config.model.hidden_sizes), num_outputs=num_classes, dropout_rate=dropout_rate
        )
    if name == "resnet20":
        if config.model.norm == "batch":
            raise ValueError(
                "flat_bnn supports normalisations without running statistics (group, layer, "
                "none): every family then shares one model state; got norm='batch'."
            )
        return models.resnet20(
            num_classes=num_classes, norm=config.model.norm, dropout_rate=dropout_rate
        )
    raise ValueError(f"model.name must be 'mlp' or 'resnet20', got {name!r}.")


def _load_splits(config: ConfigDict):
    """Embedded digits (with procedural shifts) or a prepared TFDS dataset."""
    if config.data.name == "digits":
        loader_config = ConfigDict(
            {"seed": config.data_seed, "data": config.data, "train": config.train}
        )
        return main_job._load_data(loader_config)
    full = data.load_tfds(config.data.name, split="train", data_dir=config.data.data_dir)
    rng = np.random.default_rng(config.data_seed)
    order = rng.permutation(len(full.labels))
    num_val = int(round(config.data.val_fraction * len(order)))
    splits = {
        "train": data.Dataset(full.inputs[order[num_val:]], full.labels[order[num_val:]]),
        "val": data.Dataset(full.inputs[order[:num_val]], full.labels[order[:num_val]]),
        "test": data.load_tfds(config.data.name, split="test", data_dir=config.data.data_dir),
    }
    shifted = {
        corruption: data.load_tfds(corruption, split="test", data_dir=config.data.data_dir)
        for corruption in config.data.get("corruptions", ())
    }
    for name, dataset in {**splits, **shifted}.items():
        data.check_dataset(dataset, name)
    return splits, shifted


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains every (family, version, seed) and writes the summary and the table."""
    unknown = [f for f in config.families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; known: {FAMILIES}")
    if not config.seeds:
        raise ValueError("config.seeds is empty.")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    splits, shifted = _load_splits(config)
    summary: dict[str, Any] = {}
    for family_name in config.families:
        for flat in (False, True):
            name = ("f_" if flat else "") + family_name
            runs = [
                _run_one(family_name, flat, seed, config, splits, shifted) for seed in config.seeds
            ]
            summary[name] = {
                "runs": runs,
                "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
                "std": {k: float(np.std([r[k] for r in runs])) for k in runs[0]},
            }
            row = summary[name]["mean"]
            print(f"{name:18s} " + " ".join(f"{k}={row[k]:.4f}" for k in _METRICS), flush=True)
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _table(summary, len(config.seeds))
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summary


def _table(summary: dict[str, Any], num_seeds: int) -> str:
    lines = [
        f"mean ± std over {num_seeds} seed(s); sharpness = one-step SAM sharpness of posterior "
        "samples on the training loss (mean over samples).",
        "",
        "| method | acc % | NLL | ECE | Brier | shift NLL | OOD AUROC | sharpness |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in summary.items():
        mean, std = result["mean"], result["std"]
        cells = [f"{100 * mean['accuracy']:.2f} ± {100 * std['accuracy']:.2f}"]
        cells += [f"{mean[k]:.4f} ± {std[k]:.4f}" for k in _METRICS[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
