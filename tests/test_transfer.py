"""Transfer-learning plumbing: selection, partition/merge, Gaussian priors, frozen parts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from bnn_flat import bma, objectives, transfer
from bnn_flat.posteriors import low_rank_vi, mean_field_vi, swag
from bnn_flat.posteriors.mean_field_vi import inverse_softplus
from bnn_flat.types import LossAux


def _torchvision_resnet_tree():
    """Parameter names of a torchvision ResNet-18 (two blocks), as nested dicts."""
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def bn(c):
        return {"weight": arr(c), "bias": arr(c)}

    def block(c, downsample):
        out = {"conv1": {"weight": arr(c, c, 3, 3)}, "bn1": bn(c)}
        out |= {"conv2": {"weight": arr(c, c, 3, 3)}, "bn2": bn(c)}
        if downsample:
            out["downsample"] = {"0": {"weight": arr(c, c, 1, 1)}, "1": bn(c)}
        return out

    return {
        "conv1": {"weight": arr(4, 3, 7, 7)},
        "bn1": bn(4),
        "layer1": {"0": block(4, False), "1": block(4, False)},
        "layer2": {"0": block(4, True), "1": block(4, False)},
        "fc": {"weight": arr(10, 4), "bias": arr(10)},
    }


def _flax_resnet_tree():
    """Parameter names of bnn_flat.models.resnet (stem, one stage, head)."""
    ones = jnp.ones(2)
    norm = {"scale": ones, "bias": ones}
    return {
        "stem_conv": {"kernel": ones},
        "stem_norm": norm,
        "stage0_block0": {
            "conv_0": {"kernel": ones},
            "norm_0": norm,
            "conv_1": {"kernel": ones},
            "norm_1": norm,
            "shortcut_conv": {"kernel": ones},
            "shortcut_norm": norm,
        },
        "head": {"kernel": ones, "bias": ones},
    }


def _selected(tree, mask):
    names = jax.tree.leaves(transfer.path_names(tree))
    return {name for name, keep in zip(names, jax.tree.leaves(mask), strict=True) if keep}


def _trees_identical(left, right):
    assert jax.tree.structure(left) == jax.tree.structure(right)
    for a, b in zip(jax.tree.leaves(left), jax.tree.leaves(right), strict=True):
        np.testing.assert_array_equal(a, b)


# Names and selection ----------------------------------------------------------------------


def test_path_names_dicts_and_sequences():
    tree = {"a": [jnp.zeros(1), {"b": jnp.zeros(1)}], "c": jnp.zeros(1)}
    assert transfer.path_names(tree) == {"a": ["a/0", {"b": "a/1/b"}], "c": "c"}


def test_norm_and_head_preset_on_torchvision_resnet():
    tree = _torchvision_resnet_tree()
    selected = _selected(tree, transfer.select(tree, "norm_and_head"))
    expected = {"bn1/weight", "bn1/bias", "fc/weight", "fc/bias"}
    for layer in ("layer1", "layer2"):
        for block in ("0", "1"):
            for name in ("bn1", "bn2"):
                expected |= {f"{layer}/{block}/{name}/weight", f"{layer}/{block}/{name}/bias"}
    # As SA-BMA's substring rule, the unnamed downsample BatchNorm ("downsample/1") is frozen.
    assert selected == expected
    assert _selected(tree, transfer.select(tree, "all")) == set(
        jax.tree.leaves(transfer.path_names(tree))
    )
    assert _selected(tree, transfer.select(tree, "head")) == {"fc/weight", "fc/bias"}
    with_downsample = transfer.select(tree, ["norm_and_head", r"downsample/1/"])
    assert _selected(tree, with_downsample) == expected | {
        "layer2/0/downsample/1/weight",
        "layer2/0/downsample/1/bias",
    }


def test_norm_preset_on_flax_names_and_exclude():
    tree = _flax_resnet_tree()
    norms = {
        f"{module}/{leaf}"
        for module in (
            "stem_norm",
            "stage0_block0/norm_0",
            "stage0_block0/norm_1",
            "stage0_block0/shortcut_norm",
        )
        for leaf in ("scale", "bias")
    }
    assert _selected(tree, transfer.select(tree, "norm")) == norms
    mask = transfer.select(tree, "norm_and_head", exclude=[r"/bias$", "^stem_"])
    assert _selected(tree, mask) == {
        "stage0_block0/norm_0/scale",
        "stage0_block0/norm_1/scale",
        "stage0_block0/shortcut_norm/scale",
        "head/kernel",
    }


def test_norm_pattern_matches_bn_tokens_only():
    tree = {
        name: jnp.zeros(1)
        for name in ("bn", "bn1", "stem_bn", "BatchNorm_0", "LayerNorm_3", "subnet", "Dense_0")
    }
    assert _selected(tree, transfer.select(tree, "norm")) == {
        "bn",
        "bn1",
        "stem_bn",
        "BatchNorm_0",
        "LayerNorm_3",
    }


def test_norm_and_head_helper_with_flax_auto_names():
    tree = {
        "Dense_0": {"kernel": jnp.zeros(1)},
        "Dense_1": {"kernel": jnp.zeros(1)},
        "Dense_10": {"kernel": jnp.zeros(1)},
        "GroupNorm_0": {"scale": jnp.zeros(1)},
    }
    mask = transfer.select(tree, transfer.norm_and_head(head="Dense_1"))
    assert _selected(tree, mask) == {"Dense_1/kernel", "GroupNorm_0/scale"}  # not Dense_10


def test_select_errors_name_the_rule():
    tree = _flax_resnet_tree()
    with pytest.raises(ValueError, match="'haed'"):
        transfer.select(tree, ["head", "haed"])
    with pytest.raises(ValueError, match="exclude rule 'bais'"):
        transfer.select(tree, "all", exclude="bais")
    with pytest.raises(ValueError, match="invalid regular expression"):
        transfer.select(tree, "norm(")
    with pytest.raises(ValueError, match="at least one"):
        transfer.select(tree, [])
    with pytest.raises(ValueError, match="'head'"):  # presets are checked too
        transfer.select({"conv": jnp.zeros(1)}, "head")
    mask = transfer.select(tree, ["head", "haed"], allow_unmatched=True)
    assert _selected(tree, mask) == {"head/kernel", "head/bias"}


# Partition and merge ----------------------------------------------------------------------


def test_partition_merge_round_trip():
    tree = _torchvision_resnet_tree()
    mask = transfer.select(tree, "norm_and_head")
    trainable, frozen = transfer.partition(tree, mask)
    # Pruned: no empty branches; only the selected leaves are trainable.
    assert set(trainable) == {"bn1", "layer1", "layer2", "fc"}
    assert set(trainable["layer1"]["0"]) == {"bn1", "bn2"}
    assert "fc" not in frozen and "downsample" in frozen["layer2"]["0"]
    assert set(jax.tree.leaves(transfer.path_names(trainable))) == _selected(tree, mask)
    num_leaves = len(jax.tree.leaves(tree))
    assert len(jax.tree.leaves(trainable)) + len(jax.tree.leaves(frozen)) == num_leaves
    merged = transfer.merge(trainable, frozen)
    _trees_identical(merged, tree)
    assert merged["fc"]["weight"] is tree["fc"]["weight"]  # the arrays themselves
    ordered = transfer.merge(frozen, trainable, like=tree)
    assert list(ordered) == list(tree)
    assert list(ordered["layer2"]["0"]) == list(tree["layer2"]["0"])
    # Plain pytrees: jit and tree maps work on both parts.
    doubled = jax.jit(lambda t: transfer.merge(jax.tree.map(lambda x: 2 * x, t), frozen))(trainable)
    np.testing.assert_array_equal(doubled["fc"]["bias"], 2 * tree["fc"]["bias"])
    np.testing.assert_array_equal(doubled["conv1"]["weight"], tree["conv1"]["weight"])


def test_partition_all_and_none():
    tree = _flax_resnet_tree()
    trainable, frozen = transfer.partition(tree, jax.tree.map(lambda _: True, tree))
    assert frozen == {}
    _trees_identical(trainable, tree)
    trainable, frozen = transfer.partition(tree, jax.tree.map(lambda _: False, tree))
    assert trainable == {}
    _trees_identical(transfer.merge(trainable, frozen), tree)


def test_partition_and_merge_errors():
    tree = {"a": {"w": jnp.zeros(1), "b": jnp.zeros(1)}}
    with pytest.raises(ValueError, match="structure"):
        transfer.partition(tree, {"a": {"w": True}})
    with pytest.raises(ValueError, match="bools"):
        transfer.partition(tree, {"a": {"w": 1, "b": 0}})
    with pytest.raises(ValueError, match="nested dict"):
        transfer.partition([jnp.zeros(1)], [True])
    with pytest.raises(ValueError, match="a/w is in both"):
        transfer.merge({"a": {"w": jnp.zeros(1)}}, {"a": {"w": jnp.ones(1)}})
    with pytest.raises(ValueError, match="leaf in one tree and a branch"):
        transfer.merge({"a": jnp.zeros(1)}, {"a": {"w": jnp.ones(1)}})
    with pytest.raises(ValueError, match="missing"):
        transfer.merge({"a": {"w": jnp.zeros(1)}}, {}, like=tree)


# Priors ---------------------------------------------------------------------------------


def _swag_state(num_collected, rank, seed=0):
    params = {"layer": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(2)}, "head": jnp.zeros(3)}
    state = swag.init(params, None, optax.sgd(0.1), rank=rank)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal((2, 11))  # iterates on a plane plus isotropic noise
    for _ in range(num_collected):
        flat = direction.T @ rng.standard_normal(2) + 0.3 * rng.standard_normal(11) + 1.0
        state = swag.collect(state, ravel_pytree(params)[1](jnp.asarray(flat, jnp.float32)))
    return state


def _swag_covariance(state, scale, rows=None):
    """scale * (diag(v) + C^T C / (K_e - 1)) from the state's fields, by hand in float64."""
    variance = np.asarray(ravel_pytree(swag.variance(state))[0], np.float64)
    deviations = np.stack(
        [
            np.asarray(ravel_pytree(jax.tree.map(lambda d, i=i: d[i], state.deviations))[0])
            for i in range(jax.tree.leaves(state.deviations)[0].shape[0])
        ]
    ).astype(np.float64)
    if rows is not None:
        deviations = deviations[rows]
    filled = min(int(state.num_collected), len(deviations))
    deviations = deviations[:filled] if rows is None else deviations
    low_rank = deviations.T @ deviations / max(filled - 1, 1)
    return scale * (np.diag(variance) + low_rank)


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_prior_from_swag_covariance_equals_swag_formula(scale):
    state = _swag_state(num_collected=7, rank=4)  # the ring buffer has wrapped
    prior = transfer.prior_from_swag(state, scale=scale)
    assert prior["factor"]["head"].shape == (4, 3)
    _trees_identical(prior["mean"], state.mean)
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(prior), _swag_covariance(state, scale), rtol=2e-5, atol=1e-7
    )
    # Same density as SWAG's own log_prob.
    point = jax.tree.map(lambda m: m + 0.1, state.mean)
    np.testing.assert_allclose(
        low_rank_vi.log_density(prior, point), swag.log_prob(state, point, scale=scale), rtol=1e-5
    )


