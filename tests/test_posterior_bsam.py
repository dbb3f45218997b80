import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from bnn_flat import bma, objectives, training, transforms
from bnn_flat.posteriors import bsam
from tests.conftest import linear_apply


def _trained(blobs):
    loss_fn = objectives.classification_loss(linear_apply, num_data=300)  # likelihood only
    tx = transforms.bsam(0.1, rho=0.05, num_data=300, prior_precision=1.0)
    family = bsam.build(loss_fn, tx, num_data=300)
    state = family.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, {})
    result = training.fit(
        jax.random.key(0), family, state, blobs, num_epochs=10, batch_size=50, progress=False
    )
    return family, result


def test_bsam_family_trains_and_samples_its_gaussian(blobs):
    family, result = _trained(blobs)
    assert result.history[-1]["accuracy"] > 0.9
    state = result.state
    std = bsam.posterior_std(state, 300)
    s = transforms.bsam_posterior_scale(state.opt_state, 300)
    np.testing.assert_allclose(std["w"], s["w"])
    samples = family.sample(jax.random.key(1), state, 20_000)
    for name in ("w", "b"):
        mean = samples[name].mean(0)
        sd = samples[name].std(0)
        # Monte-Carlo tolerance: 4 standard errors of the mean and of the std.
        np.testing.assert_array_less(
            np.abs(mean - state.params[name]), 4 * std[name] / np.sqrt(20_000)
        )
        np.testing.assert_array_less(np.abs(sd - std[name]), 4 * std[name] / np.sqrt(2 * 20_000))
    point = jax.tree.map(lambda x: x[0], samples)
    expected = sum(stats.norm(state.params[k], std[k]).logpdf(point[k]).sum() for k in ("w", "b"))
    np.testing.assert_allclose(family.log_prob(state, point), expected, rtol=1e-5)


def test_bsam_bma_averages_posterior_samples(blobs):
    family, result = _trained(blobs)
    inputs, labels = blobs
    log_probs, members = bma.posterior_predictive(
        jax.random.key(2), family, result.state, linear_apply, inputs, num_samples=16
    )
    assert members.shape == (16, 300, 3)
    # members differ (a real posterior), and BMA is their log-mean-exp
    assert float(jnp.std(members, axis=0).mean()) > 1e-4
    np.testing.assert_allclose(
        log_probs, jax.scipy.special.logsumexp(members, 0) - np.log(16), atol=1e-5
    )
