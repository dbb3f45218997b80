"""Vision Transformer (ViT) with timm's parameter layout.

The ViT of Dosovitskiy et al. as timm builds it, so that timm's (and the Hugging Face hub's
``timm/...``) weights load without any change of meaning (see
:mod:`bnn_flat.models.pretrained`):

.. math::

    z_0 = [x_{cls}; \\mathrm{patch\\_embed}(x)] + E_{pos}, \\qquad
    z' = z + \\mathrm{attn}(\\mathrm{LN}_1(z)), \\qquad
    z'' = z' + \\mathrm{MLP}(\\mathrm{LN}_2(z')),

followed by a final LayerNorm and a linear ``head`` on the class token. Details:

* ``patch_embed/proj``: a ``patch_size x patch_size`` convolution with stride ``patch_size``
  and bias, giving ``(image_size / patch_size)**2`` tokens in row-major order;
* ``cls_token`` of shape ``(1, 1, dim)`` and ``pos_embed`` of shape ``(1, 1 + N, dim)``
  (the class token has a position embedding too);
* pre-norm blocks ``blocks_i`` with ``norm1``, ``attn`` (a fused ``qkv`` projection with
  bias whose ``3 dim`` outputs are ordered (q, k, v) x heads x head_dim, and ``proj``),
  ``norm2`` and ``mlp`` (``fc1``, exact erf GELU, ``fc2``);
* LayerNorm epsilon 1e-6 everywhere; attention logits scaled by ``head_dim**-0.5``.

Dropout (``dropout_rate``) is applied where timm applies ``pos_drop``, ``proj_drop`` and the
MLP dropouts; ``attention_dropout_rate`` drops attention probabilities. Both default to 0.

References:
  Dosovitskiy et al. (2021). An image is worth 16x16 words: Transformers for image
  recognition at scale. ICLR.
"""

from __future__ import annotations

import numbers
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["VisionTransformer", "vit_b16"]

_EPSILON = 1e-6
_DENSE_INIT = nn.initializers.truncated_normal(stddev=0.02)


class VisionTransformer(nn.Module):
    """A ViT classifying from the class token (timm's ``VisionTransformer`` layout).

    Attributes:
      num_classes: Number of output logits.
      image_size: Height and width of the (square) input images; fixes the number of
        position embeddings.
      patch_size: Height and width of a patch; must divide ``image_size``.
      dim: Token width (768 for ViT-B).
      depth: Number of transformer blocks (12 for ViT-B).
      num_heads: Number of attention heads; must divide ``dim``.
      mlp_ratio: Hidden width of the MLP relative to ``dim``.
      dropout_rate: Dropout probability after the position embedding, the attention output
        projection and both MLP layers.
      attention_dropout_rate: Dropout probability of the attention weights.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models.vit import VisionTransformer
      >>> module = VisionTransformer(num_classes=3, image_size=16, patch_size=8, dim=8,
      ...                            depth=1, num_heads=2)
      >>> params, state = jax.eval_shape(
      ...     lambda key: models.init(module, key, jnp.ones((1, 16, 16, 3))), jax.random.key(0))
      >>> params["pos_embed"].shape, state
      ((1, 5, 8), {})
    """

    num_classes: int
    image_size: int = 224
    patch_size: int = 16
    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("num_classes", "image_size", "patch_size", "dim", "depth", "num_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"patch_size {self.patch_size} must divide image_size {self.image_size}"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"num_heads {self.num_heads} must divide dim {self.dim}")
        if not self.mlp_ratio > 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
        """Runs the network.

        Args:
          inputs: Images of shape ``(batch, image_size, image_size, channels)`` (NHWC),
            normalised as the weights expect.
          train: Training mode: dropout is active (needs the ``"dropout"`` RNG stream when a
            dropout rate is positive).

        Returns:
          Logits of shape ``(batch, num_classes)``.
        """
        self._check_images(inputs)
        x = _PatchEmbed(self.dim, self.patch_size, name="patch_embed")(inputs)
        batch = x.shape[0]
        cls_token = self.param("cls_token", nn.initializers.normal(stddev=1e-6), (1, 1, self.dim))
        num_patches = (self.image_size // self.patch_size) ** 2
        pos_embed = self.param("pos_embed", _DENSE_INIT, (1, 1 + num_patches, self.dim))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.dim)), x], axis=1)
        x = x + pos_embed
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        for index in range(self.depth):
            x = _Block(
                num_heads=self.num_heads,
                mlp_dim=int(self.dim * self.mlp_ratio),
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                name=f"blocks_{index}",
            )(x, train=train)
        x = nn.LayerNorm(epsilon=_EPSILON, name="norm")(x)
        return nn.Dense(self.num_classes, kernel_init=_DENSE_INIT, name="head")(x[:, 0])

    def validate_inputs(self, params: Any, inputs: jax.Array) -> None:
        """Raises ``ValueError`` if ``inputs`` cannot be fed to this network.

        Args:
          params: The ``"params"`` collection of this module.
          inputs: The inputs about to be passed to :meth:`__call__`.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from bnn_flat.models.vit import VisionTransformer
          >>> module = VisionTransformer(num_classes=3, image_size=16, patch_size=8, dim=8,
          ...                            depth=1, num_heads=2)
          >>> module.validate_inputs(None, jnp.ones((2, 32, 32, 3)))
          Traceback (most recent call last):
          ...
          ValueError: VisionTransformer expects images of shape (batch, 16, 16, channels), got shape (2, 32, 32, 3)
        """  # noqa: E501
        self._check_images(inputs)
        try:
            channels = params["patch_embed"]["proj"]["kernel"].shape[-2]
        except (KeyError, TypeError, IndexError):
            return
        if inputs.shape[-1] != channels:
            raise ValueError(
                f"VisionTransformer parameters expect {channels} input channels, got inputs of "
                f"shape {inputs.shape}"
            )

    def _check_images(self, inputs: jax.Array) -> None:
        if (
            inputs.ndim != 4
            or inputs.shape[1:3] != (self.image_size, self.image_size)
            or inputs.shape[3] < 1
        ):
            raise ValueError(
                f"VisionTransformer expects images of shape (batch, {self.image_size}, "
                f"{self.image_size}, channels), got shape {inputs.shape}"
            )


