"""Quantization-aware training: LSQ gradients by hand, LSQ+ grids, the folded start, one compilation,
the loss below round-to-nearest, exact resume, the result read back, and bad inputs before training."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from eqjax import ptq, training
from eqjax.algorithms import qat
from eqjax.quant import apply, folding, numerics, policy as policy_lib
from experiments import qat as qat_script, workload as workload_lib
from tests.image_tar import write_image_tar
from tests.test_experiments import run as run_module


class SmallCNN(nn.Module):
    """Conv -> BatchNorm -> ReLU, twice, then a dense head: any Flax model with BatchNorm."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, width in enumerate((8, 16)):
            x = nn.Conv(width, (3, 3), strides=1 + i, use_bias=False, name=f"conv{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, name=f"bn{i}")(x)
            x = nn.relu(x)
        return nn.Dense(4, name="head")(x.mean(axis=(1, 2)))


MEAN, STD = (0.5,) * 3, (0.25,) * 3


@pytest.fixture(scope="module")
def small():
    """The model with non-trivial BatchNorm statistics, learnable uint8 images, and a W2A2 policy."""
    model = SmallCNN()
    rng = np.random.default_rng(0)
    labels = np.arange(64, dtype=np.int32) % 4
    images = rng.integers(0, 90, (64, 12, 12, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, ..., label % 3] += 120 if label < 3 else 0
    x = training.normalize(jnp.asarray(images), jnp.asarray(MEAN), jnp.asarray(STD))
    variables = model.init(jax.random.key(0), x[:1])
    stats = jax.tree_util.tree_map(lambda v: v, variables["batch_stats"])
    for bn in ("bn0", "bn1"):
        n = stats[bn]["mean"].shape[0]
        stats[bn] = {"mean": jnp.linspace(-0.3, 0.3, n), "var": jnp.linspace(0.5, 2.0, n)}
    variables = {"params": variables["params"], "batch_stats": stats}
    calls = ptq.layer_calls(model, x[:1], variables=variables)
    config = ptq.PTQConfig(w_bits=2, a_bits=2, keep_first_last_bits=None)
    statistics = ptq.collect_statistics(model, variables, [x], calls=calls)
    policy = ptq.with_clips(ptq.build_policy(calls, config), statistics, config)
    return dict(model=model, variables=variables, images=images, labels=labels, x=x, calls=calls, policy=policy,
                statistics=statistics)


def test_activation_step_gradient_with_lsq_scale_equals_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (2, 5, 3)).astype(np.float32)  # 15 values per image share one step
    weights = rng.normal(0, 1, x.shape).astype(np.float32)
    bits, step = 3, np.float32(0.4)
    lq = policy_lib._layer(8, bits, 1, True)._replace(a_clip=jnp.asarray([1.0], jnp.float32))
    setup = qat.QatSetup({"l": lq}, {}, {"l": jnp.asarray([15.0], jnp.float32)})

    def objective(a_step):
        policy, _ = qat.learned_policy(setup, {"w_step": {}, "a_step": {"l": a_step}})
        return jnp.sum(jnp.asarray(weights) * apply.quantize_input(policy["l"], 0, jnp.asarray(x)))

    got = float(jax.grad(objective)(jnp.asarray([step]))[0])
    q_min, q_max = -4, 3
    v = x / step
    d = np.where(v < q_min, q_min, np.where(v > q_max, q_max, np.round(v) - v))
    expected = np.sum(weights * d) / np.sqrt(15 * q_max)  # LSQ eq. 3 times g = 1/sqrt(N Q_P)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_weight_step_gradient_with_lsq_scale_equals_numpy_per_channel():
    rng = np.random.default_rng(2)
    kernel = rng.normal(0, 1, (3, 3, 2, 4)).astype(np.float32)  # HWIO: 18 weights per output channel
    weights = rng.normal(0, 1, kernel.shape).astype(np.float32)
    steps = np.asarray([0.3, 0.5, 0.2, 0.7], np.float32)
    lq = policy_lib._layer(4, 8, 1, True)._replace(a_clip=jnp.ones((1,)))
    setup = qat.QatSetup({"conv": lq}, {"conv": jnp.float32(18)}, {"conv": jnp.ones((1,))})
    variables = {"params": {"conv": {"kernel": jnp.asarray(kernel)}}}

    def objective(w_step):
        policy, scales = qat.learned_policy(setup, {"w_step": {"conv": w_step}, "a_step": {"conv": jnp.ones((1,))}})
        quantized = apply.quantize_weights(variables, policy, scales=scales)["params"]["conv"]["kernel"]
        return jnp.sum(jnp.asarray(weights) * quantized)

    got = np.asarray(jax.grad(objective)(jnp.asarray(steps)))
    v = kernel / steps
    d = np.where(v < -8, -8, np.where(v > 7, 7, np.round(v) - v))
    expected = np.sum(weights * d, axis=(0, 1, 2)) / np.sqrt(18 * 7)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_asymmetric_grid_with_zero_offset_is_the_symmetric_one_and_shifts_by_the_offset():
    x = jnp.linspace(-1.5, 2.5, 41)
    for signed in (True, False):
        lq = policy_lib._layer(8, 3, 1, True)._replace(a_clip=jnp.asarray([1.2]), a_signed=jnp.asarray([signed]))
        symmetric = apply.quantize_input(lq, 0, x)
        zero = apply.quantize_input(lq._replace(a_offset=jnp.zeros((1,))), 0, x)
        np.testing.assert_array_equal(np.asarray(zero), np.asarray(symmetric))
    # LSQ+: beta + s * clamp(round((x - beta) / s), 0, 2^b - 1); gradient to beta 1 where x clamps, else 0
    lq = policy_lib._layer(8, 3, 1, True)._replace(a_clip=jnp.asarray([1.4]), a_signed=jnp.asarray([False]))
    offset = -0.33
    shifted = lambda beta: apply.quantize_input(lq._replace(a_offset=beta), 0, x)
    step = 1.4 / 7
    expected = offset + step * np.clip(np.round((np.asarray(x) - offset) / step), 0, 7)
    np.testing.assert_allclose(np.asarray(shifted(jnp.asarray([offset]))), expected, atol=1e-6)
    grad = jax.grad(lambda beta: jnp.sum(shifted(beta)))(jnp.asarray([offset], jnp.float32))
    outside = np.sum((np.asarray(x) - offset) / step < 0) + np.sum((np.asarray(x) - offset) / step > 7)
    np.testing.assert_allclose(float(grad[0]), float(outside), atol=1e-4)


def test_folded_start_computes_the_fp32_function_and_the_round_to_nearest_model(small):
    start = qat.prepare(small["model"], small["variables"], small["policy"], small["calls"], example=small["x"][:1])
    reference = small["model"].apply(small["variables"], small["x"])
    control, _ = qat.forward(small["model"], qat.control_setup(start.setup), start.trainables,
                             start.variables["batch_stats"], small["x"], config=qat.QatConfig())
    np.testing.assert_allclose(np.asarray(control), np.asarray(reference), atol=1e-5)
    # With quantizers on, the start is round-to-nearest PTQ of the folded model.
    quantized, _ = qat.forward(small["model"], start.setup, start.trainables, start.variables["batch_stats"],
                               small["x"], config=qat.QatConfig())
    folded, _ = folding.fold_batchnorm(small["model"], small["variables"], small["x"][:1])
    apply_fn, state = ptq.quantize(small["model"], folded, small["policy"])
    np.testing.assert_allclose(np.asarray(quantized), np.asarray(apply_fn(state, small["x"])), atol=1e-5)
    assert [(p.layer, p.batchnorm) for p in start.setup.folded] == [("conv0", "bn0"), ("conv1", "bn1")]


def test_bias_corrected_start_is_the_bias_corrected_round_to_nearest_model(small):
    model, variables, x = small["model"], small["variables"], small["x"]
    apply_fn, rounded = ptq.quantize(model, variables, small["policy"])
    corrected, where = folding.correct_bias(model, variables, rounded.variables, small["policy"], [x],
                                            example=x[:1])
    assert where == {"conv0": "batchnorm", "conv1": "batchnorm", "head": "bias"}
    start_variables = qat_script._bias_corrected(variables, rounded.variables, corrected)
    # Float kernels, corrected BatchNorm means.
    np.testing.assert_array_equal(start_variables["params"]["conv0"]["kernel"], variables["params"]["conv0"]["kernel"])
    assert not np.array_equal(start_variables["batch_stats"]["bn0"]["mean"], variables["batch_stats"]["bn0"]["mean"])
    start = qat.prepare(model, start_variables, small["policy"], small["calls"], example=x[:1])
    logits, _ = qat.forward(model, start.setup, start.trainables, start.variables["batch_stats"], x,
                            config=qat.QatConfig())
    expected = apply_fn(rounded.replace(variables=corrected), x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-4)
    assert not np.allclose(np.asarray(logits), np.asarray(apply_fn(rounded, x)), atol=1e-3)


def test_qat_lowers_the_loss_below_round_to_nearest_with_one_compilation(small):
    model, x, labels = small["model"], small["x"], jnp.asarray(small["labels"])
    config = qat.QatConfig()
    start = qat.prepare(model, small["variables"], small["policy"], small["calls"], example=x[:1])
    optimizer = qat.make_optimizer(optax.adam(3e-3), optax.adam(3e-3))
    step = qat.make_step(model, optimizer, config, seed=0, mean=MEAN, std=STD, augmentation=False)

    def loss(trainables):
        logits, _ = qat.forward(model, start.setup, trainables, start.variables["batch_stats"], x, config=config)
        return float(training.cross_entropy(logits, labels))

    state = qat.init_state(start, optimizer)
    before = loss(state.params)
    for _ in range(25):
        state, _ = step(state, start.setup, small["variables"], small["images"], small["labels"])
    assert loss(state.params) < 0.7 * before, (before, loss(state.params))
    assert not np.allclose(np.asarray(state.params["a_step"]["conv1"]), np.asarray(start.trainables["a_step"]["conv1"]))
    # The fold trains W, gamma and beta with the statistics frozen.
    assert not np.allclose(np.asarray(state.params["model"]["bn0"]["scale"]), 1.0)
    for name in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(state.batch_stats["bn0"][name]),
                                      np.asarray(small["variables"]["batch_stats"]["bn0"][name]))
    # Other bits, W/A-separate widths and the all-off control: the same compiled step.
    other = start.setup.replace(policy=policy_lib.set_bits(start.setup.policy, {"conv1": (4, 8), "head": 3}))
    for setup in (other, qat.control_setup(start.setup)):
        state, metrics = step(state, setup, small["variables"], small["images"], small["labels"])
        assert np.isfinite(float(metrics["loss"]))
    assert step._cache_size() == 1
    # What the scripts evaluate (and finalize saves) is the function trained, BatchNorms folded.
    trained, _ = qat.forward(model, start.setup, state.params, state.batch_stats, x, config=config)
    evaluated = ptq.quantized_logits_fn(model)(ptq.QuantizedState(*qat.quantized_model(
        start.setup, start.variables, state.params, state.batch_stats)), x)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(trained), atol=1e-4)
    result = qat.finalize(model, start, state.params, state.batch_stats, config=config, example=x[:1])
    saved = ptq.quantized_logits_fn(model)(ptq.QuantizedState(qat.quantized_variables(result), result.policy), x)
    np.testing.assert_allclose(np.asarray(saved), np.asarray(trained), atol=1e-4)