def test_prior_from_swag_matches_empirical_swag_samples():
    state = _swag_state(num_collected=6, rank=3, seed=1)
    prior = transfer.prior_from_swag(state, scale=0.5)
    covariance = np.asarray(low_rank_vi.covariance_matrix(prior), np.float64)
    num_samples = 20_000
    samples = swag.sample(jax.random.key(0), state, num_samples, scale=0.5)
    flat = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(samples), np.float64)
    empirical = np.cov(flat, rowvar=False)
    # Standard error of a Gaussian sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n).
    diagonal = np.diag(covariance)
    standard_error = np.sqrt((np.outer(diagonal, diagonal) + covariance**2) / num_samples)
    assert np.max(np.abs(empirical - covariance) / standard_error) < 5.0
    assert np.abs(covariance - np.diag(diagonal)).max() > 10 * standard_error.max()  # low rank


def test_prior_from_swag_partial_buffer_rank_and_diagonal():
    state = _swag_state(num_collected=2, rank=4)  # K_e = 2 filled rows
    prior = transfer.prior_from_swag(state, scale=1.0)
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(prior), _swag_covariance(state, 1.0), rtol=2e-5, atol=1e-7
    )
    state = _swag_state(num_collected=7, rank=4)
    # rank 2: the two most recent deviations, K_e = 2.
    recent = [(int(state.write_index) - 1) % 4, (int(state.write_index) - 2) % 4]
    prior = transfer.prior_from_swag(state, scale=0.5, rank=2)
    assert prior["factor"]["head"].shape == (2, 3)
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(prior),
        _swag_covariance(state, 0.5, rows=recent),
        rtol=2e-5,
        atol=1e-7,
    )
    # rank 6 > K: zero padding, same covariance.
    padded = transfer.prior_from_swag(state, scale=0.5, rank=6)
    assert padded["factor"]["head"].shape == (6, 3)
    np.testing.assert_array_equal(padded["factor"]["head"][4:], 0.0)
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(padded), _swag_covariance(state, 0.5), rtol=2e-5, atol=1e-7
    )
    # SWAG-Diag: one zero row.
    diagonal = transfer.prior_from_swag(_swag_state(5, rank=0), scale=0.5)
    assert diagonal["factor"]["head"].shape == (1, 3)
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(diagonal),
        0.5 * np.diag(np.asarray(ravel_pytree(swag.variance(_swag_state(5, rank=0)))[0])),
        rtol=2e-5,
    )


