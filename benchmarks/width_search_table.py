"""The table of benchmarks/width_search_measurements.sh: learned widths against the Fisher MILP's and
uniform widths after QAT of the same length, each with its budget, the energy that
experiments.energy recomputes from the written policy, and the search's cost.

    python -m benchmarks.width_search_table runs/width_search

Prints a Markdown table and writes RUNS/table.json.
"""

from __future__ import annotations

import json
import os
import sys

from experiments import common

# (run prefix, model) -> {budget name: relative energy} (benchmarks/width_search_measurements.sh)
SETTINGS = {("", "resnet18_cifar"): {"w4": 0.10505, "w3": 0.07825},
            ("lite0_", "efficientnet_lite0"): {"w4": 0.11456, "w3": 0.08565}}
METHODS = (("learned", "learned (search 1 epoch, then QAT)"),
           ("learned_warm", "learned from the Fisher MILP's widths (search 1 epoch, then QAT)"),
           ("fisher_qat", "Fisher MILP + QAT"), ("uniform", "uniform + QAT"))


def _read(path: str) -> dict | None:
    return common.read_results_json(path, flag="results") if os.path.isfile(path) else None


def _mean_bits(bits: dict, key: str) -> float:
    values = [b[key] for b in bits.values() if b[key] is not None]
    return sum(values) / len(values)


def main(runs: str) -> None:
    rows = []
    for (prefix, model), budgets in SETTINGS.items():
        if not any(os.path.isdir(os.path.join(runs, f"{prefix}{m}_{n}")) for m, _ in METHODS for n in budgets):
            continue
        for name, budget in budgets.items():
            rows += _rows(runs, prefix, model, name, budget)
    print("| model | budget | method | energy (recomputed) | mean w / a bits | round-to-nearest start | after QAT |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("missing"):
            print(f"| {r['model']} | {r['budget']:.4f} | {r['method']} | — | — | — | — (not run) |")
            continue
        energy = f"{r['energy']:.4f}" + (f" ({r['energy_recomputed']:.4f})" if r["energy_recomputed"] is not None else "")
        print(f"| {r['model']} | {r['budget']:.4f} | {r['method']} | {energy} | {r['mean_w_bits']:.2f} / "
              f"{r['mean_a_bits']:.2f} | {r['start_top1']:.2f} | {r['top1']:.2f} |")
    common.write_json_atomic(os.path.join(runs, "table.json"), {"rows": rows})
    print(json.dumps([{k: r.get(k) for k in ("model", "budget", "method", "search_s", "qat_step_s", "train_s",
                                             "repaired")} for r in rows], indent=1))


def _rows(runs: str, prefix: str, model: str, name: str, budget: float) -> list[dict]:
    rows = []
    for method, label in METHODS:
        result = _read(os.path.join(runs, f"{prefix}{method}_{name}", "qat", "results.json"))
        if result is None or not result.get("finished"):
            rows.append({"model": model, "budget": budget, "method": label, "missing": True})
            continue
        recomputed = _read(os.path.join(runs, f"{prefix}energy_{method}_{name}", "energy", "results.json"))
        search = result.get("width_search") or {}
        rows.append({"model": model, "budget": budget, "method": label, "energy": result["energy"]["relative"],
                     "energy_recomputed": recomputed and recomputed["configurations"]["policy"]["relative"],
                     "mean_w_bits": _mean_bits(result["bits"], "w"), "mean_a_bits": _mean_bits(result["bits"], "a"),
                     "start_top1": result["nearest_top1"], "top1": result["top1"], "fp32_top1": result["fp32_top1"],
                     "repaired": search.get("repaired"), "search_s": search.get("seconds"),
                     "qat_step_s": result["wall_times_s"]["step_mean"], "train_s": result["wall_times_s"]["training"]})
    return rows


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/width_search")
