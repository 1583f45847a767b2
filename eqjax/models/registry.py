"""Model registry: a short name -> Flax constructor, preprocessing and quantizable layers."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqjax.quant import intercept
from eqjax.models import efficientnet, resnet, vit

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images are turned into model inputs (timm's ``pretrained_cfg`` fields).

    Resize the shorter side to ``input_size / crop_pct`` with ``interpolation``,
    centre-crop ``input_size``, scale to [0, 1], then ``(x - mean) / std``.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values, std > 0; got {self.mean}, {self.std}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]), float(d["crop_pct"]),
                   str(d["interpolation"]))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything eqjax knows about a registered model.

    Attributes:
      name: registry name.
      constructor: ``constructor(num_classes=..., **overrides)`` -> Flax module.
      num_classes: default number of classes.
      preprocessing: default preprocessing (converted checkpoints carry their own).
      classifier: timm name of the final layer (``fc``, ``head``, ``classifier``).
      timm_name: the timm architecture with the same parameters, if any.
      description: one line.
      block_types: the module classes that are the model's blocks (units of block
        reconstruction, BRECQ): BasicBlock, MBConv blocks, transformer blocks.
      equalization: ``module -> (module variant, pairs)`` for cross-layer equalization
        (:mod:`eqjax.quant.equalization`), None where the model has no pairs defined.
    """

    name: str
    constructor: Callable[..., nn.Module]
    num_classes: int
    preprocessing: Preprocessing
    classifier: str
    timm_name: str | None
    description: str
    block_types: tuple[type, ...] = ()
    equalization: Callable[[nn.Module], tuple[nn.Module, list]] | None = None

    def is_block(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this model's blocks."""
        return isinstance(module, self.block_types)

    @property
    def input_size(self) -> int:
        return self.preprocessing.input_size

    def build(self, *, num_classes: int | None = None, **overrides) -> nn.Module:
        """The Flax module; ``overrides`` change constructor fields (tiny test variants)."""
        return self.constructor(num_classes=num_classes or self.num_classes, **overrides)

    def example_input(self, batch_size: int = 1, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
        """Shape of a batch of inputs: [batch, input_size, input_size, 3]."""
        return jax.ShapeDtypeStruct((batch_size, self.input_size, self.input_size, 3), dtype)

    def init(self, key: jax.Array, *, num_classes: int | None = None, **overrides) -> Any:
        """Randomly initialised variables (``params`` and, for CNNs, ``batch_stats``)."""
        model = self.build(num_classes=num_classes, **overrides)
        return jax.jit(model.init)(key, jnp.zeros(self.example_input().shape, jnp.float32))

    def trace(self, *, batch_size: int = 1, num_classes: int | None = None,
              **overrides) -> list[intercept.LayerCall]:
        """Quantizable layer calls in forward order, traced abstractly (no compute)."""
        return list(_trace(self, batch_size, num_classes or self.num_classes,
                           tuple(sorted(overrides.items()))))

    def quantizable_layers(self, **overrides) -> tuple[str, ...]:
        """timm names of the conv/dense layers in forward order (the study's "layers")."""
        return intercept.weighted_layer_names(self.trace(**overrides))

    def first_and_last_layers(self, **overrides) -> tuple[str, str]:
        """The layers the study keeps at 8 bits: the first and the last."""
        names = self.quantizable_layers(**overrides)
        return names[0], names[-1]


@functools.lru_cache(maxsize=32)
def _trace(spec: ModelSpec, batch_size: int, num_classes: int, overrides: tuple) -> tuple:
    model = spec.build(num_classes=num_classes, **dict(overrides))
    return tuple(intercept.trace_layers(model, spec.example_input(batch_size)))


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def names() -> tuple[str, ...]:
    """Registered model names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> ModelSpec:
    """The :class:`ModelSpec` registered as ``name``.

    Raises:
      KeyError: unknown name (the message lists the known ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


register(ModelSpec(
    "resnet18_cifar", resnet.resnet18_cifar, 100,
    Preprocessing(32, CIFAR100_MEAN, CIFAR100_STD, 1.0, "bilinear"), "fc", None,
    "ResNet-18, CIFAR stem (3x3 stride-1 conv1, no max-pool), 21 quantizable layers", (resnet.BasicBlock,)))
register(ModelSpec(
    "resnet18", resnet.resnet18, 1000,
    Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 0.95, "bicubic"), "fc", "resnet18",
    "ResNet-18, ImageNet stem (timm/torchvision resnet18)", (resnet.BasicBlock,)))
register(ModelSpec(
    "deit_tiny", vit.deit_tiny, 1000,
    Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 0.9, "bicubic"), "head", "deit_tiny_patch16_224",
    "DeiT-Tiny, patch 16, 224x224 (timm deit_tiny_patch16_224)", (vit.Block,)))
register(ModelSpec(
    "vit_tiny_cifar", vit.vit_tiny_cifar, 100,
    Preprocessing(32, CIFAR100_MEAN, CIFAR100_STD, 1.0, "bilinear"), "head", None,
    "DeiT-Tiny widths with 4x4 patches on 32x32 CIFAR images", (vit.Block,)))
register(ModelSpec(
    "efficientnet_lite0", efficientnet.efficientnet_lite0, 1000,
    # The PyPI package's preprocessing: (x - 127) / 128 after resize 256, centre crop 224.
    Preprocessing(224, (127 / 255,) * 3, (128 / 255,) * 3, 224 / 256, "bilinear"), "classifier",
    "tf_efficientnet_lite0",
    "EfficientNet-Lite0 (TF same padding, ReLU6; timm tf_efficientnet_lite0)",
    (efficientnet.DepthwiseSeparable, efficientnet.InvertedResidual), efficientnet.equalization_pairs))
