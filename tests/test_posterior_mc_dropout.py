"""MC dropout: exact average over all masks, training, F-MC-dropout and conformance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import bma, models, objectives, training, transforms
from bnn_flat.posteriors import mc_dropout, point
from tests.conftest import bn_mlp_apply

_RATE = 0.3
_HIDDEN = 4


def _tiny_model():
    module = models.mlp([_HIDDEN], num_outputs=3, dropout_rate=_RATE)
    params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 2)))
    return models.make_apply(module), params, model_state


def _exact_predictive(params, inputs):
    """Average of softmax over all 2^h dropout masks, weighted by their probabilities."""
    params = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    hidden = np.maximum(
        np.asarray(inputs, np.float64) @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"],
        0.0,
    )
    total = 0.0
    outputs = []
    for mask in itertools.product((0.0, 1.0), repeat=_HIDDEN):
        mask = np.array(mask)
        weight = np.prod(np.where(mask == 1.0, 1.0 - _RATE, _RATE))
        logits = (hidden * mask / (1.0 - _RATE)) @ params["output"]["kernel"]
        logits = logits + params["output"]["bias"]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        total = total + weight * probs
        outputs.append(probs)
    return total, np.stack(outputs)


def test_bma_converges_to_the_exact_average_over_all_masks():
    apply, params, model_state = _tiny_model()
    params = jax.tree.map(lambda x: 3.0 * x, params)  # make the masks matter
    inputs = jnp.array([[1.0, -0.5], [0.3, 2.0], [-1.5, 0.7], [2.0, 2.0], [-1.0, -1.0]])
    exact, per_mask = _exact_predictive(params, inputs)
    family = mc_dropout.build(objectives.classification_loss(apply, num_data=5), optax.sgd(0.1))
    state = family.init(params, model_state)
    num_samples = 20_000

    @jax.jit
    def run(key, state):
        keys = family.sample(key, state, num_samples)
        return bma.predict(
            mc_dropout.predict_fn(apply, state),
            keys,
            inputs,
            strategy="vmap",
            return_members=True,
        )

    log_probs, members = run(jax.random.key(1), state)
    member_probs = np.exp(np.asarray(members, np.float64))
    # every member is one of the 16 mask outputs (flax: keep w.p. 1 - p, scale 1/(1 - p))
    distance = np.abs(member_probs[:, None] - per_mask[None]).max(-1)  # (S, masks, N)
    assert distance.min(1).max() < 1e-5
    # the BMA is within Monte-Carlo error of the exact average, and masks really differ
    standard_error = member_probs.std(0) / np.sqrt(num_samples)
    np.testing.assert_array_less(np.abs(np.exp(log_probs) - exact), 4 * standard_error + 1e-6)
    assert per_mask.std(0).max() > 0.05
    # without dropout averaging the single eval-mode prediction is different
    eval_probs = jax.nn.softmax(apply(params, model_state, inputs, train=False)[0])
    assert np.abs(eval_probs - exact).max() > 10 * standard_error.max()


def _blobs_setup(blobs, optimizer):
    module = models.mlp([16], num_outputs=3, dropout_rate=0.2)
    params, model_state = models.init(module, jax.random.key(0), blobs[0][:1])
    apply = models.make_apply(module)
    loss_fn = objectives.classification_loss(apply, num_data=300, prior_precision=1.0)
    return apply, mc_dropout.build(loss_fn, optimizer), params, model_state


def test_training_and_flat_version(blobs):
    inputs, labels = blobs
    base = optax.sgd(0.1, momentum=0.9)
    results = []
    for optimizer in (base, optax.chain(transforms.sam(0.1), base)):
        apply, family, params, model_state = _blobs_setup(blobs, optimizer)
        result = training.fit(
            jax.random.key(1),
            family,
            family.init(params, model_state),
            blobs,
            num_epochs=8,
            batch_size=50,
            progress=False,
        )
        results.append(result)
        log_probs = bma.predict(
            mc_dropout.predict_fn(apply, result.state),
            family.sample(jax.random.key(2), result.state, 16),
            inputs,
        )
        assert float(jnp.mean(jnp.argmax(log_probs, -1) == labels)) > 0.9
    assert not np.allclose(
        results[0].state.params["hidden_0"]["kernel"],
        results[1].state.params["hidden_0"]["kernel"],
        atol=1e-4,
    )


def test_family_conformance(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:64], "labels": labels[:64]}
    apply, family, params, model_state = _blobs_setup(blobs, optax.sgd(0.1))
    assert family.log_prob is None
    state = family.init(params, model_state)
    for field in ("params", "model_state", "step"):
        assert field in state._fields
    update = jax.jit(family.update)
    new_state, _ = update(jax.random.key(1), state, batch)
    new_state, _ = update(jax.random.key(2), new_state, batch)
    assert update._cache_size() == 1
    assert int(new_state.step) == 2
    assert jax.eval_shape(lambda s: s, state) == jax.eval_shape(lambda s: s, new_state)
    cond_state = jax.eval_shape(
        lambda s: jax.lax.cond(
            True, lambda s: family.update(jax.random.key(3), s, batch)[0], lambda s: s, s
        ),
        state,
    )
    assert cond_state == jax.eval_shape(lambda s: s, state)

    @jax.jit
    def checks(state, keys):
        samples = family.sample(jax.random.key(5), state, 7)
        outputs = jax.vmap(lambda k: mc_dropout.predict_fn(apply, state)(k, inputs[:4]))(samples)
        by_key = jax.vmap(lambda k: family.sample(k, state, 2))(keys)
        stacked = jax.vmap(lambda k: family.init(params, model_state))(keys)
        stepped, infos = jax.vmap(family.update, in_axes=(0, 0, None))(keys, stacked, batch)
        return samples, outputs, by_key, stepped, infos

    keys = jax.random.split(jax.random.key(6), 3)
    samples, outputs, by_key, stepped, infos = checks(new_state, keys)
    assert samples.shape == (7,) and jnp.issubdtype(samples.dtype, jax.dtypes.prng_key)
    assert outputs.shape == (7, 4, 3)
    assert not np.allclose(outputs[0], outputs[1])  # different masks
    same_key = mc_dropout.predict_fn(apply, new_state)
    np.testing.assert_array_equal(
        same_key(samples[0], inputs[:4]), same_key(samples[0], inputs[:4])
    )
    assert by_key.shape == (3, 2)
    assert infos.loss.shape == (3,)
    assert len(set(np.asarray(infos.loss).round(6))) == 3  # independent dropout keys
    assert stepped.params["hidden_0"]["kernel"].shape == (3, 2, 16)


def test_batch_norm_models_are_refused_and_bad_arguments_raise(blobs):
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300)
    family = mc_dropout.build(loss_fn, optax.sgd(0.1))
    state = family.init({"w1": jnp.ones((2, 8)), "w2": jnp.ones((8, 3))}, {"mean": jnp.zeros(8)})
    with pytest.raises(ValueError, match="BatchNorm"):
        mc_dropout.predict_fn(bn_mlp_apply, state)
    with pytest.raises(ValueError, match="num_samples"):
        family.sample(jax.random.key(0), state, 0)
    with pytest.raises(ValueError, match="perturbed_dropout"):
        mc_dropout.build(loss_fn, optax.sgd(0.1), perturbed_dropout="other")
    # training itself is the point family's (identical states for the same keys)
    batch = {"inputs": blobs[0][:32], "labels": blobs[1][:32]}
    reference = point.build(loss_fn, optax.sgd(0.1))
    key = jax.random.key(3)
    ours, _ = jax.jit(family.update)(key, state, batch)
    theirs, _ = jax.jit(reference.update)(
        key, reference.init(state.params, state.model_state), batch
    )
    np.testing.assert_array_equal(ours.params["w1"], theirs.params["w1"])
