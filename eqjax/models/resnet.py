"""ResNet-18 (He et al., 2016) in Flax, with timm/torchvision module names.

Two stems: ``imagenet`` (7x7 stride-2 conv1 + 3x3 stride-2 max-pool, as in
torchvision/timm ``resnet18``) and ``cifar`` (3x3 stride-1 conv1, no max-pool: the
usual CIFAR ResNet-18, 21 quantizable layers). Inputs are NHWC.

Module paths equal timm names: ``conv1``, ``bn1``, ``layer2.0.conv1``,
``layer2.0.downsample.0`` (1x1 conv), ``layer2.0.downsample.1`` (its BN), ``fc``.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# BasicBlock stage sizes per depth (He et al., 2016, Table 1).
STAGE_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)
BN_EPSILON = 1e-5  # PyTorch default
BN_MOMENTUM = 0.9  # = 1 - PyTorch's 0.1


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, dtype=dtype, name=name)


class Downsample(nn.Module):
    """1x1 strided conv + BN on the shortcut (timm ``downsample.0`` / ``downsample.1``)."""

    features: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.features, 1, self.stride, self.dtype, "0")(x)
        return _batch_norm(train, self.dtype, "1")(x)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual: ``relu(bn2(conv2(relu(bn1(conv1 x)))) + shortcut(x))``."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
        y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
        y = _batch_norm(train, self.dtype, "bn2")(y)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = Downsample(self.features, self.stride, self.dtype, name="downsample")(x, train)
        return nn.relu(y + shortcut)


class Stage(nn.Module):
    """``num_blocks`` BasicBlocks named ``0, 1, ...``; the first one strides."""

    features: int
    num_blocks: int
    stride: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i in range(self.num_blocks):
            x = BasicBlock(self.features, self.stride if i == 0 else 1, self.dtype, name=str(i))(x, train)
        return x


class ResNet(nn.Module):
    """ResNet with BasicBlocks.

    Attributes:
      num_classes: size of the ``fc`` output.
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      widths: channels per stage.
      stem: ``imagenet`` or ``cifar``.
      dtype: computation dtype (parameters stay float32).
    """

    num_classes: int = 1000
    stage_sizes: Sequence[int] = STAGE_SIZES[18]
    widths: Sequence[int] = WIDTHS
    stem: str = "imagenet"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[batch, H, W, 3] -> logits [batch, num_classes]."""
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        x = x.astype(self.dtype)
        if self.stem == "imagenet":
            x = _conv(self.widths[0], 7, 2, self.dtype, "conv1")(x)
        else:
            x = _conv(self.widths[0], 3, 1, self.dtype, "conv1")(x)
        x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            x = Stage(width, blocks, 1 if i == 0 else 2, self.dtype, name=f"layer{i + 1}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)


resnet18 = partial(ResNet, stage_sizes=STAGE_SIZES[18], stem="imagenet")
resnet18_cifar = partial(ResNet, stage_sizes=STAGE_SIZES[18], stem="cifar")
