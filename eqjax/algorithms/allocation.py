"""Weight and activation widths per layer under one or several budgets (an exact MILP).

Choose for each layer l one option o = (b_w, b_a) from ``w_bits × a_bits`` (or only b_w = b_a
with ``same_width=True``) to

    minimise   Σ_l cost_l(o_l)
    subject to Σ_l usage_k(l, o_l) + fixed_k <= budget_k      for every budget k,

a multiple-choice knapsack with several constraints, solved exactly as a mixed-integer
program (``scipy.optimize.milp``, HiGHS; binary x_lo, Σ_o x_lo = 1). Usage per budget kind:

* ``relative_energy``: E(b) / E_FP32 of the energy model (eq. 7), MACs and memory;
* ``gbops``: Σ MACs · b_w · b_a / 1e9 (both operands are activations in a matmul);
* ``weight_mb``: Σ weight elements · b_w / 8 / 1e6 (biases as float32);
* ``avg_weight_bits``: Σ weight elements · b_w / Σ weight elements (ModelOpt's effective bits).

Layers outside the cost table (attention matmuls, or first/last layers the policy pins) keep
their ``fixed_bits`` and count as constants.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import numpy as np

from eqjax.algorithms import energy as energy_lib
from eqjax.quant import numerics

BUDGET_KINDS = ("relative_energy", "gbops", "weight_mb", "avg_weight_bits")


def options(w_bits: Sequence[int], a_bits: Sequence[int], *, same_width: bool = False) -> list[tuple[int, int]]:
    """The (b_w, b_a) pairs a layer may take."""
    for b in (*w_bits, *a_bits):
        numerics.check_bits(b, name="allocation bits")
    if same_width:
        common = [b for b in w_bits if b in set(a_bits)]
        if not common:
            raise ValueError(f"same_width needs a width in both w_bits {tuple(w_bits)} and a_bits {tuple(a_bits)}")
        return [(b, b) for b in common]
    return list(itertools.product(w_bits, a_bits))


def usage(count: energy_lib.LayerCount, w_bits: int | None, a_bits: int | None, kind: str, *,
          energy_model: energy_lib.EnergyModel, fp32_energy: float, total_weights: int) -> float:
    """One layer's use of a budget of ``kind`` at the given widths (None = full precision)."""
    w = energy_lib.FP_BITS if w_bits is None else w_bits
    a = energy_lib.FP_BITS if a_bits is None else a_bits
    if kind == "relative_energy":
        return energy_lib.layer_energy(count, w_bits, a_bits, energy_model)["total"] / fp32_energy
    if kind == "gbops":
        return count.macs * (a if count.kind == "matmul" else w) * a / 1e9
    if kind == "weight_mb":
        return (count.weight_elements * w + count.bias_elements * energy_lib.FP_BITS) / 8 / 1e6
    if kind == "avg_weight_bits":
        return count.weight_elements * w / total_weights
    raise ValueError(f"unknown budget kind {kind!r}; known: {', '.join(BUDGET_KINDS)}")