def test_distillation_loss_is_zero_for_equal_logits_and_matches_numpy():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(0, 2, (5, 7)).astype(np.float32), rng.normal(0, 2, (5, 7)).astype(np.float32)
    assert abs(float(qat.distillation_loss(jnp.asarray(teacher), jnp.asarray(teacher), temperature=2.0))) < 1e-6
    log_softmax = lambda z: z - np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1, keepdims=True)) - z.max(-1, keepdims=True)
    t, s = log_softmax(teacher / 2.0), log_softmax(student / 2.0)
    expected = 4.0 * np.mean(np.sum(np.exp(t) * (t - s), -1))
    np.testing.assert_allclose(float(qat.distillation_loss(jnp.asarray(student), jnp.asarray(teacher), temperature=2.0)),
                               expected, rtol=1e-5)


def test_batchnorm_update_mode_trains_statistics_and_folds_at_the_end(small):
    model, x = small["model"], small["x"]
    config = qat.QatConfig(batchnorm="update", asymmetric=True)
    start = qat.prepare(model, small["variables"], small["policy"], small["calls"], example=x[:1], config=config,
                        statistics=small["statistics"])
    optimizer = qat.make_optimizer(optax.adam(1e-3), optax.adam(1e-3))
    step = qat.make_step(model, optimizer, config, seed=0, mean=MEAN, std=STD)
    state = qat.init_state(start, optimizer)
    for _ in range(3):
        state, _ = step(state, start.setup, small["variables"], small["images"], small["labels"])
    assert not np.allclose(np.asarray(state.batch_stats["bn0"]["mean"]), np.asarray(start.variables["batch_stats"]["bn0"]["mean"]))
    result = qat.finalize(model, start, state.params, state.batch_stats, config=config, example=x[:1])
    # The folded result computes what the trained model computes in inference mode (running statistics).
    policy, scales = qat.learned_policy(start.setup, state.params, gradient_scale=False)
    unfolded = apply.quantize_weights({"params": state.params["model"], "batch_stats": state.batch_stats}, policy,
                                      scales=scales)
    expected = apply.quantized_apply(model, unfolded, policy, x, quantize_kernels=False)
    folded = apply.quantized_apply(model, qat.quantized_variables(result), result.policy, x, quantize_kernels=False)
    np.testing.assert_allclose(np.asarray(folded), np.asarray(expected), atol=2e-4)
    np.testing.assert_array_equal(np.asarray(result.variables["batch_stats"]["bn0"]["mean"]), 0.0)


