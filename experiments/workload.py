"""The workload that ptq, sensitivity, mixed and ranking share: a model with weights, its
calibration and evaluation images. Its flags, the frozen configs they become, and the steps
(calibrate, evaluate, energy, sensitivity) as calls of :mod:`eqjax.ptq`.

FLAGS are read in :func:`workload_config_from_flags` and :func:`ptq_config_from_flags` only;
everything else takes a config, so every script runs in-process from a test.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
from absl import flags

from eqjax import data, models, ptq
from eqjax.quant import calibration, equalization, folding, numerics, policy as policy_lib
from eqjax.algorithms import energy, metrics, qat, reconstruction, second_order
from experiments import common

FLAGS = flags.FLAGS


def define_shared_flags() -> None:
    """Defines the flags every workload script shares (once per process)."""
    flags.DEFINE_enum("model", "efficientnet_lite0", list(models.names()), "Registry name of the model.")
    flags.DEFINE_string("weights", None, common.WEIGHTS_HELP)
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
    flags.DEFINE_bool("skip_bad_images", False, "Skip images that cannot be decoded (a warning, and their "
                      "names in results.json) instead of stopping with an error naming the first one.")
    flags.DEFINE_integer("chunk_size", None, "Sensitivity-sweep configurations vmapped together (default 1 on CPU, 8 else).")


def define_bits_flags(default_bits: int, *, bits_json: bool = False) -> None:
    """The flags of a uniform policy's widths (and of a per-layer table from a results.json)."""
    flags.DEFINE_integer("bits", default_bits, "Weight and activation bits (overridden by --w_bits / --a_bits).")
    flags.DEFINE_integer("w_bits", None, "Weight bits (default --bits).")
    flags.DEFINE_integer("a_bits", None, "Activation bits (default --bits).")
    flags.DEFINE_integer("keep_first_last_bits", 8, "Bits of the first and last layer; 0 = no exception.")
    if bits_json:
        flags.DEFINE_string("bits_json", None, "A ptq/mixed results.json whose per-layer 'bits' become the policy.")


def define_reconstruction_flags() -> None:
    """The flags of reconstruction PTQ (experiments.ptq, mixed, qat and deploy)."""
    flags.DEFINE_enum("reconstruct", "none", ["none", *reconstruction.METHODS],
                      "Reconstruction PTQ after calibration: adaround (layer by layer), brecq (blocks), "
                      "qdrop (blocks, activation quantization dropped with --drop_prob).")
    flags.DEFINE_integer("recon_iterations", 1000, "Adam steps per reconstructed unit.")
    flags.DEFINE_integer("recon_batch_size", 32, "Calibration images per reconstruction step.")
    flags.DEFINE_float("drop_prob", 0.5, "QDrop's probability of keeping an activation in full precision.")
    flags.DEFINE_enum("recon_activation_dtype", "float32", list(reconstruction.ACTIVATION_DTYPES),
                      "How each unit's calibration activations are held on the device (bfloat16: half the memory).")
    flags.DEFINE_bool("recon_fisher", False, "Weight each unit's output error by the diagonal Fisher "
                      "(BRECQ): squared gradients of KL(FP || quantized) w.r.t. the unit output.")
    flags.DEFINE_string("recon_state", None, "Reuse the reconstructed state that an earlier run saved "
                        "(WORKDIR/<script>/reconstruction) instead of reconstructing again.")


def define_bias_correction_flags(*, fold_batchnorm: bool = True) -> None:
    """``--bias_correction`` and (``fold_batchnorm``) ``--fold_batchnorm``: the float-side
    adjustments of a round-to-nearest start (experiments.ptq, experiments.mixed; experiments.qat
    folds BatchNorm itself and takes ``--bias_correction`` only)."""
    if fold_batchnorm:
        flags.DEFINE_bool("fold_batchnorm", False, "Fold every BatchNorm into the conv before it, before "
                          "calibration (what integer kernels run; FP32 outputs unchanged).")
    flags.DEFINE_bool("bias_correction", False, "Remove the mean output shift that weight quantization "
                      "causes in each layer, measured on the calibration images (Nagel et al., 2019).")


