"""Cost of the SA-BMA flatness measure: top-5 Hessian eigenvalues of a ResNet-20 by Lanczos.

Builds ResNet-20 (BatchNorm, width 16, about 0.27M parameters), sets its BatchNorm statistics
with one training-mode pass, and measures on ``num_examples`` random 32x32x3 images with
random labels (loss from :func:`bnn_flat.sharpness.make_loss_for_hessian`, evaluation mode):

* one gradient and one Hessian-vector product (HVP), for the ratio HVP / gradient;
* :func:`bnn_flat.sharpness.top_hessian_eigenvalues` (k=5, ``num_iterations`` Lanczos
  steps with full reorthogonalisation), compiled once under ``jax.jit``.

For each ``batch_size`` (``0`` = one pass over all examples) it prints compile seconds and
the median of ``repeats`` warm runs, the HVP count, and the eigenvalues.

Run:
  python -m experiments.bench_hessian --num_examples=1000 --batch_sizes=0,250 --repeats=2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from bnn_flat import models, sharpness


def _timed(fn, arguments: tuple, repeats: int) -> tuple[float, float, object]:
    """Returns (first-call seconds, median warm seconds, last output) of ``fn(*arguments)``."""
    begin = time.perf_counter()
    output = jax.block_until_ready(fn(*arguments))
    first = time.perf_counter() - begin
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        output = jax.block_until_ready(fn(*arguments))
        times.append(time.perf_counter() - begin)
    return first, statistics.median(times), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--batch_sizes", default="0,250", help="comma-separated; 0 = all")
    parser.add_argument("--num_iterations", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    module = models.resnet20(num_classes=10, norm="batch")
    data_key, label_key, init_key, lanczos_key = jax.random.split(jax.random.key(0), 4)
    inputs = jax.random.normal(data_key, (args.num_examples, 32, 32, 3))
    labels = jax.random.randint(label_key, (args.num_examples,), 0, 10)
    params, model_state = models.init(module, init_key, inputs[:1])
    apply_fn = models.make_apply(module)
    _, model_state = jax.jit(lambda p, s, x: apply_fn(p, s, x, train=True))(
        params, model_state, inputs[:250]
    )
    num_params = models.num_params(params)
    print(f"ResNet-20 (BatchNorm): {num_params} parameters, {args.num_examples} examples")
    print(f"devices: {jax.devices()}", flush=True)

    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        print(f"batch size {batch_size or args.num_examples}:", flush=True)
        loss = sharpness.make_loss_for_hessian(
            apply_fn, model_state, inputs, labels, batch_size=batch_size or None
        )
        grad = jax.jit(jax.grad(loss))
        single_hvp = jax.jit(lambda p, v, loss=loss: sharpness.hvp(loss, p, v))
        top = jax.jit(
            lambda key, p, loss=loss: sharpness.top_hessian_eigenvalues(
                key, loss, p, k=args.k, num_iterations=args.num_iterations
            )
        )
        grad_first, grad_seconds, _ = _timed(grad, (params,), args.repeats)
        print(f"  gradient: first call {grad_first:.1f} s, warm {grad_seconds:.2f} s", flush=True)
        hvp_first, hvp_seconds, _ = _timed(single_hvp, (params, params), args.repeats)
        print(f"  HVP: first call {hvp_first:.1f} s, warm {hvp_seconds:.2f} s", flush=True)
        compile_begin = time.perf_counter()
        compiled = top.lower(lanczos_key, params).compile()
        compile_seconds = time.perf_counter() - compile_begin
        print(f"  Lanczos compiled in {compile_seconds:.1f} s", flush=True)
        _, lanczos_seconds, result = _timed(compiled, (lanczos_key, params), args.repeats)
        row = {
            "batch_size": batch_size or args.num_examples,
            "gradient_seconds": grad_seconds,
            "hvp_seconds": hvp_seconds,
            "lanczos_compile_seconds": compile_seconds,
            "lanczos_seconds": lanczos_seconds,
            "num_hessian_vector_products": int(result.num_hessian_vector_products),
            "seconds_per_hvp_in_lanczos": lanczos_seconds / args.num_iterations,
            "eigenvalues": [round(float(x), 5) for x in result.eigenvalues],
        }
        results.append(row)
        print(
            f"batch {row['batch_size']:5d}: gradient {grad_seconds:.2f} s, HVP {hvp_seconds:.2f} s "
            f"(HVP/gradient {hvp_seconds / grad_seconds:.2f}); top-{args.k} Lanczos "
            f"({row['num_hessian_vector_products']} HVPs): {lanczos_seconds:.1f} s warm "
            f"({row['seconds_per_hvp_in_lanczos']:.2f} s/HVP), compile {compile_seconds:.1f} s"
        )
        print(f"  eigenvalues: {row['eigenvalues']}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing
    main()