def test_prior_from_swag_min_std_and_errors():
    state = _swag_state(num_collected=1, rank=2)  # n = 1: variance is var_clamp = 1e-30
    prior = transfer.prior_from_swag(state, min_std=1e-3)
    std = mean_field_vi.standard_deviation(prior)
    np.testing.assert_allclose(ravel_pytree(std)[0], 1e-3, rtol=1e-5)
    with pytest.raises(ValueError, match="collected no iterate"):
        transfer.prior_from_swag(_swag_state(0, rank=2))
    with pytest.raises(ValueError, match="scale"):
        transfer.prior_from_swag(state, scale=0.0)
    with pytest.raises(ValueError, match="rank"):
        transfer.prior_from_swag(state, rank=0)


def test_prior_from_moments_covariance_and_errors():
    mean = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
    variance = {"a": jnp.array([1.0, 4.0]), "b": jnp.array([0.25])}
    factor = {"a": jnp.array([[1.0, 0.0], [0.0, 2.0]]), "b": jnp.array([[1.0], [1.0]])}
    prior = transfer.prior_from_moments(mean, variance, factor)
    rows = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 1.0]])  # ravel order a, b
    np.testing.assert_allclose(
        low_rank_vi.covariance_matrix(prior), np.diag([1.0, 4.0, 0.25]) + rows.T @ rows, rtol=1e-6
    )
    zero_rank = transfer.prior_from_moments(mean, variance, rank=3)
    assert zero_rank["factor"]["a"].shape == (3, 2)
    np.testing.assert_allclose(
        ravel_pytree(mean_field_vi.standard_deviation(zero_rank))[0], [1.0, 2.0, 0.5], rtol=1e-6
    )
    with pytest.raises(ValueError, match="negative or NaN"):
        transfer.prior_from_moments(mean, {"a": jnp.array([1.0, -1.0]), "b": jnp.ones(1)})
    with pytest.raises(ValueError, match="zero entries"):
        transfer.prior_from_moments(mean, {"a": jnp.array([1.0, 0.0]), "b": jnp.ones(1)})
    floored = transfer.prior_from_moments(
        mean, {"a": jnp.array([1.0, 0.0]), "b": jnp.ones(1)}, min_std=0.1
    )
    np.testing.assert_allclose(mean_field_vi.standard_deviation(floored)["a"], [1.0, 0.1], 1e-5)
    with pytest.raises(ValueError, match="shape"):
        transfer.prior_from_moments(mean, {"a": jnp.ones(3), "b": jnp.ones(1)})
    with pytest.raises(ValueError, match="factor leaf 'b'"):
        transfer.prior_from_moments(mean, variance, {"a": factor["a"], "b": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="common rank"):
        transfer.prior_from_moments(mean, variance, {"a": factor["a"], "b": jnp.ones((3, 1))})


def test_extend_prior_new_head():
    body = {"conv": {"kernel": jnp.arange(4.0)}}
    prior = transfer.prior_from_moments(
        body, {"conv": {"kernel": jnp.full(4, 2.0)}}, {"conv": {"kernel": jnp.ones((2, 4))}}
    )
    params = {"conv": {"kernel": jnp.zeros(4)}, "head": {"kernel": jnp.full((4, 3), 0.7)}}
    new = transfer.extend_prior(prior, params, new_std=1e-5**0.5)
    assert list(new["mean"]) == ["conv", "head"]
    assert new["mean"]["conv"]["kernel"] is prior["mean"]["conv"]["kernel"]  # kept as is
    assert new["factor"]["conv"]["kernel"] is prior["factor"]["conv"]["kernel"]
    np.testing.assert_array_equal(new["mean"]["head"]["kernel"], 0.0)
    np.testing.assert_allclose(
        mean_field_vi.standard_deviation(new)["head"]["kernel"], 1e-5**0.5, rtol=1e-5
    )
    assert new["factor"]["head"]["kernel"].shape == (2, 4, 3)
    np.testing.assert_array_equal(new["factor"]["head"]["kernel"], 0.0)
    # The covariance is block diagonal with the new block new_std^2 I.
    covariance = np.asarray(low_rank_vi.covariance_matrix(new))
    np.testing.assert_allclose(covariance[:4, :4], low_rank_vi.covariance_matrix(prior), 1e-6)
    np.testing.assert_allclose(covariance[4:, 4:], 1e-5 * np.eye(12), rtol=1e-4)
    np.testing.assert_array_equal(covariance[:4, 4:], 0.0)
    initialised = transfer.extend_prior(prior, params, new_std=0.1, new_mean="params")
    np.testing.assert_array_equal(initialised["mean"]["head"]["kernel"], np.float32(0.7))


def test_extend_prior_replace_and_errors():
    prior = transfer.prior_from_moments(
        {"body": jnp.zeros(2), "head": jnp.zeros((2, 1000))},
        {"body": jnp.ones(2), "head": jnp.ones((2, 1000))},
    )
    params = {"body": jnp.zeros(2), "head": jnp.zeros((2, 10))}
    with pytest.raises(ValueError, match="'head' has shape"):
        transfer.extend_prior(prior, params, new_std=0.1)
    new = transfer.extend_prior(prior, params, new_std=0.1, replace="^head$")
    assert new["mean"]["head"].shape == (2, 10) and new["factor"]["head"].shape == (1, 2, 10)
    with pytest.raises(ValueError, match="does not have"):
        transfer.extend_prior(prior, {"body": jnp.zeros(2)}, new_std=0.1)
    dropped = transfer.extend_prior(prior, {"body": jnp.zeros(2)}, new_std=0.1, drop_extra=True)
    assert list(dropped["mean"]) == ["body"]
    with pytest.raises(ValueError, match="matches no path"):
        transfer.extend_prior(prior, params, new_std=0.1, replace="haed")
    with pytest.raises(ValueError, match="new_mean"):
        transfer.extend_prior(prior, params, new_std=0.1, new_mean="init", replace="head")
    with pytest.raises(ValueError, match="new_std"):
        transfer.extend_prior(prior, params, new_std=0.0, replace="head")


def test_partition_prior_gives_exact_marginals():
    state = _swag_state(num_collected=6, rank=3)
    prior = transfer.prior_from_swag(state, scale=0.5)
    mask = transfer.select(prior["mean"], ["head", "bias"])
    trainable_prior, frozen_prior = transfer.partition_prior(prior, mask)
    assert trainable_prior["factor"]["layer"]["bias"].shape == (3, 2)
    _, unravel = ravel_pytree(prior["mean"])
    dimension = ravel_pytree(prior["mean"])[0].size
    indices = unravel(jnp.arange(dimension, dtype=jnp.float32))
    index_trainable, index_frozen = transfer.partition(indices, mask)
    covariance = np.asarray(low_rank_vi.covariance_matrix(prior))
    for part, index_tree in ((trainable_prior, index_trainable), (frozen_prior, index_frozen)):
        index = np.asarray(ravel_pytree(index_tree)[0]).astype(int)
        np.testing.assert_allclose(
            low_rank_vi.covariance_matrix(part), covariance[np.ix_(index, index)], rtol=1e-6
        )
        np.testing.assert_array_equal(
            ravel_pytree(part["mean"])[0], ravel_pytree(prior["mean"])[0][index]
        )


# Frozen parts ---------------------------------------------------------------------------


def _dropout_apply(params, model_state, inputs, *, train, key):
    hidden = jnp.tanh(inputs @ params["body"]["kernel"]) * params["norm"]["scale"]
    if train:
        hidden = jnp.where(jax.random.bernoulli(key, 0.5, hidden.shape), 2 * hidden, 0.0)
    return hidden @ params["head"]["kernel"], model_state


def _dropout_problem():
    rng = np.random.default_rng(3)
    params = {
        "body": {"kernel": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)},
        "norm": {"scale": jnp.asarray(rng.standard_normal(5), jnp.float32)},
        "head": {"kernel": jnp.asarray(rng.standard_normal((5, 4)), jnp.float32)},
    }
    batch = {
        "inputs": jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
        "labels": jnp.asarray(rng.integers(0, 4, 8), jnp.int32),
    }
    return params, batch


