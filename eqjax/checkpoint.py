"""Converted weights on disk: Flax variables (orbax) plus the model name and preprocessing.

A checkpoint directory holds ``variables/`` (an orbax ``StandardCheckpointer`` tree)
and ``eqjax_checkpoint.json`` (model, num_classes, preprocessing, source, and the digests of
every array and of itself, written after the arrays: :mod:`eqjax.storage`). It is written to a
temporary sibling and renamed into place, so an interrupted save never leaves a half-written
directory under the final name, and :func:`load` reads back exactly what was saved or raises.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from eqjax import models, storage

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
    metadata = {"format_version": FORMAT_VERSION, "model": model, "num_classes": int(num_classes),
                "preprocessing": preprocessing.to_dict(), "source": source}
    storage.save_tree(directory, variables, metadata, meta_file=METADATA_FILE, arrays_dir=VARIABLES_DIR)
    return directory


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), METADATA_FILE))


def _check_metadata(meta_path: str, meta: Any) -> None:
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("model", "num_classes", "preprocessing") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} is corrupt: no {', '.join(missing)}")


def load(directory: str | os.PathLike) -> Checkpoint:
    """Reads a directory written by :func:`save` (e.g. by ``python -m weights_convert``).

    Raises:
      FileNotFoundError: not a checkpoint directory.
      ValueError: metadata that is not JSON, of an unknown format, or lacking a field;
        variables that orbax cannot read, or that are not the ones saved
        (:class:`eqjax.storage.CorruptFileError`; each names the file).
    """
    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not an eqjax checkpoint (no {METADATA_FILE})")
    variables, meta = storage.load_tree(directory, meta_file=METADATA_FILE, arrays_dir=VARIABLES_DIR,
                                        what="an eqjax checkpoint", check_meta=_check_metadata)
    return Checkpoint(meta["model"], int(meta["num_classes"]),
                      models.Preprocessing.from_dict(meta["preprocessing"]), variables,
                      meta.get("source", ""))
