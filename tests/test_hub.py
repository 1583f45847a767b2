"""timm weights from the Hugging Face hub layout, offline and without torch on the eqjax side.

A temporary ``HF_HOME`` holds the cache layout that huggingface_hub writes
(``hub/models--timm--NAME/snapshots/<rev>/`` and ``refs/main``) with a ``model.safetensors``
and ``config.json`` written by timm's own ``save_for_hf`` from a randomised timm model.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import shared_data

torch = pytest.importorskip("torch", reason="building the test hub cache needs torch and timm (extra convert)")
timm = pytest.importorskip("timm", reason="building the test hub cache needs timm (extra convert)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVISION = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(hf_home, repo_id: str, timm_name: str, seed: int = 0):
    """A hub cache holding ``repo_id`` at REVISION (also ``main``); returns the timm model."""
    torch.manual_seed(seed)
    model = timm.create_model(timm_name, pretrained=False).eval()
    with torch.no_grad():  # every tensor random: dropped or swapped biases and norms would show
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_((1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else 0.0)
                             + 0.05 * torch.randn_like(tensor))
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand_like(tensor))
    repo_dir = os.path.join(hf_home, "hub", "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo_dir, "snapshots", REVISION)
    timm.models._hub.save_for_hf(model, snapshot, safe_serialization=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(REVISION)
    return model


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf_home")
    model = write_hub_cache(str(home), "timm/deit_tiny_patch16_224.fb_in1k", "deit_tiny_patch16_224")
    return str(home), model


@pytest.fixture
def offline_hub(hub_home, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", os.path.join(hub_home[0], "hub"))
    return hub_home


def env(hf_home):
    return dict(os.environ, HF_HOME=hf_home, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", XLA_FLAGS="",
                PYTHONUNBUFFERED="1")


def test_fp32_logits_equal_timms_for_the_same_hub_weights(offline_hub):
    from experiments import common
    from eqjax import data, models

    _, timm_model = offline_hub
    variables, num_classes, pre, source, _ = common.load_weights("deit_tiny", "timm")
    assert num_classes == 1000 and source.startswith("hf:timm/deit_tiny_patch16_224.fb_in1k")
    cfg = timm_model.pretrained_cfg
    assert pre == models.Preprocessing(224, tuple(cfg["mean"]), tuple(cfg["std"]), cfg["crop_pct"],
                                       cfg["interpolation"])
    source_images = data.open_dataset(f"folder:{shared_data.path('imagenet', 'val')}")
    images = np.stack([data.preprocess(source_images.load(i), pre) for i in range(4)])
    ours = np.asarray(models.get("deit_tiny").build().apply(variables, images))
    with torch.no_grad():
        theirs = timm_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=2e-4)
    pinned, _, _, pinned_source, _ = common.load_weights("deit_tiny", f"hf:timm/deit_tiny_patch16_224.fb_in1k@{REVISION}")
    assert f"@{REVISION}" in pinned_source
    jax.tree_util.tree_map(np.testing.assert_array_equal, pinned, variables)


def test_hub_errors_name_what_is_missing(offline_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from experiments import common
    from weights_convert import hub

    with pytest.raises(hub.HubWeightsUnavailable, match="no revision|not in the Hugging Face cache"):
        common.load_weights("deit_tiny", "hf:timm/deit_tiny_patch16_224.fb_in1k@" + "f" * 40)
    with pytest.raises(ValueError, match="owner/name"):
        common.load_weights("deit_tiny", "hf:deit_tiny")
    with pytest.raises(ValueError, match=r"holds a 'deit_tiny_patch16_224', but model 'resnet18'"):
        common.load_weights("resnet18", "hf:timm/deit_tiny_patch16_224.fb_in1k")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(hub.HubWeightsUnavailable, match=r"HF_HUB_OFFLINE=1.*run once with network access"):
        common.load_weights("deit_tiny", "timm")


def test_headline_command_runs_offline_from_the_hub_cache(hub_home, tmp_path):
    pytest.importorskip("foolbox", reason="the default datasets need the 'demo' extra")
    result = subprocess.run([sys.executable, "-m", "experiments.ptq", "--model=deit_tiny", "--bits=6",
                             f"--workdir={tmp_path}"], capture_output=True, text=True, env=env(hub_home[0]),
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "ptq" / "results.json") as f:
        results = json.load(f)
    assert results["weights"].startswith("hf:timm/deit_tiny_patch16_224.fb_in1k")
    assert results["w_bits"] == results["a_bits"] == 6 and results["num_eval_images"] == 20
    assert results["bits"]["blocks.5.mlp.fc2"] == {"w": 6, "a": 6}
    assert "Traceback" not in result.stderr


def test_headline_command_with_nothing_cached_says_what_to_do(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.ptq", "--model=deit_tiny", "--bits=6",
                             f"--workdir={tmp_path}"], capture_output=True, text=True, env=env(str(tmp_path)),
                            cwd=ROOT)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: model.safetensors of hub repo timm/deit_tiny_patch16_224.fb_in1k is not "
                                "in the Hugging Face cache"), result.stderr
    assert "network access" in lines[-1] and "--weights=" in lines[-1] and "Traceback" not in result.stderr
    assert not (tmp_path / "ptq" / "results.json").exists()


def test_models_without_public_weights_ask_for_weights(tmp_path):
    result = subprocess.run([sys.executable, "-m", "experiments.ptq", "--model=resnet18_cifar",
                             f"--workdir={tmp_path}"], capture_output=True, text=True, env=env(str(tmp_path)),
                            cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: model resnet18_cifar has no public pretrained weights: pass --weights=DIR" in result.stderr
