"""One-pass sensitivity (eqjax.algorithms.second_order) against hand computations; W/A-separate allocation
(eqjax.algorithms.allocation) against brute force; their errors."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqjax
from eqjax.algorithms import allocation, energy, second_order


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(5, name="fc1")(x))
        return nn.Dense(3, name="fc2")(h)


def _setup(num_images=8):
    model = TwoLayer()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_images, 4)).astype(np.float32)
    labels = rng.integers(0, 3, num_images)
    variables = jax.tree_util.tree_map(lambda a: a + 0.3 * jnp.asarray(rng.normal(size=a.shape), a.dtype),
                                       model.init(jax.random.key(0), x[:1]))
    policy = eqjax.calibrate(model, variables, [x], eqjax.PTQConfig(w_bits=8, a_bits=8, keep_first_last_bits=None))
    return model, variables, policy, x, labels


def _numpy_quantize(x, bits, scale, signed=True):
    q_min, q_max = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    return scale * np.clip(np.round(x / scale), q_min, q_max)


def _hand_fisher(variables, policy, x, labels, bits, micro_batch=1):
    """Per-image gradients written out for Dense -> ReLU -> Dense -> softmax cross-entropy; the
    weight Fisher of micro-batches of m images is Σ_micro (Σ_n g_n)² / N."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)["params"]
    w1, b1, w2, b2 = p["fc1"]["kernel"], p["fc1"]["bias"], p["fc2"]["kernel"], p["fc2"]["bias"]
    z = x.astype(np.float64) @ w1 + b1
    h = np.maximum(z, 0)
    logits = h @ w2 + b2
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    d_logits = prob - np.eye(3)[labels]                      # dL/dlogits per image
    d_h = d_logits @ w2.T                                     # dL/d(input of fc2)
    d_x = (d_h * (z > 0)) @ w1.T                              # dL/d(input of fc1)
    g_w2 = h[:, :, None] * d_logits[:, None, :]               # per-image kernel gradients
    g_w1 = x[:, :, None] * (d_h * (z > 0))[:, None, :]
    n = len(x)
    out = {}
    for name, w, g, inp, d_inp in (("fc1", w1, g_w1, x, d_x), ("fc2", w2, g_w2, h, d_h)):
        summed = g.reshape((n // micro_batch, micro_batch) + g.shape[1:]).sum(axis=1)
        fisher_w = np.sum(summed ** 2, axis=0) / n
        clip = float(policy[name].a_clip[0])
        signed = bool(policy[name].a_signed[0])
        weight_terms, act_terms = [], []
        for b in bits:
            scale = np.abs(w).max(axis=0) / (2 ** (b - 1) - 1)  # per output channel (eq. 4)
            weight_terms.append(0.5 * np.sum(fisher_w * (_numpy_quantize(w, b, scale) - w) ** 2))
            a_scale = clip / ((2 ** (b - 1) - 1) if signed else (2 ** b - 1))
            delta = _numpy_quantize(inp, b, a_scale, signed) - inp
            act_terms.append(0.5 * np.sum(d_inp ** 2 * delta ** 2) / n)
        out[name] = (np.array(weight_terms), np.array(act_terms))
    return out


def test_fisher_estimate_equals_a_hand_computation_on_a_two_layer_model():
    model, variables, policy, x, labels = _setup()
    bits = (3, 4, 8)
    result = second_order.estimate(model, variables, policy, [(x[:4], labels[:4]), (x[4:], labels[4:])],
                                   bits=bits, method="fisher", micro_batch=1)
    expected = _hand_fisher(variables, policy, x, labels, bits)
    assert result.layers == ("fc1", "fc2") and result.num_images == 8
    for k, name in enumerate(result.layers):
        np.testing.assert_allclose(result.weight[k], expected[name][0], rtol=2e-4, atol=1e-10)
        np.testing.assert_allclose(result.activation[k], expected[name][1], rtol=2e-4, atol=1e-10)
        assert np.all(result.weight[k] > 0) and np.all(np.diff(result.weight[k]) < 0)  # fewer bits, more loss
    table = result.delta_loss(4, 8)
    assert table["fc2"] == pytest.approx(expected["fc2"][0][1] + expected["fc2"][1][2], rel=2e-4)


def test_fisher_weight_term_of_micro_batches_equals_a_hand_computation_under_padding():
    """micro_batch=4 on 8 images and 8 devices: each call pads 8 images to 32, and the padded
    images must add nothing (the loss is masked)."""
    model, variables, policy, x, labels = _setup()
    bits = (3, 8)
    result = second_order.estimate(model, variables, policy, [(x, labels)], bits=bits, micro_batch=4)
    expected = _hand_fisher(variables, policy, x, labels, bits, micro_batch=4)
    for k, name in enumerate(result.layers):
        np.testing.assert_allclose(result.weight[k], expected[name][0], rtol=2e-4, atol=1e-10)
        np.testing.assert_allclose(result.activation[k], expected[name][1], rtol=2e-4, atol=1e-10)


def test_hessian_estimates_match_the_exact_traces_of_the_last_layer_over_seeds():
    """The last layer's Hessians of softmax cross-entropy have closed forms per image: w.r.t. its
    kernel (diag(p) − ppᵀ) ⊗ hhᵀ, trace Σ_k p_k(1 − p_k) · ||h||²; w.r.t. its input h
    W2 (diag(p) − ppᵀ) W2ᵀ. Hutchinson's traces, spread evenly over the elements, give the weight
    term ½ (Tr/|W2|) ||δW2||² and the activation term ½ (Tr/5) Σ_n ||δh_n||² / N. Over 1,024 images
    and six seeds, each mean must land within 4 standard errors of the exact value. (A Hutchinson
    term may be negative for a layer of negative curvature, so none is asserted positive.)"""
    model, variables, policy, x, labels = _setup(num_images=1024)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)["params"]
    w2 = p["fc2"]["kernel"]
    h = np.maximum(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    logits = h @ w2 + p["fc2"]["bias"]
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    kernel_trace = np.mean(np.sum(prob * (1 - prob), -1) * np.sum(h ** 2, -1))
    input_trace = np.mean([np.trace(w2 @ (np.diag(q) - np.outer(q, q)) @ w2.T) for q in prob])
    weight_error = np.sum((_numpy_quantize(w2, 4, np.abs(w2).max(axis=0) / 7) - w2) ** 2)
    clip, signed = float(policy["fc2"].a_clip[0]), bool(policy["fc2"].a_signed[0])
    delta = _numpy_quantize(h, 4, clip / ((2 ** 3 - 1) if signed else (2 ** 4 - 1)), signed) - h
    exact = {"weight": 0.5 * kernel_trace / w2.size * weight_error,
             "activation": 0.5 * input_trace / h.shape[1] * np.sum(delta ** 2) / len(x)}
    runs = [second_order.estimate(model, variables, policy, [(x, labels)], bits=(4,), method="hessian",
                                  micro_batch=16, seed=seed) for seed in range(6)]
    for term, value in exact.items():
        estimates = [getattr(r, term)[1, 0] for r in runs]
        assert abs(np.mean(estimates) - value) <= 4 * np.std(estimates, ddof=1) / np.sqrt(6), (term, estimates, value)
    fisher = second_order.estimate(model, variables, policy, [(x, labels)], bits=(4,), micro_batch=16)
    assert 0.1 < np.mean([r.weight[1, 0] for r in runs]) / fisher.weight[1, 0] < 10


def test_a_short_last_batch_is_padded_without_changing_the_estimate():
    model, variables, policy, x, labels = _setup()
    whole = second_order.estimate(model, variables, policy, [(x, labels)], micro_batch=1)
    uneven = second_order.estimate(model, variables, policy, [(x[:5], labels[:5]), (x[5:], labels[5:])],
                                   micro_batch=2)  # 5 -> 6 and 3 -> 6 images, one compiled shape
    assert uneven.num_images == 8
    np.testing.assert_allclose(uneven.activation, whole.activation, rtol=1e-5)


def test_sharded_estimate_equals_one_device():
    from eqjax.algorithms.metrics import data_mesh, single_device_mesh

    model, variables, policy, x, labels = _setup(num_images=16)
    assert data_mesh().devices.size > 1, "tests run with several CPU devices (conftest)"
    kw = dict(bits=(4, 8), micro_batch=2)
    sharded = second_order.estimate(model, variables, policy, [(x, labels)], mesh=data_mesh(), **kw)
    single = second_order.estimate(model, variables, policy, [(x, labels)], mesh=single_device_mesh(), **kw)
    np.testing.assert_allclose(sharded.weight, single.weight, rtol=1e-5)
    np.testing.assert_allclose(sharded.activation, single.activation, rtol=1e-5)


def test_micro_batches_sum_gradients_before_squaring():
    """With micro-batches of m images the weight Fisher is Σ_micro (Σ_n g_n)² / N."""
    model, variables, policy, x, labels = _setup()
    one = second_order.estimate(model, variables, policy, [(x, labels)], bits=(4,), micro_batch=1)
    four = second_order.estimate(model, variables, policy, [(x, labels)], bits=(4,), micro_batch=4)
    np.testing.assert_allclose(four.activation, one.activation, rtol=1e-5)  # inputs: exact per image
    assert not np.allclose(four.weight, one.weight, rtol=1e-3)


def test_bad_input_is_refused_before_any_work():
    model, variables, policy, x, labels = _setup()
    batches = [(x, labels)]
    with pytest.raises(ValueError, match="method must be one of"):
        second_order.estimate(model, variables, policy, batches, method="kfac")
    with pytest.raises(ValueError, match="not in the model: fc3 \\(closest: fc2, fc1\\)"):
        second_order.estimate(model, variables, policy, batches, layers=["fc3"])
    with pytest.raises(ValueError, match="bits"):
        second_order.estimate(model, variables, policy, batches, bits=(1, 4))
    with pytest.raises(ValueError, match="batches is empty"):
        second_order.estimate(model, variables, policy, [])
    uncalibrated = eqjax.ptq.build_policy(eqjax.ptq.layer_calls(model, x), eqjax.PTQConfig())
    with pytest.raises(ValueError, match="not calibrated"):
        second_order.estimate(model, variables, uncalibrated, batches)


# ---- allocation of separate weight / activation widths under several budgets ----

def _counts():
    return [energy.LayerCount("a", "conv", 4000, 300, 8, 900, 900),
            energy.LayerCount("b", "conv", 9000, 1200, 16, 900, 400),
            energy.LayerCount("c", "dense", 500, 5000, 10, 400, 10),
            energy.LayerCount("attn", "matmul", 2000, 0, 0, 600, 300)]



def test_budget_usage_by_hand_at_non_uniform_widths():
    """BOPs = MACs·b_w·b_a (a matmul's operands are both activations: MACs·b_a²), weight bytes with
    32-bit biases, and average weight bits, written out for W4A8 / W6A4 layers."""
    a, b, c, attn = _counts()
    kw = dict(energy_model=energy.PRESETS["paper"], fp32_energy=1.0, total_weights=300 + 1200 + 5000)
    assert allocation.usage(a, 4, 8, "gbops", **kw) == pytest.approx(4000 * 4 * 8 / 1e9, rel=1e-12)
    assert allocation.usage(b, 6, 4, "gbops", **kw) == pytest.approx(9000 * 6 * 4 / 1e9, rel=1e-12)
    assert allocation.usage(attn, None, 6, "gbops", **kw) == pytest.approx(2000 * 6 * 6 / 1e9, rel=1e-12)
    assert allocation.usage(c, None, 4, "gbops", **kw) == pytest.approx(500 * 32 * 4 / 1e9, rel=1e-12)
    assert allocation.usage(a, 4, 8, "weight_mb", **kw) == pytest.approx((300 * 4 + 8 * 32) / 8 / 1e6, rel=1e-12)
    assert allocation.usage(c, 6, 4, "avg_weight_bits", **kw) == pytest.approx(5000 * 6 / 6500, rel=1e-12)


def _brute_force(cost, counts, budgets, w_bits, a_bits, fixed):
    layers, best = list(cost), None
    opts = allocation.options(w_bits, a_bits)
    fp32 = sum(energy.layer_energy(c, None, None, energy.PRESETS["paper"])["total"] for c in counts)
    kw = dict(energy_model=energy.PRESETS["paper"], fp32_energy=fp32,
              total_weights=sum(c.weight_elements for c in counts))
    by_name = {c.name: c for c in counts}
    for choice in itertools.product(opts, repeat=len(layers)):
        bits = dict(zip(layers, choice))
        ok = all(sum(allocation.usage(by_name[n], *bits[n], k, **kw) for n in layers)
                 + sum(allocation.usage(by_name[n], f["w"], f["a"], k, **kw) for n, f in fixed.items()) <= bound + 1e-12
                 for k, bound in budgets.items())
        total = sum(cost[n][w_bits.index(w), a_bits.index(a)] for n, (w, a) in bits.items())
        if ok and (best is None or total < best[0] - 1e-12):
            best = (total, bits)
    return best



@pytest.mark.parametrize("budgets", [
    {"relative_energy": 0.18},
    {"gbops": 6e-4, "weight_mb": 0.0045},
    {"avg_weight_bits": 5.5, "relative_energy": 0.2},
    {"relative_energy": 0.21, "gbops": 7e-4, "weight_mb": 0.005, "avg_weight_bits": 6.5},
])
def test_separate_widths_match_brute_force_and_keep_every_budget(budgets):
    rng = np.random.default_rng(1)
    w_bits, a_bits = (4, 6, 8), (4, 8)
    cost = {n: np.sort(rng.uniform(0, 1, (3, 2)), axis=0)[::-1] for n in "abc"}  # fewer bits, more cost
    fixed = {"attn": {"w": None, "a": 8}}
    got = allocation.allocate(cost, _counts(), budgets=budgets, w_bits=w_bits, a_bits=a_bits, fixed_bits=fixed)
    best = _brute_force(cost, _counts(), budgets, w_bits, a_bits, fixed)
    assert best is not None
    assert got["cost"] == pytest.approx(best[0], abs=1e-9)
    for kind, bound in budgets.items():
        assert got["usage"][kind] <= bound + 1e-12 and got["slack"][kind] >= -1e-12
    table = {**{n: b for n, b in got["bits"].items()}, **fixed}
    if "relative_energy" in budgets:  # the allocator's accounting is the energy report's
        assert got["usage"]["relative_energy"] == pytest.approx(
            energy.relative_energy(_counts(), table, energy.PRESETS["paper"]), rel=1e-12)


def test_same_width_allocation_is_never_better_than_separate_widths():
    rng = np.random.default_rng(2)
    cost = {n: np.sort(rng.uniform(0, 1, (3, 3)), axis=0)[::-1] for n in "abc"}
    kw = dict(budgets={"relative_energy": 0.18}, fixed_bits={"attn": {"w": None, "a": 8}})
    same = allocation.allocate(cost, _counts(), same_width=True, **kw)
    separate = allocation.allocate(cost, _counts(), **kw)
    assert all(b["w"] == b["a"] for b in same["bits"].values())
    assert separate["cost"] <= same["cost"] + 1e-12


def test_infeasible_and_contradictory_budgets_name_the_smallest_feasible_value():
    cost = {n: np.ones((3, 3)) for n in "abc"}
    fixed = {"attn": {"w": None, "a": 8}}
    with pytest.raises(ValueError, match=r"weight_mb budget 0.001 is below the smallest feasible value 0.00338"):
        allocation.allocate(cost, _counts(), budgets={"weight_mb": 0.001}, fixed_bits=fixed)
    with pytest.raises(ValueError, match=r"relative_energy budget 0.13 is below the smallest feasible value 0.1371"):
        allocation.allocate(cost, _counts(), budgets={"relative_energy": 0.13, "gbops": 1.0}, fixed_bits=fixed)
    with pytest.raises(ValueError, match="budgets must be positive numbers"):
        allocation.allocate(cost, _counts(), budgets={"gbops": float("nan")}, fixed_bits=fixed)
    with pytest.raises(ValueError, match="unknown budget kinds"):
        allocation.allocate(cost, _counts(), budgets={"joules": 1.0}, fixed_bits=fixed)
    with pytest.raises(ValueError, match="at least one budget"):
        allocation.allocate(cost, _counts(), budgets={}, fixed_bits=fixed)
    with pytest.raises(ValueError, match="neither cost nor fixed bits: attn"):
        allocation.allocate(cost, _counts(), budgets={"gbops": 1.0})
    with pytest.raises(ValueError, match=r"cost entries must be \[len\(w_bits\), len\(a_bits\)\]"):
        allocation.allocate({"a": np.ones(3), "b": np.ones((3, 3)), "c": np.ones((3, 3))}, _counts(),
                            budgets={"gbops": 1.0}, fixed_bits=fixed)
