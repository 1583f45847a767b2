"""Vision Transformers at low bits: every ViT method side by side (the study's Table 4, extended).

For every bit width (weights and activations; first/last layer 8 bits), each method in
``--methods`` is calibrated on the same images and evaluated for top-1/top-5, the share of
attention-score key pairs whose order the quantized model keeps, and the Pearson correlation
of the logits with FP32:

  standard  uniform quantizers, absmax clips (the study)
  log2      + post-Softmax attention on a log2 grid (FQ-ViT, RepQ-ViT)
  adalog    + post-Softmax on a log grid whose base is searched per layer (AdaLog)
  twin      + post-GELU inputs of fc2 on a twin-uniform grid, split searched (PTQ4ViT)
  reparam   + post-LayerNorm channels reparameterized into per-tensor form (RepQ-ViT)
  ranking   + ranking-aware optimisation of the block scales (Liu et al., 2021)
  qdrop     + block reconstruction with QDrop (BRECQ with p = --drop_prob); with
            --recon_ranking_weight > 0, plus the ranking-aware loss on each block's attention scores
  combined  reparam + log2 + twin + qdrop

Methods compose with ``+`` (``twin+qdrop``, ``reparam+adalog+twin+qdrop``): at most one softmax
quantizer (log2 or adalog) and one optimisation (ranking or qdrop) each.

    python -m experiments.vit --model=vit_tiny_cifar \\
        --weights=weights/vit_tiny_cifar10/vit_tiny_cifar10.safetensors \\
        --dataset=tar:../shared/data/cifar10/test.tar --calib_dataset=tar:../shared/data/cifar10/train.tar

Writes WORKDIR/vit/results.json (config, environment, FP32, one row per bit width and method
with its own wall time and the parameters it chose) and WORKDIR/vit/vit.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

from absl import flags

from eqjax import ptq
from eqjax.algorithms import ranking, reconstruction, vit_quant
from experiments import common, ranking as ranking_script, workload as workload_lib

FLAGS = flags.FLAGS

METHODS = ("standard", "log2", "adalog", "twin", "reparam", "ranking", "qdrop", "combined")
COMBINED = "reparam+log2+twin+qdrop"
PARTS = tuple(m for m in METHODS if m not in ("standard", "combined"))  # what methods are made of
SOFTMAX_QUANTIZERS = ("log2", "adalog")
OPTIMISATIONS = ("ranking", "qdrop")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a method adds to the standard policy."""

    reparam: bool = False  # RepQ-ViT's reparameterized model
    softmax: str | None = None  # log2 | adalog grid for post-Softmax inputs
    gelu: bool = False  # twin grid for post-GELU inputs
    optimise: str | None = None  # ranking | qdrop


