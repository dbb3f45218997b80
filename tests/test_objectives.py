import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bnn_flat import objectives
from tests.conftest import linear_apply


def _params(key):
    k1, k2 = jax.random.split(key)
    return {"w": jax.random.normal(k1, (2, 3)), "b": jax.random.normal(k2, (3,))}


def test_loss_times_n_is_negative_log_joint_up_to_constant(blobs):
    """loss * N on the full data = -log p(D|theta) - log p(theta) + the prior's log-normaliser."""
    inputs, labels = blobs
    num = inputs.shape[0]
    precision = 2.5
    loss_fn = objectives.classification_loss(linear_apply, num_data=num, prior_precision=precision)
    batch = {"inputs": inputs, "labels": labels}
    for seed in range(3):
        params = _params(jax.random.key(seed))
        loss, _ = loss_fn(params, {}, batch, jax.random.key(0))
        logits = np.asarray(inputs @ params["w"] + params["b"], np.float64)
        log_lik = (logits - np.log(np.exp(logits).sum(-1, keepdims=True)))[
            np.arange(num), np.asarray(labels)
        ].sum()
        flat = np.concatenate([np.ravel(params["w"]), np.ravel(params["b"])]).astype(np.float64)
        log_prior = stats.norm(0, 1 / math.sqrt(precision)).logpdf(flat).sum()
        log_normaliser = 0.5 * flat.size * (math.log(precision) - math.log(2 * math.pi))
        np.testing.assert_allclose(
            float(loss) * num, -(log_lik + log_prior) + log_normaliser, rtol=1e-5
        )


def test_minibatch_loss_is_unbiased_for_full_batch_loss(blobs):
    inputs, labels = blobs
    loss_fn = objectives.classification_loss(linear_apply, num_data=300, prior_precision=1.0)
    params = _params(jax.random.key(3))
    full, _ = loss_fn(params, {}, {"inputs": inputs, "labels": labels}, None)
    parts = [
        loss_fn(params, {}, {"inputs": inputs[i::3], "labels": labels[i::3]}, None)[0]
        for i in range(3)
    ]
    np.testing.assert_allclose(np.mean(parts), full, rtol=1e-5)


def test_gaussian_log_prior_matches_scipy():
    params = {"a": jnp.array([0.3, -1.2]), "b": jnp.array([[2.0]])}
    expected = stats.norm(0, 1 / math.sqrt(4.0)).logpdf([0.3, -1.2, 2.0]).sum()
    np.testing.assert_allclose(objectives.gaussian_log_prior(params, 4.0), expected, rtol=1e-6)


def test_gaussian_log_likelihood_homoscedastic_and_learned_noise():
    mean = jnp.array([[0.5, -1.0]])
    targets = jnp.array([[1.0, 0.0]])
    expected = stats.norm(mean, 0.3).logpdf(targets).sum()
    np.testing.assert_allclose(
        objectives.gaussian_log_likelihood(mean, targets, 0.3)[0], expected, rtol=1e-6
    )
    log_std = jnp.log(jnp.array([[0.3, 2.0]]))
    expected = stats.norm(mean, jnp.exp(log_std)).logpdf(targets).sum()
    outputs = jnp.concatenate([mean, log_std], axis=-1)
    np.testing.assert_allclose(
        objectives.gaussian_log_likelihood(outputs, targets, None)[0], expected, rtol=1e-6
    )


def test_regression_loss_scaling():
    apply = lambda p, s, x, *, train, key: (x @ p["w"], s)
    x = jnp.array([[1.0], [2.0], [3.0]])
    y = jnp.array([[1.5], [1.0], [4.0]])
    loss_fn = objectives.regression_loss(apply, num_data=3, prior_precision=0.5, noise_std=0.5)
    params = {"w": jnp.array([[1.2]])}
    loss, aux = loss_fn(params, {}, {"inputs": x, "labels": y}, None)
    log_joint = stats.norm(np.asarray(x) * 1.2, 0.5).logpdf(y).sum() + stats.norm(
        0, 1 / math.sqrt(0.5)
    ).logpdf(1.2)
    log_normaliser = 0.5 * (math.log(0.5) - math.log(2 * math.pi))
    np.testing.assert_allclose(loss * 3, -log_joint + log_normaliser, rtol=1e-5)
    np.testing.assert_allclose(aux.metrics["mse"], np.mean((np.asarray(x) * 1.2 - y) ** 2))


def test_weight_decay_equivalence():
    """The prior gradient / N equals weight_decay * theta for the mapped precision."""
    wd, num = 5e-4, 50_000
    precision = objectives.weight_decay_to_prior_precision(wd, num)
    theta = {"w": jnp.array([0.7, -2.0])}
    grad = jax.grad(lambda p: -objectives.gaussian_log_prior(p, precision) / num)(theta)
    np.testing.assert_allclose(grad["w"], wd * theta["w"], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_data": 0}, "num_data"), ({"num_data": 10, "prior_precision": -1.0}, "prior_precision")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        objectives.classification_loss(linear_apply, **kwargs)
    with pytest.raises(ValueError, match="noise_std"):
        objectives.regression_loss(linear_apply, num_data=3, noise_std=-1.0)
