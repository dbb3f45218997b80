"""The benchmark suite: every speed figure of the project, side by side in one run.

All figures are ratios of two programs timed in the same process (medians of warm runs;
compile time reported separately), written as one flat key per figure:

* ``{model}.{run}.over_plain`` / ``.over_handwritten`` / ``.over_optax_sam``: a training step
  (``run`` in ``sgd``, ``handwritten_sam``, ``optax_sam``, ``sam``; more with
  ``--transforms``) over a plain-optimizer step, a hand-written SAM step and
  ``optax.contrib.sam`` in opaque mode (from :mod:`experiments.bench_transforms`).
* ``{model}.bma_{strategy}.over_ideal``: BMA over ``S`` samples with each strategy (``vmap``,
  ``map``, ``chunked``, ``auto``) over ``S`` separate jitted forward passes
  (:mod:`experiments.bench_bma`); ``{model}.bma_auto.choice`` names the automatic choice.
* ``{model}.sgd.over_torch`` / ``{model}.sam.over_torch``: our SGD and SAM steps over the same
  steps written in PyTorch (SAM: two forward/backward passes), when ``torch`` is installed;
  the runs are timed round-robin within each repeat (:func:`torch_comparison`). For conv
  models on oneDNN convolutions (the CPU default, :mod:`bnn_flat._native`), the same rounds
  time the SGD step on XLA's own convolutions too: ``{model}.sgd_xla_conv.over_torch`` and
  ``{model}.sgd.onednn_over_xla_conv``.
* ``{model}.sgd.scan_over_top_level`` (not in ``--quick``): a step inside the scanned epoch
  loop over the same step jitted on its own and called from Python (the XLA:CPU loop-body
  effect on convolutions);
  with ``--conv_comparison`` also ``{model}.sgd_lax_conv.*`` for plain ``lax`` convolutions.
* ``scaling.{model}.devices4_over_devices1`` and ``scaling.{model}.max_abs_difference``: a
  data-parallel step on 4 forced host devices against 1 (a subprocess with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=4``): the sharded path's correctness, not
  a speed-up (the forced devices share the same cores).

Run:
  python -m experiments.bench --quick --json=runs/bench.json   # a few minutes on 2 cores
  python -m experiments.bench --json=runs/bench.json            # full sizes, more repeats
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnn_flat import models, objectives
from bnn_flat.models import conv
from bnn_flat.posteriors import point
from experiments import bench_bma, bench_transforms

__all__ = ["PRESETS", "run_suite", "main"]

_LEARNING_RATE = 0.05
_RHO = 0.05
_NUM_DATA = 50_000
_PRIOR_PRECISION = 25.0  # the loss bench_transforms uses; weight decay 25 / 50_000 in torch


def _model_specs(size: str) -> dict[str, dict[str, Any]]:
    """Model definitions (JAX factory and matching torch description) per suite size."""
    if size == "tiny":
        return {
            "mlp": dict(hidden=(16,), shape=(4, 4, 1), batch=8),
            "lenet": dict(shape=(8, 8, 1), batch=8),
            "resnet20": dict(stage_sizes=(1, 1, 1), width=4, shape=(8, 8, 3), batch=4),
        }
    return {
        "mlp": dict(hidden=(256, 256), shape=(28, 28, 1), batch=128),
        "lenet": dict(shape=(28, 28, 1), batch=128),
        "resnet20": dict(stage_sizes=(3, 3, 3), width=16, shape=(32, 32, 3), batch=64),
    }


PRESETS = {
    "full": dict(
        size="full", steps=5, repeats=7, bma_samples=32, bma_batch=256, bma_repeats=5,
        torch_rounds=7, loop_comparison=True,
    ),
    "quick": dict(
        size="full", steps=2, repeats=5, bma_samples=32, bma_batch=32, bma_repeats=5,
        torch_rounds=5, loop_comparison=False,
    ),
    "tiny": dict(
        size="tiny", steps=2, repeats=2, bma_samples=4, bma_batch=4, bma_repeats=1,
        torch_rounds=2, loop_comparison=True,
    ),
}  # fmt: skip
"""Suite sizes: ``full`` (report figures), ``quick`` (a few minutes), ``tiny`` (smoke test).

