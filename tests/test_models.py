"""Tests for bnn_flat.models: architectures, parameter counts, BatchNorm, dropout, bridge."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnn_flat import models

KEY = jax.random.key(0)


def _normal(seed, shape):
    """Standard normal test data from numpy (eager jax.random would compile per shape)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@functools.cache
def _jit_apply(module):
    """A jitted apply, shared between tests so that equal modules compile once."""
    return jax.jit(models.make_apply(module), static_argnames="train")


# A two-stage ResNet (identity and projection shortcuts) shared by many tests.
SMALL_RESNET = models.ResNet(stage_sizes=(1, 1), num_classes=3, width=4)
SMALL_SHAPE = (4, 8, 8, 3)


def _leaves_with_paths(tree):
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree.leaves_with_path(tree)]


def _assert_trees_close(a, b, atol=1e-6, rtol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), (_, y) in zip(_leaves_with_paths(a), _leaves_with_paths(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol, err_msg=path)


def _cross_entropy(logits, labels):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


# ----------------------------------------------------------------------------------------------
# Hand-written float64 reference forward of a small ResNet (numpy).


def _np_conv(x, kernel, stride, pad):
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(kh):
        for j in range(kw):
            patch = x[
                :,
                i : i + stride * (out_h - 1) + 1 : stride,
                j : j + stride * (out_w - 1) + 1 : stride,
            ]
            out += np.einsum("bhwc,cd->bhwd", patch, kernel[i, j])
    return out


def _np_batch_norm(x, params, stats, train):
    if train:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
        new_stats = {
            "mean": 0.9 * stats["mean"] + 0.1 * mean,
            "var": 0.9 * stats["var"] + 0.1 * var,
        }
    else:
        mean, var, new_stats = stats["mean"], stats["var"], stats
    return (x - mean) / np.sqrt(var + 1e-5) * params["scale"] + params["bias"], new_stats


def _np_resnet(params, batch_stats, x, stage_sizes, train):
    """Post-activation CIFAR ResNet with projection shortcuts, written from the paper."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    batch_stats = jax.tree.map(lambda a: np.asarray(a, np.float64), batch_stats)
    new_stats = {}

    def norm(name, y, p, s, out):
        y, out[name] = _np_batch_norm(y, p[name], s[name], train)
        return y

    relu = lambda y: np.maximum(y, 0.0)
    x = np.asarray(x, np.float64)
    x = relu(
        norm(
            "stem_norm",
            _np_conv(x, params["stem_conv"]["kernel"], 1, 1),
            params,
            batch_stats,
            new_stats,
        )
    )
    for stage, num_blocks in enumerate(stage_sizes):
        for block in range(num_blocks):
            name = f"stage{stage}_block{block}"
            p, s, out = params[name], batch_stats[name], {}
            stride = 2 if stage > 0 and block == 0 else 1
            y = relu(norm("norm_0", _np_conv(x, p["conv_0"]["kernel"], stride, 1), p, s, out))
            y = norm("norm_1", _np_conv(y, p["conv_1"]["kernel"], 1, 1), p, s, out)
            shortcut = x
            if "shortcut_conv" in p:
                shortcut = _np_conv(x, p["shortcut_conv"]["kernel"], stride, 0)
                shortcut = norm("shortcut_norm", shortcut, p, s, out)
            x = relu(y + shortcut)
            new_stats[name] = out
    features = x.mean(axis=(1, 2))
    logits = features @ params["head"]["kernel"] + params["head"]["bias"]
    return logits, new_stats


def _randomize_batch_stats(seed, batch_stats):
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), jnp.float32)
        return jnp.asarray(rng.normal(size=leaf.shape), jnp.float32)

    return jax.tree.map_with_path(draw, batch_stats)


# ----------------------------------------------------------------------------------------------
# Parameter counts computed by hand from the architecture.


def _resnet20_param_count(in_channels, num_classes, width, norm):
    bias = norm == "none"

    def conv(cin, cout, size):
        return size * size * cin * cout + (cout if bias else 0)

    def normalization(channels):
        return 0 if norm == "none" else 2 * channels  # scale and bias

    total = conv(in_channels, width, 3) + normalization(width)
    cin = width
    for stage in range(3):
        cout = width * 2**stage
        for _ in range(3):
            total += conv(cin, cout, 3) + normalization(cout) + conv(cout, cout, 3)
            total += normalization(cout)
            if cin != cout:
                total += conv(cin, cout, 1) + normalization(cout)
            cin = cout
    return total + cin * num_classes + num_classes


def _eval_shape_init(module, inputs):
    return jax.eval_shape(lambda key: models.init(module, key, inputs), KEY)


def test_resnet20_parameter_count_matches_hand_count():
    inputs = jnp.zeros((1, 32, 32, 3))
    params, model_state = _eval_shape_init(models.resnet20(num_classes=10), inputs)
    # 464 (stem) + 14016 (stage 1) + 51648 (stage 2) + 205696 (stage 3) + 650 (head)
    assert _resnet20_param_count(3, 10, 16, "batch") == 272_474
    assert models.num_params(params) == 272_474
    # BatchNorm keeps a running mean and variance per channel: as many numbers as scale+bias.
    # Normalised channels: 16 (stem) + 6 x 16 + (6 x 32 + 32) + (6 x 64 + 64) = 784.
    assert sorted(model_state) == ["batch_stats"]
    assert models.num_params(model_state) == 2 * 784
    scales = [leaf for path, leaf in _leaves_with_paths(params) if path.endswith("['scale']")]
    assert sum(leaf.size for leaf in scales) == 784
    assert models.has_conv(params)


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_resnet20_parameter_count_other_norms(norm):
    inputs = jnp.zeros((1, 8, 8, 1))
    params, model_state = _eval_shape_init(models.resnet20(5, norm=norm, width=8), inputs)
    assert models.num_params(params) == _resnet20_param_count(1, 5, 8, norm)
    assert model_state == {}


def test_resnet20_output_shapes_cifar_and_digits():
    apply = models.make_apply(models.resnet20(10))
    for shape in [(2, 32, 32, 3), (3, 8, 8, 1)]:
        inputs = jnp.zeros(shape)
        params, model_state = _eval_shape_init(models.resnet20(10), inputs)
        outputs = jax.eval_shape(
            lambda p, s, x: apply(p, s, x, train=True), params, model_state, inputs
        )
        assert outputs[0].shape == (shape[0], 10)
        assert jax.tree.map(lambda a: a.shape, outputs[1]) == jax.tree.map(
            lambda a: a.shape, model_state
        )


def test_mlp_count_and_hand_forward():
    module = models.mlp([32, 16], num_outputs=10)
    inputs = _normal(1, (5, 8, 8, 1))
    params, model_state = models.init(module, KEY, inputs)
    assert model_state == {}
    assert models.num_params(params) == (64 + 1) * 32 + (32 + 1) * 16 + (16 + 1) * 10
    assert not models.has_conv(params)
    outputs, new_state = _jit_apply(module)(params, model_state, inputs, train=False)
    assert new_state == {}
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(inputs, np.float64).reshape(5, 64)
    h = np.maximum(x @ p["hidden_0"]["kernel"] + p["hidden_0"]["bias"], 0)
    h = np.maximum(h @ p["hidden_1"]["kernel"] + p["hidden_1"]["bias"], 0)
    expected = h @ p["output"]["kernel"] + p["output"]["bias"]
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
    flat_outputs, _ = _jit_apply(module)(params, model_state, inputs.reshape(5, 64), train=False)
    np.testing.assert_array_equal(outputs, flat_outputs)


@pytest.mark.parametrize(
    ("shape", "dense_features"), [((8, 8, 1), 64), ((28, 28, 1), 784), ((32, 32, 3), 1024)]
)
def test_lenet_shapes_and_counts(shape, dense_features):
    module = models.lenet(num_classes=10)
    inputs = _normal(2, (3, *shape))
    params, model_state = models.init(module, KEY, inputs)
    channels = shape[-1]
    expected = (
        (25 * channels + 1) * 6
        + (25 * 6 + 1) * 16
        + (dense_features + 1) * 120
        + (120 + 1) * 84
        + (84 + 1) * 10
    )
    assert models.num_params(params) == expected
    assert model_state == {}
    assert models.has_conv(params)
    outputs, _ = _jit_apply(module)(params, model_state, inputs, train=False)
    assert outputs.shape == (3, 10)
    assert np.all(np.isfinite(outputs))
    assert float(jnp.std(outputs, axis=0).min()) > 0.0  # outputs depend on the input


def test_lenet_average_pooling_hand_check():
    # Hand-set weights (all-ones kernels, identity dense layers, zero biases) against numpy;
    # border pixels make max and average pooling differ, so this pins the pooling choice.
    module = models.lenet(num_classes=2, pooling="average")
    inputs = jnp.ones((2, 8, 8, 1))
    params, _ = models.init(module, KEY, inputs)
    params = jax.tree.map(jnp.zeros_like, params)
    params["conv_0"]["kernel"] = jnp.ones_like(params["conv_0"]["kernel"])
    params["conv_1"]["kernel"] = jnp.ones_like(params["conv_1"]["kernel"]) / 6.0
    params["dense_0"]["kernel"] = jnp.ones_like(params["dense_0"]["kernel"])
    params["dense_1"]["kernel"] = jnp.eye(120, 84)
    params["output"]["kernel"] = jnp.eye(84, 2)
    outputs, _ = _jit_apply(module)(params, {}, inputs, train=False)
    # conv_0 on ones with SAME padding counts the in-image taps; then pool, conv_1, pool.
    ones = np.ones((2, 8, 8, 1))
    first = _np_conv(ones, np.ones((5, 5, 1, 6)), 1, 2)
    first = first.reshape(2, 4, 2, 4, 2, 6).mean(axis=(2, 4))
    second = _np_conv(first, np.ones((5, 5, 6, 16)) / 6.0, 1, 2)
    second = second.reshape(2, 2, 2, 2, 2, 16).mean(axis=(2, 4))
    expected = second.reshape(2, -1).sum(axis=1)
    np.testing.assert_allclose(outputs, np.stack([expected, expected], axis=1), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# BatchNorm.


@pytest.mark.parametrize("train", [False, True])
def test_small_resnet_matches_numpy_reference(train):
    stage_sizes = (1, 1)
    module = SMALL_RESNET
    inputs = _normal(3, SMALL_SHAPE)
    params, model_state = models.init(module, KEY, inputs)
    # Random biases and scales so that every part of every norm layer matters.
    rng = np.random.default_rng(4)
    params = jax.tree.map(
        lambda a: a + jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), params
    )
    batch_stats = _randomize_batch_stats(5, model_state["batch_stats"])
    outputs, new_state = _jit_apply(module)(
        params, {"batch_stats": batch_stats}, inputs, train=train
    )
    expected, expected_stats = _np_resnet(params, batch_stats, inputs, stage_sizes, train)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)
    _assert_trees_close(new_state["batch_stats"], expected_stats, atol=1e-5, rtol=1e-4)
    if not train:
        _assert_trees_close(new_state["batch_stats"], batch_stats, atol=0, rtol=0)


def test_batch_norm_train_updates_eval_keeps_state():
    module = SMALL_RESNET
    inputs = _normal(6, SMALL_SHAPE)
    params, model_state = models.init(module, KEY, inputs)
    # Fresh statistics: running mean 0 and variance 1 everywhere.
    for path, leaf in _leaves_with_paths(model_state):
        np.testing.assert_array_equal(leaf, 0.0 if path.endswith("['mean']") else 1.0)
    apply = _jit_apply(module)
    _, trained_state = apply(params, model_state, inputs, train=True)
    for path, leaf in _leaves_with_paths(trained_state):
        old = 0.0 if path.endswith("['mean']") else 1.0
        assert float(jnp.max(jnp.abs(leaf - old))) > 1e-4, path
    # Stem statistics: momentum 0.9, so the new mean is 0.1 x the batch mean of the stem conv.
    stem = _np_conv(np.asarray(inputs, np.float64), np.asarray(params["stem_conv"]["kernel"]), 1, 1)
    stem_stats = trained_state["batch_stats"]["stem_norm"]
    np.testing.assert_allclose(stem_stats["mean"], 0.1 * stem.mean(axis=(0, 1, 2)), atol=1e-6)
    np.testing.assert_allclose(
        stem_stats["var"], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6
    )
    first, state_a = apply(params, trained_state, inputs, train=False)
    second, state_b = apply(params, trained_state, inputs, train=False)
    np.testing.assert_array_equal(first, second)
    _assert_trees_close(state_a, trained_state, atol=0, rtol=0)
    _assert_trees_close(state_b, trained_state, atol=0, rtol=0)
    # Eval mode normalises each example with the running statistics: batch-independent.
    single, _ = apply(params, trained_state, inputs[:1], train=False)
    np.testing.assert_allclose(single, first[:1], rtol=1e-5, atol=1e-6)
    # Train mode uses the batch statistics: the first example's output depends on the batch.
    train_full, _ = apply(params, model_state, inputs, train=True)
    train_half, _ = apply(params, model_state, inputs[:2], train=True)
    assert float(jnp.max(jnp.abs(train_full[:1] - train_half[:1]))) > 1e-4


def test_jit_equals_eager_apply():
    module = models.mlp([64, 64], num_outputs=3, dropout_rate=0.3)
    inputs = _normal(7, (5, 7))
    params, model_state = models.init(module, KEY, inputs)
    apply = models.make_apply(module)
    jitted = jax.jit(apply, static_argnames="train")
    for train in (True, False):
        key = jax.random.key(1)
        eager = apply(params, model_state, inputs, train=train, key=key)
        compiled = jitted(params, model_state, inputs, train=train, key=key)
        _assert_trees_close(eager, compiled, atol=1e-5, rtol=1e-5)


def test_resnet_generic_equals_resnet20():
    inputs = _normal(8, (2, 8, 8, 1))
    specific = models.ResNet20(num_classes=4, width=2)
    generic = models.ResNet(stage_sizes=(3, 3, 3), num_classes=4, width=2)
    params_a, state_a = models.init(specific, KEY, inputs)
    params_b, state_b = models.init(generic, KEY, inputs)
    _assert_trees_close(params_a, params_b, atol=0, rtol=0)
    _assert_trees_close(state_a, state_b, atol=0, rtol=0)
    assert sorted(params_a) == [
        "head",
        *[f"stage{stage}_block{block}" for stage in range(3) for block in range(3)],
        "stem_conv",
        "stem_norm",
    ]
    assert sorted(params_a["stage1_block0"]) == [
        "conv_0",
        "conv_1",
        "norm_0",
        "norm_1",
        "shortcut_conv",
        "shortcut_norm",
    ]
    assert "shortcut_conv" not in params_a["stage1_block1"]


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_stateless_norms(norm):
    module = models.ResNet(stage_sizes=(1, 1), num_classes=3, norm=norm, width=4)
    inputs = _normal(9, (4, 8, 8, 2))
    params, model_state = models.init(module, KEY, inputs)
    assert model_state == {}
    apply = _jit_apply(module)
    train_out, train_state = apply(params, model_state, inputs, train=True)
    eval_out, eval_state = apply(params, model_state, inputs, train=False)
    assert train_state == {} and eval_state == {}
    np.testing.assert_allclose(train_out, eval_out, rtol=1e-6, atol=1e-6)
    # Per-example normalisation: an example's output does not depend on the rest of the batch.
    alone, _ = apply(params, model_state, inputs[:1], train=True)
    np.testing.assert_allclose(alone, train_out[:1], rtol=1e-5, atol=1e-6)
    assert float(jnp.std(train_out, axis=0).min()) > 0.0


def test_group_norm_groups_divide_channels():
    # width 12: channels 12, 24, 48 -> gcd(8, .) groups = 4, 8, 8; normalised per group.
    module = models.ResNet(stage_sizes=(1,), num_classes=2, norm="group", width=12)
    inputs = _normal(10, (2, 4, 4, 1))
    params, _ = models.init(module, KEY, inputs)
    outputs, _ = _jit_apply(module)(params, {}, inputs, train=False)
    assert np.all(np.isfinite(outputs))
    # Group norm output (before scale/bias) has zero mean per group: check the stem directly.
    stem = _np_conv(np.asarray(inputs, np.float64), np.asarray(params["stem_conv"]["kernel"]), 1, 1)
    grouped = stem.reshape(2, 4, 4, 4, 3)  # 4 groups of 3 channels
    normalised = (grouped - grouped.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(
        grouped.var(axis=(1, 2, 4), keepdims=True) + 1e-5
    )
    normalised = normalised.reshape(2, 4, 4, 12)

    class _Stem(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(12, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="stem_conv")(x)
            return nn.GroupNorm(num_groups=4, epsilon=1e-5, name="stem_norm")(x)

    stem_params = {"stem_conv": params["stem_conv"], "stem_norm": params["stem_norm"]}
    got = _Stem().apply({"params": stem_params}, inputs)
    np.testing.assert_allclose(got, normalised, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Dropout.


def test_dropout_keys_and_modes():
    module = models.mlp([64, 64], num_outputs=3, dropout_rate=0.3)
    inputs = _normal(11, (5, 7))
    params, model_state = models.init(module, KEY, inputs)
    apply = _jit_apply(module)
    first, _ = apply(params, model_state, inputs, train=True, key=jax.random.key(1))
    again, _ = apply(params, model_state, inputs, train=True, key=jax.random.key(1))
    other, _ = apply(params, model_state, inputs, train=True, key=jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert float(jnp.max(jnp.abs(first - other))) > 1e-3
    eval_a, _ = apply(params, model_state, inputs, train=False)
    eval_b, _ = apply(params, model_state, inputs, train=False, key=jax.random.key(3))
    np.testing.assert_array_equal(eval_a, eval_b)
    # Eval mode equals the same network without dropout.
    plain, _ = _jit_apply(models.mlp([64, 64], num_outputs=3))(
        params, model_state, inputs, train=False
    )
    np.testing.assert_allclose(eval_a, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="key"):
        models.make_apply(module)(params, model_state, inputs, train=True)


def test_dropout_is_inverted_and_masks_at_the_rate():
    # hidden -> identity output layer: outputs are the dropped hidden units themselves.
    rate, width = 0.25, 200
    module = models.mlp([width], num_outputs=width, dropout_rate=rate)
    inputs = jnp.ones((1, 1))
    params, _ = models.init(module, KEY, inputs)
    params["hidden_0"]["kernel"] = jnp.linspace(1.0, 2.0, width)[None, :]
    params["output"]["kernel"] = jnp.eye(width)
    outputs, _ = _jit_apply(module)(params, {}, inputs, train=True, key=jax.random.key(4))
    hidden = np.asarray(params["hidden_0"]["kernel"][0])
    outputs = np.asarray(outputs[0])
    kept = outputs != 0.0
    np.testing.assert_allclose(outputs[kept], hidden[kept] / (1.0 - rate), rtol=1e-6)
    # 200 Bernoulli(0.25) drops: 4 standard errors is about 0.12.
    assert abs(1.0 - kept.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / width)


def test_dropout_mean_over_masks_equals_eval_output():
    module = models.mlp([16], num_outputs=2, dropout_rate=0.5)
    inputs = _normal(12, (3, 4))
    params, _ = models.init(module, KEY, inputs)
    apply = models.make_apply(module)
    num_masks = 4000
    keys = jax.random.split(jax.random.key(13), num_masks)
    samples = jax.jit(jax.vmap(lambda k: apply(params, {}, inputs, train=True, key=k)[0]))(keys)
    expected, _ = apply(params, {}, inputs, train=False)
    mean = samples.mean(axis=0)
    standard_error = samples.std(axis=0) / np.sqrt(num_masks)
    assert float(standard_error.min()) > 0.0
    assert np.all(np.abs(mean - expected) < 4.5 * standard_error)


# ----------------------------------------------------------------------------------------------
# Bridge: ensembles, vmap, gradients.


def test_init_ensemble_members_equal_individual_inits():
    module = SMALL_RESNET
    inputs = jnp.zeros(SMALL_SHAPE)
    num_members = 3
    params, model_state = models.init_ensemble(module, KEY, inputs, num_members)
    keys = jax.random.split(KEY, num_members)
    for member in range(num_members):
        single_params, single_state = models.init(module, keys[member], inputs)
        _assert_trees_close(
            jax.tree.map(lambda a, m=member: a[m], params), single_params, atol=0, rtol=0
        )
        _assert_trees_close(
            jax.tree.map(lambda a, m=member: a[m], model_state), single_state, atol=0, rtol=0
        )
    kernels = params["stem_conv"]["kernel"]
    assert float(jnp.max(jnp.abs(kernels[0] - kernels[1]))) > 1e-3
    assert models.has_conv(params, num_leading_axes=1)
    assert not models.has_conv(params)
    assert models.num_params(params) == num_members * models.num_params(single_params)


def test_vmap_apply_over_members_equals_loop():
    module = models.mlp([8], num_outputs=2)
    inputs = _normal(14, (4, 3))
    params, model_state = models.init_ensemble(module, KEY, inputs, 5)
    apply = models.make_apply(module)
    stacked, _ = jax.vmap(lambda p: apply(p, {}, inputs, train=False))(params)
    for member in range(5):
        single, _ = apply(jax.tree.map(lambda a, m=member: a[m], params), {}, inputs, train=False)
        np.testing.assert_allclose(stacked[member], single, rtol=1e-5, atol=1e-6)
    assert model_state == {}


@pytest.mark.parametrize(
    ("module", "shape"),
    [
        (models.mlp([16, 16], num_outputs=3, dropout_rate=0.1), (4, 5)),
        (models.lenet(3, dropout_rate=0.1), (4, 8, 8, 1)),
        (SMALL_RESNET, SMALL_SHAPE),
    ],
    ids=["mlp", "lenet", "resnet"],
)
def test_gradients_finite_and_nonzero_for_every_leaf(module, shape):
    inputs = _normal(15, shape)
    labels = jnp.arange(shape[0]) % 3
    params, model_state = models.init(module, KEY, inputs)
    apply = models.make_apply(module)

    def loss(p):
        logits, _ = apply(p, model_state, inputs, train=True, key=jax.random.key(16))
        return _cross_entropy(logits, labels)

    grads = jax.jit(jax.grad(loss))(params)
    for path, leaf in _leaves_with_paths(grads):
        assert np.all(np.isfinite(leaf)), path
        assert float(jnp.max(jnp.abs(leaf))) > 0.0, path


def test_custom_conv_factory_is_used():
    class _ZeroConv(nn.Conv):
        def __call__(self, inputs):
            return super().__call__(inputs) * 0.0

    inputs = _normal(17, (3, 8, 8, 1))
    default = models.LeNet(num_classes=3)
    zeroed = models.LeNet(num_classes=3, conv=_ZeroConv)
    params, _ = models.init(default, KEY, inputs)
    zero_params, _ = models.init(zeroed, KEY, inputs)
    _assert_trees_close(params, zero_params, atol=0, rtol=0)  # same layout and initialisation
    out_default, _ = _jit_apply(default)(params, {}, inputs, train=False)
    out_zeroed, _ = _jit_apply(zeroed)(params, {}, inputs, train=False)
    assert float(jnp.std(out_default, axis=0).min()) > 0.0
    np.testing.assert_allclose(out_zeroed, jnp.broadcast_to(out_zeroed[:1], (3, 3)), atol=0)


def test_num_params_and_has_conv_on_hand_trees():
    tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros(5), jnp.zeros((2, 2, 2, 2))]}
    assert models.num_params(tree) == 12 + 5 + 16
    assert models.num_params({}) == 0
    assert models.has_conv(tree)
    assert not models.has_conv({"a": jnp.zeros((3, 4))})
    assert models.has_conv(
        {"a": jax.ShapeDtypeStruct((4, 3, 3, 1, 8), jnp.float32)}, num_leading_axes=1
    )
    with pytest.raises(ValueError, match="num_leading_axes"):
        models.has_conv(tree, num_leading_axes=-1)


# ----------------------------------------------------------------------------------------------
# Bad input.


def test_mlp_input_dimension_mismatch():
    module = models.mlp([8], num_outputs=2)
    params, _ = models.init(module, KEY, jnp.zeros((1, 8, 8, 1)))
    apply = models.make_apply(module)
    with pytest.raises(ValueError, match=r"64 input features.*\(2, 7, 7, 1\).*49"):
        apply(params, {}, jnp.zeros((2, 7, 7, 1)), train=False)
    with pytest.raises(ValueError, match="batch"):
        apply(params, {}, jnp.zeros(64), train=False)


def test_conv_net_input_mismatches():
    lenet = models.lenet(3)
    params, _ = models.init(lenet, KEY, jnp.zeros((1, 8, 8, 1)))
    apply = models.make_apply(lenet)
    with pytest.raises(ValueError, match="1 input channels"):
        apply(params, {}, jnp.zeros((2, 8, 8, 3)), train=False)
    with pytest.raises(ValueError, match="64 features"):
        apply(params, {}, jnp.zeros((2, 28, 28, 1)), train=False)
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        apply(params, {}, jnp.zeros((2, 8, 8)), train=False)
    with pytest.raises(ValueError, match="4x4"):
        models.init(lenet, KEY, jnp.zeros((1, 2, 2, 1)))
    resnet = SMALL_RESNET
    params, model_state = models.init(resnet, KEY, jnp.zeros(SMALL_SHAPE))
    apply = _jit_apply(resnet)
    with pytest.raises(ValueError, match="3 input channels"):
        apply(params, model_state, jnp.zeros((2, 8, 8, 1)), train=False)
    with pytest.raises(ValueError, match="model_state"):
        apply(params, {}, jnp.zeros((2, 8, 8, 3)), train=True)
    outputs, _ = apply(params, model_state, jnp.zeros((2, 16, 16, 3)), train=False)
    assert outputs.shape == (2, 3)  # global pooling: any image size works


def test_generic_module_shape_mismatch_is_value_error():
    class _Linear(nn.Module):
        @nn.compact
        def __call__(self, inputs, *, train):
            del train
            return nn.Dense(2)(inputs)

    params, _ = models.init(_Linear(), KEY, jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        models.make_apply(_Linear())(params, {}, jnp.zeros((4, 5)), train=False)


def test_bad_options_and_arguments():
    with pytest.raises(ValueError, match="norm"):
        models.resnet20(10, norm="instance")
    with pytest.raises(ValueError, match="dropout_rate"):
        models.mlp([4], num_outputs=2, dropout_rate=-0.1)
    with pytest.raises(ValueError, match="dropout_rate"):
        models.lenet(10, dropout_rate=1.0)
    with pytest.raises(ValueError, match="pooling"):
        models.lenet(10, pooling="median")
    with pytest.raises(ValueError, match="hidden_sizes"):
        models.mlp([4, 0], num_outputs=2)
    with pytest.raises(ValueError, match="num_classes"):
        models.resnet20(0)
    with pytest.raises(ValueError, match="width"):
        models.resnet20(10, width=0)
    with pytest.raises(ValueError, match="stage_sizes"):
        models.ResNet(stage_sizes=(), num_classes=10)
    module = models.mlp([4], num_outputs=2)
    with pytest.raises(ValueError, match="sample_inputs"):
        models.init(module, KEY, jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="num_members"):
        models.init_ensemble(module, KEY, jnp.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="flax.linen.Module"):
        models.make_apply(lambda x: x)
    params, _ = models.init(module, KEY, jnp.zeros((1, 3)))
    apply = models.make_apply(module)
    with pytest.raises(ValueError, match="train must be a Python bool"):
        apply(params, {}, jnp.zeros((2, 3)), train=jnp.array(True))
    with pytest.raises(ValueError, match="train must be a Python bool"):
        jax.jit(lambda t: apply(params, {}, jnp.zeros((2, 3)), train=t)[0])(True)
    with pytest.raises(ValueError, match="model_state"):
        apply(params, [], jnp.zeros((2, 3)), train=False)


def test_init_unhashable_module_and_inside_jit():
    # A list attribute makes the module unhashable: init compiles a closure instead.
    listed = models.MLP(hidden_sizes=[4], num_outputs=2)
    with pytest.raises(TypeError):
        hash(listed)
    inputs = jnp.zeros((1, 3))
    params_list, _ = models.init(listed, KEY, inputs)
    params_tuple, _ = models.init(models.mlp([4], num_outputs=2), KEY, inputs)
    _assert_trees_close(params_list, params_tuple, atol=0, rtol=0)
    # Inside an outer jit (traced key) init is traced into the caller's program.
    params_jit, _ = jax.jit(lambda key: models.init(listed, key, inputs))(KEY)
    _assert_trees_close(params_jit, params_tuple, atol=1e-6, rtol=1e-6)