def usage_tables(counts: Sequence[energy_lib.LayerCount], layers: Sequence[str], opts: Sequence[tuple[int, int]],
                 fixed_bits: Mapping[str, Mapping], kinds: Sequence[str], energy_model: energy_lib.EnergyModel
                 ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """``({kind: [len(layers), len(opts)] usage of each layer at each option}, {kind: usage of the
    layers outside ``layers`` at their ``fixed_bits``})``: a policy's usage of a budget is the sum of
    its picks' entries plus the fixed part (:func:`usage` per entry)."""
    by_name = {c.name: c for c in counts}
    missing = [n for n in layers if n not in by_name]
    if missing:
        raise ValueError(f"layers not in the model: {', '.join(missing)}")
    absent = [c.name for c in counts if c.name not in set(layers) and c.name not in fixed_bits]
    if absent:
        raise ValueError(f"layers with neither cost nor fixed bits: {', '.join(absent)}")
    fp32 = sum(energy_lib.layer_energy(c, None, None, energy_model)["total"] for c in counts)
    total_weights = sum(c.weight_elements for c in counts) or 1
    kw = dict(energy_model=energy_model, fp32_energy=fp32, total_weights=total_weights)
    tables, fixed = {}, {}
    for k in kinds:
        tables[k] = np.array([[usage(by_name[n], w, a, k, **kw) for w, a in opts] for n in layers])
        fixed[k] = sum(usage(c, fixed_bits[c.name]["w"], fixed_bits[c.name]["a"], k, **kw)
                       for c in counts if c.name not in set(layers))
    return tables, fixed


def _solve(cost: np.ndarray, constraints: list[tuple[np.ndarray, float]]) -> np.ndarray | None:
    """Option index per layer minimising Σ cost[l, o] subject to Σ table[l, o] <= bound for
    each constraint (exact: HiGHS with a zero MIP gap); None if infeasible."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    num_layers, num_options = cost.shape
    n = num_layers * num_options
    one_each = np.kron(np.eye(num_layers), np.ones(num_options))
    rows = [LinearConstraint(one_each, 1, 1)]
    rows += [LinearConstraint(table.reshape(1, n), -np.inf, bound) for table, bound in constraints]
    result = milp(cost.reshape(n), constraints=rows, integrality=np.ones(n), bounds=Bounds(0, 1),
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        return None
    return np.argmax(result.x.reshape(num_layers, num_options), axis=1)


def allocate(cost: Mapping[str, np.ndarray], counts: Sequence[energy_lib.LayerCount], *,
             budgets: Mapping[str, float], w_bits: Sequence[int] = (4, 6, 8),
             a_bits: Sequence[int] = (4, 6, 8), same_width: bool = False,
             fixed_bits: Mapping[str, Mapping] | None = None,
             energy_model: energy_lib.EnergyModel = energy_lib.PRESETS["paper"]) -> dict:
    """Widths per layer minimising the summed cost under every budget.

    Args:
      cost: ``{layer: [len(w_bits), len(a_bits)] array}``, e.g. the estimated Δloss of
        :mod:`eqjax.algorithms.second_order` (weight term at b_w plus activation term at b_a).
      counts: ``energy.count_layers`` of the model.
      budgets: ``{kind: bound}`` for kinds in :data:`BUDGET_KINDS` (at least one).
      w_bits, a_bits: candidate widths of weights and of activations.
      same_width: only b_w = b_a (the study's per-layer width).
      fixed_bits: ``{name: {'w', 'a'}}`` of the layers outside ``cost``.
      energy_model: the energy model of ``relative_energy``.

    Returns:
      ``{'bits': {layer: {'w', 'a'}}, 'cost', 'usage': {kind: value}, 'budgets',
      'slack': {kind: budget - usage}, 'repair'}``: every usage, recomputed for the whole policy
      by :func:`measured_usage` (fixed layers included), is <= its budget; ``repair`` says whether
      the solver's tolerance had to be made up for (:func:`_solve_within`).

    Raises:
      ValueError: no budget, an unknown kind, a budget that is not a positive number, or one
        below what any allocation reaches (the message gives that smallest feasible value,
        fixed layers included).
    """
    if not budgets:
        raise ValueError(f"give at least one budget of {', '.join(BUDGET_KINDS)}")
    unknown = [k for k in budgets if k not in BUDGET_KINDS]
    if unknown:
        raise ValueError(f"unknown budget kinds {unknown}; known: {', '.join(BUDGET_KINDS)}")
    bad_bounds = {k: v for k, v in budgets.items() if not (np.isfinite(v) and v > 0)}
    if bad_bounds:
        raise ValueError(f"budgets must be positive numbers, got {bad_bounds}")
    layers = list(cost)
    if not layers:
        raise ValueError("empty cost table: no layers to allocate")
    opts = options(w_bits, a_bits, same_width=same_width)
    shape = (len(w_bits), len(a_bits))
    bad = [n for n in layers if np.shape(cost[n]) != shape]
    if bad:
        raise ValueError(f"cost entries must be [len(w_bits), len(a_bits)] = {list(shape)}; bad: {bad[:5]}")
    index = {(w, a): (i, j) for i, w in enumerate(w_bits) for j, a in enumerate(a_bits)}
    costs = np.array([[np.asarray(cost[n], np.float64)[index[o]] for o in opts] for n in layers])
    if not np.all(np.isfinite(costs)):
        raise ValueError("cost table holds NaN or Inf")
    tables, fixed = usage_tables(counts, layers, opts, fixed_bits or {}, list(budgets), energy_model)
    narrowest = np.full(len(layers), opts.index((min(w for w, _ in opts), min(a for _, a in opts))))
    measure = lambda picks: {k: measured_usage(counts, _bits_of(layers, opts, picks, fixed_bits), k, energy_model)
                             for k in budgets}
    check_feasible(counts, _bits_of(layers, opts, narrowest, fixed_bits), budgets, energy_model,
                   narrowest=f"every layer at its cheapest of {opts}")
    # Every usage grows with both widths, so the all-narrowest allocation meets every budget
    # that it meets alone: budgets that pass the check above are jointly feasible.
    picks, repair = _solve_within(costs, tables, fixed, budgets, measure, narrowest)
    rows = np.arange(len(layers))
    used = measure(picks)
    return {"bits": _bits_of(layers, opts, picks, {}), "cost": float(costs[rows, picks].sum()), "usage": used,
            "budgets": {k: float(v) for k, v in budgets.items()},
            "slack": {k: float(budgets[k] - used[k]) for k in budgets}, "repair": repair}


def check_feasible(counts: Sequence[energy_lib.LayerCount], narrowest_bits: Mapping[str, Mapping],
                   budgets: Mapping[str, float], energy_model: energy_lib.EnergyModel, *, narrowest: str) -> None:
    """Raises ValueError naming the first budget that the all-narrowest policy ``narrowest_bits``
    (described by ``narrowest``) already exceeds, with that smallest feasible value. Every usage
    grows with both widths, so budgets that each pass hold together."""
    for kind, bound in budgets.items():
        smallest = measured_usage(counts, narrowest_bits, kind, energy_model)
        if smallest > bound:
            raise ValueError(f"{kind} budget {bound:.6g} is below the smallest feasible value {smallest:.6g} "
                             f"({narrowest})")


def _bits_of(layers, opts, picks, fixed_bits) -> dict:
    return {**{n: dict(b) for n, b in (fixed_bits or {}).items()},
            **{n: {"w": opts[o][0], "a": opts[o][1]} for n, o in zip(layers, picks)}}


def measured_usage(counts: Sequence[energy_lib.LayerCount], bits: Mapping[str, Mapping], kind: str,
                   energy_model: energy_lib.EnergyModel) -> float:
    """The use of a budget of ``kind`` by a whole policy's ``bits`` (every layer of ``counts``),
    computed as the scripts report it: ``relative_energy`` by :func:`energy.relative_energy`, the
    other kinds by summing :func:`usage` over the layers in ``counts`` order."""
    if kind == "relative_energy":
        return energy_lib.relative_energy(counts, bits, energy_model)
    fp32 = sum(energy_lib.layer_energy(c, None, None, energy_model)["total"] for c in counts)
    total_weights = sum(c.weight_elements for c in counts) or 1
    return float(sum(usage(c, bits[c.name]["w"], bits[c.name]["a"], kind, energy_model=energy_model,
                           fp32_energy=fp32, total_weights=total_weights) for c in counts))


RESOLVES = 4


def _solve_within(costs, tables, fixed, budgets, measure, narrowest) -> tuple[np.ndarray, dict]:
    """The MILP's picks, held to every budget as :func:`measured_usage` recomputes it.

    HiGHS accepts a constraint violated by up to its feasibility tolerance (1e-7, absolute), so
    an optimum may overshoot a budget by that much. Each overshoot tightens that budget's bound by
    the overshoot (plus 1e-12 relative) and solves again, up to :data:`RESOLVES` times; if one still
    overshoots, the layer whose narrower option costs the least per unit of usage saved steps
    down (to an option that uses no more of any budget) until every budget holds; the
    all-narrowest picks hold them all, so this ends. Returns the picks and
    ``{'resolves', 'steps_down', 'overshoot'}`` (the first solve's largest overshoot per kind).
    """
    margin = {k: 0.0 for k in budgets}
    first_overshoot: dict[str, float] = {}
    resolves = 0
    while True:
        picks = _solve(costs, [(tables[k], budgets[k] - fixed[k] - margin[k]) for k in budgets])
        if picks is None:  # the tightened bounds left nothing: fall back to stepping down
            picks = narrowest.copy()
            break
        over = {k: u - budgets[k] for k, u in measure(picks).items() if u > budgets[k]}
        if not first_overshoot:
            first_overshoot = dict(over)
        if not over or resolves == RESOLVES:
            break
        for k, amount in over.items():
            margin[k] += amount + 1e-12 * abs(budgets[k])
        resolves += 1
    picks, steps = step_down(picks, costs, tables, measure, budgets)
    return picks, {"resolves": resolves, "steps_down": steps, "overshoot": first_overshoot}


def step_down(picks: np.ndarray, costs: np.ndarray, tables: Mapping[str, np.ndarray], measure, budgets: Mapping[str, float]
              ) -> tuple[np.ndarray, int]:
    """``(picks, steps)``: ``picks`` (option per layer) moved, one layer at a time, to the option
    that saves the most overshot budget's usage per unit of extra cost and uses no more of any
    budget, until ``measure(picks)`` (``{kind: usage}``) is within every budget. ``tables``:
    ``{kind: [layers, options] usage}``. Ends as long as the all-narrowest picks are within."""
    steps = 0
    rows = np.arange(len(picks))
    while True:
        over = {k: u - budgets[k] for k, u in measure(picks).items() if u > budgets[k]}
        if not over:
            return picks, steps
        kind = max(over, key=over.get)
        saved = {k: t[rows, picks][:, None] - t for k, t in tables.items()}  # per layer and option
        allowed = (saved[kind] > 0) & np.all([v >= 0 for v in saved.values()], axis=0)  # no budget grows
        if not allowed.any():
            raise RuntimeError(f"cannot bring {kind} within its budget {budgets[kind]:.6g}")
        extra = costs - costs[rows, picks][:, None]
        ratio = np.where(allowed, np.maximum(extra, 0) / np.where(allowed, saved[kind], 1), np.inf)
        layer, option = np.unravel_index(np.argmin(ratio), ratio.shape)
        picks = picks.copy()
        picks[layer] = option
        steps += 1