def test_qat_starts_from_a_reconstructed_state_as_it_is(small):
    from eqjax.algorithms import reconstruction
    model, x = small["model"], small["x"]
    result = reconstruction.reconstruct(model, small["variables"], small["policy"], np.asarray(x[:16]),
                                        reconstruction.ReconstructionConfig(method="adaround", iterations=4,
                                                                            batch_size=8))
    reconstructed = reconstruction.quantized_variables(small["variables"], result.policy, result.rounding,
                                                       result.weight_scales)
    expected = apply.quantized_apply(model, reconstructed, result.policy, x, quantize_kernels=False)
    start = qat.prepare(model, reconstructed, result.policy, small["calls"], example=x[:1],
                        weight_scales=result.weight_scales)  # the scales follow the fold: times |gamma / sigma|
    logits, _ = qat.forward(model, start.setup, start.trainables, start.variables["batch_stats"], x,
                            config=qat.QatConfig())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), atol=1e-4)


def test_prepare_refuses_an_uncalibrated_policy(small):
    uncalibrated = ptq.build_policy(small["calls"], ptq.PTQConfig(w_bits=4))
    with pytest.raises(ValueError, match="policy is not calibrated"):
        qat.prepare(small["model"], small["variables"], uncalibrated, small["calls"], example=small["x"][:1])


