r"""Symmetry-aware comparison of approximate posteriors with a deep ensemble (CPU scale).

Laurent et al. (ICLR 2024) compare popular posterior approximations with a large set of
independently trained networks, in weight space (MMD, before and after removing the
symmetries) and in function space (accuracy, calibration, OOD detection, mutual
information). This runner does the same on the embedded digits with an MLP:

* **reference**: a deep ensemble of ``reference.num_members`` independently initialised MAP
  networks (each with its own data order), trained in one vmapped program;
* **families**: SWAG, MC dropout, mean-field VI, diagonal Laplace (GGN, all weights, at a
  MAP) and SGHMC, each trained as an ensemble of ``num_modes`` independent modes (distinct
  seeds from the reference). The **one-mode** version draws all ``num_samples`` samples from
  mode 0; the **multi-mode** version draws ``num_samples / num_modes`` from every mode.
  SGHMC takes the latest samples of its bank (no duplicates); MC dropout's weight samples
  are the trained weights with Bernoulli unit masks (shared over inputs, Gal's
  interpretation) while its predictions use the usual per-input masks.

Weight-space distances (:func:`bnn_flat.symmetry.mmd`, Gaussian and Laplace kernels with
10 MMDAgg bandwidths each, unbiased MMD², aggregated by ``mmd.aggregate``, the maximum by
default) are reported

* **MMD**: between the samples and the ensemble as they are;
* **NS** ("no symmetry"): after :func:`~bnn_flat.symmetry.canonicalize_scaling` (min-mass)
  and :func:`~bnn_flat.symmetry.canonicalize_permutation` of every network.

The ensemble's row holds the MMD between its two halves, the noise floor of the estimator
at this sample size. Function-space metrics: accuracy, NLL, ECE, Brier on the test set; OOD
AUPR and FPR95 (max-probability score, OOD positive) averaged over the shifted test sets
(``data.ood_kinds`` at ``data.ood_severity``); mean mutual information on the test set (ID MI)
and on the shifted sets (OOD MI), in nats x 1000 in the table.

Run::

  python -m experiments.main --config=experiments/configs/posterior_comparison_digits.py \\
      --workdir=runs/posterior_comparison_digits

Writes ``config.json``, ``summary.json`` (per seed and mean/std) and ``results.md``.
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
from jax.flatten_util import ravel_pytree
from ml_collections import ConfigDict

from bnn_flat import bma, data, metrics, models, objectives, symmetry, training
from bnn_flat.posteriors import ensemble, laplace, mc_dropout, mean_field_vi, point, sgmcmc, swag
from bnn_flat.types import Params, PRNGKey

__all__ = ["FAMILIES", "METRICS", "dropout_weight_samples", "run"]

FAMILIES = ("swag", "mc_dropout", "mfvi", "laplace", "sghmc")
METRICS = (
    "mmd",
    "ns",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "aupr",
    "fpr95",
    "id_mi",
    "ood_mi",
)


def dropout_weight_samples(key: PRNGKey, params: Params, rate: float, num_samples: int) -> Params:
    """Weight samples of MC dropout: hidden units masked in the next layer's kernel.

    For an MLP with dropout after every hidden activation, dropping unit ``j`` of hidden
    layer ``l`` (with inverted scaling ``1 / (1 - rate)``) equals multiplying row ``j`` of the
    next layer's kernel by ``z_j / (1 - rate)``, ``z_j ~ Bernoulli(1 - rate)``. Masks are drawn
    once per sample (shared by all inputs), as in Gal and Ghahramani's variational
    interpretation.

    Args:
      key: PRNG key.
      params: One MLP (``hidden_0, ..., output``).
      rate: Dropout rate in ``[0, 1)``.
      num_samples: Number of samples.

    Returns:
      Stacked parameter samples (leading axis ``num_samples``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"hidden_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
      ...           "output": {"kernel": jnp.ones((3, 1)), "bias": jnp.zeros(1)}}
      >>> samples = dropout_weight_samples(jax.random.key(0), params, 0.5, 4)
      >>> sorted(set(samples["output"]["kernel"].ravel().tolist())) in ([0.0, 2.0], [2.0])
      True
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"rate must be in [0, 1), got {rate}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    hidden = sorted((name for name in params if name.startswith("hidden_")), key=_layer_index)
    layers = [*hidden, "output"]

    def one(sample_key: PRNGKey) -> Params:
        sample = {name: dict(params[name]) for name in layers}
        for index, name in enumerate(hidden):
            following = layers[index + 1]
            units = params[name]["kernel"].shape[-1]
            keep = jax.random.bernoulli(jax.random.fold_in(sample_key, index), 1.0 - rate, (units,))
            factor = keep.astype(params[following]["kernel"].dtype) / (1.0 - rate)
            sample[following]["kernel"] = params[following]["kernel"] * factor[:, None]
        return sample

    return jax.vmap(one)(jax.random.split(key, num_samples))


