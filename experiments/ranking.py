"""Standard vs ranking-aware PTQ of a Vision Transformer (the study's Table 4, Liu et al. 2021).

For every bit width: the standard PTQ policy (absmax weights per channel, calibrated absmax
activation clips, attention matmul operands quantized, first/last layer 8 bits), then the same
policy with its block scales optimised by :func:`eqjax.algorithms.ranking.ranking_ptq`. Both are evaluated
for top-1/top-5 and for how well they keep the full-precision model: the share of
attention-score key pairs whose order is kept, and the Pearson correlation of the logits.

    python -m experiments.ranking --model=deit_tiny --bits=6 \\
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

import dataclasses
import time
from typing import Any, Callable

import numpy as np
from absl import flags

from eqjax import ptq
from eqjax.algorithms import ranking
from eqjax.models import vit
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
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


is_block = lambda module: isinstance(module, vit.Block)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RankingRunConfig:
    """Standard vs ranking-aware PTQ at each of ``bits`` (options as :func:`eqjax.algorithms.ranking.ranking_ptq`)."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig  # estimators; bits come from ``bits``
    bits: tuple[int, ...] = (8, 6, 4)
    method: str = "adam"
    steps: int = 200
    rank_batch_size: int = 32
    learning_rate: float = 1e-2
    gamma: float = 0.1
    margin: float = 0.0
    similarity: str = "pearson"
    num_rows: int | None = 32
    agreement_images: int = 64
    workdir: str = "runs/default"

    def __post_init__(self):
        ranking.check_options(gamma=self.gamma, steps=self.steps, method=self.method,
                              similarity_kind=self.similarity, margin=self.margin,
                              batch_size=self.rank_batch_size, learning_rate=self.learning_rate)
        if self.agreement_images < 1 or (self.num_rows is not None and self.num_rows < 1):
            raise ValueError(f"agreement_images and num_rows must be >= 1, got {self.agreement_images}, "
                             f"{self.num_rows}")


def config_from_flags() -> RankingRunConfig:
    if FLAGS.num_rows < 0:
        raise ValueError(f"--num_rows must be >= 0, got {FLAGS.num_rows}")
    names = {"similarity_kind": "similarity", "batch_size": "rank_batch_size"}
    names |= {n: n for n in ("gamma", "steps", "method", "margin", "learning_rate", "agreement_images")}
    return workload_lib.translate_errors(lambda: RankingRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(w_bits=8, a_bits=8, keep_first_last_bits=8),
        bits=workload_lib.parse_bits(FLAGS.bits), method=FLAGS.method, steps=FLAGS.steps,
        rank_batch_size=FLAGS.rank_batch_size, learning_rate=FLAGS.learning_rate, gamma=FLAGS.gamma,
        margin=FLAGS.margin, similarity=FLAGS.similarity, num_rows=FLAGS.num_rows or None,
        agreement_images=FLAGS.agreement_images, workdir=FLAGS.workdir), names)


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


@dataclasses.dataclass
class VitRun:
    """A ViT workload ready for side-by-side methods: activation statistics of the FP model,
    the calibration images, the images of the agreement measurement and the FP32 accuracy."""

    work: workload_lib.Workload
    stats: dict
    calibration_s: float
    calib_images: np.ndarray
    agreement_images: np.ndarray
    fp32: dict

    def __post_init__(self):
        self.fp_variables = self.work.variables  # the reference of every agreement measurement

    def measure(self, state: ptq.QuantizedState, label: str, *, num_rows: int | None = 32) -> dict[str, float]:
        """top-1/top-5 of ``state`` on the evaluation images, and how far it keeps the FP model
        (``kept_order``, ``logit_similarity``: :func:`eqjax.algorithms.ranking.attention_agreement`)."""
        measured = self.work.evaluate_quantized(state, label)
        agreement = ranking.attention_agreement(self.work.model, self.fp_variables, state.variables, state.policy,
                                                self.agreement_images, num_rows=num_rows)
        return {"top1": measured["top1"], "top5": measured["top5"], **{k: float(v) for k, v in agreement.items()}}


