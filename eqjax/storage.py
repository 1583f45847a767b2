"""Files eqjax writes for itself to read back: written atomically, read back exactly or not at all.

* :func:`write_atomic` / :func:`staged_directory`: a file or a folder is written under a temporary
  name beside its final one and renamed into place, so a process killed at any point leaves
  either the old content or the new one, never a mix.
* :func:`tree_digest` / :func:`verify_tree`: an XXH3-128 digest per array (over its dtype, shape
  and bytes), written after the data and checked after reading it. A truncated, damaged or partly
  missing file raises :class:`CorruptFileError` naming the file and the first array at fault,
  instead of handing back arrays that are not the ones written.
* :func:`save_tree` / :func:`load_tree`: an array tree (orbax) plus a JSON of metadata that also
  holds the tree's digests and one of the metadata itself; what the converted weights, the QAT
  and reconstruction states are stored as.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from typing import Any, Callable, Iterator

import jax
import numpy as np

INTEGRITY_KEY = "integrity"


class CorruptFileError(ValueError):
    """A file eqjax wrote does not read back as it was written (truncated, damaged, parts missing)."""


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
            old = tempfile.mkdtemp(prefix=".eqjax_old_", dir=parent)
            os.replace(directory, os.path.join(old, "d"))  # the new folder goes in by one rename
            os.replace(staging, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
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


DIGEST = "xxh3_128"  # of every array and of the metadata (xxhash: 12 GB/s on one core, SHA-256 1.4)


def array_digest(array: Any) -> str:
    """XXH3-128 (hex) of an array's dtype, shape and C-order bytes (hashed in place, no copy)."""
    import xxhash

    array = np.asarray(array)
    digest = xxhash.xxh3_128(f"{array.dtype.str}{list(array.shape)}".encode())
    digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _path_name(path) -> str:
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)


def tree_digest(tree: Any) -> dict[str, str]:
    """``{'a/b/c': array_digest}`` for every leaf of ``tree`` (dict keys, attribute names and
    sequence indices joined by '/', so a tree read back as plain dicts has the same names)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {_path_name(path): array_digest(leaf) for path, leaf in leaves}


def json_digest(obj: Any) -> str:
    """XXH3-128 of ``obj`` as canonical JSON (sorted keys), as it reads back from a JSON file."""
    import xxhash

    canonical = json.loads(json.dumps(obj, default=str))
    return xxhash.xxh3_128(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def verify_tree(tree: Any, expected: dict[str, str], *, where: str) -> None:
    """Raises :class:`CorruptFileError` naming ``where`` and the first array of ``tree`` whose
    content, dtype or shape is not the one :func:`tree_digest` recorded, or that is missing or extra."""
    found = tree_digest(tree)
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        listing = ", ".join([f"{n} missing" for n in missing[:3]] + [f"{n} unexpected" for n in extra[:3]])
        raise CorruptFileError(f"{where} is damaged: {listing}")
    for name, digest in expected.items():
        if found[name] != digest:
            raise CorruptFileError(f"{where} is damaged: array {name!r} does not match its digest "
                                   "(truncated or changed since it was written)")


def with_json_digest(payload: dict[str, Any]) -> dict[str, Any]:
    """``payload`` plus an :data:`INTEGRITY_KEY` entry holding its own digest (for JSON files)."""
    return {**payload, INTEGRITY_KEY: {"digest": DIGEST, "meta": json_digest(payload)}}


def without_json_digest(payload: dict[str, Any], *, where: str) -> dict[str, Any]:
    """``payload`` without its integrity entry, checked against it; a payload without one (written
    by hand, or before eqjax kept digests) is returned as it is.

    Raises:
      CorruptFileError: the content differs from what was written (names ``where``).
    """
    payload = dict(payload)
    integrity = payload.pop(INTEGRITY_KEY, None)
    if integrity is not None and (not isinstance(integrity, dict) or json_digest(payload) != integrity.get("meta")):
        raise CorruptFileError(f"{where} does not match its digest: changed since eqjax wrote it (if on purpose, "
                               f"delete its {INTEGRITY_KEY!r} entry)")
    return payload


def read_json_object(path: str, *, where: str, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` without its integrity entry (:func:`without_json_digest`).

    Raises:
      ValueError: no such file, not JSON, or not an object (each names ``where`` and ``what`` the
        file should be); :class:`CorruptFileError` when it differs from what was written.
    """
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where} is not {what} ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{where} is not {what} (not a JSON object)")
    return without_json_digest(payload, where=where)