def _layer_index(name: str) -> int:
    return int(name.split("_")[1])


# Configuration --------------------------------------------------------------------------------


def _flat_keys(config: Any, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ConfigDict):
            keys |= _flat_keys(value, path + ".")
        else:
            keys.add(path)
    return keys


def _validate(config: ConfigDict) -> None:
    from experiments.configs import posterior_comparison_digits as defaults

    unknown = sorted(_flat_keys(config) - _flat_keys(defaults.get_config()))
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    bad = [name for name in config.families if name not in FAMILIES]
    if bad:
        raise ValueError(f"unknown families {bad}; known: {FAMILIES}")
    if not config.seeds:
        raise ValueError("config.seeds is empty")
    if config.reference.num_members < 4:
        raise ValueError(
            f"reference.num_members must be at least 4 (two halves of 2 for the MMD noise "
            f"floor), got {config.reference.num_members}"
        )
    if config.num_modes < 1 or config.num_samples < 2 * config.num_modes:
        raise ValueError(
            f"need num_modes >= 1 and num_samples >= 2 * num_modes, got num_samples="
            f"{config.num_samples}, num_modes={config.num_modes}"
        )
    if config.num_samples % config.num_modes:
        raise ValueError(
            f"num_samples ({config.num_samples}) must be a multiple of num_modes "
            f"({config.num_modes})"
        )
    if config.mmd.scaling not in ("min_mass", "none"):
        raise ValueError(f"mmd.scaling must be 'min_mass' or 'none', got {config.mmd.scaling!r}")
    if config.mmd.aggregate not in ("max", "mean"):
        raise ValueError(f"mmd.aggregate must be 'max' or 'mean', got {config.mmd.aggregate!r}")
    if config.train.learning_rate <= 0 or config.train.num_epochs < 1:
        raise ValueError("train.learning_rate and train.num_epochs must be positive")
    if config.laplace.tune_prior not in ("val_nll", "marglik", "none"):
        raise ValueError(
            f"laplace.tune_prior must be 'val_nll', 'marglik' or 'none', got "
            f"{config.laplace.tune_prior!r}"
        )
    if not 0.0 < config.mc_dropout.rate < 1.0:
        raise ValueError(f"mc_dropout.rate must be in (0, 1), got {config.mc_dropout.rate}")


# Data and training ----------------------------------------------------------------------------


def _load(config: ConfigDict, seed: int):
    splits = data.load_digits(
        seed=seed, val_fraction=config.data.val_fraction, test_fraction=config.data.test_fraction
    )
    shifted = data.load_shifted_digits(
        seed=seed,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        kinds=tuple(config.data.ood_kinds),
        severities=(config.data.ood_severity,),
    )
    if config.train.batch_size > len(splits["train"].labels):
        raise ValueError(
            f"train.batch_size={config.train.batch_size} exceeds the "
            f"{len(splits['train'].labels)} training examples"
        )
    return splits, shifted


