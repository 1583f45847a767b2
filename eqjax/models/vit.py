"""Vision Transformer / DeiT (Dosovitskiy et al., 2021; Touvron et al., 2021) in Flax.

Matches timm ``VisionTransformer`` with class token, learned position embedding,
pre-norm blocks, LayerNorm eps 1e-6 and exact (erf) GELU; module paths equal timm
names (``patch_embed.proj``, ``blocks.8.mlp.fc2``, ``head``). The attention matmuls
QK^T and softmax·V run through :class:`eqjax.quant.intercept.ActivationMatmul`
(``blocks.N.attn.qk_matmul`` / ``blocks.N.attn.av_matmul``) so quantization sees them.
Inputs are NHWC.

Variants (DeiT paper, Table 1):
| variant | dim | depth | heads | MLP |
| tiny    | 192 | 12    | 3     | 768 |
| small   | 384 | 12    | 6     | 1536 |
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqjax.quant.intercept import ActivationMatmul

VARIANTS = {"tiny": dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
            "small": dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)}
LN_EPSILON = 1e-6


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention: qkv Dense, scaled QK^T, softmax, ·V, proj Dense."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, tokens, dim] -> [batch, tokens, dim]."""
        batch, tokens, dim = x.shape
        head_dim = dim // self.num_heads
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [batch, tokens, heads, head_dim]
        q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
        scores = ActivationMatmul("bqhd,bkhd->bhqk", name="qk_matmul")(q, k)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        out = ActivationMatmul("bhqk,bkhd->bqhd", name="av_matmul")(weights, v)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out.reshape(batch, tokens, dim))


class Mlp(nn.Module):
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = nn.gelu(nn.Dense(self.hidden_dim, dtype=self.dtype, name="fc1")(x), approximate=False)
        return nn.Dense(dim, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1 x)``, then ``x + mlp(norm2 x)``."""

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + Attention(self.num_heads, self.dtype, name="attn")(_layer_norm(self.dtype, "norm1")(x))
        return x + Mlp(self.mlp_dim, self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))


class Blocks(nn.Module):
    """``depth`` blocks named ``0, 1, ...`` (timm's ``blocks`` Sequential)."""

    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = Block(self.num_heads, self.mlp_dim, self.dtype, name=str(i))(x)
        return x


class PatchEmbed(nn.Module):
    patch_size: int
    embed_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """[batch, H, W, C] -> [batch, (H/p)(W/p), dim], patches in row-major order."""
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="proj")(x)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nn.Module):
    """ViT/DeiT classifier with a class token (timm ``global_pool='token'``).

    Attributes:
      num_classes: size of the ``head`` output.
      image_size: input height = width (sets the number of position embeddings).
      patch_size, embed_dim, depth, num_heads, mlp_ratio: the architecture.
      dtype: computation dtype (parameters, softmax and LayerNorm statistics float32).
    """

    num_classes: int = 1000
    image_size: int = 224
    patch_size: int = 16
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[batch, image_size, image_size, 3] -> logits [batch, num_classes]."""
        del train  # no dropout or batch statistics at inference
        if x.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected inputs of size {self.image_size}x{self.image_size}, "
                             f"got {x.shape[1]}x{x.shape[2]}")
        x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(x.astype(self.dtype))
        num_patches = (self.image_size // self.patch_size) ** 2
        cls_token = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.embed_dim))
        pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                               (1, num_patches + 1, self.embed_dim))
        cls = jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, self.embed_dim))
        x = jnp.concatenate([cls, x], axis=1) + pos_embed.astype(self.dtype)
        x = Blocks(self.depth, self.num_heads, int(self.embed_dim * self.mlp_ratio), self.dtype,
                   name="blocks")(x)
        x = _layer_norm(self.dtype, "norm")(x)
        return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])


deit_tiny = partial(VisionTransformer, image_size=224, patch_size=16, **VARIANTS["tiny"])
# DeiT-Tiny widths on 32x32 CIFAR images with 4x4 patches (64 tokens + class token).
vit_tiny_cifar = partial(VisionTransformer, image_size=32, patch_size=4, **VARIANTS["tiny"])
