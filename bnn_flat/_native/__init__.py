"""Native CPU kernels, compiled on first use: oneDNN convolutions as XLA FFI custom calls.

XLA:CPU runs convolutions through Eigen's spatial-convolution kernels (image-patch packing plus
a generic matrix-multiply kernel), which on a ResNet-20 training step are the larger part of the
gap to PyTorch on the same CPU: PyTorch runs the same convolutions through oneDNN's JIT kernels.
This package compiles ``onednn_conv.cc`` (an XLA FFI handler calling oneDNN's forward,
backward-data and backward-weights convolutions) against the oneDNN that the
``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp`` wheels install, the first time it is needed,
and caches the shared library (keyed by the source, jaxlib and oneDNN versions) in
``$BNN_FLAT_CACHE_DIR`` or ``~/.cache/bnn_flat``. :mod:`bnn_flat._native.conv` wraps it in a
JAX primitive.

Everything here is optional: without a C++ compiler, without the oneDNN wheels (they exist for
Linux x86-64 only) or with ``BNN_FLAT_ONEDNN=0`` set, :func:`onednn_available` is ``False`` and
the convolutions stay on XLA's kernels; :func:`status` says why.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

__all__ = ["DISABLE_VARIABLE", "FFI_TARGET", "implementation_name", "onednn_available", "status"]

DISABLE_VARIABLE = "BNN_FLAT_ONEDNN"
"""Set to ``0`` to keep every convolution on XLA's own kernels."""

FFI_TARGET = "bnn_flat_onednn_conv"
"""Name under which the convolution handler is registered with XLA (CPU platform)."""

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_HANDLER_SYMBOL = "BnnFlatOnednnConv"
_lock = threading.Lock()
_state: dict[str, Any] = {"loaded": None, "reason": "not attempted", "library": None}


def _distribution_file(distribution: str, suffix: str) -> Path | None:
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(entry.locate()).resolve()
            if path.exists():
                return path
    return None


def _find_onednn() -> tuple[Path, Path, str]:
    """(include directory, library directory, version) of the installed oneDNN."""
    root = os.environ.get("BNN_FLAT_ONEDNN_ROOT")
    if root:
        include, lib = Path(root) / "include", Path(root) / "lib"
        version = "custom:" + root
    else:
        header = _distribution_file("onednn-devel-cpu-gomp", "include/oneapi/dnnl/dnnl.hpp")
        library = _distribution_file("onednn-cpu-gomp", "libdnnl.so.3")
        if header is None or library is None:
            prefix = Path(sys.prefix)
            header = header or prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
            library = library or prefix / "lib" / "libdnnl.so.3"
        include, lib = header.parents[2], library.parent
        try:
            version = importlib.metadata.version("onednn-cpu-gomp")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
    if not (include / "oneapi" / "dnnl" / "dnnl.hpp").exists():
        raise RuntimeError(
            f"oneDNN headers not found under {include} (pip install onednn-devel-cpu-gomp)"
        )
    if not any(lib.glob("libdnnl.so*")):
        raise RuntimeError(f"oneDNN library not found in {lib} (pip install onednn-cpu-gomp)")
    return include, lib, version


def _cache_dir() -> Path:
    configured = os.environ.get("BNN_FLAT_CACHE_DIR")
    base = Path(configured) if configured else Path.home() / ".cache" / "bnn_flat"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return base
    except OSError:
        fallback = Path(tempfile.gettempdir()) / "bnn_flat_cache"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _build() -> Path:
    import jax
    import jaxlib

    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX or install g++)")
    include, lib, version = _find_onednn()
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                jaxlib.__version__.encode(),
                version.encode(),
                str(lib).encode(),
                compiler.encode(),
            ]
        )
    ).hexdigest()[:16]
    target = _cache_dir() / f"onednn_conv-{key}.so"
    if target.exists():
        return target
    # compile to a private name and rename: concurrent processes (pytest-xdist workers) never
    # load a half-written library
    scratch = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    command = [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{include}", str(_SOURCE), "-o", str(scratch),
        f"-L{lib}", "-ldnnl", f"-Wl,-rpath,{lib}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        scratch.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{result.stderr[-2000:]}")
    os.replace(scratch, target)
    return target


def _load() -> ctypes.CDLL | None:
    with _lock:
        if _state["loaded"] is not None:
            return _state["library"]
        if os.environ.get(DISABLE_VARIABLE, "1") == "0":
            _state.update(loaded=False, reason=f"disabled by {DISABLE_VARIABLE}=0")
            return None
        if not (sys.platform.startswith("linux") and os.uname().machine == "x86_64"):
            _state.update(loaded=False, reason="the oneDNN wheels exist for Linux x86-64 only")
            return None
        try:
            import jax

            path = _build()
            library = ctypes.CDLL(str(path))
            jax.ffi.register_ffi_target(
                FFI_TARGET, jax.ffi.pycapsule(getattr(library, _HANDLER_SYMBOL)), platform="cpu"
            )
        except Exception as error:  # any failure leaves XLA's kernels in place
            _state.update(loaded=False, reason=f"{type(error).__name__}: {error}")
            return None
        _state.update(loaded=True, reason=f"loaded {path}", library=library)
        return library


def onednn_available() -> bool:
    """Whether the oneDNN convolution kernel is compiled, loaded and registered with XLA.

    The first call compiles it (a few seconds, once per machine and version) unless a cached
    build exists.

    Example:
      >>> isinstance(onednn_available(), bool)
      True
    """
    return _load() is not None


def status() -> dict[str, Any]:
    """``{"onednn": bool, "reason": str}``: whether the native convolution is in use, and why.

    Example:
      >>> sorted(status())
      ['onednn', 'reason']
    """
    _load()
    return {"onednn": bool(_state["loaded"]), "reason": _state["reason"]}


def implementation_name(role: int, lhs_shape, rhs_shape, out_shape, config) -> str:
    """oneDNN's name for the kernel it picks for one convolution (e.g. ``"jit:avx2"``).

    Args:
      role: 0 forward, 1 input gradient, 2 kernel gradient.
      lhs_shape, rhs_shape, out_shape: input ``(N, H, W, I)``, kernel ``(KH, KW, I, O)`` and
        output ``(N, OH, OW, O)`` shapes (whatever the role computes).
      config: ``(strides, dilation, pad_lo, pad_hi)``, pairs each.
    """
    library = _load()
    if library is None:
        raise RuntimeError(f"oneDNN convolution unavailable: {_state['reason']}")
    array = lambda values: (ctypes.c_int64 * len(values))(*[int(v) for v in values])
    flat = [v for pair in config for v in pair]
    buffer = ctypes.create_string_buffer(256)
    written = library.bnn_flat_onednn_impl_info(
        ctypes.c_int64(role), array(lhs_shape), array(rhs_shape), array(out_shape),
        array(flat), buffer, ctypes.c_int(256),
    )  # fmt: skip
    if written < 0:
        raise ValueError("oneDNN rejected this convolution configuration")
    return buffer.value.decode()