class _Setup:
    """Models, losses and optimizers shared by every family of one run."""

    def __init__(self, config: ConfigDict, num_train: int, num_classes: int):
        self.config = config
        self.num_train = num_train
        hidden = list(config.model.hidden_sizes)
        self.module = models.mlp(hidden, num_outputs=num_classes)
        self.dropout_module = models.mlp(
            hidden, num_outputs=num_classes, dropout_rate=config.mc_dropout.rate
        )
        self.apply_fn = models.make_apply(self.module)
        self.dropout_apply_fn = models.make_apply(self.dropout_module)
        self.prior_precision = objectives.weight_decay_to_prior_precision(
            config.train.weight_decay, num_train
        )
        self.steps_per_epoch = num_train // config.train.batch_size
        self.total_steps = config.train.num_epochs * self.steps_per_epoch

    def loss(self, apply_fn, prior: bool = True):
        return objectives.classification_loss(
            apply_fn,
            num_data=self.num_train,
            prior_precision=self.prior_precision if prior else 0.0,
        )

    def sgd(self) -> optax.GradientTransformation:
        schedule = optax.cosine_decay_schedule(self.config.train.learning_rate, self.total_steps)
        return optax.sgd(schedule, momentum=self.config.train.momentum)


def _fit(key, family, module, setup: _Setup, train, num_members: int):
    init_key, fit_key = jax.random.split(key)
    params, model_state = models.init_ensemble(
        module, init_key, jnp.asarray(train.inputs[:2]), num_members
    )
    wrapped = ensemble.build(family, independent_batches=True)
    return training.fit(
        fit_key,
        wrapped,
        wrapped.init(params, model_state),
        (train.inputs, train.labels),
        num_epochs=setup.config.train.num_epochs,
        batch_size=setup.config.train.batch_size,
        member_batches=num_members,
        progress=False,
    ).state


def _member(state: ensemble.EnsembleState, index: int) -> Any:
    return jax.tree.map(lambda leaf: leaf[index], state.members)


