"""Standard vs ranking-aware PTQ of a Vision Transformer (the study's Table 4, Liu et al. 2021).

For every bit width: the standard PTQ policy (absmax weights per channel, calibrated absmax
activation clips, attention matmul operands quantized, first/last layer 8 bits), then the same
policy with its block scales optimised by :func:`eqjax.ranking.ranking_ptq`. Both are evaluated
for top-1/top-5 and for how well they keep the full-precision model: the share of
attention-score key pairs whose order is kept, and the Pearson correlation of the logits.

    python -m experiments.ranking --model=deit_tiny --weights=timm --bits=6 \\
        --dataset=folder:../shared/data/imagenet/val --calib_dataset=folder:../shared/data/imagenet/calib

A trained ViT offline (``experiments.train`` writes one):

    python -m experiments.ranking --model=vit_tiny_cifar --weights=runs/vit_c10/train/final \\
        --dataset=tar:../shared/data/cifar10/test.tar --calib_dataset=tar:../shared/data/cifar10/train.tar

Expected (2-epoch ViT of the README, FP32 43.85%): W4A4 top-1 38.75% standard, 44.55%
ranking-aware; attention pairs kept in order 74.1% -> 81.9% (~14 min on 2 cores).
Writes WORKDIR/ranking/results.json (config, environment, one row per bit width and method,
per-block objective before/after) and WORKDIR/ranking/ranking.png.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

from eqjax import policy as policy_lib, ranking
from eqjax.models import vit
from experiments import common, setup as setup_lib

FLAGS = flags.FLAGS
flags.DEFINE_list("bits", ["8", "6", "4"], "Bit widths (weights and activations), one row pair each.")
flags.DEFINE_enum("method", "adam", list(ranking.METHODS), "adam: optax Adam on log-scales; "
                  "grid: the paper's alternating search over interval multipliers.")
flags.DEFINE_integer("steps", 200, "Adam steps per block (grid: search rounds).")
flags.DEFINE_integer("rank_batch_size", 32, "Calibration images per optimisation step.")
flags.DEFINE_float("learning_rate", 1e-2, "Adam learning rate on the log-scales.")
flags.DEFINE_float("gamma", 0.1, "Weight γ of the ranking loss.")
flags.DEFINE_float("margin", 0.0, "Hinge margin θ of the ranking loss.")
flags.DEFINE_enum("similarity", "pearson", list(ranking.SIMILARITIES), "Output similarity Γ.")
flags.DEFINE_integer("num_rows", 32, "Attention query rows ranked per step and measured; 0 = all.")
flags.DEFINE_integer("agreement_images", 64, "Evaluation images for the kept-order measurement.")
flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/ranking/.")
FLAGS.set_default("model", "deit_tiny")
FLAGS.set_default("weights", "timm")

is_block = lambda module: isinstance(module, vit.Block)


def _agreement(setup, images, qvars, policy) -> dict:
    out = ranking.attention_agreement(setup.model, setup.variables, qvars, policy, images,
                                      num_rows=FLAGS.num_rows or None)
    return {k: float(v) for k, v in out.items()}


def _plot(path, rows, model):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    for offset, method in ((-0.2, "standard"), (0.2, "ranking")):
        sel = {r["bits"]: r for r in rows if r["method"] == method}
        ax1.bar([i + offset for i in range(len(bits))], [sel[b]["top1"] for b in bits], width=0.4, label=method)
        ax2.bar([i + offset for i in range(len(bits))], [100 * sel[b]["kept_order"] for b in bits],
                width=0.4, label=method)
    for ax, label in ((ax1, "top-1 (%)"), (ax2, "attention pairs in order (%)")):
        ax.set_xticks(range(len(bits)), [f"W{b}A{b}" for b in bits])
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(model)
    common.save_figure(fig, path)


def main(argv):
    del argv
    started = time.perf_counter()
    bits_list = setup_lib.parse_bits(FLAGS.bits)
    ranking.check_options(gamma=FLAGS.gamma, steps=FLAGS.steps, method=FLAGS.method,
                          similarity_kind=FLAGS.similarity, margin=FLAGS.margin,
                          batch_size=FLAGS.rank_batch_size, learning_rate=FLAGS.learning_rate)
    if FLAGS.agreement_images < 1 or FLAGS.num_rows < 0:
        raise ValueError(f"--agreement_images must be >= 1 and --num_rows >= 0, got "
                         f"{FLAGS.agreement_images}, {FLAGS.num_rows}")
    setup = setup_lib.prepare()
    if not any(c.name.endswith(ranking.SCORES_SUFFIX) for c in setup.calls):
        raise ValueError(f"--model={FLAGS.model} has no attention layers; ranking-aware PTQ needs a ViT "
                         "(deit_tiny, vit_tiny_cifar)")
    stats, calibration_s = setup_lib.collect_stats(setup)
    calib_images = np.concatenate([images for images, _ in setup.calib_batches()])
    agreement_images = np.concatenate([images for images, _ in setup.eval_batches()])[:FLAGS.agreement_images]
    fp32 = setup_lib.evaluate_fp32(setup)

    rows, blocks = [], {}
    for bits in bits_list:
        policy = setup_lib.calibrated(setup, stats, policy_lib.build(
            setup.calls, w_bits=bits, a_bits=bits, keep_first_last_bits=8, quantize_matmuls=FLAGS.quantize_matmuls))
        qvars = setup_lib.quantized_variables(setup, policy)
        standard = setup_lib.evaluate_policy(setup, policy, f"W{bits}A{bits} standard", qvars)
        rows.append({"bits": bits, "method": "standard", "top1": standard["top1"], "top5": standard["top5"],
                     **_agreement(setup, agreement_images, qvars, policy)})
        common.log(f"W{bits}A{bits}: ranking-aware optimisation ({FLAGS.method}, {FLAGS.steps} steps per block)")
        start = time.perf_counter()
        result = ranking.ranking_ptq(
            setup.model, setup.variables, policy, calib_images, is_block=is_block, method=FLAGS.method,
            steps=FLAGS.steps, batch_size=FLAGS.rank_batch_size, learning_rate=FLAGS.learning_rate,
            gamma=FLAGS.gamma, margin=FLAGS.margin, similarity_kind=FLAGS.similarity,
            num_rows=FLAGS.num_rows or None, seed=FLAGS.seed,
            on_block=lambda r: common.log(
                f"  {r['block']}: objective {r['objective_before']:.4f} -> {r['objective_after']:.4f}, "
                f"similarity {r['similarity_before']:.4f} -> {r['similarity_after']:.4f}, "
                f"rank {r['rank_before']:.4f} -> {r['rank_after']:.4f} ({r['seconds']:.1f} s)"))
        optimisation_s = time.perf_counter() - start
        if result.stopped_at is not None:
            common.log(f"WARNING: non-finite loss in {result.stopped_at['block']} at step "
                       f"{result.stopped_at['step']}; it and later blocks keep their calibrated scales")
        qvars = setup_lib.quantized_variables(setup, result.policy, result.weight_scales)
        ranked = setup_lib.evaluate_policy(setup, result.policy, f"W{bits}A{bits} ranking", qvars)
        rows.append({"bits": bits, "method": "ranking", "top1": ranked["top1"], "top5": ranked["top5"],
                     **_agreement(setup, agreement_images, qvars, result.policy),
                     "optimisation_s": optimisation_s, "stopped_at": result.stopped_at})
        blocks[bits] = result.blocks

    result = setup_lib.base_result(setup, "ranking", (
        "bits", "method", "steps", "rank_batch_size", "learning_rate", "gamma", "margin", "similarity",
        "num_rows", "agreement_images", "workdir"))
    result.update({"fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"], "rows": rows, "blocks": blocks,
                   "num_agreement_images": len(agreement_images),
                   "wall_times_s": {"calibration": calibration_s, "total": time.perf_counter() - started}})
    out = common.output_dir(FLAGS.workdir, "ranking")
    _plot(f"{out}/ranking.png", rows, setup.spec.name)
    path = common.write_json_atomic(f"{out}/results.json", result)
    print(f"{setup.spec.name}: FP32 top-1 {fp32['top1']:.2f}% top-5 {fp32['top5']:.2f}% "
          f"({fp32['num_images']} images)")
    print(f"{'bits':>5} {'method':>9} {'top-1':>7} {'top-5':>7} {'kept order':>11} {'logit corr':>11}")
    for r in rows:
        print(f"{'W%dA%d' % (r['bits'], r['bits']):>5} {r['method']:>9} {r['top1']:7.2f} {r['top5']:7.2f} "
              f"{100 * r['kept_order']:10.2f}% {r['logit_similarity']:11.4f}")
    print(f"-> {path}")


if __name__ == "__main__":
    app.run(main)