def test_with_frozen_mean_mode_equals_merged_loss_exactly():
    params, batch = _dropout_problem()
    loss_fn = objectives.classification_loss(_dropout_apply, num_data=8, prior_precision=0.5)
    trainable, frozen = transfer.partition(params, transfer.select(params, "norm_and_head"))
    trainable_loss = transfer.with_frozen(loss_fn, frozen)
    key = jax.random.key(4)
    loss, aux = jax.jit(trainable_loss)(trainable, {}, batch, key)
    expected, expected_aux = jax.jit(loss_fn)(params, {}, batch, key)
    np.testing.assert_array_equal(loss, expected)
    np.testing.assert_array_equal(aux.metrics["accuracy"], expected_aux.metrics["accuracy"])
    grads = jax.grad(lambda t: trainable_loss(t, {}, batch, key)[0])(trainable)
    full_grads = jax.grad(lambda p: loss_fn(p, {}, batch, key)[0])(params)
    expected_grads, _ = transfer.partition(full_grads, transfer.select(params, "norm_and_head"))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_with_frozen_apply_equals_merged_apply():
    params, batch = _dropout_problem()
    trainable, frozen = transfer.partition(params, transfer.select(params, "head"))
    apply_trainable = transfer.with_frozen_apply(_dropout_apply, frozen)
    key = jax.random.key(5)
    for train in (True, False):
        np.testing.assert_array_equal(
            apply_trainable(trainable, {}, batch["inputs"], train=train, key=key)[0],
            _dropout_apply(params, {}, batch["inputs"], train=train, key=key)[0],
        )


