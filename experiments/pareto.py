"""Accuracy-energy Pareto front from ptq / mixed results: the study's Figure 2.

    python -m experiments.pareto --results='runs/*/ptq/results.json,runs/*/mixed/results.json'

Reads every matching results.json (each holds top1, fp32_top1 and energy.relative), adds
the FP32 point of each model, computes the non-dominated set (lower energy, higher top-1)
per model, prints it, and writes WORKDIR/pareto/results.json and pareto.png. Results made with
reconstruction PTQ (``--reconstruct``) and by experiments.qat (QAT, and its FP32 control) are
drawn apart, with two fronts: round-to-nearest points only, and all points. Include QAT results
with e.g. ``--results='runs/*/ptq/results.json,runs/*/qat/results.json'``; each QAT result also
adds its round-to-nearest start at the same widths.
"""

from __future__ import annotations

import glob

from absl import flags

from eqjax.algorithms.pareto import pareto_front
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    flags.DEFINE_list("results", ["runs/*/ptq/results.json", "runs/*/mixed/results.json"],
                      "Comma-separated globs of results.json files.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/pareto/.")


def _method(result: dict) -> str:
    """``nearest`` (round-to-nearest PTQ), the reconstruction method of a result, ``qat`` (a
    quantization-aware trained model: experiments.qat, or experiments.ptq --qat_state), ``learned``
    (widths learned under a budget, then QAT: experiments.qat --learn_bits) or ``control``
    (experiments.qat --control, the full-precision model fine-tuned alike)."""
    if result.get("experiment") == "qat":
        return "control" if result.get("control") else "learned" if result.get("width_search") else "qat"
    if result.get("qat"):
        return "qat"
    return (result.get("reconstruction") or {}).get("method", "nearest")


def _widths(result: dict) -> str:
    """``W4A4`` for a uniform policy, ``mixed`` for one from --bits_json, ``learned`` for --learn_bits."""
    if result.get("width_search"):
        return "learned"
    if result.get("config", {}).get("bits_json"):
        return "mixed"
    return f"W{result.get('w_bits')}A{result.get('a_bits')}"


def _label(result: dict, path: str) -> str:
    method = _method(result)
    if result.get("experiment") == "qat":
        if result.get("control"):
            return result["method"]
        if result.get("width_search"):
            return f"learned widths + QAT {result['energy']['relative']:.3f}"
        return f"{_widths(result)} {result['method']}"
    if result.get("qat"):
        return f"W{result.get('w_bits')}A{result.get('a_bits')} {result['qat'].get('method', 'QAT')} (loaded)"
    suffix = ("" if method == "nearest" else f" + {method}") + (
        " + bias corr." if result.get("config", {}).get("bias_correction") else "")
    if result.get("experiment") == "mixed":
        config = result.get("config", {})
        strategy = config.get("strategy", "?")
        if strategy == "budget":  # which sensitivity chose the allocation: the sweep or a one-pass estimate
            second_order = result.get("second_order") or {}
            strategy += f", {second_order.get('method') or 'sweep'} {result['energy']['relative']:.3f}"
        return f"mixed ({strategy}){suffix}"
    config = result.get("config", {})
    name = f"W{result.get('w_bits')}A{result.get('a_bits')} {config.get('calib_method', '')}".strip()
    if config.get("weight_method", "absmax") != "absmax":
        name += f", {config['weight_method']} weights"
    return name + suffix


def load_points(patterns) -> list[dict]:
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no results.json matches {', '.join(patterns)}")
    points = []
    for path in paths:
        result = common.read_results_json(path, flag="--results")
        missing = [k for k in ("model", "top1", "fp32_top1", "energy") if result.get(k) is None]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)} (not a ptq/mixed result with energy)")
        points.append({"model": result["model"], "label": _label(result, path), "path": path,
                       "method": _method(result), "relative_energy": result["energy"]["relative"],
                       "top1": result["top1"]})
        if result.get("experiment") == "qat" and result.get("nearest_top1") is not None:  # its start, same widths
            corrected = " + bias corr." if result.get("config", {}).get("bias_correction") else ""
            points.append({"model": result["model"], "path": path, "method": "nearest",
                           "label": f"{_widths(result)} round-to-nearest{corrected} (QAT start)",
                           "relative_energy": result["energy"]["relative"], "top1": result["nearest_top1"]})
        fp32 = {"model": result["model"], "label": "FP32", "path": path, "method": "nearest",
                "relative_energy": 1.0, "top1": result["fp32_top1"]}
        if not any(p["model"] == fp32["model"] and p["label"] == "FP32" for p in points):
            points.append(fp32)
    return points


def _plot(path, by_model):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(by_model), figsize=(6 * len(by_model), 4.5), squeeze=False)
    for ax, (model, (points, front, nearest_front)) in zip(axes[0], by_model.items()):
        kinds = [p["method"] if p["method"] in ("nearest", "qat", "learned", "control") else "reconstructed"
                 for p in points]
        reconstructed = [k != "nearest" for k in kinds]
        for kind, color, name in (("nearest", "grey", "round-to-nearest"), ("reconstructed", "tab:blue", "reconstructed"),
                                  ("qat", "tab:green", "QAT"), ("learned", "tab:purple", "learned widths + QAT"),
                                  ("control", "black", "FP32 control")):
            mine = [p for p, k in zip(points, kinds) if k == kind]
            if mine:
                ax.scatter([p["relative_energy"] for p in mine], [p["top1"] for p in mine], color=color, label=name)
        for p in points:
            ax.annotate(p["label"], (p["relative_energy"], p["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        if any(reconstructed):
            ax.plot([points[i]["relative_energy"] for i in nearest_front], [points[i]["top1"] for i in nearest_front],
                    "--", color="grey", label="front, round-to-nearest")
        ax.plot([points[i]["relative_energy"] for i in front], [points[i]["top1"] for i in front],
                "o-", color="tab:red", label="Pareto front" + (" (all)" if any(reconstructed) else ""))
        ax.set_xlabel("energy relative to FP32")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(model)
        ax.legend()
    common.save_figure(fig, path)


def run(patterns, workdir: str) -> dict:
    """The front of every model in the results matching ``patterns``; writes WORKDIR/pareto/results.json and pareto.png."""
    out = common.output_dir(workdir, "pareto")
    points = load_points(patterns)
    by_model = {}
    for model in sorted({p["model"] for p in points}):
        mine = [p for p in points if p["model"] == model]
        nearest = [i for i, p in enumerate(mine) if p["method"] == "nearest"]
        nearest_front = [nearest[i] for i in pareto_front([mine[i]["relative_energy"] for i in nearest],
                                                          [mine[i]["top1"] for i in nearest])]
        by_model[model] = (mine, pareto_front([p["relative_energy"] for p in mine], [p["top1"] for p in mine]),
                           nearest_front)
    _plot(f"{out}/pareto.png", by_model)
    result = {"experiment": "pareto", "config": {"results": list(patterns), "workdir": workdir},
              "environment": common.environment(),
              "models": {m: {"points": pts, "front": [pts[i] for i in front],
                             "front_nearest": [pts[i] for i in nearest_front]}
                         for m, (pts, front, nearest_front) in by_model.items()}}
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    result = run(FLAGS.results, FLAGS.workdir)
    for model, entry in result["models"].items():
        print(f"{model}: {len(entry['points'])} points, Pareto front (all points):")
        for p in entry["front"]:
            print(f"  {p['label']:24s} energy {p['relative_energy']:.4f}  top-1 {p['top1']:.2f}%")
    print(f"wrote {result['results_path']} and pareto.png")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