def open_vit_run(config: workload_lib.WorkloadConfig, agreement_images: int, *, purpose: str,
                 log: Callable[[str], None] = common.log) -> VitRun:
    """Opens a ViT workload (an error names ``purpose`` for a model without attention layers),
    collects its activation statistics and evaluates FP32."""
    work = workload_lib.open_workload(config, log=log)
    if not any(c.name.endswith(ranking.SCORES_SUFFIX) for c in work.calls):
        raise ValueError(f"--model={work.spec.name} has no attention layers; {purpose} needs a ViT "
                         "(deit_tiny, vit_tiny_cifar)")
    stats, calibration_s = work.collect_stats()
    calib_images = np.concatenate([images for images, _ in work.calib_batches()])
    agreement = np.concatenate([images for images, _ in work.eval_batches()])[:agreement_images]
    return VitRun(work, stats, calibration_s, calib_images, agreement, work.evaluate_fp32())


def run(config: RankingRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Standard and ranking-aware PTQ at every bit width; writes WORKDIR/ranking/results.json and ranking.png."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "ranking")
    vit_run = open_vit_run(config.workload, config.agreement_images, purpose="ranking-aware PTQ", log=log)
    work, stats, calibration_s = vit_run.work, vit_run.stats, vit_run.calibration_s
    calib_images, agreement_images, fp32 = vit_run.calib_images, vit_run.agreement_images, vit_run.fp32

    def row(bits, method, state, label, **extra):
        return {"bits": bits, "method": method, **vit_run.measure(state, label, num_rows=config.num_rows), **extra}

    rows, blocks = [], {}
    for bits in config.bits:
        bits_config = dataclasses.replace(config.ptq, w_bits=bits, a_bits=bits)
        policy = work.calibrated(stats, bits_config)
        rows.append(row(bits, "standard", work.quantize(policy, bits_config), f"W{bits}A{bits} standard"))
        log(f"W{bits}A{bits}: ranking-aware optimisation ({config.method}, {config.steps} steps per block)")
        start = time.perf_counter()
        result = ranking.ranking_ptq(
            work.model, work.variables, policy, calib_images, is_block=is_block, method=config.method,
            steps=config.steps, batch_size=config.rank_batch_size, learning_rate=config.learning_rate,
            gamma=config.gamma, margin=config.margin, similarity_kind=config.similarity,
            num_rows=config.num_rows, seed=config.workload.seed,
            on_block=lambda r: log(
                f"  {r['block']}: objective {r['objective_before']:.4f} -> {r['objective_after']:.4f}, "
                f"similarity {r['similarity_before']:.4f} -> {r['similarity_after']:.4f}, "
                f"rank {r['rank_before']:.4f} -> {r['rank_after']:.4f} ({r['seconds']:.1f} s)"))
        optimisation_s = time.perf_counter() - start
        if result.stopped_at is not None:
            log(f"WARNING: non-finite loss in {result.stopped_at['block']} at step "
                f"{result.stopped_at['step']}; it and later blocks keep their calibrated scales")
        state = work.quantize(result.policy, bits_config, result.weight_scales)
        rows.append(row(bits, "ranking", state, f"W{bits}A{bits} ranking",
                        optimisation_s=optimisation_s, stopped_at=result.stopped_at))
        blocks[bits] = result.blocks

    payload = work.base_result("ranking", {
        **dataclasses.asdict(config.ptq), **{k: v for k, v in dataclasses.asdict(config).items()
                                              if k not in ("workload", "ptq")}})
    payload.update({"fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"], "rows": rows, "blocks": blocks,
                    "num_agreement_images": len(agreement_images),
                    "wall_times_s": {"calibration": calibration_s, "total": time.perf_counter() - started}})
    _plot(f"{out}/ranking.png", rows, work.spec.name)
    payload["results_path"] = common.write_json_atomic(f"{out}/results.json", payload)
    return payload


def main(argv):
    del argv
    r = run(config_from_flags())
    print(f"{r['model']}: FP32 top-1 {r['fp32_top1']:.2f}% top-5 {r['fp32_top5']:.2f}% "
          f"({r['num_eval_images']} images)")
    print(f"{'bits':>5} {'method':>9} {'top-1':>7} {'top-5':>7} {'kept order':>11} {'logit corr':>11}")
    for row in r["rows"]:
        print(f"{'W%dA%d' % (row['bits'], row['bits']):>5} {row['method']:>9} {row['top1']:7.2f} {row['top5']:7.2f} "
              f"{100 * row['kept_order']:10.2f}% {row['logit_similarity']:11.4f}")
    print(f"-> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