def _linear_gaussian():
    """y = x_t . w_t + x_f . w_f; frozen w_f ~ N(mu_f, diag(s^2) + W^T W)."""
    rng = np.random.default_rng(6)
    inputs = jnp.asarray(rng.standard_normal((10, 5)), jnp.float32)
    batch = {"inputs": inputs, "labels": jnp.asarray(rng.standard_normal(10), jnp.float32)}
    trainable = {"trainable": {"w": jnp.asarray([0.3, -0.5], jnp.float32)}}
    frozen_prior = transfer.prior_from_moments(
        {"frozen": {"w": jnp.asarray([1.0, 0.5, -1.0], jnp.float32)}},
        {"frozen": {"w": jnp.asarray([0.2, 0.1, 0.3], jnp.float32)}},
        {"frozen": {"w": jnp.asarray(rng.standard_normal((2, 3)) * 0.4, jnp.float32)}},
    )

    def apply(params, model_state, x, *, train, key):
        outputs = x[:, :2] @ params["trainable"]["w"] + x[:, 2:] @ params["frozen"]["w"]
        return outputs[:, None], model_state

    loss_fn = objectives.regression_loss(apply, num_data=10, noise_std=1.0)
    return batch, trainable, frozen_prior, loss_fn


def test_with_frozen_sample_mode_averages_to_expected_loss():
    batch, trainable, frozen_prior, loss_fn = _linear_gaussian()
    frozen = frozen_prior["mean"]
    trainable_loss = transfer.with_frozen(loss_fn, frozen, frozen_prior=frozen_prior, mode="sample")
    keys = jax.random.split(jax.random.key(7), 4000)
    losses = np.asarray(
        jax.jit(jax.vmap(lambda k: trainable_loss(trainable, {}, batch, k)[0]))(keys), np.float64
    )
    # E[0.5 (y - x_t w_t - x_f w_f)^2] = 0.5 (residual at the mean)^2 + 0.5 x_f^T Sigma_f x_f.
    covariance = np.asarray(low_rank_vi.covariance_matrix(frozen_prior), np.float64)
    frozen_inputs = np.asarray(batch["inputs"][:, 2:], np.float64)
    mean_loss = float(loss_fn(transfer.merge(trainable, frozen), {}, batch, keys[0])[0])
    expected = mean_loss + 0.5 * np.mean(
        np.einsum("ni,ij,nj->n", frozen_inputs, covariance, frozen_inputs)
    )
    standard_error = losses.std() / np.sqrt(len(losses))
    assert abs(losses.mean() - expected) < 4 * standard_error
    assert expected - mean_loss > 20 * standard_error  # the sampled term is resolved
    assert len(np.unique(losses[:100])) == 100  # different keys, different frozen draws
    same = trainable_loss(trainable, {}, batch, keys[0])[0]
    np.testing.assert_array_equal(same, trainable_loss(trainable, {}, batch, keys[0])[0])


