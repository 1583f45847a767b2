"""Datasets by spec string, model-driven preprocessing, and batching. No TensorFlow needed.

Spec strings (the same for every script's ``--dataset`` / ``--calib_dataset``):

* ``folder:DIR`` — images in class sub-folders (class index = sorted folder order), or
  a flat folder with ``DIR/labels.txt`` of ``<file> <index>`` lines;
* ``tar:FILE`` — an uncompressed tar with members ``<split>/<class>/<file>`` (class
  index = sorted class order; CIFAR-10/100 class orders are alphabetical);
* ``tfds:NAME[/CONFIG][:SPLIT]`` — a prepared TFDS dataset read with
  ``tfds.data_source`` (array_record format; preparing one needs TensorFlow);
* ``pkg:foolbox_imagenet`` — the 20 labelled ImageNet photos that ship in PyPI
  ``foolbox==3.3.4``; ``pkg:skimage`` — the natural sample photos that ship in
  ``scikit-image`` (unlabelled: calibration only). Demonstration-sized, offline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
import tarfile
from typing import Iterator, Protocol, Sequence

import numpy as np
from PIL import Image

from eqjax.models import Preprocessing

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_PIL_INTERPOLATION = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A parsed spec string: ``kind`` in tfds/folder/tar/pkg, ``path`` (dir, file or name)."""

    kind: str
    path: str
    config: str | None = None
    split: str | None = None

    def __str__(self) -> str:
        if self.kind != "tfds":
            return f"{self.kind}:{self.path}"
        name = self.path + (f"/{self.config}" if self.config else "")
        return f"tfds:{name}" + (f":{self.split}" if self.split else "")


def parse_spec(text: str, *, name: str = "dataset") -> DatasetSpec:
    """Parses ``tfds:NAME[/CONFIG][:SPLIT]``, ``folder:DIR`` or ``tar:FILE``.

    Raises:
      ValueError: the text does not parse (the message names ``name`` and the value).
    """
    kind, sep, rest = str(text).partition(":")
    if not sep or not rest or kind not in ("tfds", "folder", "tar", "pkg"):
        raise ValueError(f"{name}={text!r} does not parse: expected tfds:NAME[/CONFIG][:SPLIT], "
                         f"folder:DIR, tar:FILE or pkg:{{{','.join(PACKAGE_DATASETS)}}}")
    if kind == "pkg" and rest not in PACKAGE_DATASETS:
        raise ValueError(f"{name}={text!r}: unknown package dataset {rest!r}; "
                         f"known: {', '.join(PACKAGE_DATASETS)}")
    if kind != "tfds":
        return DatasetSpec(kind, rest)
    name, _, split = rest.partition(":")
    name, _, config = name.partition("/")
    if not name:
        raise ValueError(f"{name}={text!r}: empty TFDS dataset name")
    return DatasetSpec("tfds", name, config or None, split or None)


class ImageSource(Protocol):
    """Random access to labelled images."""

    spec: DatasetSpec
    labels: np.ndarray   # [N] int
    ids: Sequence[str]   # [N] stable identifiers (file names), for disjointness checks

    def __len__(self) -> int: ...

    def load(self, index: int) -> Image.Image: ...


def _read_labels_txt(path: str) -> list[tuple[str, int]]:
    entries = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ValueError(f"{path}:{line_no}: expected '<file> <class index>', got {line.strip()!r}")
            entries.append((parts[0], int(parts[1])))
    return entries


CLASS_NAME_FILES = ("classes.txt", "synsets.txt", "synset_words.txt")


def find_class_names(root: str) -> str | None:
    """The class-names file of a class-folder dataset: the first of :data:`CLASS_NAME_FILES` in
    ``root`` or its parent (one class per line in the model's index order; the first word
    of a line is the folder name, as in ImageNet's ``synset_words.txt``)."""
    for folder in (root, os.path.dirname(os.path.abspath(root))):
        for name in CLASS_NAME_FILES:
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    return None


