"""Widened-layout BatchNorm: Flax's parameters, values, statistics and derivatives; bad input."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import models
from bnn_flat.models import norm

SHAPES = [(8, 6, 6, 16), (4, 5, 3, 24), (3, 7, 5), (6, 10), (5, 3, 3, 64)]


def _inputs(shape, offset=1.5):
    x = jax.random.normal(jax.random.key(0), shape) * 2.0 + offset
    return x * jnp.linspace(0.5, 3.0, shape[-1])  # channels on different scales


def _modules(implementation, **kwargs):
    ours = norm.BatchNorm(use_running_average=False, momentum=0.9, implementation=implementation)
    theirs = nn.BatchNorm(use_running_average=False, momentum=0.9, **kwargs)
    return ours, theirs


@pytest.mark.parametrize("implementation", ["wide", "plain", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_values_statistics_and_gradients_equal_flax(shape, implementation):
    x = _inputs(shape)
    ours, theirs = _modules(implementation)
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, theirs.init(jax.random.key(1), x)
    )
    variables = {
        "params": {
            "scale": jnp.linspace(0.5, 2.0, shape[-1]),
            "bias": jnp.linspace(-1.0, 1.0, shape[-1]),
        },
        "batch_stats": {
            "mean": jnp.full(shape[-1], 0.3),
            "var": jnp.full(shape[-1], 2.0),
        },
    }
    y, updates = ours.apply(variables, x, mutable=["batch_stats"])
    z, their_updates = theirs.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, z, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            updates["batch_stats"][name], their_updates["batch_stats"][name], rtol=1e-5
        )
    # the running statistics follow momentum * old + (1 - momentum) * batch (biased variance)
    flat = np.asarray(x, np.float64).reshape(-1, shape[-1])
    np.testing.assert_allclose(
        updates["batch_stats"]["var"], 0.9 * 2.0 + 0.1 * flat.var(axis=0), rtol=1e-5
    )
    weights = jax.random.normal(jax.random.key(2), shape)

    def loss(module):
        def f(params, inputs):
            out, _ = module.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                inputs,
                mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(out) * weights)

        return f

    grads = jax.grad(loss(ours), (0, 1))(variables["params"], x)
    their_grads = jax.grad(loss(theirs), (0, 1))(variables["params"], x)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(their_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))
    # forward over reverse (Hessian-vector products) and vmap
    tangent = jax.random.normal(jax.random.key(3), shape)

    def hvp(f):
        return jax.jvp(lambda v: jax.grad(f, 1)(variables["params"], v), (x,), (tangent,))[1]

    their_hvp = hvp(loss(theirs))
    np.testing.assert_allclose(
        hvp(loss(ours)), their_hvp, rtol=1e-3, atol=1e-3 * float(jnp.max(jnp.abs(their_hvp)))
    )
    batched = jax.jit(jax.vmap(lambda v: loss(ours)(variables["params"], v)))(
        jnp.stack([x, 2.0 * x])
    )
    np.testing.assert_allclose(
        batched,
        [loss(theirs)(variables["params"], x), loss(theirs)(variables["params"], 2.0 * x)],
        rtol=1e-4,
    )


def test_gradients_match_float64_reference():
    x = _inputs((16, 8, 8, 16), offset=4.0)  # mean large against the spread: E[x^2] - E[x]^2
    params = {"scale": jnp.linspace(0.5, 2.0, 16), "bias": jnp.zeros(16)}
    weights = jax.random.normal(jax.random.key(2), x.shape)

    def reference(p, inputs, w):
        flat = inputs.reshape(-1, 16)
        out = (inputs - flat.mean(0)) / jnp.sqrt(flat.var(0) + 1e-5) * p["scale"] + p["bias"]
        return jnp.sum(jnp.sin(out) * w)

    def ours(p, inputs):
        module = norm.BatchNorm(use_running_average=False, implementation="wide")
        out, _ = module.apply(
            {"params": p, "batch_stats": {"mean": jnp.zeros(16), "var": jnp.ones(16)}},
            inputs,
            mutable=["batch_stats"],
        )
        return jnp.sum(jnp.sin(out) * weights)

    with jax.enable_x64():
        as64 = lambda v: jnp.asarray(v, jnp.float64)  # noqa: E731
        expected = jax.grad(reference, (0, 1))(jax.tree.map(as64, params), as64(x), as64(weights))
        expected = jax.tree.map(np.asarray, expected)
    got = jax.grad(ours, (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(np.max(np.abs(b))))


def test_evaluation_mode_uses_running_statistics_and_init_leaves_them():
    x = _inputs((4, 4, 4, 8))
    module = norm.BatchNorm(use_running_average=True)
    variables = module.init(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(8))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(8))
    stats = {"mean": jnp.arange(8.0), "var": jnp.full(8, 4.0)}
    out = module.apply({"params": variables["params"], "batch_stats": stats}, x)
    np.testing.assert_allclose(out, (x - jnp.arange(8.0)) / jnp.sqrt(4.0 + 1e-5), rtol=1e-6)
    # init in training mode does not move the running statistics (as Flax)
    training = norm.BatchNorm(use_running_average=False)
    initial = training.init(jax.random.key(0), x)
    np.testing.assert_array_equal(initial["batch_stats"]["mean"], np.zeros(8))


def test_dtypes_follow_flax():
    x = _inputs((4, 4, 4, 8)).astype(jnp.bfloat16)
    ours, theirs = _modules("wide")
    variables = theirs.init(jax.random.key(0), x)
    y, _ = ours.apply(variables, x, mutable=["batch_stats"])
    z, _ = theirs.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == z.dtype == jnp.float32
    np.testing.assert_allclose(y, z, atol=2e-2)
    half = norm.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
    out, _ = half.apply(variables, x, mutable=["batch_stats"])
    assert out.dtype == jnp.bfloat16


def test_widened_reductions_in_the_compiled_program():
    x = _inputs((64, 32, 32, 16))
    module = norm.BatchNorm(use_running_average=False, implementation="wide")
    variables = module.init(jax.random.key(0), x)
    text = (
        jax.jit(lambda v: module.apply(variables, v, mutable=["batch_stats"])[0]).lower(x).as_text()
    )
    # the statistics reduce a (2048, 512) view, not the (64, 32, 32, 16) activation
    assert "tensor<2048x512xf32>" in text

    # forward and gradient: two row reductions of the activation each (the statistics;
    # sum(g) and sum(g * x_hat)); differentiating Flax's formula gives five in all
    def loss(params, inputs):
        out, _ = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            inputs,
            mutable=["batch_stats"],
        )
        return jnp.sum(out**2)

    gradient = jax.jit(jax.grad(loss, (0, 1))).lower(variables["params"], x).as_text()
    assert len(re.findall(r"stablehlo\.reduce\(.*tensor<2048x512xf32>", gradient)) == 4
    assert norm._widening(64 * 32 * 32, 16) == 32
    assert norm._widening(6, 16) == 2  # only powers of two dividing the row count
    assert norm._widening(7, 16) == 1


def test_resnet_uses_it_with_flax_parameters():
    module = models.resnet20(num_classes=10, width=4)
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    params, state = models.init(module, jax.random.key(1), x)
    assert set(params["stem_norm"]) == {"scale", "bias"}
    assert set(state["batch_stats"]["stem_norm"]) == {"mean", "var"}


def test_bad_input():
    with pytest.raises(ValueError, match="implementation"):
        norm.BatchNorm(use_running_average=False, implementation="fast").init(
            jax.random.key(0), jnp.ones((2, 3))
        )
    with pytest.raises(ValueError, match="at least one leading axis"):
        norm.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones((3,)))
