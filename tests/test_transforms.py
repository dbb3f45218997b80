"""Conformance table for every transform in :mod:`bnn_flat.transforms`.

Each row is checked for: unknown extra args ignored; chaining with ``optax.sgd``; no
recompilation; dtype preservation (float32, bfloat16); a stable state structure (also
through ``lax.cond``); ``vmap`` over keys and states; ``optax.inject_hyperparams``;
clear errors on missing extra args and bad hyper-parameters.

Compiled steps are cached per row (``_compiled_step``) so that the table compiles each
function once; random-number code is slow to compile on XLA:CPU.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import transforms as T


class Row(NamedTuple):
    name: str
    factory: Any
    kwargs: dict
    stochastic: bool
    hyperparameter: str  # numeric hyper-parameter driven through inject_hyperparams
    static_args: tuple = ()


ROWS = [
    Row("sam", T.sam, dict(rho=0.1), False, "rho"),
    Row("sam_m2", T.sam, dict(rho=0.1, num_sub_batches=2), False, "rho", ("num_sub_batches",)),
    Row("asam_paper", T.asam, dict(rho=0.5, eta=0.01), False, "rho"),
    Row("asam_davda54", T.asam, dict(rho=0.5, form="davda54"), False, "rho"),
    Row("fisher_sam", T.fisher_sam, dict(rho=0.1, eta=1.0), False, "rho"),
    Row(
        "sharpness_aware_custom",
        T.sharpness_aware,
        dict(rho=0.1, direction=T.asam_direction(0.1)),
        False,
        "rho",
        ("direction",),
    ),
    Row("random_sam", T.random_sam, dict(rho=0.1), True, "rho"),
    Row("mix_sam", T.mix_sam, dict(rho=0.1, kappa=1.0), True, "rho"),
    Row("vsam", T.vsam, dict(rho=0.1, learning_rate_m=0.01, num_data=50, m_init=2.0), False, "rho"),
    Row(
        "bsam",
        T.bsam,
        dict(learning_rate=0.1, rho=0.05, num_data=50, prior_precision=1.0),
        True,
        "learning_rate",
    ),
    Row(
        "langevin_noise",
        T.langevin_noise,
        dict(learning_rate=0.1, num_data=50),
        True,
        "learning_rate",
    ),
    Row(
        "sghmc", T.sghmc, dict(learning_rate=0.1, num_data=50, friction=0.2), True, "learning_rate"
    ),
]
IDS = [row.name for row in ROWS]
ROWS_BY_NAME = {row.name: row for row in ROWS}
KEY = jax.random.key(42)
BATCH = {"x": jnp.array([0.5, -1.0, 2.0, 0.25])}


def _params(dtype=jnp.float32, offset=0.0):
    return {
        "w": (jnp.arange(6.0).reshape(3, 2) / 4 - 0.6 + offset).astype(dtype),
        "b": (jnp.array([0.3, -0.2]) + offset).astype(dtype),
    }


def _loss(params, batch):
    """Mean over the batch of a quadratic in every leaf, plus a quartic (non-linear grads)."""
    targets = batch["x"]
    total = 0.0
    for leaf in jax.tree.leaves(params):
        leaf = leaf.astype(jnp.float32)
        squares = jnp.square(leaf[None] - targets.reshape(-1, *([1] * leaf.ndim)))
        total = total + 0.5 * jnp.mean(jnp.sum(squares.reshape(len(targets), -1), axis=1))
        total = total + 0.025 * jnp.sum(leaf**4)
    return total


def _grad_in_dtype(params, batch):
    grads = jax.grad(_loss)(params, batch)
    return jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)


def _step(tx, params, state, key, **extra_args):
    """One update with the full extra-args contract (closures built inside the trace)."""
    grad_fn = lambda p: _grad_in_dtype(p, BATCH)
    split_grad_fn = T.make_split_grad_fn(lambda p, b, i: _grad_in_dtype(p, b), BATCH)
    return tx.update(
        grad_fn(params),
        state,
        params,
        grad_fn=grad_fn,
        split_grad_fn=split_grad_fn,
        key=key,
        value=_loss(params, BATCH),
        **extra_args,
    )


def _make(row, **overrides):
    return row.factory(**{**row.kwargs, **overrides})


@functools.cache
def _transform(name):
    """One transform instance per row, so that compiled steps can be shared by tests."""
    return _make(ROWS_BY_NAME[name])


@functools.cache
def _compiled_step(name):
    """The jitted default step of a row, compiled once and reused by several tests."""
    tx = _transform(name)
    return jax.jit(lambda p, s, k: _step(tx, p, s, k))


def _assert_trees_close(actual, expected, rtol=1e-6, atol=0.0):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol
        )


def _max_abs_difference(a, b):
    return max(
        float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_accepts_and_ignores_unknown_extra_args(row):
    tx = _transform(row.name)
    params = _params()
    state = tx.init(params)
    plain = _compiled_step(row.name)(params, state, KEY)
    extra = jax.jit(lambda p, s, k: _step(tx, p, s, k, unknown_argument=3.0, another=None))(
        params, state, KEY
    )
    _assert_trees_close(extra, plain, rtol=0)
    # The transform does something: its output is not the clean gradient.
    assert _max_abs_difference(plain[0], _grad_in_dtype(params, BATCH)) > 1e-4


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_chains_with_sgd_without_recompiling(row):
    tx = optax.chain(_transform(row.name), optax.sgd(0.5))
    traces = []

    @jax.jit
    def train_step(params, state, key):
        traces.append(1)  # Python side effect: runs only while tracing
        updates, state = _step(tx, params, state, key)
        return updates, optax.apply_updates(params, updates), state

    params = _params()
    state = tx.init(params)
    assert isinstance(state, tuple) and len(state) == 2
    chained_updates, next_params, next_state = train_step(params, state, KEY)
    single_updates, _ = _compiled_step(row.name)(params, state[0], KEY)
    _assert_trees_close(chained_updates, jax.tree.map(lambda u: -0.5 * u, single_updates))

    for step in range(1, 4):  # new values, same shapes: no new trace
        _, next_params, next_state = train_step(
            next_params, next_state, jax.random.fold_in(KEY, step)
        )
    assert len(traces) == 1
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(next_params))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_dtype_preserved(row, dtype):
    tx = _transform(row.name)
    params = _params(dtype)
    state = tx.init(params)
    updates, new_state = _compiled_step(row.name)(params, state, KEY)
    for leaf in jax.tree.leaves(updates):
        assert leaf.dtype == dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))
    assert jax.eval_shape(lambda: state) == jax.eval_shape(lambda: new_state)
    if dtype == jnp.bfloat16:  # same numbers as float32 up to bfloat16 rounding (same noise)
        reference, _ = _compiled_step(row.name)(_params(), tx.init(_params()), KEY)
        _assert_trees_close(updates, reference, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_state_structure_stable_and_routes_through_cond(row):
    tx = _transform(row.name)
    params = _params()
    state = tx.init(params)
    assert isinstance(state, tuple) and hasattr(state, "_fields")  # a NamedTuple
    before = jax.eval_shape(tx.init, params)
    _, after = jax.eval_shape(lambda p, s, k: _step(tx, p, s, k), params, state, KEY)
    assert before == after

    @jax.jit
    def maybe_update(flag, params, state, key):
        return jax.lax.cond(
            flag,
            lambda: _step(tx, params, state, key),
            lambda: (jax.tree.map(jnp.zeros_like, params), state),
        )

    updates, new_state = maybe_update(True, params, state, KEY)
    expected_updates, expected_state = _compiled_step(row.name)(params, state, KEY)
    _assert_trees_close(updates, expected_updates, rtol=1e-6)
    _assert_trees_close(new_state, expected_state, rtol=1e-6)
    skipped, kept_state = maybe_update(False, params, state, KEY)
    _assert_trees_close(kept_state, state, rtol=0)
    assert _max_abs_difference(skipped, jax.tree.map(jnp.zeros_like, params)) == 0.0


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_vmap_over_keys_and_states(row):
    tx = _transform(row.name)
    keys = jax.random.split(KEY, 3)
    params = jax.vmap(lambda offset: _params(offset=offset))(jnp.zeros(3))
    states = jax.vmap(tx.init)(params)
    updates, new_states = jax.jit(jax.vmap(lambda p, s, k: _step(tx, p, s, k)))(
        params, states, keys
    )
    lanes = [jax.tree.map(lambda x, i=i: x[i], updates) for i in range(3)]
    for other in lanes[1:]:
        # Stochastic rows draw independent noise per key; deterministic ones agree.
        assert (_max_abs_difference(lanes[0], other) > 0) == row.stochastic
    # Each vmapped lane equals the unbatched call with its key.
    single, _ = _compiled_step(row.name)(_params(), tx.init(_params()), keys[2])
    _assert_trees_close(lanes[2], single, rtol=1e-5, atol=1e-7)
    assert jax.tree.structure(new_states) == jax.tree.structure(states)


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_inject_hyperparams_drives_hyperparameter(row):
    injected = optax.inject_hyperparams(row.factory, static_args=row.static_args)(**row.kwargs)
    params = _params()
    state = injected.init(params)
    step = jax.jit(lambda p, s, k: _step(injected, p, s, k))

    @jax.jit
    def direct_step(params, key, value):  # the factory called with a traced value
        tx = _make(row, **{row.hyperparameter: value})
        return _step(tx, params, tx.init(params), key)

    old_value = row.kwargs[row.hyperparameter]
    updates, _ = step(params, state, KEY)
    _assert_trees_close(updates, direct_step(params, KEY, old_value)[0], rtol=1e-6)

    new_value = 3.0 * old_value
    state.hyperparams[row.hyperparameter] = jnp.asarray(new_value)
    new_updates, _ = step(params, state, KEY)
    _assert_trees_close(new_updates, direct_step(params, KEY, new_value)[0], rtol=1e-5, atol=1e-7)
    assert _max_abs_difference(new_updates, updates) > 1e-4


# Errors -------------------------------------------------------------------------------

NEEDS_GRAD_FN = [row for row in ROWS if row.hyperparameter == "rho" or row.factory is T.bsam]


@pytest.mark.parametrize("row", NEEDS_GRAD_FN, ids=lambda row: row.name)
def test_missing_grad_fn_raises(row):
    tx = _transform(row.name)
    params = _params()
    with pytest.raises(ValueError, match="grad_fn"):
        tx.update(params, tx.init(params), params, key=KEY)


@pytest.mark.parametrize("row", [row for row in ROWS if row.stochastic], ids=lambda row: row.name)
def test_missing_key_raises(row):
    tx = _transform(row.name)
    params = _params()
    grad_fn = lambda p: _grad_in_dtype(p, BATCH)
    with pytest.raises(ValueError, match="key"):
        tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)


@pytest.mark.parametrize("row", NEEDS_GRAD_FN, ids=lambda row: row.name)
def test_missing_params_raises(row):
    tx = _transform(row.name)
    params = _params()
    grad_fn = lambda p: _grad_in_dtype(p, BATCH)
    with pytest.raises(ValueError, match="params"):
        tx.update(grad_fn(params), tx.init(params), None, grad_fn=grad_fn, key=KEY)


BSAM = dict(learning_rate=0.1, rho=0.1, num_data=5, prior_precision=1.0)


@pytest.mark.parametrize(
    ("factory", "kwargs", "message"),
    [
        (T.sam, dict(rho=-0.1), "rho"),
        (T.sam, dict(rho=float("nan")), "NaN"),
        (T.sam, dict(num_sub_batches=0), "num_sub_batches"),
        (T.sam, dict(num_sub_batches=2.0), "num_sub_batches"),
        (T.asam, dict(eta=-1.0), "eta"),
        (T.asam, dict(form="adaptive"), "form"),
        (T.fisher_sam, dict(eta=-1.0), "eta"),
        (T.mix_sam, dict(kappa=-1.0), "kappa"),
        (T.random_sam, dict(rho=-1.0), "rho"),
        (T.vsam, dict(num_data=0), "num_data"),
        (T.vsam, dict(num_data=10, prior_variance=0.0), "prior_variance"),
        (T.vsam, dict(num_data=10, m_init=-1.0), "m_init"),
        (T.bsam, {**BSAM, "num_data": -5}, "num_data"),
        (T.bsam, {**BSAM, "prior_precision": -1.0}, "prior_precision"),
        (T.bsam, {**BSAM, "beta2": 1.5}, "beta2"),
        (T.bsam, {**BSAM, "s_init": 0}, "s_init"),
        (T.bsam, {**BSAM, "num_sub_batches": -2}, "num_sub_batches"),
        (T.langevin_noise, dict(learning_rate=-0.1, num_data=5), "learning_rate"),
        (T.langevin_noise, dict(learning_rate=0.1, num_data=5, temperature=-1.0), "temperature"),
        (T.sghmc, dict(learning_rate=0.1, num_data=5, friction=0.0), "friction"),
        (T.sghmc, dict(learning_rate=0.1, num_data=5, friction=1.5), "friction"),
    ],
)
def test_bad_hyperparameters_raise(factory, kwargs, message):
    with pytest.raises(ValueError, match=message):
        factory(**kwargs)


def test_m_sharpness_needs_split_grad_fn_and_divisible_batch():
    tx = T.sam(0.1, num_sub_batches=3)
    params = _params()
    grad_fn = lambda p: _grad_in_dtype(p, BATCH)
    with pytest.raises(ValueError, match="split_grad_fn"):
        tx.update(grad_fn(params), tx.init(params), params, grad_fn=grad_fn)
    split_grad_fn = T.make_split_grad_fn(lambda p, b, i: _grad_in_dtype(p, b), BATCH)
    with pytest.raises(ValueError, match="not divisible"):
        tx.update(grad_fn(params), tx.init(params), params, split_grad_fn=split_grad_fn)


def test_public_api_is_exported():
    for name in T.__all__:
        assert hasattr(T, name), name
    assert {"sam", "asam", "fisher_sam", "vsam", "mix_sam", "random_sam", "bsam"} <= set(T.__all__)
    assert {"langevin_noise", "sghmc", "cyclical_schedule", "is_sampling_phase"} <= set(T.__all__)
