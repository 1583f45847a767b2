"""weights_convert.state_dict_of / weights_convert.export: trained weights as a committable file, and the
committed ViT proxy (weights/vit_tiny_cifar10) reaching its recorded FP32 top-1."""

import json
import os

import jax
import numpy as np
import pytest

import weights_convert
from eqjax import checkpoint, models
from weights_convert import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY = os.path.join(ROOT, "weights", "vit_tiny_cifar10", "vit_tiny_cifar10.safetensors")


def test_state_dict_of_runs_convert_backwards_exactly():
    """A tiny ViT (class token, position embedding, LayerNorms, linears); export below checks a ResNet."""
    name, overrides = "vit_tiny_cifar", dict(depth=2, embed_dim=32, num_heads=2)
    variables = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(3), x.shape, x.dtype),
                             models.get(name).init(jax.random.key(0), num_classes=10, **overrides))
    state = weights_convert.state_dict_of(name, variables)
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32) and "cls_token" in state
    back = weights_convert.convert(name, state, **overrides)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    with pytest.raises(ValueError, match="does not invert the key renaming of 'efficientnet_lite0'"):
        weights_convert.state_dict_of("efficientnet_lite0", {})


def test_export_writes_a_state_dict_that_loads_as_weights_with_its_json(tmp_path):
    from experiments import common

    spec = models.get("resnet18_cifar")
    variables = spec.init(jax.random.key(0), num_classes=10)
    pre = models.Preprocessing(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    saved = checkpoint.save(tmp_path / "ckpt", variables, model="resnet18_cifar", num_classes=10, preprocessing=pre)
    train = {"environment": {"argv": ["train.py", "--model=resnet18_cifar", "--epochs=2"], "device_kind": "cpu"},
             "curve": [{"epoch": 1}, {"epoch": 2}], "top1": 12.5, "top5": 50.0}
    out = str(tmp_path / "w" / "r18.safetensors")
    json_path, size = export.export(saved, out, train=train, max_mb=100)
    about = json.load(open(json_path))
    assert about["mean"] == [0.5, 0.4, 0.3] and about["training"]["epochs"] == 2
    assert about["training"]["command"] == "python -m experiments.train --model=resnet18_cifar --epochs=2"
    assert os.path.getsize(out) >= size > 40e6
    loaded = common.load_weights("resnet18_cifar", out)  # what --weights=FILE.safetensors does
    assert loaded.preprocessing.mean == (0.5, 0.4, 0.3) and "r18.json" in loaded.preprocessing_source
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)  # BatchNorm statistics included
    with pytest.raises(ValueError, match="over --max_mb=25.0; --float16 halves it"):
        export.export(saved, str(tmp_path / "big.safetensors"))
    _, half = export.export(saved, str(tmp_path / "half.safetensors"), float16=True, max_mb=25.0)
    assert half == size // 2


def test_the_committed_vit_proxy_reaches_its_recorded_fp32_top1():
    if not os.path.exists(PROXY):
        pytest.skip(f"no trained ViT proxy at {PROXY}: `bash benchmarks/vit_gpu.sh` on a GPU makes it")
    from experiments import workload

    check = json.load(open(PROXY.replace(".safetensors", ".json")))["check"]
    for name in ("dataset", "calib_dataset"):
        if check[name].startswith("tar:../shared") and not os.path.exists(os.path.join(ROOT, check[name][4:])):
            pytest.skip(f"shared data not found: {check[name]}")
    work = workload.open_workload(workload.WorkloadConfig(
        model="vit_tiny_cifar", weights=PROXY, dataset=check["dataset"], calib_dataset=check["calib_dataset"],
        eval_images=check["eval_images"], seed=check["seed"], batch_size=check["batch_size"]), log=lambda m: None)
    assert abs(work.evaluate_fp32()["top1"] - check["fp32_top1"]) <= 0.2
