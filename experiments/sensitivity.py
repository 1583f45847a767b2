"""Layer sensitivity (the study's eq. 5, Table 5, Figure 3) in one compiled, vmapped sweep.

    python -m experiments.sensitivity --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --bits=4,6,8 --workdir=runs/r18_sens

Every conv/dense layer is quantized alone (weights and inputs) at each of --bits, on the
calibration images; scores: l2 (eq. 5), rel_l2, kl, top1_agreement, delta_loss. Prints the
5 most sensitive and 5 most robust layers (Table 5) by --rank_metric at --rank_bits and writes
WORKDIR/sensitivity/results.json and sensitivity.png (per-layer bars, Figure 3).
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from eqjax import sensitivity
from experiments import common, setup as setup_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("bits", ["4", "6", "8"], "Bit widths to sweep (all in one call).")
flags.DEFINE_enum("rank_metric", "l2", list(sensitivity.METRICS), "Metric of the printed ranking.")
flags.DEFINE_integer("rank_bits", 4, "Bit width of the printed ranking (one of --bits).")
flags.DEFINE_bool("include_matmuls", False, "Also sweep the attention matmuls.")
flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/sensitivity/.")


def _plot(path, result, metric, bits, title):
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


def main(argv):
    del argv
    bits = setup_lib.parse_bits(FLAGS.bits)
    if FLAGS.rank_bits not in bits:
        raise ValueError(f"--rank_bits={FLAGS.rank_bits} is not among --bits={','.join(map(str, bits))}")
    setup = setup_lib.prepare()
    stats, calibration_s = setup_lib.collect_stats(setup)
    start = time.perf_counter()
    result = setup_lib.run_sweep(setup, stats, bits, include_matmuls=FLAGS.include_matmuls)
    sweep_s = time.perf_counter() - start

    table = result.table(FLAGS.rank_metric, FLAGS.rank_bits)
    ranked = sorted(table, key=table.get, reverse=FLAGS.rank_metric != "top1_agreement")
    print(f"{setup.spec.name}: {FLAGS.rank_metric} at {FLAGS.rank_bits} bits on {result.num_images} images")
    print("most sensitive:  " + ", ".join(f"{n} ({table[n]:.4g})" for n in ranked[:5]))
    print("most robust:     " + ", ".join(f"{n} ({table[n]:.4g})" for n in ranked[::-1][:5]))
    out = common.output_dir(FLAGS.workdir, "sensitivity")
    _plot(f"{out}/sensitivity.png", result, FLAGS.rank_metric, bits,
          f"{setup.spec.name}: layer sensitivity ({FLAGS.rank_metric})")
    payload = setup_lib.base_result(setup, "sensitivity", ("bits", "rank_metric", "rank_bits",
                                                           "include_matmuls", "workdir"))
    payload.update({"sensitivity": result.to_dict(), "most_sensitive": ranked[:5], "most_robust": ranked[::-1][:5],
                    "wall_times_s": {"calibration": calibration_s, "sweep": sweep_s}})
    path = common.write_json_atomic(f"{out}/results.json", payload)
    print(f"wrote {path} and {out}/sensitivity.png ({sweep_s:.1f} s sweep)")


if __name__ == "__main__":
    app.run(main)
