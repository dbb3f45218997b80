"""BMA cost per posterior family: drawing S samples and averaging, against S forward passes.

For each family the timed program draws ``S`` samples inside jit and computes the BMA
log-predictive on a batch (``strategy="auto"``); the reference ("ideal") is ``S`` calls of
a jitted single forward pass on fixed parameters. Medians of warm runs, side by side in one
process. The states are freshly initialised (sampling cost does not depend on training).

Run:
  python -m experiments.bench_families --models=mlp,lenet --num_samples=30 [--json=OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from bnn_flat import bma, models, objectives
from bnn_flat.posteriors import laplace, mc_dropout, mean_field_vi, point, sgmcmc, swag

_MODELS = {
    "mlp": (lambda rate: models.mlp([256, 256], num_outputs=10, dropout_rate=rate), (28, 28, 1)),
    "lenet": (lambda rate: models.lenet(num_classes=10, dropout_rate=rate), (28, 28, 1)),
}


def _median(fn, repeats):
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def bench_model(name: str, num_samples: int, batch_size: int, repeats: int) -> dict[str, float]:
    make, shape = _MODELS[name]
    inputs = jax.random.normal(jax.random.key(0), (batch_size, *shape))
    labels = jnp.zeros(batch_size, jnp.int32)
    module = make(0.0)
    apply_fn = models.make_apply(module)
    params, model_state = models.init(module, jax.random.key(1), inputs[:1])
    loss_fn = objectives.classification_loss(apply_fn, num_data=50_000, prior_precision=1.0)
    likelihood_only = objectives.classification_loss(apply_fn, num_data=50_000)
    sgd = optax.sgd(0.01)
    families = {
        "point": point.build(loss_fn, sgd),
        "swag": swag.build(loss_fn, sgd, start_step=0, collect_every=1, rank=10),
        "mean_field_vi": mean_field_vi.build(
            likelihood_only, sgd, num_data=50_000, prior_precision=1.0
        ),
        "laplace_diag": laplace.build(apply_fn, num_data=50_000, prior_precision=1.0),
        "sgld": sgmcmc.sgld(
            loss_fn, learning_rate=1e-3, num_data=50_000, num_samples_max=num_samples
        ),
    }
    single = jax.jit(lambda p, x: jax.nn.log_softmax(apply_fn(p, model_state, x, train=False)[0]))
    result = {
        "ideal_seconds": _median(
            lambda: [single(params, inputs) for _ in range(num_samples)], repeats
        )
    }
    for family_name, family in families.items():
        state = family.init(params, model_state)
        if family_name == "swag":  # fill the deviation buffer so the low-rank term is real
            state = jax.jit(family.update)(
                jax.random.key(2), state, {"inputs": inputs, "labels": labels}
            )[0]
        fn = jax.jit(
            lambda key, state, x, family=family: bma.posterior_predictive(
                key, family, state, apply_fn, x, num_samples=num_samples
            )[0]
        )
        seconds = _median(lambda fn=fn, state=state: fn(jax.random.key(3), state, inputs), repeats)
        result[f"{family_name}.seconds"] = seconds
        result[f"{family_name}.over_ideal"] = seconds / result["ideal_seconds"]

    # MC dropout: samples are keys, the forward pass runs with dropout on.
    dropout_module = make(0.1)
    dropout_apply = models.make_apply(dropout_module)
    family = mc_dropout.build(loss_fn, sgd)
    state = family.init(params, model_state)
    predict_fn = mc_dropout.predict_fn(dropout_apply, state)
    fn = jax.jit(lambda key, x: bma.predict(predict_fn, family.sample(key, state, num_samples), x))
    seconds = _median(lambda: fn(jax.random.key(4), inputs), repeats)
    result["mc_dropout.seconds"] = seconds
    result["mc_dropout.over_ideal"] = seconds / result["ideal_seconds"]
    return result


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="BMA cost per posterior family.")
    parser.add_argument("--models", default="mlp,lenet")
    parser.add_argument("--num_samples", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    flat = {}
    print(f"backend={jax.default_backend()} S={args.num_samples} batch={args.batch_size}")
    for name in args.models.split(","):
        result = bench_model(name, args.num_samples, args.batch_size, args.repeats)
        print(f"{name}: ideal (S jitted forwards) {1e3 * result['ideal_seconds']:.1f} ms")
        for key, value in result.items():
            if key.endswith(".over_ideal"):
                print(f"  {key.removesuffix('.over_ideal'):14s} {value:5.2f}x")
        flat.update({f"{name}.{k}": v for k, v in result.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(flat, f, indent=2, sort_keys=True)
    return flat


if __name__ == "__main__":
    main()
