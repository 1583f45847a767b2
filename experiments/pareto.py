"""Accuracy-energy Pareto front from ptq / mixed results: the study's Figure 2.

    python -m experiments.pareto --results='runs/*/ptq/results.json,runs/*/mixed/results.json'

Reads every matching results.json (each holds top1, fp32_top1 and energy.relative), adds
the FP32 point of each model, computes the non-dominated set (lower energy, higher top-1)
per model, prints it, and writes WORKDIR/pareto/results.json and pareto.png.
"""

from __future__ import annotations

import glob
import json

from absl import flags

from eqjax.pareto import pareto_front
from experiments import common

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    flags.DEFINE_list("results", ["runs/*/ptq/results.json", "runs/*/mixed/results.json"],
                      "Comma-separated globs of results.json files.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/pareto/.")


def _label(result: dict, path: str) -> str:
    if result.get("experiment") == "mixed":
        return f"mixed ({result.get('config', {}).get('strategy', '?')})"
    return f"W{result.get('w_bits')}A{result.get('a_bits')} {result.get('config', {}).get('calib_method', '')}".strip()


def load_points(patterns) -> list[dict]:
    paths = sorted({p for pattern in patterns for p in glob.glob(pattern)})
    if not paths:
        raise FileNotFoundError(f"no results.json matches {', '.join(patterns)}")
    points = []
    for path in paths:
        with open(path) as f:
            result = json.load(f)
        missing = [k for k in ("model", "top1", "fp32_top1", "energy") if result.get(k) is None]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)} (not a ptq/mixed result with energy)")
        points.append({"model": result["model"], "label": _label(result, path), "path": path,
                       "relative_energy": result["energy"]["relative"], "top1": result["top1"]})
        fp32 = {"model": result["model"], "label": "FP32", "path": path, "relative_energy": 1.0,
                "top1": result["fp32_top1"]}
        if not any(p["model"] == fp32["model"] and p["label"] == "FP32" for p in points):
            points.append(fp32)
    return points


def _plot(path, by_model):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(by_model), figsize=(6 * len(by_model), 4.5), squeeze=False)
    for ax, (model, (points, front)) in zip(axes[0], by_model.items()):
        ax.scatter([p["relative_energy"] for p in points], [p["top1"] for p in points], color="grey")
        for p in points:
            ax.annotate(p["label"], (p["relative_energy"], p["top1"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
        ax.plot([points[i]["relative_energy"] for i in front], [points[i]["top1"] for i in front],
                "o-", color="tab:red", label="Pareto front")
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
        by_model[model] = (mine, pareto_front([p["relative_energy"] for p in mine], [p["top1"] for p in mine]))
    _plot(f"{out}/pareto.png", by_model)
    result = {"experiment": "pareto", "config": {"results": list(patterns), "workdir": workdir},
              "environment": common.environment(),
              "models": {m: {"points": pts, "front": [pts[i] for i in front]} for m, (pts, front) in by_model.items()}}
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    result = run(FLAGS.results, FLAGS.workdir)
    for model, entry in result["models"].items():
        print(f"{model}: {len(entry['points'])} points, Pareto front:")
        for p in entry["front"]:
            print(f"  {p['label']:24s} energy {p['relative_energy']:.4f}  top-1 {p['top1']:.2f}%")
    print(f"wrote {result['results_path']} and pareto.png")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
