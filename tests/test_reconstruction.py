"""Reconstruction PTQ: AdaRound's core, BRECQ / QDrop over units, saving, and bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models, ptq
from eqjax.quant import apply, numerics
from eqjax.algorithms import reconstruction
from eqjax.algorithms import reconstruction_core as core
from eqjax.models import resnet

TINY = dict(stage_sizes=(2,), widths=(8,))


def test_initial_rounding_is_round_to_nearest_and_regularizer_ends():
    w = jax.random.normal(jax.random.key(0), (3, 3, 4, 8), jnp.float32)
    scale = numerics.absmax_scale(w, 4, axis=-1).reshape(1, 1, 1, 8)
    q_min, q_max = numerics.quant_range(4)
    v = core.init_rounding(w, scale)
    x = np.asarray(w * (1.0 / scale))  # x·(1/s), as every quantizer of eqjax computes it
    np.testing.assert_allclose(core.rectified_sigmoid(v), x - np.floor(x), atol=2e-5)
    hard = core.adaround_weights(w, scale, v, q_min, q_max, hard=True)
    nearest = numerics.quantize(w, 4, scale=scale.reshape(8), axis=-1)
    away_from_ties = np.abs(x - np.floor(x) - 0.5) > 1e-3
    np.testing.assert_allclose(np.asarray(hard)[away_from_ties], np.asarray(nearest)[away_from_ties], atol=1e-6)
    assert float(core.rounding_regularizer(jnp.array([-50.0, 50.0]), 2.0)) == 0.0
    assert float(core.rounding_regularizer(jnp.array([0.0]), 2.0)) == pytest.approx(1.0, abs=1e-6)
    beta, on = core.beta_schedule(0, 100)
    assert not bool(on) and float(beta) == 20.0
    beta, on = core.beta_schedule(100, 100)
    assert bool(on) and float(beta) == pytest.approx(2.0)
    x_q = jnp.zeros((1000,))
    assert bool(jnp.all(core.drop_quantization(jax.random.key(0), jnp.ones((1000,)), x_q, 0.0) == 0))
    assert 400 < int(jnp.sum(core.drop_quantization(jax.random.key(0), jnp.ones((1000,)), x_q, 0.5))) < 600


class TwoConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        return nn.Conv(8, (3, 3), name="conv2")(x)


def test_adaround_lowers_the_layer_output_error():
    model = TwoConv()
    images = np.asarray(jax.random.normal(jax.random.key(0), (64, 8, 8, 3), jnp.float32))
    variables = model.init(jax.random.key(1), images[:1])
    config = ptq.PTQConfig(w_bits=3, a_bits=8, keep_first_last_bits=None)
    policy = ptq.calibrate(model, variables, [images], config)
    result = reconstruction.reconstruct(model, variables, policy, images, reconstruction.ReconstructionConfig(
        method="adaround", iterations=300, batch_size=32, rounding_lr=1e-2))
    assert [u["unit"] for u in result.units] == ["conv1", "conv2"]
    # Learned rounding is never worse than nearest; on conv2 (72 weights per output channel,
    # 3-bit) it removes about a quarter of the output error (conv1 has 27: little to choose).
    for unit in result.units:
        assert unit["error_after"] < unit["error_nearest"], unit
    assert result.units[1]["error_after"] < 0.85 * result.units[1]["error_nearest"], result.units[1]
    assert set(result.rounding) == {"conv1", "conv2"} and result.rounding["conv1"].dtype == np.int8
    qvars = reconstruction.quantized_variables(variables, result.policy, result.rounding, result.weight_scales)
    q = np.asarray(qvars["params"]["conv1"]["kernel"]) / result.weight_scales["conv1"]
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)  # on the 3-bit grid
    assert np.round(q).min() >= -4 and np.round(q).max() <= 3  # the signed 3-bit grid is [-4, 3]
    # Rounding every weight up clamps at the grid's ends exactly (NumPy: clip(floor(w/s) + 1, -4, 3)).
    ups = {n: np.ones_like(r) for n, r in result.rounding.items()}
    all_up = reconstruction.quantized_variables(variables, result.policy, ups, result.weight_scales)
    kernel, scale = np.asarray(variables["params"]["conv2"]["kernel"]), result.weight_scales["conv2"]
    by_hand = np.clip(np.floor(kernel / scale) + 1, -4, 3) * scale
    np.testing.assert_allclose(all_up["params"]["conv2"]["kernel"], by_hand, rtol=1e-6, atol=1e-7)
    assert np.isclose(by_hand / scale, 3).any()  # the top of the grid is reached, and not passed


@pytest.fixture(scope="module")
def tiny_resnet():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, **TINY)
    variables = spec.init(jax.random.key(0), num_classes=10, **TINY)
    images = np.asarray(jax.random.normal(jax.random.key(1), (32, 32, 32, 3), jnp.float32))
    return model, variables, images


def _policy(model, variables, images, bits):
    return ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=bits, keep_first_last_bits=8))


is_block = lambda module: isinstance(module, resnet.BasicBlock)


def test_qdrop_with_p_zero_equals_brecq_and_units_compile_once(tiny_resnet):
    model, variables, images = tiny_resnet
    reconstruction._unit_functions.cache_clear()
    traces = []
    original = reconstruction.core.reconstruction_error

    def counting(*args):
        traces.append(1)
        return original(*args)

    reconstruction.core.reconstruction_error = counting
    try:
        runs = {}
        for method, p in (("brecq", 0.5), ("qdrop", 0.0)):
            runs[method] = reconstruction.reconstruct(
                model, variables, _policy(model, variables, images, 4), images,
                reconstruction.ReconstructionConfig(method=method, iterations=4, batch_size=8, drop_prob=p),
                is_block=is_block)
        reconstruction.reconstruct(model, variables, _policy(model, variables, images, 6), images,
                                   reconstruction.ReconstructionConfig(method="qdrop", iterations=4, batch_size=8),
                                   is_block=is_block)
    finally:
        reconstruction.core.reconstruction_error = original
    assert [u["unit"] for u in runs["brecq"].units] == ["conv1", "layer1.0", "layer1.1", "fc"]
    for name in runs["brecq"].rounding:
        np.testing.assert_array_equal(runs["brecq"].rounding[name], runs["qdrop"].rounding[name])
    jax.tree_util.tree_map(np.testing.assert_array_equal, runs["brecq"].policy, runs["qdrop"].policy)
    # Three unit architectures (conv1, the two equal blocks, fc); each traces its step and its
    # error function once, whatever the method, drop probability or bits.
    assert len(traces) == 6, len(traces)



def _learned(result):
    """The learned state of a reconstruction: roundings and clips, as one flat float64 vector."""
    parts = [np.asarray(result.rounding[n], np.float64).ravel() for n in sorted(result.rounding)]
    parts += [np.asarray(lq.a_clip, np.float64).ravel() for lq in result.policy.values()]
    return np.concatenate(parts)


def test_qdrop_drops_at_its_rate_and_fisher_weights_change_the_result(tiny_resnet):
    """QDrop with p = 0.5 and the Fisher-weighted loss each change what BRECQ learns (same seed)."""
    x, x_q = jnp.zeros((200_000,)), jnp.ones((200_000,))
    kept_fp = float(jnp.mean(core.drop_quantization(jax.random.key(0), x, x_q, 0.5) == 0.0))
    assert abs(kept_fp - 0.5) < 0.01  # binomial standard deviation 0.0011
    assert bool(jnp.all(core.drop_quantization(jax.random.key(0), x, x_q, 0.0) == 1.0))
    out, target, weight = (np.random.default_rng(i).normal(size=(4, 3, 5)).astype(np.float32) for i in range(3))
    by_hand = np.mean(np.sum(np.abs(weight) * (out - target) ** 2, axis=-1))
    assert float(core.reconstruction_error(out, target, np.abs(weight))) == pytest.approx(by_hand, rel=1e-5)

    model, variables, images = tiny_resnet
    policy = _policy(model, variables, images, 4)
    run = lambda **kw: _learned(reconstruction.reconstruct(model, variables, policy, images, reconstruction.ReconstructionConfig(
        iterations=4, batch_size=8, **kw), is_block=is_block))
    brecq = run(method="brecq")
    assert not np.array_equal(run(method="qdrop", drop_prob=0.5), brecq)
    assert not np.array_equal(run(method="brecq", fisher=True), brecq)


def test_saved_state_reloads_to_identical_logits(tiny_resnet, tmp_path):
    model, variables, images = tiny_resnet
    policy = _policy(model, variables, images, 4)
    result = reconstruction.reconstruct(model, variables, policy, images,
                                        reconstruction.ReconstructionConfig(iterations=3, batch_size=8),
                                        is_block=is_block)
    reconstruction.save(str(tmp_path / "state"), result)
    loaded = reconstruction.load(str(tmp_path / "state"), policy)
    logits = []
    for r in (result, loaded):
        qvars = reconstruction.quantized_variables(variables, r.policy, r.rounding, r.weight_scales)
        logits.append(apply.quantized_apply(model, qvars, r.policy, images[:4], quantize_kernels=False))
    np.testing.assert_array_equal(*logits)
    assert loaded.info["method"] == "brecq" and loaded.info["iterations"] == 3
    with pytest.raises(ValueError, match="made for other layers or bits"):
        reconstruction.load(str(tmp_path / "state"), _policy(model, variables, images, 6))


def test_killed_reconstruction_resumes_after_its_last_unit_to_the_same_state(tiny_resnet, tmp_path):
    model, variables, images = tiny_resnet
    policy = _policy(model, variables, images, 4)
    config = reconstruction.ReconstructionConfig(method="qdrop", iterations=4, batch_size=8)  # random drops too
    whole = reconstruction.reconstruct(model, variables, policy, images, config, is_block=is_block)
    assert len(whole.units) >= 3
    partial = str(tmp_path / "partial")

    def kill_after_second_unit(p):
        if p.get("done") and p["index"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reconstruction.reconstruct(model, variables, policy, images, config, is_block=is_block,
                                   on_progress=kill_after_second_unit, checkpoint_dir=partial)
    events = []
    resumed = reconstruction.reconstruct(model, variables, policy, images, config, is_block=is_block,
                                         on_progress=events.append, checkpoint_dir=partial)
    assert events[0]["resumed"] and events[0]["index"] == 2
    assert [u["unit"] for u in resumed.units] == [u["unit"] for u in whole.units]
    assert resumed.rounding.keys() == whole.rounding.keys()
    for name in whole.rounding:
        np.testing.assert_array_equal(resumed.rounding[name], whole.rounding[name])
    for name in whole.policy:
        np.testing.assert_array_equal(resumed.policy[name].a_clip, whole.policy[name].a_clip)
    other = reconstruction.ReconstructionConfig(method="qdrop", iterations=5, batch_size=8)
    with pytest.raises(ValueError, match="holds a reconstruction of other images, layers or settings"):
        reconstruction.reconstruct(model, variables, policy, images, other, is_block=is_block,
                                   checkpoint_dir=partial)


def test_bad_input_fails_before_long_work(tiny_resnet):
    model, variables, images = tiny_resnet
    with pytest.raises(ValueError, match="method must be one of"):
        reconstruction.ReconstructionConfig(method="gptq")
    with pytest.raises(ValueError, match="iterations must be >= 1, got 0"):
        reconstruction.ReconstructionConfig(iterations=0)
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\)"):
        reconstruction.ReconstructionConfig(drop_prob=1.0)
    uncalibrated = ptq.build_policy(ptq.layer_calls(model, images[:1]), ptq.PTQConfig(w_bits=4))
    with pytest.raises(ValueError, match="policy is not calibrated"):
        reconstruction.reconstruct(model, variables, uncalibrated, images)
    with pytest.raises(ValueError, match="blocks that name no module of the model: layer9"):
        reconstruction.reconstruct(model, variables, _policy(model, variables, images, 4), images,
                                   blocks=["layer1.0", "layer9"])
    with pytest.raises(ValueError, match="bits must be in"):
        ptq.PTQConfig(w_bits=1)


def test_non_finite_loss_stops_the_unit_and_keeps_nearest_rounding():
    model = TwoConv()
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 8, 8, 3), jnp.float32))
    variables = model.init(jax.random.key(1), images[:1])
    policy = ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=4, keep_first_last_bits=None))
    result = reconstruction.reconstruct(model, variables, policy, images, reconstruction.ReconstructionConfig(
        method="brecq", iterations=100, batch_size=8, clip_lr=1e30))
    assert [u["stopped"]["step"] for u in result.units] == [100, 100]
    assert result.info["stopped_units"] == ["conv1", "conv2"]
    jax.tree_util.tree_map(np.testing.assert_array_equal, result.policy, policy)  # calibrated clips kept
    qvars = reconstruction.quantized_variables(variables, policy, result.rounding, result.weight_scales)
    nearest = apply.quantize_weights(variables, policy)
    np.testing.assert_allclose(qvars["params"]["conv2"]["kernel"], nearest["params"]["conv2"]["kernel"], atol=1e-6)


def test_fisher_weight_of_the_logits_is_the_softmax_difference_squared(tiny_resnet):
    """For the last unit (the logits z), ∂KL(p_fp ‖ softmax(z))/∂z = softmax(z) − p_fp per image."""
    model, variables, images = tiny_resnet
    policy = _policy(model, variables, images[:16], 4)
    weights = reconstruction.fisher_weights(model, variables, policy, images[:16], ["layer1.1", "fc"], batch_size=8)
    qvars = apply.quantize_weights(variables, policy)
    z = apply.quantized_apply(model, qvars, policy, images[:16], quantize_kernels=False)
    g2 = np.square(np.asarray(jax.nn.softmax(z) - jax.nn.softmax(model.apply(variables, images[:16]))))
    np.testing.assert_allclose(weights["fc"], g2 / g2.mean(), rtol=2e-3, atol=1e-6)
    assert weights["layer1.1"].shape == (16, 32, 32, 8)
    np.testing.assert_allclose(weights["layer1.1"].mean(), 1.0, rtol=1e-5)
    result = reconstruction.reconstruct(model, variables, policy, images,
                                        reconstruction.ReconstructionConfig(iterations=3, batch_size=8, fisher=True),
                                        is_block=is_block)
    assert result.info["config"]["fisher"] and all(np.isfinite(u["error_after"]) for u in result.units)


def test_steps_per_call_change_nothing_and_bfloat16_storage_stays_close(monkeypatch):
    """The loop draws mini-batches and masks on the device from the key alone: one step per call
    (the CPU default) and chunks of steps in one lax.fori_loop give the same reconstruction;
    bfloat16 activations stay close to float32."""
    model = TwoConv()
    images = np.asarray(jax.random.normal(jax.random.key(0), (16, 8, 8, 3), jnp.float32))
    variables = model.init(jax.random.key(1), images[:1])
    policy = ptq.calibrate(model, variables, [images], ptq.PTQConfig(w_bits=3, keep_first_last_bits=None))
    run = lambda **kw: reconstruction.reconstruct(model, variables, policy, images, reconstruction.ReconstructionConfig(
        method="qdrop", iterations=6, batch_size=4, rounding_lr=5e-2, clip_lr=1e-2, **kw))
    per_step, chunks = run(chunk_steps=1), run(chunk_steps=4)  # chunks of 4 and 2 steps
    for name in per_step.rounding:
        np.testing.assert_array_equal(per_step.rounding[name], chunks.rounding[name])
    for name, lq in per_step.policy.items():
        np.testing.assert_allclose(lq.a_clip, chunks.policy[name].a_clip, rtol=1e-5)
        assert not np.allclose(lq.a_clip, policy[name].a_clip)  # the clips were learned
    half = run(chunk_steps=1, activation_dtype="bfloat16")
    for name, lq in per_step.policy.items():
        np.testing.assert_allclose(lq.a_clip, half.policy[name].a_clip, rtol=0.05)
    # Activations that do not fit the device's free memory: one error naming the size and the ways out.
    monkeypatch.setattr(reconstruction, "free_device_bytes", lambda: 1000)
    with pytest.raises(ValueError, match=r"need 0\.00 GiB on the device, 0\.00 GiB are free: use fewer calibration "
                                         r"images or activation_dtype='bfloat16'"):
        run(chunk_steps=1)
    with pytest.raises(ValueError, match="activation_dtype must be one of"):
        reconstruction.ReconstructionConfig(activation_dtype="int8")
    with pytest.raises(ValueError, match="chunk_steps must be >= 1 or None, got 0"):
        reconstruction.ReconstructionConfig(chunk_steps=0)
