"""Flags and steps shared by ptq, sensitivity and mixed: data, weights, calibration, evaluation.

Every flag error is raised by :func:`prepare` before any long work starts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import numpy as np
from absl import flags

from eqjax import apply, calibration, data, energy, metrics, models, numerics, policy as policy_lib, sensitivity
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "efficientnet_lite0", list(models.names()), "Registry name of the model.")
flags.DEFINE_string("weights", "package", common.WEIGHTS_HELP)
flags.DEFINE_string("dataset", "pkg:foolbox_imagenet", "Evaluation dataset spec (eqjax.data).")
flags.DEFINE_string("calib_dataset", "pkg:skimage", "Calibration dataset spec.")
flags.DEFINE_integer("calib_images", None, "Calibration images (default 256, or all if fewer).")
flags.DEFINE_integer("eval_images", None, "Evaluation images (default all).")
flags.DEFINE_enum("calib_method", "absmax", list(calibration.METHODS), "Activation clip estimator.")
flags.DEFINE_enum("weight_method", "absmax", list(calibration.METHODS), "Weight scale estimator.")
flags.DEFINE_bool("unsigned_activations", True, "Unsigned grid for inputs that are never negative.")
flags.DEFINE_bool("quantize_matmuls", True, "Quantize the attention matmul operands of ViTs.")
flags.DEFINE_integer("batch_size", 64, "Batch size (split over all local devices).")
flags.DEFINE_integer("seed", 0, "Seed of image sampling.")
flags.DEFINE_enum("energy_preset", "paper", list(energy.PRESETS), "Energy model of the results.")
flags.DEFINE_integer("chunk_size", None, "Sensitivity-sweep configurations vmapped together (default 1 on CPU, 8 else).")

DEFAULT_CALIB_IMAGES = 256  # the study's calibration set size
SHARED_FLAGS = ("model", "weights", "dataset", "calib_dataset", "calib_images", "eval_images",
                "calib_method", "weight_method", "unsigned_activations", "quantize_matmuls",
                "batch_size", "seed", "energy_preset", "chunk_size")


def check_bits_flag(value: int, name: str) -> int:
    numerics.check_bits(value, name=f"--{name}")
    return value


@dataclasses.dataclass
class Setup:
    """A model with weights, its evaluation and calibration images, ready to calibrate."""

    spec: models.ModelSpec
    model: Any
    variables: Any
    num_classes: int
    preprocessing: models.Preprocessing
    weights_source: str
    calls: list
    eval_source: Any
    eval_indices: np.ndarray
    calib_source: Any
    calib_indices: np.ndarray

    def eval_batches(self):
        return data.iterate_batches(self.eval_source, self.eval_indices, self.preprocessing,
                                    batch_size=FLAGS.batch_size)

    def calib_batches(self):
        return data.iterate_batches(self.calib_source, self.calib_indices, self.preprocessing,
                                    batch_size=FLAGS.batch_size)


def prepare() -> Setup:
    """Checks the shared flags, opens the datasets, loads the weights; no long work."""
    if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    for name in ("calib_images", "eval_images"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ValueError(f"--{name} must be >= 1, got {FLAGS[name].value}")
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
    variables, num_classes, pre, source = common.load_weights(spec.name, FLAGS.weights)
    labels = eval_source.labels[eval_idx]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--dataset={FLAGS.dataset} has labels in [{labels.min()}, {labels.max()}], "
                         f"but the model has {num_classes} classes")
    return Setup(spec, spec.build(num_classes=num_classes), variables, num_classes, pre, source,
                 spec.trace(num_classes=num_classes), eval_source, eval_idx, calib_source, calib_idx)


def collect_stats(setup: Setup) -> tuple[dict, float]:
    """Activation statistics of the FP model on the calibration images, and the seconds taken."""
    common.log(f"calibrating on {len(setup.calib_indices)} images of {setup.calib_source.spec}")
    start = time.perf_counter()
    stats = apply.collect_activation_stats(
        setup.model, setup.variables, (images for images, _ in setup.calib_batches()),
        apply.init_activation_stats(setup.calls),
        on_batch=lambda n: common.log(f"calibration {n}/{len(setup.calib_indices)} images"))
    return stats, time.perf_counter() - start


def calibrated(setup: Setup, stats: dict, policy: dict) -> dict:
    """``policy`` with activation clips from ``stats`` (by --calib_method)."""
    return policy_lib.with_activation_clips(policy, stats, method=FLAGS.calib_method,
                                            unsigned_if_nonnegative=FLAGS.unsigned_activations)


def evaluate_fp32(setup: Setup) -> dict:
    result = metrics.evaluate(lambda v, x: setup.model.apply(v, x), setup.variables, setup.eval_batches(),
                              batch_size=FLAGS.batch_size, num_classes=setup.num_classes,
                              num_images=len(setup.eval_indices), label="fp32")
    common.log(f"FP32 top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")
    return result


def _quantized_logits(model):
    return lambda state, x: apply.quantized_apply(model, state[0], state[1], x, quantize_kernels=False)


_QUANTIZED_LOGITS = {}
_quantize_weights = jax.jit(apply.quantize_weights, static_argnames="method")


def quantized_variables(setup: Setup, policy: dict, weight_scales: dict | None = None) -> dict:
    """The weights quantized under ``policy`` by --weight_method; ``weight_scales`` replace the
    scales of their layers (ranking-aware PTQ)."""
    return _quantize_weights(setup.variables, policy, method=FLAGS.weight_method, scales=weight_scales)


def evaluate_policy(setup: Setup, policy: dict, label: str, qvars: dict | None = None) -> dict:
    """Top-1/top-5 of the model under ``policy`` (weights quantized once, then every batch;
    pass ``qvars`` from :func:`quantized_variables` to reuse them)."""
    if qvars is None:
        qvars = quantized_variables(setup, policy)
    fn = _QUANTIZED_LOGITS.setdefault(id(setup.model), _quantized_logits(setup.model))
    result = metrics.evaluate(fn, (qvars, policy), setup.eval_batches(), batch_size=FLAGS.batch_size,
                              num_classes=setup.num_classes, num_images=len(setup.eval_indices), label=label)
    common.log(f"{label} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")
    return result


def energy_of(setup: Setup, bits: dict) -> dict:
    """The ``energy`` field of results.json (batch 1, --energy_preset)."""
    model = energy.get_preset(FLAGS.energy_preset)
    report = energy.energy_report(energy.count_layers(setup.model, setup.spec.example_input(1)), bits, model)
    return {"model": model.to_dict(), "batch_size": 1,
            **{k: report[k] for k in ("total", "mac", "memory", "relative", "mac_share", "memory_share",
                                      "fp32_total", "per_layer")}}


def base_result(setup: Setup, experiment: str, extra_flags: tuple[str, ...]) -> dict:
    return {"experiment": experiment, "model": setup.spec.name, "weights": setup.weights_source,
            "num_classes": setup.num_classes,
            "config": {k: FLAGS[k].value for k in SHARED_FLAGS + extra_flags},
            "preprocessing": setup.preprocessing.to_dict(), "environment": common.environment(),
            "num_eval_images": int(len(setup.eval_indices)),
            "num_calib_images": int(len(setup.calib_indices))}


def parse_bits(values, flag="bits") -> tuple[int, ...]:
    try:
        bits = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {','.join(values)}") from None
    if not bits:
        raise ValueError(f"--{flag} is empty")
    for b in bits:
        check_bits_flag(b, flag)
    return bits


def run_sweep(setup: Setup, stats: dict, bits, *, include_matmuls: bool = False):
    """Sensitivity of the model's layers on the calibration images (labels used if present)."""
    base = calibrated(setup, stats, policy_lib.build(setup.calls, w_bits=8, keep_first_last_bits=None))
    layers = [c.name for c in setup.calls if include_matmuls or c.kind != "matmul"]
    layers = list(dict.fromkeys(layers))
    common.log(f"sensitivity sweep: {len(layers)} layers x {len(bits)} bit widths = "
               f"{len(layers) * len(bits)} configurations in one compiled call")
    return sensitivity.sweep_sensitivity(
        setup.model, setup.variables, base, setup.calib_batches(), layers=layers, bits=bits,
        batch_size=FLAGS.batch_size, chunk_size=FLAGS.chunk_size,
        on_batch=lambda n: common.log(f"sweep {n}/{len(setup.calib_indices)} images"))