def test_with_frozen_sample_mode_key_contract():
    """The frozen draw uses split(key)[0]; loss_fn receives split(key)[1] (dropout)."""
    frozen_prior = transfer.prior_from_moments({"f": jnp.zeros(3)}, {"f": jnp.ones(3)}, rank=2)

    def loss_fn(params, model_state, batch, key):
        loss = jnp.sum(params["f"]) + jax.random.normal(key) + 0 * params["t"]
        return loss, LossAux(model_state, {})

    key = jax.random.key(8)
    trainable_loss = transfer.with_frozen(
        loss_fn, frozen_prior["mean"], frozen_prior=frozen_prior, mode="sample"
    )
    frozen_key, loss_key = jax.random.split(key)
    draw = low_rank_vi.sample_variational(frozen_key, frozen_prior, 1)["f"][0]
    expected = jnp.sum(draw) + jax.random.normal(loss_key)
    np.testing.assert_allclose(trainable_loss({"t": jnp.zeros(())}, {}, {}, key)[0], expected)


def test_with_frozen_errors():
    loss_fn = lambda p, s, b, k: (0.0, LossAux(s, {}))  # noqa: E731
    with pytest.raises(ValueError, match="mode"):
        transfer.with_frozen(loss_fn, {}, mode="samples")
    with pytest.raises(ValueError, match="frozen_prior"):
        transfer.with_frozen(loss_fn, {"f": jnp.zeros(2)}, mode="sample")
    prior = transfer.prior_from_moments({"f": jnp.zeros(3)}, {"f": jnp.ones(3)})
    with pytest.raises(ValueError, match="shape"):
        transfer.with_frozen(loss_fn, {"f": jnp.zeros(2)}, frozen_prior=prior, mode="sample")


