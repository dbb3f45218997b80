"""XLA:CPU convolution kernels: jaxlib's default (YNNPACK) against bnn_flat's CPU tuning.

For each model, the same scanned training step (``--family=sgd``: point family with momentum
SGD; ``--family=low_rank_vi``: rank-5 diagonal-plus-low-rank VI with momentum SGD) is compiled
twice in one process: with jaxlib's default CPU settings, and with the compiler options of
:func:`bnn_flat.backend.compiler_options` (XLA's own convolution kernel, YNNPACK kept for dots
and reductions). The two programs are timed alternately (medians of warm runs) and their
parameters after the steps are compared.

The process-wide flag of :mod:`bnn_flat.backend` is switched off here
(``BNN_FLAT_CPU_TUNING=0`` before the import) so that "default" really is jaxlib's default.

Run:
  python -m experiments.bench_backend --json=runs/bench_backend.json
  python -m experiments.bench_backend --models=resnet20 --steps=3 --repeats=5
"""

from __future__ import annotations

import os

os.environ["BNN_FLAT_CPU_TUNING"] = "0"  # must precede the bnn_flat import

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from bnn_flat import backend, models, objectives  # noqa: E402
from bnn_flat.models.conv import Conv  # noqa: E402
from bnn_flat.posteriors import low_rank_vi, point  # noqa: E402
from experiments import bench  # noqa: E402

__all__ = ["bench_model", "main"]


def _tuned_options() -> dict[str, str]:
    return {backend._OPTION: backend._COMPILE_OPTION_VALUE}


def bench_model(
    name: str, steps: int, repeats: int, size: str = "full", family_name: str = "sgd"
) -> dict[str, float]:
    """Seconds per scanned step with jaxlib's default and with the tuned CPU options."""
    spec = bench._model_specs(size)[name]
    # XLA's own convolutions: the oneDNN custom call would bypass the kernels compared here
    xla_conv = functools.partial(Conv, implementation="canonical")
    loss_fn, params, model_state, batch = bench._problem(name, spec, xla_conv)
    optimizer = optax.sgd(0.05, momentum=0.9)
    if family_name == "sgd":
        family = point.build(loss_fn, optimizer)
    elif family_name == "low_rank_vi":
        module = bench._make_module(name, spec, xla_conv)
        likelihood = objectives.classification_loss(
            models.make_apply(module), num_data=bench._NUM_DATA
        )
        family = low_rank_vi.build(
            likelihood,
            optimizer,
            num_data=bench._NUM_DATA,
            prior_precision=bench._PRIOR_PRECISION,
            rank=5,
        )
    else:
        raise ValueError(f"unknown family {family_name!r}; use 'sgd' or 'low_rank_vi'")
    state = family.init(params, model_state)
    keys = jax.random.split(jax.random.key(3), steps)

    def run(state, keys):
        return jax.lax.scan(lambda s, k: (family.update(k, s, batch)[0], None), state, keys)[0]

    programs, compile_seconds = {}, {}
    for label, options in (("default", {}), ("tuned", _tuned_options())):
        begin = time.perf_counter()
        programs[label] = (
            jax.jit(run, compiler_options=options or None).lower(state, keys).compile()
        )
        compile_seconds[label] = time.perf_counter() - begin
    outputs = {label: program(state, keys) for label, program in programs.items()}
    difference = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(
            jax.tree.leaves(outputs["default"].params),
            jax.tree.leaves(outputs["tuned"].params),
            strict=True,
        )
    )
    times: dict[str, list[float]] = {label: [] for label in programs}
    for _ in range(repeats):  # alternate, so both see the same machine load
        for label, program in programs.items():
            begin = time.perf_counter()
            jax.block_until_ready(program(state, keys))
            times[label].append((time.perf_counter() - begin) / steps)
    default, tuned = (statistics.median(times[label]) for label in ("default", "tuned"))
    tag = f"{name}.{family_name}"
    return {
        f"{tag}.default_step_seconds": default,
        f"{tag}.tuned_step_seconds": tuned,
        f"{tag}.default_over_tuned": default / tuned,
        f"{tag}.default_compile_seconds": compile_seconds["default"],
        f"{tag}.tuned_compile_seconds": compile_seconds["tuned"],
        f"{tag}.max_abs_param_difference": difference,
    }


def main(argv: list[str] | None = None) -> dict[str, float | str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,lenet,resnet20")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--families", default="sgd", help="comma-separated: sgd, low_rank_vi")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    result: dict[str, float | str] = {"device": jax.devices()[0].device_kind}
    for family_name in args.families.split(","):
        for name in args.models.split(","):
            figures = bench_model(name, args.steps, args.repeats, args.size, family_name)
            result.update(figures)
            tag = f"{name}.{family_name}"
            print(
                f"{tag:22s} default {figures[f'{tag}.default_step_seconds'] * 1e3:8.1f} ms  "
                f"tuned {figures[f'{tag}.tuned_step_seconds'] * 1e3:8.1f} ms  "
                f"ratio {figures[f'{tag}.default_over_tuned']:.2f}  "
                f"max |dparams| {figures[f'{tag}.max_abs_param_difference']:.1e}",
                flush=True,
            )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return result


if __name__ == "__main__":
    main()
