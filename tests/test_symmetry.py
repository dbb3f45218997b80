"""Tests of bnn_flat.symmetry: canonical forms, weight matching, min-mass, MMD and diversity."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import metrics, models
from bnn_flat import symmetry as sym


def _leaves_equal(tree_a, tree_b):
    leaves_a, leaves_b = jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)
    assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
    return all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(leaves_a, leaves_b, strict=True)
    )


def _assert_trees_close(tree_a, tree_b, rtol, atol):
    assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


def _squared_norm(tree):
    return sum(
        float(np.sum(np.square(np.asarray(leaf, np.float64)))) for leaf in jax.tree.leaves(tree)
    )


# ----------------------------------------------------------------------------------------------
# Models (module scope: each is initialised and compiled once)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_case():
    module = models.mlp([6, 5], num_outputs=3)
    params, _ = models.init(module, jax.random.key(0), jnp.ones((1, 4)))
    # Non-zero biases, so bias permutation and bias mass are exercised.
    params = jax.tree.map(lambda leaf: leaf + 0.1, params)
    apply = jax.jit(models.make_apply(module), static_argnames="train")
    inputs = jax.random.normal(jax.random.key(1), (32, 4))
    return params, apply, inputs


@pytest.fixture(scope="module")
def lenet_case():
    module = models.lenet(num_classes=4)
    params, _ = models.init(module, jax.random.key(2), jnp.ones((1, 8, 8, 1)))
    # Non-zero biases (initialised at 0), so that their permutation and mass matter.
    params = jax.tree.map(lambda leaf: leaf + 0.05 if leaf.ndim == 1 else leaf, params)
    apply = jax.jit(models.make_apply(module), static_argnames="train")
    inputs = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
    return params, apply, inputs


def _resnet_case(norm):
    # Stage 0 has an identity shortcut, stage 1 a projection shortcut.
    module = models.ResNet(stage_sizes=(1, 1), num_classes=3, width=4, norm=norm, num_groups=2)
    params, state = models.init(module, jax.random.key(4), jnp.ones((1, 8, 8, 3)))
    # Non-trivial normalisation parameters, running statistics and conv biases, so that
    # forgetting to permute any of them changes the function.
    rng = np.random.default_rng(5)
    perturb = lambda leaf, size: leaf + size * rng.uniform(size=leaf.shape).astype(np.float32)
    params = jax.tree.map(lambda leaf: perturb(leaf, 0.3) if leaf.ndim == 1 else leaf, params)
    state = jax.tree.map(lambda leaf: perturb(leaf, 1.0), state)
    apply = jax.jit(models.make_apply(module), static_argnames="train")
    inputs = jax.random.normal(jax.random.key(6), (4, 8, 8, 3))
    return params, state, apply, inputs


@pytest.fixture(scope="module")
def resnet_batch_case():
    return _resnet_case("batch")


@pytest.fixture(scope="module")
def resnet_group_case():
    return _resnet_case("group")


@pytest.fixture(scope="module")
def resnet_none_case():
    return _resnet_case("none")


# ----------------------------------------------------------------------------------------------
# Permutation canonicalisation
# ----------------------------------------------------------------------------------------------


def test_canonicalize_permutation_hand_case():
    # Keys (first incoming weight) 1, 3, 2 -> order (1, 2, 0); biases and the output layer's
    # rows follow. Descending: 3, 2, 1.
    params = {
        "hidden_0": {"kernel": jnp.array([[1.0, 3.0, 2.0], [4.0, 5.0, 6.0]]),
                     "bias": jnp.array([0.1, 0.3, 0.2])},
        "output": {"kernel": jnp.array([[10.0, 11.0], [30.0, 31.0], [20.0, 21.0]]),
                   "bias": jnp.array([7.0, 8.0])},
    }  # fmt: skip
    canonical, state = sym.canonicalize_permutation(params, architecture="mlp", key="max")
    np.testing.assert_array_equal(canonical["hidden_0"]["kernel"], [[3, 2, 1], [5, 6, 4]])
    np.testing.assert_array_equal(canonical["hidden_0"]["bias"], np.float32([0.3, 0.2, 0.1]))
    np.testing.assert_array_equal(canonical["output"]["kernel"], [[30, 31], [20, 21], [10, 11]])
    np.testing.assert_array_equal(canonical["output"]["bias"], [7.0, 8.0])  # never permuted
    assert state == {}
    # "mean" key: column means 2.5, 4, 4 -> ties keep their order: (1, 2, 0).
    by_mean, _ = sym.canonicalize_permutation(params, key="mean")
    np.testing.assert_array_equal(by_mean["hidden_0"]["kernel"], [[3, 2, 1], [5, 6, 4]])
    # "l2" key: norms sqrt(17), sqrt(34), sqrt(40) -> order (2, 1, 0).
    by_norm, _ = sym.canonicalize_permutation(params, key="l2")
    np.testing.assert_array_equal(by_norm["hidden_0"]["kernel"], [[2, 3, 1], [6, 5, 4]])


@pytest.mark.parametrize("key", ["max", "mean", "l2"])
def test_mlp_permutation_is_removed(mlp_case, key):
    params, apply, inputs = mlp_case
    canonical, _ = sym.canonicalize_permutation(params, key=key)
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-5
    for seed in range(3):
        permuted, _ = sym.random_permutation(jax.random.key(seed), params)
        assert not _leaves_equal(permuted, params)
        assert sym.check_function_preserved(apply, params, permuted, inputs) < 1e-5
        recovered, _ = sym.canonicalize_permutation(permuted, key=key)
        assert _leaves_equal(recovered, canonical)  # a pure permutation: exactly equal
    # The canonical order is descending in the key, in every hidden layer.
    for name in ("hidden_0", "hidden_1"):
        kernel = np.asarray(canonical[name]["kernel"])
        keys = {"max": kernel[0], "mean": kernel.mean(0), "l2": np.linalg.norm(kernel, axis=0)}
        assert np.all(np.diff(keys[key]) <= 0)


def test_layer_list_representation_matches_the_dict_form(mlp_case):
    params, _, _ = mlp_case
    layers = tuple(params[name] for name in ("hidden_0", "hidden_1", "output"))
    canonical_dict, _ = sym.canonicalize_permutation(params)
    canonical_list, _ = sym.canonicalize_permutation(layers)
    assert isinstance(canonical_list, tuple) and len(canonical_list) == 3
    for index, name in enumerate(("hidden_0", "hidden_1", "output")):
        for leaf in ("kernel", "bias"):
            np.testing.assert_array_equal(canonical_list[index][leaf], canonical_dict[name][leaf])
    # Layers without biases are supported.
    no_bias = [{"kernel": layer["kernel"]} for layer in layers]
    canonical_no_bias, _ = sym.canonicalize_permutation(no_bias)
    assert isinstance(canonical_no_bias, list) and set(canonical_no_bias[0]) == {"kernel"}
    np.testing.assert_array_equal(
        canonical_no_bias[1]["kernel"], canonical_dict["hidden_1"]["kernel"]
    )


def test_lenet_permutation_is_removed(lenet_case):
    params, apply, inputs = lenet_case
    canonical, _ = sym.canonicalize_permutation(params, architecture="lenet")
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    permuted, _ = sym.random_permutation(jax.random.key(7), params, architecture="lenet")
    assert sym.check_function_preserved(apply, params, permuted, inputs) < 1e-4
    recovered, _ = sym.canonicalize_permutation(permuted, architecture="lenet")
    assert _leaves_equal(recovered, canonical)
    # The conv_1 channels are sorted by their first incoming weight.
    assert np.all(np.diff(np.asarray(canonical["conv_1"]["kernel"])[0, 0, 0]) <= 0)


def test_lenet_flatten_layout_matters(lenet_case):
    # Permuting conv_1's channels but the dense_0 rows as if the flatten were channel-major
    # (contiguous blocks per channel) changes the function: the (H, W, C) layout is needed.
    params, apply, inputs = lenet_case
    permutation = jnp.array([3, 0, 1, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14])
    wrong = jax.tree.map(lambda leaf: leaf, params)
    wrong["conv_1"] = {
        "kernel": params["conv_1"]["kernel"][..., permutation],
        "bias": params["conv_1"]["bias"][permutation],
    }
    rows = params["dense_0"]["kernel"].reshape(16, 4, -1)[permutation].reshape(64, -1)
    wrong["dense_0"] = {"kernel": rows, "bias": params["dense_0"]["bias"]}
    with pytest.raises(ValueError, match="changed the network function"):
        sym.check_function_preserved(apply, params, wrong, inputs)
    right = dict(wrong)
    rows = params["dense_0"]["kernel"].reshape(4, 16, -1)[:, permutation].reshape(64, -1)
    right["dense_0"] = {"kernel": rows, "bias": params["dense_0"]["bias"]}
    assert sym.check_function_preserved(apply, params, right, inputs) < 1e-4


def test_resnet_batch_norm_permutation_is_removed(resnet_batch_case):
    params, state, apply, inputs = resnet_batch_case
    check = lambda p, s: sym.check_function_preserved(
        apply, params, p, inputs, model_state_before=state, model_state_after=s
    )
    canonical, canonical_state = sym.canonicalize_permutation(params, state, architecture="resnet")
    assert check(canonical, canonical_state) < 1e-4
    permuted, permuted_state = sym.random_permutation(
        jax.random.key(8), params, state, architecture="resnet"
    )
    assert not _leaves_equal(permuted_state, state)  # running statistics moved too
    assert check(permuted, permuted_state) < 1e-4
    recovered = sym.canonicalize_permutation(permuted, permuted_state, architecture="resnet")
    assert _leaves_equal(recovered, (canonical, canonical_state))
    # Negative control: the permuted parameters with the old statistics compute something else.
    with pytest.raises(ValueError, match="changed the network function"):
        check(permuted, state)
    # The stage-0 residual stream is sorted by the stem's first incoming weights.
    stem = np.asarray(canonical["stem_conv"]["kernel"])[0, 0, 0]
    assert np.all(np.diff(stem) <= 0)


def test_resnet_group_norm_keeps_groups_together(resnet_group_case):
    params, state, apply, inputs = resnet_group_case
    options = dict(architecture="resnet", norm="group", num_groups=2)
    canonical, _ = sym.canonicalize_permutation(params, state, **options)
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    permuted, _ = sym.random_permutation(jax.random.key(9), params, state, **options)
    assert sym.check_function_preserved(apply, params, permuted, inputs) < 1e-4
    recovered, _ = sym.canonicalize_permutation(permuted, state, **options)
    assert _leaves_equal(recovered, canonical)
    # Two groups of two stem channels: sorted within each group, groups by their top key.
    keys = np.asarray(canonical["stem_conv"]["kernel"])[0, 0, 0].reshape(2, 2)
    assert np.all(keys[:, 0] >= keys[:, 1]) and keys[0, 0] >= keys[1, 0]
    # Treating the GroupNorm network as if it had LayerNorm (free permutations) breaks it,
    # so the group constraint is what keeps the function.
    free, _ = sym.random_permutation(
        jax.random.key(9), params, state, architecture="resnet", norm="layer"
    )
    with pytest.raises(ValueError, match="changed the network function"):
        sym.check_function_preserved(apply, params, free, inputs)


def test_resnet_without_normalisation(resnet_none_case, resnet_group_case):
    params, state, apply, inputs = resnet_none_case
    assert state == {} and "bias" in params["stage1_block0"]["shortcut_conv"]
    canonical, _ = sym.canonicalize_permutation(params, architecture="resnet")  # norm inferred
    permuted, _ = sym.random_permutation(jax.random.key(12), params, architecture="resnet")
    assert sym.check_function_preserved(apply, params, permuted, inputs) < 1e-4
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    recovered, _ = sym.canonicalize_permutation(permuted, architecture="resnet")
    assert _leaves_equal(recovered, canonical)
    # LayerNorm has the parameter layout of GroupNorm, and free permutations.
    group_params = resnet_group_case[0]
    options = dict(architecture="resnet", norm="layer")
    canonical, _ = sym.canonicalize_permutation(group_params, **options)
    permuted, _ = sym.random_permutation(jax.random.key(13), group_params, **options)
    assert _leaves_equal(sym.canonicalize_permutation(permuted, **options)[0], canonical)


def test_permutation_errors(mlp_case, resnet_batch_case, resnet_group_case):
    params, _, _ = mlp_case
    with pytest.raises(ValueError, match="unknown key 'median'"):
        sym.canonicalize_permutation(params, key="median")
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        sym.canonicalize_permutation(params, architecture="vgg")
    with pytest.raises(ValueError, match="hidden_0, hidden_1"):
        sym.canonicalize_permutation({**params, "extra": params["output"]})
    with pytest.raises(ValueError, match="numbered 0, 1, 2"):
        sym.canonicalize_permutation({"hidden_1": params["hidden_1"], "output": params["output"]})
    broken = {**params, "hidden_1": {"kernel": jnp.ones((7, 5)), "bias": jnp.ones(5)}}
    with pytest.raises(ValueError, match="expects 7 inputs"):
        sym.canonicalize_permutation(broken)
    with pytest.raises(ValueError, match="bias of 'params/hidden_0'"):
        sym.canonicalize_permutation(
            {**params, "hidden_0": {**params["hidden_0"], "bias": jnp.ones(2)}}
        )
    with pytest.raises(ValueError, match="unsupported entries"):
        sym.canonicalize_permutation(
            {**params, "output": {**params["output"], "scale": jnp.ones(3)}}
        )
    with pytest.raises(ValueError, match="norm applies to architecture='resnet'"):
        sym.canonicalize_permutation(params, norm="batch")
    with pytest.raises(ValueError, match="conv_0"):
        sym.canonicalize_permutation(params, architecture="lenet")
    resnet_params, resnet_state, _, _ = resnet_batch_case
    with pytest.raises(ValueError, match="running statistics must be permuted"):
        sym.canonicalize_permutation(resnet_params, architecture="resnet", norm="batch")
    with pytest.raises(ValueError, match="pass norm='group'"):
        sym.canonicalize_permutation(resnet_group_case[0], architecture="resnet")
    with pytest.raises(ValueError, match="unexpected or missing entries"):
        sym.canonicalize_permutation(
            {**resnet_params, "fc": resnet_params["head"]}, resnet_state, architecture="resnet"
        )


# ----------------------------------------------------------------------------------------------
# Weight matching
# ----------------------------------------------------------------------------------------------


def test_weight_matching_recovers_a_known_permutation(mlp_case, lenet_case, resnet_batch_case):
    params, _, _ = mlp_case
    permuted, _ = sym.random_permutation(jax.random.key(14), params)
    aligned, _ = sym.weight_matching(params, permuted)
    assert _leaves_equal(aligned, params)
    lenet_params = lenet_case[0]
    permuted, _ = sym.random_permutation(jax.random.key(15), lenet_params, architecture="lenet")
    aligned, _ = sym.weight_matching(lenet_params, permuted, architecture="lenet")
    assert _leaves_equal(aligned, lenet_params)
    resnet_params, state, _, _ = resnet_batch_case
    permuted, permuted_state = sym.random_permutation(
        jax.random.key(16), resnet_params, state, architecture="resnet"
    )
    aligned = sym.weight_matching(resnet_params, permuted, permuted_state, architecture="resnet")
    assert _leaves_equal(aligned, (resnet_params, state))


def test_weight_matching_one_hidden_layer_is_the_exact_optimum():
    # One permutation group: weight matching is a single linear assignment problem, so it must
    # find the best of all 5! permutations.
    keys = jax.random.split(jax.random.key(17), 4)
    a = [
        {"kernel": jax.random.normal(keys[0], (3, 5))},
        {"kernel": jax.random.normal(keys[1], (5, 2))},
    ]
    b = [
        {"kernel": jax.random.normal(keys[2], (3, 5))},
        {"kernel": jax.random.normal(keys[3], (5, 2))},
    ]
    aligned, _ = sym.weight_matching(a, b)
    a0, a1 = np.asarray(a[0]["kernel"]), np.asarray(a[1]["kernel"])
    b0, b1 = np.asarray(b[0]["kernel"]), np.asarray(b[1]["kernel"])
    best = max(
        np.sum(a0 * b0[:, list(p)]) + np.sum(a1 * b1[list(p)])
        for p in itertools.permutations(range(5))
    )
    achieved = np.sum(a0 * np.asarray(aligned[0]["kernel"])) + np.sum(
        a1 * np.asarray(aligned[1]["kernel"])
    )
    np.testing.assert_allclose(achieved, best, rtol=1e-6)


def test_weight_matching_two_networks(mlp_case):
    params, apply, inputs = mlp_case
    module = models.mlp([6, 5], num_outputs=3)
    other, _ = models.init(module, jax.random.key(18), jnp.ones((1, 4)))
    aligned, _ = sym.weight_matching(params, other)
    assert sym.check_function_preserved(apply, other, aligned, inputs) < 1e-5
    distance = lambda tree: _squared_norm(jax.tree.map(lambda x, y: x - y, params, tree))
    assert distance(aligned) < distance(other)
    # A fixed point: aligning again changes nothing.
    assert _leaves_equal(sym.weight_matching(params, aligned)[0], aligned)


def test_weight_matching_errors(mlp_case, resnet_group_case):
    params, _, _ = mlp_case
    group_params, group_state, _, _ = resnet_group_case
    with pytest.raises(NotImplementedError, match="GroupNorm"):
        sym.weight_matching(
            group_params,
            group_params,
            group_state,
            architecture="resnet",
            norm="group",
            num_groups=2,
        )
    with pytest.raises(ValueError, match="same tree structure"):
        sym.weight_matching(params, {"output": params["output"]})
    with pytest.raises(ValueError, match="max_rounds"):
        sym.weight_matching(params, params, max_rounds=0)


# ----------------------------------------------------------------------------------------------
# Scaling canonicalisation
# ----------------------------------------------------------------------------------------------


def _unit_masses(layers, blocked_channels=None):
    """Incoming and outgoing squared mass of every hidden unit, computed directly in NumPy.

    ``layers`` is a list of (kernel, bias-or-None); conv kernels have rank 4. After a conv,
    a dense kernel's rows are (positions x channels), channel-minor.
    """
    incoming, outgoing = [], []
    for (kernel, bias), (next_kernel, _) in zip(layers[:-1], layers[1:], strict=False):
        kernel, next_kernel = np.asarray(kernel, np.float64), np.asarray(next_kernel, np.float64)
        units = kernel.shape[-1]
        into = np.sum(kernel.reshape(-1, units) ** 2, axis=0)
        if bias is not None:
            into = into + np.asarray(bias, np.float64) ** 2
        if next_kernel.ndim == 4:
            out = np.sum(np.moveaxis(next_kernel, 2, 0).reshape(units, -1) ** 2, axis=1)
        else:
            out = np.sum(next_kernel.reshape(-1, units, next_kernel.shape[-1]) ** 2, axis=(0, 2))
        incoming.append(into)
        outgoing.append(out)
    return incoming, outgoing


def _mlp_layers(params):
    return [(params[n]["kernel"], params[n]["bias"]) for n in ("hidden_0", "hidden_1", "output")]


def _lenet_layers(params):
    names = ("conv_0", "conv_1", "dense_0", "dense_1", "output")
    return [(params[n]["kernel"], params[n]["bias"]) for n in names]


def test_min_mass_hand_cases():
    # 1-1-1 chain: minimise a^2 e^{2s} + c^2 e^{-2s}: both weights become sqrt(|a c|).
    balanced = sym.canonicalize_scaling(
        [{"kernel": jnp.array([[4.0]])}, {"kernel": jnp.array([[-1.0]])}]
    )
    np.testing.assert_allclose(balanced[0]["kernel"], [[2.0]], rtol=1e-5)
    np.testing.assert_allclose(balanced[1]["kernel"], [[-2.0]], rtol=1e-5)
    # With a bias beta: s = log(c^2 / (a^2 + beta^2)) / 4.
    a, beta, c = 3.0, 4.0, 5.0
    scale = math.exp(0.25 * math.log(c**2 / (a**2 + beta**2)))
    params = [{"kernel": jnp.array([[a]]), "bias": jnp.array([beta])}, {"kernel": jnp.array([[c]])}]
    result = sym.canonicalize_scaling(params)
    np.testing.assert_allclose(result[0]["kernel"], [[a * scale]], rtol=1e-5)
    np.testing.assert_allclose(result[0]["bias"], [beta * scale], rtol=1e-5)
    np.testing.assert_allclose(result[1]["kernel"], [[c / scale]], rtol=1e-5)
    # A dead unit (no outgoing weight) keeps its scale; the other unit still balances.
    params = [{"kernel": jnp.array([[4.0, 9.0]])}, {"kernel": jnp.array([[0.0], [1.0]])}]
    result = sym.canonicalize_scaling(params)
    np.testing.assert_allclose(result[0]["kernel"], [[4.0, 3.0]], rtol=1e-5)
    np.testing.assert_allclose(result[1]["kernel"], [[0.0], [3.0]], rtol=1e-5)


def test_min_mass_mlp(mlp_case):
    params, apply, inputs = mlp_case
    canonical = sym.canonicalize_scaling(params)
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    # First-order optimality: every hidden unit's incoming mass equals its outgoing mass.
    incoming, outgoing = _unit_masses(_mlp_layers(canonical))
    for into, out in zip(incoming, outgoing, strict=True):
        np.testing.assert_allclose(into, out, rtol=1e-4)
    assert _squared_norm(canonical) < _squared_norm(params)
    # Invariance: a random rescaling of the input network has the same canonical form.
    for seed in range(2):
        rescaled = sym.random_scaling(jax.random.key(seed), params, scale=1.0)
        assert sym.check_function_preserved(apply, params, rescaled, inputs) < 1e-4
        assert abs(_squared_norm(rescaled) - _squared_norm(params)) > 1e-2
        _assert_trees_close(sym.canonicalize_scaling(rescaled), canonical, rtol=1e-4, atol=1e-6)


def test_min_mass_lenet(lenet_case):
    params, apply, inputs = lenet_case
    canonical = sym.canonicalize_scaling(params, architecture="lenet")
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    incoming, outgoing = _unit_masses(_lenet_layers(canonical))
    for into, out in zip(incoming, outgoing, strict=True):
        np.testing.assert_allclose(into, out, rtol=1e-4)
    rescaled = sym.random_scaling(jax.random.key(19), params, architecture="lenet")
    assert sym.check_function_preserved(apply, params, rescaled, inputs) < 1e-4
    _assert_trees_close(
        sym.canonicalize_scaling(rescaled, architecture="lenet"), canonical, rtol=1e-4, atol=1e-6
    )


def test_row_norm(mlp_case):
    params, apply, inputs = mlp_case
    canonical = sym.canonicalize_scaling(params, method="row_norm", row_norm=3.0)
    assert sym.check_function_preserved(apply, params, canonical, inputs) < 1e-4
    incoming, _ = _unit_masses(_mlp_layers(canonical))
    for into in incoming:
        np.testing.assert_allclose(np.sqrt(into), 3.0, rtol=1e-5)
    rescaled = sym.random_scaling(jax.random.key(20), params, scale=2.0)
    recovered = sym.canonicalize_scaling(rescaled, method="row_norm", row_norm=3.0)
    _assert_trees_close(recovered, canonical, rtol=1e-4, atol=1e-6)


def test_scaling_then_permutation_removes_both_symmetries(mlp_case):
    params, _, _ = mlp_case
    canonical = lambda p: sym.canonicalize_permutation(sym.canonicalize_scaling(p))[0]
    reference = canonical(params)
    transformed = sym.random_scaling(jax.random.key(21), params)
    transformed, _ = sym.random_permutation(jax.random.key(22), transformed)
    _assert_trees_close(canonical(transformed), reference, rtol=1e-4, atol=1e-6)


def test_scaling_errors(mlp_case, resnet_batch_case):
    params, _, _ = mlp_case
    resnet_params = resnet_batch_case[0]
    with pytest.raises(ValueError, match="degenerate"):
        sym.canonicalize_scaling(resnet_params, architecture="resnet")
    plain = models.ResNet(stage_sizes=(1,), num_classes=2, width=2, norm="none")
    plain_params, _ = models.init(plain, jax.random.key(23), jnp.ones((1, 4, 4, 1)))
    with pytest.raises(NotImplementedError, match="residual stream"):
        sym.canonicalize_scaling(plain_params, architecture="resnet")
    with pytest.raises(ValueError, match="positively homogeneous"):
        sym.canonicalize_scaling(params, activation=jnp.tanh)
    with pytest.raises(ValueError, match="positively homogeneous"):
        sym.canonicalize_scaling(params, activation=jax.nn.gelu)
    sym.canonicalize_scaling(params, activation=lambda x: jax.nn.leaky_relu(x, 0.1))  # accepted
    with pytest.raises(ValueError, match="unknown method"):
        sym.canonicalize_scaling(params, method="cvxpy")
    with pytest.raises(ValueError, match="row_norm"):
        sym.canonicalize_scaling(params, method="row_norm", row_norm=0.0)
    with pytest.raises(ValueError, match="scale"):
        sym.random_scaling(jax.random.key(0), params, scale=-1.0)


def test_check_function_preserved(mlp_case):
    params, apply, inputs = mlp_case
    assert sym.check_function_preserved(apply, params, params, inputs) == 0.0
    corrupted = jax.tree.map(lambda leaf: leaf, params)
    corrupted["output"] = {**params["output"], "bias": params["output"]["bias"] + 1e-3}
    difference = sym.check_function_preserved(apply, params, corrupted, inputs, atol=2e-3)
    np.testing.assert_allclose(difference, 1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="changed the network function"):
        sym.check_function_preserved(apply, params, corrupted, inputs, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------


def _reference_mmd(x, y, kernel, bandwidth, unbiased):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(u, v):
        if kernel == "gaussian":
            return math.exp(-np.sum((u - v) ** 2) / bandwidth**2)
        return math.exp(-np.sum(np.abs(u - v)) / bandwidth)

    m, n = len(x), len(y)
    total_xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j or not unbiased)
    total_yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j or not unbiased)
    total_xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n))
    pairs_x = m * (m - 1) if unbiased else m * m
    pairs_y = n * (n - 1) if unbiased else n * n
    return total_xx / pairs_x + total_yy / pairs_y - 2 * total_xy / (m * n)


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_a_double_loop(unbiased):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    y = (rng.normal(size=(4, 3)) + 0.5).astype(np.float32)
    result = sym.mmd(x, y, num_bandwidths=4, unbiased=unbiased)
    for kernel in ("gaussian", "laplace"):
        expected = [
            _reference_mmd(x, y, kernel, float(bandwidth), unbiased)
            for bandwidth in result[f"{kernel}_bandwidths"]
        ]
        np.testing.assert_allclose(result[kernel], expected, rtol=1e-4, atol=1e-6)
    values = np.concatenate([result["gaussian"], result["laplace"]])
    np.testing.assert_allclose(result["max"], values.max(), rtol=1e-6)
    np.testing.assert_allclose(result["mean"], values.mean(), rtol=1e-5)


def test_mmd_of_a_set_with_itself():
    x = jax.random.normal(jax.random.key(24), (40, 3))
    biased = sym.mmd(x, x, unbiased=False)
    for kernel in ("gaussian", "laplace"):
        np.testing.assert_array_equal(biased[kernel], np.zeros(10))
    # The unbiased estimate is 2 (mean off-diagonal k - 1) / n: slightly negative, O(1/n).
    unbiased = sym.mmd(x, x)
    for kernel in ("gaussian", "laplace"):
        values = np.asarray(unbiased[kernel])
        assert np.all(values <= 1e-7) and np.all(values >= -2.0 / 40 - 1e-6)
        expected = [
            _reference_mmd(x, x, kernel, float(b), True)
            for b in unbiased[f"{kernel}_bandwidths"][:2]
        ]
        np.testing.assert_allclose(values[:2], expected, rtol=1e-4, atol=1e-7)


def test_mmd_grows_with_a_mean_shift():
    base = jax.random.normal(jax.random.key(25), (2, 100, 2))
    grid = jnp.array([0.5, 1.0, 2.0, 4.0])
    fixed = {"gaussian": grid, "laplace": grid}
    previous_adaptive, previous_fixed = -np.inf, None
    for shift in (0.0, 0.5, 1.0, 2.0, 4.0):
        x, y = base[0], base[1] + jnp.array([shift, 0.0])
        adaptive = sym.mmd(x, y)
        assert float(adaptive["max"]) > previous_adaptive
        previous_adaptive = float(adaptive["max"])
        on_grid = sym.mmd(x, y, bandwidths=fixed)
        current = np.concatenate([on_grid["gaussian"], on_grid["laplace"]])
        if previous_fixed is not None:
            assert np.all(current > previous_fixed)
        previous_fixed = current
    assert previous_adaptive > 0.5


def test_mmd_bandwidth_rule_hand_cases():
    # Cross distances {3, 2} (L1 = L2 in 1-D): min 2 >= 0.1 -> from 1 to 2 * 3 = 6.
    grid = sym.mmd_bandwidths(jnp.array([[0.0], [1.0]]), jnp.array([[3.0]]), num_bandwidths=3)
    for kernel in ("gaussian", "laplace"):
        np.testing.assert_allclose(grid[kernel], [1.0, math.sqrt(6.0), 6.0], rtol=1e-6)
    # Cross distances {0.0, 0.05}: min < 0.1 -> 5% quantile (index 0: 0.0) floored at 0.1, so
    # the grid starts at 0.05; the maximum 0.05 is raised to 0.3, so it ends at 0.6.
    grid = sym.mmd_bandwidths(jnp.array([[0.0], [0.05]]), jnp.array([[0.0]]), num_bandwidths=2)
    np.testing.assert_allclose(grid["gaussian"], [0.05, 0.6], rtol=1e-6)
    # 2-D: L1 and L2 differ. x = (0, 0), y in {(3, 4), (6, 8)}: L2 {5, 10}, L1 {7, 14}.
    grid = sym.mmd_bandwidths(
        jnp.zeros((1, 2)), jnp.array([[3.0, 4.0], [6.0, 8.0]]), num_bandwidths=2
    )
    np.testing.assert_allclose(grid["gaussian"], [2.5, 20.0], rtol=1e-6)
    np.testing.assert_allclose(grid["laplace"], [3.5, 28.0], rtol=1e-6)
    # 5% quantile index floor(0.05 * 40) = 2 of the sorted cross distances.
    x = jnp.zeros((1, 1))
    y = jnp.concatenate([jnp.zeros(2), jnp.linspace(0.2, 4.0, 38)])[:, None]
    grid = sym.mmd_bandwidths(x, y, num_bandwidths=2)
    np.testing.assert_allclose(grid["laplace"], [0.1, 8.0], rtol=1e-6)
    # Only the first max_samples rows of each set count.
    far = jnp.concatenate([jnp.array([[0.0], [1.0]]), jnp.full((5, 1), 100.0)])
    truncated = sym.mmd_bandwidths(far, jnp.array([[3.0]]), num_bandwidths=3, max_samples=2)
    np.testing.assert_allclose(truncated["laplace"], [1.0, math.sqrt(6.0), 6.0], rtol=1e-6)


def test_mmd_errors():
    x = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="same dimension"):
        sym.mmd(x, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        sym.mmd(x, jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sym.mmd(x.at[0, 0].set(jnp.nan), x)
    with pytest.raises(ValueError, match="unknown kernel 'imq'"):
        sym.mmd(x, x, kernels=("imq",))
    with pytest.raises(ValueError, match="num_bandwidths"):
        sym.mmd(x, x, num_bandwidths=1)
    with pytest.raises(ValueError, match="shape"):
        sym.mmd(jnp.zeros(4), x)
    with pytest.raises(ValueError, match="positive"):
        sym.mmd(x, x, bandwidths={"gaussian": jnp.array([0.0]), "laplace": jnp.array([1.0])})


def test_posterior_mmd_flattens_and_canonicalizes(mlp_case):
    params, _, _ = mlp_case
    module = models.mlp([6, 5], num_outputs=3)
    samples, _ = models.init_ensemble(module, jax.random.key(26), jnp.ones((1, 4)), 6)
    keys = jax.random.split(jax.random.key(27), 6)
    shuffled = jax.vmap(lambda key, p: sym.random_permutation(key, p)[0])(keys, samples)
    # Flattening: the same as concatenating the leaves by hand.
    flat = jnp.concatenate([leaf.reshape(6, -1) for leaf in jax.tree.leaves(samples)], axis=1)
    flat_shuffled = jnp.concatenate(
        [leaf.reshape(6, -1) for leaf in jax.tree.leaves(shuffled)], axis=1
    )
    direct = sym.mmd(flat, flat_shuffled)
    plain = sym.posterior_mmd(samples, shuffled)
    np.testing.assert_array_equal(plain["gaussian"], direct["gaussian"])
    # "NS": after removing the permutations both sets are identical, so the V-statistic is 0.
    canonical = lambda p: sym.canonicalize_permutation(p)[0]
    no_symmetry = sym.posterior_mmd(samples, shuffled, canonicalize=canonical, unbiased=False)
    assert float(no_symmetry["max"]) == 0.0
    assert float(sym.posterior_mmd(samples, shuffled, unbiased=False)["max"]) > 1e-3
    # Canonicalisation under vmap equals the per-sample call.
    stacked = jax.vmap(canonical)(shuffled)
    first = jax.tree.map(lambda leaf: leaf[0], samples)
    assert _leaves_equal(jax.tree.map(lambda leaf: leaf[0], stacked), canonical(first))
    # Scalings and permutations together (min-mass under vmap): zero up to the solver's
    # tolerance, against a large MMD without canonicalisation.
    scaled = jax.vmap(lambda key, p: sym.random_scaling(key, p))(keys, shuffled)
    both = lambda p: sym.canonicalize_permutation(sym.canonicalize_scaling(p))[0]
    result = sym.posterior_mmd(samples, scaled, canonicalize=both, unbiased=False)
    assert float(result["max"]) < 1e-3
    assert float(sym.posterior_mmd(samples, scaled, unbiased=False)["max"]) > 0.1
    with pytest.raises(ValueError, match="same tree structure"):
        sym.posterior_mmd(samples, {"output": samples["output"]})


# ----------------------------------------------------------------------------------------------
# Functional diversity
# ----------------------------------------------------------------------------------------------


def _random_members(seed, num_members=4, num_data=30, num_classes=5):
    logits = 2.0 * jax.random.normal(jax.random.key(seed), (num_members, num_data, num_classes))
    return jax.nn.log_softmax(logits, axis=-1)


def test_pairwise_mutual_information():
    members = _random_members(28)
    matrix = np.asarray(sym.pairwise_mutual_information(members))
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), np.zeros(4))
    for i, j in itertools.combinations(range(4), 2):
        expected = float(jnp.mean(metrics.mutual_information(np.asarray(members)[[i, j]])))
        np.testing.assert_allclose(matrix[i, j], expected, rtol=1e-5, atol=1e-7)
        # Definition: H(mean of the two) - mean of the two entropies.
        p, q = (
            np.exp(np.asarray(members[i], np.float64)),
            np.exp(np.asarray(members[j], np.float64)),
        )
        entropy = lambda r: -np.sum(r * np.log(r), axis=-1)
        direct = np.mean(entropy((p + q) / 2) - (entropy(p) + entropy(q)) / 2)
        np.testing.assert_allclose(matrix[i, j], direct, rtol=1e-4)
    assert np.all(matrix <= math.log(2) + 1e-6)
    # Identical members: no diversity. Small batches give the same values.
    identical = jnp.stack([members[0]] * 3)
    np.testing.assert_allclose(sym.pairwise_mutual_information(identical), 0.0, atol=1e-7)
    np.testing.assert_allclose(
        sym.pairwise_mutual_information(members, batch_size=1), matrix, rtol=1e-6
    )


def test_pairwise_disagreement():
    members = _random_members(29, num_members=5)
    matrix = np.asarray(sym.pairwise_disagreement(members))
    np.testing.assert_array_equal(matrix, matrix.T)
    np.testing.assert_array_equal(np.diag(matrix), np.zeros(5))
    for i, j in itertools.combinations(range(5), 2):
        expected = float(metrics.disagreement(np.asarray(members)[[i, j]]))
        np.testing.assert_allclose(matrix[i, j], expected, rtol=1e-6)
    # The all-member disagreement is the mean over ordered pairs of distinct members.
    off_diagonal = matrix[~np.eye(5, dtype=bool)]
    np.testing.assert_allclose(off_diagonal.mean(), metrics.disagreement(members), rtol=1e-6)


def test_functional_diversity_errors():
    with pytest.raises(ValueError, match="at least 2 members"):
        sym.pairwise_mutual_information(_random_members(30, num_members=1))
    with pytest.raises(ValueError, match="shape"):
        sym.pairwise_disagreement(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        sym.pairwise_disagreement(_random_members(31).at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="batch_size"):
        sym.pairwise_mutual_information(_random_members(32), batch_size=0)