def test_complete_samples_mean_and_sample_modes():
    frozen_prior = transfer.prior_from_moments(
        {"body": {"w": jnp.arange(3.0)}}, {"body": {"w": jnp.ones(3)}}, rank=2
    )
    frozen = frozen_prior["mean"]
    trainable_samples = {"head": {"w": jnp.arange(8.0).reshape(4, 2)}}
    full = transfer.complete_samples(None, trainable_samples, frozen)
    assert full["body"]["w"].shape == (4, 3)
    np.testing.assert_array_equal(full["body"]["w"], np.tile(np.arange(3.0), (4, 1)))
    np.testing.assert_array_equal(full["head"]["w"], trainable_samples["head"]["w"])
    key = jax.random.key(9)
    drawn = transfer.complete_samples(
        key, trainable_samples, frozen, frozen_prior=frozen_prior, mode="sample"
    )
    np.testing.assert_array_equal(
        drawn["body"]["w"], low_rank_vi.sample_variational(key, frozen_prior, 4)["body"]["w"]
    )
    assert len(np.unique(np.asarray(drawn["body"]["w"][:, 0]))) == 4  # independent draws
    np.testing.assert_array_equal(drawn["head"]["w"], trainable_samples["head"]["w"])
    with pytest.raises(ValueError, match="leading sample axis"):
        transfer.complete_samples(None, {"a": jnp.zeros((4, 2)), "b": jnp.zeros((3, 2))}, frozen)
    with pytest.raises(ValueError, match="PRNG key"):
        transfer.complete_samples(None, trainable_samples, frozen, mode="sample")


