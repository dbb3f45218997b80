"""Cost of the SA-BMA flatness measure: top-5 Hessian eigenvalues of a ResNet-20 by Lanczos.

Builds ResNet-20 (BatchNorm, width 16, about 0.27M parameters), sets its BatchNorm statistics
with one training-mode pass, and measures on ``num_examples`` random 32x32x3 images with
random labels (loss from :func:`bnn_flat.sharpness.make_loss_for_hessian`, evaluation mode):

* one gradient and one Hessian-vector product (HVP), for the ratio HVP / gradient;
* :func:`bnn_flat.sharpness.top_hessian_eigenvalues` (k=5, ``num_iterations`` Lanczos
  steps with full reorthogonalisation), compiled once under ``jax.jit``. On CPU its loops
  are unrolled automatically (XLA:CPU runs convolution gradients inside loops on a slow
  path); ``--unroll=0`` forces the compiled loop for comparison.

For each ``batch_size`` (``0`` = one pass over all examples) it prints compile seconds,
warm wall-clock and process CPU seconds (medians; the CPU time is less sensitive to other
jobs on a shared machine), the HVP count, the compiled temporary memory and the eigenvalues.
With a batch size, the batch loop stays a compiled loop (bounded memory, slow on CPU) unless
``--unroll=1``.

Measured (2 CPU cores shared with other jobs; 1000 examples, full batch, 20 iterations):
303 s wall / 479 s CPU per warm top-5 Lanczos run (15 s wall per HVP; a lone HVP takes 33 s),
compile 35 s, 7.4 GB temporary memory. With ``--batch_sizes=100`` (a compiled loop over 10
chunks, fast since :mod:`bnn_flat.models.conv`; load ~1): gradient 5.5 s, HVP 9.5 s, and
10.1 s wall per HVP inside Lanczos (6 HVPs in 60.4 s, compile 8.9 s, 457 MB), so about
200 s for the 20-HVP top-5 run: the 1-minute target is not met. At 64 examples and 6
iterations the unrolled run took 2.8 s wall and the compiled loop (``--unroll=0``) 103 s
(before the convolution fix).

Run:
  python -m experiments.bench_hessian --num_examples=1000 --batch_sizes=0
  python -m experiments.bench_hessian --num_examples=64 --num_iterations=6 --unroll=0
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from bnn_flat import models, sharpness


def _timed(fn, arguments: tuple, repeats: int) -> dict[str, object]:
    """First-call seconds and medians of warm wall/CPU seconds of ``fn(*arguments)``."""
    begin = time.perf_counter()
    output = jax.block_until_ready(fn(*arguments))
    first = time.perf_counter() - begin
    walls, cpus = [], []
    for _ in range(repeats):
        begin, begin_cpu = time.perf_counter(), time.process_time()
        output = jax.block_until_ready(fn(*arguments))
        walls.append(time.perf_counter() - begin)
        cpus.append(time.process_time() - begin_cpu)
    return {
        "first": first,
        "wall": statistics.median(walls),
        "cpu": statistics.median(cpus),
        "output": output,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_examples", type=int, default=1000)
    parser.add_argument("--batch_sizes", default="0", help="comma-separated; 0 = all")
    parser.add_argument("--num_iterations", type=int, default=20)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="warm runs of gradient and HVP")
    parser.add_argument("--lanczos_repeats", type=int, default=1, help="warm Lanczos runs")
    parser.add_argument("--unroll", type=int, default=-1, help="-1 automatic, 0 loop, 1 unroll")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    unroll = None if args.unroll < 0 else bool(args.unroll)

    module = models.resnet20(num_classes=10, norm="batch")
    data_key, label_key, init_key, lanczos_key = jax.random.split(jax.random.key(0), 4)
    inputs = jax.random.normal(data_key, (args.num_examples, 32, 32, 3))
    labels = jax.random.randint(label_key, (args.num_examples,), 0, 10)
    params, model_state = models.init(module, init_key, inputs[:1])
    apply_fn = models.make_apply(module)
    _, model_state = jax.jit(lambda p, s, x: apply_fn(p, s, x, train=True))(
        params, model_state, inputs[:250]
    )
    print(
        f"ResNet-20 (BatchNorm): {models.num_params(params)} parameters, "
        f"{args.num_examples} examples, {args.num_iterations} Lanczos iterations, "
        f"unroll={unroll}, devices {jax.devices()}",
        flush=True,
    )

    results = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        print(f"batch size {batch_size or args.num_examples}:", flush=True)
        loss = sharpness.make_loss_for_hessian(
            apply_fn,
            model_state,
            inputs,
            labels,
            batch_size=batch_size or None,
            unroll=bool(unroll),
        )
        grad = jax.jit(jax.grad(loss))
        single_hvp = jax.jit(lambda p, v, loss=loss: sharpness.hvp(loss, p, v))
        top = jax.jit(
            lambda key, p, loss=loss: sharpness.top_hessian_eigenvalues(
                key, loss, p, k=args.k, num_iterations=args.num_iterations, unroll=unroll
            )
        )
        gradient = _timed(grad, (params,), args.repeats)
        print(
            f"  gradient: first call {gradient['first']:.1f} s; warm {gradient['wall']:.2f} s "
            f"wall, {gradient['cpu']:.2f} s CPU",
            flush=True,
        )
        product = _timed(single_hvp, (params, params), args.repeats)
        print(
            f"  HVP: first call {product['first']:.1f} s; warm {product['wall']:.2f} s wall, "
            f"{product['cpu']:.2f} s CPU (HVP/gradient CPU {product['cpu'] / gradient['cpu']:.2f})",
            flush=True,
        )
        compile_begin = time.perf_counter()
        compiled = top.lower(lanczos_key, params).compile()
        compile_seconds = time.perf_counter() - compile_begin
        memory = compiled.memory_analysis()
        temp_megabytes = None if memory is None else memory.temp_size_in_bytes / 1e6
        print(f"  Lanczos compiled in {compile_seconds:.1f} s", flush=True)
        lanczos = _timed(compiled, (lanczos_key, params), args.lanczos_repeats)
        result = lanczos["output"]
        row = {
            "batch_size": batch_size or args.num_examples,
            "gradient_wall_seconds": gradient["wall"],
            "gradient_cpu_seconds": gradient["cpu"],
            "hvp_wall_seconds": product["wall"],
            "hvp_cpu_seconds": product["cpu"],
            "lanczos_compile_seconds": compile_seconds,
            "lanczos_first_call_seconds": lanczos["first"],
            "lanczos_wall_seconds": lanczos["wall"],
            "lanczos_cpu_seconds": lanczos["cpu"],
            "lanczos_temp_megabytes": temp_megabytes,
            "num_hessian_vector_products": int(result.num_hessian_vector_products),
            "eigenvalues": [round(float(x), 5) for x in result.eigenvalues],
        }
        results.append(row)
        print(
            f"  top-{args.k} Lanczos ({row['num_hessian_vector_products']} HVPs): "
            f"{lanczos['wall']:.1f} s wall, {lanczos['cpu']:.1f} s CPU warm "
            f"({lanczos['wall'] / args.num_iterations:.2f} s wall per HVP); compile "
            f"{compile_seconds:.1f} s; temp memory {temp_megabytes:.0f} MB",
            flush=True,
        )
        print(f"  eigenvalues: {row['eigenvalues']}", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
