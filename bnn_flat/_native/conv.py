"""A JAX primitive for 2-D channels-last float32 convolutions run by oneDNN on the CPU.

A convolution, its input gradient and its kernel gradient are three roles of one trilinear
form ``T(x, w, g) = sum x[n, p * s + k * d - pad, i] w[k, i, o] g[n, p, o]``: each role
computes one operand's slot from the other two, and is linear in each of them. So one
bilinear primitive with a ``role`` parameter covers everything JAX needs:

* JVP: the product rule (``defbilinear``), each term the same primitive;
* transpose: with respect to either operand, another role of the same form, so reverse mode,
  forward-over-reverse (Hessian-vector products) and reverse-over-reverse all run on oneDNN;
* ``vmap``: a batch on the input/output-gradient operand alone folds into the batch axis;
  anything else loops over the batch (``lax.map``) on oneDNN;
* non-CPU platforms lower the same role through ``lax.conv_general_dilated``.

:func:`conv2d` is the entry point; :mod:`bnn_flat.models.conv` selects it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from bnn_flat._native import FFI_TARGET

__all__ = ["calls_native_convolutions", "conv2d", "conv_role"]

_NUMBERS = ("NHWC", "HWIO", "NHWC")
_conv_p = Primitive("bnn_flat_onednn_conv")


def conv_role(a, b, *, role, strides, dilation, pad_lo, pad_hi, out_shape):
    """Bind the primitive: role 0 ``y = conv(x=a, w=b)``, 1 ``x = dT/dx(g=a, w=b)``, 2
    ``w = dT/dw(x=a, g=b)``; ``out_shape`` is the computed operand's shape."""
    return _conv_p.bind(
        a,
        b,
        role=int(role),
        strides=tuple(strides),
        dilation=tuple(dilation),
        pad_lo=tuple(pad_lo),
        pad_hi=tuple(pad_hi),
        out_shape=tuple(out_shape),
    )


def calls_native_convolutions(function, *args) -> bool:
    """Whether ``function(*args)`` runs oneDNN convolutions (traced abstractly, not run).

    Example:
      >>> import jax.numpy as jnp
      >>> calls_native_convolutions(jnp.sin, jnp.ones(3))
      False
    """
    return _mentions(jax.make_jaxpr(function)(*args).jaxpr)


def _mentions(jaxpr) -> bool:
    for equation in jaxpr.eqns:
        if equation.primitive is _conv_p:
            return True
        for value in equation.params.values():
            for inner in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(inner, "jaxpr", inner)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns") and _mentions(inner):
                    return True
    return False


def conv2d(
    x: jax.Array,
    w: jax.Array,
    strides: Sequence[int],
    padding: Sequence[tuple[int, int]],
    dilation: Sequence[int] = (1, 1),
) -> jax.Array:
    """``lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
    dimension_numbers=("NHWC", "HWIO", "NHWC"))`` on oneDNN (float32, explicit padding)."""
    strides, dilation = tuple(int(s) for s in strides), tuple(int(d) for d in dilation)
    pad_lo = tuple(int(lo) for lo, _ in padding)
    pad_hi = tuple(int(hi) for _, hi in padding)
    out_shape = jax.eval_shape(
        functools.partial(_lax_conv, strides=strides, dilation=dilation, pad_lo=pad_lo,
                          pad_hi=pad_hi),
        x, w,
    ).shape  # fmt: skip
    return conv_role(
        x, w, role=0, strides=strides, dilation=dilation, pad_lo=pad_lo, pad_hi=pad_hi,
        out_shape=out_shape,
    )  # fmt: skip


def _lax_conv(x, w, *, strides, dilation, pad_lo, pad_hi):
    return lax.conv_general_dilated(
        x, w, strides, list(zip(pad_lo, pad_hi, strict=True)), rhs_dilation=dilation,
        dimension_numbers=_NUMBERS,
    )  # fmt: skip


def _reference(a, b, *, role, strides, dilation, pad_lo, pad_hi, out_shape):
    """The role through ``lax`` (non-CPU lowering and the tests' reference)."""
    conv = functools.partial(
        _lax_conv, strides=strides, dilation=dilation, pad_lo=pad_lo, pad_hi=pad_hi
    )
    like = jax.ShapeDtypeStruct(out_shape, a.dtype)
    if role == 0:
        return conv(a, b)
    if role == 1:
        return jax.linear_transpose(lambda x: conv(x, b), like)(a)[0]
    return jax.linear_transpose(lambda w: conv(a, w), like)(b)[0]


