"""timm weights from the Hugging Face hub without PyTorch: ``model.safetensors`` + ``config.json``.

timm publishes its pretrained weights as hub repos (``timm/deit_tiny_patch16_224.fb_in1k``)
holding ``model.safetensors`` (the timm state_dict) and ``config.json`` (the architecture and
its ``pretrained_cfg``: input size, mean, std, crop_pct, interpolation). Both are fetched
with ``huggingface_hub`` into the standard cache (``HF_HOME``, ``HF_HUB_CACHE``), which
honours ``HF_HUB_OFFLINE=1`` and revisions, and read with ``safetensors.numpy``: no torch.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from eqjax import models

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# The hub repo of each registry model's published ImageNet weights (timm's default tag).
DEFAULT_REPOS = {
    "deit_tiny": "timm/deit_tiny_patch16_224.fb_in1k",
    "resnet18": "timm/resnet18.a1_in1k",
}


class HubWeightsUnavailable(FileNotFoundError):
    """The weights are neither in the local hub cache nor reachable on the hub."""


def parse_repo(text: str) -> tuple[str, str | None]:
    """``'REPO[@REV]'`` -> ``(repo_id, revision or None)``.

    Raises:
      ValueError: not of the form ``owner/name[@revision]``.
    """
    repo, at, revision = text.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")) or (at and not revision):
        raise ValueError(f"hub weights must be named owner/name[@revision], got {text!r}")
    return repo, revision or None


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def download(repo_id: str, revision: str | None = None) -> tuple[str, str]:
    """Paths of ``model.safetensors`` and ``config.json`` of ``repo_id`` in the local hub cache,
    fetched first when online.

    Raises:
      ImportError: huggingface_hub is not installed.
      HubWeightsUnavailable: offline (or unreachable) and not cached; the message says what
        is missing and the two ways out.
    """
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError as e:
        raise ImportError("hub weights need `pip install huggingface_hub safetensors`") from e
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    paths = []
    for filename in (WEIGHTS_FILE, CONFIG_FILE):
        try:
            paths.append(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
        except errors.LocalEntryNotFoundError:
            offline = huggingface_hub.constants.is_offline_mode()
            raise HubWeightsUnavailable(
                f"{filename} of hub repo {where} is not in the Hugging Face cache ({_cache_dir()}) "
                f"and the hub {'is switched off (HF_HUB_OFFLINE=1)' if offline else 'cannot be reached'}. "
                "Either run once with network access to cache it, or pass local weights "
                "(--weights=FILE.safetensors|FILE.pth|DIR)") from None
        except errors.RepositoryNotFoundError:
            raise HubWeightsUnavailable(f"no hub repo {repo_id!r} (or it is private)") from None
        except errors.RevisionNotFoundError:
            raise HubWeightsUnavailable(f"hub repo {repo_id!r} has no revision {revision!r}") from None
        except errors.EntryNotFoundError:
            raise HubWeightsUnavailable(f"hub repo {where} has no {filename}: not a timm-format repo") from None
    return paths[0], paths[1]


def preprocessing_from_config(config: dict[str, Any], *, default: models.Preprocessing) -> models.Preprocessing:
    """The :class:`eqjax.models.Preprocessing` of a timm ``config.json`` (its ``pretrained_cfg``)."""
    cfg = config.get("pretrained_cfg", config)
    return models.Preprocessing(
        int(cfg.get("input_size", (3, default.input_size))[-1]),
        tuple(float(v) for v in cfg.get("mean", default.mean)),
        tuple(float(v) for v in cfg.get("std", default.std)),
        float(cfg.get("crop_pct", default.crop_pct)),
        str(cfg.get("interpolation", default.interpolation)))


def load_timm_weights(model: str, repo: str | None = None) -> tuple[dict[str, np.ndarray], models.Preprocessing, str]:
    """``(state_dict, preprocessing, source)`` of a timm-format hub repo for registry ``model``.

    Args:
      model: registry name (its spec gives the default preprocessing).
      repo: ``owner/name[@revision]``; None = the model's published weights
        (:data:`DEFAULT_REPOS`).

    Raises:
      ValueError: no default repo for the model, or a config.json for another architecture.
      HubWeightsUnavailable: see :func:`download`.
    """
    spec = models.get(model)
    if repo is None:
        if model not in DEFAULT_REPOS:
            raise ValueError(f"model {model!r} has no published hub weights; pass a checkpoint "
                             "directory, a .safetensors/.pth file or hf:OWNER/NAME")
        repo = DEFAULT_REPOS[model]
    repo_id, revision = parse_repo(repo)
    weights_path, config_path = download(repo_id, revision)
    with open(config_path) as f:
        config = json.load(f)
    architecture = config.get("architecture")
    if spec.timm_name and architecture and architecture != spec.timm_name:
        raise ValueError(f"hub repo {repo} holds a {architecture!r}, but model {model!r} is timm's "
                         f"{spec.timm_name!r}")
    from safetensors.numpy import load_file

    source = f"hf:{repo_id}" + (f"@{revision}" if revision else "") + f" ({os.path.dirname(weights_path)})"
    return load_file(weights_path), preprocessing_from_config(config, default=spec.preprocessing), source
