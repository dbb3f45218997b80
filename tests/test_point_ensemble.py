import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnn_flat import objectives
from bnn_flat.posteriors import ensemble, point
from tests.conftest import bn_mlp_apply, linear_apply


def _linear_params(key, num_members=None):
    shape = () if num_members is None else (num_members,)
    k1, k2 = jax.random.split(key)
    return {
        "w": 0.1 * jax.random.normal(k1, (*shape, 2, 3)),
        "b": 0.1 * jax.random.normal(k2, (*shape, 3)),
    }


def _regrad_transform():
    """A transform that replaces the gradient by grad_fn(params) (a rho=0 'SAM')."""

    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None, *, grad_fn, **extra):
        return grad_fn(params), state

    return optax.GradientTransformationExtraArgs(init, update)


def test_point_sgd_equals_hand_written_sgd(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:64], "labels": labels[:64]}
    loss_fn = objectives.classification_loss(linear_apply, num_data=300, prior_precision=1.0)
    family = point.build(loss_fn, optax.sgd(0.3))
    params = _linear_params(jax.random.key(0))
    state = family.init(params, {})
    update = jax.jit(family.update)
    expected = params
    for step in range(5):
        state, info = update(jax.random.key(step), state, batch)
        grads = jax.grad(lambda p: loss_fn(p, {}, batch, None)[0])(expected)
        expected = jax.tree.map(lambda p, g: p - 0.3 * g, expected, grads)
    for name in params:
        np.testing.assert_allclose(state.params[name], expected[name], rtol=1e-5, atol=1e-7)
    assert int(state.step) == 5
    assert update._cache_size() == 1  # compiled once


def test_point_structure_is_stable_and_samples_are_copies(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:32], "labels": labels[:32]}
    loss_fn = objectives.classification_loss(linear_apply, num_data=300)
    family = point.build(loss_fn, optax.adam(1e-2))
    state = family.init(_linear_params(jax.random.key(0)), {})
    new_state, _ = family.update(jax.random.key(1), state, batch)
    assert jax.tree.structure(state) == jax.tree.structure(new_state)
    assert jax.eval_shape(lambda s: s, state) == jax.eval_shape(lambda s: s, new_state)
    # routing through lax.cond requires identical structure, shapes and dtypes
    cond_state = jax.lax.cond(
        True, lambda s: family.update(jax.random.key(2), s, batch)[0], lambda s: s, state
    )
    assert jax.tree.structure(cond_state) == jax.tree.structure(state)
    samples = family.sample(jax.random.key(0), new_state, 4)
    assert samples["w"].shape == (4, 2, 3)
    np.testing.assert_array_equal(samples["w"][3], new_state.params["w"])
    assert family.log_prob is None


def _bn_params(key):
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (2, 8)), "w2": 0.3 * jax.random.normal(k2, (8, 3))}


def test_grad_fn_never_updates_model_state_and_dropout_modes(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:32], "labels": labels[:32]}
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300)
    params = _bn_params(jax.random.key(0))
    model_state = {"mean": jnp.zeros(8)}
    key = jax.random.key(5)
    loss_key, _ = jax.random.split(key)
    clean_grads = jax.grad(lambda p: loss_fn(p, model_state, batch, loss_key)[0])(params)
    _, clean_aux = loss_fn(params, model_state, batch, loss_key)

    # 'same' mask: grad_fn at the same params reproduces the clean gradient exactly, and the
    # returned model state is the clean pass's one (updated once, not twice).
    same = point.build(
        loss_fn, optax.chain(_regrad_transform(), optax.sgd(1.0)), perturbed_dropout="same"
    )
    state, _ = same.update(key, same.init(params, model_state), batch)
    expected = jax.tree.map(lambda p, g: p - g, params, clean_grads)
    for name in params:
        np.testing.assert_allclose(state.params[name], expected[name], rtol=1e-6)
    np.testing.assert_allclose(state.model_state["mean"], clean_aux.model_state["mean"])

    # 'fresh' mask (default): a different dropout mask, so a different gradient.
    fresh = point.build(loss_fn, optax.chain(_regrad_transform(), optax.sgd(1.0)))
    state, _ = fresh.update(key, fresh.init(params, model_state), batch)
    assert not np.allclose(state.params["w1"], expected["w1"])
    np.testing.assert_allclose(state.model_state["mean"], clean_aux.model_state["mean"])

    with pytest.raises(ValueError, match="perturbed_dropout"):
        point.build(loss_fn, optax.sgd(1.0), perturbed_dropout="other")


