"""Reshape-based pooling: Flax's values and derivatives (ties included), bad-input errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat.models import pooling


def _inputs(shape):
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))  # many tied zeros
    return x.at[0, 0, 0, 0].set(x[0, 0, 1, 0] + 1.0).at[0, 0, 1, 0].set(x[0, 0, 1, 0] + 1.0)


@pytest.mark.parametrize(
    "shape,window", [((3, 9, 7, 4), (2, 2)), ((2, 8, 8, 3), (2, 4)), ((2, 12, 5), (3,))]
)
def test_max_pool_equals_flax_with_all_derivatives(shape, window):
    x = _inputs(shape) if len(shape) == 4 else jax.random.normal(jax.random.key(0), shape)
    weights = jnp.arange(1.0, shape[-1] + 1.0)

    def loss(pool):
        return lambda v: jnp.sum(jnp.sin(pool(v)) * weights)

    ours = loss(lambda v: pooling.max_pool(v, window))
    flax = loss(lambda v: nn.max_pool(v, window, strides=window))
    np.testing.assert_array_equal(ours(x), flax(x))
    np.testing.assert_array_equal(jax.grad(ours)(x), jax.grad(flax)(x))
    # second order on tie-free inputs: at ties Flax's forward tangent and its gradient may pick
    # different window elements (ours picks the first maximum in both)
    smooth = jax.random.normal(jax.random.key(3), shape)
    tangent = jax.random.normal(jax.random.key(1), x.shape)
    hvp = lambda f: jax.jvp(jax.grad(f), (smooth,), (tangent,))[1]  # noqa: E731
    np.testing.assert_allclose(hvp(ours), hvp(flax), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(jax.grad(ours)))(jnp.stack([x, -x])),
        jax.vmap(jax.grad(flax))(jnp.stack([x, -x])),
    )


def test_max_pool_gradient_goes_to_the_first_tied_element():
    x = jnp.array([[1.0, 3.0], [3.0, 2.0]]).reshape(1, 2, 2, 1)
    grad = jax.grad(lambda v: jnp.sum(pooling.max_pool(v, (2, 2))))(x)
    np.testing.assert_array_equal(grad[0, :, :, 0], [[0.0, 1.0], [0.0, 0.0]])


def test_avg_pool_equals_flax():
    x = jax.random.normal(jax.random.key(2), (2, 9, 8, 3))
    ours = lambda v: jnp.sum(jnp.sin(pooling.avg_pool(v, (3, 2))))  # noqa: E731
    flax = lambda v: jnp.sum(jnp.sin(nn.avg_pool(v, (3, 2), strides=(3, 2))))  # noqa: E731
    np.testing.assert_allclose(ours(x), flax(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(flax)(x), rtol=1e-6, atol=1e-7)


def test_pooling_rejects_bad_windows():
    x = jnp.ones((1, 4, 4, 2))
    with pytest.raises(ValueError, match="rank"):
        pooling.max_pool(x[0], (2, 2))
    with pytest.raises(ValueError, match="positive"):
        pooling.avg_pool(x, (0, 2))
    with pytest.raises(ValueError, match="larger than the input"):
        pooling.max_pool(x, (5, 2))


def test_lenet_uses_the_element_wise_pooling_derivative():
    from bnn_flat import models

    module = models.lenet(10)
    params, state = models.init(module, jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    apply = models.make_apply(module)
    grad = jax.jit(
        jax.grad(lambda p: jnp.sum(apply(p, state, jnp.ones((2, 28, 28, 1)), train=False)[0]))
    )
    text = grad.lower(params).compile().as_text()
    assert "select-and-scatter" not in text and "scatter(" not in text
