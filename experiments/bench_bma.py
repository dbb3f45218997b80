"""BMA strategies side by side: which one should ``strategy="auto"`` pick on this backend?

For each model, times (medians of warm runs timed round-robin, compile excluded) the BMA over
``S`` stacked samples with every strategy, and ``S`` separate calls of a jitted single forward
pass (the "ideal": what a user's Python loop would cost). Prints ratios to the ideal and the
strategy ``auto`` resolves to.

Run:
  python -m experiments.bench_bma --num_samples=16 --repeats=5 [--json=OUT.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from bnn_flat import bma, models

_MODELS = {
    "mlp": (lambda: models.mlp([256, 256], num_outputs=10), (28, 28, 1)),
    "lenet": (lambda: models.lenet(num_classes=10), (28, 28, 1)),
    "resnet20": (lambda: models.resnet20(num_classes=10, norm="batch"), (32, 32, 3)),
}


def round_robin_medians(runs: dict, repeats: int) -> dict[str, float]:
    """Median seconds per run, the runs timed in turn in every repeat (compile excluded).

    On a shared machine, timing each run in its own block puts a load burst on one side of a
    ratio; in turn, the bursts spread over all runs (the MLP's auto/ideal ratio moved between
    0.5 and 1.2 across back-to-back blocks, with auto and map the same program).
    """
    for fn in runs.values():
        jax.block_until_ready(fn())  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            begin = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_model(
    name: str, num_samples: int, batch_size: int, repeats: int, spec=None
) -> dict[str, float]:
    """BMA timings of one model; ``spec=(make, shape)`` overrides ``_MODELS[name]``."""
    make, shape = spec if spec is not None else _MODELS[name]
    module = make()
    inputs = jax.random.normal(jax.random.key(0), (batch_size, *shape))
    params, model_state = models.init_ensemble(module, jax.random.key(1), inputs[:1], num_samples)
    apply_fn = models.make_apply(module)
    # BatchNorm statistics per sample, as after SWAG's per-sample re-estimation.
    predict_fn = bma.model_predict_fn(apply_fn, per_sample_state=True)
    samples = (params, model_state)

    single = jax.jit(lambda s, x: jax.nn.log_softmax(predict_fn(s, x)))
    unstacked = [jax.tree.map(lambda a, i=i: a[i], samples) for i in range(num_samples)]

    def ideal():
        return [single(s, inputs) for s in unstacked]

    runs = {"ideal": ideal}
    for strategy, chunk in (("vmap", None), ("map", None), ("chunked", 4), ("auto", None)):
        fn = jax.jit(
            lambda s, x, strategy=strategy, chunk=chunk: bma.predict(
                predict_fn, s, x, strategy=strategy, chunk_size=chunk
            )
        )
        runs[strategy] = lambda fn=fn: fn(samples, inputs)
    seconds = round_robin_medians(runs, repeats)
    result = {"ideal_seconds": seconds["ideal"]}
    for strategy in ("vmap", "map", "chunked", "auto"):
        result[f"{strategy}_seconds"] = seconds[strategy]
        result[f"{strategy}_over_ideal"] = seconds[strategy] / seconds["ideal"]
    result["auto_choice"] = bma.choose_strategy(samples)
    return result


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet,resnet20")
    parser.add_argument("--num_samples", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    results = {}
    print(f"backend={jax.default_backend()} devices={jax.device_count()}")
    print(
        f"{'model':10s} {'ideal s':>9s} {'vmap':>7s} {'map':>7s} {'chunk4':>7s} {'auto':>7s}  auto="
    )
    for name in args.models.split(","):
        r = bench_model(name, args.num_samples, args.batch_size, args.repeats)
        results[name] = r
        print(
            f"{name:10s} {r['ideal_seconds']:9.4f} {r['vmap_over_ideal']:7.2f} "
            f"{r['map_over_ideal']:7.2f} {r['chunked_over_ideal']:7.2f} "
            f"{r['auto_over_ideal']:7.2f}  {r['auto_choice']}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