def class_indices(names_file: str, classes: Sequence[str]) -> dict[str, int]:
    """``{folder: index}`` by the line of each folder name in ``names_file``.

    Raises:
      ValueError: folders the file does not list (a count and the first ones).
    """
    with open(names_file) as f:
        names = [line.split()[0] for line in f if line.strip()]
    index = {n: i for i, n in enumerate(names)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise ValueError(f"{len(unknown)} class folders are not listed in {names_file} "
                         f"(e.g. {', '.join(unknown[:3])}): their labels cannot be known")
    return {c: index[c] for c in classes}


class FolderSource:
    """``folder:DIR``: class sub-folders, or flat files listed in ``DIR/labels.txt``.

    Class folders get indices in sorted order, or by a class-names file
    (:func:`find_class_names`) when there is one.
    """

    classes: Sequence[str] | None = None  # the class folders (None with labels.txt)
    class_names_file: str | None = None

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        root = spec.path
        if not os.path.isdir(root):
            raise FileNotFoundError(f"dataset directory not found: {root} (from {spec})")
        labels_txt = os.path.join(root, "labels.txt")
        if os.path.isfile(labels_txt):
            entries = _read_labels_txt(labels_txt)
            missing = [f for f, _ in entries if not os.path.isfile(os.path.join(root, f))]
            if missing:
                raise FileNotFoundError(f"{labels_txt} lists {len(missing)} missing files, e.g. {missing[:3]}")
        else:
            classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
            self.classes = classes
            self.class_names_file = find_class_names(root)
            index = (class_indices(self.class_names_file, classes) if self.class_names_file
                     else {c: i for i, c in enumerate(classes)})
            entries = [(os.path.join(c, f), index[c]) for c in classes
                       for f in sorted(os.listdir(os.path.join(root, c)))
                       if f.lower().endswith(IMAGE_SUFFIXES)]
        if not entries:
            raise ValueError(f"dataset {spec} is empty: no labels.txt entries or images in class folders")
        self.ids = [f for f, _ in entries]
        self.labels = np.asarray([label for _, label in entries], np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        return Image.open(os.path.join(self.spec.path, self.ids[index]))


def _check_tar_complete(path: str, members: Sequence[tarfile.TarInfo]) -> None:
    """Raises ValueError when the archive ends before its last member's data, or without the
    end-of-archive block (cut at a member boundary, which ``tarfile`` reads silently)."""
    if not members:
        return
    size = os.path.getsize(path)
    last = max(members, key=lambda m: m.offset_data)
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    if last.offset_data + last.size > size:
        raise ValueError(f"{path} ends early: member {last.name} needs {last.offset_data + last.size} bytes "
                         f"but the file has {size} (truncated download or copy?)")
    with open(path, "rb") as f:
        f.seek(end)
        marker = f.read(tarfile.BLOCKSIZE)
    if len(marker) < tarfile.BLOCKSIZE or marker.strip(b"\0"):
        raise ValueError(f"{path} ends early: no end-of-archive block after member {last.name} "
                         f"({len(members)} members read; truncated download or copy?)")


class TarSource:
    """``tar:FILE``: members ``<split>/<class>/<file>``, class index = sorted class order."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        if not os.path.isfile(spec.path):
            raise FileNotFoundError(f"dataset archive not found: {spec.path} (from {spec})")
        try:
            with tarfile.open(spec.path) as tar:
                all_members = tar.getmembers()
        except tarfile.TarError as e:
            if "unexpected end of data" in str(e):
                raise ValueError(f"{spec.path} ends early: unexpected end of data inside a member "
                                 "(truncated download or copy?)") from None
            raise ValueError(f"{spec.path} is not a readable tar archive ({e})") from None
        _check_tar_complete(spec.path, all_members)
        members = [m for m in all_members if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)]
        bad = [m.name for m in members if len(m.name.split("/")) != 3]
        if bad:
            raise ValueError(f"{spec.path}: members must be <split>/<class>/<file>, got e.g. {bad[:3]}")
        if not members:
            raise ValueError(f"dataset {spec} is empty: no image members")
        members.sort(key=lambda m: m.name)
        classes = sorted({m.name.split("/")[1] for m in members})
        index = {c: i for i, c in enumerate(classes)}
        self.classes = classes
        self.ids = [m.name for m in members]
        self.labels = np.asarray([index[m.name.split("/")[1]] for m in members], np.int64)
        self._offsets = [(m.offset_data, m.size) for m in members]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        offset, size = self._offsets[index]
        with open(self.spec.path, "rb") as f:  # one handle per call: safe from threads
            f.seek(offset)
            return Image.open(io.BytesIO(f.read(size)))


class TfdsSource:
    """``tfds:NAME[/CONFIG][:SPLIT]`` through ``tfds.data_source`` (random access, no TensorFlow).

    Images are read encoded (``SkipDecoding``) and decoded with Pillow in :meth:`load`, so
    listing the labels of a large split does not decode every image. ``data_dir`` defaults to
    ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
    """

    def __init__(self, spec: DatasetSpec, *, data_dir: str | None = None):
        import tensorflow_datasets as tfds

        self.spec = spec
        name = spec.path + (f"/{spec.config}" if spec.config else "")
        data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
        try:
            self._source = tfds.data_source(name, split=spec.split or "test", data_dir=data_dir,
                                            download=False, decoders={"image": tfds.decode.SkipDecoding()})
        except Exception as e:  # TFDS raises several types for "not prepared"
            raise FileNotFoundError(
                f"TFDS dataset {spec} is not prepared in {data_dir or '~/tensorflow_datasets'} "
                f"({type(e).__name__}: {' '.join(str(e).split())[:300]}). Prepare it once with TensorFlow "
                f"installed (pip install tensorflow-cpu; tfds.builder('{name}').download_and_prepare("
                "file_format='array_record')), or use a folder:/tar: dataset.") from e
        if len(self._source) == 0:
            raise ValueError(f"dataset {spec} is empty")
        self.labels = np.asarray([int(self._source[i]["label"]) for i in range(len(self._source))])
        self.ids = [f"{spec}#{i}" for i in range(len(self._source))]

    def __len__(self) -> int:
        return len(self._source)

    def load(self, index: int) -> Image.Image:
        return Image.open(io.BytesIO(self._source[index]["image"]))


UNLABELLED = -1
# scikit-image's natural (photographic) sample images; the rest are synthetic or text.
SKIMAGE_PHOTOS = ("astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "coffee.png",
                  "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png",
                  "moon.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
PACKAGE_DATASETS = ("foolbox_imagenet", "skimage")


class PackageSource:
    """``pkg:foolbox_imagenet`` (20 labelled ImageNet photos) or ``pkg:skimage`` (unlabelled)."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        module, pip_name = {"foolbox_imagenet": ("foolbox", "foolbox==3.3.4"),
                            "skimage": ("skimage", "scikit-image")}[spec.path]
        try:
            package = __import__(module)
        except ImportError as e:
            raise ImportError(f"dataset {spec} needs `pip install {pip_name}` (extra 'demo')") from e
        folder = os.path.join(os.path.dirname(package.__file__), "data")
        if spec.path == "foolbox_imagenet":
            files = sorted(f for f in os.listdir(folder) if f.startswith("imagenet_"))
            labels = [int(os.path.splitext(f)[0].rsplit("_", 1)[1]) for f in files]
        else:
            files = [f for f in SKIMAGE_PHOTOS if os.path.isfile(os.path.join(folder, f))]
            labels = [UNLABELLED] * len(files)
        if not files:
            raise ValueError(f"dataset {spec} is empty: no images in {folder}")
        self._folder = folder
        self.ids = files
        self.labels = np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> Image.Image:
        return Image.open(os.path.join(self._folder, self.ids[index]))


def open_dataset(text: str, *, name: str = "dataset", data_dir: str | None = None) -> ImageSource:
    """The :class:`ImageSource` for a spec string (errors name ``name`` and the value)."""
    spec = parse_spec(text, name=name)
    if spec.kind == "folder":
        return FolderSource(spec)
    if spec.kind == "tar":
        return TarSource(spec)
    if spec.kind == "pkg":
        return PackageSource(spec)
    return TfdsSource(spec, data_dir=data_dir)


def resize_and_crop(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """PIL image -> uint8 [input_size, input_size, 3], not yet normalised.

    timm's eval geometry: resize the shorter side to ``floor(input_size / crop_pct)`` with
    ``pre.interpolation``, then centre-crop ``input_size``.
    """
    image = image.convert("RGB")
    size = pre.input_size
    scale_size = math.floor(size / pre.crop_pct)
    w, h = image.size
    if (w, h) != (scale_size, scale_size) or w != h:
        if w <= h:  # the long side truncated, as torchvision's Resize(int) does
            new_w, new_h = scale_size, max(1, int(scale_size * h / w))
        else:
            new_w, new_h = max(1, int(scale_size * w / h)), scale_size
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), _PIL_INTERPOLATION[pre.interpolation])
        w, h = new_w, new_h
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def normalize(images: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """uint8 [..., 3] -> float32 ``(x/255 - mean) / std``."""
    x = np.asarray(images, np.float32) / 255.0
    return (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)


class BadImageError(ValueError):
    """An image of a dataset that cannot be read or decoded (named by source and id)."""


def load_image(source: ImageSource, index: int) -> Image.Image:
    """``source.load(index)``, decoded; raises :class:`BadImageError` naming the image."""
    try:
        image = source.load(index)
        image.load()  # decode now: a truncated file fails here, not somewhere in a batch
        return image
    except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for bad files
        raise BadImageError(f"{source.spec}: cannot decode image {source.ids[index]} "
                            f"({type(e).__name__}: {e})") from None


def preprocess(image: Image.Image, pre: Preprocessing) -> np.ndarray:
    """PIL image -> float32 [input_size, input_size, 3]: :func:`resize_and_crop`, :func:`normalize`."""
    return normalize(resize_and_crop(image, pre), pre)


def load_uint8(source: ImageSource, indices: Sequence[int], pre: Preprocessing, *,
               num_workers: int = 8) -> np.ndarray:
    """All images at ``indices`` decoded into memory: uint8 [N, input_size, input_size, 3].

    For small-image training sets (CIFAR: 50,000 images are 150 MB); decoding runs on a
    thread pool.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
        images = list(pool.map(lambda i: resize_and_crop(load_image(source, int(i)), pre), indices))
    if not images:
        raise ValueError(f"no images to load from {source.spec}")
    return np.stack(images)


def sample_indices(num_total: int, num: int | None, *, seed: int = 0, name: str = "num") -> np.ndarray:
    """``num`` distinct indices of ``range(num_total)``, deterministic in ``seed``, sorted.

    ``num=None`` (or equal to the total) means all. Raises ValueError if ``num`` > total.
    """
    if num is None or num == num_total:
        return np.arange(num_total)
    if not 0 < num <= num_total:
        raise ValueError(f"{name}={num} but the dataset has {num_total} images")
    return np.sort(np.random.default_rng(seed).choice(num_total, size=num, replace=False))


def iterate_batches(source: ImageSource, indices: Sequence[int], pre: Preprocessing, *,
                    batch_size: int, num_workers: int = 8,
                    skipped: list[str] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(images [B, S, S, 3] float32, labels [B] int32)``; the last batch may be short.

    Images are decoded and preprocessed by a thread pool, one batch ahead.

    Args:
      skipped: None to raise :class:`BadImageError` on an unreadable image; a list to skip
        such images instead, appending each one's message (its batch comes out shorter).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    indices = list(indices)
    chunks = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]

    def build(chunk):
        images, kept, bad = [], [], []
        for i in chunk:
            try:
                images.append(preprocess(load_image(source, i), pre))
                kept.append(i)
            except BadImageError as e:
                if skipped is None:
                    raise
                bad.append(str(e))
        return (np.stack(images), source.labels[kept].astype(np.int32)) if images else None, bad

    def finish(future):
        batch, bad = future.result()
        if bad:
            skipped.extend(bad)
        return batch

    with concurrent.futures.ThreadPoolExecutor(max_workers=num_workers) as pool:
        pending = None
        for chunk in chunks:
            future = pool.submit(build, chunk)
            if pending is not None and (batch := finish(pending)) is not None:
                yield batch
            pending = future
        if pending is not None and (batch := finish(pending)) is not None:
            yield batch


def same_source(a: ImageSource, b: ImageSource) -> bool:
    """Whether two sources read the same images (same kind and resolved path/name)."""
    resolve = lambda s: (s.spec.kind, os.path.realpath(s.spec.path) if s.spec.kind in ("folder", "tar")
                         else s.spec.path, s.spec.config, s.spec.split)
    return resolve(a) == resolve(b)


def calibration_indices(calib: ImageSource, num: int | None, *, seed: int = 0,
                        eval_source: ImageSource | None = None,
                        eval_indices: Sequence[int] = (), name: str = "num") -> np.ndarray:
    """Calibration image indices, disjoint from the evaluation images when both share a source.

    Args:
      calib: calibration source.
      num: how many (None: all that are allowed).
      seed: sampling seed.
      eval_source, eval_indices: the evaluation images to stay clear of.

    Raises:
      ValueError: ``num`` exceeds the images available (named by ``name``).
    """
    allowed = np.arange(len(calib))
    if eval_source is not None and same_source(calib, eval_source):
        allowed = np.setdiff1d(allowed, np.asarray(eval_indices, np.int64))
        if len(allowed) == 0:
            raise ValueError(f"calibration and evaluation use the same images of {calib.spec}; "
                             "evaluate on fewer images or calibrate on another split")
    if num is not None and num > len(allowed):
        raise ValueError(f"{name}={num} but only {len(allowed)} images of {calib.spec} are "
                         "available for calibration (disjoint from evaluation)")
    return allowed[sample_indices(len(allowed), num, seed=seed, name=name)]
