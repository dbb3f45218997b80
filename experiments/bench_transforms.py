"""Step time of every sharpness-aware transform, side by side with its references.

For each model, one jitted training step (a ``lax.scan`` over ``--steps`` steps on a fixed
batch, so dispatch overhead is excluded) is timed for:

* ``sgd``: the point family with plain ``optax.sgd`` (one gradient evaluation);
* ``handwritten_sam``: a two-pass SAM step written out by hand (no library code);
* ``optax_sam``: ``optax.contrib.sam(..., opaque_mode=True)``;
* every bnn_flat transform in ``optax.chain(transform, optax.sgd)`` through the point
  family (bSAM on its own: it is a full optimizer).

Reports medians of ``--repeats`` warm runs (the runs timed in turn within each repeat) and
each step's ratio to ``sgd``, to ``handwritten_sam`` and to ``optax_sam``; compile time is
reported separately.

Run:
  python -m experiments.bench_transforms --quick --json=runs/bench_transforms.json
  python -m experiments.bench_transforms --models=mlp,lenet,resnet20
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import optax

from bnn_flat import models, objectives, transforms
from bnn_flat.posteriors import point
from experiments import bench_bma

_MODELS = {
    "mlp": (lambda: models.mlp([256, 256], num_outputs=10), (28, 28, 1), 128),
    "lenet": (lambda: models.lenet(num_classes=10), (28, 28, 1), 128),
    "resnet20": (lambda: models.resnet20(num_classes=10, norm="batch"), (32, 32, 3), 64),
}
_RHO = 0.05
_LEARNING_RATE = 0.05


def _transforms(num_data: int) -> dict[str, optax.GradientTransformation]:
    sgd = optax.sgd(_LEARNING_RATE, momentum=0.9)
    return {
        "sam": optax.chain(transforms.sam(_RHO), sgd),
        "asam": optax.chain(transforms.asam(0.5), sgd),
        "fisher_sam": optax.chain(transforms.fisher_sam(0.1), sgd),
        "random_sam": optax.chain(transforms.random_sam(_RHO), sgd),
        "mix_sam": optax.chain(transforms.mix_sam(_RHO, kappa=1.0), sgd),
        "vsam": optax.chain(
            transforms.vsam(_RHO, learning_rate_m=0.01, prior_variance=1.0, num_data=num_data),
            sgd,
        ),
        "bsam": transforms.bsam(_LEARNING_RATE, rho=_RHO, num_data=num_data, prior_precision=1.0),
    }


def _timed_interleaved(
    runs: dict, repeats: int, calls_out: dict | None = None
) -> dict[str, tuple[float, float]]:
    """Median seconds and compile seconds per run, the runs timed in turn in every repeat.

    ``runs`` maps names to ``(fn, args)``. Round-robin timing spreads the load bursts of a
    shared machine over every run, so ratios between runs are much steadier than those of
    back-to-back blocks. ``calls_out``, if given, receives each run's compiled program
    bound to its arguments (a zero-argument callable), for reuse by later comparisons.
    """
    calls, compile_seconds = {}, {}
    for name, (fn, args) in runs.items():
        begin = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_seconds[name] = time.perf_counter() - begin
        calls[name] = functools.partial(compiled, *args)
        _require_finite(name, calls[name]())
    seconds = bench_bma.round_robin_medians(calls, repeats)
    if calls_out is not None:
        calls_out.update(calls)
    return {name: (seconds[name], compile_seconds[name]) for name in runs}


def _require_finite(name: str, output) -> None:
    """Raises if a timed run ends in a non-finite state (NaN arithmetic is not a step time)."""
    leaves = [
        leaf
        for leaf in jax.tree.leaves(output)
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in leaves):
        raise RuntimeError(
            f"the timed run {name!r} ends in a non-finite state (it diverged); its step "
            "time would measure NaN arithmetic: lower the benchmark's learning rate or radius"
        )


def bench_model(
    name: str, steps: int, repeats: int, only=None, spec=None, programs_out=None
) -> dict[str, float]:
    """Step times of one model; ``spec=(make, shape, batch_size)`` overrides ``_MODELS[name]``.

    ``programs_out``, if given, receives the compiled runs as zero-argument callables (each
    runs ``steps`` scanned steps), e.g. for :func:`experiments.bench.torch_comparison`.
    """
    make, shape, batch_size = spec if spec is not None else _MODELS[name]
    module = make()
    apply_fn = models.make_apply(module)
    key = jax.random.key(0)
    inputs = jax.random.normal(key, (batch_size, *shape))
    labels = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
    batch = {"inputs": inputs, "labels": labels}
    params, model_state = models.init(module, jax.random.key(2), inputs[:1])
    num_data = 50_000
    loss_fn = objectives.classification_loss(apply_fn, num_data=num_data, prior_precision=25.0)

    def scan_family(family):
        def run(state, batch, key):
            def body(state, k):
                return family.update(k, state, batch)[0], None

            return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

        return run, family.init(params, model_state)

    sgd = optax.sgd(_LEARNING_RATE, momentum=0.9)

    def handwritten_sam(carry, batch, key):
        def body(carry, k):
            params, model_state, opt_state = carry
            loss_key, _ = jax.random.split(k)
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                params, model_state, batch, loss_key
            )
            norm = jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))
            perturbed = jax.tree.map(lambda p, g: p + _RHO * g / (norm + 1e-12), params, grads)
            ascent_key = jax.random.fold_in(loss_key, 1)
            grads = jax.grad(lambda p: loss_fn(p, model_state, batch, ascent_key)[0])(perturbed)
            updates, opt_state = sgd.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), aux.model_state, opt_state), None

        return jax.lax.scan(body, carry, jax.random.split(key, steps))[0]

    optax_sam = optax.contrib.sam(
        sgd,
        optax.chain(optax.contrib.normalize(), optax.sgd(_RHO)),
        opaque_mode=True,
    )

    def optax_sam_step(state, batch, key):
        def body(state, k):
            loss_key, _ = jax.random.split(k)
            (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state.params, state.model_state, batch, loss_key
            )
            ascent_key = jax.random.fold_in(loss_key, 1)
            grad_fn = lambda p, _: jax.grad(  # noqa: E731
                lambda q: loss_fn(q, state.model_state, batch, ascent_key)[0]
            )(p)
            updates, opt_state = optax_sam.update(
                grads, state.opt_state, state.params, grad_fn=grad_fn
            )
            return state._replace(
                params=optax.apply_updates(state.params, updates),
                model_state=aux.model_state,
                opt_state=opt_state,
                step=state.step + 1,
            ), None

        return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

    runs = {}
    runs["sgd"] = scan_family(point.build(loss_fn, sgd))
    runs["handwritten_sam"] = (handwritten_sam, (params, model_state, sgd.init(params)))
    runs["optax_sam"] = (
        optax_sam_step,
        point.PointState(
            params=params,
            model_state=model_state,
            opt_state=optax_sam.init(params),
            step=jnp.zeros((), jnp.int32),
        ),
    )
    for transform_name, tx in _transforms(num_data).items():
        if only and transform_name not in only:
            continue
        runs[transform_name] = scan_family(point.build(loss_fn, tx))

    result = {}
    key = jax.random.key(3)
    timed = _timed_interleaved(
        {run_name: (fn, (state, batch, key)) for run_name, (fn, state) in runs.items()},
        repeats,
        calls_out=programs_out,
    )
    for run_name, (seconds, compile_seconds) in timed.items():
        result[f"{run_name}.step_seconds"] = seconds / steps
        result[f"{run_name}.compile_seconds"] = compile_seconds
    for run_name in runs:
        step = result[f"{run_name}.step_seconds"]
        result[f"{run_name}.over_plain"] = step / result["sgd.step_seconds"]
        result[f"{run_name}.over_handwritten"] = step / result["handwritten_sam.step_seconds"]
        result[f"{run_name}.over_optax_sam"] = step / result["optax_sam.step_seconds"]
    return result


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Sharpness-aware transform step times.")
    parser.add_argument("--models", default=None, help="comma list; default mlp,lenet,resnet20")
    parser.add_argument("--quick", action="store_true", help="mlp and lenet, fewer repeats")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--transforms", default=None, help="comma list of bnn_flat transforms")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    names = args.models or ("mlp,lenet" if args.quick else "mlp,lenet,resnet20")
    repeats = min(args.repeats, 5) if args.quick else args.repeats
    only = set(args.transforms.split(",")) if args.transforms else None
    flat = {}
    print(f"backend={jax.default_backend()} devices={jax.device_count()} steps/scan={args.steps}")
    for name in names.split(","):
        result = bench_model(name, args.steps, repeats, only)
        runs = [k.removesuffix(".step_seconds") for k in result if k.endswith(".step_seconds")]
        print(
            f"\n{name}: {'run':16s} {'ms/step':>9s} {'/sgd':>6s} {'/hand SAM':>9s} "
            f"{'/optax SAM':>10s} {'compile s':>9s}"
        )
        for run in runs:
            print(
                f"{'':{len(name) + 2}s}{run:16s} {1e3 * result[run + '.step_seconds']:9.2f} "
                f"{result[run + '.over_plain']:6.2f} {result[run + '.over_handwritten']:9.2f} "
                f"{result[run + '.over_optax_sam']:10.2f} {result[run + '.compile_seconds']:9.1f}"
            )
        flat.update({f"{name}.{k}": v for k, v in result.items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(flat, f, indent=2, sort_keys=True)
    return flat


if __name__ == "__main__":
    main()
