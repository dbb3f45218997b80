r"""Compiler settings that make XLA:CPU fast for the networks this library trains.

**Convolutions.** jaxlib 0.10 runs single convolutions through YNNPACK by default on the CPU
(XLA's ``individual_convolution`` library-fusion type). For the small-channel convolutions
of CIFAR ResNets and LeNet on a 2-core machine that is much slower than XLA's own (Eigen)
convolution kernel: a ResNet-20 SGD step (batch 64) took 0.80-0.91 s with the default and
0.44-0.49 s without YNNPACK convolutions, a LeNet step 52 ms against 44 ms, measured side by
side (``python -m experiments.bench_backend``). The compiled HLO is the same; only the
kernel that runs each convolution changes, so results agree to float32 rounding.

Two ways to apply it, both only for the CPU backend and only with the jaxlib versions the
tests cover (0.10.x):

* :func:`tune_cpu` appends ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
  (XLA's default list minus convolutions) to ``XLA_FLAGS``. XLA reads ``XLA_FLAGS`` once,
  when JAX first initialises its backends, so this must run before the first computation;
  ``import bnn_flat`` calls it. It then applies to *every* CPU program of the process,
  including your own ``jax.jit`` functions. It does nothing when ``XLA_FLAGS`` already
  mentions the option (your choice wins) or when ``BNN_FLAT_CPU_TUNING=0`` is set.
* :func:`compiler_options` gives the same setting as ``jax.jit(..., compiler_options=...)``
  options, for top-level jits when the flag could not be set in time (JAX was used before
  ``bnn_flat`` was imported). :func:`bnn_flat.training.fit` passes them to its epoch program.

GPU and TPU backends ignore ``xla_cpu_*`` flags, so nothing changes there.

Example:
  >>> import bnn_flat
  >>> options = bnn_flat.backend.compiler_options()
  >>> options in ({}, {"xla_cpu_experimental_ynn_fusion_type":
  ...                  "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"})
  True
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["CPU_FLAGS", "tune_cpu", "cpu_tuning_active", "compiler_options", "status"]

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{_OPTION}=-individual_convolution",)
"""``XLA_FLAGS`` entries that :func:`tune_cpu` adds: YNNPACK stays on for dots and reductions,
and convolutions run on XLA's own CPU kernel."""

# XLA's default YNNPACK fusion types in jaxlib 0.10 without convolutions, spelled as compile
# options (which take the enum names and cannot use the '-' form).
_COMPILE_OPTION_VALUE = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
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


def cpu_tuning_active() -> bool:
    """Whether every CPU program of this process already runs with :data:`CPU_FLAGS`.

    Example:
      >>> cpu_tuning_active() in (True, False)
      True
    """
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
