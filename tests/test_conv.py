"""Loop-friendly convolutions: equal to lax's forward and all derivatives; model defaults."""

import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from bnn_flat import _native, models
from bnn_flat.models import conv

_CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")

# (input shape, kernel shape, strides, padding, lhs dilation, rhs dilation)
_CASES = [
    ((3, 8, 8, 3), (3, 3, 3, 5), (1, 1), ((1, 1), (1, 1)), None, None),
    ((3, 9, 9, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), None, None),
    ((2, 8, 8, 4), (1, 1, 4, 6), (2, 2), "VALID", None, None),
    ((2, 7, 7, 1), (5, 5, 1, 6), (1, 1), "SAME", None, None),
    ((2, 10, 9, 2), (3, 2, 2, 3), (2, 1), ((2, 0), (1, 3)), None, None),
    ((2, 9, 9, 2), (3, 3, 2, 3), (1, 2), "SAME", None, (2, 1)),
    ((2, 5, 5, 2), (3, 3, 2, 3), (1, 1), ((1, 1), (1, 1)), (2, 2), None),
    # Eigen convolutions on features zero-padded to a multiple of 8 (6 -> 8, 12 -> 16)
    ((2, 8, 8, 6), (3, 3, 6, 12), (1, 1), "SAME", None, None),
    ((2, 9, 9, 12), (3, 3, 12, 6), (2, 2), ((1, 1), (1, 1)), None, None),
]


def _lax(x, w, strides, padding, lhs_dilation, rhs_dilation):
    return lax.conv_general_dilated(
        x, w, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers=_CHANNELS_LAST
    )


def _ours(x, w, strides, padding, lhs_dilation, rhs_dilation, implementation="canonical"):
    return conv.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers=_CHANNELS_LAST,
        implementation=implementation,
    )


def _onednn(x, w, strides, padding, lhs_dilation, rhs_dilation):
    return _ours(x, w, strides, padding, lhs_dilation, rhs_dilation, implementation="onednn")


_NATIVE_PLATFORM = sys.platform.startswith("linux") and platform.machine() == "x86_64"
_IMPLEMENTATIONS = [
    pytest.param(_ours, id="canonical"),
    pytest.param(
        _onednn,
        id="onednn",
        marks=pytest.mark.skipif(not _NATIVE_PLATFORM, reason="oneDNN wheels: Linux x86-64"),
    ),
]


def _data(x_shape, w_shape):
    x = jax.random.normal(jax.random.key(0), x_shape)
    w = jax.random.normal(jax.random.key(1), w_shape)
    return x, w


def _derivatives(fn, config, w, x):
    """Value, gradients, JVP, Hessian-vector product and a second-order gradient, jitted."""

    def loss(w, x):
        return jnp.sum(jnp.tanh(fn(x, w, *config)))

    def everything(w, x):
        grads = jax.grad(loss, argnums=(0, 1))(w, x)
        jvp = jax.jvp(loss, (w, x), (jnp.cos(w), jnp.sin(x)))[1]
        hvp = jax.jvp(lambda v: jax.grad(loss)(v, x), (w,), (jnp.cos(w),))[1]
        second = jax.grad(lambda v: jnp.sum(jax.grad(loss, argnums=1)(v, x) ** 2))(w)
        return fn(x, w, *config), grads, jvp, hvp, second

    return jax.jit(everything)(w, x)


@pytest.mark.parametrize("ours", _IMPLEMENTATIONS)
@pytest.mark.parametrize("case", _CASES)
def test_forward_and_derivatives_equal_lax(case, ours):
    x_shape, w_shape, *config = case
    x, w = _data(x_shape, w_shape)
    got = _derivatives(ours, config, w, x)
    want = _derivatives(_lax, config, w, x)
    names = ("forward", "grads", "jvp", "hvp", "second order")
    for name, a, b in zip(names, got, want, strict=True):
        # float32 summation order differs (shifted-sum forward, Eigen's blocking): compare
        # each array on the scale of its largest entry
        jax.tree.map(
            lambda u, v, name=name: np.testing.assert_allclose(
                u, v, rtol=1e-4, atol=1e-5 * (1.0 + float(np.max(np.abs(v)))), err_msg=name
            ),
            a,
            b,
        )


@pytest.mark.parametrize("ours", _IMPLEMENTATIONS)
def test_gradients_match_inside_scan_and_vmap(ours):
    x, w = _data((2, 6, 6, 3), (3, 3, 3, 4))
    config = ((2, 2), ((1, 1), (1, 1)), None, None)

    def epoch(fn):
        def body(kernel, batch):
            grad = jax.grad(lambda k: jnp.sum(fn(batch, k, *config) ** 2))(kernel)
            return kernel - 1e-3 * grad, None

        return jax.jit(lambda k: jax.lax.scan(body, k, jnp.stack([x, 2 * x, -x]))[0])(w)

    np.testing.assert_allclose(epoch(ours), epoch(_lax), rtol=1e-5, atol=1e-6)
    stacked = jnp.stack([w, 2 * w])
    per_kernel = lambda fn: jax.vmap(  # noqa: E731
        jax.grad(lambda k: jnp.sum(jnp.sin(fn(x, k, *config))))
    )(stacked)
    np.testing.assert_allclose(per_kernel(ours), per_kernel(_lax), rtol=1e-5, atol=1e-5)


