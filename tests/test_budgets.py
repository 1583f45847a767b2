"""Budgets are promises: every allocation's usage, recomputed for the whole policy the way the
scripts report it, is <= its budget, for every budget kind, at values right on the boundary of an
allocation and in between (the MILP solver's feasibility tolerance let one overshoot by 3e-7)."""

import functools

import numpy as np
import pytest

from eqjax import models
from eqjax.algorithms import allocation, energy, mixed_precision as mp

MODEL = energy.PRESETS["paper"]


@functools.lru_cache(maxsize=None)
def _problem(name: str):
    spec = models.get(name)
    counts = energy.count_layers(spec.build(), spec.example_input(1))
    layers = [c.name for c in counts if c.kind != "matmul"]
    fixed = {c.name: {"w": None, "a": 8} for c in counts if c.kind == "matmul"}
    return counts, layers, fixed


def _cost(layers, bits, seed):
    """Separable Δloss-like costs spanning seven decades, falling with both widths."""
    rng = np.random.default_rng(seed)
    decay = np.exp(-1.4 * np.asarray(bits, np.float64))
    return {n: np.add.outer(10 ** rng.uniform(-6, 1) * decay, 10 ** rng.uniform(-6, 1) * decay) for n in layers}


def _usage(counts, fixed, bits, kind):
    return allocation.measured_usage(counts, {**fixed, **bits}, kind, MODEL)


@pytest.mark.parametrize("seed,budget", [(0, 0.13482758620689655), (2, 0.1493103448275862),
                                         (5, 0.15655172413793103)])
def test_the_solvers_overshoot_on_lite0_is_repaired(seed, budget):
    counts, layers, fixed = _problem("efficientnet_lite0")
    got = allocation.allocate(_cost(layers, (4, 6, 8), seed), counts, budgets={"relative_energy": budget},
                              w_bits=(4, 6, 8), a_bits=(4, 6, 8), fixed_bits=fixed)
    assert got["repair"]["overshoot"]["relative_energy"] > 0  # HiGHS's own answer was over the budget
    assert _usage(counts, fixed, got["bits"], "relative_energy") <= budget
    assert got["usage"]["relative_energy"] <= budget


@pytest.mark.parametrize("name", ["resnet18_cifar", "efficientnet_lite0", "deit_tiny"])
def test_every_budget_kind_holds_on_and_between_allocation_boundaries(name):
    counts, layers, fixed = _problem(name)
    bits = (2, 4, 8)
    cost = _cost(layers, bits, seed=1)
    rng = np.random.default_rng(7)
    policies = [{n: {"w": b, "a": b} for n in layers} for b in bits]
    policies += [{n: {"w": int(rng.choice(bits)), "a": int(rng.choice(bits))} for n in layers} for _ in range(2)]
    for kind in allocation.BUDGET_KINDS:
        edges = sorted(_usage(counts, fixed, p, kind) for p in policies)
        budgets = edges + [np.nextafter(e, np.inf) for e in edges[:-1]] + list(np.linspace(edges[0], edges[-1], 5)[1:-1])
        for budget in budgets:
            got = allocation.allocate(cost, counts, budgets={kind: float(budget)}, w_bits=bits, a_bits=bits,
                                      fixed_bits=fixed)
            assert _usage(counts, fixed, got["bits"], kind) <= budget, (kind, budget, got["repair"])
        below = np.nextafter(edges[0], 0)  # one ulp under the all-narrowest policy: nothing fits
        with pytest.raises(ValueError, match="below the smallest feasible value"):
            allocation.allocate(cost, counts, budgets={kind: float(below)}, w_bits=bits, a_bits=bits, fixed_bits=fixed)


def test_two_budgets_at_once_both_hold():
    counts, layers, fixed = _problem("resnet18_cifar")
    bits = (2, 4, 8)
    cost = _cost(layers, bits, seed=3)
    w4 = {n: {"w": 4, "a": 4} for n in layers}
    budgets = {"relative_energy": _usage(counts, fixed, w4, "relative_energy"),
               "weight_mb": 0.8 * _usage(counts, fixed, w4, "weight_mb")}
    got = allocation.allocate(cost, counts, budgets=budgets, w_bits=bits, a_bits=bits, fixed_bits=fixed)
    for kind, budget in budgets.items():
        assert _usage(counts, fixed, got["bits"], kind) <= budget


def test_the_same_width_knapsack_holds_its_budget_exactly_on_uniform_boundaries():
    counts, layers, fixed = _problem("efficientnet_lite0")
    bit_set = (4, 6, 8)
    cost = {n: list(np.sort(np.random.default_rng(i).random(3))[::-1]) for i, n in enumerate(layers)}
    for b in bit_set:
        budget = _usage(counts, fixed, {n: {"w": b, "a": b} for n in layers}, "relative_energy")
        for value in (budget, np.nextafter(budget, np.inf), budget * 1.01):
            got = mp.budget_bits(cost, counts, budget=float(value), bit_set=bit_set, fixed_bits=fixed, model=MODEL)
            policy = {n: {"w": v, "a": v} for n, v in got["bits"].items()}
            assert _usage(counts, fixed, policy, "relative_energy") <= value
            assert got["relative_energy"] <= value
    with pytest.raises(ValueError, match="below the smallest feasible"):
        smallest = _usage(counts, fixed, {n: {"w": 4, "a": 4} for n in layers}, "relative_energy")
        mp.budget_bits(cost, counts, budget=float(np.nextafter(smallest, 0)), bit_set=bit_set, fixed_bits=fixed,
                       model=MODEL)
