"""Tests for pretrained-weight import: file formats, name mapping, and forward equivalence.

State dicts are generated here with NumPy under names and shapes derived from the torchvision
and timm architecture descriptions (not from the mapping code), and the imported Flax models
are compared against reference forwards written in PyTorch's conventions (NCHW inputs, OIHW
weights, ``(out, in)`` linear weights, BatchNorm in evaluation mode).
"""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from scipy.special import erf

from bnn_flat import models
from bnn_flat.models import pretrained
from bnn_flat.models.resnet_imagenet import ImageNetResNet, resnet18, resnet50
from bnn_flat.models.vit import VisionTransformer, vit_b16

# ----------------------------------------------------------------------------------------------
# Independent descriptions of the torchvision and timm state dicts.


def _torchvision_resnet_shapes(block, layers, num_classes, width=64):
    """torchvision ``ResNet`` state dict names and shapes (including num_batches_tracked)."""
    shapes = {}

    def batch_norm(prefix, channels):
        for suffix in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{suffix}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    expansion = 1 if block == "basic" else 4
    shapes["conv1.weight"] = (width, 3, 7, 7)
    batch_norm("bn1", width)
    inplanes = width
    for stage, num_blocks in enumerate(layers):
        planes = width * 2**stage
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            prefix = f"layer{stage + 1}.{index}"
            if block == "basic":
                shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 3, 3)
                batch_norm(f"{prefix}.bn1", planes)
                shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                batch_norm(f"{prefix}.bn2", planes)
            else:
                shapes[f"{prefix}.conv1.weight"] = (planes, inplanes, 1, 1)
                batch_norm(f"{prefix}.bn1", planes)
                shapes[f"{prefix}.conv2.weight"] = (planes, planes, 3, 3)
                batch_norm(f"{prefix}.bn2", planes)
                shapes[f"{prefix}.conv3.weight"] = (planes * 4, planes, 1, 1)
                batch_norm(f"{prefix}.bn3", planes * 4)
            if stride != 1 or inplanes != planes * expansion:
                shapes[f"{prefix}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                batch_norm(f"{prefix}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (num_classes, inplanes)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _timm_vit_shapes(num_classes, image_size, patch_size, dim, depth, mlp_ratio=4.0):
    """timm ``VisionTransformer`` state dict names and shapes (class token, no fc_norm)."""
    num_patches = (image_size // patch_size) ** 2
    hidden = int(dim * mlp_ratio)
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + num_patches, dim),
        "patch_embed.proj.weight": (dim, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (dim,),
    }
    for index in range(depth):
        prefix = f"blocks.{index}"
        shapes.update(
            {
                f"{prefix}.norm1.weight": (dim,),
                f"{prefix}.norm1.bias": (dim,),
                f"{prefix}.attn.qkv.weight": (3 * dim, dim),
                f"{prefix}.attn.qkv.bias": (3 * dim,),
                f"{prefix}.attn.proj.weight": (dim, dim),
                f"{prefix}.attn.proj.bias": (dim,),
                f"{prefix}.norm2.weight": (dim,),
                f"{prefix}.norm2.bias": (dim,),
                f"{prefix}.mlp.fc1.weight": (hidden, dim),
                f"{prefix}.mlp.fc1.bias": (hidden,),
                f"{prefix}.mlp.fc2.weight": (dim, hidden),
                f"{prefix}.mlp.fc2.bias": (dim,),
            }
        )
    shapes.update(
        {
            "norm.weight": (dim,),
            "norm.bias": (dim,),
            "head.weight": (num_classes, dim),
            "head.bias": (num_classes,),
        }
    )
    return shapes


def _trainable_count(shapes):
    return sum(
        math.prod(shape)
        for name, shape in shapes.items()
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def _random_state_dict(shapes, seed):
    """Random tensors with sensible scales (He-scaled weights, positive variances)."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            value = np.array(1000, np.int64)
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("running_mean") or name.endswith("bias"):
            value = 0.1 * rng.normal(size=shape)
        elif len(shape) == 1:  # BatchNorm and LayerNorm weights
            value = rng.uniform(0.5, 1.5, shape)
        elif len(shape) == 3:  # cls_token, pos_embed
            value = 0.5 * rng.normal(size=shape)
        else:
            fan_in = math.prod(shape[1:])
            value = rng.normal(size=shape) * math.sqrt(2.0 / fan_in)
        state_dict[name] = value.astype(np.float32) if value.dtype == np.float64 else value
    return state_dict


# ----------------------------------------------------------------------------------------------
# Reference forwards in PyTorch conventions.


def _reference_resnet(state_dict, images, block, layers):
    """torchvision ResNet in evaluation mode, float64 NumPy; ``images`` NCHW, weights OIHW."""
    w = {name: np.asarray(value, np.float64) for name, value in state_dict.items()}

    def conv(x, name, stride, padding):
        kernel = w[name]
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        out_h = (x.shape[2] - kernel.shape[2]) // stride + 1
        out_w = (x.shape[3] - kernel.shape[3]) // stride + 1
        out = np.zeros((x.shape[0], kernel.shape[0], out_h, out_w))
        for i in range(kernel.shape[2]):
            for j in range(kernel.shape[3]):
                patch = x[:, :, i : i + stride * (out_h - 1) + 1 : stride][
                    ..., j : j + stride * (out_w - 1) + 1 : stride
                ]
                out += np.tensordot(kernel[:, :, i, j], patch, axes=([1], [1])).swapaxes(0, 1)
        return out

    def bn(x, prefix):
        def channel(v):
            return v[None, :, None, None]

        scale = w[f"{prefix}.weight"] / np.sqrt(w[f"{prefix}.running_var"] + 1e-5)
        return channel(scale) * (x - channel(w[f"{prefix}.running_mean"])) + channel(
            w[f"{prefix}.bias"]
        )

    def max_pool(x):  # kernel 3, stride 2, padding 1 with -inf
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        out_h, out_w = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
        windows = [
            x[:, :, i : i + 2 * (out_h - 1) + 1 : 2, j : j + 2 * (out_w - 1) + 1 : 2]
            for i in range(3)
            for j in range(3)
        ]
        return np.max(windows, axis=0)

    def relu(x):
        return np.maximum(x, 0.0)

    x = max_pool(relu(bn(conv(images, "conv1.weight", 2, 3), "bn1")))
    for stage, num_blocks in enumerate(layers):
        for index in range(num_blocks):
            stride = 2 if stage > 0 and index == 0 else 1
            p = f"layer{stage + 1}.{index}"
            if block == "basic":
                y = relu(bn(conv(x, f"{p}.conv1.weight", stride, 1), f"{p}.bn1"))
                y = bn(conv(y, f"{p}.conv2.weight", 1, 1), f"{p}.bn2")
            else:
                y = relu(bn(conv(x, f"{p}.conv1.weight", 1, 0), f"{p}.bn1"))
                y = relu(bn(conv(y, f"{p}.conv2.weight", stride, 1), f"{p}.bn2"))
                y = bn(conv(y, f"{p}.conv3.weight", 1, 0), f"{p}.bn3")
            if f"{p}.downsample.0.weight" in w:
                x = bn(conv(x, f"{p}.downsample.0.weight", stride, 0), f"{p}.downsample.1")
            x = relu(y + x)
    x = x.mean(axis=(2, 3))
    return x @ w["fc.weight"].T + w["fc.bias"]


def _reference_vit(state_dict, images, patch_size, num_heads, depth):
    """timm ViT forward in float64 NumPy; ``images`` are NCHW."""
    w = {name: np.asarray(value, np.float64) for name, value in state_dict.items()}
    batch, channels, height, width = images.shape
    rows, cols = height // patch_size, width // patch_size
    # Conv with kernel = stride = patch, then flatten(2).transpose(1, 2): row-major tokens.
    patches = images.reshape(batch, channels, rows, patch_size, cols, patch_size)
    patches = patches.transpose(0, 2, 4, 1, 3, 5).reshape(batch, rows * cols, -1)
    kernel = w["patch_embed.proj.weight"].reshape(w["patch_embed.proj.weight"].shape[0], -1)
    x = patches @ kernel.T + w["patch_embed.proj.bias"]
    dim = x.shape[-1]
    cls = np.broadcast_to(w["cls_token"], (batch, 1, dim))
    x = np.concatenate([cls, x], axis=1) + w["pos_embed"]

    def layer_norm(v, prefix):
        mean = v.mean(-1, keepdims=True)
        var = v.var(-1, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-6) * w[f"{prefix}.weight"] + w[f"{prefix}.bias"]

    def linear(v, prefix):
        return v @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    head_dim = dim // num_heads
    tokens = x.shape[1]
    for index in range(depth):
        p = f"blocks.{index}"
        qkv = linear(layer_norm(x, f"{p}.norm1"), f"{p}.attn.qkv")
        qkv = qkv.reshape(batch, tokens, 3, num_heads, head_dim).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        logits = q @ k.transpose(0, 1, 3, 2) * head_dim**-0.5
        logits = logits - logits.max(-1, keepdims=True)
        attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        y = (attention @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, dim)
        x = x + linear(y, f"{p}.attn.proj")
        hidden = linear(layer_norm(x, f"{p}.norm2"), f"{p}.mlp.fc1")
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
        x = x + linear(hidden, f"{p}.mlp.fc2")
    x = layer_norm(x, "norm")
    return linear(x[:, 0], "head")


def _assert_close_to_scale(actual, expected, tolerance=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.max(np.abs(expected))
    assert scale > 1e-3  # a meaningful comparison
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tolerance * scale)


def _images_nchw(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Parameter counts and names of the full architectures (shapes only, no allocation).


@pytest.mark.parametrize(
    "factory, block, layers, count",
    [
        (resnet18, "basic", (2, 2, 2, 2), 11_689_512),
        (resnet50, "bottleneck", (3, 4, 6, 3), 25_557_032),
    ],
)
def test_full_resnet_names_and_counts(factory, block, layers, count):
    reference = _torchvision_resnet_shapes(block, layers, 1000)
    assert _trainable_count(reference) == count
    module = factory(1000)
    expected = pretrained.expected_state_dict_shapes(module)
    assert expected == {
        name: shape for name, shape in reference.items() if "num_batches_tracked" not in name
    }
    params, state = jax.eval_shape(
        lambda key: models.init(module, key, jnp.zeros((1, 224, 224, 3))), jax.random.key(0)
    )
    assert models.num_params(params) == count
    without_head = pretrained.expected_state_dict_shapes(module, include_head=False)
    assert set(expected) - set(without_head) == {"fc.weight", "fc.bias"}


def test_full_vit_b16_names_and_count():
    reference = _timm_vit_shapes(1000, 224, 16, 768, 12)
    assert _trainable_count(reference) == 86_567_656
    module = vit_b16(1000)
    assert pretrained.expected_state_dict_shapes(module) == reference
    params, state = jax.eval_shape(
        lambda key: models.init(module, key, jnp.zeros((1, 224, 224, 3))), jax.random.key(0)
    )
    assert models.num_params(params) == 86_567_656 and state == {}


# ----------------------------------------------------------------------------------------------
# Forward equivalence against the references.


@pytest.mark.parametrize(
    "block, layers, width, suffix, image_shape",
    [
        # Full-width ResNet-18 from a safetensors file, non-square even input.
        ("basic", (2, 2, 2, 2), 64, ".safetensors", (2, 3, 64, 48)),
        # ResNet-50 structure (bottlenecks) at a quarter width from an npz file, odd input.
        ("bottleneck", (3, 4, 6, 3), 16, ".npz", (2, 3, 45, 37)),
    ],
)
def test_resnet_matches_torch_reference(tmp_path, block, layers, width, suffix, image_shape):
    shapes = _torchvision_resnet_shapes(block, layers, num_classes=7, width=width)
    state_dict = _random_state_dict(shapes, seed=1)
    path = tmp_path / f"resnet{suffix}"
    if suffix == ".npz":
        np.savez(path, **state_dict)
    else:
        pretrained.save_safetensors(path, state_dict)
    module = ImageNetResNet(stage_sizes=layers, block=block, num_classes=7, width=width)
    images = _images_nchw(2, image_shape)
    params, model_state = pretrained.load_pretrained(
        path, module, jax.random.key(0), jnp.zeros((1, *image_shape[2:], 3))
    )
    logits, new_state = jax.jit(models.make_apply(module), static_argnames="train")(
        params, model_state, images.transpose(0, 2, 3, 1), train=False
    )
    expected = _reference_resnet(state_dict, images, block, layers)
    assert logits.shape == (image_shape[0], 7)
    _assert_close_to_scale(logits, expected)
    for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(model_state), strict=True):
        np.testing.assert_array_equal(new, old)  # evaluation mode leaves the statistics


def test_vit_matches_timm_reference(tmp_path):
    config = dict(image_size=32, patch_size=8, dim=48, depth=2, num_heads=4)
    shapes = _timm_vit_shapes(
        5, config["image_size"], config["patch_size"], config["dim"], config["depth"]
    )
    state_dict = _random_state_dict(shapes, seed=3)
    path = tmp_path / "vit.safetensors"
    pretrained.save_safetensors(path, state_dict)
    module = VisionTransformer(num_classes=5, **config)
    images = _images_nchw(4, (3, 3, 32, 32))
    params, model_state = pretrained.load_pretrained(
        path, module, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    assert model_state == {}
    logits, _ = jax.jit(models.make_apply(module), static_argnames="train")(
        params, model_state, images.transpose(0, 2, 3, 1), train=False
    )
    expected = _reference_vit(state_dict, images, 8, 4, 2)
    _assert_close_to_scale(logits, expected)


def test_resnet_batch_norm_training_uses_torch_momentum():
    """In training mode the running mean moves by 0.1 towards the batch mean (torch momentum)."""
    shapes = _torchvision_resnet_shapes("basic", (1,), num_classes=3, width=4)
    state_dict = _random_state_dict(shapes, seed=5)
    module = ImageNetResNet(stage_sizes=(1,), block="basic", num_classes=3, width=4)
    params, batch_stats = pretrained.import_torchvision_resnet(state_dict, module)
    images = _images_nchw(6, (3, 3, 16, 16))
    _, new_state = models.make_apply(module)(
        params, {"batch_stats": batch_stats}, images.transpose(0, 2, 3, 1), train=True
    )
    conv1 = lax.conv_general_dilated(
        jnp.asarray(images, jnp.float32),
        jnp.asarray(state_dict["conv1.weight"]),
        (2, 2),
        [(3, 3), (3, 3)],
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=lax.Precision.HIGHEST,
    )
    expected = 0.9 * state_dict["bn1.running_mean"] + 0.1 * np.mean(conv1, axis=(0, 2, 3))
    np.testing.assert_allclose(
        new_state["batch_stats"]["bn1"]["mean"], expected, rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------------------------
# Transfer: a new head.


SMALL_RESNET_LAYERS = (1, 1)


def _small_resnet(num_classes):
    return ImageNetResNet(
        stage_sizes=SMALL_RESNET_LAYERS, block="basic", num_classes=num_classes, width=4
    )


def test_include_head_false_keeps_new_head_and_loads_the_rest(tmp_path):
    shapes = _torchvision_resnet_shapes("basic", SMALL_RESNET_LAYERS, num_classes=1000, width=4)
    state_dict = _random_state_dict(shapes, seed=7)
    path = tmp_path / "backbone.safetensors"
    pretrained.save_safetensors(path, state_dict)
    module = _small_resnet(10)
    key = jax.random.key(11)
    sample = jnp.zeros((1, 32, 32, 3))
    fresh_params, _ = models.init(module, key, sample)
    params, model_state = pretrained.load_pretrained(path, module, key, sample, include_head=False)
    np.testing.assert_array_equal(params["fc"]["kernel"], fresh_params["fc"]["kernel"])
    np.testing.assert_array_equal(params["fc"]["bias"], fresh_params["fc"]["bias"])
    assert float(jnp.std(params["fc"]["kernel"])) > 0.01  # a real initialisation, not zeros
    np.testing.assert_array_equal(
        params["layer2_0"]["downsample_conv"]["kernel"],
        state_dict["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        params["layer1_0"]["bn2"]["scale"], state_dict["layer1.0.bn2.weight"]
    )
    np.testing.assert_array_equal(
        model_state["batch_stats"]["layer2_0"]["downsample_bn"]["var"],
        state_dict["layer2.0.downsample.1.running_var"],
    )
    # Every non-head tensor of the file is used exactly once.
    flat = jax.tree.leaves({"params": params, **model_state})
    assert len(flat) == len(shapes) - len([n for n in shapes if "num_batches" in n])


def test_include_head_false_requires_initial_params():
    shapes = _torchvision_resnet_shapes("basic", SMALL_RESNET_LAYERS, num_classes=3, width=4)
    state_dict = _random_state_dict(shapes, seed=0)
    with pytest.raises(ValueError, match="initial_params"):
        pretrained.import_torchvision_resnet(state_dict, _small_resnet(3), include_head=False)
    with pytest.raises(
        ValueError, match=r"initial_params must hold the module's head fc/(bias|kernel)"
    ):
        pretrained.import_torchvision_resnet(
            state_dict, _small_resnet(3), include_head=False, initial_params={"fc": {}}
        )


def test_vit_include_head_false_accepts_headless_file():
    config = dict(image_size=16, patch_size=8, dim=8, depth=1, num_heads=2)
    shapes = _timm_vit_shapes(0, 16, 8, 8, 1)
    del shapes["head.weight"], shapes["head.bias"]  # timm with num_classes=0
    state_dict = _random_state_dict(shapes, seed=2)
    module = VisionTransformer(num_classes=4, **config)
    initial, _ = jax.eval_shape(
        lambda key: models.init(module, key, jnp.zeros((1, 16, 16, 3))), jax.random.key(0)
    )
    initial = jax.tree.map(lambda s: np.full(s.shape, 0.25, np.float32), initial)
    params = pretrained.import_timm_vit(
        state_dict, module, include_head=False, initial_params=initial
    )
    np.testing.assert_array_equal(params["head"]["kernel"], np.full((8, 4), 0.25))
    np.testing.assert_array_equal(
        params["blocks_0"]["attn"]["qkv"]["kernel"], state_dict["blocks.0.attn.qkv.weight"].T
    )
    np.testing.assert_array_equal(params["pos_embed"], state_dict["pos_embed"])
    with pytest.raises(ValueError, match=r"missing \(2\): head.(weight|bias), head.(bias|weight)"):
        pretrained.import_timm_vit(state_dict, module)


# ----------------------------------------------------------------------------------------------
# Error reporting.


def _small_state_dict(num_classes=3):
    shapes = _torchvision_resnet_shapes("basic", SMALL_RESNET_LAYERS, num_classes, width=4)
    return _random_state_dict(shapes, seed=0)


def test_missing_extra_and_misshaped_tensors_are_named():
    module = _small_resnet(3)
    state_dict = _small_state_dict()
    del state_dict["layer1.0.conv1.weight"]
    state_dict["extra.weight"] = np.zeros((2, 2), np.float32)
    state_dict["layer2.0.bn1.weight"] = np.ones((9,), np.float32)
    with pytest.raises(ValueError) as error:
        pretrained.import_torchvision_resnet(state_dict, module)
    message = str(error.value)
    assert "missing (1): layer1.0.conv1.weight" in message
    assert "unexpected (1): extra.weight (2, 2)" in message
    assert "shape mismatch for layer2.0.bn1.weight: file (9,), model (8,)" in message


def test_head_with_other_classes_reports_shape():
    module = resnet18(10)
    shapes = pretrained.expected_state_dict_shapes(module)
    state_dict = {name: np.broadcast_to(np.float32(0.5), shape) for name, shape in shapes.items()}
    state_dict["fc.weight"] = np.broadcast_to(np.float32(0.5), (1000, 512))
    state_dict["fc.bias"] = np.broadcast_to(np.float32(0.5), (1000,))
    with pytest.raises(ValueError, match=r"shape mismatch for fc.weight: file \(1000, 512\), "):
        pretrained.import_torchvision_resnet(state_dict, module)


def test_bad_values_and_dtypes_are_rejected():
    module = _small_resnet(3)
    state_dict = _small_state_dict()
    state_dict["bn1.weight"] = state_dict["bn1.weight"].copy()
    state_dict["bn1.weight"][0] = np.nan
    state_dict["fc.bias"] = np.array([1, 2, 3], np.int64)
    with pytest.raises(ValueError) as error:
        pretrained.import_torchvision_resnet(state_dict, module)
    assert "bn1.weight has non-finite values" in str(error.value)
    assert "fc.bias has dtype int64" in str(error.value)
    with pytest.raises(ValueError, match="must be an ImageNetResNet"):
        pretrained.import_torchvision_resnet(_small_state_dict(), vit_b16())
    with pytest.raises(ValueError, match="must be a VisionTransformer"):
        pretrained.import_timm_vit(_small_state_dict(), module)
    with pytest.raises(ValueError, match="supports ImageNetResNet and VisionTransformer"):
        pretrained.load_pretrained("x.npz", models.mlp([2], 2), jax.random.key(0), jnp.ones(2))


def test_vit_position_embedding_size_mismatch_gives_hint():
    module = VisionTransformer(
        num_classes=2, image_size=32, patch_size=8, dim=8, depth=1, num_heads=2
    )
    state_dict = _random_state_dict(_timm_vit_shapes(2, 16, 8, 8, 1), seed=0)
    with pytest.raises(ValueError, match=r"interpolate_position_embedding\(.*, 4\)"):
        pretrained.import_timm_vit(state_dict, module)
    state_dict["pos_embed"] = pretrained.interpolate_position_embedding(state_dict["pos_embed"], 4)
    params = pretrained.import_timm_vit(state_dict, module)
    assert params["pos_embed"].shape == (1, 17, 8)


def test_load_state_dict_rejects_unknown_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown weight file format '.pth'.*PyTorch pickle"):
        pretrained.load_state_dict(tmp_path / "model.pth")
    with pytest.raises(ValueError, match="weight file not found"):
        pretrained.load_state_dict(tmp_path / "absent.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        pretrained.load_state_dict(corrupt)
    bad_offsets = tmp_path / "offsets.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode()
    bad_offsets.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(ValueError, match="data_offsets"):
        pretrained.load_state_dict(bad_offsets)
    unknown = tmp_path / "unknown.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}})
    unknown.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(1))
    with pytest.raises(ValueError, match="unsupported dtype 'F8_E4M3'"):
        pretrained.load_state_dict(unknown)
    with pytest.raises(ValueError, match="cannot hold"):
        pretrained.save_safetensors(tmp_path / "c.safetensors", {"z": np.zeros(2, np.complex64)})


# ----------------------------------------------------------------------------------------------
# safetensors format.


def test_reads_hand_written_safetensors_file(tmp_path):
    """A file assembled byte by byte per the format description, tensors out of name order."""
    big = np.arange(6, dtype="<f4").reshape(2, 3)
    bf16_bits = np.array([0x3FC0, 0xC000], "<u2")  # 1.5 and -2.0 in bfloat16
    half = np.array([0.5, 65504.0], "<f2")
    counter = np.array(7, "<i8")
    data = bf16_bits.tobytes() + big.tobytes() + half.tobytes() + counter.tobytes()
    header = {
        "__metadata__": {"format": "pt"},
        "b.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]},
        "a.bf16": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        "c.half": {"dtype": "F16", "shape": [2], "data_offsets": [28, 32]},
        "d.num_batches_tracked": {"dtype": "I64", "shape": [], "data_offsets": [32, 40]},
    }
    header_bytes = json.dumps(header).encode()
    path = tmp_path / "hand.safetensors"
    path.write_bytes(len(header_bytes).to_bytes(8, "little") + header_bytes + data)
    loaded = pretrained.load_state_dict(path)
    assert list(loaded) == ["b.weight", "a.bf16", "c.half", "d.num_batches_tracked"]
    np.testing.assert_array_equal(loaded["b.weight"], big)
    assert loaded["a.bf16"].dtype == np.float32
    np.testing.assert_array_equal(loaded["a.bf16"], [1.5, -2.0])
    assert loaded["c.half"].dtype == np.float16
    np.testing.assert_array_equal(loaded["c.half"], [0.5, 65504.0])
    assert loaded["d.num_batches_tracked"].shape == () and loaded["d.num_batches_tracked"] == 7


def test_written_file_follows_the_format(tmp_path):
    arrays = {
        "x": np.arange(5, dtype=np.float64),
        "y": np.ones((2, 2), np.float32),
        "z": np.array([3], np.int32),
    }
    path = tmp_path / "out.safetensors"
    pretrained.save_safetensors(path, arrays, metadata={"source": "test"})
    raw = path.read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert header_size % 8 == 0
    header = json.loads(raw[8 : 8 + header_size])
    assert header["__metadata__"] == {"source": "test"}
    data = raw[8 + header_size :]
    for name, code in (("x", "F64"), ("y", "F32"), ("z", "I32")):
        assert header[name]["dtype"] == code
        assert header[name]["shape"] == list(arrays[name].shape)
        begin, end = header[name]["data_offsets"]
        assert (
            data[begin:end] == arrays[name].astype(arrays[name].dtype.newbyteorder("<")).tobytes()
        )
    assert len(data) == sum(a.nbytes for a in arrays.values())


def test_bf16_and_f16_round_trip_and_import(tmp_path):
    shapes = _torchvision_resnet_shapes("basic", SMALL_RESNET_LAYERS, num_classes=3, width=4)
    state_dict = _random_state_dict(shapes, seed=9)
    float_names = [name for name in state_dict if state_dict[name].dtype == np.float32]
    low = {
        name: value.astype(ml_dtypes.bfloat16 if i % 2 else np.float16)
        if name in float_names
        else value
        for i, (name, value) in enumerate(state_dict.items())
    }
    path = tmp_path / "low.safetensors"
    pretrained.save_safetensors(path, low)
    loaded = pretrained.load_state_dict(path)
    for name, value in low.items():
        expected = value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value
        assert loaded[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(loaded[name], expected)
    # bfloat16 is coarse: the stored values differ from the float32 originals.
    bf16_name = next(n for i, n in enumerate(state_dict) if i % 2 and n in float_names)
    assert not np.array_equal(loaded[bf16_name], state_dict[bf16_name])
    params, batch_stats = pretrained.import_torchvision_resnet(loaded, _small_resnet(3))
    assert params["conv1"]["kernel"].dtype == jnp.float32
    np.testing.assert_array_equal(
        params["layer1_0"]["conv2"]["kernel"],
        low["layer1.0.conv2.weight"].astype(np.float32).transpose(2, 3, 1, 0),
    )


def test_npz_round_trip(tmp_path):
    arrays = {"a.weight": np.arange(4.0).reshape(2, 2), "b": np.array([1, 2], np.int64)}
    np.savez(tmp_path / "w.npz", **arrays)
    loaded = pretrained.load_state_dict(tmp_path / "w.npz")
    assert sorted(loaded) == ["a.weight", "b"]
    np.testing.assert_array_equal(loaded["a.weight"], arrays["a.weight"])
    np.testing.assert_array_equal(loaded["b"], arrays["b"])


# ----------------------------------------------------------------------------------------------
# Position embedding resampling and module validation.


def test_interpolate_position_embedding():
    rng = np.random.default_rng(0)
    pos_embed = rng.normal(size=(1, 1 + 9, 4)).astype(np.float32)
    np.testing.assert_allclose(
        pretrained.interpolate_position_embedding(pos_embed, 3), pos_embed, atol=1e-6
    )
    resized = pretrained.interpolate_position_embedding(pos_embed, 5)
    assert resized.shape == (1, 26, 4)
    np.testing.assert_array_equal(resized[:, 0], pos_embed[:, 0])  # class token kept
    # A constant grid stays constant: the bicubic weights sum to one.
    constant = np.concatenate([pos_embed[:, :1], np.full((1, 16, 4), 2.5, np.float32)], axis=1)
    np.testing.assert_allclose(
        pretrained.interpolate_position_embedding(constant, 7)[:, 1:], 2.5, atol=1e-5
    )
    with pytest.raises(ValueError, match="square grid"):
        pretrained.interpolate_position_embedding(np.zeros((1, 11, 4)), 3)
    with pytest.raises(ValueError, match="grid_size"):
        pretrained.interpolate_position_embedding(pos_embed, 0)


def test_module_validation():
    with pytest.raises(ValueError, match="block must be one of"):
        ImageNetResNet(stage_sizes=(1,), block="wide", num_classes=2)
    with pytest.raises(ValueError, match="stage_sizes"):
        ImageNetResNet(stage_sizes=(), block="basic", num_classes=2)
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(0)
    with pytest.raises(ValueError, match="patch_size 5 must divide image_size 32"):
        VisionTransformer(num_classes=2, image_size=32, patch_size=5, dim=8, num_heads=2)
    with pytest.raises(ValueError, match="num_heads 3 must divide dim 8"):
        VisionTransformer(num_classes=2, image_size=32, patch_size=8, dim=8, num_heads=3)
    with pytest.raises(ValueError, match="dropout_rate"):
        vit_b16(dropout_rate=1.0)
    module = VisionTransformer(
        num_classes=2, image_size=16, patch_size=8, dim=8, depth=1, num_heads=2
    )
    params, state = jax.eval_shape(
        lambda key: models.init(module, key, jnp.zeros((1, 16, 16, 3))), jax.random.key(0)
    )
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, 16, 16, channels\)"):
        models.make_apply(module)(params, state, jnp.zeros((1, 32, 32, 3)), train=False)
    with pytest.raises(ValueError, match="expect 3 input channels"):
        models.make_apply(module)(params, state, jnp.zeros((1, 16, 16, 1)), train=False)


def test_vit_dropout_uses_key():
    module = VisionTransformer(
        num_classes=3,
        image_size=16,
        patch_size=8,
        dim=8,
        depth=1,
        num_heads=2,
        dropout_rate=0.5,
        attention_dropout_rate=0.5,
    )
    state_dict = _random_state_dict(_timm_vit_shapes(3, 16, 8, 8, 1), seed=4)
    params, state = pretrained.import_timm_vit(state_dict, module), {}
    apply = jax.jit(models.make_apply(module), static_argnames="train")
    images = jnp.asarray(_images_nchw(0, (2, 16, 16, 3)))
    first, _ = apply(params, state, images, train=True, key=jax.random.key(1))
    again, _ = apply(params, state, images, train=True, key=jax.random.key(1))
    other, _ = apply(params, state, images, train=True, key=jax.random.key(2))
    evaluation, _ = apply(params, state, images, train=False)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first, evaluation)
    with pytest.raises(ValueError, match="pass key="):
        apply(params, state, images, train=True)