def _compiled_convolutions(fn, x, w):
    """dim_labels of every convolution in a scan of gradient steps on ``fn``."""

    def body(carry, _):
        kernel, inputs = carry
        gk, gx = jax.grad(
            lambda k, v: jnp.sum(fn(v, k, (1, 1), "SAME", None, None) ** 2), argnums=(0, 1)
        )(kernel, inputs)
        return (kernel + gk, inputs + gx), None

    text = jax.jit(lambda k, v: lax.scan(body, (k, v), None, length=2)[0])
    text = text.lower(w, x).compile().as_text()
    return [
        line.split("dim_labels=")[1].split(",")[0]
        for line in text.splitlines()
        if " convolution(" in line
    ]


def test_gradient_convolutions_are_canonical_inside_loops():
    """Inside a scan every convolution of the gradient is in channels-last canonical form."""
    x, w = _data((2, 6, 6, 4), (3, 3, 4, 4))  # 36 terms per output: an Eigen forward
    ours = _compiled_convolutions(_ours, x, w)
    assert len(ours) == 3 and set(ours) == {"b01f_01io->b01f"}
    assert set(_compiled_convolutions(_lax, x, w)) != {"b01f_01io->b01f"}  # the slow forms


def test_small_convolutions_compute_their_value_as_a_shifted_sum():
    """A 3 x 3 x 3-term first layer has no forward convolution; its derivatives stay canonical."""
    x, w = _data((2, 6, 6, 3), (3, 3, 3, 4))
    ours = _compiled_convolutions(_ours, x, w)
    assert len(ours) == 2 and set(ours) == {"b01f_01io->b01f"}  # input and kernel gradients
    forward = jax.jit(lambda v, k: _ours(v, k, (1, 1), "SAME", None, None))
    assert " convolution(" not in forward.lower(x, w).compile().as_text()
    np.testing.assert_allclose(
        forward(x, w), _lax(x, w, (1, 1), "SAME", None, None), rtol=1e-5, atol=1e-5
    )
    # one more input feature and the forward is an Eigen convolution again
    x4, w4 = _data((2, 6, 6, 4), (3, 3, 4, 4))
    assert " convolution(" in forward.lower(x4, w4).compile().as_text()
    assert conv.SHIFTED_SUM_MAX_TERMS == 32


def test_features_are_padded_to_whole_vectors():
    """6 -> 12 features run as 8 -> 16 in every convolution of the gradient; same numbers."""
    x, w = _data((2, 6, 6, 6), (3, 3, 6, 12))

    def loss(v, k):
        return jnp.sum(_ours(v, k, (1, 1), "SAME", None, None) ** 2)

    text = jax.jit(jax.grad(loss, (0, 1))).lower(x, w).compile().as_text()
    shapes = sorted(
        line.split(" = ")[1].split("{")[0] for line in text.splitlines() if " convolution(" in line
    )
    # forward (2,6,6,16); input gradient (2,6,6,8); kernel gradient (8,3,3,16)
    assert shapes == ["f32[2,6,6,16]", "f32[2,6,6,8]", "f32[8,3,3,16]"]
    assert conv.FEATURE_ALIGNMENT == 8


def test_fallbacks_and_option_validation():
    x, w = _data((2, 6, 6, 4), (3, 3, 2, 4))
    grouped = conv.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=_CHANNELS_LAST, feature_group_count=2
    )
    want = lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=_CHANNELS_LAST, feature_group_count=2
    )
    np.testing.assert_allclose(grouped, want, rtol=1e-6)
    assert conv.resolve_implementation("canonical") == "canonical"
    if jax.default_backend() != "cpu":
        assert conv.resolve_implementation("auto") == "lax"
    elif _NATIVE_PLATFORM and jax.device_count() == 1:
        # the oneDNN kernel is a dependency on this platform: it must build and load
        assert conv.resolve_implementation("auto") == "onednn", _native.status()
    else:
        assert conv.resolve_implementation("auto") == "canonical"
    with pytest.raises(ValueError, match="implementation"):
        conv.resolve_implementation("fast")
    with pytest.raises(ValueError, match="implementation"):
        conv.Conv(4, (3, 3), implementation="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="padding"):
        conv.Conv(4, (3, 3), padding="CIRCULAR").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="rank"):
        conv.Conv(4, (3, 3)).init(jax.random.key(0), x[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(features=5, kernel_size=(3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False),
        dict(features=3, kernel_size=(5, 5), padding="SAME"),
        dict(features=4, kernel_size=(1, 1), strides=(2, 2), padding="VALID"),
        dict(features=2, kernel_size=(3, 3), padding=1, kernel_dilation=2),
    ],
)
def test_module_equals_flax_conv(kwargs):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ours, theirs = conv.Conv(**kwargs), nn.Conv(**kwargs)
    params = ours.init(jax.random.key(1), x)
    reference = theirs.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
    # rtol 1e-5: the shifted-sum forward of small convolutions sums in another order
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-5, atol=1e-6)
    grad = lambda module: jax.jit(  # noqa: E731
        jax.grad(lambda p: jnp.sum(module.apply(p, x) ** 2))
    )(params)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        grad(ours),
        grad(theirs),
    )