def _per_mode(function, num_modes: int) -> Any:
    """``function(mode)`` for every mode, concatenated along the sample axis."""
    parts = [function(mode) for mode in range(num_modes)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def _family_samples(key, name: str, setup: _Setup, splits) -> dict[str, dict[str, Any]]:
    """Trains one family (``num_modes`` modes); returns one- and multi-mode sample sets.

    Each set is ``{"weights": stacked params, "predict": (predict_fn, predict_samples)}``.
    """
    config = setup.config
    train = splits["train"]
    modes = config.num_modes
    total = config.num_samples
    per_mode = total // modes
    train_key, sample_key = jax.random.split(key)
    weight_predict = bma.model_predict_fn(setup.apply_fn, {})

    def weights_only(one: Params, multi: Params) -> dict[str, dict[str, Any]]:
        return {
            "one_mode": {"weights": one, "predict": (weight_predict, one)},
            "multi_mode": {"weights": multi, "predict": (weight_predict, multi)},
        }

    if name == "swag":
        constant = optax.sgd(config.swag.learning_rate, momentum=config.train.momentum)
        family = swag.build(
            setup.loss(setup.apply_fn),
            constant,
            start_step=int(config.swag.start_fraction * setup.total_steps),
            collect_every=setup.steps_per_epoch,
            rank=config.swag.rank,
            scale=config.swag.scale,
        )
        state = _fit(train_key, family, setup.module, setup, train, modes)
        keys = jax.random.split(sample_key, modes)
        one = family.sample(keys[0], _member(state, 0), total)
        multi = _per_mode(lambda m: family.sample(keys[m], _member(state, m), per_mode), modes)
        return weights_only(one, multi)

    if name == "mfvi":
        family = mean_field_vi.build(
            setup.loss(setup.apply_fn, prior=False),
            setup.sgd(),
            num_data=setup.num_train,
            prior_precision=setup.prior_precision,
            temperature=config.vi.temperature,
            init_std=config.vi.init_std,
        )
        state = _fit(train_key, family, setup.module, setup, train, modes)
        keys = jax.random.split(sample_key, modes)
        one = family.sample(keys[0], _member(state, 0), total)
        multi = _per_mode(lambda m: family.sample(keys[m], _member(state, m), per_mode), modes)
        return weights_only(one, multi)

    if name == "sghmc":
        burn_in = int(config.sghmc.burn_in_fraction * setup.total_steps)
        family = sgmcmc.sghmc(
            setup.loss(setup.apply_fn),
            learning_rate=config.sghmc.learning_rate,
            num_data=setup.num_train,
            friction=config.sghmc.friction,
            temperature=config.sghmc.temperature,
            num_samples_max=total,
            burn_in=burn_in,
            thin=max(1, (setup.total_steps - burn_in) // total),
        )
        state = _fit(train_key, family, setup.module, setup, train, modes)
        one = sgmcmc.collected(_member(state, 0))
        if jax.tree.leaves(one)[0].shape[0] < total:
            raise ValueError("SGHMC collected fewer samples than num_samples; lower thin")
        one = jax.tree.map(lambda leaf: leaf[-total:], one)
        multi = _per_mode(
            lambda m: jax.tree.map(
                lambda leaf: leaf[-per_mode:], sgmcmc.collected(_member(state, m))
            ),
            modes,
        )
        return weights_only(one, multi)

    if name == "laplace":
        map_state = _fit(
            train_key,
            point.build(setup.loss(setup.apply_fn), setup.sgd()),
            setup.module,
            setup,
            train,
            modes,
        )
        family = laplace.build(
            setup.apply_fn,
            num_data=setup.num_train,
            prior_precision=setup.prior_precision,
            subset="all",
            covariance="diag",
        )
        inputs, labels = jnp.asarray(train.inputs), jnp.asarray(train.labels)

        def fit_one(params: Params) -> laplace.LaplaceState:
            state = laplace.fit(
                sample_key,
                family.init(params, {}),
                setup.apply_fn,
                inputs,
                labels,
                batch_size=128,
            )
            if config.laplace.tune_prior == "marglik":
                state = laplace.tune_prior_precision(state)
            elif config.laplace.tune_prior == "val_nll":
                state = _tune_by_sampled_nll(sample_key, family, state, setup, splits["val"])
            return state

        states = [fit_one(_member(map_state, m).params) for m in range(modes)]
        keys = jax.random.split(sample_key, modes)
        one = family.sample(keys[0], states[0], total)
        multi = _per_mode(lambda m: family.sample(keys[m], states[m], per_mode), modes)
        samples = weights_only(one, multi)
        samples["prior_precision"] = [float(state.prior_precision) for state in states]
        return samples

    if name == "mc_dropout":
        family = mc_dropout.build(setup.loss(setup.dropout_apply_fn), setup.sgd())
        state = _fit(train_key, family, setup.dropout_module, setup, train, modes)
        rate = config.mc_dropout.rate
        mask_key, predict_key = jax.random.split(sample_key)
        mask_keys = jax.random.split(mask_key, modes)
        params = state.params
        one_params = _member(state, 0).params
        one = dropout_weight_samples(mask_keys[0], one_params, rate, total)
        multi = _per_mode(
            lambda m: dropout_weight_samples(
                mask_keys[m], _member(state, m).params, rate, per_mode
            ),
            modes,
        )

        def dropout_predict(sample, inputs):
            member_params, dropout_key = sample
            return setup.dropout_apply_fn(member_params, {}, inputs, train=True, key=dropout_key)[0]

        one_predict = (
            jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (total, *leaf.shape)), one_params),
            jax.random.split(predict_key, total),
        )
        multi_predict = (
            jax.tree.map(lambda leaf: jnp.repeat(leaf, per_mode, axis=0), params),
            jax.random.split(jax.random.fold_in(predict_key, 1), total),
        )
        return {
            "one_mode": {"weights": one, "predict": (dropout_predict, one_predict)},
            "multi_mode": {"weights": multi, "predict": (dropout_predict, multi_predict)},
        }

    raise ValueError(f"unknown family {name!r}; known: {FAMILIES}")


