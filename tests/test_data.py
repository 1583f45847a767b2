"""Dataset specs, readers, preprocessing and sampling."""

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from eqjax import data, models


def _png(color, size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def tar_dataset(tmp_path):
    path = tmp_path / "toy.tar"
    with tarfile.open(path, "w") as tar:
        for cls, color in (("cat", (255, 0, 0)), ("airplane", (0, 255, 0))):
            for i in range(3):
                payload = _png(color)
                info = tarfile.TarInfo(f"train/{cls}/{i:04d}.png")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("tfds:cifar100:test", data.DatasetSpec("tfds", "cifar100", None, "test")),
    ("tfds:imagenet2012/subset:validation", data.DatasetSpec("tfds", "imagenet2012", "subset", "validation")),
    ("tfds:imagenet_v2", data.DatasetSpec("tfds", "imagenet_v2")),
    ("folder:/x/y", data.DatasetSpec("folder", "/x/y")),
    ("tar:a.tar", data.DatasetSpec("tar", "a.tar")),
    ("pkg:skimage", data.DatasetSpec("pkg", "skimage")),
])
def test_parse_spec(text, expected):
    assert data.parse_spec(text) == expected
    assert str(data.parse_spec(text)) == text


@pytest.mark.parametrize("text", ["cifar100", "zip:a.zip", "folder:", "tfds:", "pkg:mnist"])
def test_parse_spec_errors_name_the_argument(text):
    with pytest.raises(ValueError, match="^calib_dataset="):
        data.parse_spec(text, name="calib_dataset")
    with pytest.raises(ValueError, match="^--calib_dataset="):  # as the scripts call it
        data.parse_spec(text, name="--calib_dataset")


def test_tar_classes_are_sorted(tar_dataset):
    source = data.open_dataset(f"tar:{tar_dataset}")
    assert len(source) == 6 and source.classes == ["airplane", "cat"]
    assert np.asarray(source.load(0).convert("RGB"))[0, 0].tolist() == [0, 255, 0]  # airplane = 0
    assert source.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_folder_sources(tmp_path):
    for cls in ("b", "a"):
        os.makedirs(tmp_path / "classes" / cls)
        (tmp_path / "classes" / cls / "x.png").write_bytes(_png((1, 2, 3)))
    source = data.open_dataset(f"folder:{tmp_path / 'classes'}")
    assert source.labels.tolist() == [0, 1] and source.ids == ["a/x.png", "b/x.png"]
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "p.png").write_bytes(_png((1, 2, 3)))
    (flat / "labels.txt").write_text("p.png 7\n")
    assert data.open_dataset(f"folder:{flat}").labels.tolist() == [7]
    (flat / "labels.txt").write_text("p.png seven\n")
    with pytest.raises(ValueError, match="labels.txt:1"):
        data.open_dataset(f"folder:{flat}")
    with pytest.raises(FileNotFoundError, match="not found"):
        data.open_dataset(f"folder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is empty"):
        data.open_dataset(f"folder:{tmp_path / 'empty'}")


def test_preprocess_resize_crop_normalize():
    pre = models.Preprocessing(224, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875, "bicubic")
    image = Image.new("RGB", (400, 300), (255, 128, 0))
    x = data.preprocess(image, pre)
    assert x.shape == (224, 224, 3) and x.dtype == np.float32
    np.testing.assert_allclose(x[100, 100], [(1 - 0.5) / 0.25, (128 / 255 - 0.5) / 0.25, -2.0], atol=1e-5)
    grey = data.preprocess(Image.new("L", (32, 32), 0), models.get("resnet18_cifar").preprocessing)
    assert grey.shape == (32, 32, 3)


@pytest.mark.parametrize("size, crop_pct, interpolation", [((400, 300), 0.875, "bicubic"), ((150, 333), 0.9, "bilinear"),
                                                           ((224, 224), 1.0, "bilinear")])
def test_preprocess_geometry_matches_timm(size, crop_pct, interpolation):
    """Resize of the shorter side, centre crop and normalisation against timm's eval transform,
    on a gradient image (a uniform one would hide any shift or scale of the crop)."""
    pytest.importorskip("torch", reason="needs torch and timm (extra convert)")
    timm_data = pytest.importorskip("timm.data", reason="needs timm (extra convert)")
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    image = Image.fromarray(np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), (xx + 2 * yy) % 256], -1).astype(np.uint8))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = timm_data.create_transform(input_size=(3, 224, 224), crop_pct=crop_pct, interpolation=interpolation,
                                           mean=mean, std=std)
    expected = transform(image).numpy().transpose(1, 2, 0)
    got = data.preprocess(image, models.Preprocessing(224, mean, std, crop_pct, interpolation))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_sampling_is_deterministic_and_calibration_disjoint(tar_dataset):
    a = data.sample_indices(100, 10, seed=3)
    assert np.array_equal(a, data.sample_indices(100, 10, seed=3)) and len(set(a)) == 10
    with pytest.raises(ValueError, match="^eval_images=200 but the dataset has 100"):
        data.sample_indices(100, 200, name="eval_images")
    source = data.open_dataset(f"tar:{tar_dataset}")
    other = data.open_dataset(f"tar:{tar_dataset}")
    calib = data.calibration_indices(source, 2, eval_source=other, eval_indices=[0, 1, 2, 3])
    assert set(calib) == {4, 5}
    with pytest.raises(ValueError, match="^num=3 but only 2 images"):
        data.calibration_indices(source, 3, eval_source=other, eval_indices=[0, 1, 2, 3])


def test_batches_cover_all_images(tar_dataset):
    source = data.open_dataset(f"tar:{tar_dataset}")
    pre = models.Preprocessing(16, (0, 0, 0), (1, 1, 1))
    batches = list(data.iterate_batches(source, range(6), pre, batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 16, 16, 3), (2, 16, 16, 3)]
    assert np.concatenate([b[1] for b in batches]).tolist() == source.labels.tolist()


def test_package_datasets():
    pytest.importorskip("foolbox", reason="needs foolbox (extra demo)")
    photos = data.open_dataset("pkg:foolbox_imagenet")
    assert len(photos) == 20 and 0 <= photos.labels.min() and photos.labels.max() < 1000
    pytest.importorskip("skimage", reason="needs scikit-image (extra demo)")
    assert (data.open_dataset("pkg:skimage").labels == data.UNLABELLED).all()
