"""Integer deployment: packing, the integer artifact, the integer JAX forward, the ONNX export."""

import importlib.util
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax.deploy import artifact as artifact_lib, integer, onnx_export, packing, qwix_export
from eqjax.quant import apply
from tests.random_init import random_batch_norms
from tests.test_vit_quant import make_tiny_vit


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_packing_round_trips_every_value_of_the_grid(bits):
    values = np.arange(-(1 << (bits - 1)), 1 << (bits - 1))
    values = np.concatenate([values, values[::-1], values[:3]]).reshape(-1)  # odd length: a partly filled byte
    packed = packing.pack(values, bits)
    assert packed.dtype == np.uint8 and packed.size == packing.packed_size(values.size, bits)
    assert packed.size == -(-values.size * packing.container_bits(bits) // 8)
    np.testing.assert_array_equal(packing.unpack(packed, bits, values.shape), values)


def test_packing_refuses_values_off_the_grid_and_wrong_sizes():
    with pytest.raises(ValueError, match=r"value 8 at index 1 is outside the 4-bit signed grid \[-8, 7\]"):
        packing.pack(np.array([0, 8]), 4)
    with pytest.raises(ValueError, match="2- to 8-bit"):
        packing.container_bits(9)
    with pytest.raises(ValueError, match="cannot hold 5 values of 4 bits"):
        packing.unpack(np.zeros(2, np.uint8), 4, (5,))


class CNN(nn.Module):
    """A conv → BatchNorm → ReLU stem, a strided conv with bias, a residual add, a dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv1")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, name="bn1")(x))
        y = nn.relu(nn.Conv(8, (3, 3), strides=2, name="conv2")(x))
        y = y + nn.Conv(8, (1, 1), strides=2, name="shortcut")(x)
        return nn.Dense(10, name="head")(y.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def cnn():
    model = CNN()
    images = jax.random.normal(jax.random.key(0), (16, 12, 12, 3))
    variables = model.init(jax.random.key(1), images[:1])
    variables = random_batch_norms(variables, jax.random.key(2))
    variables["params"]["conv2"]["bias"] = 0.1 * jax.random.normal(jax.random.key(3), (8,))
    return model, variables, images


def _calibrated(model, variables, images, bits):
    return eqjax.calibrate(model, variables, [images], eqjax.PTQConfig(w_bits=bits, a_bits=bits, keep_first_last_bits=None))


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_forward_accumulators_are_exact_and_logits_match_fake_quant(cnn, bits):
    model, variables, images = cnn
    policy = _calibrated(model, variables, images, bits)
    apply_fn, state = eqjax.quantize_model(model, variables, policy)
    reference = apply_fn(state, images)
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])
    assert {n: layer.a_signed for n, layer in artifact.layers.items()} == {
        "conv1": (True,), "conv2": (False,), "shortcut": (False,), "head": (True,)}
    # The integer weights are the fake-quant kernel's: s · q == quantize_weights(kernel), channel by channel.
    fake = apply.quantize_weights(variables, policy)
    q, s = artifact_lib.integer_weights(variables, policy)["conv2"]
    np.testing.assert_array_equal(np.asarray(q, np.float32) * s, fake["params"]["conv2"]["kernel"])
    accumulators = {}
    logits = integer.integer_apply(model, artifact, images, accumulators=accumulators)
    np.testing.assert_allclose(logits, reference, atol=2e-6 * float(jnp.max(jnp.abs(reference))) + 1e-6)
    assert bool(jnp.all(jnp.argmax(logits, -1) == jnp.argmax(reference, -1)))
    # Each accumulator is, exactly, the integer conv of this path's integer input and the integer kernel.
    for name, stride in (("conv1", 1), ("conv2", 2)):
        acc, (q_x,) = accumulators[name]
        expected = jax.lax.conv_general_dilated(q_x, jnp.asarray(artifact.layers[name].weight, jnp.int32),
                                                (stride, stride), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert acc.dtype == jnp.int32 and int(jnp.max(q_x)) > (127 if name == "conv2" and bits == 8 else 0)
        np.testing.assert_array_equal(acc, expected)
    # conv1's input is the image itself: its integers are the fake-quant path's own.
    x_hat = apply.quantize_input(policy["conv1"], 0, images)
    np.testing.assert_array_equal(np.asarray(accumulators["conv1"][1][0], np.float32) * artifact.layers["conv1"].a_scale[0],
                                  x_hat)


def test_depthwise_convs_accumulate_exactly_in_float32():
    class Depthwise(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3), name="stem")(x))
            x = nn.Conv(16, (5, 5), feature_group_count=16, name="depthwise")(x)
            return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))

    model = Depthwise()
    images = jax.random.normal(jax.random.key(0), (4, 10, 10, 3))
    variables = model.init(jax.random.key(1), images[:1])
    policy = _calibrated(model, variables, images, 8)
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])
    layer = artifact.layers["depthwise"]
    assert layer.a_signed == (False,)  # the shifted unsigned grid: 25 taps * 128 * 127 < 2^24
    assert integer.exact_in_float32(layer, nn.Conv(16, (5, 5), feature_group_count=16))
    assert not integer.exact_in_float32(artifact.layers["stem"], nn.Conv(16, (3, 3)))  # ungrouped: int8 kernels
    assert not integer.exact_in_float32(layer.replace(weight=np.zeros((33, 33, 1, 16), np.int8)),  # 33² taps: 2^24
                                        nn.Conv(16, (33, 33), feature_group_count=16))
    accumulators = {}
    integer.integer_apply(model, artifact, images, accumulators=accumulators)
    acc, (q_x,) = accumulators["depthwise"]
    expected = jax.lax.conv_general_dilated(q_x, jnp.asarray(layer.weight, jnp.int32), (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=16)
    assert acc.dtype == jnp.int32 and int(jnp.max(q_x)) > 127
    np.testing.assert_array_equal(acc, expected)


def test_integer_forward_and_onnx_export_of_a_small_vit_match_fake_quant():
    _, model, variables, images, policy = make_tiny_vit(8)
    apply_fn, state = eqjax.quantize_model(model, variables, policy)
    reference = apply_fn(state, images)
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])
    assert artifact.layers["blocks.0.attn.qk_matmul"].kind == "matmul"
    accumulators = {}
    logits = integer.integer_apply(model, artifact, images, accumulators=accumulators)
    acc, (probabilities, values) = accumulators["blocks.0.attn.av_matmul"]
    assert acc.dtype == jnp.int32 and int(jnp.max(probabilities)) > 127  # the unsigned 8-bit grid, shifted
    np.testing.assert_array_equal(acc, jnp.einsum("bhqk,bkhd->bqhd", probabilities, values))
    np.testing.assert_allclose(logits, reference, atol=1e-4 * float(jnp.max(jnp.abs(reference))))
    jitted = integer.integer_jit(model)(artifact.layers, artifact.variables, images)
    np.testing.assert_allclose(jitted, logits, atol=1e-5 * float(jnp.max(jnp.abs(logits))))
    if importlib.util.find_spec("onnxruntime"):  # LayerNorm, GELU, softmax and both attention matmuls in ONNX
        graph = onnx_export.export(model, artifact, batch_size=len(images))
        exported = onnx_export.session(graph, threads=1).run(None, {"images": np.asarray(images)})[0]
        np.testing.assert_allclose(exported, reference, atol=1e-3 * float(jnp.max(jnp.abs(reference))))


def test_artifact_file_round_trips_packed_and_refuses_damage(cnn, tmp_path):
    model, variables, images = cnn
    policy = eqjax.policy.set_bits(_calibrated(model, variables, images, 4), {"conv2": (2, 4)})
    artifact = artifact_lib.build(model, variables, policy, example=images[:1], manifest={"model": "cnn"})
    path = str(tmp_path / "model.safetensors")
    size = artifact_lib.save(path, artifact)
    assert size == os.path.getsize(path) and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    assert oct(os.stat(path).st_mode & 0o777) != "0o600"
    loaded = artifact_lib.load(path)
    assert loaded.manifest["model"] == "cnn" and loaded.manifest["layers"]["conv2"]["w_bits"] == 2
    for name, layer in artifact.layers.items():
        np.testing.assert_array_equal(loaded.layers[name].weight, layer.weight)
    np.testing.assert_array_equal(integer.integer_apply(model, loaded, images), integer.integer_apply(model, artifact, images))
    with open(path, "rb") as f:
        data = f.read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors is not a readable integer artifact"):
        artifact_lib.load(str(truncated))
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside the last tensor's bytes
    altered = tmp_path / "altered.safetensors"
    altered.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"altered\.safetensors is damaged: tensor .* does not match its digest"):
        artifact_lib.load(str(altered))
    text = tmp_path / "text.safetensors"
    text.write_text("not a model")
    with pytest.raises(ValueError, match="text.safetensors is not a readable integer artifact"):
        artifact_lib.load(str(text))


def test_a_mismatched_model_and_unsupported_quantizers_are_named(cnn):
    model, variables, images = cnn
    policy = _calibrated(model, variables, images, 8)
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(16, (3, 3), use_bias=False, name="conv1")(x)
            return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))

    with pytest.raises(ValueError, match=r"does not match the model: conv1 \(kernel \(3, 3, 3, 8\) in the artifact, "
                                         r"\(3, 3, 3, 16\) in the model\); conv2 \(not a layer of the model\)"):
        artifact_lib.check_matches(artifact, Wider(), images[:1])
    offset = dict(policy, conv2=policy["conv2"]._replace(a_offset=jnp.array([0.1])))
    with pytest.raises(ValueError, match="layer 'conv2' cannot be exported as integers: an asymmetric activation grid"):
        artifact_lib.build(model, variables, offset, example=images[:1])
    wide = eqjax.policy.set_bits(policy, {"head": (12, 8)})
    with pytest.raises(ValueError, match="layer 'head' cannot be exported as integers: 12-bit weights"):
        artifact_lib.build(model, variables, wide, example=images[:1])


@pytest.mark.parametrize("bits, weight_type", [(8, "uint8"), (4, "int4")])
def test_onnx_export_runs_in_onnx_runtime_with_the_fake_quant_predictions(cnn, bits, weight_type, tmp_path):
    pytest.importorskip("onnxruntime")
    model, variables, images = cnn
    policy = _calibrated(model, variables, images, bits)
    apply_fn, state = eqjax.quantize_model(model, variables, policy)
    reference = np.asarray(apply_fn(state, images))
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])
    path = str(tmp_path / "model.onnx")
    proto = onnx_export.export(model, artifact, batch_size=len(images), weight_type=weight_type, path=path)
    ops = [n.op_type for n in proto.graph.node]
    # conv2 and the shortcut read one tensor on one grid: one quantizer for both.
    assert ops.count("QuantizeLinear") == 3 and ("Clip" in ops) == (bits < 8)
    initializers = {i.name: i for i in proto.graph.initializer}
    import onnx
    expected_type = onnx.TensorProto.INT4 if weight_type == "int4" else onnx.TensorProto.UINT8
    assert initializers[next(n for n in initializers if n.startswith("conv2.q"))].data_type == expected_type
    logits = onnx_export.session(path, threads=1).run(None, {"images": np.asarray(images)})[0]
    scale = float(np.max(np.abs(reference)))
    # W8A8 convs take an int32 bias (QLinearConv's), which moves outputs by under half an accumulator unit.
    np.testing.assert_allclose(logits, reference, atol=(3e-3 if bits == 8 else 1e-5) * scale)
    np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(reference, -1))
    fp32 = artifact_lib.float_artifact(model, variables, example=images[:1])
    fp32_logits = onnx_export.session(onnx_export.export(model, fp32, batch_size=len(images))).run(
        None, {"images": np.asarray(images)})[0]
    np.testing.assert_allclose(fp32_logits, model.apply(variables, images), atol=1e-5 * scale)


def test_full_integer_onnx_graph_runs_every_conv_as_qlinearconv(cnn, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx
    model, variables, images = cnn
    # conv2's channel 0 nearly dead (weights 1e-9 of its bias, as in Lite0): int32 cannot hold its bias.
    params = dict(variables["params"], conv2={"kernel": variables["params"]["conv2"]["kernel"].at[..., 0].multiply(1e-9),
                                              "bias": variables["params"]["conv2"]["bias"].at[0].set(0.5)})
    variables = dict(variables, params=params)
    artifact = artifact_lib.build(model, variables, _calibrated(model, variables, images, 8), example=images[:1])
    scales = onnx_export.residual_scales(model, artifact, [images[:8], images[8:]])
    # The shortcut conv's output and conv2's ReLU output: neither is a quantized layer input.
    assert set(scales) == {"residual0.0", "residual0.1"} and all(g["scale"] > 0 for g in scales.values())
    assert not scales["residual0.0"]["signed"] and scales["residual0.1"]["signed"]  # a ReLU output; a conv's

    def optimized_ops(proto):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(onnx_export.INEXACT_ORT_OPTIMIZERS))
        return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    exact = onnx_export.export(model, artifact, batch_size=len(images), weight_type="int8")
    full = onnx_export.export(model, artifact, batch_size=len(images), weight_type="int8", residual_scales=scales)
    assert optimized_ops(exact).count("QLinearConv") < 3  # convs before the add dequantize their kernels
    # (and conv2 keeps a float bias in the exact graph; the full-integer one makes its channel 0 its bias alone)
    ops = optimized_ops(full)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops and "FusedConv" not in ops
    reference = np.asarray(integer.integer_apply(model, artifact, images))
    logits = onnx_export.session(full).run(None, {"images": np.asarray(images)})[0]
    # One more 8-bit rounding of each residual operand: close, not equal.
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(np.max(np.abs(reference))))
    assert not np.allclose(logits, reference, atol=1e-6 * float(np.max(np.abs(reference))))
    with pytest.raises(ValueError, match="no scale for residual operand 'residual0.0'"):
        onnx_export.export(model, artifact, batch_size=2, residual_scales={"residual9.0": scales["residual0.0"]})
    with pytest.raises(ValueError, match=r"batches of one size, got sizes \[8, 4\]"):
        onnx_export.residual_scales(model, artifact, [images[:8], images[8:12]])


def test_onnx_export_names_a_primitive_it_cannot_translate(cnn):
    pytest.importorskip("onnx")

    class Sorting(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="head")(jnp.sort(x.reshape(len(x), -1), axis=-1))

    model, images = Sorting(), jnp.ones((2, 3, 3, 1))
    variables = model.init(jax.random.key(0), images)
    artifact = artifact_lib.float_artifact(model, variables, example=images[:1])
    with pytest.raises(ValueError, match="the JAX primitive 'sort' .* has no ONNX translation"):
        onnx_export.export(model, artifact, batch_size=2)
    with pytest.raises(ValueError, match="weight_type must be one of"):
        onnx_export.export(model, artifact, batch_size=2, weight_type="int3")


@pytest.mark.parametrize("bits, keep, conv2_types", [(8, None, ("int8", "int8", -128)), (4, 8, ("int5", "int5", None))])
def test_qwix_export_runs_the_artifacts_integers_in_qwix(cnn, bits, keep, conv2_types):
    pytest.importorskip("qwix")
    model, variables, images = cnn
    policy = eqjax.calibrate(model, variables, [images],
                             eqjax.PTQConfig(w_bits=bits, a_bits=bits, keep_first_last_bits=keep))
    artifact = artifact_lib.build(model, variables, policy, example=images[:1])
    reference = integer.integer_apply(model, artifact, images)
    exported = qwix_export.export(model, artifact, example=images[:1])
    rules = exported.describe()
    assert (rules["conv2"]["weight_qtype"], rules["conv2"]["act_qtype"], rules["conv2"]["act_zero_point"]) == conv2_types
    assert rules["conv1"]["act_zero_point"] is None and rules["head"]["op"] == "dot_general"
    kernel = exported.variables["params"]["conv2"]["kernel"].array
    np.testing.assert_array_equal(kernel.qvalue, artifact.layers["conv2"].weight)  # the artifact's integers
    logits = jax.jit(exported.apply)(exported.variables, images)
    np.testing.assert_allclose(logits, reference, atol=1e-6 * float(jnp.max(jnp.abs(reference))))
    hlo = jax.jit(exported.apply).lower(exported.variables, images).as_text()
    convolutions = [line for line in hlo.splitlines() if "stablehlo.convolution" in line]
    assert len(convolutions) >= 3 and all("xi8>" in line for line in convolutions)  # on integers, zero points too


def test_qwix_export_names_each_layer_qwix_cannot_express(cnn):
    model, variables, images = cnn
    policy = _calibrated(model, variables, images, 8)
    cases = {"conv1": ((4, 4), "Qwix holds int4 in 4-bit storage, which XLA:CPU does not compile"),
             "conv2": ((8, 4), "8-bit weights do not fit the int5 type of its 4-bit inputs")}
    for name, (bits, message) in cases.items():
        narrow = eqjax.policy.set_bits(policy, {name: bits})
        with pytest.raises(ValueError, match=f"layer '{name}' has no Qwix form: {message}"):
            qwix_export.check_policy(model, narrow, example=images[:1])
        with pytest.raises(ValueError, match=f"layer '{name}' has no Qwix form: {message}"):
            qwix_export.export(model, artifact_lib.build(model, variables, narrow, example=images[:1]),
                               example=images[:1])
    float_inputs = dict(policy, shortcut=policy["shortcut"]._replace(a_enabled=jnp.asarray(False)))
    with pytest.raises(ValueError, match="layer 'shortcut' has no Qwix form: a conv with float inputs"):
        qwix_export.check_policy(model, float_inputs, example=images[:1])
    # Off the CPU a signed 4-bit input is Qwix's int4; a weight-only dense keeps float inputs.
    assert qwix_export.layer_types("conv1", "conv", 4, 4, (True,), backend="gpu").act_bits == 4
    assert qwix_export.layer_types("head", "dense", 8, None).act_bits is None
    _, vit, vit_variables, vit_images, vit_policy = make_tiny_vit(8)
    with pytest.raises(ValueError, match=r"layer 'blocks.0.attn.qk_matmul' has no Qwix form: a matmul of two"):
        qwix_export.check_policy(vit, vit_policy, example=vit_images[:1])


def test_deploy_script_end_to_end(tmp_path):
    pytest.importorskip("onnxruntime")
    from tests.image_tar import write_image_tar
    from experiments import deploy, workload

    rng = np.random.default_rng(0)
    tar = write_image_tar(tmp_path / "toy.tar", {f"class{c}": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                                                              for _ in range(4)] for c in range(4)})
    config = deploy.DeployRunConfig(
        workload=workload.WorkloadConfig(model="resnet18_cifar", weights="random", dataset=f"tar:{tar}",
                                         calib_dataset=f"tar:{tar}", eval_images=8, calib_images=8, batch_size=8),
        ptq=eqjax.PTQConfig(w_bits=4, a_bits=8), latency_batch_sizes=(1,), latency_repeats=1, workdir=str(tmp_path),
        qwix=importlib.util.find_spec("qwix") is not None, quantize_residuals=True)
    result = deploy.run(config, log=lambda line: None)
    with open(result["results_path"]) as f:
        written = json.load(f)
    evaluation = written["evaluation"]
    assert set(evaluation) == {"fp32", "fake_quant", "integer", "ort_int", "ort_fp32", "ort_int_residual"} | (
        {"qwix"} if config.qwix else set())
    assert len(written["residual_scales"]) == 11  # 8 blocks: 8 second convs + 3 projection shortcuts
    assert evaluation["integer"]["top1_agreement_with_fake_quant"] == 100.0
    if config.qwix:  # 4-bit kernels in Qwix's int8 type beside 8-bit inputs
        assert evaluation["qwix"]["top1_agreement_with_fake_quant"] == 100.0
        assert written["qwix_rules"]["layer1.0.conv1"]["weight_qtype"] == "int8"
    assert written["bytes"]["artifact"] < 0.2 * written["bytes"]["fp32_artifact"]
    assert written["bytes"]["model_onnx"] < 0.3 * written["bytes"]["fp32_onnx"]  # each kernel stored once, as 8 bits
    assert set(written["latency_ms"]["1"]) == set(evaluation)
    assert written["energy_weight_memory_bytes"]["ratio"] < 0.2
    assert (tmp_path / "deploy" / "deploy.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--latency_repeats must be >= 1"):
        deploy.DeployRunConfig(workload=config.workload, ptq=config.ptq, latency_repeats=0)
    with pytest.raises(ValueError, match="--quantize_residuals is an ONNX export"):
        deploy.DeployRunConfig(workload=config.workload, ptq=config.ptq, onnx=False, quantize_residuals=True)
