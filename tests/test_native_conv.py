"""oneDNN convolutions through the XLA FFI: build, dispatch, numbers, batching, fallbacks."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnn_flat import _native
from bnn_flat.models import conv

pytestmark = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the oneDNN wheels exist for Linux x86-64 only",
)

_NUMBERS = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, strides=(1, 1), padding="SAME", rhs_dilation=None):
    return lax.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=_NUMBERS
    )


def _onednn(x, w, strides=(1, 1), padding="SAME", rhs_dilation=None):
    return conv.conv_general_dilated(
        x, w, strides, padding, rhs_dilation=rhs_dilation, dimension_numbers=_NUMBERS,
        implementation="onednn",
    )  # fmt: skip


def _data(x_shape, w_shape, seed=0):
    kx, kw = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, x_shape), 0.2 * jax.random.normal(kw, w_shape)


def _close(a, b, rtol=1e-4):
    scale = 1.0 + float(np.max(np.abs(np.asarray(b))))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5 * scale)


def test_kernel_builds_loads_and_uses_jit_kernels():
    assert _native.status()["onednn"], _native.status()
    assert conv.resolve_implementation("onednn") == "onednn"
    config = ((1, 1), (1, 1), (1, 1), (1, 1))
    shapes = ((8, 16, 16, 16), (3, 3, 16, 16), (8, 16, 16, 16))
    for role in range(3):
        name = _native.implementation_name(role, *shapes, config)
        # oneDNN's reference kernels ("ref:any") are orders of magnitude slower
        assert "ref" not in name and name, name


@pytest.mark.parametrize(
    "x_shape, w_shape, strides, padding, dilation",
    [
        ((4, 16, 16, 16), (3, 3, 16, 16), (1, 1), "SAME", None),  # a ResNet-20 block
        ((4, 16, 16, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1)), None),  # stage transition
        ((4, 8, 8, 16), (1, 1, 16, 32), (2, 2), "VALID", None),  # projection shortcut
        ((4, 12, 12, 6), (5, 5, 6, 16), (1, 1), "VALID", None),  # LeNet's second layer
        ((3, 11, 10, 8), (3, 3, 8, 8), (1, 2), ((2, 0), (1, 3)), (2, 1)),  # asymmetric
    ],
)
def test_values_and_all_derivatives_equal_lax(x_shape, w_shape, strides, padding, dilation):
    x, w = _data(x_shape, w_shape)

    def derivatives(fn):
        loss = lambda w, x: jnp.sum(jnp.tanh(fn(x, w, strides, padding, dilation)) ** 2)

        def everything(w, x):
            grads = jax.grad(loss, (0, 1))(w, x)
            jvp = jax.jvp(loss, (w, x), (jnp.cos(w), jnp.sin(x)))[1]
            hvp = jax.jvp(jax.grad(loss, (0, 1)), (w, x), (jnp.cos(w), jnp.sin(x)))[1]
            second = jax.grad(lambda v: jnp.sum(jax.grad(loss, 1)(v, x) ** 2))(w)
            return fn(x, w, strides, padding, dilation), grads, jvp, hvp, second

        return jax.jit(everything)(w, x)

    got, want = derivatives(_onednn), derivatives(_lax)
    jax.tree.map(_close, got, want)


def test_compiled_gradient_is_three_custom_calls_and_no_xla_convolution():
    x, w = _data((2, 8, 8, 8), (3, 3, 8, 8))

    def step(w, x):
        return jax.grad(lambda w, x: jnp.sum(_onednn(x, w) ** 2), (0, 1))(w, x)

    text = jax.jit(step).lower(w, x).compile().as_text()
    assert text.count(f'custom_call_target="{_native.FFI_TARGET}"') == 3
    assert " convolution(" not in text


def test_vmap_folds_a_batch_of_inputs_and_loops_over_kernels():
    x, w = _data((2, 6, 6, 8), (3, 3, 8, 4))
    xs = jnp.stack([x, 2.0 * x, -x])
    ws = jnp.stack([w, -w, 0.5 * w])
    conv_fn = lambda x, w: _onednn(x, w, (2, 2), "SAME")
    lax_fn = lambda x, w: _lax(x, w, (2, 2), "SAME")
    for axes, args in [((0, None), (xs, w)), ((None, 0), (x, ws)), ((0, 0), (xs, ws))]:
        got = jax.jit(jax.vmap(conv_fn, axes))(*args)
        _close(got, jax.vmap(lax_fn, axes)(*args))
        grads = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv_fn(x, w))), (0, 1)), axes)
        want = jax.vmap(jax.grad(lambda x, w: jnp.sum(jnp.sin(lax_fn(x, w))), (0, 1)), axes)
        jax.tree.map(_close, grads(*args), want(*args))
    # a batch of inputs under one kernel is one call on the folded batch, not a loop
    text = jax.jit(jax.vmap(conv_fn, (0, None))).lower(xs, w).compile().as_text()
    assert text.count(f'custom_call_target="{_native.FFI_TARGET}"') == 1
    assert " while(" not in text


def test_unsupported_convolutions_fall_back_to_xla():
    x, w = _data((2, 7, 7, 4), (3, 3, 4, 4))
    # bfloat16 operands, input dilation and negative (cropping) padding: XLA's convolution
    cases = [
        (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), {}),
        (x, w, {"lhs_dilation": (2, 2), "padding": ((1, 1), (1, 1))}),
        (x, w, {"padding": ((-1, 1), (1, 1))}),
    ]
    for xi, wi, kwargs in cases:
        padding = kwargs.pop("padding", "SAME")
        fn = lambda v, k, padding=padding, kwargs=kwargs: conv.conv_general_dilated(
            v, k, (1, 1), padding, dimension_numbers=_NUMBERS, implementation="onednn", **kwargs
        )
        text = jax.jit(fn).lower(xi, wi).compile().as_text()
        assert _native.FFI_TARGET not in text
        want = lax.conv_general_dilated(xi, wi, (1, 1), padding, dimension_numbers=_NUMBERS,
                                        **kwargs)  # fmt: skip
        np.testing.assert_allclose(
            np.asarray(fn(xi, wi), np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2
        )


def test_eager_calls_and_models_run_on_onednn():
    x, w = _data((2, 6, 6, 8), (3, 3, 8, 8))
    _close(_onednn(x, w), _lax(x, w))  # outside jit: the primitive's own compiled call
    from bnn_flat import models

    module = models.ResNet20(num_classes=3, width=8)
    inputs = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    params, state = models.init(module, jax.random.key(3), inputs)
    apply = models.make_apply(module)
    text = (
        jax.jit(jax.grad(lambda p: jnp.sum(apply(p, state, inputs, train=True, key=None)[0])))
        .lower(params)
        .as_text()
    )
    # 21 convolutions (19 3x3, the 3-channel stem included, and 2 projection shortcuts) and
    # two derivatives each, less the stem's input gradient, which nothing needs
    assert text.count(_native.FFI_TARGET) == 21 * 3 - 1


def _subprocess(code: str, **env) -> dict:
    environment = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=environment, check=False, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_disabled_by_environment_and_built_into_a_fresh_cache(tmp_path):
    code = """
        import json, jax
        from bnn_flat import _native
        from bnn_flat.models import conv
        out = {"auto": conv.resolve_implementation("auto"), "status": _native.status()}
        try:
            conv.resolve_implementation("onednn")
            out["error"] = None
        except RuntimeError as error:
            out["error"] = str(error)
        print(json.dumps(out))
    """
    disabled = _subprocess(code, BNN_FLAT_ONEDNN="0", BNN_FLAT_CACHE_DIR=str(tmp_path))
    assert disabled["auto"] == "canonical"
    assert "BNN_FLAT_ONEDNN=0" in disabled["status"]["reason"]
    assert "unavailable" in disabled["error"] and "BNN_FLAT_ONEDNN=0" in disabled["error"]
    assert not list(tmp_path.glob("*.so"))
    built = _subprocess(code, BNN_FLAT_CACHE_DIR=str(tmp_path))
    assert built["auto"] == "onednn" and built["status"]["onednn"], built
    assert built["error"] is None
    assert len(list(tmp_path.glob("onednn_conv-*.so"))) == 1
    # sharded programs keep XLA's convolutions (the SPMD partitioner cannot split a custom call)
    sharded = _subprocess(
        code, BNN_FLAT_CACHE_DIR=str(tmp_path),
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
    )  # fmt: skip
    assert sharded["auto"] == "canonical" and sharded["status"]["onednn"]


def _small_conv_apply(implementation):
    def apply(params, state, x, *, train, key):
        del train, key
        h = conv.conv_general_dilated(
            x, params["conv"], (1, 1), "SAME", dimension_numbers=_NUMBERS,
            implementation=implementation,
        )  # fmt: skip
        h = jax.nn.relu(h).mean(axis=(1, 2))
        return h @ params["head"], state

    return apply


def test_vi_step_is_the_same_staged_around_onednn_convolutions():
    """VI families store draws and draw gradients around oneDNN networks; same numbers."""
    import optax

    from bnn_flat import objectives, transforms
    from bnn_flat._native.conv import calls_native_convolutions
    from bnn_flat.posteriors import low_rank_vi

    kx, kc, kh = jax.random.split(jax.random.key(0), 3)
    batch = {
        "inputs": jax.random.normal(kx, (8, 6, 6, 3)),
        "labels": jnp.arange(8) % 4,
    }
    params = {
        "conv": 0.3 * jax.random.normal(kc, (3, 3, 3, 5)),
        "head": 0.3 * jax.random.normal(kh, (5, 4)),
    }
    results = {}
    for implementation in ("onednn", "canonical"):
        loss_fn = objectives.classification_loss(_small_conv_apply(implementation), num_data=64)
        native = calls_native_convolutions(
            lambda p, loss_fn=loss_fn: loss_fn(p, {}, batch, jax.random.key(1))[0], params
        )
        assert native == (implementation == "onednn")
        optimizer = optax.chain(transforms.sabma(0.5), optax.sgd(0.1))
        family = low_rank_vi.build(
            loss_fn, optimizer, num_data=64, prior_precision=2.0, rank=2, init_std=0.05
        )
        state = family.init(params, {})
        for step in range(3):
            state, info = jax.jit(family.update)(jax.random.key(step), state, batch)
        results[implementation] = (state, info.loss)
    (staged, staged_loss), (fused, fused_loss) = results["onednn"], results["canonical"]
    _close(staged_loss, fused_loss)
    for a, b in zip(jax.tree.leaves(staged), jax.tree.leaves(fused), strict=True):
        _close(a, b)