def recipe(method: str) -> Recipe:
    """The recipe of ``standard``, ``combined`` or ``+``-joined parts (``twin+qdrop``)."""
    if method == "standard":
        return Recipe()
    parts = (COMBINED if method == "combined" else method).split("+")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"methods must be some of {', '.join(METHODS)}, or parts of {', '.join(PARTS)} joined by "
                         f"'+', got {method}" + (f" ({', '.join(unknown)} unknown)" if parts != unknown else ""))
    if len(set(parts)) < len(parts):
        raise ValueError(f"methods {method} names a part twice")
    for group in (SOFTMAX_QUANTIZERS, OPTIMISATIONS):
        if sum(p in group for p in parts) > 1:
            raise ValueError(f"methods {method} combines {' and '.join(p for p in parts if p in group)}; "
                             f"take at most one of {', '.join(group)}")
    pick = lambda group: next((p for p in parts if p in group), None)
    return Recipe(reparam="reparam" in parts, softmax=pick(SOFTMAX_QUANTIZERS), gelu="twin" in parts,
                  optimise=pick(OPTIMISATIONS))


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    flags.DEFINE_list("bits", ["8", "6", "4"], "Bit widths (weights and activations), one group of rows each.")
    flags.DEFINE_list("methods", list(METHODS), f"Methods, of: {', '.join(METHODS)}; or parts joined by '+' "
                      "(twin+qdrop).")
    flags.DEFINE_integer("search_images", 64, "Calibration images for the log-base and twin-split searches.")
    flags.DEFINE_integer("recon_iterations", 500, "Adam steps per block (qdrop, combined).")
    flags.DEFINE_integer("recon_batch_size", 32, "Calibration images per reconstruction step.")
    flags.DEFINE_float("drop_prob", 0.5, "QDrop's probability of keeping an activation in full precision.")
    flags.DEFINE_float("recon_ranking_weight", 0.0, "γ of the ranking-aware term added to the reconstruction "
                       "loss of each block (qdrop, combined); 0 = off.")
    flags.DEFINE_integer("ranking_steps", 200, "Adam steps per block of ranking-aware PTQ.")
    flags.DEFINE_integer("agreement_images", 64, "Evaluation images for kept order and logit correlation.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/vit/.")
    FLAGS.set_default("model", "deit_tiny")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VitRunConfig:
    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig  # estimators; bits come from ``bits``
    bits: tuple[int, ...] = (8, 6, 4)
    methods: tuple[str, ...] = METHODS
    search_images: int = 64
    recon: reconstruction.ReconstructionConfig = reconstruction.ReconstructionConfig(method="qdrop", iterations=500)
    ranking_steps: int = 200
    agreement_images: int = 64
    workdir: str = "runs/default"

    def __post_init__(self):
        if not self.methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got none")
        for method in self.methods:
            recipe(method)
        for name in ("search_images", "ranking_steps", "agreement_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def config_from_flags() -> VitRunConfig:
    names = {"iterations": "recon_iterations", "batch_size": "recon_batch_size", "drop_prob": "drop_prob",
             "ranking_weight": "recon_ranking_weight",
             "methods": "methods", "search_images": "search_images", "ranking_steps": "ranking_steps",
             "agreement_images": "agreement_images"}
    return workload_lib.translate_errors(lambda: VitRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(w_bits=8, a_bits=8, keep_first_last_bits=8),
        bits=workload_lib.parse_bits(FLAGS.bits), methods=tuple(FLAGS.methods), search_images=FLAGS.search_images,
        recon=reconstruction.ReconstructionConfig(method="qdrop", iterations=FLAGS.recon_iterations,
                                                  batch_size=FLAGS.recon_batch_size, drop_prob=FLAGS.drop_prob,
                                                  ranking_weight=FLAGS.recon_ranking_weight, seed=FLAGS.seed),
        ranking_steps=FLAGS.ranking_steps, agreement_images=FLAGS.agreement_images, workdir=FLAGS.workdir), names)


@contextlib.contextmanager
def _variables(work, variables):
    """``work`` with other (function-preserving) variables for the duration."""
    original, work.variables = work.variables, variables
    try:
        yield
    finally:
        work.variables = original


def _plot(path, rows, methods, model):
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.8))
    bits = sorted({r["bits"] for r in rows}, reverse=True)
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        sel = {r["bits"]: r for r in rows if r["method"] == method}
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(bits))]
        ax1.bar(xs, [sel[b]["top1"] for b in bits], width=width, label=method)
        ax2.bar(xs, [100 * sel[b]["kept_order"] for b in bits], width=width, label=method)
    for ax, label in ((ax1, "top-1 (%)"), (ax2, "attention pairs in order (%)")):
        ax.set_xticks(range(len(bits)), [f"W{b}A{b}" for b in bits])
        ax.set_ylabel(label)
    ax2.legend(fontsize=7, ncol=2)
    fig.suptitle(model)
    common.save_figure(fig, path)


