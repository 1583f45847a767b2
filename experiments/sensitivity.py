"""Layer sensitivity (the study's eq. 5, Table 5, Figure 3) in one compiled, vmapped sweep.

    python -m experiments.sensitivity --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --bits=4,6,8 --workdir=runs/r18_sens

--method=sweep (default, exact): every conv/dense layer is quantized alone (weights and
inputs) at each of --bits, on the calibration images; scores: l2 (eq. 5), rel_l2, kl,
top1_agreement, delta_loss. --method=fisher|hessian: one backward pass estimates every
layer's loss increase at every width of weights and of activations separately
(eqjax.algorithms.second_order); its score is delta_loss (weights and inputs at the same width), and
results.json also holds the weight and activation terms apart. Prints the 5 most sensitive
and 5 most robust layers (Table 5) by --rank_metric at --rank_bits and writes
WORKDIR/sensitivity/results.json and sensitivity.png (per-layer bars, Figure 3).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
from absl import flags

from eqjax import ptq
from eqjax.algorithms import second_order, sensitivity
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS
METHODS = ("sweep", *second_order.METHODS)


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    flags.DEFINE_list("bits", ["4", "6", "8"], "Bit widths to sweep (all in one call).")
    flags.DEFINE_enum("method", "sweep", list(METHODS), "sweep (exact, one forward per configuration), or a "
                      "one-pass estimate: fisher (diagonal empirical Fisher) or hessian (Hutchinson trace).")
    flags.DEFINE_integer("micro_batch", 8, "fisher/hessian: images per weight-gradient sample (8 suits CPU; "
                         "on a GPU 64 is several times faster).")
    flags.DEFINE_enum("rank_metric", None, list(sensitivity.METRICS),
                      "Metric of the printed ranking (default l2 for the sweep, delta_loss for estimates).")
    flags.DEFINE_integer("rank_bits", 4, "Bit width of the printed ranking (one of --bits).")
    flags.DEFINE_bool("include_matmuls", False, "Also sweep the attention matmuls.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/sensitivity/.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SensitivityRunConfig:
    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig  # estimators of the calibration (bits are the sweep's)
    bits: tuple[int, ...] = (4, 6, 8)
    method: str = "sweep"
    micro_batch: int = 8
    rank_metric: str | None = None  # default: l2 for the sweep, delta_loss for an estimate
    rank_bits: int = 4
    include_matmuls: bool = False
    workdir: str = "runs/default"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.rank_metric is None:
            object.__setattr__(self, "rank_metric", "l2" if self.method == "sweep" else "delta_loss")
        if self.method != "sweep" and self.rank_metric != "delta_loss":
            raise ValueError(f"--method={self.method} estimates delta_loss only; --rank_metric={self.rank_metric} "
                             "needs --method=sweep")
        if self.micro_batch < 1:
            raise ValueError(f"--micro_batch must be >= 1, got {self.micro_batch}")
        if self.rank_metric not in sensitivity.METRICS:
            raise ValueError(f"--rank_metric must be one of {sensitivity.METRICS}, got {self.rank_metric!r}")
        if self.rank_bits not in self.bits:
            raise ValueError(f"--rank_bits={self.rank_bits} is not among --bits={','.join(map(str, self.bits))}")


def config_from_flags() -> SensitivityRunConfig:
    return SensitivityRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(w_bits=8, a_bits=8, keep_first_last_bits=None),
        bits=workload_lib.parse_bits(FLAGS.bits), method=FLAGS.method, micro_batch=FLAGS.micro_batch,
        rank_metric=FLAGS.rank_metric, rank_bits=FLAGS.rank_bits,
        include_matmuls=FLAGS.include_matmuls, workdir=FLAGS.workdir)


def _plot(path, result, metric, title):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * len(result.layers)), 4))
    width = 0.8 / len(result.bits)
    for j, b in enumerate(result.bits):
        ax.bar(np.arange(len(result.layers)) + j * width, result.scores[metric][:, j], width, label=f"{b} bits")
    ax.set_xticks(np.arange(len(result.layers)) + 0.4 - width / 2, result.layers, rotation=90, fontsize=6)
    ax.set_ylabel(metric)
    ax.set_yscale("log" if metric in ("l2", "rel_l2", "kl") else "linear")
    ax.set_title(title)
    ax.legend()
    common.save_figure(fig, path)


def run(config: SensitivityRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Sweeps every layer at every bit width; writes WORKDIR/sensitivity/results.json and the plot."""
    out = common.output_dir(config.workdir, "sensitivity")
    work = workload_lib.open_workload(config.workload, log=log)
    stats, calibration_s = work.collect_stats()
    start = time.perf_counter()
    estimate = None
    if config.method == "sweep":
        result = work.sweep(stats, config.ptq, config.bits, include_matmuls=config.include_matmuls)
    else:
        estimate = work.second_order(stats, config.ptq, config.bits, method=config.method,
                                     micro_batch=config.micro_batch, include_matmuls=config.include_matmuls)
        result = estimate.as_sensitivity()
    sweep_s = time.perf_counter() - start

    table = result.table(config.rank_metric, config.rank_bits)
    ranked = sorted(table, key=table.get, reverse=config.rank_metric != "top1_agreement")
    _plot(f"{out}/sensitivity.png", result, config.rank_metric,
          f"{work.spec.name}: layer sensitivity ({config.rank_metric})")
    payload = work.base_result("sensitivity", {
        **dataclasses.asdict(config.ptq), "bits": list(config.bits), "method": config.method,
        "micro_batch": config.micro_batch, "rank_metric": config.rank_metric,
        "rank_bits": config.rank_bits, "include_matmuls": config.include_matmuls, "workdir": config.workdir})
    payload.update({"method": config.method, "sensitivity": result.to_dict(),
                    "second_order": estimate.to_dict() if estimate else None,
                    "most_sensitive": ranked[:5], "most_robust": ranked[::-1][:5],
                    "ranking_scores": {n: table[n] for n in ranked},
                    "wall_times_s": {"calibration": calibration_s, "sensitivity": sweep_s}})
    payload["results_path"] = common.write_json_atomic(f"{out}/results.json", payload)
    return payload


def main(argv):
    del argv
    config = config_from_flags()
    r = run(config)
    scores = r["ranking_scores"]
    print(f"{r['model']}: {config.rank_metric} at {config.rank_bits} bits on {r['sensitivity']['num_images']} images")
    print("most sensitive:  " + ", ".join(f"{n} ({scores[n]:.4g})" for n in r["most_sensitive"]))
    print("most robust:     " + ", ".join(f"{n} ({scores[n]:.4g})" for n in r["most_robust"]))
    print(f"wrote {r['results_path']} and sensitivity.png ({r['wall_times_s']['sensitivity']:.1f} s, {r['method']})")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
