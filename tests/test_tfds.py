"""The tfds: dataset spec on a real prepared TFDS dataset (ArrayRecord), read without TensorFlow."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from eqjax import data
from tests import tfds_builder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("preparing a TFDS dataset needs TensorFlow (pip install -e '.[test]')")
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    subprocess.run([sys.executable, "-m", "tests.tfds_builder", data_dir], check=True, cwd=ROOT,
                   capture_output=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    return data_dir


def test_tfds_source_reads_images_and_labels(tfds_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    source = data.open_dataset(f"tfds:{tfds_builder.NAME}:test")
    assert len(source) == 16 and sorted(source.labels.tolist()) == sorted([i % 4 for i in range(16)])
    image = source.load(0)
    assert image.size == (32, 32) and np.asarray(image.convert("RGB")).dtype == np.uint8
    # Every record's pixels are one generated image, each image once, with its own label.
    generated = [(img.tobytes(), label) for img, label in tfds_builder.examples("test")]
    matched = []
    for i in range(len(source)):
        pixels = np.asarray(source.load(i).convert("RGB")).tobytes()
        (j,) = [k for k, (img, _) in enumerate(generated) if img == pixels]
        assert int(source.labels[i]) == generated[j][1]
        matched.append(j)
    assert sorted(matched) == list(range(16))
    assert "tensorflow" not in sys.modules  # reading needs no TensorFlow
    with pytest.raises(FileNotFoundError, match="is not prepared in .*Prepare it once"):
        data.open_dataset("tfds:not_a_prepared_dataset:test")


def test_ptq_on_a_prepared_tfds_dataset(tfds_dir, tmp_path):
    env = dict(os.environ, TFDS_DATA_DIR=tfds_dir, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run([sys.executable, "-m", "experiments.ptq", "--model=resnet18_cifar", "--weights=random",
                             f"--dataset=tfds:{tfds_builder.NAME}:test",
                             f"--calib_dataset=tfds:{tfds_builder.NAME}:train", "--calib_images=8",
                             "--batch_size=8", "--bits=6", f"--workdir={tmp_path}"],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "ptq" / "results.json") as f:
        results = json.load(f)
    assert results["num_eval_images"] == 16 and results["num_calib_images"] == 8
    assert results["config"]["dataset"] == f"tfds:{tfds_builder.NAME}:test"


def test_train_a_few_steps_on_a_prepared_tfds_dataset(tfds_dir, tmp_path, monkeypatch):
    from experiments import train

    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    config = train.TrainConfig.from_recipe(
        "resnet18_cifar", dataset=f"tfds:{tfds_builder.NAME}:train", eval_dataset=f"tfds:{tfds_builder.NAME}:test",
        epochs=1, batch_size=8, workdir=str(tmp_path))
    result = train.run(config, model_overrides=dict(stage_sizes=(1,), widths=(8,)))
    assert result["num_train_images"] == 24 and result["num_eval_images"] == 16
    assert result["num_classes"] == 4 and len(result["curve"]) == 1 and result["steps_per_epoch"] == 3
