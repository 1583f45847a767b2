"""Reading checkpoints: .pth/.pt/.bin (torch), .safetensors, and timm's hub."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from eqjax import models
from weights_convert.core import unwrap_state_dict

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
PREPROCESSING_FIELDS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def preprocessing_beside(model: str, path: str | os.PathLike) -> tuple[models.Preprocessing | None, str]:
    """``(preprocessing, json_path)`` from the JSON beside a raw state_dict file (``FILE.json`` for
    ``FILE.safetensors``); the preprocessing is None when there is no such file.

    The JSON holds ``mean`` and ``std`` (3 values each) and optionally ``input_size``,
    ``crop_pct``, ``interpolation``, at its top level (as the shared ResNet-18's
    ``resnet18_cifar10.json``) or under ``preprocessing``; fields it lacks keep ``model``'s defaults.

    Raises:
      ValueError: a JSON that is not JSON, lacks mean or std, or has unusable values (names it).
    """
    path = os.fspath(path)
    beside = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(beside):
        return None, beside
    what = f"{beside} (the preprocessing of {path})"
    try:
        with open(beside) as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} is not JSON ({e})") from None
    fields = fields.get("preprocessing", fields) if isinstance(fields, dict) else None
    if not isinstance(fields, dict) or not {"mean", "std"} <= set(fields):
        raise ValueError(f'{what} needs "mean" and "std" (3 values each)')
    merged = {**models.get(model).preprocessing.to_dict(),
              **{k: fields[k] for k in PREPROCESSING_FIELDS if k in fields}}
    try:
        return models.Preprocessing.from_dict(merged), beside
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: {e}") from None


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` from a ``.safetensors`` file or a torch file.

    Torch files are read with ``torch.load(weights_only=True)``: no code in the file runs.

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unknown file suffix, or a file that is not what its suffix says.
      ImportError: torch (or safetensors) is not installed (extra ``convert``).
      TypeError: the file does not hold a state_dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors needs `pip install safetensors` "
                              "(extra 'convert')") from e
        try:
            tensors = load_file(path)
        except Exception as e:  # the library's own errors ("header too large", ...) name no file
            raise ValueError(f"{path} is not a readable safetensors file (truncated, or not safetensors: "
                             f"{' '.join(str(e).split())[:120]})") from None
        return unwrap_state_dict(tensors)
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyTorch: pip install -e '.[convert]'") from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle / zip errors name no file
            raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:120]})") from None
        return unwrap_state_dict(obj)
    raise ValueError(f"unknown checkpoint format {path!r}: expected .safetensors or one of "
                     f"{', '.join(TORCH_SUFFIXES)}")


def timm_state_dict(name: str, *, pretrained: bool = True, **timm_kwargs: Any) -> dict[str, np.ndarray]:
    """State dict of the timm model that matches ``eqjax.models.get(name)``.

    ``pretrained=True`` downloads from timm's hub (needs network access).
    """
    spec = models.get(name)
    if spec.timm_name is None:
        raise ValueError(f"model {name!r} has no timm counterpart; convert a local checkpoint instead")
    try:
        import timm
    except ImportError as e:
        raise ImportError("timm weights need `pip install -e '.[convert]'`") from e
    model = timm.create_model(spec.timm_name, pretrained=pretrained, **timm_kwargs)
    return unwrap_state_dict(model.state_dict())


def timm_preprocessing(name: str) -> models.Preprocessing:
    """Preprocessing from timm's ``pretrained_cfg`` of the matching architecture."""
    import timm

    spec = models.get(name)
    cfg = timm.get_pretrained_cfg(spec.timm_name).to_dict()
    return models.Preprocessing(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]),
                                float(cfg.get("crop_pct", 1.0)), str(cfg.get("interpolation", "bicubic")))