def test_ensemble_under_vmap_equals_members_trained_one_by_one(blobs):
    inputs, labels = blobs
    loss_fn = objectives.classification_loss(bn_mlp_apply, num_data=300, prior_precision=1.0)
    member_family = point.build(loss_fn, optax.sgd(0.1, momentum=0.9))
    family = ensemble.build(member_family)
    num_members = 4
    keys = jax.random.split(jax.random.key(0), num_members)
    stacked = jax.vmap(_bn_params)(keys)
    stacked_state = {"mean": jnp.zeros((num_members, 8))}
    state = family.init(stacked, stacked_state)
    singles = [member_family.init(_bn_params(k), {"mean": jnp.zeros(8)}) for k in keys]
    update = jax.jit(family.update)
    single_update = jax.jit(member_family.update)
    for step in range(4):
        batch = {
            "inputs": inputs[step * 50 : step * 50 + 50],
            "labels": labels[step * 50 : step * 50 + 50],
        }
        key = jax.random.key(100 + step)
        state, info = update(key, state, batch)
        member_keys = jax.random.split(key, num_members)
        singles = [single_update(k, s, batch)[0] for k, s in zip(member_keys, singles, strict=True)]
    for m, single in enumerate(singles):
        for name in single.params:
            np.testing.assert_allclose(state.params[name][m], single.params[name], atol=1e-5)
        np.testing.assert_allclose(
            state.model_state["mean"][m], single.model_state["mean"], atol=1e-5
        )
    assert int(state.step) == 4
    assert info.loss.shape == (num_members,)
    samples = family.sample(jax.random.key(1), state, 2)
    assert samples["w1"].shape == (2 * num_members, 2, 8)
    np.testing.assert_array_equal(samples["w1"][2], state.params["w1"][1])  # member-major
    states = ensemble.member_model_states(state, 2)
    np.testing.assert_array_equal(states["mean"][3], state.model_state["mean"][1])


def test_ensemble_rejects_unstacked_params():
    family = ensemble.build(point.build(lambda *a: (0.0, None), optax.sgd(0.1)))
    with pytest.raises(ValueError, match="leading member axis"):
        family.init({"w": jnp.zeros((3, 2)), "b": jnp.zeros((2,))}, {})


def test_point_family_supports_m_sharpness(blobs):
    """SAM with m sub-batches through the family: mean of per-sub-batch SAM gradients."""
    from bnn_flat import transforms

    inputs, labels = blobs
    batch = {"inputs": inputs[:60], "labels": labels[:60]}
    loss_fn = objectives.classification_loss(linear_apply, num_data=300, prior_precision=1.0)
    rho, lr, m = 0.3, 0.5, 3
    family = point.build(
        loss_fn, optax.chain(transforms.sam(rho, num_sub_batches=m), optax.sgd(lr))
    )
    params = _linear_params(jax.random.key(0))
    state, _ = jax.jit(family.update)(jax.random.key(1), family.init(params, {}), batch)

    def sub_loss(p, j):
        sub = jax.tree.map(lambda x: x[20 * j : 20 * (j + 1)], batch)
        return loss_fn(p, {}, sub, None)[0]

    perturbed_grads = []
    for j in range(m):
        g = jax.grad(sub_loss)(params, j)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        eps = jax.tree.map(lambda x, norm=norm: rho * x / norm, g)
        perturbed_grads.append(jax.grad(sub_loss)(jax.tree.map(jnp.add, params, eps), j))
    mean_grad = jax.tree.map(lambda *g: sum(g) / m, *perturbed_grads)
    for name in params:
        np.testing.assert_allclose(
            state.params[name], params[name] - lr * mean_grad[name], rtol=1e-5, atol=1e-6
        )


def test_ensemble_with_independent_batches_gives_members_their_own_data_order(blobs):
    from bnn_flat import training

    inputs, labels = blobs
    loss_fn = objectives.classification_loss(linear_apply, num_data=300)
    member = point.build(loss_fn, optax.sgd(0.2))
    family = ensemble.build(member, independent_batches=True)
    shared = ensemble.build(member)
    params = {"w": jnp.zeros((3, 2, 3)), "b": jnp.zeros((3, 3))}  # identical members
    run = lambda fam, mb: training.fit(
        jax.random.key(0),
        fam,
        fam.init(params, {}),
        blobs,
        num_epochs=2,
        batch_size=32,
        member_batches=mb,
        progress=False,
    ).state.params["w"]
    independent = run(family, 3)
    same = run(shared, None)
    # identical initial members stay identical with shared batches, and diverge otherwise
    np.testing.assert_array_equal(same[0], same[1])
    assert not np.allclose(independent[0], independent[1])
    # member m equals a single model trained on the m-th stream of batches
    epoch_fn = training.make_epoch_fn(family, 32, member_batches=3)
    state, _ = epoch_fn(family.init(params, {}), jax.random.key(5), inputs, labels)
    from bnn_flat.data.batching import epoch_batches

    shuffle_key, step_key = jax.random.split(jax.random.key(5))
    member_keys = jax.random.split(shuffle_key, 3)
    batches = epoch_batches(member_keys[1], inputs, labels, 32)
    single = member.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}, {})
    for i, k in enumerate(jax.random.split(step_key, batches["labels"].shape[0])):
        batch = jax.tree.map(lambda x, i=i: x[i], batches)
        single, _ = member.update(jax.random.split(k, 3)[1], single, batch)
    np.testing.assert_allclose(state.params["w"][1], single.params["w"], atol=1e-6)
