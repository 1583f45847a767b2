"""Sensitivity sweep (one compiled vmapped call) vs a plain loop; mixed-precision allocation."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqjax import models
from eqjax.quant import apply, policy as policy_lib
from eqjax.algorithms import energy, mixed_precision as mp, sensitivity

TINY = dict(stage_sizes=(1, 1), widths=(8, 16))


@pytest.fixture(scope="module")
def setup():
    spec = models.get("resnet18_cifar")
    model = spec.build(num_classes=10, **TINY)
    variables = spec.init(jax.random.key(0), num_classes=10, **TINY)
    calls = spec.trace(num_classes=10, **TINY)
    x = np.asarray(jax.random.normal(jax.random.key(1), (12, 32, 32, 3), jnp.float32))
    y = np.arange(12) % 10
    stats = apply.collect_activation_stats(model, variables, [x], apply.init_activation_stats(calls))
    policy = policy_lib.with_activation_clips(policy_lib.build(calls, w_bits=8, keep_first_last_bits=None), stats)
    return spec, model, variables, calls, x, y, policy


def _loop_reference(model, variables, policy, layers, bits, x, y):
    """The plain way: one policy per (layer, bits), each run on its own."""
    out = {m: np.zeros((len(layers), len(bits))) for m in ("l2", "rel_l2", "kl", "top1_agreement", "delta_loss")}
    fp_logits = model.apply(variables, x)
    fp_out = {}

    def record(next_fun, args, kwargs, context):
        result = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.path:
            fp_out.setdefault(".".join(context.module.path), result)
        return result

    import flax.linen as nn
    with nn.intercept_methods(record):
        model.apply(variables, x)
    fp_logp = jax.nn.log_softmax(fp_logits)
    for i, name in enumerate(layers):
        for j, b in enumerate(bits):
            single = {n: lq._replace(w_enabled=jnp.asarray(n == name and bool(lq.w_enabled)),
                                     a_enabled=jnp.asarray(n == name), w_bits=jnp.int32(b), a_bits=jnp.int32(b))
                      for n, lq in policy.items()}
            seen = {}

            def grab(next_fun, args, kwargs, context):
                result = next_fun(*args, **kwargs)
                if context.method_name == "__call__" and ".".join(context.module.path) == name:
                    seen["out"] = result
                return result

            with nn.intercept_methods(grab):
                logits = apply.quantized_apply(model, variables, single, x)
            logp = jax.nn.log_softmax(logits)
            out["l2"][i, j] = float(jnp.linalg.norm(seen["out"] - fp_out[name]))
            out["rel_l2"][i, j] = out["l2"][i, j] / float(jnp.linalg.norm(fp_out[name]))
            out["kl"][i, j] = float(jnp.mean(jnp.sum(jnp.exp(fp_logp) * (fp_logp - logp), -1)))
            out["top1_agreement"][i, j] = float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(fp_logits, -1)))
            nll = lambda lp: -jnp.take_along_axis(lp, jnp.asarray(y)[:, None], -1)[:, 0]
            out["delta_loss"][i, j] = float(jnp.mean(nll(logp) - nll(fp_logp)))
    return out


# Absolute tolerance per metric: the float32 differences measured are <= 4e-6 for l2 and
# <= 1e-7 for KL and Δloss. At 3 bits every reference stands well above its tolerance (so a
# sweep returning 0 fails); at 6 bits some KL values are themselves ~2e-7, float32 noise.
TOLERANCE = {"l2": 2e-5, "rel_l2": 2e-6, "kl": 5e-7, "delta_loss": 5e-7, "top1_agreement": 0.0}


@pytest.mark.parametrize("chunk_size", [1, 4])  # 1: sequential, skips the FP prefix by lax.cond
def test_sweep_matches_plain_loop(setup, chunk_size):
    _, model, variables, calls, x, y, policy = setup
    layers = [c.name for c in calls]
    result = sensitivity.sweep_sensitivity(model, variables, policy, [(x[:8], y[:8]), (x[8:], y[8:])],
                                           layers=layers, bits=(3, 6), batch_size=8, chunk_size=chunk_size)
    reference = _loop_reference(model, variables, policy, layers, (3, 6), jnp.asarray(x), y)
    assert result.num_images == 12
    assert set(reference) == set(sensitivity.METRICS)
    for metric, expected in reference.items():
        np.testing.assert_allclose(result.scores[metric], expected, rtol=1e-4, atol=TOLERANCE[metric], err_msg=metric)
        if metric != "top1_agreement":
            assert np.all(np.abs(expected[:, 0]) > 20 * TOLERANCE[metric]), (metric, expected)
    assert np.all(result.scores["l2"][:, 0] > result.scores["l2"][:, 1])  # 3 bits worse than 6
    assert result.table("l2", 6)[layers[0]] == pytest.approx(float(result.scores["l2"][0, 1]))


def test_sweep_compiles_once_for_all_configs(setup):
    _, model, variables, calls, x, y, policy = setup
    layers = [c.name for c in calls]
    sweep = sensitivity.make_sweep(model, layers, chunk_size=1)  # the CPU default
    for bits in ((4, 8), (2, 5)):  # every (layer, bits) config of both calls: one compilation
        stacked = sensitivity.single_layer_policies(policy, layers, bits)
        sweep(variables, stacked, x[:8], y[:8].astype(np.int32), np.ones(8, bool))
    assert sweep._cache_size() == 1


def test_sweep_bad_input(setup):
    _, model, variables, _, x, y, policy = setup
    with pytest.raises(ValueError, match="layers not in the policy: nope"):
        sensitivity.single_layer_policies(policy, ["nope"], (4,))
    with pytest.raises(ValueError, match="no layers to sweep"):
        sensitivity.single_layer_policies(policy, [], (4,))
    with pytest.raises(ValueError, match="sensitivity bits must be in"):
        sensitivity.single_layer_policies(policy, ["conv1"], (1,))


def test_percentile_rule_by_hand():
    scores = {f"l{i}": float(i) for i in range(8)}  # P25 = 1.75, P75 = 5.25
    bits = mp.percentile_bits(scores)
    assert [bits[f"l{i}"] for i in range(8)] == [4, 4, 6, 6, 6, 6, 8, 8]


def test_percentile_thresholds_follow_the_bit_set():
    assert mp.percentile_thresholds((4, 6, 8)) == mp.STUDY_PERCENTILE_BITS
    assert mp.percentile_thresholds((8, 4)) == ((50.0, 8), (0.0, 4))
    bits = mp.percentile_bits({f"l{i}": float(i) for i in range(4)}, thresholds=mp.percentile_thresholds((4, 8)))
    assert sorted(bits.values()) == [4, 4, 8, 8]


def _toy_problem():
    spec = models.get("resnet18_cifar")
    counts = energy.count_layers(spec.build(**TINY, num_classes=10), spec.example_input(1))
    rng = np.random.default_rng(0)
    cost = {c.name: sorted(rng.random(3) * (i + 1), reverse=True) for i, c in enumerate(counts)}
    return counts, cost


def test_budget_allocation_is_feasible_and_optimal_vs_brute_force():
    counts, cost = _toy_problem()
    names = list(cost)
    model = energy.PRESETS["paper"]
    by = {c.name: c for c in counts}
    e = {n: [energy.layer_energy(by[n], b, b, model)["total"] for b in (4, 6, 8)] for n in names}
    fp32 = sum(energy.layer_energy(c, None, None, model)["total"] for c in counts)
    for budget in (0.12, 0.15, 0.18, 0.21):
        result = mp.budget_bits(cost, counts, budget=budget, resolution=20000)
        assert result["relative_energy"] <= budget + 1e-12
        best = min(sum(cost[n][j] for n, j in zip(names, combo))
                   for combo in itertools.product(range(3), repeat=len(names))
                   if sum(e[n][j] for n, j in zip(names, combo)) / fp32 <= budget - result["max_rounding_gap"])
        assert result["cost"] <= best + 1e-9


def test_budget_with_fixed_bits_matches_brute_force():
    """Layers outside the cost table (attention matmuls, the pinned first/last layer) keep their
    fixed bits and their energy counts against the budget."""
    counts, cost = _toy_problem()
    fixed = {n: {"w": 8, "a": 8} for n in (counts[0].name, counts[-1].name)}
    cost = {n: c for n, c in cost.items() if n not in fixed}
    names = list(cost)
    model = energy.PRESETS["paper"]
    by = {c.name: c for c in counts}
    e = {n: [energy.layer_energy(by[n], b, b, model)["total"] for b in (4, 6, 8)] for n in names}
    fixed_energy = sum(energy.layer_energy(by[n], 8, 8, model)["total"] for n in fixed)
    fp32 = sum(energy.layer_energy(c, None, None, model)["total"] for c in counts)
    for budget in (0.13, 0.16, 0.2):
        result = mp.budget_bits(cost, counts, budget=budget, fixed_bits=fixed, resolution=20000)
        assert set(result["bits"]) == set(names)
        assert result["relative_energy"] <= budget + 1e-12
        energy_of = lambda combo: (sum(e[n][j] for n, j in zip(names, combo)) + fixed_energy) / fp32
        bits = {b: j for j, b in enumerate((4, 6, 8))}
        assert result["relative_energy"] == pytest.approx(energy_of([bits[result["bits"][n]] for n in names]))
        best = min(sum(cost[n][j] for n, j in zip(names, combo))
                   for combo in itertools.product(range(3), repeat=len(names))
                   if energy_of(combo) <= budget - result["max_rounding_gap"])
        assert result["cost"] <= best + 1e-9
    with pytest.raises(ValueError, match="layers with neither cost nor fixed bits"):
        mp.budget_bits(cost, counts, budget=0.2)


def test_budget_sweep_respects_every_budget_and_errors():
    counts, cost = _toy_problem()
    smallest = mp.minimum_budget(counts, {}, list(cost), (4, 6, 8), energy.PRESETS["paper"])
    for r in mp.budget_sweep(cost, counts, budgets=np.linspace(smallest, 0.3, 9)):
        assert r["relative_energy"] <= r["budget"] + 1e-12
    with pytest.raises(ValueError, match=f"smallest feasible relative energy {smallest:.4f}"):
        mp.budget_bits(cost, counts, budget=smallest - 0.01)
    with pytest.raises(ValueError, match="bit_set must be in"):
        mp.budget_bits(cost, counts, budget=0.2, bit_set=(4, 6, 20))
    with pytest.raises(ValueError, match="empty cost table"):
        mp.budget_bits({}, counts, budget=0.2)
    partial = dict(list(cost.items())[1:])
    with pytest.raises(ValueError, match="neither cost nor fixed bits"):
        mp.budget_bits(partial, counts, budget=0.2)