``repeats`` / ``bma_repeats``: round-robin rounds of the transform steps / the BMA
strategies (quick: 5 each, since with 3 one load burst moved ResNet-20's ``sam`` / hand-written
SAM to 1.09 and its ``auto`` / ideal between 0.86 and 1.23 across runs, each pair compiling to
the same work; the extra rounds cost ~15 s); ``torch_rounds``: round-robin rounds of the
PyTorch comparison; ``loop_comparison``: measure
``{model}.sgd.scan_over_top_level`` (skipped by ``quick``: with the oneDNN convolutions the
scanned step is no slower than the top-level one, 0.83-0.97 in the last quick run with it).
"""


def _make_module(name: str, spec: dict[str, Any], conv: Callable[..., nn.Module] | None = None):
    if name == "mlp":
        return models.mlp(list(spec["hidden"]), num_outputs=10)
    extra = {} if conv is None else {"conv": conv}
    if name == "lenet":
        return models.LeNet(num_classes=10, **extra)
    if spec["stage_sizes"] == (3, 3, 3):
        return models.ResNet20(num_classes=10, width=spec["width"], **extra)
    return models.ResNet(
        stage_sizes=spec["stage_sizes"], num_classes=10, width=spec["width"], **extra
    )


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _problem(name: str, spec: dict[str, Any], conv=None):
    module = _make_module(name, spec, conv)
    inputs = jax.random.normal(jax.random.key(0), (spec["batch"], *spec["shape"]))
    labels = jax.random.randint(jax.random.key(1), (spec["batch"],), 0, 10)
    params, model_state = models.init(module, jax.random.key(2), inputs[:1])
    loss_fn = objectives.classification_loss(
        models.make_apply(module), num_data=_NUM_DATA, prior_precision=_PRIOR_PRECISION
    )
    return loss_fn, params, model_state, {"inputs": inputs, "labels": labels}


def scan_versus_top_level(
    name: str, spec: dict[str, Any], steps: int, repeats: int, conv=None
) -> dict[str, float]:
    """SGD step time inside a ``lax.scan`` (as in a jitted epoch) over a top-level jitted step.

    Args:
      name: ``"mlp"``, ``"lenet"`` or ``"resnet20"``.
      spec: the model's entry of the suite's model specifications.
      steps: steps per timed call (scan length, or Python-loop length).
      repeats: timed repetitions (medians reported).
      conv: convolution factory for conv models (``None``: the model's default).

    Returns:
      ``scan_step_seconds``, ``top_level_step_seconds``, ``scan_over_top_level`` and the two
      compile times.
    """
    loss_fn, params, model_state, batch = _problem(name, spec, conv)
    family = point.build(loss_fn, optax.sgd(_LEARNING_RATE, momentum=0.9))
    state = family.init(params, model_state)
    keys = jax.random.split(jax.random.key(3), steps)

    def scanned(state, keys):
        return jax.lax.scan(lambda s, k: (family.update(k, s, batch)[0], None), state, keys)[0]

    begin = time.perf_counter()
    scan_fn = jax.jit(scanned).lower(state, keys).compile()
    scan_compile = time.perf_counter() - begin
    begin = time.perf_counter()
    step_fn = (
        jax.jit(lambda s, k: family.update(k, s, batch)[0], donate_argnums=0)
        .lower(state, keys[0])
        .compile()
    )
    step_compile = time.perf_counter() - begin
    carry = [jax.tree.map(jnp.copy, state)]

    def loop():
        for index in range(steps):
            carry[0] = step_fn(carry[0], keys[index])
        return carry[0]

    scan_seconds = _median_seconds(lambda: scan_fn(state, keys), repeats) / steps
    loop_seconds = _median_seconds(loop, repeats) / steps
    return {
        "scan_step_seconds": scan_seconds,
        "top_level_step_seconds": loop_seconds,
        "scan_over_top_level": scan_seconds / loop_seconds,
        "scan_compile_seconds": scan_compile,
        "top_level_compile_seconds": step_compile,
    }


def _torch_module(name: str, spec: dict[str, Any]):
    import torch
    from torch import nn as tnn
    from torch.nn import functional

    channels = spec["shape"][-1]
    if name == "mlp":
        layers, width = [tnn.Flatten()], math.prod(spec["shape"])
        for hidden in spec["hidden"]:
            layers += [tnn.Linear(width, hidden), tnn.ReLU()]
            width = hidden
        return tnn.Sequential(*layers, tnn.Linear(width, 10))
    if name == "lenet":
        pixels = (spec["shape"][0] // 4) * (spec["shape"][1] // 4)
        return tnn.Sequential(
            tnn.Conv2d(channels, 6, 5, padding=2),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Conv2d(6, 16, 5, padding=2),
            tnn.ReLU(),
            tnn.MaxPool2d(2),
            tnn.Flatten(),
            tnn.Linear(16 * pixels, 120),
            tnn.ReLU(),
            tnn.Linear(120, 84),
            tnn.ReLU(),
            tnn.Linear(84, 10),
        )

    class Block(tnn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv_0 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.norm_0 = tnn.BatchNorm2d(cout)
            self.conv_1 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.norm_1 = tnn.BatchNorm2d(cout)
            self.shortcut = tnn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = tnn.Sequential(
                    tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = functional.relu(self.norm_0(self.conv_0(x)))
            return functional.relu(self.norm_1(self.conv_1(y)) + self.shortcut(x))

    class ResNet(tnn.Module):
        def __init__(self):
            super().__init__()
            width = spec["width"]
            self.stem = tnn.Sequential(
                tnn.Conv2d(channels, width, 3, 1, 1, bias=False), tnn.BatchNorm2d(width), tnn.ReLU()
            )
            blocks, cin = [], width
            for stage, size in enumerate(spec["stage_sizes"]):
                for block in range(size):
                    cout = width * 2**stage
                    blocks.append(Block(cin, cout, 2 if stage > 0 and block == 0 else 1))
                    cin = cout
            self.blocks = tnn.Sequential(*blocks)
            self.head = tnn.Linear(cin, 10)

        def forward(self, x):
            return self.head(torch.mean(self.blocks(self.stem(x)), dim=(2, 3)))

    return ResNet()


def _torch_step_functions(
    name: str, spec: dict[str, Any], threads: int | None = None
) -> tuple[Callable[[], None], Callable[[], None]]:
    """PyTorch SGD and SAM step functions (module, batch and optimizer bound in closures)."""
    import torch
    from torch.nn import functional

    if threads is not None:
        torch.set_num_threads(threads)

    torch.manual_seed(0)
    module = _torch_module(name, spec)
    height, width, channels = spec["shape"]
    inputs = torch.randn(spec["batch"], channels, height, width)
    labels = torch.randint(0, 10, (spec["batch"],))
    weight_decay = _PRIOR_PRECISION / _NUM_DATA
    optimizer = torch.optim.SGD(
        module.parameters(), lr=_LEARNING_RATE, momentum=0.9, weight_decay=weight_decay
    )
    parameters = list(module.parameters())

    def sgd_step():
        optimizer.zero_grad()
        functional.cross_entropy(module(inputs), labels).backward()
        optimizer.step()

    def sam_step():
        optimizer.zero_grad()
        functional.cross_entropy(module(inputs), labels).backward()
        with torch.no_grad():
            norm = torch.sqrt(sum(torch.sum(p.grad**2) for p in parameters))
            offsets = [_RHO * p.grad / (norm + 1e-12) for p in parameters]
            for p, offset in zip(parameters, offsets, strict=True):
                p.add_(offset)
        optimizer.zero_grad()
        functional.cross_entropy(module(inputs), labels).backward()
        with torch.no_grad():
            for p, offset in zip(parameters, offsets, strict=True):
                p.sub_(offset)
        optimizer.step()

    return sgd_step, sam_step


_MIN_BLOCK_SECONDS = 0.3


def _compiled_steps(loss_fn, transform, params, model_state, batch, keys) -> Callable[[], Any]:
    """``len(keys)`` scanned point-family steps, compiled and bound to their arguments."""
    family = point.build(loss_fn, transform)
    state = family.init(params, model_state)

    def scanned(state, batch, keys):
        return jax.lax.scan(lambda s, k: (family.update(k, s, batch)[0], None), state, keys)[0]

    program = jax.jit(scanned).lower(state, batch, keys).compile()
    return functools.partial(program, state, batch, keys)


def torch_comparison(
    name: str,
    spec: dict[str, Any],
    steps: int,
    repeats: int,
    threads: int | None = None,
    xla_conv: bool = True,
    ours: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Our SGD and SAM steps against the same steps in PyTorch, timed round-robin.

    Our steps are the suite's scanned point-family steps (momentum SGD, and
    ``transforms.sam`` chained with it); PyTorch's use the same model, batch, momentum SGD and
    weight decay (NCHW float32), SAM as two forward/backward passes. In every repeat
    the runs (ours SGD and SAM, then PyTorch's SGD and SAM) are timed in turn, so a load
    burst on a shared machine hits both sides of each ratio rather than one. Each turn is a
    block of at least ``_MIN_BLOCK_SECONDS``; the first turn after a switch of library starts
    with one untimed call: right after the other library ran, its thread pool is still winding
    down (measured: the MLP step 4.7 ms alone, 5.6-8 ms when timed straight after a PyTorch
    step; on ResNet-20 our SAM step was 2.25-2.29x our SGD step when timed straight after
    PyTorch's SGD step, 1.91x without PyTorch in between).

    Args:
      name: ``"mlp"``, ``"lenet"`` or ``"resnet20"``.
      spec: the model's entry of the suite's model specifications.
      steps: steps per timed call.
      repeats: timed rounds (medians reported).
      threads: PyTorch intra-op threads (``None``: its default).
      xla_conv: for conv models whose convolutions run on oneDNN (the CPU default), also time
        the SGD step with XLA's own convolutions (``implementation="canonical"``) in the
        same rounds.
      ours: already compiled ``"sgd"`` / ``"sam"`` programs of the same problem (zero-argument
        callables running ``steps`` scanned steps, as
        :func:`experiments.bench_transforms.bench_model` returns through ``programs_out``);
        the suite passes them so that the same programs are not compiled twice.

    Returns:
      ``{sgd,sam}.step_seconds`` (ours), ``torch.{sgd,sam}_step_seconds`` and
      ``{sgd,sam}.over_torch``; with ``xla_conv``, ``sgd_xla_conv.step_seconds``,
      ``sgd_xla_conv.over_torch`` and ``sgd.onednn_over_xla_conv``.
    """
    torch_sgd, torch_sam = _torch_step_functions(name, spec, threads)
    loss_fn, params, model_state, batch = _problem(name, spec)
    keys = jax.random.split(jax.random.key(3), steps)
    transforms = {
        "sgd": optax.sgd(_LEARNING_RATE, momentum=0.9),
        "sam": bench_transforms._transforms(_NUM_DATA)["sam"],
    }
    programs = {label: (loss_fn, transform) for label, transform in transforms.items()}
    if xla_conv and name != "mlp" and conv.resolve_implementation("auto") == "onednn":
        # the same SGD step on XLA's own convolutions, in the same rounds
        xla_loss = _problem(name, spec, functools.partial(conv.Conv, implementation="canonical"))
        programs["sgd_xla_conv"] = (xla_loss[0], transforms["sgd"])
    runs: dict[str, Callable[[], Any]] = {}
    for label, (loss_fn, transform) in programs.items():
        if ours is not None and label in ours:
            runs[f"ours.{label}"] = ours[label]
        else:
            runs[f"ours.{label}"] = _compiled_steps(
                loss_fn, transform, params, model_state, batch, keys
            )
        if label not in transforms:
            continue

        def torch_run(step=torch_sgd if label == "sgd" else torch_sam):
            for _ in range(steps):
                step()

        runs[f"torch.{label}"] = torch_run
    calls = {}
    for label, run in runs.items():  # warm-up, and the number of calls per timed block
        begin = time.perf_counter()
        jax.block_until_ready(run())
        calls[label] = max(1, math.ceil(_MIN_BLOCK_SECONDS / (time.perf_counter() - begin)))
    times: dict[str, list[float]] = {label: [] for label in runs}
    # ours first, then PyTorch's, in every round; the first turn after a switch of library
    # starts with an untimed call (the other library's threads wind down meanwhile)
    order = sorted(runs, key=lambda label: label.startswith("torch."))
    previous_library = None
    for _ in range(repeats):
        for label in order:
            run, library = runs[label], label.split(".")[0]
            if library != previous_library:
                jax.block_until_ready(run())
            previous_library = library
            begin = time.perf_counter()
            for _ in range(calls[label]):
                jax.block_until_ready(run())
            times[label].append((time.perf_counter() - begin) / (steps * calls[label]))
    median = {label: statistics.median(values) for label, values in times.items()}
    result = {}
    for label in transforms:
        result[f"{label}.step_seconds"] = median[f"ours.{label}"]
        result[f"torch.{label}_step_seconds"] = median[f"torch.{label}"]
        result[f"{label}.over_torch"] = median[f"ours.{label}"] / median[f"torch.{label}"]
    if "ours.sgd_xla_conv" in median:
        result["sgd_xla_conv.step_seconds"] = median["ours.sgd_xla_conv"]
        result["sgd_xla_conv.over_torch"] = median["ours.sgd_xla_conv"] / median["torch.sgd"]
        result["sgd.onednn_over_xla_conv"] = median["ours.sgd"] / median["ours.sgd_xla_conv"]
    return result


_SCALING_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from experiments import bench
print(json.dumps(bench._scaling_worker(json.loads(sys.argv[1]))))
"""


def _scaling_worker(config: dict[str, Any]) -> dict[str, float]:
    """Runs inside the 4-device subprocess: one data-parallel step on 1 and on 4 devices."""
    from bnn_flat import sharding

    result = {}
    for name, spec in config["specs"].items():
        spec = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}
        loss_fn, params, model_state, batch = _problem(name, spec)
        family = point.build(loss_fn, optax.sgd(_LEARNING_RATE, momentum=0.9))
        keys = jax.random.split(jax.random.key(3), config["steps"])
        final, seconds = {}, {}
        for devices in (1, 4):
            mesh = sharding.make_mesh(devices)
            state = sharding.replicate(family.init(params, model_state), mesh)
            placed = sharding.shard_batch(batch, mesh)
            step = jax.jit(lambda s, k, b, family=family: family.update(k, s, b)[0])

            def run(state=state, placed=placed, step=step, keys=keys):
                for key in keys:
                    state = step(state, key, placed)
                return state

            final[devices] = run()
            seconds[devices] = _median_seconds(run, config["repeats"])
        difference = max(
            float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
            for a, b in zip(
                jax.tree.leaves(final[1].params), jax.tree.leaves(final[4].params), strict=True
            )
        )
        result[f"scaling.{name}.devices4_over_devices1"] = seconds[4] / seconds[1]
        result[f"scaling.{name}.max_abs_difference"] = difference
    return result


def scaling(specs: dict[str, dict[str, Any]], steps: int, repeats: int) -> dict[str, float]:
    """Data-parallel steps on 4 forced host devices against 1, in a subprocess.

    Args:
      specs: model specifications (batch sizes divisible by 4).
      steps: steps per timed call.
      repeats: timed repetitions.

    Returns:
      ``scaling.{model}.devices4_over_devices1`` and ``scaling.{model}.max_abs_difference``
      (largest parameter difference after ``steps`` steps).
    """
    environment = dict(os.environ)
    environment["XLA_FLAGS"] = (
        environment.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    ).strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    environment["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, environment.get("PYTHONPATH")) if p
    )
    config = json.dumps({"specs": specs, "steps": steps, "repeats": repeats})
    completed = subprocess.run(
        [sys.executable, "-c", _SCALING_SCRIPT, config],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"scaling subprocess failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run_suite(
    preset: str = "quick",
    *,
    model_names: tuple[str, ...] = ("mlp", "lenet", "resnet20"),
    transforms: tuple[str, ...] = ("sam",),
    use_torch: bool = True,
    run_scaling: bool = True,
    conv_comparison: bool = False,
    torch_threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float | str]:
    """Runs the suite and returns the flat dictionary of figures.

    Args:
      preset: one of :data:`PRESETS`.
      model_names: models to measure.
      transforms: bnn_flat transforms timed besides ``sgd``/hand-written SAM/optax SAM.
      use_torch: compare with PyTorch when it is installed.
      run_scaling: run the 4-device subprocess.
      conv_comparison: also time conv models with plain ``lax`` convolutions in the scan.
      torch_threads: PyTorch intra-op threads (``None``: its default).
      log: where progress lines go.

    Returns:
      One flat key per figure (see the module docstring), plus ``*_seconds`` entries.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    config = PRESETS[preset]
    specs = _model_specs(config["size"])
    unknown = set(model_names) - set(specs)
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; choose from {sorted(specs)}")
    steps, repeats = config["steps"], config["repeats"]
    flat: dict[str, float | str] = {
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "preset": preset,
    }
    for name in model_names:
        spec = specs[name]
        make = functools.partial(_make_module, name, spec)
        begin = time.perf_counter()
        programs: dict[str, Callable[[], Any]] = {}
        steps_result = bench_transforms.bench_model(
            name,
            steps,
            repeats,
            only=set(transforms) | {"sam"},
            spec=(make, spec["shape"], spec["batch"]),
            programs_out=programs,
        )
        flat.update({f"{name}.{k}": v for k, v in steps_result.items()})
        log(
            f"{name}: sgd {1e3 * steps_result['sgd.step_seconds']:.1f} ms/step, sam/hand "
            f"{steps_result['sam.over_handwritten']:.2f}, sam/optax "
            f"{steps_result['sam.over_optax_sam']:.2f} ({time.perf_counter() - begin:.0f} s)"
        )
        if config["loop_comparison"] or conv_comparison:
            loop = scan_versus_top_level(name, spec, steps, repeats)
            flat.update({f"{name}.sgd.{k}": v for k, v in loop.items()})
            log(f"{name}: scan/top-level {loop['scan_over_top_level']:.2f}")
        if conv_comparison and name != "mlp":
            plain = scan_versus_top_level(name, spec, steps, max(1, repeats // 2), nn.Conv)
            flat.update({f"{name}.sgd_lax_conv.{k}": v for k, v in plain.items()})
            log(
                f"{name}: lax convolutions: scan/top-level {plain['scan_over_top_level']:.2f}, "
                f"scan step {plain['scan_step_seconds'] / loop['scan_step_seconds']:.1f}x ours"
            )
        bma = bench_bma.bench_model(
            name,
            config["bma_samples"],
            config["bma_batch"],
            config["bma_repeats"],
            spec=(make, spec["shape"]),
        )
        for key, value in bma.items():
            if key == "auto_choice":
                flat[f"{name}.bma_auto.choice"] = value
            elif key.endswith("_over_ideal"):
                flat[f"{name}.bma_{key.removesuffix('_over_ideal')}.over_ideal"] = value
            else:
                flat[f"{name}.bma_{key}"] = value
        log(f"{name}: BMA auto ({bma['auto_choice']}) / ideal {bma['auto_over_ideal']:.2f}")
        if use_torch and _torch_available():
            # the SGD and SAM programs just timed: the same model, batch, loss and transforms
            ours = {label: programs[label] for label in ("sgd", "sam")}
            compared = torch_comparison(
                name, spec, steps, config["torch_rounds"], torch_threads, ours=ours
            )
            for label in ("sgd", "sam"):
                flat[f"{name}.torch.{label}_step_seconds"] = compared[f"torch.{label}_step_seconds"]
                flat[f"{name}.{label}.over_torch"] = compared[f"{label}.over_torch"]
                flat[f"{name}.{label}.torch_run_step_seconds"] = compared[f"{label}.step_seconds"]
            for key in ("sgd_xla_conv.over_torch", "sgd.onednn_over_xla_conv"):
                if key in compared:
                    flat[f"{name}.{key}"] = compared[key]
            log(
                f"{name}: / torch (timed round-robin): sgd {flat[f'{name}.sgd.over_torch']:.2f} "
                f"({1e3 * compared['sgd.step_seconds']:.1f} vs "
                f"{1e3 * compared['torch.sgd_step_seconds']:.1f} ms), sam "
                f"{flat[f'{name}.sam.over_torch']:.2f}"
                + (
                    f"; XLA-convolution sgd {compared['sgd_xla_conv.over_torch']:.2f}"
                    if "sgd_xla_conv.over_torch" in compared
                    else ""
                )
            )
    if run_scaling:
        scaled = {n: specs[n] for n in model_names if n in ("mlp", "lenet")}
        if scaled:
            flat.update(scaling(scaled, steps, repeats))
            log("scaling: " + ", ".join(f"{k} {v:.3g}" for k, v in flat.items() if "scaling" in k))
    return flat


def main(argv: list[str] | None = None) -> dict[str, float | str]:
    """Command-line entry point (see the module docstring).

    Args:
      argv: command-line arguments (``None``: ``sys.argv``).

    Returns:
      The flat dictionary of figures (also written to ``--json``).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, smaller BMA")
    parser.add_argument("--tiny", action="store_true", help="tiny models: a smoke test only")
    parser.add_argument("--models", default="mlp,lenet,resnet20")
    parser.add_argument("--transforms", default="sam", help="comma list of bnn_flat transforms")
    parser.add_argument("--no_torch", action="store_true")
    parser.add_argument("--no_scaling", action="store_true")
    parser.add_argument("--conv_comparison", action="store_true")
    parser.add_argument("--torch_threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    flat = run_suite(
        preset,
        model_names=tuple(args.models.split(",")),
        transforms=tuple(t for t in args.transforms.split(",") if t) or ("sam",),
        use_torch=not args.no_torch,
        run_scaling=not args.no_scaling,
        conv_comparison=args.conv_comparison,
        torch_threads=args.torch_threads,
    )
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(flat, f, indent=2, sort_keys=True)
    return flat


if __name__ == "__main__":
    main()
