"""The library's standard-normal draws: bit for bit those of ``jax.random.normal``, faster."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat._random import standard_normal


@pytest.mark.parametrize("shape", [(1,), (2,), (7,), (3, 5), (2, 3, 4), (1001,), (20_001,)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_equals_jax_random_normal(shape, dtype):
    key = jax.random.key(11)
    ours = jax.jit(lambda k: standard_normal(k, shape, dtype))(key)
    expected = jax.random.normal(key, shape, dtype)
    assert ours.dtype == expected.dtype and ours.shape == expected.shape
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(expected, np.float32))


def test_equals_jax_random_normal_in_float64():
    with jax.enable_x64():
        key = jax.random.key(4)
        ours = jax.jit(lambda k: standard_normal(k, (33, 3), jnp.float64))(key)
        np.testing.assert_array_equal(ours, jax.random.normal(key, (33, 3), jnp.float64))


def test_raw_keys_batched_keys_and_eager_calls():
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(
        jax.jit(lambda k: standard_normal(k, (9,)))(raw), jax.random.normal(raw, (9,))
    )
    keys = jax.random.split(jax.random.key(5), 4)
    ours = jax.jit(jax.vmap(lambda k: standard_normal(k, (6,))))(keys)
    np.testing.assert_array_equal(ours, jax.vmap(lambda k: jax.random.normal(k, (6,)))(keys))
    np.testing.assert_array_equal(
        standard_normal(jax.random.key(6), (5,)), jax.random.normal(jax.random.key(6), (5,))
    )
    assert standard_normal(jax.random.key(0), (0, 3)).shape == (0, 3)


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_key_implementations_use_jax_random(impl):
    key = jax.random.key(2, impl=impl)
    ours = jax.jit(lambda k: standard_normal(k, (8,)))(key)
    np.testing.assert_array_equal(ours, jax.random.normal(key, (8,)))


def test_threefry_hash_is_straight_line_code():
    """JAX's CPU lowering is a rolled five-iteration loop; ours has only the fusion barrier."""
    key = jax.random.key(0)

    def loops(function):
        text = jax.jit(function).lower(key).compile().as_text()
        return len(re.findall(r"\bwhile\(", text))

    assert loops(lambda k: jax.random.normal(k, (1000,))) == 1  # the rolled Threefry loop
    assert loops(lambda k: standard_normal(k, (1000,))) == 1  # computed_once, nothing else
    assert loops(lambda k: standard_normal(k, (1000,)) + jax.random.normal(k, ())) == 2
