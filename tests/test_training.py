import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import objectives, training
from bnn_flat.posteriors import ensemble, point
from tests.conftest import bn_mlp_apply, linear_apply


def _setup(learning_rate=0.1):
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300, prior_precision=1.0)
    family = point.build(loss_fn, optax.sgd(learning_rate, momentum=0.9))
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (2, 8)), "w2": 0.3 * jax.random.normal(k2, (8, 3))}
    return family, family.init(params, {"mean": jnp.zeros(8)})


def test_fit_trains_and_compiles_once(blobs):
    family, state = _setup()
    epoch_fn = training.make_epoch_fn(family, 32)
    key = jax.random.key(1)
    inputs, labels = blobs
    losses = []
    for epoch in range(10):
        state, metrics = epoch_fn(state, jax.random.fold_in(key, epoch), inputs, labels)
        losses.append(float(metrics["loss"]))
    assert epoch_fn._cache_size() == 1
    assert losses[-1] < 0.6 * losses[0]
    assert float(metrics["accuracy"]) > 0.85
    assert int(state.step) == 10 * (300 // 32)


def test_crash_and_resume_equals_uninterrupted_run(blobs, tmp_path):
    family, state = _setup()
    key = jax.random.key(7)
    full = training.fit(key, family, state, blobs, num_epochs=6, batch_size=32, progress=False)
    ckpt = str(tmp_path / "ckpt")
    first = training.fit(
        key,
        family,
        state,
        blobs,
        num_epochs=6,
        batch_size=32,
        checkpoint_dir=ckpt,
        checkpoint_every=2,
        stop_after=3,
        progress=False,
    )
    assert first.resumed_from == 0 and len(first.history) == 3
    # "crash" after epoch 3: the newest checkpoint is epoch 2; epoch 3 is redone.
    resumed = training.fit(
        key,
        family,
        state,
        blobs,
        num_epochs=6,
        batch_size=32,
        checkpoint_dir=ckpt,
        checkpoint_every=2,
        progress=False,
    )
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4, 5, 6]
    for name in full.state.params:
        np.testing.assert_array_equal(resumed.state.params[name], full.state.params[name])
    np.testing.assert_array_equal(resumed.state.model_state["mean"], full.state.model_state["mean"])
    np.testing.assert_array_equal(
        resumed.state.opt_state[0].trace["w1"], full.state.opt_state[0].trace["w1"]
    )
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]


def test_non_finite_loss_raises_and_keeps_last_good_checkpoint(blobs, tmp_path):
    inputs = jax.random.normal(jax.random.key(0), (300, 1))
    targets = 2.0 * inputs
    apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
    loss_fn = objectives.regression_loss(apply, num_data=300)
    # gradient descent on a quadratic with curvature ~1 and step 4: |error| triples every step,
    # so the loss overflows after some tens of steps (a few epochs of 10 steps).
    family = point.build(loss_fn, optax.sgd(4.0))
    state = family.init({"w": jnp.ones((1, 1))}, {})
    ckpt = tmp_path / "ckpt"
    with pytest.raises(training.NonFiniteLossError, match="last good checkpoint"):
        training.fit(
            jax.random.key(0),
            family,
            state,
            (inputs, targets),
            num_epochs=50,
            batch_size=30,
            checkpoint_dir=str(ckpt),
            progress=False,
        )
    kept = training.Checkpointer(str(ckpt))
    epoch = kept.latest_epoch()
    assert epoch is not None and epoch >= 1
    restored, history, _ = kept.restore(state)
    assert all(np.isfinite(r["loss"]) for r in history)
    assert len(history) == epoch
    assert np.all(np.isfinite(restored.params["w"]))


def test_fit_evaluates_and_logs(blobs):
    family, state = _setup()
    records = []
    eval_fn = lambda s: {"norm": jnp.linalg.norm(s.params["w1"])}
    result = training.fit(
        jax.random.key(0),
        family,
        state,
        blobs,
        num_epochs=4,
        batch_size=50,
        eval_fn=eval_fn,
        eval_every=2,
        log_fn=records.append,
        progress=False,
    )
    assert [("eval_norm" in r) for r in records] == [False, True, False, True]
    np.testing.assert_allclose(
        records[-1]["eval_norm"], jnp.linalg.norm(result.state.params["w1"]), rtol=1e-6
    )


def test_fit_trains_a_deep_ensemble(blobs):
    loss_fn = objectives.classification_loss(linear_apply, num_data=300)
    family = ensemble.build(point.build(loss_fn, optax.sgd(0.5)))
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(lambda k: {"w": jax.random.normal(k, (2, 3)), "b": jnp.zeros(3)})(keys)
    result = training.fit(
        jax.random.key(1),
        family,
        family.init(params, {}),
        blobs,
        num_epochs=5,
        batch_size=50,
        progress=False,
    )
    assert result.history[-1]["accuracy"] > 0.9
    assert result.state.params["w"].shape == (3, 2, 3)


def test_bad_data_is_rejected(blobs):
    family, state = _setup()
    inputs, labels = blobs
    with pytest.raises(ValueError, match="empty"):
        training.fit(
            jax.random.key(0),
            family,
            state,
            (inputs[:0], labels[:0]),
            num_epochs=1,
            batch_size=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="disagree"):
        training.fit(
            jax.random.key(0),
            family,
            state,
            (inputs, labels[:10]),
            num_epochs=1,
            batch_size=5,
            progress=False,
        )
    with pytest.raises(ValueError, match="NaN"):
        training.fit(
            jax.random.key(0),
            family,
            state,
            (inputs.at[0, 0].set(jnp.nan), labels),
            num_epochs=1,
            batch_size=5,
            progress=False,
        )
    with pytest.raises(ValueError, match="batch_size"):
        training.fit(
            jax.random.key(0), family, state, blobs, num_epochs=1, batch_size=1000, progress=False
        )
