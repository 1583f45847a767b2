"""Mixed precision: the study's percentile rule (eq. 6) and allocation under an energy budget (eq. 2).

* :func:`percentile_bits` — S_l >= P75 -> 8 bits, P25 <= S_l < P75 -> 6, S_l < P25 -> 4.
* :func:`budget_bits` — choose b_l from a set to minimise sum_l cost_l(b_l) subject to
  E(b) / E_FP32 <= budget: a multiple-choice knapsack solved by dynamic programming over
  the energy axis. Layer energies are rounded *up* to a grid of ``resolution`` steps of
  the budget's slack above the all-cheapest allocation, so every returned allocation
  satisfies the true budget; the optimality gap comes only from that rounding (at most
  one grid step of energy per layer, reported as ``max_rounding_gap``).
* :func:`budget_sweep` — the allocation for each of many budgets (a Pareto sweep).

Energy is additive over layers (``energy.layer_energy``); layers outside the allocation
(e.g. attention matmuls) keep fixed bits and count as a constant.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from eqjax.algorithms import allocation, energy as energy_lib
from eqjax.quant import numerics

STUDY_PERCENTILE_BITS = ((75.0, 8), (25.0, 6), (0.0, 4))


def percentile_thresholds(bit_set: Sequence[int]) -> tuple[tuple[float, int], ...]:
    """``(percentile, bits)`` cuts for a bit set: the study's 25/50/25 split for three widths
    (>= P75 -> widest, P25..P75 -> middle, < P25 -> narrowest), equal shares otherwise."""
    widths = sorted(set(int(b) for b in bit_set), reverse=True)
    if not widths:
        raise ValueError("empty bit set")
    if len(widths) == 3:
        return tuple(zip((75.0, 25.0, 0.0), widths))
    k = len(widths)
    return tuple((100.0 * (k - 1 - i) / k, b) for i, b in enumerate(widths))


def percentile_bits(sensitivity: Mapping[str, float], *,
                    thresholds: Sequence[tuple[float, int]] = STUDY_PERCENTILE_BITS) -> dict[str, int]:
    """Bits per layer from its sensitivity percentile (eq. 6).

    Args:
      sensitivity: ``{layer: S_l}`` (higher = more sensitive).
      thresholds: ``(percentile, bits)`` from the highest percentile down; a layer gets
        the bits of the first percentile its score reaches.

    Returns:
      ``{layer: bits}``.
    """
    if not sensitivity:
        raise ValueError("empty sensitivity table")
    for _, b in thresholds:
        numerics.check_bits(b, name="percentile bits")
    scores = np.asarray(list(sensitivity.values()), np.float64)
    cuts = [(np.percentile(scores, p), b) for p, b in thresholds]
    out = {}
    for name, s in sensitivity.items():
        out[name] = next(b for cut, b in cuts if s >= cut)
    return out


def _layer_energies(counts: Sequence[energy_lib.LayerCount], fixed_bits: Mapping[str, Mapping],
                    layers: Sequence[str], bit_set: Sequence[int], model: energy_lib.EnergyModel):
    by_name = {c.name: c for c in counts}
    missing = [n for n in layers if n not in by_name]
    if missing:
        raise ValueError(f"layers not in the model: {', '.join(missing)}")
    table = np.array([[energy_lib.layer_energy(by_name[n], b, b, model)["total"] for b in bit_set]
                      for n in layers])
    fixed = sum(energy_lib.layer_energy(c, fixed_bits[c.name]["w"], fixed_bits[c.name]["a"], model)["total"]
                for c in counts if c.name not in set(layers))
    fp32 = sum(energy_lib.layer_energy(c, None, None, model)["total"] for c in counts)
    return table, fixed, fp32


def minimum_budget(counts, fixed_bits, layers, bit_set, model) -> float:
    """The smallest feasible relative energy (by :func:`energy.relative_energy`): every layer of
    ``layers`` at its narrowest width of ``bit_set``, the others at ``fixed_bits``."""
    b = min(bit_set)
    bits = {**{n: dict(v) for n, v in fixed_bits.items()}, **{n: {"w": b, "a": b} for n in layers}}
    return float(energy_lib.relative_energy(counts, bits, model))


def budget_bits(cost: Mapping[str, Sequence[float]], counts: Sequence[energy_lib.LayerCount], *,
                budget: float, bit_set: Sequence[int] = (4, 6, 8),
                fixed_bits: Mapping[str, Mapping] | None = None,
                model: energy_lib.EnergyModel = energy_lib.PRESETS["paper"],
                resolution: int = 4000) -> dict:
    """Bits minimising the summed cost under ``relative energy <= budget``.

    Args:
      cost: ``{layer: [cost at bit_set[0], cost at bit_set[1], ...]}`` (sensitivity or
        predicted loss increase; lower is better).
      counts: ``energy.count_layers`` of the model.
      budget: relative energy bound (E / E_FP32), e.g. 0.15.
      bit_set: candidate bit widths (any set in [2, 16]).
      fixed_bits: ``{name: {'w', 'a'}}`` of the layers not in ``cost`` (e.g. matmuls).
      model: energy model.
      resolution: energy grid steps across the budget (DP size ``layers x resolution``).

    Returns:
      ``{'bits': {layer: b}, 'cost': total cost, 'relative_energy': ..., 'budget': ...,
      'max_rounding_gap': relative energy lost to rounding}``.

    Raises:
      ValueError: budget below the all-minimum-bits energy (the message gives the minimum),
        bits outside [2, 16], an empty layer list, cost rows of the wrong length.
    """
    layers = list(cost)
    if not layers:
        raise ValueError("empty cost table: no layers to allocate")
    for b in bit_set:
        numerics.check_bits(b, name="bit_set")
    if len(set(bit_set)) != len(bit_set) or not bit_set:
        raise ValueError(f"bit_set must be distinct bit widths, got {tuple(bit_set)}")
    bad = [n for n in layers if len(cost[n]) != len(bit_set)]
    if bad:
        raise ValueError(f"cost rows must have {len(bit_set)} values (one per bit width); bad: {bad[:5]}")
    fixed_bits = fixed_bits or {}
    absent = [c.name for c in counts if c.name not in cost and c.name not in fixed_bits]
    if absent:
        raise ValueError(f"layers with neither cost nor fixed bits: {', '.join(absent)}")
    table, fixed, fp32 = _layer_energies(counts, fixed_bits, layers, bit_set, model)
    smallest = minimum_budget(counts, fixed_bits, layers, bit_set, model)
    if budget < smallest:
        raise ValueError(f"budget {budget:.4f} is below the smallest feasible relative energy "
                         f"{smallest:.4f} (every layer at {min(bit_set)} bits)")
    # DP over the energy above each layer's cheapest option: the all-cheapest allocation
    # has weight 0 and stays feasible; extras are rounded up, so results never exceed budget.
    extra = table - table.min(axis=1, keepdims=True)
    capacity = budget * fp32 - fixed - table.min(axis=1).sum()
    step = capacity / resolution
    if step > 0:
        weights = np.ceil(extra / step - 1e-9).astype(np.int64)
    else:
        weights = np.where(extra > 0, resolution + 1, 0).astype(np.int64)
    costs = np.asarray([cost[n] for n in layers], np.float64)
    inf = np.inf
    best = np.full(resolution + 1, inf)
    best[0] = 0.0
    choice = np.zeros((len(layers), resolution + 1), np.int8)
    for i in range(len(layers)):
        new = np.full(resolution + 1, inf)
        for j in range(len(bit_set)):
            w = weights[i, j]
            if w > resolution:
                continue
            candidate = np.full(resolution + 1, inf)
            candidate[w:] = best[:resolution + 1 - w] + costs[i, j]
            better = candidate < new
            new[better] = candidate[better]
            choice[i, better] = j
        best = new
    end = int(np.argmin(best))
    picks = []
    for i in reversed(range(len(layers))):
        j = int(choice[i, end])
        picks.append(j)
        end -= int(weights[i, j])
    picks.reverse()
    # The energy model's own sum may differ from the table's in the last bits: held to it exactly.
    def measure(picks):
        bits = {**{n: dict(b) for n, b in fixed_bits.items()},
                **{n: {"w": int(bit_set[j]), "a": int(bit_set[j])} for n, j in zip(layers, picks)}}
        return {"relative_energy": energy_lib.relative_energy(counts, bits, model)}

    picks, steps = allocation.step_down(np.asarray(picks), costs, {"relative_energy": table}, measure,
                                        {"relative_energy": budget})
    bits = {n: int(bit_set[j]) for n, j in zip(layers, picks)}
    return {"bits": bits, "cost": float(sum(costs[i, j] for i, j in enumerate(picks))),
            "relative_energy": float(measure(picks)["relative_energy"]), "budget": float(budget),
            "max_rounding_gap": float(len(layers) * max(step, 0.0) / fp32), "steps_down": steps}


def budget_sweep(cost, counts, *, budgets: Sequence[float], **kwargs) -> list[dict]:
    """:func:`budget_bits` for each budget (infeasible ones are skipped with a note)."""
    out = []
    for b in budgets:
        try:
            out.append(budget_bits(cost, counts, budget=b, **kwargs))
        except ValueError as e:
            out.append({"budget": float(b), "infeasible": str(e)})
    return out
