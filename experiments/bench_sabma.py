"""Step time of SA-BMA against a plain SGD step of the same model and batch.

For each model, one jitted ``lax.scan`` over ``--steps`` training steps on a fixed batch is
timed (medians of ``--repeats`` warm runs, the runs timed in turn within each repeat so that
load bursts on a shared machine hit all of them; compile time separately) for:

* ``sgd``: the point family with ``optax.sgd`` (one gradient evaluation);
* ``sam``: the point family with ``transforms.sam`` (two gradient evaluations);
* ``low_rank_vi``: the diagonal-plus-low-rank VI family (rank ``--rank``) with plain SGD
  (one reparameterised draw and one gradient evaluation);
* ``sabma``: the same family with ``transforms.sabma`` (paper form, diagonal covariance
  Fisher); ``sabma_exact``: with the conjugate-gradient covariance Fisher (10 iterations);
  ``sabma_released``: the released per-block score form.

Every SA-BMA step evaluates two gradients plus the sampling and the Fisher algebra
(:math:`O(dK^2)`), so the target is at most 2.2x the SGD step.

Beside them, two runs estimate the **floor** of an SA-BMA step on this machine: ``stream``,
one fused pass that reads two arrays of :math:`(K+2)d` floats and writes one (the size of the
variational parameters), and ``draw``, one standard-normal draw of :math:`d` values. However
well the per-parameter algebra is fused, a step reads the variational parameters at least
three times (the clean draw and gradient; the Fisher direction, which needs the clean
gradient's global norm first; the perturbed draw and the update) and writes them once, and
reads and writes the momentum: :math:`6(K+2)d` floats, two ``stream`` passes. So
``floor = sam + 2 * stream + draw`` (the SAM step holds the two network passes; its own
per-parameter work makes the estimate slightly high), reported as ``floor.over_sgd`` and
``sabma.over_floor``. When the floor exceeds 2.2x the SGD step, the 2.2x target cannot be
met with every weight Bayesian, whatever the implementation.

``--trainable=norm_and_head`` measures SA-BMA's transfer setting: only the normalisation
layers and the head are trained (the rest frozen at the prior mean through
:func:`bnn_flat.transfer.with_frozen`), against SGD fine-tuning of the same subset.

Run:
  python -m experiments.bench_sabma --json=runs/bench_sabma.json
  python -m experiments.bench_sabma --models=mlp,lenet,resnet20 --rank=5
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax

from bnn_flat import models, objectives, transfer, transforms
from bnn_flat._random import standard_normal
from bnn_flat.posteriors import low_rank_vi, point
from experiments.bench_transforms import _timed_interleaved

_MODELS = {
    "mlp": (lambda: models.mlp([256, 256], num_outputs=10), (28, 28, 1), 128),
    "lenet": (lambda: models.lenet(num_classes=10), (28, 28, 1), 128),
    "resnet20": (lambda: models.resnet20(num_classes=10, norm="group"), (32, 32, 3), 64),
}
_LEARNING_RATE = 0.01  # 0.05 diverges for the all-weights LeNet VI families on this data


def bench_model(
    name: str,
    steps: int,
    repeats: int,
    rank: int,
    trainable: str = "all",
    runs: tuple[str, ...] | None = None,
    spec=None,
) -> dict[str, float]:
    """Per-step seconds and ratios to the SGD step for one model.

    ``spec=(make, shape, batch_size)`` overrides ``_MODELS[name]``.
    """
    make, shape, batch_size = spec if spec is not None else _MODELS[name]
    module = make()
    apply_fn = models.make_apply(module)
    inputs = jax.random.normal(jax.random.key(0), (batch_size, *shape))
    labels = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
    batch = {"inputs": inputs, "labels": labels}
    params, model_state = models.init(module, jax.random.key(2), inputs[:1])
    num_data = 50_000
    map_loss = objectives.classification_loss(apply_fn, num_data=num_data, prior_precision=25.0)
    likelihood = objectives.classification_loss(apply_fn, num_data=num_data)
    if trainable != "all":
        mask = transfer.select(params, transfer.norm_and_head(head="head|fc|output"))
        params, frozen = transfer.partition(params, mask)
        map_loss = transfer.with_frozen(map_loss, frozen)
        likelihood = transfer.with_frozen(likelihood, frozen)
    sgd = optax.sgd(_LEARNING_RATE, momentum=0.9)

    def vi(optimizer):
        return low_rank_vi.build(
            likelihood, optimizer, num_data=num_data, prior_precision=25.0, rank=rank
        )

    families = {
        "sgd": point.build(map_loss, sgd),
        "sam": point.build(map_loss, optax.chain(transforms.sam(0.05), sgd)),
        "low_rank_vi": vi(sgd),
        "sabma": vi(optax.chain(transforms.sabma(0.5), sgd)),
        "sabma_exact": vi(
            optax.chain(transforms.sabma(0.5, covariance_fisher="exact", damping=1e-2), sgd)
        ),
        "sabma_released": vi(optax.chain(transforms.sabma_released(0.5), sgd)),
    }
    if runs is not None:
        unknown = set(runs) - set(families)
        if unknown or "sgd" not in runs:
            raise ValueError(f"runs must include 'sgd' and name only {sorted(families)}: {runs}")
        families = {run: family for run, family in families.items() if run in runs}
    tag = name if trainable == "all" else f"{name}_{trainable}"
    result = {f"{tag}.trainable_parameters": float(models.num_params(params))}
    runs = {}
    for run_name, family in families.items():

        def run(state, key, family=family):
            def body(state, k):
                return family.update(k, state, batch)[0], None

            return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

        runs[run_name] = (run, (family.init(params, model_state), jax.random.key(3)))
    floor_runs = "sam" in families and "sabma" in families
    if floor_runs:
        runs.update(_floor_runs(params, rank, steps))
    for run_name, (seconds, compile_seconds) in _timed_interleaved(runs, repeats).items():
        result[f"{tag}.{run_name}.step_seconds"] = seconds / steps
        result[f"{tag}.{run_name}.compile_seconds"] = compile_seconds
    base = result[f"{tag}.sgd.step_seconds"]
    for run_name in families:
        result[f"{tag}.{run_name}.over_sgd"] = result[f"{tag}.{run_name}.step_seconds"] / base
    if floor_runs:
        floor = (
            result[f"{tag}.sam.step_seconds"]
            + 2.0 * result[f"{tag}.stream.step_seconds"]
            + result[f"{tag}.draw.step_seconds"]
        )
        result[f"{tag}.floor.step_seconds"] = floor
        result[f"{tag}.floor.over_sgd"] = floor / base
        result[f"{tag}.sabma.over_floor"] = result[f"{tag}.sabma.step_seconds"] / floor
    return result


def _floor_runs(params, rank: int, steps: int) -> dict:
    """``stream`` (one fused pass over (K+2)d floats) and ``draw`` (d normals), per step."""
    size = models.num_params(params)
    values = jnp.full(((rank + 2) * size,), 0.5, jnp.float32)

    def stream(carry, other):
        def body(carry, _):
            return carry * 0.5 + other, None

        return jax.lax.scan(body, carry, None, length=steps)[0]

    def draw(key):
        def body(total, k):
            return total + jnp.sum(standard_normal(k, (size,), jnp.float32)), None

        return jax.lax.scan(body, jnp.zeros(()), jax.random.split(key, steps))[0]

    return {
        "stream": (stream, (values, values + 1.0)),
        "draw": (draw, (jax.random.key(4),)),
    }


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="SA-BMA step time / SGD step time.")
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=5)
    parser.add_argument("--trainable", choices=("all", "norm_and_head"), default="all")
    parser.add_argument(
        "--runs", default=None, help="comma-separated subset of the runs (must include sgd)"
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result = {"device": jax.devices()[0].device_kind, "rank": args.rank}
    for name in args.models.split(","):
        if name not in _MODELS:
            raise SystemExit(f"unknown model {name!r}; choose from {sorted(_MODELS)}")
        runs = tuple(args.runs.split(",")) if args.runs else None
        figures = bench_model(name, args.steps, args.repeats, args.rank, args.trainable, runs)
        result.update(figures)
        for key, value in figures.items():
            if key.endswith(("over_sgd", "over_floor")):
                print(f"{key:40s} {value:6.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
