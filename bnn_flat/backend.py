r"""Compiler settings that make XLA:CPU fast for the networks this library trains.

**YNNPACK.** jaxlib 0.10 hands single convolutions, reductions and dots to YNNPACK by
default on the CPU (XLA's ``individual_convolution``, ``reduce`` and ``dot`` library-fusion
types). Two of the three are slow for what this library runs, measured side by side on a
2-core machine (``python -m experiments.bench_backend``):

* convolutions: a ResNet-20 SGD step (batch 64) took 750-910 ms with YNNPACK convolutions and
  420-510 ms on XLA's own (Eigen) kernel; LeNet 48-52 ms against 41-44 ms;
* reductions over a short leading axis, e.g. the rank axis of a low-rank factor
  (``(5, 200704) -> (200704,)``): 37 ms each in YNNPACK, so a rank-5 low-rank VI step of a
  784-256-256-10 MLP took 41 ms against 19 ms with XLA's reduction (YNNPACK's GroupNorm
  reductions are faster, by ~15% of a ResNet-20 step, but one pathological shape costs more
  than that gains).

The tuned setting keeps YNNPACK for dots only. The compiled HLO is the same; only the kernels
that run the convolutions and reductions change, so results agree to float32 rounding.

Two ways to apply it, both only for the CPU backend and only with the jaxlib versions the
tests cover (0.10.x):

* :func:`tune_cpu` appends ``--xla_cpu_experimental_ynn_fusion_type=dot`` to ``XLA_FLAGS``.
  XLA reads ``XLA_FLAGS`` once, when JAX first initialises its backends, so this must run
  before the first computation; ``import bnn_flat`` calls it. It then applies to *every*
  CPU program of the process, including your own ``jax.jit`` functions. It does nothing
  when ``XLA_FLAGS`` already mentions the option (your choice wins) or when
  ``BNN_FLAT_CPU_TUNING=0`` is set.
* :func:`compiler_options` gives the same setting as ``jax.jit(..., compiler_options=...)``
  options, for top-level jits when the flag could not be set in time (JAX was used before
  ``bnn_flat`` was imported). :func:`bnn_flat.training.fit` passes them to its epoch program.

GPU and TPU backends ignore ``xla_cpu_*`` flags, so nothing changes there.

Example:
  >>> import bnn_flat
  >>> options = bnn_flat.backend.compiler_options()
  >>> options in ({}, {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"})
  True
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CPU_FLAGS", "tune_cpu", "compiler_options", "status"]

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{_OPTION}=dot",)
"""``XLA_FLAGS`` entries that :func:`tune_cpu` adds: YNNPACK stays on for dots; convolutions
and reductions run on XLA's own CPU kernels."""

# The same setting spelled as a compile option (which takes the enum names).
_COMPILE_OPTION_VALUE = "LIBRARY_FUSION_TYPE_DOT"
_SUPPORTED_JAXLIB = ((0, 10), (0, 11))  # [low, high) major.minor: the versions tested
_DISABLE_VARIABLE = "BNN_FLAT_CPU_TUNING"

_state: dict[str, Any] = {"applied": False, "reason": "not attempted"}


def _jaxlib_supported() -> bool:
    try:
        from jaxlib import version as jaxlib_version
    except ImportError:  # pragma: no cover - jaxlib always ships a version module
        return False
    parts = jaxlib_version.__version__.split(".")
    try:
        major_minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):  # pragma: no cover - unusual version strings
        return False
    low, high = _SUPPORTED_JAXLIB
    return low <= major_minor < high


def _disabled() -> bool:
    return os.environ.get(_DISABLE_VARIABLE, "1").strip().lower() in ("0", "false", "no", "off")


def _user_chose() -> bool:
    return _OPTION in os.environ.get("XLA_FLAGS", "")


def _backends_initialised() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - private module moved: assume the worst
        return True
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return True if check is None else bool(check())


def tune_cpu() -> bool:
    """Adds :data:`CPU_FLAGS` to ``XLA_FLAGS`` if it is still possible and wanted.

    Returns:
      ``True`` if the flags were added by this call or an earlier one; ``False`` when tuning
      is disabled (``BNN_FLAT_CPU_TUNING=0``), the user's ``XLA_FLAGS`` already set the
      option, the jaxlib version is untested, or JAX's backends were already initialised
      (then :func:`compiler_options` is the fallback). :func:`status` says which.

    Example:
      >>> isinstance(tune_cpu(), bool)
      True
    """
    if _state["applied"]:
        return True
    if _disabled():
        _state["reason"] = f"disabled by {_DISABLE_VARIABLE}"
    elif _user_chose():
        _state["reason"] = f"XLA_FLAGS already sets {_OPTION}"
    elif not _jaxlib_supported():
        _state["reason"] = "jaxlib version outside the tested range"
    elif _backends_initialised():
        _state["reason"] = "JAX backends were initialised before bnn_flat was imported"
    else:
        current = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = " ".join([current, *CPU_FLAGS]).strip()
        _state.update(applied=True, reason="XLA_FLAGS set before backend initialisation")
    return bool(_state["applied"])


def compiler_options() -> dict[str, str]:
    """``jax.jit`` compiler options with the same effect as :data:`CPU_FLAGS`.

    Empty when they are not needed or not wanted: on GPU/TPU, when the process-wide flags are
    already active, when the user's ``XLA_FLAGS`` chose the option, when tuning is disabled,
    or with an untested jaxlib. Only a *top-level* ``jax.jit`` accepts compiler options.

    Returns:
      A dict for ``jax.jit(..., compiler_options=...)``.

    Example:
      >>> import jax
      >>> f = jax.jit(lambda x: 2 * x, compiler_options=compiler_options())
      >>> float(f(1.0))
      2.0
    """
    import jax

    if (
        _state["applied"]
        or _disabled()
        or _user_chose()
        or not _jaxlib_supported()
        or jax.default_backend() != "cpu"
    ):
        return {}
    return {_OPTION: _COMPILE_OPTION_VALUE}


def status() -> dict[str, Any]:
    """What :func:`tune_cpu` did and why, for logs and bug reports.

    Example:
      >>> sorted(status())
      ['applied', 'flags', 'reason', 'xla_flags']
    """
    return {
        "applied": bool(_state["applied"]),
        "reason": _state["reason"],
        "flags": list(CPU_FLAGS),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