def reconstruction_config_from_flags() -> reconstruction.ReconstructionConfig | None:
    if FLAGS.reconstruct == "none":
        if FLAGS.recon_state:
            raise ValueError("--recon_state needs --reconstruct=adaround|brecq|qdrop (the method it was made by)")
        return None
    names = {"iterations": "recon_iterations", "batch_size": "recon_batch_size", "drop_prob": "drop_prob"}
    return translate_errors(lambda: reconstruction.ReconstructionConfig(
        method=FLAGS.reconstruct, iterations=FLAGS.recon_iterations, batch_size=FLAGS.recon_batch_size,
        drop_prob=FLAGS.drop_prob, fisher=FLAGS.recon_fisher, seed=FLAGS.seed,
        activation_dtype=FLAGS.recon_activation_dtype), names)


DEFAULT_CALIB_IMAGES = 256  # the study's calibration set size


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    """Which model, weights and images; field names are the flags'."""

    model: str = "efficientnet_lite0"
    weights: str | None = None
    dataset: str = "pkg:foolbox_imagenet"
    calib_dataset: str = "pkg:skimage"
    calib_images: int | None = None
    eval_images: int | None = None
    batch_size: int = 64
    seed: int = 0
    energy_preset: str = "paper"
    chunk_size: int | None = None
    skip_bad_images: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {self.batch_size}")
        for name in ("calib_images", "eval_images", "chunk_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        energy.get_preset(self.energy_preset)
        models.get(self.model)


def workload_config_from_flags() -> WorkloadConfig:
    return WorkloadConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(WorkloadConfig)})


def translate_errors(build: Callable[[], Any], flag_names: dict[str, str]) -> Any:
    """``build()``, with a library error about argument ``a`` re-raised as one about ``--flag_names[a]``."""
    try:
        return build()
    except (ValueError, TypeError) as e:
        message = str(e)
        for argument, flag in flag_names.items():
            if message.startswith(argument + " "):
                raise ValueError(f"--{flag}{message[len(argument):]}") from None
        raise


def ptq_config_from_flags(*, w_bits: int, a_bits: int, keep_first_last_bits: int | None,
                          flag_names: dict[str, str] | None = None, **overrides) -> ptq.PTQConfig:
    """A :class:`eqjax.ptq.PTQConfig` from the shared estimator flags and the given bits.

    ``flag_names`` maps config fields to the flags that gave them (e.g. ``w_bits`` -> ``bits``).
    """
    names = {f.name: f.name for f in dataclasses.fields(ptq.PTQConfig)} | (flag_names or {})
    fields = dict(w_bits=w_bits, a_bits=a_bits, keep_first_last_bits=keep_first_last_bits,
                  calib_method=FLAGS.calib_method, weight_method=FLAGS.weight_method,
                  unsigned_activations=FLAGS.unsigned_activations, quantize_matmuls=FLAGS.quantize_matmuls)
    return translate_errors(lambda: ptq.PTQConfig(**(fields | overrides)), names)


def parse_bits(values, flag="bits") -> tuple[int, ...]:
    """Comma-separated bit widths of a list flag, each checked."""
    try:
        bits = tuple(int(v) for v in values)
    except ValueError:
        raise ValueError(f"--{flag} must be comma-separated integers, got {','.join(values)}") from None
    if not bits:
        raise ValueError(f"--{flag} is empty")
    for b in bits:
        numerics.check_bits(b, name=f"--{flag}")
    return bits


