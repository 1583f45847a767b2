"""The flag-free library API (eqjax.ptq) on a user's own Flax model, and its checks."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax import ptq
from eqjax.quant import intercept, policy as policy_lib
from eqjax.algorithms import metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_example(index: int = 0) -> str:
    """Python block ``index`` of docs/your-own-model.md (0: Linen, 1: QAT of the Linen model, 2: NNX,
    3: the Linen model on integers)."""
    with open(os.path.join(ROOT, "docs", "your-own-model.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, re.S)[index]


def test_readme_quantize_your_own_model_runs(capsys):
    namespace = {}
    exec(compile(readme_example(0), "docs/your-own-model.md", "exec"), namespace)
    result, policy = namespace["result"], namespace["policy"]
    assert result["num_images"] == 256 and 50.0 <= result["top1"] <= 100.0
    assert eqjax.bits_table(policy) == {"conv1": {"w": 8, "a": 8}, "conv2": {"w": 4, "a": 4},
                                        "conv3": {"w": 4, "a": 4}, "head": {"w": 8, "a": 8}}
    assert "W4A4 agrees with FP32 on" in capsys.readouterr().out
    # The quantized state really differs from FP32 and equals the low-level apply.
    model, variables, images = namespace["model"], namespace["variables"], namespace["images"][:8]
    apply_fn, state = namespace["apply_fn"], namespace["state"]
    logits = apply_fn(state, images)
    assert not np.allclose(logits, model.apply(variables, images))
    np.testing.assert_array_equal(logits, eqjax.quant.apply.quantized_apply(model, variables, policy, images))


def test_readme_qat_of_your_own_model_runs_and_beats_round_to_nearest(capsys):
    namespace = {}
    exec(compile(readme_example(0), "docs/your-own-model.md", "exec"), namespace)
    exec(compile(readme_example(1), "docs/your-own-model.md", "exec"), namespace)
    ptq_result, qat_result = namespace["result"], namespace["qat_result"]
    assert qat_result["num_images"] == 256 and qat_result["top1"] > ptq_result["top1"], (ptq_result, qat_result)
    assert "W4A4 after QAT agrees with FP32 on" in capsys.readouterr().out
    assert eqjax.bits_table(namespace["trained"].policy) == eqjax.bits_table(namespace["policy"])


def test_readme_integer_deployment_of_your_own_model_runs(capsys, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from eqjax.deploy import onnx_export

    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(readme_example(0), "docs/your-own-model.md", "exec"), namespace)
    exec(compile(readme_example(3), "docs/your-own-model.md", "exec"), namespace)
    assert "the integer forward agrees with fake quantization on" in capsys.readouterr().out
    images = namespace["images"][:128]
    reference = namespace["apply_fn"](namespace["state"], images)
    assert np.mean(np.argmax(namespace["logits"], -1) == np.argmax(reference, -1)) >= 0.99
    assert namespace["size"] == os.path.getsize(tmp_path / "small_cnn.safetensors")
    onnx_logits = onnx_export.session(str(tmp_path / "small_cnn.onnx")).run(None, {"images": images})[0]
    assert np.mean(np.argmax(onnx_logits, -1) == np.argmax(reference, -1)) >= 0.99


def test_readme_quantize_your_own_nnx_model_runs(capsys):
    from flax import nnx

    namespace = {}
    exec(compile(readme_example(2), "docs/your-own-model.md", "exec"), namespace)
    policy, quantized = namespace["policy"], namespace["quantized"]
    assert list(policy) == ["patch", "attn.query", "attn.key", "attn.value", "attn.qk_matmul", "attn.av_matmul",
                            "attn.out", "mlp", "head"]
    assert eqjax.bits_table(policy)["attn.query"] == {"w": 4, "a": 4}
    assert "NNX W4A4 agrees with FP32 on" in capsys.readouterr().out
    assert isinstance(nnx.merge(*nnx.split(quantized)), nnx.Module)
    images = namespace["images"][:8]
    assert not np.allclose(quantized(images), namespace["net"](images))


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv1")(x))
        x = nn.relu(nn.Conv(8, (3, 3), name="conv2")(x))
        return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = TinyCNN()
    images = jax.random.normal(jax.random.key(0), (8, 8, 8, 3), jnp.float32)
    return model, model.init(jax.random.key(1), images[:1]), images


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"^w_bits must be in \[2, 16\], got 1"):
        ptq.PTQConfig(w_bits=1)
    with pytest.raises(ValueError, match=r"^a_bits must be in"):
        ptq.PTQConfig(a_bits=17)
    with pytest.raises(ValueError, match=r"^calib_method must be one of"):
        ptq.PTQConfig(calib_method="max")
    with pytest.raises(TypeError):
        ptq.PTQConfig(8)  # keyword-only


def test_misspelt_rule_is_an_error_with_the_closest_names(tiny):
    model, variables, images = tiny
    with pytest.raises(ValueError, match=r"match no layer.*conv_2.*closest layers: conv2"):
        ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=4, rules=[("conv_2", 6)]))


def test_policy_entry_that_names_no_layer_is_an_error(tiny):
    model, variables, images = tiny
    policy = ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=4))
    stale = dict(policy)
    stale["conv_2"] = stale.pop("conv2")
    with pytest.raises(ValueError, match=r"'conv_2' has no kernel.*closest: conv2"):
        ptq.quantize(model, variables, stale)
    with pytest.raises(ValueError, match=r"layers not in the model \(1\): conv_2.*missing from the policy \(1\): conv2"):
        ptq.calibrate(model, variables, [images], policy=stale)
    # Under jit, where the policy is traced, the check happens while tracing.
    no_kernel = {**policy, "conv9": policy["conv2"]._replace(w_enabled=jnp.asarray(False))}
    with pytest.raises(ValueError, match="layers not in the model"):
        jax.jit(lambda p: eqjax.quant.apply.quantized_apply(model, variables, p, images))(no_kernel)
    partial = dict(policy)
    del partial["conv1"]
    with pytest.raises(ValueError, match=r"missing from the policy \(1\): conv1"):
        eqjax.quant.apply.quantized_apply(model, variables, partial, images)


def test_uncalibrated_policy_and_empty_batches_are_errors(tiny):
    model, variables, images = tiny
    with pytest.raises(ValueError, match="batches is empty"):
        ptq.calibrate(model, variables, [], ptq.PTQConfig())
    calls = ptq.layer_calls(model, images)
    with pytest.raises(ValueError, match="not calibrated"):
        ptq.quantize(model, variables, ptq.build_policy(calls, ptq.PTQConfig()))


def test_calibrate_accepts_labelled_batches_and_progress(tiny):
    model, variables, images = tiny
    seen = []
    a = ptq.calibrate(model, variables, [(images[:4], np.zeros(4)), (images[4:], np.zeros(4))],
                      on_progress=lambda p: seen.append(p["images"]))
    b = ptq.calibrate(model, variables, [images])
    assert seen == [4, 8]  # batches of 4 and one of 8 convolve in a different order: ulps apart
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), a, b)


def test_one_evaluator_compiles_once_for_many_policies(tiny):
    model, variables, images = tiny
    labels = np.asarray(jnp.argmax(model.apply(variables, images), -1))
    traces = []
    apply_fn = ptq.quantized_logits_fn(model)
    evaluator = metrics.make_evaluator(lambda s, x: (traces.append(1), apply_fn(s, x))[1])
    for bits in (8, 6, 4, 2):
        policy = ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=bits))
        _, state = ptq.quantize(model, variables, policy)
        evaluator(state, [(np.asarray(images), labels)], batch_size=8)
    assert len(traces) == 1


def test_sweep_covers_the_weighted_layers(tiny):
    model, variables, images = tiny
    policy = ptq.calibrate(model, variables, [images])
    labels = np.zeros(8, np.int32)
    result = ptq.sweep(model, variables, policy, [(np.asarray(images), labels)], bits=(4, 8), batch_size=8)
    assert result.layers == ("conv1", "conv2", "head") and result.scores["l2"].shape == (3, 2)
    assert np.all(result.scores["l2"][:, 0] > result.scores["l2"][:, 1])


def test_one_interception_helper_sees_every_layer_with_its_name(tiny):
    model, variables, images = tiny
    names = []

    def record(name, module, call, args, kwargs):
        names.append((name, type(module).__name__))
        return call(*args, **kwargs)

    with intercept.intercept_calls(record):
        model.apply(variables, images)
    assert names == [("conv1", "Conv"), ("conv2", "Conv"), ("head", "Dense")]
    assert intercept.module_variables(variables, "conv2")["kernel"].shape == (3, 3, 4, 8)
    assert intercept.module_variables(variables, "nope") is None
    replaced = intercept.replace_module_variable(variables, "head", "bias", jnp.ones(3))
    np.testing.assert_array_equal(replaced["params"]["head"]["bias"], np.ones(3))
    assert replaced["params"]["conv1"] is variables["params"]["conv1"]  # untouched branches shared
    with pytest.raises(KeyError, match="params/head/scale"):
        intercept.replace_module_variable(variables, "head", "scale", 1.0)


def test_set_bits_and_validate(tiny):
    model, variables, images = tiny
    policy = ptq.calibrate(model, variables, [images])
    mixed = policy_lib.set_bits(policy, {"conv2": (4, 6)})
    assert eqjax.bits_table(mixed)["conv2"] == {"w": 4, "a": 6}
    with pytest.raises(ValueError, match="conv_2"):
        policy_lib.set_bits(policy, {"conv_2": 4})


def test_modules_keep_their_short_names_after_the_grouping():
    """User code written before eqjax/quant and eqjax/algorithms existed still imports, and gets
    the same module objects (one copy of each jit cache and registry)."""
    import importlib

    for package, names in eqjax._GROUPED.items():
        for name in names:
            grouped = importlib.import_module(f"eqjax.{package}.{name}")
            assert importlib.import_module(f"eqjax.{name}") is grouped
            assert getattr(eqjax, name) is grouped
    from eqjax import reconstruction, vit_quant  # noqa: F401  (the README's spelling)
    assert not os.path.exists(os.path.join(ROOT, "eqjax", "numerics.py"))
