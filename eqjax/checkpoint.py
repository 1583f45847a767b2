"""Converted weights on disk: Flax variables (orbax) plus the model name and preprocessing.

A checkpoint directory holds ``variables/`` (an orbax ``StandardCheckpointer`` tree)
and ``eqjax_checkpoint.json`` (model, num_classes, preprocessing, source). It is
written to a temporary sibling and renamed into place, so an interrupted save never
leaves a half-written directory under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator

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


@contextlib.contextmanager
def staged_directory(directory: str) -> Iterator[str]:
    """A temporary sibling of ``directory`` to write into; when the block ends without an error it
    replaces ``directory`` by a rename (never half-written under the final name), else it is removed."""
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".eqjax_staging_", dir=parent)
    try:
        yield staging
        if os.path.exists(directory):
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_atomic(path: str, write: Callable[[str], None]) -> str:
    """``write(temporary path)`` in ``path``'s folder, then a rename onto ``path`` (never half-written
    under its name), with an ordinary file's permissions (``mkstemp`` makes 0600); returns ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=os.path.splitext(path)[1], dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


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
    with staged_directory(directory) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, VARIABLES_DIR),
                          jax.tree_util.tree_map(np.asarray, variables))
        checkpointer.wait_until_finished()
        metadata = {"format_version": FORMAT_VERSION, "model": model, "num_classes": int(num_classes),
                    "preprocessing": preprocessing.to_dict(), "source": source}
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=1)
    return directory


def is_checkpoint(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), METADATA_FILE))


def load(directory: str | os.PathLike) -> Checkpoint:
    """Reads a directory written by :func:`save` (e.g. by ``python -m weights_convert``).

    Raises:
      FileNotFoundError: not a checkpoint directory.
      ValueError: metadata that is not JSON, of an unknown format, or lacking a field;
        variables that orbax cannot read (each names the file).
    """
    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not an eqjax checkpoint (no {METADATA_FILE})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path} is corrupt: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    missing = [k for k in ("model", "num_classes", "preprocessing") if k not in meta]
    if missing:
        raise ValueError(f"{meta_path} is corrupt: no {', '.join(missing)}")
    variables_path = os.path.join(directory, VARIABLES_DIR)
    try:
        variables = ocp.StandardCheckpointer().restore(variables_path)
    except Exception as e:  # orbax raises many types for missing or corrupt files
        raise ValueError(f"cannot read the variables in {variables_path} "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return Checkpoint(meta["model"], int(meta["num_classes"]),
                      models.Preprocessing.from_dict(meta["preprocessing"]), variables,
                      meta.get("source", ""))
