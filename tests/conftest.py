"""Shared fixtures: tiny pure-JAX models that follow the bnn_flat model contract."""

import jax
import jax.numpy as jnp
import pytest


def linear_apply(params, model_state, inputs, *, train, key):
    """A linear classifier ``x W + b`` with no model state."""
    del train, key
    return inputs @ params["w"] + params["b"], model_state


def bn_mlp_apply(params, model_state, inputs, *, train, key):
    """One hidden layer with a batch-norm-like running mean and dropout (rate 0.5)."""
    h = inputs @ params["w1"]
    if train:
        mean = h.mean(axis=0)
        new_state = {"mean": 0.9 * model_state["mean"] + 0.1 * mean}
        keep = jax.random.bernoulli(key, 0.5, h.shape)
        h = jnp.where(keep, (h - mean) / 0.5, 0.0)
    else:
        new_state = model_state
        h = h - model_state["mean"]
    return jax.nn.relu(h) @ params["w2"], new_state


@pytest.fixture
def blobs():
    """A 3-class, 2-D Gaussian-blobs problem (300 points)."""
    key = jax.random.key(0)
    centres = jnp.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    labels = jnp.repeat(jnp.arange(3), 100)
    inputs = centres[labels] + 0.7 * jax.random.normal(key, (300, 2))
    return inputs, labels.astype(jnp.int32)
