"""Training: the step learns, a killed run resumes exactly, checkpoints round-trip."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import checkpoint, models, training
from experiments import train
from tests.image_tar import write_image_tar
from tests.test_experiments import run as run_module

TINY_VIT = dict(depth=1, embed_dim=16, num_heads=2, mlp_ratio=2.0)


@pytest.fixture(scope="module")
def pattern_tar(tmp_path_factory):
    """64 learnable 32x32 images: noise, with one colour channel raised for classes 0-2."""
    rng = np.random.default_rng(0)
    classes = {}
    for c in range(4):
        images = [rng.integers(0, 100, (32, 32, 3), dtype=np.uint8) for _ in range(16)]
        for image in images:
            if c < 3:
                image[..., c] += 150
        classes[f"class{c}"] = images
    return write_image_tar(tmp_path_factory.mktemp("data") / "patterns.tar", classes)


def _config(tar, workdir, **overrides):
    fields = dict(dataset=f"tar:{tar}", eval_dataset=f"tar:{tar}", epochs=2, batch_size=16,
                  learning_rate=3e-3, checkpoint_every=3, log_every=2, workdir=str(workdir))
    fields.update(overrides)
    return train.TrainConfig.from_recipe("vit_tiny_cifar", **fields)


def test_train_steps_reduce_the_loss():
    spec = models.get("vit_tiny_cifar")
    model = spec.build(num_classes=4, **TINY_VIT)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    optimizer = training.make_optimizer("adamw", 3e-3, weight_decay=0.0)
    step = training.make_train_step(model, optimizer, seed=0, mean=(0.5,) * 3, std=(0.25,) * 3,
                                    augmentation=False)
    rng = np.random.default_rng(0)
    labels = np.arange(32) % 4
    images = rng.integers(0, 100, (32, 32, 32, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        if label < 3:  # a colour per class (a ViT learns position-only cues slowly)
            images[i, ..., label] += 150
    state = training.init_state(variables, optimizer)
    losses = []
    for _ in range(15):
        state, m = step(state, images, labels)
        losses.append(float(m["loss"]))
    assert int(state.step) == 15
    assert losses[-1] < 0.5 * losses[0], losses


def test_augment_crops_and_flips_within_the_padded_image():
    images = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1) + 1
    out = training.augment(jax.random.key(3), images, pad=2)
    assert out.shape == images.shape
    for original, crop in zip(np.asarray(images), np.asarray(out)):
        values = set(crop[crop > 0].ravel().tolist())
        assert values <= set(original.ravel().tolist())
        assert len(values) >= 6 * 6  # at most `pad` rows/columns of zeros on each side


def test_killed_run_resumes_to_the_same_parameters(pattern_tar, tmp_path):
    reference = train.run(_config(pattern_tar, tmp_path / "a"), model_overrides=TINY_VIT)
    assert reference["total_steps"] == 8 and len(reference["curve"]) == 2

    def kill_after_step_5(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(_config(pattern_tar, tmp_path / "b"), model_overrides=TINY_VIT, on_step=kill_after_step_5)
    saved = sorted(os.listdir(tmp_path / "b" / "train" / "checkpoints"))
    assert saved == ["3", "4"], saved  # every 3 steps and at the end of epoch 1
    with pytest.raises(FileExistsError, match="pass --resume"):
        train.run(_config(pattern_tar, tmp_path / "b"), model_overrides=TINY_VIT)
    with pytest.raises(ValueError, match="learning_rate: checkpoint 0.003 vs now 0.001"):
        train.run(_config(pattern_tar, tmp_path / "b", resume=True, learning_rate=1e-3),
                  model_overrides=TINY_VIT)
    resumed = train.run(_config(pattern_tar, tmp_path / "b", resume=True), model_overrides=TINY_VIT)

    a = checkpoint.load(reference["final_checkpoint"])
    b = checkpoint.load(resumed["final_checkpoint"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)
    assert [c["eval_top1"] for c in resumed["curve"]] == [c["eval_top1"] for c in reference["curve"]]
    assert a.model == "vit_tiny_cifar" and a.num_classes == 4
    np.testing.assert_allclose(a.preprocessing.mean, reference["preprocessing"]["mean"])

    # A corrupt newest checkpoint: reported, set aside, and the run resumes from the newest intact
    # one, mid-epoch (step 3 of 4-step epochs), to the same parameters.
    with pytest.raises(KeyboardInterrupt):
        train.run(_config(pattern_tar, tmp_path / "c"), model_overrides=TINY_VIT, on_step=kill_after_step_5)
    newest = tmp_path / "c" / "train" / "checkpoints" / "4" / "state"
    shutil.rmtree(newest)
    newest.mkdir()
    resumed = train.run(_config(pattern_tar, tmp_path / "c", resume=True), model_overrides=TINY_VIT)
    c = checkpoint.load(resumed["final_checkpoint"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, c.variables)
    assert [p.name.split("-")[0] for p in (tmp_path / "c" / "train" / "corrupt_checkpoints").iterdir()] == ["4"]
    # No intact checkpoint at all: a clear error, nothing deleted.
    for step in os.listdir(tmp_path / "c" / "train" / "checkpoints"):
        shutil.rmtree(tmp_path / "c" / "train" / "checkpoints" / step / "state")
        (tmp_path / "c" / "train" / "checkpoints" / step / "state").mkdir()
    with pytest.raises(ValueError, match="no intact checkpoint in"):
        train.run(_config(pattern_tar, tmp_path / "c", resume=True), model_overrides=TINY_VIT)
    assert os.listdir(tmp_path / "c" / "train" / "checkpoints")


TINY_RESNET = dict(stage_sizes=(1, 1), widths=(8, 16))


def test_sgd_batchnorm_recipe_resumes_mid_epoch_to_the_same_state(pattern_tar, tmp_path):
    """The resnet18_cifar recipe (SGD with Nesterov momentum, weight decay, BatchNorm running
    statistics updated every step): killed mid-epoch, resumed, equal bit for bit."""
    config = lambda workdir, **kw: train.TrainConfig.from_recipe(
        "resnet18_cifar", dataset=f"tar:{pattern_tar}", eval_dataset=f"tar:{pattern_tar}", epochs=2,
        batch_size=16, checkpoint_every=3, log_every=2, workdir=str(workdir), **kw)
    assert config(tmp_path).optimizer == "sgd"
    reference = train.run(config(tmp_path / "a"), model_overrides=TINY_RESNET)

    def kill_at_step_4(step):  # before step 4 is saved
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.run(config(tmp_path / "b"), model_overrides=TINY_RESNET, on_step=kill_at_step_4)
    assert sorted(os.listdir(tmp_path / "b" / "train" / "checkpoints")) == ["3"]  # step 3 of 4: mid-epoch
    resumed = train.run(config(tmp_path / "b", resume=True), model_overrides=TINY_RESNET)
    a = checkpoint.load(reference["final_checkpoint"]).variables
    b = checkpoint.load(resumed["final_checkpoint"]).variables
    initial = models.get("resnet18_cifar").build(num_classes=4, **TINY_RESNET).init(
        jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert not np.allclose(a["batch_stats"]["bn1"]["mean"], initial["batch_stats"]["bn1"]["mean"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)  # parameters and BatchNorm statistics
    assert [c["eval_top1"] for c in resumed["curve"]] == [c["eval_top1"] for c in reference["curve"]]


def test_labels_beyond_num_classes_are_refused(pattern_tar, tmp_path):
    with pytest.raises(ValueError, match="labels up to 3, but --num_classes=2"):
        train.run(_config(pattern_tar, tmp_path, num_classes=2), model_overrides=TINY_VIT)


def test_bad_recipe_values_are_refused(pattern_tar, tmp_path):
    with pytest.raises(ValueError, match="no training recipe for model 'deit_tiny'"):
        train.TrainConfig.from_recipe("deit_tiny")
    with pytest.raises(ValueError, match="--warmup_fraction must be in"):
        train.run(_config(pattern_tar, tmp_path, warmup_fraction=1.0))
    with pytest.raises(ValueError, match="exceeds the 64 training images"):
        train.run(_config(pattern_tar, tmp_path, batch_size=128))


def test_train_cli_output_loads_in_ptq(pattern_tar, tmp_path):
    run_module("experiments.train", "--model=vit_tiny_cifar", "--epochs=1", "--train_images=32",
               "--batch_size=16", "--eval_images=16", f"--dataset=tar:{pattern_tar}",
               f"--eval_dataset=tar:{pattern_tar}", f"--workdir={tmp_path}")
    with open(tmp_path / "train" / "results.json") as f:
        results = json.load(f)
    assert results["finished"] and results["total_steps"] == 2 and results["num_classes"] == 4
    assert (tmp_path / "train" / "curve.png").stat().st_size > 1000
    out = run_module("experiments.ptq", "--model=vit_tiny_cifar", f"--weights={tmp_path}/train/final",
                     f"--dataset=tar:{pattern_tar}", f"--calib_dataset=tar:{pattern_tar}",
                     "--eval_images=16", "--calib_images=16", "--batch_size=16", "--bits=8",
                     f"--workdir={tmp_path}")
    assert "vit_tiny_cifar W8A8" in out.stdout