def _abstract_eval(a, b, *, role, strides, dilation, pad_lo, pad_hi, out_shape):
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise TypeError(f"oneDNN convolution takes float32 operands, got {a.dtype}, {b.dtype}")
    if a.ndim != 4 or b.ndim != 4 or len(out_shape) != 4:
        raise ValueError("oneDNN convolution takes 4-D NHWC/HWIO operands")
    return jax.core.ShapedArray(out_shape, jnp.float32)


def _lowering(ctx, a, b, *, role, strides, dilation, pad_lo, pad_hi, out_shape):
    del out_shape  # the result type comes from ctx.avals_out
    as_array = lambda values: np.asarray(values, dtype=np.int64)
    return jax.ffi.ffi_lowering(FFI_TARGET)(
        ctx, a, b, role=np.int64(role), strides=as_array(strides),
        dilation=as_array(dilation), pad_lo=as_array(pad_lo), pad_hi=as_array(pad_hi),
    )  # fmt: skip


def _params_with(params, role, out_shape):
    return {**params, "role": role, "out_shape": tuple(out_shape)}


def _transpose_a(cotangent, a, b, **params):
    """Cotangent of the first operand (``a`` is the undefined primal)."""
    role, shape = params["role"], a.aval.shape
    if role == 0:  # y = C(x, w): dx = role 1 (g=ct, w)
        return conv_role(cotangent, b, **_params_with(params, 1, shape))
    if role == 1:  # x = C1(g, w): dg = role 0 (x=ct, w)
        return conv_role(cotangent, b, **_params_with(params, 0, shape))
    return conv_role(b, cotangent, **_params_with(params, 1, shape))  # w = C2(x, g): dx


def _transpose_b(cotangent, a, b, **params):
    """Cotangent of the second operand (``b`` is the undefined primal)."""
    role, shape = params["role"], b.aval.shape
    if role == 0:  # y = C(x, w): dw = role 2 (x, g=ct)
        return conv_role(a, cotangent, **_params_with(params, 2, shape))
    if role == 1:  # x = C1(g, w): dw = role 2 (x=ct, g)
        return conv_role(cotangent, a, **_params_with(params, 2, shape))
    return conv_role(a, cotangent, **_params_with(params, 0, shape))  # w = C2(x, g): dg


def _batch(args, dims, **params):
    a, b = args
    a_dim, b_dim = dims
    role = params["role"]
    if b_dim is None and role in (0, 1):
        # a batch of inputs (or output gradients) with one kernel: fold it into the batch axis
        a = jnp.moveaxis(a, a_dim, 0)
        size = a.shape[0]
        folded = a.reshape((size * a.shape[1], *a.shape[2:]))
        out_shape = params["out_shape"]
        out = conv_role(
            folded, b, **_params_with(params, role, (size * out_shape[0], *out_shape[1:]))
        )
        return out.reshape((size, *out_shape)), 0
    size = a.shape[a_dim] if a_dim is not None else b.shape[b_dim]
    a = jnp.moveaxis(a, a_dim, 0) if a_dim is not None else a
    b = jnp.moveaxis(b, b_dim, 0) if b_dim is not None else b

    def one(index):
        a_i = a[index] if a_dim is not None else a
        b_i = b[index] if b_dim is not None else b
        return conv_role(a_i, b_i, **params)

    return lax.map(one, jnp.arange(size)), 0


def _impl(a, b, **params):
    # eager calls run the same compiled custom call
    return _jitted(**params)(a, b)


@functools.cache
def _jitted(**params):
    return jax.jit(functools.partial(conv_role, **params))


_conv_p.def_impl(_impl)
_conv_p.def_abstract_eval(_abstract_eval)
ad.defbilinear(_conv_p, _transpose_a, _transpose_b)
batching.primitive_batchers[_conv_p] = _batch
mlir.register_lowering(_conv_p, _lowering, platform="cpu")
mlir.register_lowering(_conv_p, mlir.lower_fun(_reference, multiple_results=False))