@dataclasses.dataclass
class Workload:
    """A model with weights, its evaluation and calibration images, ready to calibrate.

    Holds one evaluator for FP32 and one for quantized states, so that evaluating any
    number of policies compiles once.
    """

    config: WorkloadConfig
    spec: models.ModelSpec
    model: Any
    variables: Any
    num_classes: int
    preprocessing: models.Preprocessing
    weights_source: str
    preprocessing_source: str
    calls: list
    eval_source: Any
    eval_indices: np.ndarray
    calib_source: Any
    calib_indices: np.ndarray
    log: Callable[[str], None] = common.log

    def __post_init__(self):
        self._make_evaluators()
        self.skipped_images: dict[str, str] = {}  # message of an undecodable image -> 'eval' or 'calib'

    def _make_evaluators(self) -> None:
        model = self.model
        self.fp32_evaluator = metrics.make_evaluator(lambda variables, x: model.apply(variables, x))
        self.quantized_evaluator = metrics.make_evaluator(ptq.quantized_logits_fn(model))

    def _batches(self, source, indices, role: str):
        skipped = [] if self.config.skip_bad_images else None
        for batch in data.iterate_batches(source, indices, self.preprocessing, batch_size=self.config.batch_size,
                                          skipped=skipped):
            yield batch
        for message in skipped or ():
            if message not in self.skipped_images:
                self.log(f"WARNING: skipped: {message}")
                self.skipped_images[message] = role

    def eval_batches(self):
        return self._batches(self.eval_source, self.eval_indices, "eval")

    def calib_batches(self):
        return self._batches(self.calib_source, self.calib_indices, "calib")

    @property
    def layers(self) -> list[str]:
        """The conv/dense layers (the study's "layers"), forward order."""
        return list(dict.fromkeys(c.name for c in self.calls if c.kind != "matmul"))

    def collect_stats(self) -> tuple[dict, float]:
        """Activation statistics of the FP model on the calibration images, and the seconds taken."""
        self.log(f"calibrating on {len(self.calib_indices)} images of {self.calib_source.spec}")
        start = time.perf_counter()
        stats = ptq.collect_statistics(self.model, self.variables, self.calib_batches(), calls=self.calls,
                                       on_progress=common.progress_logger("calibration", len(self.calib_indices)))
        return stats, time.perf_counter() - start

    def calibrated(self, stats: dict, config: ptq.PTQConfig, policy: dict | None = None) -> dict:
        """``policy`` (default: built from ``config``) with clips from ``stats``."""
        if policy is None:
            policy = ptq.build_policy(self.calls, config)
        return ptq.with_clips(policy, stats, config)

    def calibrated_with_bits(self, stats: dict, config: ptq.PTQConfig, bits: dict[str, tuple[int, int]] | None, *,
                             flag: str = "--bits_json") -> dict:
        """The calibrated policy of ``config``, with per-layer ``bits`` (:func:`read_bits_json`) if given."""
        policy = self.calibrated(stats, config)
        if bits is not None:
            unknown = [n for n in bits if n not in policy]
            if unknown:
                raise ValueError(f"{flag} names layers this model lacks: {', '.join(unknown[:5])}")
            policy = self.calibrated(stats, config, policy=policy_lib.set_bits(policy, bits))
        return policy

    def load_qat_state(self, path: str) -> qat.QatResult:
        """The trained quantized model that experiments.qat saved in ``path`` (``--qat_state``),
        checked against this workload's model and layers."""
        loaded = qat.load(path)
        if loaded.info.get("model") != self.spec.name:
            raise ValueError(f"--qat_state={path} holds a {loaded.info.get('model')} model, not --model={self.spec.name}")
        policy_lib.validate(loaded.policy, dict.fromkeys(c.name for c in self.calls))
        return loaded

    def _evaluate(self, evaluator, state, label: str) -> dict:
        result = evaluator(state, self.eval_batches(), batch_size=self.config.batch_size,
                           num_classes=self.num_classes,
                           on_progress=common.progress_logger(label, len(self.eval_indices)))
        self.log(f"{label} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}%")
        return result

    def evaluate_fp32(self) -> dict:
        return self._evaluate(self.fp32_evaluator, self.variables, "fp32")

    def quantize(self, policy: dict, config: ptq.PTQConfig, weight_scales: dict | None = None) -> ptq.QuantizedState:
        return ptq.quantize(self.model, self.variables, policy, weight_method=config.weight_method,
                            weight_scales=weight_scales)[1]

    def fold_batchnorm(self) -> int:
        """Folds every BatchNorm into the layer before it (FP32 outputs unchanged); returns the count."""
        self.variables, pairs = folding.fold_batchnorm(self.model, self.variables, self.spec.example_input(1))
        self.log(f"folded {len(pairs)} BatchNorms into the layer before them")
        return len(pairs)

    def equalize(self) -> dict:
        """Cross-layer equalization (``--equalize``): the model becomes its ReLU variant with every
        BatchNorm folded and every pair of :attr:`ModelSpec.equalization` equalized; returns the
        report of :func:`eqjax.quant.equalization.equalize`."""
        if self.spec.equalization is None:
            raise ValueError(f"--equalize: no cross-layer equalization pairs are defined for --model={self.spec.name} "
                             "(efficientnet_lite0 has them)")
        model, pairs = self.spec.equalization(self.model)
        self.variables, report = equalization.equalize(model, self.variables, pairs, example=self.spec.example_input(1))
        self.model = model
        self._make_evaluators()
        self.log(f"cross-layer equalization of {report['pairs']} layer pairs in {report['sweeps']} sweeps (median "
                 f"channel-range ratio {report['range_ratio_before']:.1f} -> {report['range_ratio_after']:.1f}); "
                 "the model runs with ReLU")
        return report

    def quantized_state(self, policy: dict, config: ptq.PTQConfig,
                        recon: reconstruction.ReconstructionConfig | None, *, out: str,
                        load_from: str | None = None, bias_correction: bool = False
                        ) -> tuple[ptq.QuantizedState, dict | None]:
        """``policy`` quantized by round-to-nearest (``recon`` None), or reconstructed (saved to
        ``out/reconstruction``, or loaded from ``load_from``), then bias-corrected if asked;
        returns the state and the reconstruction report (None without one). The state's policy
        has the learned clips."""
        if recon is None:
            state, info = self.quantize(policy, config), None
        else:
            state, info = self.reconstruct(policy, config, recon, save_to=os.path.join(out, "reconstruction"),
                                           load_from=load_from)
        if bias_correction:
            state = self.correct_bias(state)
        return state, info

    def correct_bias(self, state: ptq.QuantizedState) -> ptq.QuantizedState:
        """``state`` with each layer's weight-quantization mean shift removed (calibration images)."""
        start = time.perf_counter()
        corrected, where = folding.correct_bias(self.model, self.variables, state.variables, state.policy,
                                                (images for images, _ in self.calib_batches()),
                                                example=self.spec.example_input(1))
        counts = {k: sum(v == k for v in where.values()) for k in ("batchnorm", "bias", "none")}
        self.log(f"bias correction: {counts['batchnorm']} layers through the next BatchNorm, {counts['bias']} "
                 f"through their bias, {counts['none']} without either ({time.perf_counter() - start:.1f} s)")
        return state.replace(variables=corrected)

    def reconstruct(self, policy: dict, config: ptq.PTQConfig, recon: reconstruction.ReconstructionConfig, *,
                    save_to: str, load_from: str | None = None) -> tuple[ptq.QuantizedState, dict]:
        """Reconstruction PTQ of ``policy`` on the calibration images (or its saved state from
        ``load_from``); saves the state to ``save_to``. Returns the quantized state and a report."""
        result, info = self.reconstruction_result(policy, config, recon, save_to=save_to, load_from=load_from)
        qvars = reconstruction.quantized_variables(self.variables, result.policy, result.rounding,
                                                   result.weight_scales)
        return ptq.QuantizedState(qvars, result.policy), info

    def reconstruction_result(self, policy: dict, config: ptq.PTQConfig, recon: reconstruction.ReconstructionConfig,
                              *, save_to: str, load_from: str | None = None
                              ) -> tuple[reconstruction.ReconstructionResult, dict]:
        """:meth:`reconstruct`'s reconstruction result itself (rounding, weight scales, policy) and report."""
        if load_from:
            result = reconstruction.load(load_from, policy)
            if result.info.get("method") != recon.method:
                raise ValueError(f"--recon_state={load_from} was made by {result.info.get('method')}, "
                                 f"not --reconstruct={recon.method}")
            self.log(f"loaded the reconstructed state of {load_from} ({result.info['method']}, "
                     f"{result.info['iterations']} iterations per unit)")
        else:
            images = np.concatenate([images for images, _ in self.calib_batches()])
            self.log(f"reconstruction ({recon.method}, {recon.iterations} iterations per unit) on "
                     f"{len(images)} calibration images")

            def report(p):
                if p.get("discarded"):
                    self.log(f"  WARNING: {p['discarded']}; moved it to {p['moved_to']} and reconstructing "
                             "from the first unit")
                if p.get("resumed"):
                    self.log(f"  resuming after unit {p['index']}/{p['units']} from {p['path']}")
                if p.get("done"):
                    self.log(f"  unit {p['index']}/{p['units']} {p['unit']}: output error "
                             f"{p['error_nearest']:.4g} (nearest) -> {p['error']:.4g}, ETA {p['eta_s']:.0f} s")

            partial = f"{save_to}_partial"  # after every unit; a killed run resumes from it
            result = reconstruction.reconstruct(self.model, self.variables, policy, images, recon,
                                                is_block=self.spec.is_block, weight_method=config.weight_method,
                                                on_progress=report, checkpoint_dir=partial)
            for unit in result.units:
                if unit["stopped"]:
                    self.log(f"WARNING: non-finite loss in unit {unit['unit']} at step {unit['stopped']['step']}; "
                             "it keeps its calibrated (nearest-rounding) state")
            reconstruction.save(save_to, result)
            shutil.rmtree(partial, ignore_errors=True)
        info = {**result.info, "units_report": result.units, "state": os.path.abspath(load_from or save_to),
                "loaded": bool(load_from)}
        return result, info

    def evaluate_quantized(self, state: ptq.QuantizedState, label: str) -> dict:
        return self._evaluate(self.quantized_evaluator, state, label)

    def energy_of(self, bits: dict) -> dict:
        """The ``energy`` field of results.json (batch 1, the config's preset)."""
        model = energy.get_preset(self.config.energy_preset)
        report = energy.energy_report(energy.count_layers(self.model, self.spec.example_input(1)), bits, model)
        return {"model": model.to_dict(), "batch_size": 1,
                **{k: report[k] for k in ("total", "mac", "memory", "relative", "mac_share", "memory_share",
                                          "fp32_total", "per_layer")}}

    def base_result(self, experiment: str, config: dict[str, Any]) -> dict:
        """The fields every results.json starts with; ``config`` holds the script's own settings."""
        return {"experiment": experiment, "model": self.spec.name, "weights": self.weights_source,
                "num_classes": self.num_classes,
                "config": {**dataclasses.asdict(self.config), **config},
                "preprocessing": self.preprocessing.to_dict(), "preprocessing_source": self.preprocessing_source,
                "environment": common.environment(),
                "num_eval_images": int(len(self.eval_indices)) - self._skipped("eval"),
                "num_calib_images": int(len(self.calib_indices)) - self._skipped("calib"),
                "skipped_images": list(self.skipped_images)}

    def _skipped(self, role: str) -> int:
        return sum(r == role for r in self.skipped_images.values())

    def _sensitivity_base(self, stats: dict, config: ptq.PTQConfig, include_matmuls: bool):
        base = self.calibrated(stats, dataclasses.replace(config, w_bits=8, a_bits=8, keep_first_last_bits=None,
                                                          rules=()))
        return base, list(dict.fromkeys(c.name for c in self.calls if include_matmuls or c.kind != "matmul"))

    def sweep(self, stats: dict, config: ptq.PTQConfig, bits, *, include_matmuls: bool = False):
        """Sensitivity of the model's layers on the calibration images (labels used if present)."""
        base, layers = self._sensitivity_base(stats, config, include_matmuls)
        self.log(f"sensitivity sweep: {len(layers)} layers x {len(bits)} bit widths = "
                 f"{len(layers) * len(bits)} configurations in one compiled call")
        return ptq.sweep(self.model, self.variables, base, self.calib_batches(), layers=layers, bits=bits,
                         batch_size=self.config.batch_size, chunk_size=self.config.chunk_size,
                         on_progress=common.progress_logger("sweep", len(self.calib_indices)))

    def second_order(self, stats: dict, config: ptq.PTQConfig, bits, *, method: str, micro_batch: int,
                     include_matmuls: bool = False) -> second_order.SecondOrderResult:
        """One-pass estimate of every layer's Δloss at every weight and activation width."""
        base, layers = self._sensitivity_base(stats, config, include_matmuls)
        self.log(f"one-pass sensitivity ({method}): {len(layers)} layers x {len(bits)} widths of weights and "
                 f"of activations, micro-batches of {micro_batch}")
        progress = common.progress_logger(method, len(self.calib_indices))
        return second_order.estimate(self.model, self.variables, base, self.calib_batches(), layers=layers,
                                     bits=bits, method=method, micro_batch=micro_batch,
                                     on_batch=lambda n: progress({"images": n}))