# ---------------------------------------------------------------------------------------------
# experiments.qat
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("qat_data")
    make = lambda n: {f"class{c}": [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(n)]
                      for c in range(4)}
    return write_image_tar(folder / "train.tar", make(4)), write_image_tar(folder / "test.tar", make(2))


def _run_config(tars, workdir, **overrides):
    train, test = tars
    workload = workload_lib.WorkloadConfig(model="resnet18_cifar", weights="random", dataset=f"tar:{test}",
                                           calib_dataset=f"tar:{train}", calib_images=8, eval_images=8, batch_size=8)
    fields = dict(workload=workload, ptq=ptq.PTQConfig(w_bits=4, a_bits=4), epochs=2, train_batch_size=8,
                  checkpoint_every=1, log_every=1, workdir=str(workdir))
    fields.update(overrides)
    return qat_script.QatRunConfig(**fields)


def test_killed_qat_run_resumes_bit_identically_and_its_result_loads_back(tars, tmp_path):
    from experiments import ptq as ptq_script
    reference = qat_script.run(_run_config(tars, tmp_path / "a"))
    assert reference["total_steps"] == 4 and len(reference["curve"]) == 2

    def kill_after_step_3(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        qat_script.run(_run_config(tars, tmp_path / "b"), on_step=kill_after_step_3)
    with pytest.raises(FileExistsError, match="--resume"):
        qat_script.run(_run_config(tars, tmp_path / "b"))
    resumed = qat_script.run(_run_config(tars, tmp_path / "b", resume=True))
    a, b = qat.load(reference["final_state"]), qat.load(resumed["final_state"])
    for tree_a, tree_b in ((a.variables, b.variables), (a.weight_scales, b.weight_scales),
                           ({n: lq.a_clip for n, lq in a.policy.items()}, {n: lq.a_clip for n, lq in b.policy.items()})):
        for x, y in zip(jax.tree_util.tree_leaves(tree_a), jax.tree_util.tree_leaves(tree_b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed["top1"] == reference["top1"]
    # experiments.ptq evaluates the saved result to the figure the run reported.
    evaluated = ptq_script.run(ptq_script.PtqRunConfig(workload=_run_config(tars, tmp_path).workload,
                                                       ptq=ptq.PTQConfig(w_bits=8), qat_state=reference["final_state"],
                                                       workdir=str(tmp_path / "eval")))
    assert evaluated["top1"] == reference["top1"] and evaluated["qat"]["method"] == "QAT"
    assert evaluated["bits"]["layer1.0.conv1"] == {"w": 4, "a": 4} and evaluated["bits"]["conv1"] == {"w": 8, "a": 8}
    with open(tmp_path / "a" / "qat" / "results.json") as f:
        written = json.load(f)
    assert written["finished"] and written["nearest_top1"] is not None and len(written["energy"]["per_layer"]) == 21


def test_bias_corrected_qat_run_starts_from_the_bias_corrected_ptq_model(tars, tmp_path):
    from experiments import ptq as ptq_script
    config = _run_config(tars, tmp_path / "qat", epochs=1, bias_correction=True)
    result = qat_script.run(config)
    reference = ptq_script.run(ptq_script.PtqRunConfig(workload=config.workload, ptq=config.ptq, bias_correction=True,
                                                       workdir=str(tmp_path / "ptq")))
    assert result["config"]["bias_correction"] and result["nearest_top1"] == reference["top1"]


@pytest.mark.parametrize("overrides, message", [
    (dict(train_dataset="tar:{test}"), "--train_dataset and --dataset share 8 images"),
    (dict(train_images=0), "--train_images must be >= 1"),
    (dict(train_batch_size=64), "--train_batch_size=64 exceeds the 16 training images"),
    (dict(control=True, qat=qat.QatConfig(asymmetric=True)), "--control trains the FP32 model"),
    (dict(control=True, bias_correction=True), "--bias_correction corrects the round-to-nearest start of QAT: "
                                               "leave out --control"),
    (dict(bits_json="{missing}"), "--bits_json=.* is not a ptq/mixed results.json"),
    (dict(bits_json="{stranger}"), "--bits_json=.* names layers this model lacks: blocks.0.mlp.fc1"),
])
def test_bad_qat_runs_fail_before_any_training_step(tars, tmp_path, overrides, message):
    train, test = tars
    (tmp_path / "stranger.json").write_text(json.dumps({"bits": {"blocks.0.mlp.fc1": {"w": 4, "a": 4}}}))
    overrides = {k: v.format(test=test, missing=tmp_path / "none.json", stranger=tmp_path / "stranger.json")
                 if isinstance(v, str) else v for k, v in overrides.items()}
    steps = []
    with pytest.raises(ValueError, match=message):
        qat_script.run(_run_config(tars, tmp_path, **overrides), on_step=steps.append)
    assert not steps


def test_qat_cli_gives_one_line_errors_for_bad_flags(tmp_path):
    cases = [(["--bits=1"], "--bits must be in [2, 16], got 1"),
             (["--temperature=2"], "--temperature=2.0 needs --distill_weight > 0"),
             (["--distill_weight=1.5"], "--distill_weight must be in [0, 1], got 1.5"),
             (["--bits_json=x.json", "--bits=4"], "--bits_json gives every layer's bits")]
    for flags, message in cases:
        out = run_module("experiments.qat", *flags, f"--workdir={tmp_path}", check=False)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(f"error: {message}"), out.stderr[-2000:]


def test_lsq_gradient_scale_is_one_over_sqrt_n_q_p():
    np.testing.assert_allclose(float(numerics.lsq_gradient_scale(18, 4)), 1 / np.sqrt(18 * 7), rtol=1e-6)
    np.testing.assert_allclose(float(numerics.lsq_gradient_scale(50, 4, signed=False)), 1 / np.sqrt(50 * 15), rtol=1e-6)


def test_pareto_draws_qat_its_start_and_the_control_apart(tmp_path):
    from experiments import pareto
    rows = {"qat": {"experiment": "qat", "method": "QAT", "control": False, "w_bits": 4, "a_bits": 4, "top1": 73.0,
                    "nearest_top1": 70.0},
            "control": {"experiment": "qat", "method": "FP32 control", "control": True, "w_bits": 4, "a_bits": 4,
                        "top1": 75.0, "nearest_top1": None}}
    for name, row in rows.items():
        (tmp_path / name / "qat").mkdir(parents=True)
        energy = 0.1 if name == "qat" else 1.0
        (tmp_path / name / "qat" / "results.json").write_text(json.dumps(
            {**row, "model": "m", "fp32_top1": 74.0, "energy": {"relative": energy}}))
    result = pareto.run([f"{tmp_path}/*/qat/results.json"], str(tmp_path))
    points = {p["label"]: (p["method"], p["top1"]) for p in result["models"]["m"]["points"]}
    assert points == {"W4A4 QAT": ("qat", 73.0), "W4A4 round-to-nearest (QAT start)": ("nearest", 70.0),
                      "FP32 control": ("control", 75.0), "FP32": ("nearest", 74.0)}
    assert [p["label"] for p in result["models"]["m"]["front"]] == ["W4A4 QAT", "FP32 control"]


def test_bits_json_reads_a_mixed_allocation_and_refuses_other_files(tmp_path):
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps({"bits": {"conv1": {"w": 8, "a": 8}, "layer1.0.conv1": {"w": 2, "a": 6},
                                         "attn.qk_matmul": {"w": None, "a": 4}}}))
    assert workload_lib.read_bits_json(str(path)) == {"conv1": (8, 8), "layer1.0.conv1": (2, 6), "attn.qk_matmul": (8, 4)}
    (tmp_path / "table.json").write_text(json.dumps({"fc": {"w": 3, "a": None}}))
    assert workload_lib.read_bits_json(str(tmp_path / "table.json")) == {"fc": (3, 8)}
    (tmp_path / "other.json").write_text(json.dumps({"top1": 3}))
    with pytest.raises(ValueError, match="other.json is not a ptq/mixed results.json with a 'bits' table"):
        workload_lib.read_bits_json(str(tmp_path / "other.json"))
