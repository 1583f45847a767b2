"""Converted weights on disk: Flax variables (orbax) plus the model name and preprocessing.

A checkpoint directory holds ``variables/`` (an orbax ``StandardCheckpointer`` tree)
and ``eqjax_checkpoint.json`` (model, num_classes, preprocessing, source). It is
written to a temporary sibling and renamed into place, so an interrupted save never
leaves a half-written directory under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from eqjax import models

METADATA_FILE = "eqjax_checkpoint.json"
VARIABLES_DIR = "variables"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint."""

    model: str
    num_classes: int
    preprocessing: models.Preprocessing
    variables: Any
    source: str = ""


def save(directory: str | os.PathLike, variables: Any, *, model: str, num_classes: int,
         preprocessing: models.Preprocessing, source: str = "", overwrite: bool = False) -> str:
    """Writes ``variables`` and metadata to ``directory`` atomically; returns its absolute path.

    Raises:
      FileExistsError: ``directory`` exists and ``overwrite`` is False.
      KeyError: unknown model name.
    """
    models.get(model)
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"checkpoint directory {directory} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".eqjax_ckpt_", dir=parent)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR),
                          jax.tree_util.tree_map(np.asarray, variables))
        checkpointer.wait_until_finished()
        metadata = {"format_version": FORMAT_VERSION, "model": model, "num_classes": int(num_classes),
                    "preprocessing": preprocessing.to_dict(), "source": source}
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=1)
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), METADATA_FILE))


def load(directory: str | os.PathLike) -> Checkpoint:
    """Reads a directory written by :func:`save` (e.g. by ``python -m weights_convert``).

    Raises:
      FileNotFoundError: not a checkpoint directory.
      ValueError: metadata of an unknown format.
    """
    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not an eqjax checkpoint (no {METADATA_FILE})")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    variables = ocp.StandardCheckpointer().restore(os.path.join(directory, VARIABLES_DIR))
    return Checkpoint(meta["model"], int(meta["num_classes"]),
                      models.Preprocessing.from_dict(meta["preprocessing"]), variables,
                      meta.get("source", ""))
