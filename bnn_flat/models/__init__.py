"""Flax model zoo and the functional bridge to the library's pure ``apply`` contract.

Models (Flax Linen modules, ``__call__(inputs, *, train)``): :class:`MLP`, :class:`LeNet`,
:class:`ResNet`, :class:`ResNet20` and the factories :func:`mlp`, :func:`lenet`,
:func:`resnet20`; ImageNet backbones in torchvision/timm layouts, :class:`ImageNetResNet`
(:func:`resnet18`, :func:`resnet34`, :func:`resnet50`) and :class:`VisionTransformer`
(:func:`vit_b16`), with weight import in :mod:`bnn_flat.models.pretrained`
(docs/pretrained.md). Bridge: :func:`init`, :func:`make_apply`, :func:`init_ensemble`,
:func:`num_params`, :func:`has_conv`.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from bnn_flat import models
  >>> module = models.lenet(num_classes=10)
  >>> params, model_state = models.init(module, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  >>> apply = models.make_apply(module)
  >>> logits, _ = apply(params, model_state, jnp.zeros((4, 8, 8, 1)), train=False)
  >>> logits.shape
  (4, 10)
"""

from bnn_flat.models import conv, norm, pooling, pretrained
from bnn_flat.models.bridge import has_conv, init, init_ensemble, make_apply, num_params
from bnn_flat.models.lenet import LeNet, lenet
from bnn_flat.models.mlp import MLP, mlp
from bnn_flat.models.resnet import ResNet, ResNet20, resnet20
from bnn_flat.models.resnet_imagenet import ImageNetResNet, resnet18, resnet34, resnet50
from bnn_flat.models.vit import VisionTransformer, vit_b16

__all__ = [
    "MLP",
    "LeNet",
    "ResNet",
    "ResNet20",
    "mlp",
    "lenet",
    "resnet20",
    "ImageNetResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "VisionTransformer",
    "vit_b16",
    "pretrained",
    "conv",
    "norm",
    "pooling",
    "init",
    "make_apply",
    "init_ensemble",
    "num_params",
    "has_conv",
]