def vit_b16(
    num_classes: int = 1000,
    image_size: int = 224,
    *,
    dropout_rate: float = 0.0,
    attention_dropout_rate: float = 0.0,
) -> VisionTransformer:
    """Builds ViT-B/16 (86,567,656 parameters with 1000 classes at 224 x 224).

    Args:
      num_classes: Number of output logits.
      image_size: Input resolution (224 for timm's ``vit_base_patch16_224``).
      dropout_rate: Dropout probability (see :class:`VisionTransformer`).
      attention_dropout_rate: Dropout probability of the attention weights.

    Returns:
      The (unbound) Flax module.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from bnn_flat import models
      >>> from bnn_flat.models.vit import vit_b16
      >>> shapes = jax.eval_shape(lambda key: models.init(
      ...     vit_b16(), key, jnp.ones((1, 224, 224, 3))), jax.random.key(0))
      >>> models.num_params(shapes[0])
      86567656
    """
    return VisionTransformer(
        num_classes=num_classes,
        image_size=image_size,
        patch_size=16,
        dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
    )


class _PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: a strided convolution, flattened row-major."""

    dim: int
    patch_size: int

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.dim,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            kernel_init=nn.initializers.lecun_normal(),
            name="proj",
        )(inputs)
        return x.reshape(x.shape[0], -1, self.dim)


class _Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm ``Attention``)."""

    num_heads: int
    dropout_rate: float
    attention_dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = nn.Dense(3 * dim, kernel_init=_DENSE_INIT, name="qkv")(x)
        # Output features are ordered (q, k, v) x heads x head_dim, as in timm.
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) * head_dim**-0.5
        weights = jax.nn.softmax(logits, axis=-1)
        weights = nn.Dropout(self.attention_dropout_rate)(weights, deterministic=not train)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, tokens, dim)
        y = nn.Dense(dim, kernel_init=_DENSE_INIT, name="proj")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class _Mlp(nn.Module):
    """Two linear layers with an exact GELU in between (timm ``Mlp``)."""

    hidden_dim: int
    dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        dim = x.shape[-1]
        y = nn.Dense(self.hidden_dim, kernel_init=_DENSE_INIT, name="fc1")(x)
        y = nn.gelu(y, approximate=False)
        y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
        y = nn.Dense(dim, kernel_init=_DENSE_INIT, name="fc2")(y)
        return nn.Dropout(self.dropout_rate)(y, deterministic=not train)


class _Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` without layer scale or drop path)."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float
    attention_dropout_rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = nn.LayerNorm(epsilon=_EPSILON, name="norm1")(x)
        x = x + _Attention(
            self.num_heads, self.dropout_rate, self.attention_dropout_rate, name="attn"
        )(y, train=train)
        y = nn.LayerNorm(epsilon=_EPSILON, name="norm2")(x)
        return x + _Mlp(self.mlp_dim, self.dropout_rate, name="mlp")(y, train=train)
