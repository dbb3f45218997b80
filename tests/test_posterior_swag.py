"""SWAG / SWAG-Diag / SWA and BatchNorm re-estimation: closed-form and Monte-Carlo checks."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from bnn_flat import bma, models, objectives, training, transforms
from bnn_flat.posteriors import batchnorm, swag
from bnn_flat.types import LossAux
from tests.conftest import bn_mlp_apply, linear_apply

# --------------------------------------------------------------------------------------
# helpers


def _prescribed(targets):
    """An optimizer that moves the parameters to targets[t] at update t (t = 0, 1, ...)."""

    def init(params):
        return jnp.zeros((), jnp.int32)

    def update(updates, count, params=None, **extra):
        target = jax.tree.map(lambda x: x[count], targets)
        return jax.tree.map(lambda t, p: t - p, target, params), count + 1

    return optax.GradientTransformationExtraArgs(init, update)


def _quadratic_loss(params, model_state, batch, key):
    loss = sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))
    return loss, LossAux(model_state=model_state, metrics={})


def _tree(seed, shape_prefix=()):
    rng = np.random.default_rng(seed)
    return {
        "a": jnp.asarray(rng.normal(size=(*shape_prefix, 2)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(*shape_prefix, 2, 2)), jnp.float32),
    }


def _flat(tree):
    return np.concatenate([np.asarray(tree["a"]).ravel(), np.asarray(tree["b"]).ravel()])


def _flat_samples(samples):
    num = samples["a"].shape[0]
    return np.concatenate(
        [np.asarray(samples["a"]).reshape(num, -1), np.asarray(samples["b"]).reshape(num, -1)],
        axis=1,
    ).astype(np.float64)


@functools.partial(jax.jit, static_argnames="rank")
def _state_from(thetas, rank):
    """A SWAG state that collected thetas[0], thetas[1], ... (stacked pytree), via lax.scan."""
    first = jax.tree.map(lambda x: x[0], thetas)
    state = swag.init(jax.tree.map(jnp.zeros_like, first), None, optax.sgd(0.1), rank=rank)
    return jax.lax.scan(lambda state, theta: (swag.collect(state, theta), None), state, thetas)[0]


def _numpy_swag(flat_thetas, rank):
    """Reference moments and the last `rank` deviations (oldest first)."""
    mean = np.zeros(flat_thetas.shape[1])
    sq_mean = np.zeros(flat_thetas.shape[1])
    deviations = []
    for n, theta in enumerate(flat_thetas):
        mean = (n * mean + theta) / (n + 1)
        sq_mean = (n * sq_mean + theta**2) / (n + 1)
        deviations.append(theta - mean)
    return mean, sq_mean, deviations[-rank:] if rank else []


def _expected_covariance(flat_thetas, rank, scale, diagonal_only=False):
    mean, sq_mean, deviations = _numpy_swag(flat_thetas, rank)
    covariance = np.diag(np.maximum(sq_mean - mean**2, 1e-30))
    if rank and not diagonal_only:
        matrix = np.stack(deviations)
        covariance = covariance + matrix.T @ matrix / max(len(deviations) - 1, 1)
    return mean, scale * covariance


def _thetas(seed, num):
    # iterates with a few dominant directions, so the low-rank term matters
    rng = np.random.default_rng(seed)
    flat = rng.normal(size=(num, 2)) @ rng.normal(size=(2, 6)) + 0.3 * rng.normal(size=(num, 6))
    flat = (flat + np.arange(6.0)).astype(np.float32)
    return {"a": jnp.asarray(flat[:, :2]), "b": jnp.asarray(flat[:, 2:].reshape(num, 2, 2))}


# --------------------------------------------------------------------------------------
# collection


def test_collection_schedule_moments_and_ring_buffer_match_numpy():
    num_steps, rank = 12, 3
    targets = _tree(0, (num_steps,))
    family = swag.build(
        _quadratic_loss, _prescribed(targets), rank=rank, start_step=3, collect_every=2
    )
    state = family.init(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), targets))

    @jax.jit
    def run(state):
        def body(state, key):
            return family.update(key, state, {})[0], None

        return jax.lax.scan(body, state, jax.random.split(jax.random.key(1), num_steps))[0]

    state = run(state)
    # the iterate after update t is targets[t - 1]; collected at t = 3, 5, 7, 9, 11
    numpy_targets = _numpy(targets)
    collected = np.stack(
        [_flat(jax.tree.map(lambda x, t=t: x[t - 1], numpy_targets)) for t in (3, 5, 7, 9, 11)]
    )
    mean, sq_mean, last = _numpy_swag(collected, rank)
    assert int(state.step) == num_steps
    assert int(state.num_collected) == 5
    assert int(state.write_index) == 5 % rank
    np.testing.assert_allclose(
        _flat(state.params), _flat(jax.tree.map(lambda x: x[-1], numpy_targets)), atol=1e-6
    )
    np.testing.assert_allclose(_flat(state.mean), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(swag.swa_params(state)), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(state.sq_mean), sq_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        _flat(swag.variance(state)), np.maximum(sq_mean - mean**2, 1e-30), rtol=1e-4, atol=1e-6
    )
    # ring buffer: collection i (0-based) lives in row i % rank -> rows hold the LAST 3
    deviations = _numpy(state.deviations)
    rows = [_flat(jax.tree.map(lambda x, r=r: x[r], deviations)) for r in range(rank)]
    for i, deviation in zip(range(2, 5), last, strict=True):
        np.testing.assert_allclose(rows[i % rank], deviation, rtol=1e-5, atol=1e-6)


def test_no_collection_before_start_and_sampling_falls_back_to_initial_params():
    targets = _tree(0, (4,))
    family = swag.build(
        _quadratic_loss, _prescribed(targets), rank=2, start_step=10, collect_every=1
    )
    initial = _tree(5)
    state = family.init(initial)
    update = jax.jit(family.update)
    for step in range(4):
        state, _ = update(jax.random.key(step), state, {})
    assert int(state.num_collected) == 0
    np.testing.assert_array_equal(_flat(swag.swa_params(state)), _flat(initial))
    samples = jax.jit(family.sample, static_argnums=2)(jax.random.key(0), state, 3)
    np.testing.assert_allclose(_flat_samples(samples), np.tile(_flat(initial), (3, 1)), atol=1e-6)


# --------------------------------------------------------------------------------------
# sampling and density


_CASES = [(7, 4, False), (3, 5, False), (7, 4, True), (7, 0, False)]
_CASE_IDS = ["full-wrapped", "partially-filled", "diag-only", "rank0"]
_NUM_DRAWS = 100_000


@functools.cache
def _draws(num_collected, rank, diagonal_only):
    """(state, flat samples) at scale 0.5; key 4 for every case, so z1 is shared."""
    state = _state_from(_thetas(3, num_collected), rank)
    draw = jax.jit(swag.sample, static_argnames=("num_samples", "scale", "diagonal_only"))
    samples = draw(
        jax.random.key(4),
        state,
        num_samples=_NUM_DRAWS,
        scale=0.5,
        diagonal_only=diagonal_only,
    )
    return state, _flat_samples(samples)


def _unflatten(row):
    return {"a": jnp.asarray(row[:2], jnp.float32), "b": jnp.asarray(row[2:].reshape(2, 2))}


@pytest.mark.parametrize(("num_collected", "rank", "diagonal_only"), _CASES, ids=_CASE_IDS)
def test_sample_moments_match_the_swag_covariance(num_collected, rank, diagonal_only):
    _, samples = _draws(num_collected, rank, diagonal_only)
    mean, covariance = _expected_covariance(
        _flat_samples(_thetas(3, num_collected)), rank, 0.5, diagonal_only=diagonal_only
    )
    std = np.sqrt(np.diag(covariance))
    np.testing.assert_array_less(
        np.abs(samples.mean(0) - mean), 4 * std / np.sqrt(_NUM_DRAWS) + 1e-6
    )
    empirical = np.cov(samples, rowvar=False)
    # standard error of a Gaussian sample covariance entry
    standard_error = np.sqrt((np.outer(std**2, std**2) + covariance**2) / _NUM_DRAWS)
    np.testing.assert_array_less(np.abs(empirical - covariance), 4.5 * standard_error + 1e-7)
    if diagonal_only or rank == 0:
        assert np.allclose(covariance, np.diag(np.diag(covariance)))
    else:
        assert np.abs(covariance - np.diag(np.diag(covariance))).max() > 0.1


def test_low_rank_part_lies_in_the_span_of_the_deviations():
    state, full = _draws(7, 4, False)
    _, diagonal = _draws(7, 4, True)
    difference = (full - diagonal)[:50]  # same key: the diagonal noise cancels
    deviations = _numpy(state.deviations)
    matrix = np.stack([_flat(jax.tree.map(lambda x, r=r: x[r], deviations)) for r in range(4)])
    coefficients, *_ = np.linalg.lstsq(matrix.T, difference.T, rcond=None)
    np.testing.assert_allclose(matrix.T @ coefficients, difference.T, atol=1e-5)
    assert np.abs(difference).max() > 0.1  # the low-rank term is really there


@pytest.mark.parametrize(("num_collected", "rank", "diagonal_only"), _CASES, ids=_CASE_IDS)
@pytest.mark.parametrize("scale", [0.5, 0.1])
def test_log_prob_matches_scipy(num_collected, rank, diagonal_only, scale):
    state, samples = _draws(num_collected, rank, diagonal_only)
    mean, covariance = _expected_covariance(
        _flat_samples(_thetas(3, num_collected)), rank, scale, diagonal_only
    )
    log_prob = jax.jit(swag.log_prob, static_argnames=("scale", "diagonal_only"))
    for row in samples[:3]:
        expected = stats.multivariate_normal(mean, covariance).logpdf(row)
        got = log_prob(state, _unflatten(row), scale=scale, diagonal_only=diagonal_only)
        np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-4)


def test_scale_zero_is_swa_and_has_no_density():
    state = _state_from(_thetas(3, 5), 3)
    family = swag.build(
        _quadratic_loss, optax.sgd(0.1), rank=3, start_step=1, collect_every=1, scale=0.0
    )
    assert family.log_prob is None
    samples = jax.jit(family.sample, static_argnums=2)(jax.random.key(0), state, 2)
    np.testing.assert_allclose(_flat_samples(samples)[1], _flat(swag.swa_params(state)))


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="rank"):
        swag.build(_quadratic_loss, optax.sgd(0.1), rank=-1, start_step=0, collect_every=1)
    with pytest.raises(ValueError, match="collect_every"):
        swag.build(_quadratic_loss, optax.sgd(0.1), start_step=0, collect_every=0)
    with pytest.raises(ValueError, match="scale"):
        swag.build(_quadratic_loss, optax.sgd(0.1), start_step=0, collect_every=1, scale=-1.0)
    with pytest.raises(ValueError, match="var_clamp"):
        swag.build(_quadratic_loss, optax.sgd(0.1), start_step=0, collect_every=1, var_clamp=0.0)
    with pytest.raises(ValueError, match="perturbed_dropout"):
        swag.build(
            _quadratic_loss, optax.sgd(0.1), start_step=0, collect_every=1, perturbed_dropout="x"
        )
    state = _state_from(_thetas(3, 3), 2)
    with pytest.raises(ValueError, match="shape"):
        swag.log_prob(state, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))})
    with pytest.raises(ValueError, match="structure"):
        swag.collect(state, {"a": jnp.zeros(2)})
    with pytest.raises(ValueError, match="num_samples"):
        swag.sample(jax.random.key(0), state, 0)


# --------------------------------------------------------------------------------------
# family conformance and F-SWAG


def _linear_family(optimizer, **options):
    loss_fn = objectives.classification_loss(linear_apply, num_data=300, prior_precision=1.0)
    options = {"rank": 3, "start_step": 2, "collect_every": 2, **options}
    return swag.build(loss_fn, optimizer, **options)


def _linear_params(key):
    k1, k2 = jax.random.split(key)
    return {"w": 0.1 * jax.random.normal(k1, (2, 3)), "b": 0.1 * jax.random.normal(k2, (3,))}


def _numpy(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_family_conformance(blobs):
    inputs, labels = blobs
    batch = {"inputs": inputs[:64], "labels": labels[:64]}
    family = _linear_family(optax.sgd(0.1, momentum=0.9))
    state = family.init(_linear_params(jax.random.key(0)), {})
    for field in ("params", "model_state", "step"):
        assert field in state._fields
    update = jax.jit(family.update)
    new_state, info = update(jax.random.key(1), state, batch)
    new_state, info = update(jax.random.key(2), new_state, batch)
    assert update._cache_size() == 1
    assert int(new_state.num_collected) == 1
    assert jax.eval_shape(lambda s: s, state) == jax.eval_shape(lambda s: s, new_state)
    cond_state = jax.eval_shape(
        lambda s: jax.lax.cond(
            True, lambda s: family.update(jax.random.key(3), s, batch)[0], lambda s: s, s
        ),
        state,
    )
    assert cond_state == jax.eval_shape(lambda s: s, state)
    for _ in range(4):
        new_state, _ = update(jax.random.key(4), new_state, batch)

    @jax.jit
    def checks(state, keys):
        samples = family.sample(jax.random.key(5), state, 7)
        log_prob = family.log_prob(state, state.params)
        by_key = jax.vmap(lambda k: family.sample(k, state, 2))(keys)
        stacked = jax.vmap(lambda k: family.init(_linear_params(k), {}))(keys)
        stepped, infos = jax.vmap(family.update, in_axes=(0, 0, None))(keys, stacked, batch)
        return samples, log_prob, by_key, stacked, stepped, infos

    keys = jax.random.split(jax.random.key(6), 3)
    samples, log_prob, by_key, stacked, stepped, infos = checks(new_state, keys)
    assert samples["w"].shape == (7, 2, 3)
    assert float(jnp.std(samples["w"], axis=0).mean()) > 0  # a real distribution
    assert np.isfinite(float(log_prob))
    assert by_key["w"].shape == (3, 2, 2, 3)
    assert not np.allclose(by_key["w"][0], by_key["w"][1])
    assert infos.loss.shape == (3,)
    assert len(set(np.asarray(infos.loss).round(6))) == 3  # three different members
    assert not np.allclose(stepped.params["w"], stacked.params["w"])
    assert stepped.deviations["w"].shape == (3, 3, 2, 3)


def test_f_swag_runs_and_differs_from_swag(blobs):
    base = optax.sgd(0.1, momentum=0.9)
    plain = _linear_family(base, start_step=20, collect_every=6)
    flat = _linear_family(optax.chain(transforms.sam(0.1), base), start_step=20, collect_every=6)
    params = _linear_params(jax.random.key(0))
    results = [
        training.fit(
            jax.random.key(1),
            family,
            family.init(params, {}),
            blobs,
            num_epochs=10,
            batch_size=50,
            progress=False,
        )
        for family in (plain, flat)
    ]
    for result in results:
        assert result.history[-1]["accuracy"] > 0.9
        assert int(result.state.num_collected) == 7  # steps 20, 26, ..., 56 of 60
    assert not np.allclose(results[0].state.mean["w"], results[1].state.mean["w"], atol=1e-4)


# --------------------------------------------------------------------------------------
# BatchNorm re-estimation


class _TinyBN(nn.Module):
    @nn.compact
    def __call__(self, inputs, *, train):
        h = nn.Dense(3, name="dense")(inputs)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(h)
        return nn.Dense(2, name="output")(nn.relu(h))


def _tiny_bn(num=50):
    module = _TinyBN()
    inputs = 2.0 + 1.5 * jax.random.normal(jax.random.key(0), (num, 4))
    params, model_state = models.init(module, jax.random.key(1), inputs[:1])
    return models.make_apply(module), params, model_state, inputs


def test_reestimated_statistics_are_the_exact_full_data_moments():
    apply, params, model_state, inputs = _tiny_bn()
    pre_bn = np.asarray(inputs @ params["dense"]["kernel"] + params["dense"]["bias"], np.float64)
    new = batchnorm.reestimate_batch_stats(apply, params, model_state, inputs, batch_size=16)
    stats_ = new["batch_stats"]["bn"]
    np.testing.assert_allclose(stats_["mean"], pre_bn.mean(0), rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(stats_["var"], pre_bn.var(0), rtol=2e-5, atol=1e-5)
    assert jax.eval_shape(lambda s: s, new) == jax.eval_shape(lambda s: s, model_state)
    # "average": the size-weighted mean of the biased batch variances (batches 16, 16, 16, 2)
    average = batchnorm.reestimate_batch_stats(
        apply, params, model_state, inputs, batch_size=16, variance="average"
    )
    batches = [pre_bn[i : i + 16] for i in range(0, 50, 16)]
    expected = sum(len(b) * b.var(0) for b in batches) / 50
    np.testing.assert_allclose(average["batch_stats"]["bn"]["var"], expected, rtol=2e-5)
    assert not np.allclose(expected, pre_bn.var(0), rtol=1e-3)  # the two modes differ


def test_reestimation_with_dropout_untouched_and_integer_leaves_and_one_compilation():
    traces = []

    def apply(params, model_state, inputs, *, train, key):
        traces.append(1)
        outputs, state = bn_mlp_apply(
            params, {"mean": model_state["mean"]}, inputs, train=train, key=key
        )
        return outputs, {**model_state, "mean": state["mean"]}

    inputs = jax.random.normal(jax.random.key(0), (30, 2))
    model_state = {"mean": jnp.zeros(8), "fixed": jnp.full(3, 7.0), "count": jnp.array(4)}
    for seed in range(2):
        params = {
            "w1": jax.random.normal(jax.random.key(seed), (2, 8)),
            "w2": jnp.zeros((8, 3)),
        }
        new = batchnorm.reestimate_batch_stats(
            apply, params, model_state, inputs, batch_size=8, key=jax.random.key(9)
        )
        np.testing.assert_allclose(
            new["mean"], (inputs @ params["w1"]).mean(0), rtol=2e-5, atol=1e-6
        )
        np.testing.assert_array_equal(new["fixed"], 7.0)  # not a running average: kept
        assert int(new["count"]) == 4 and new["count"].dtype == model_state["count"].dtype
        if seed == 0:
            traced = len(traces)
    assert len(traces) == traced  # second call reused the compiled program


def test_sample_with_batch_stats_gives_each_sample_its_own_statistics():
    apply, params, model_state, inputs = _tiny_bn()
    labels = (inputs[:, 0] > 2.0).astype(jnp.int32)
    loss_fn = objectives.classification_loss(apply, num_data=50)
    family = swag.build(loss_fn, optax.sgd(0.05), rank=3, start_step=1, collect_every=1)
    state = family.init(params, model_state)
    update = jax.jit(family.update)
    for step in range(5):
        state, _ = update(jax.random.key(step), state, {"inputs": inputs, "labels": labels})
    samples, states = batchnorm.sample_with_batch_stats(
        jax.random.key(3), family, state, apply, inputs, num_samples=4, batch_size=20
    )
    assert states["batch_stats"]["bn"]["mean"].shape == (4, 3)
    numpy_samples, numpy_inputs = _numpy(samples), np.asarray(inputs, np.float64)
    for i in range(4):
        sample = jax.tree.map(lambda x, i=i: x[i], numpy_samples)
        pre_bn = numpy_inputs @ sample["dense"]["kernel"] + sample["dense"]["bias"]
        np.testing.assert_allclose(
            states["batch_stats"]["bn"]["mean"][i], pre_bn.mean(0), rtol=2e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            states["batch_stats"]["bn"]["var"][i], pre_bn.var(0), rtol=2e-5, atol=1e-5
        )
    assert not np.allclose(
        states["batch_stats"]["bn"]["mean"][0], states["batch_stats"]["bn"]["mean"][1]
    )
    predict_fn = bma.model_predict_fn(apply, per_sample_state=True)
    log_probs, members = bma.predict(predict_fn, (samples, states), inputs, return_members=True)
    first = jax.jit(
        lambda samples, states: jax.nn.log_softmax(
            apply(
                jax.tree.map(lambda x: x[0], samples),
                jax.tree.map(lambda x: x[0], states),
                inputs,
                train=False,
            )[0]
        )
    )(samples, states)
    np.testing.assert_allclose(members[0], first, atol=1e-5)
    np.testing.assert_allclose(
        log_probs, jax.scipy.special.logsumexp(members, 0) - np.log(4), atol=1e-5
    )


def test_reestimation_rejects_bad_arguments():
    apply, params, model_state, inputs = _tiny_bn(10)
    with pytest.raises(ValueError, match="batch_size"):
        batchnorm.reestimate_batch_stats(apply, params, model_state, inputs, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        batchnorm.reestimate_batch_stats(apply, params, model_state, inputs, batch_size=11)
    with pytest.raises(ValueError, match="variance"):
        batchnorm.reestimate_batch_stats(
            apply, params, model_state, inputs, batch_size=5, variance="unbiased"
        )
    with pytest.raises(ValueError, match="NaN"):
        batchnorm.reestimate_batch_stats(
            apply, params, model_state, inputs.at[0, 0].set(jnp.nan), batch_size=5
        )
    with pytest.raises(ValueError, match="non-empty"):
        batchnorm.reestimate_batch_stats(apply, params, model_state, inputs[:0], batch_size=1)
    assert batchnorm.reestimate_batch_stats(apply, params, {}, inputs, batch_size=5) == {}