def with_integrity(meta: dict[str, Any], tree: Any) -> dict[str, Any]:
    """``meta`` plus its :data:`INTEGRITY_KEY` entry: the digests of ``tree`` and of ``meta`` itself."""
    return {**meta, INTEGRITY_KEY: {"digest": DIGEST, "arrays": tree_digest(tree), "meta": json_digest(meta)}}


def check_integrity(meta: dict[str, Any], tree: Any, *, where: str) -> dict[str, Any]:
    """``meta`` without its integrity entry, after checking ``tree`` and ``meta`` against it.

    Metadata written before eqjax kept digests (no entry) is accepted with a warning that it
    cannot be checked.

    Raises:
      CorruptFileError: the metadata or an array differs from what was written.
    """
    meta = dict(meta)
    integrity = meta.pop(INTEGRITY_KEY, None)
    if integrity is None:
        warnings.warn(f"{where} was written without digests: it cannot be checked to be intact "
                      "(save it again to add them)", stacklevel=3)
        return meta
    if isinstance(integrity, dict) and integrity.get("digest", DIGEST) != DIGEST:
        raise CorruptFileError(f"{where} holds {integrity.get('digest')!r} digests; this eqjax checks {DIGEST!r}")
    if not isinstance(integrity, dict) or json_digest(meta) != integrity.get("meta"):
        raise CorruptFileError(f"{where} is damaged: its metadata does not match its digest")
    verify_tree(tree, integrity.get("arrays") or {}, where=where)
    return meta


def save_tree(directory: str, tree: Any, meta: dict[str, Any], *, meta_file: str,
              arrays_dir: str = "arrays") -> str:
    """Writes ``tree`` (orbax, under ``arrays_dir``) and then ``meta`` with the digests (JSON
    ``meta_file``) into ``directory``, atomically (a staged folder renamed into place)."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    tree = jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    with staged_directory(directory) as staging:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(staging, arrays_dir), tree)
        checkpointer.wait_until_finished()
        with open(os.path.join(staging, meta_file), "w") as f:
            json.dump(with_integrity(meta, tree), f, indent=1, default=str)
    return directory


def read_json(path: str, *, what: str) -> Any:
    """A JSON file eqjax wrote; a file that is not JSON raises :class:`CorruptFileError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is corrupt: not JSON ({e}); it should hold {what}") from None


def load_tree(directory: str, *, meta_file: str, arrays_dir: str = "arrays", what: str,
              check_meta: Callable[[str, Any], None] | None = None) -> tuple[Any, dict]:
    """``(tree, meta)`` of :func:`save_tree`, checked against the digests; ``check_meta(meta_path,
    meta)``, when given, may refuse the metadata as read, before any array is.

    Raises:
      FileNotFoundError: no ``meta_file`` in ``directory`` (it holds no ``what``).
      CorruptFileError: metadata that is not JSON, arrays orbax cannot read, or content that is
        not what was written (each names the file).
    """
    import orbax.checkpoint as ocp

    directory = os.path.abspath(directory)
    meta_path = os.path.join(directory, meta_file)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} holds no {what} (no {meta_file})")
    meta = read_json(meta_path, what=what)
    if check_meta is not None:
        check_meta(meta_path, meta)
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{meta_path} is corrupt: not the JSON object of {what}")
    arrays_path = os.path.join(directory, arrays_dir)
    with quiet_orbax_errors():
        try:
            tree = ocp.StandardCheckpointer().restore(arrays_path)
        except Exception as e:  # orbax raises many types for missing or corrupt files
            raise CorruptFileError(f"cannot read the arrays in {arrays_path} "
                                   f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return tree, check_integrity(meta, tree, where=directory)


@contextlib.contextmanager
def quiet_orbax_errors():
    """Orbax and asyncio log a traceback per failed read of a corrupt checkpoint; the caller
    reports the failure in one line instead."""
    import logging

    loggers = [logging.getLogger(n) for n in ("asyncio", "absl")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