def read_bits_json(path: str) -> dict[str, tuple[int, int]]:
    """``{layer: (w_bits, a_bits)}`` of :func:`common.read_bits_table` (layers not quantized keep 8
    bits and stay disabled by their policy entry)."""
    return {name: (entry["w"] or 8, entry["a"] or 8) for name, entry in common.read_bits_table(path).items()}


def check_classes(source: data.ImageSource, num_classes: int, *, flag: str) -> None:
    """Raises ValueError when class folders are counted by sorted order but their number is not
    the model's: the labels would be indices into another list of classes."""
    classes = getattr(source, "classes", None)
    if classes is None or getattr(source, "class_names_file", None) or len(classes) == num_classes:
        return
    raise ValueError(f"{flag} has {len(classes)} class folders ({', '.join(classes[:3])}"
                     f"{', ...' if len(classes) > 3 else ''}) but the model has {num_classes} classes: labels by "
                     f"sorted folder order (0..{len(classes) - 1}) would not be the model's class indices. Put "
                     f"the model's class names, one per line in index order, in {'/'.join(data.CLASS_NAME_FILES)} "
                     "next to the class folders, or list the files with labels.txt")


def open_workload(config: WorkloadConfig, *, log: Callable[[str], None] = common.log) -> Workload:
    """Opens the datasets and loads the weights that ``config`` names; no long work.

    Raises:
      ValueError, OSError, ImportError: bad datasets, image counts, weights (named by flag).
    """
    spec = models.get(config.model)
    weights = common.resolve_weights_default(spec.name, config.weights)
    eval_source = data.open_dataset(config.dataset, name="--dataset")
    calib_source = data.open_dataset(config.calib_dataset, name="--calib_dataset")
    eval_idx = data.sample_indices(len(eval_source), config.eval_images, seed=config.seed, name="--eval_images")
    calib_num = config.calib_images
    if calib_num is None:
        available = len(calib_source) - (len(eval_idx) if data.same_source(calib_source, eval_source) else 0)
        calib_num = min(DEFAULT_CALIB_IMAGES, available)
        if calib_num < DEFAULT_CALIB_IMAGES:
            log(f"will calibrate on all {calib_num} images of {calib_source.spec} "
                f"(fewer than the study's {DEFAULT_CALIB_IMAGES})")
    calib_idx = data.calibration_indices(calib_source, calib_num, seed=config.seed, eval_source=eval_source,
                                         eval_indices=eval_idx, name="--calib_images")
    log(f"loading weights {weights} for {spec.name}")
    variables, num_classes, pre, source, pre_source = common.load_weights(spec.name, weights)
    if weights != "random":  # random weights: a smoke test, any labels do
        check_classes(eval_source, num_classes, flag=f"--dataset={config.dataset}")
    labels = eval_source.labels[eval_idx]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"--dataset={config.dataset} has labels in [{labels.min()}, {labels.max()}], "
                         f"but the model has {num_classes} classes")
    return Workload(config, spec, spec.build(num_classes=num_classes), variables, num_classes, pre, source,
                    pre_source, spec.trace(num_classes=num_classes), eval_source, eval_idx, calib_source, calib_idx, log)