def test_complete_samples_bma_equals_trainable_bma():
    params, batch = _dropout_problem()
    mask = transfer.select(params, "head")
    trainable, frozen = transfer.partition(params, mask)
    noise = jax.random.normal(jax.random.key(10), (6, *trainable["head"]["kernel"].shape))
    trainable_samples = {"head": {"kernel": trainable["head"]["kernel"] + noise}}
    full = transfer.complete_samples(None, trainable_samples, frozen)
    apply_trainable = transfer.with_frozen_apply(_dropout_apply, frozen)
    expected = bma.predict(
        lambda p, x: apply_trainable(p, {}, x, train=False, key=None)[0],
        trainable_samples,
        batch["inputs"],
    )
    log_probs = bma.predict(
        lambda p, x: _dropout_apply(p, {}, x, train=False, key=None)[0], full, batch["inputs"]
    )
    np.testing.assert_allclose(log_probs, expected, atol=1e-6)


def test_init_low_rank_vi_from_prior_and_one_step():
    batch, trainable, frozen_prior, loss_fn = _linear_gaussian()
    prior = transfer.prior_from_moments(
        trainable, {"trainable": {"w": jnp.array([0.01, 0.04])}}, rank=2
    )
    optimizer = optax.adam(1e-2)
    state = transfer.init_low_rank_vi_from_prior(prior, optimizer)
    _trees_identical(low_rank_vi.variational_parameters(state), prior)
    np.testing.assert_allclose(
        mean_field_vi.standard_deviation(prior)["trainable"]["w"], [0.1, 0.2], rtol=1e-5
    )
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(
        optimizer.init(low_rank_vi.variational_parameters(state))
    )
    trainable_loss = transfer.with_frozen(
        loss_fn, frozen_prior["mean"], frozen_prior=frozen_prior, mode="sample"
    )
    new_state, info = jax.jit(
        lambda k, s: low_rank_vi.update(
            k, s, batch, trainable_loss, optimizer, prior_precision=1.0, kl_weight=0.1
        )
    )(jax.random.key(11), state)
    assert int(new_state.step) == 1
    # Adam's first step moves every coordinate of the mean by ~lr against the gradient sign.
    step = np.asarray(new_state.params["trainable"]["w"] - state.params["trainable"]["w"])
    np.testing.assert_allclose(np.abs(step), 1e-2, rtol=1e-3)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert np.isfinite(float(info.loss))


def test_prior_inverse_softplus_matches_scalar_version():
    prior = transfer.prior_from_moments(jnp.zeros(3), jnp.array([1e-10, 0.25, 400.0]))
    expected = [inverse_softplus(s) for s in (1e-5, 0.5, 20.0)]
    np.testing.assert_allclose(prior["raw_scale"], expected, rtol=1e-6)