def run(config: VitRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Every method at every bit width; writes WORKDIR/vit/results.json and vit.png."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "vit")
    vit_run = ranking_script.open_vit_run(config.workload, config.agreement_images, purpose="experiments.vit",
                                          log=log)
    work, stats, calibration_s, calib_images, fp32 = (vit_run.work, vit_run.stats, vit_run.calibration_s,
                                                     vit_run.calib_images, vit_run.fp32)
    search_batches = [calib_images[i:i + config.workload.batch_size]
                      for i in range(0, min(config.search_images, len(calib_images)), config.workload.batch_size)]
    fp_variables = vit_run.fp_variables

    needs_reparam = any(recipe(m).reparam for m in config.methods)
    if needs_reparam:
        start = time.perf_counter()
        reparam_variables, ratios = vit_quant.reparameterize_layernorms(
            work.model, work.variables, (images for images, _ in work.calib_batches()),
            example=work.spec.example_input(1))
        with _variables(work, reparam_variables):
            reparam_stats, _ = work.collect_stats()
        reparam_s = time.perf_counter() - start
        log(f"reparameterized {len(ratios)} LayerNorms (channel range ratios up to "
            f"{max(float(r.max()) for r in ratios.values()):.1f}) in {reparam_s:.1f} s")

    def row(bits, method, state, seconds, **extra):
        return {"bits": bits, "method": method, **vit_run.measure(state, f"W{bits}A{bits} {method}"),
                "seconds": seconds, **extra}

    rows = []
    for bits in config.bits:
        bits_config = dataclasses.replace(config.ptq, w_bits=bits, a_bits=bits)
        for method in config.methods:
            method_recipe = recipe(method)
            reparam, softmax, gelu, optimise = (method_recipe.reparam, method_recipe.softmax, method_recipe.gelu,
                                                method_recipe.optimise)
            variables = reparam_variables if reparam else fp_variables
            start = time.perf_counter()
            extra: dict[str, Any] = {}
            with _variables(work, variables):
                policy = work.calibrated(reparam_stats if reparam else stats, bits_config)
                if softmax == "log2":
                    policy = vit_quant.with_quantizer(policy, vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS),
                                                      "log")
                elif softmax == "adalog":
                    policy, errors = vit_quant.search_quantizer(
                        work.model, variables, policy, search_batches,
                        vit_quant.matching_layers(policy, vit_quant.SOFTMAX_LAYERS), "log")
                    extra["log_bases"] = {n: min(e, key=e.get) for n, e in errors.items()}
                if gelu:
                    policy, errors = vit_quant.search_quantizer(
                        work.model, variables, policy, search_batches,
                        vit_quant.matching_layers(policy, vit_quant.GELU_LAYERS), "twin")
                    extra["twin_fine_ratios"] = {n: min(e, key=e.get) for n, e in errors.items()}
                if optimise == "ranking":
                    result = ranking.ranking_ptq(work.model, variables, policy, calib_images,
                                                 is_block=work.spec.is_block, steps=config.ranking_steps,
                                                 seed=config.workload.seed)
                    state = work.quantize(result.policy, bits_config, result.weight_scales)
                    extra["stopped_at"] = result.stopped_at
                elif optimise == "qdrop":
                    state, info = work.reconstruct(policy, bits_config, config.recon,
                                                   save_to=os.path.join(out, f"reconstruction_w{bits}a{bits}_{method}"))
                    extra["reconstruction"] = {k: info[k] for k in ("method", "iterations", "wall_time_s") if k in info}
                else:
                    state = work.quantize(policy, bits_config)
            seconds = time.perf_counter() - start
            rows.append(row(bits, method, state, seconds, **extra))
            log(f"W{bits}A{bits} {method}: top-1 {rows[-1]['top1']:.2f}% (FP32 {fp32['top1']:.2f}%), kept order "
                f"{100 * rows[-1]['kept_order']:.1f}%, {seconds:.1f} s")

    payload = work.base_result("vit", {
        **dataclasses.asdict(config.ptq), **{k: v for k, v in dataclasses.asdict(config).items()
                                              if k not in ("workload", "ptq")}})
    payload.update({"fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"], "rows": rows,
                    "num_agreement_images": len(vit_run.agreement_images),
                    "wall_times_s": {"calibration": calibration_s, "total": time.perf_counter() - started}})
    _plot(f"{out}/vit.png", rows, config.methods, work.spec.name)
    payload["results_path"] = common.write_json_atomic(f"{out}/results.json", payload)
    return payload


def main(argv):
    del argv
    r = run(config_from_flags())
    print(f"{r['model']}: FP32 top-1 {r['fp32_top1']:.2f}% top-5 {r['fp32_top5']:.2f}% ({r['num_eval_images']} images)")
    width = max(9, *(len(row["method"]) for row in r["rows"]))
    print(f"{'bits':>5} {'method':>{width}} {'top-1':>7} {'drop':>6} {'kept order':>11} {'logit corr':>11} {'time':>8}")
    for row in r["rows"]:
        print(f"{'W%dA%d' % (row['bits'], row['bits']):>5} {row['method']:>{width}} {row['top1']:7.2f} "
              f"{r['fp32_top1'] - row['top1']:6.2f} {100 * row['kept_order']:10.2f}% {row['logit_similarity']:11.4f} "
              f"{row['seconds']:7.1f}s")
    print(f"-> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