@pytest.mark.parametrize("name", ["lenet", "resnet"])
def test_models_default_to_fast_conv_with_same_numbers(name):
    if name == "lenet":
        fast, plain = models.LeNet(num_classes=3), models.LeNet(num_classes=3, conv=nn.Conv)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    else:
        fast = models.ResNet(stage_sizes=(1, 1), num_classes=3, width=4)
        plain = models.ResNet(stage_sizes=(1, 1), num_classes=3, width=4, conv=nn.Conv)
        x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    assert fast.conv is conv.Conv
    params, state = models.init(fast, jax.random.key(1), x)
    plain_params, _ = models.init(plain, jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, params, plain_params)

    def loss(module):
        apply = models.make_apply(module)
        return lambda p: jnp.sum(apply(p, state, x, train=True, key=None)[0] ** 2)

    fast_value, fast_grads = jax.jit(jax.value_and_grad(loss(fast)))(params)
    plain_value, plain_grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    np.testing.assert_allclose(fast_value, plain_value, rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
        fast_grads,
        plain_grads,
    )


@pytest.mark.slow
def test_benchmark_suite_smoke(tmp_path):
    """The suite's plumbing at tiny sizes: every figure present, positive and finite."""
    from experiments import bench

    flat = bench.run_suite("tiny", model_names=("mlp",), run_scaling=False, log=lambda _: None)
    expected = [
        "mlp.sgd.over_plain",
        "mlp.sam.over_plain",
        "mlp.sam.over_handwritten",
        "mlp.sam.over_optax_sam",
        "mlp.optax_sam.over_handwritten",
        "mlp.sgd.scan_over_top_level",
        "mlp.bma_vmap.over_ideal",
        "mlp.bma_map.over_ideal",
        "mlp.bma_chunked.over_ideal",
        "mlp.bma_auto.over_ideal",
    ]
    if bench._torch_available():
        expected += ["mlp.sgd.over_torch", "mlp.sam.over_torch"]
    for key in expected:
        assert np.isfinite(flat[key]) and flat[key] > 0, key
    assert flat["mlp.sgd.over_plain"] == 1.0
    assert flat["mlp.bma_auto.choice"] in ("vmap", "map", "chunked")
    scaled = bench.scaling({"mlp": bench._model_specs("tiny")["mlp"]}, steps=1, repeats=1)
    assert scaled["scaling.mlp.devices4_over_devices1"] > 0
    assert scaled["scaling.mlp.max_abs_difference"] < 1e-5  # sharded step equals one device
    with pytest.raises(ValueError, match="preset"):
        bench.run_suite("huge")
    # a timed run that diverges is refused, not timed
    from experiments.bench_transforms import _timed_interleaved

    finite = (lambda x: x * 2.0, (jnp.ones(3),))
    assert set(_timed_interleaved({"ok": finite}, repeats=1)) == {"ok"}
    diverging = (lambda x: x / 0.0 - x / 0.0, (jnp.ones(3),))
    with pytest.raises(RuntimeError, match="'nan_run' ends in a non-finite state"):
        _timed_interleaved({"ok": finite, "nan_run": diverging}, repeats=1)
    with pytest.raises(ValueError, match="unknown models"):
        bench.run_suite("tiny", model_names=("vgg",))


@pytest.mark.slow
def test_sabma_benchmark_reports_the_floor():
    """bench_sabma at a tiny size: the floor runs and ratios are present and consistent."""
    from bnn_flat import models
    from experiments import bench_sabma

    spec = (lambda: models.mlp([8], num_outputs=10), (4, 4, 1), 8)
    result = bench_sabma.bench_model(
        "tiny", steps=1, repeats=1, rank=2, runs=("sgd", "sam", "sabma"), spec=spec
    )
    for key in ("tiny.floor.over_sgd", "tiny.sabma.over_floor", "tiny.stream.step_seconds"):
        assert np.isfinite(result[key]) and result[key] > 0, key
    floor = (
        result["tiny.sam.step_seconds"]
        + 2.0 * result["tiny.stream.step_seconds"]
        + result["tiny.draw.step_seconds"]
    )
    np.testing.assert_allclose(result["tiny.floor.step_seconds"], floor)
    np.testing.assert_allclose(
        result["tiny.sabma.over_floor"], result["tiny.sabma.step_seconds"] / floor
    )
    assert result["tiny.trainable_parameters"] == 8 * 16 + 8 + 8 * 10 + 10