def _tune_by_sampled_nll(key, family, state, setup: _Setup, validation) -> Any:
    """The prior precision of ``laplace.grid`` whose *sampled* BMA has the lowest val NLL.

    The weight-space samples (not the GLM predictive) are what the MMD compares, so the
    prior is chosen for them. The grid is evaluated in one vmapped program.
    """
    grid = jnp.asarray(setup.config.laplace.grid, jnp.float32)
    inputs = jnp.asarray(validation.inputs)
    labels = jnp.asarray(validation.labels)
    predict_fn = bma.model_predict_fn(setup.apply_fn, {})
    num_samples = setup.config.num_samples

    def nll(precision: jax.Array) -> jax.Array:
        samples = family.sample(key, state._replace(prior_precision=precision), num_samples)
        log_probs = bma.predict(predict_fn, samples, inputs, strategy="map")
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=1))

    scores = jax.jit(jax.vmap(nll))(grid)
    return state._replace(prior_precision=grid[jnp.argmin(scores)])


# Evaluation -----------------------------------------------------------------------------------


def _flatten(samples: Params) -> jax.Array:
    return jax.vmap(lambda sample: ravel_pytree(sample)[0])(samples)


def _canonical(samples: Params, config: ConfigDict) -> jax.Array:
    def one(params: Params) -> Params:
        if config.mmd.scaling == "min_mass":
            params = symmetry.canonicalize_scaling(params, architecture="mlp", method="min_mass")
        return symmetry.canonicalize_permutation(
            params, architecture="mlp", key=config.mmd.permutation_key
        )[0]

    return _flatten(jax.vmap(one)(samples))


def _mmd(x: jax.Array, y: jax.Array, aggregate: str) -> float:
    return float(symmetry.mmd(x, y)[aggregate])


def _function_metrics(predict, splits, shifted, num_bins: int) -> dict[str, float]:
    predict_fn, samples = predict
    test = splits["test"]
    log_probs, members = bma.predict(
        predict_fn, samples, jnp.asarray(test.inputs), return_members=True
    )
    result = {
        "accuracy": float(metrics.accuracy(log_probs, test.labels)),
        "nll": float(metrics.nll(log_probs, test.labels)),
        "ece": float(metrics.ece(log_probs, test.labels, num_bins=num_bins)),
        "brier": float(metrics.brier(log_probs, test.labels)),
        "id_mi": float(jnp.mean(metrics.mutual_information(members))),
    }
    auprs, fprs, ood_mis = [], [], []
    for dataset in shifted.values():
        ood_log_probs, ood_members = bma.predict(
            predict_fn, samples, jnp.asarray(dataset.inputs), return_members=True
        )
        detection = metrics.ood_metrics(log_probs, ood_log_probs)
        auprs.append(float(detection["aupr"]))
        fprs.append(float(detection["fpr95"]))
        ood_mis.append(float(jnp.mean(metrics.mutual_information(ood_members))))
    result["aupr"] = float(np.mean(auprs))
    result["fpr95"] = float(np.mean(fprs))
    result["ood_mi"] = float(np.mean(ood_mis))
    return result


