"""Reading checkpoints: .pth/.pt/.bin (torch), .safetensors, and timm's hub."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eqjax import models
from weights_convert.core import unwrap_state_dict

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{name: float32 array}`` from a ``.safetensors`` file or a torch file.

    Torch files are read with ``torch.load(weights_only=True)``: no code in the file runs.

    Raises:
      FileNotFoundError: no such file.
      ValueError: an unknown file suffix.
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
        return unwrap_state_dict(load_file(path))
    if path.endswith(TORCH_SUFFIXES):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs PyTorch: pip install -e '.[convert]'") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
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
