import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from bnn_flat import bma, objectives
from bnn_flat.posteriors import ensemble, point
from tests.conftest import bn_mlp_apply, linear_apply


def _samples(num, key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {"w": jax.random.normal(k1, (num, 2, 3)), "b": jax.random.normal(k2, (num, 3))}


def _predict_fn(sample, x):
    return linear_apply(sample, {}, x, train=False, key=None)[0]


def test_bma_of_identical_samples_equals_single_model():
    single = jax.tree.map(lambda x: x[0], _samples(1))
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 7), single)
    x = jax.random.normal(jax.random.key(3), (20, 2))
    np.testing.assert_allclose(
        bma.predict(_predict_fn, stacked, x),
        jax.nn.log_softmax(_predict_fn(single, x)),
        atol=1e-6,
    )


def test_bma_equals_log_of_mean_probabilities():
    samples = _samples(5)
    x = jax.random.normal(jax.random.key(3), (10, 2))
    log_probs = bma.predict(_predict_fn, samples, x)
    probs = np.mean(
        [
            jax.nn.softmax(_predict_fn(jax.tree.map(lambda a, s=s: a[s], samples), x))
            for s in range(5)
        ],
        axis=0,
    )
    np.testing.assert_allclose(np.exp(log_probs), probs, rtol=1e-5)
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "strategy, chunk", [("vmap", None), ("map", None), ("chunked", 3), ("auto", None)]
)
def test_strategies_agree(strategy, chunk):
    samples = _samples(8)
    x = jax.random.normal(jax.random.key(3), (10, 2))
    reference = bma.predict(_predict_fn, samples, x, strategy="vmap")
    got, members = jax.jit(
        lambda s, x: bma.predict(
            _predict_fn, s, x, strategy=strategy, chunk_size=chunk, return_members=True
        )
    )(samples, x)
    np.testing.assert_allclose(got, reference, atol=1e-5)
    assert members.shape == (8, 10, 3)


def test_choose_strategy():
    assert bma.choose_strategy({"w": jnp.zeros((4, 3, 3, 1, 8))}, backend="cpu") == "map"
    assert bma.choose_strategy({"w": jnp.zeros((4, 3, 3, 1, 8))}, backend="gpu") == "vmap"
    assert bma.choose_strategy({"w": jnp.zeros((4, 3, 8))}, backend="cpu") == "map"
    assert bma.choose_strategy({"w": jnp.zeros((4, 3, 8))}, backend="tpu") == "vmap"


def test_regression_mixture_moments_and_density():
    means = jnp.array([0.0, 2.0, 5.0])
    stds = jnp.array([1.0, 0.5, 2.0])
    fn = lambda s, x: (jnp.full((1, 1), s[0]), jnp.full((1, 1), s[1]))
    out = bma.predict_regression(
        fn, jnp.stack([means, stds], 1), jnp.zeros((1, 1)), targets=jnp.array([[1.0]])
    )
    np.testing.assert_allclose(out["mean"][0, 0], means.mean(), rtol=1e-6)
    expected_var = np.mean(stds**2) + np.var(means)
    np.testing.assert_allclose(out["variance"][0, 0], expected_var, rtol=1e-6)
    density = np.mean(stats.norm(means, stds).pdf(1.0))
    np.testing.assert_allclose(out["log_density"][0], np.log(density), rtol=1e-5)


def test_posterior_predictive_for_point_and_ensemble(blobs):
    inputs, labels = blobs
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300)
    member = point.build(loss_fn, optax.sgd(0.1))
    keys = jax.random.split(jax.random.key(0), 3)
    stacked = {
        "w1": jax.vmap(lambda k: jax.random.normal(k, (2, 8)))(keys),
        "w2": jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (8, 3)))(keys),
    }
    means = jnp.arange(24.0).reshape(3, 8) / 10.0
    family = ensemble.build(member)
    state = family.init(stacked, {"mean": means})
    log_probs, members = bma.posterior_predictive(
        jax.random.key(1), family, state, bn_mlp_apply, inputs[:10], num_samples=1
    )
    expected = [
        jax.nn.log_softmax(
            bn_mlp_apply(
                jax.tree.map(lambda a, m=m: a[m], stacked),
                {"mean": means[m]},
                inputs[:10],
                train=False,
                key=None,
            )[0]
        )
        for m in range(3)
    ]
    np.testing.assert_allclose(members, np.stack(expected), atol=1e-5)
    np.testing.assert_allclose(
        log_probs, jax.scipy.special.logsumexp(np.stack(expected), 0) - np.log(3), atol=1e-5
    )
    single = member.init(jax.tree.map(lambda a: a[0], stacked), {"mean": means[0]})
    log_probs, members = bma.posterior_predictive(
        jax.random.key(1), member, single, bn_mlp_apply, inputs[:10], num_samples=4
    )
    np.testing.assert_allclose(log_probs, expected[0], atol=1e-5)
    assert members.shape == (4, 10, 3)


def test_bad_inputs():
    x = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="strategy"):
        bma.predict(_predict_fn, _samples(2), x, strategy="loop")
    with pytest.raises(ValueError, match="chunk_size"):
        bma.predict(_predict_fn, _samples(2), x, strategy="chunked")
    with pytest.raises(ValueError, match="leading sample axis"):
        bma.predict(_predict_fn, {"w": jnp.zeros((2, 2, 3)), "b": jnp.zeros((3, 3))}, x)
    with pytest.raises(ValueError, match="empty"):
        bma.predict(_predict_fn, {}, x)