def _run_seed(config: ConfigDict, seed: int) -> dict[str, dict[str, float]]:
    splits, shifted = _load(config, seed)
    train = splits["train"]
    num_classes = int(max(train.labels.max(), splits["test"].labels.max())) + 1
    setup = _Setup(config, len(train.labels), num_classes)
    aggregate = config.mmd.aggregate
    key = jax.random.key(seed)
    reference_key, *family_keys = jax.random.split(key, 1 + len(FAMILIES))

    begin = time.perf_counter()
    reference_state = _fit(
        reference_key,
        point.build(setup.loss(setup.apply_fn), setup.sgd()),
        setup.module,
        setup,
        train,
        config.reference.num_members,
    )
    reference = reference_state.params
    reference_raw = _flatten(reference)
    reference_canonical = _canonical(reference, config)
    half = config.reference.num_members // 2
    rows: dict[str, dict[str, float]] = {}
    row = _function_metrics(
        (bma.model_predict_fn(setup.apply_fn, {}), reference), splits, shifted, config.num_bins
    )
    row["mmd"] = _mmd(reference_raw[:half], reference_raw[half:], aggregate)
    row["ns"] = _mmd(reference_canonical[:half], reference_canonical[half:], aggregate)
    row["seconds"] = time.perf_counter() - begin
    rows["deep_ensemble"] = row
    print(_format_row("deep_ensemble", row), flush=True)

    for name in config.families:
        begin = time.perf_counter()
        sets = _family_samples(family_keys[FAMILIES.index(name)], name, setup, splits)
        train_seconds = time.perf_counter() - begin
        for mode in ("one_mode", "multi_mode"):
            begin = time.perf_counter()
            sample_set = sets[mode]
            row = _function_metrics(sample_set["predict"], splits, shifted, config.num_bins)
            row["mmd"] = _mmd(reference_raw, _flatten(sample_set["weights"]), aggregate)
            row["ns"] = _mmd(
                reference_canonical, _canonical(sample_set["weights"], config), aggregate
            )
            row["seconds"] = (
                time.perf_counter() - begin + (train_seconds if mode == "one_mode" else 0)
            )
            rows[f"{name}/{mode}"] = row
            print(_format_row(f"{name}/{mode}", row), flush=True)
    return rows


def _format_row(name: str, row: dict[str, float]) -> str:
    return f"{name:22s} " + " ".join(f"{k}={row[k]:.4f}" for k in METRICS)


def run(config: ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs every seed, writes ``summary.json`` and ``results.md``; returns the summary."""
    _validate(config)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json(indent=2))
    begin = time.perf_counter()
    per_seed = {int(seed): _run_seed(config, int(seed)) for seed in config.seeds}
    names = list(next(iter(per_seed.values())))
    summary: dict[str, Any] = {"rows": {}, "seeds": list(per_seed)}
    for name in names:
        runs = [per_seed[seed][name] for seed in per_seed]
        summary["rows"][name] = {
            "runs": runs,
            "mean": {k: float(np.mean([r[k] for r in runs])) for k in runs[0]},
            "std": {k: float(np.std([r[k] for r in runs])) for k in runs[0]},
        }
    summary["wall_seconds"] = time.perf_counter() - begin
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    table = _table(summary, config)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summary


def _table(summary: dict[str, Any], config: ConfigDict) -> str:
    num_seeds = len(summary["seeds"])
    lines = [
        f"Mean over {num_seeds} seed(s){' (± std)' if num_seeds > 1 else ''}. MMD/NS: unbiased "
        f"MMD² to the {config.reference.num_members}-member deep ensemble ({config.mmd.aggregate} "
        "over 2 kernels x 10 bandwidths) before/after removing scaling and permutation "
        "symmetries; the deep-ensemble row is the MMD between its two halves. MI in nats x "
        "1000. ECE, Brier, NLL on the clean test set; AUPR/FPR95 with the shifted sets as OOD.",
        "",
        "| method | modes | MMD | NS | acc % | NLL | ECE | Brier | AUPR | FPR95 | ID MI | OOD MI |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scales = {"accuracy": 100.0, "id_mi": 1000.0, "ood_mi": 1000.0}
    digits = {"accuracy": 2, "id_mi": 2, "ood_mi": 2}
    for name, result in summary["rows"].items():
        family, _, mode = name.partition("/")
        mode = {"one_mode": "one", "multi_mode": "multi", "": "multi"}[mode]
        cells = []
        for metric in METRICS:
            scale, places = scales.get(metric, 1.0), digits.get(metric, 4)
            value = f"{scale * result['mean'][metric]:.{places}f}"
            if num_seeds > 1:
                value += f" ± {scale * result['std'][metric]:.{places}f}"
            cells.append(value)
        lines.append(f"| {family} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
