"""Quantization-aware training with learned step sizes (LSQ) of any registered model under any policy.

Starts from a full-precision checkpoint and a policy calibrated as ``experiments.ptq`` does it
(``--bits`` / ``--w_bits`` / ``--a_bits``, the first/last-layer rule, ``--calib_method``; a
mixed-precision allocation with ``--bits_json``; a reconstructed state with ``--reconstruct``),
then trains the weights, the per-channel weight step sizes and the per-tensor activation step
sizes together (:mod:`eqjax.algorithms.qat`). ``--control`` trains the full-precision model with
the identical schedule, data and loss instead: the figure a QAT row is compared with.

The shared CIFAR-10 ResNet-18 at W4A4, one epoch over 10,000 training images (see README for the
converted checkpoint; about 23 min on 2 CPU cores, most of it the three evaluations of all 10,000
test images):

    python -m experiments.qat --model=resnet18_cifar --weights=runs/weights/resnet18_cifar10 \
        --train_dataset=tar:../shared/data/cifar10/train.tar --calib_dataset=tar:../shared/data/cifar10/train.tar \
        --dataset=tar:../shared/data/cifar10/test.tar --bits=4 --train_images=10000 --epochs=1 \
        --train_batch_size=128 --batch_size=250 --workdir=runs/qat_r18_w4a4

Expected: round-to-nearest 71.85%, QAT 77.39% (FP32 74.08%; the same schedule with ``--control``
lifts the FP32 model to 78.53%). EfficientNet-Lite0 trained on the 256 shared calibration images
with distillation:

    python -m experiments.qat --model=efficientnet_lite0 --train_dataset=folder:../shared/data/imagenet/calib \
        --calib_dataset=folder:../shared/data/imagenet/calib --dataset=folder:../shared/data/imagenet/val \
        --w_bits=4 --a_bits=8 --calib_method=mse --weight_method=mse --distill_weight=1 --epochs=3 \
        --train_batch_size=32 --workdir=runs/qat_lite0_w4a8

``--learn_bits --budget=0.10505`` first learns every layer's weight and activation widths among
``--candidate_bits`` under the budgets (:mod:`eqjax.algorithms.width_search`; checkpointed in
WORKDIR/qat/search, the finished search kept in WORKDIR/qat/search/result), then trains at the
fixed widths; results.json's ``width_search`` holds the widths, the usage of every budget
against it, the search curve and each layer's probabilities.

BUILD_NOTES.md has the measured figures and their run times. Writes WORKDIR/qat/results.json
(config, environment, bits and energy per layer, FP32 / round-to-nearest / QAT top-1 and top-5,
the per-epoch curve, training-set accuracy, wall times; rewritten after every epoch),
WORKDIR/qat/qat.png, orbax checkpoints in WORKDIR/qat/checkpoints (``--resume`` continues a
killed run exactly) and WORKDIR/qat/final, which ``python -m experiments.ptq --qat_state=...``
evaluates and ``experiments.pareto`` draws as a QAT point.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec

from eqjax import data, ptq, training
from eqjax.algorithms import allocation, energy, metrics, qat, reconstruction as reconstruction_lib, width_search
from eqjax.quant import policy as policy_lib
from experiments import common, loop, workload as workload_lib

FLAGS = flags.FLAGS
# Measured on the shared CIFAR-10 ResNet-18 (benchmarks.qat_lr_probe, BUILD_NOTES): SGD at 2e-4 on the
# weights already costs points in six steps; step sizes learn at ten times the weights' rate.
DEFAULT_LEARNING_RATES = {"sgd": 2e-5, "adamw": 1e-6}
TRAIN_ACCURACY_IMAGES = 1024  # training images evaluated at the end (the over-fitting gap)
DEFAULT_CANDIDATES = (2, 3, 4, 6, 8)
WIDTH_INITS = ("uniform", "fisher")
FISHER_MICRO_BATCH = 8  # images per weight-gradient sample of the warm start's estimate (experiments.mixed's default)
SEARCH_FLAGS = ("budget", "max_gbops", "max_weight_mb", "max_avg_weight_bits", "candidate_bits", "search_epochs",
                "relaxation", "budget_penalty", "fill_budget", "width_learning_rate", "width_init")
# Fields that may differ between a run and its resumption (they do not change the parameters).
RESUMABLE_CHANGES = ("workdir", "resume", "log_every", "checkpoint_every", "eval_every")


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    workload_lib.define_shared_flags()
    workload_lib.define_reconstruction_flags()
    workload_lib.define_bias_correction_flags(fold_batchnorm=False)
    workload_lib.define_bits_flags(4, bits_json=True)
    flags.DEFINE_string("train_dataset", None, "Training images (default: --calib_dataset).")
    flags.DEFINE_integer("train_images", None, "Train on this many images (default all).")
    flags.DEFINE_integer("epochs", 1, "Epochs over the training images.")
    flags.DEFINE_integer("train_batch_size", 64, "Training batch size (split over all local devices).")
    flags.DEFINE_enum("optimizer", "sgd", list(training.OPTIMIZERS), "Optimizer of weights and step sizes.")
    flags.DEFINE_float("learning_rate", None, "Peak learning rate of the weights (default 2e-5 sgd, 1e-6 adamw).")
    flags.DEFINE_float("step_learning_rate", None, "Peak learning rate of the step sizes (default 10 x --learning_rate).")
    flags.DEFINE_float("weight_decay", 5e-5, "Weight decay on kernels.")
    flags.DEFINE_enum("schedule", "cosine", list(training.SCHEDULES), "Learning-rate schedule.")
    flags.DEFINE_float("warmup_fraction", 0.0, "Share of the steps spent warming up (cosine).")
    flags.DEFINE_bool("augment", True, "Random crop (4-pixel padding) and horizontal flip.")
    flags.DEFINE_enum("batchnorm", "fold", list(qat.BATCHNORM_MODES), "fold: BatchNorm folded into the conv "
                      "before weight quantization, statistics frozen; update: statistics updating, folded at the end.")
    flags.DEFINE_bool("asymmetric", False, "LSQ+: signed activation inputs get a learned offset.")
    flags.DEFINE_float("distill_weight", 0.0, "Weight of the distillation loss from the FP32 model (0 = off).")
    flags.DEFINE_float("temperature", None, "Distillation temperature (default 1; needs --distill_weight).")
    flags.DEFINE_float("label_smoothing", 0.0, "Label smoothing of the cross-entropy.")
    flags.DEFINE_bool("lsq_gradient_scale", True, "Scale step-size gradients by LSQ's 1/sqrt(N * Q_P).")
    flags.DEFINE_bool("control", False, "Train the FP32 control (same schedule, data and loss, no quantization).")
    flags.DEFINE_bool("learn_bits", False, "First learn every layer's weight and activation widths under the "
                      "budgets (the study's eq. 2 by gradient descent), then train at them.")
    flags.DEFINE_float("budget", None, "--learn_bits: relative energy budget E/E_FP32 (--energy_preset's model).")
    flags.DEFINE_float("max_gbops", None, "--learn_bits: budget of giga bit-operations (MACs x w_bits x a_bits).")
    flags.DEFINE_float("max_weight_mb", None, "--learn_bits: budget of weight storage in MB (biases as float32).")
    flags.DEFINE_float("max_avg_weight_bits", None, "--learn_bits: budget of average bits per weight.")
    flags.DEFINE_list("candidate_bits", list(map(str, DEFAULT_CANDIDATES)), "--learn_bits: the widths a layer may take.")
    flags.DEFINE_integer("search_epochs", 1, "--learn_bits: epochs of the width search before the --epochs of QAT.")
    flags.DEFINE_enum("relaxation", "soft", list(width_search.RELAXATIONS), "--learn_bits: soft: the forward pass "
                      "mixes the candidates' tensors by probability; hard: it takes the most probable one.")
    flags.DEFINE_float("budget_penalty", 10.0, "--learn_bits: weight of the budget penalty.")
    flags.DEFINE_bool("fill_budget", True, "--learn_bits: drive the binding budget's usage to the budget (else only "
                      "penalise usage above the budgets).")
    flags.DEFINE_float("width_learning_rate", 0.1, "--learn_bits: Adam learning rate of the width preferences.")
    flags.DEFINE_enum("width_init", "uniform", list(WIDTH_INITS), "--learn_bits: uniform: every candidate equally "
                      "likely; fisher: the budget MILP's widths from the one-pass Fisher estimate made likely.")
    flags.DEFINE_integer("eval_every", 1, "Evaluate every N epochs (and after the last).")
    flags.DEFINE_integer("checkpoint_every", 500, "Also checkpoint every N steps (always at epoch ends).")
    flags.DEFINE_integer("log_every", 20, "Progress line every N steps.")
    flags.DEFINE_bool("resume", False, "Continue from the latest checkpoint in WORKDIR/qat.")
    flags.DEFINE_string("workdir", "runs/default", "Output folder; results go to WORKDIR/qat/.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatRunConfig:
    """One QAT (or control) run. Checked on construction; errors name the flag."""

    workload: workload_lib.WorkloadConfig
    ptq: ptq.PTQConfig
    qat: qat.QatConfig = qat.QatConfig()
    bits_json: str | None = None
    reconstruction: reconstruction_lib.ReconstructionConfig | None = None
    recon_state: str | None = None
    bias_correction: bool = False
    search: width_search.SearchConfig | None = None
    search_epochs: int = 1
    width_learning_rate: float = 0.1
    width_init: str = "uniform"
    train_dataset: str | None = None
    train_images: int | None = None
    epochs: int = 1
    train_batch_size: int = 64
    optimizer: str = "sgd"
    learning_rate: float | None = None
    step_learning_rate: float | None = None
    weight_decay: float = 5e-5
    schedule: str = "cosine"
    warmup_fraction: float = 0.0
    augment: bool = True
    control: bool = False
    eval_every: int = 1
    checkpoint_every: int = 500
    log_every: int = 20
    resume: bool = False
    workdir: str = "runs/default"

    def __post_init__(self):
        if self.learning_rate is None:
            object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATES.get(self.optimizer, 0.01))
        if self.step_learning_rate is None:
            object.__setattr__(self, "step_learning_rate", 10 * self.learning_rate)
        for name in ("epochs", "train_batch_size", "eval_every", "checkpoint_every", "log_every", "train_images",
                     "search_epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        for name in ("learning_rate", "step_learning_rate", "width_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"--warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.optimizer not in training.OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {training.OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in training.SCHEDULES:
            raise ValueError(f"--schedule must be one of {training.SCHEDULES}, got {self.schedule!r}")
        if self.control and (self.qat.asymmetric or self.reconstruction is not None):
            raise ValueError("--control trains the FP32 model: --asymmetric and --reconstruct do not apply to it")
        if self.width_init not in WIDTH_INITS:
            raise ValueError(f"--width_init must be one of {WIDTH_INITS}, got {self.width_init!r}")
        if self.search is not None:
            clash = [flag for flag, given in (("--control", self.control), ("--bits_json", self.bits_json),
                                              ("--reconstruct", self.reconstruction is not None),
                                              ("--asymmetric", self.qat.asymmetric)) if given]
            if clash:
                raise ValueError(f"--learn_bits chooses the widths itself and learns symmetric grids: leave out "
                                 f"{', '.join(clash)}")
        if self.bias_correction:
            clash = [flag for flag, given in (("--control", self.control), ("--learn_bits", self.search is not None),
                                              ("--reconstruct", self.reconstruction is not None)) if given]
            if clash:
                raise ValueError(f"--bias_correction corrects the round-to-nearest start of QAT: leave out "
                                 f"{', '.join(clash)}")
        if self.reconstruction is not None and self.qat.batchnorm != "fold":
            raise ValueError("--reconstruct needs --batchnorm=fold (the reconstructed weights are the folded ones)")
        devices = jax.local_device_count()
        if self.train_batch_size % devices:
            raise ValueError(f"--train_batch_size={self.train_batch_size} must be a multiple of the "
                             f"{devices} local devices")

    @property
    def train_spec(self) -> str:
        return self.train_dataset or self.workload.calib_dataset


def _search_from_flags() -> width_search.SearchConfig | None:
    """The width search of ``--learn_bits`` (None without it; its flags alone are an error)."""
    if not FLAGS.learn_bits:
        given = [f"--{name}" for name in SEARCH_FLAGS if FLAGS[name].present]
        if given:
            raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --learn_bits")
        return None
    budgets = tuple((kind, FLAGS[flag].value) for kind, flag in (
        ("relative_energy", "budget"), ("gbops", "max_gbops"), ("weight_mb", "max_weight_mb"),
        ("avg_weight_bits", "max_avg_weight_bits")) if FLAGS[flag].value is not None)
    if not budgets:
        raise ValueError("--learn_bits needs a budget: --budget (relative energy) and/or --max_gbops, "
                         "--max_weight_mb, --max_avg_weight_bits")
    names = {"candidate_bits": "candidate_bits", "budgets": "budget", "penalty": "budget_penalty",
             "relaxation": "relaxation"}
    return workload_lib.translate_errors(lambda: width_search.SearchConfig(
        budgets=budgets, candidate_bits=workload_lib.parse_bits(FLAGS.candidate_bits, "candidate_bits"),
        relaxation=FLAGS.relaxation, penalty=FLAGS.budget_penalty, fill_budget=FLAGS.fill_budget,
        energy_model=energy.get_preset(FLAGS.energy_preset)), names)


def config_from_flags() -> QatRunConfig:
    if FLAGS.temperature is not None and FLAGS.distill_weight == 0:
        raise ValueError(f"--temperature={FLAGS.temperature} needs --distill_weight > 0 (distillation is off)")
    if FLAGS.bits_json and any(FLAGS[n].present for n in ("bits", "w_bits", "a_bits", "keep_first_last_bits")):
        raise ValueError("--bits_json gives every layer's bits: leave out --bits, --w_bits, --a_bits and "
                         "--keep_first_last_bits")
    names = {"w_bits": "w_bits" if FLAGS.w_bits is not None else "bits",
             "a_bits": "a_bits" if FLAGS.a_bits is not None else "bits"}
    qat_names = {"distill_weight": "distill_weight", "temperature": "temperature",
                 "label_smoothing": "label_smoothing", "batchnorm": "batchnorm"}
    qat_config = workload_lib.translate_errors(lambda: qat.QatConfig(
        batchnorm=FLAGS.batchnorm, asymmetric=FLAGS.asymmetric, distill_weight=FLAGS.distill_weight,
        temperature=FLAGS.temperature or 1.0, label_smoothing=FLAGS.label_smoothing,
        gradient_scale=FLAGS.lsq_gradient_scale), qat_names)
    return QatRunConfig(
        workload=workload_lib.workload_config_from_flags(),
        ptq=workload_lib.ptq_config_from_flags(
            w_bits=FLAGS.w_bits if FLAGS.w_bits is not None else FLAGS.bits,
            a_bits=FLAGS.a_bits if FLAGS.a_bits is not None else FLAGS.bits,
            keep_first_last_bits=FLAGS.keep_first_last_bits or None, flag_names=names),
        qat=qat_config, bits_json=FLAGS.bits_json, reconstruction=workload_lib.reconstruction_config_from_flags(),
        search=_search_from_flags(),
        **{name: FLAGS[name].value for name in (
            "search_epochs", "width_learning_rate", "width_init",
            "train_dataset", "train_images", "epochs", "train_batch_size", "optimizer", "learning_rate",
            "step_learning_rate", "weight_decay", "schedule", "warmup_fraction", "augment", "control",
            "eval_every", "checkpoint_every", "log_every", "resume", "workdir", "recon_state", "bias_correction")})


def _fingerprint(config: QatRunConfig) -> dict[str, Any]:
    fields = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    return {k: v for k, v in fields.items() if k not in RESUMABLE_CHANGES}


def _training_images(config: QatRunConfig, work: workload_lib.Workload) -> tuple[np.ndarray, np.ndarray]:
    """The training images (uint8 at the model's input geometry) and labels; refuses an empty set
    and one that shares images with the evaluation set."""
    source = data.open_dataset(config.train_spec, name="--train_dataset")
    indices = data.sample_indices(len(source), config.train_images, seed=config.workload.seed, name="--train_images")
    if len(indices) == 0:
        raise ValueError(f"--train_dataset={config.train_spec} holds no images")
    if data.same_source(source, work.eval_source):
        shared = np.intersect1d(indices, work.eval_indices)
        if len(shared):
            raise ValueError(f"--train_dataset and --dataset share {len(shared)} images of {source.spec} (e.g. "
                             f"index {int(shared[0])}): train and evaluate on disjoint splits")
    labels = source.labels[indices].astype(np.int32)
    if labels.min() < 0 or labels.max() >= work.num_classes:
        raise ValueError(f"--train_dataset={config.train_spec} has labels in [{labels.min()}, {labels.max()}]; "
                         f"training needs labels in [0, {work.num_classes - 1}]")
    if len(indices) < config.train_batch_size:
        raise ValueError(f"--train_batch_size={config.train_batch_size} exceeds the {len(indices)} training images")
    common.log(f"decoding {len(indices)} training images of {source.spec}")
    return data.load_uint8(source, indices, work.preprocessing), labels


def _plot(path: str, result: dict) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    curve = result["curve"]
    epochs = [c["epoch"] for c in curve]
    ax1.plot(epochs, [c["train_loss"] for c in curve], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("training loss")
    evaluated = [c for c in curve if c["eval_top1"] is not None]
    ax2.plot([c["epoch"] for c in evaluated], [c["eval_top1"] for c in evaluated], marker="o", label=result["method"])
    ax2.axhline(result["fp32_top1"], color="grey", linestyle="--", label="FP32 start")
    if result.get("nearest_top1") is not None:
        ax2.axhline(result["nearest_top1"], color="tab:red", linestyle=":", label="round-to-nearest start")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel(f"top-1 (%), {result['num_eval_images']} images")
    ax2.legend()
    fig.suptitle(f"{result['model']} {result['method']}")
    common.save_figure(fig, path)


def run(config: QatRunConfig, *, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Calibrates, trains and evaluates; writes WORKDIR/qat/results.json, qat.png, checkpoints and
    the final state; returns the results. ``on_step`` is called with the step number after each
    step (e.g. to stop a run early)."""
    started = time.perf_counter()
    out = common.output_dir(config.workdir, "qat")
    checkpoints = loop.Checkpoints(os.path.join(os.path.abspath(out), "checkpoints"))
    try:
        search_checkpoints = os.path.join(os.path.abspath(out), "search", "checkpoints")
        for directory in (checkpoints.directory, search_checkpoints):
            if os.path.isdir(directory) and os.listdir(directory) and not config.resume:
                raise FileExistsError(f"{directory} holds checkpoints; pass --resume to continue that run or "
                                      "choose another --workdir")
        return _run(config, out, checkpoints, started, on_step)
    finally:
        checkpoints.close()


def _run(config: QatRunConfig, out: str, checkpoints: loop.Checkpoints, started: float,
         on_step: Callable[[int], None] | None) -> dict[str, Any]:
    work = workload_lib.open_workload(config.workload)
    json_bits = workload_lib.read_bits_json(config.bits_json) if config.bits_json else None  # before any long work
    kept = _kept_layers(config, work)
    train_images, train_labels = _training_images(config, work)
    stats, calibration_s = work.collect_stats()
    policy = work.calibrated_with_bits(stats, config.ptq, json_bits, flag=f"--bits_json={config.bits_json}")
    example = work.spec.example_input(1)
    start_variables, weight_scales, recon_info, search_info = work.variables, None, None, None
    if config.search is not None:
        start, search_info = _search_widths(config, work, policy, stats, kept, train_images, train_labels, out, started,
                                            on_step)
        bits = {n: (b["w"], b["a"]) for n, b in search_info["bits"].items() if n in search_info["probabilities"]}
        policy = work.calibrated(stats, config.ptq, policy=policy_lib.set_bits(policy, bits))  # round-to-nearest
    elif config.reconstruction is not None:
        recon, recon_info = work.reconstruction_result(policy, config.ptq, config.reconstruction,
                                                       save_to=os.path.join(out, "reconstruction"),
                                                       load_from=config.recon_state)
        policy, weight_scales = recon.policy, recon.weight_scales
        start_variables = reconstruction_lib.quantized_variables(work.variables, recon.policy, recon.rounding,
                                                                 recon.weight_scales)
    elif config.bias_correction:
        rounded = work.quantize(policy, config.ptq)
        corrected = work.correct_bias(rounded)
        start_variables = _bias_corrected(work.variables, rounded.variables, corrected.variables)
    if config.search is None:
        start = qat.prepare(work.model, start_variables, policy, work.calls, example=example, config=config.qat,
                            weight_scales=weight_scales, statistics=stats, weight_method=config.ptq.weight_method)
    setup = qat.control_setup(start.setup) if config.control else start.setup
    method = ("FP32 control" if config.control else "learned widths + QAT" if config.search is not None
              else "QAT" + (" LSQ+" if config.qat.asymmetric else ""))

    fp32 = work.evaluate_fp32()
    nearest = None
    if not config.control:
        if recon_info is not None:
            reference, label = ptq.QuantizedState(start_variables, policy), recon_info["method"]
        elif config.bias_correction:
            reference, label = corrected, "round-to-nearest + bias correction"
        else:
            reference, label = work.quantize(policy, config.ptq), "round-to-nearest"
        nearest = work.evaluate_quantized(reference, label)

    steps_per_epoch = len(train_images) // config.train_batch_size
    total_steps = config.epochs * steps_per_epoch
    optimizer, schedule = _optimizer(config, total_steps)
    state = qat.init_state(start, optimizer)
    state, curve = loop.resume(checkpoints, state, _fingerprint(config), asked=config.resume)
    state, setup, step_fn, batch_sharding = _placed_step(config, work, optimizer, state, setup)

    quantized = jax.jit(lambda state: _quantized_state(setup, start.variables, state))
    eval_seconds = []

    def evaluate(state):
        begin = time.perf_counter()
        evaluation = work.evaluate_quantized(quantized(state), f"{method} epoch {len(curve) + 1}")
        eval_seconds.append(time.perf_counter() - begin)
        return evaluation

    bits = policy_lib.bits_table(setup.policy)
    result = work.base_result("qat", {**_fingerprint(config), "workdir": config.workdir, "method": method})
    result.update({"method": method, "control": config.control, "w_bits": config.ptq.w_bits,
                   "a_bits": config.ptq.activation_bits, "bits": bits, "energy": work.energy_of(bits),
                   "num_train_images": len(train_images), "steps_per_epoch": steps_per_epoch,
                   "total_steps": total_steps, "fp32_top1": fp32["top1"], "fp32_top5": fp32["top5"],
                   "nearest_top1": nearest and nearest["top1"], "nearest_top5": nearest and nearest["top5"],
                   "reconstruction": recon_info, "width_search": search_info})
    meta = lambda: {"config": _fingerprint(config), "curve": curve}
    common.log(f"{method} of {work.spec.name} on {len(train_images)} images: {config.epochs} epochs x "
               f"{steps_per_epoch} steps, batch {config.train_batch_size}, {config.optimizer} lr "
               f"{config.learning_rate:g} (step sizes {config.step_learning_rate:g}), {jax.local_device_count()} devices")
    train_start, first_step = time.perf_counter(), int(state.step)
    state = loop.fit(state, step_fn, train_images, train_labels, batch_size=config.train_batch_size,
                     epochs=config.epochs, seed=config.workload.seed, checkpoints=checkpoints, meta=meta,
                     evaluate=evaluate, curve=curve, learning_rate=schedule,
                     batch_sharding=batch_sharding, log_every=config.log_every,
                     checkpoint_every=config.checkpoint_every, started=started, eval_every=config.eval_every, on_step=on_step,
                     on_epoch=lambda: common.write_json_atomic(f"{out}/results.json",
                                                               {**result, "curve": curve, "finished": False}))
    training_s = time.perf_counter() - train_start - sum(eval_seconds)  # the steps alone (and checkpoints)

    final = qat.finalize(work.model, start, jax.device_get(state.params), jax.device_get(state.batch_stats),
                         config=config.qat, example=example,
                         info={"model": work.spec.name, "method": method, "top1": curve[-1]["eval_top1"],
                               "source": os.path.abspath(out)})
    if config.control:  # the control's artifact is a full-precision model
        final = final._replace(policy=setup.policy)
    final_path = qat.save(os.path.join(out, "final"), final)
    train_eval = _train_accuracy(work, quantized(state), train_images, train_labels, config.workload.batch_size)
    result.update({"curve": curve, "finished": True, "top1": curve[-1]["eval_top1"], "top5": curve[-1]["eval_top5"],
                   "train_top1": train_eval["top1"], "train_eval_images": train_eval["images"],
                   "final_state": final_path,
                   "wall_times_s": {"calibration": calibration_s, "training": training_s,
                                    "evaluation_per_epoch": eval_seconds, "fp32_eval": fp32["seconds"],
                                    "step_mean": training_s / max(total_steps - first_step, 1),
                                    "total": time.perf_counter() - started}})
    _plot(f"{out}/qat.png", result)
    result["results_path"] = common.write_json_atomic(f"{out}/results.json", result)
    return result


def _optimizer(config: QatRunConfig, total_steps: int, *, width_learning_rate: float | None = None
               ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, the weights' schedule)`` of a run of ``total_steps``: the weights and the step
    sizes on their schedules, and (a width search) Adam at ``width_learning_rate`` on the preferences."""
    warmup = int(config.warmup_fraction * total_steps)
    weights, steps = (training.learning_rate_schedule(config.schedule, peak=peak, total_steps=total_steps,
                                                      warmup_steps=warmup)
                      for peak in (config.learning_rate, config.step_learning_rate))
    optimizer = qat.make_optimizer(
        training.make_optimizer(config.optimizer, weights, weight_decay=config.weight_decay),
        training.make_optimizer(config.optimizer, steps, weight_decay=0.0),
        None if width_learning_rate is None else optax.adam(width_learning_rate))
    return optimizer, weights


def _placed_step(config: QatRunConfig, work: workload_lib.Workload, optimizer: optax.GradientTransformation,
                 state: training.TrainState, setup: Any, forward_fn: Callable | None = None
                 ) -> tuple[training.TrainState, Any, Callable, NamedSharding]:
    """``(state, setup, step_fn(state, images, labels), batch sharding)``: the state, the setup and the
    teacher replicated over the data mesh, and the jitted QAT step (``forward_fn``: a width search's)."""
    mesh = metrics.data_mesh()
    state, setup, teacher = jax.device_put((state, setup, work.variables), NamedSharding(mesh, PartitionSpec()))
    step = qat.make_step(work.model, optimizer, config.qat, seed=config.workload.seed, mean=work.preprocessing.mean,
                         std=work.preprocessing.std, augmentation=config.augment, forward_fn=forward_fn)
    return (state, setup, lambda state, images, labels: step(state, setup, teacher, images, labels),
            NamedSharding(mesh, PartitionSpec("data")))


def _bias_corrected(variables: dict, rounded: dict, corrected: dict) -> dict:
    """The float ``variables`` with what bias correction changed in the ``rounded`` ones (BatchNorm
    means, biases: :func:`eqjax.quant.folding.correct_bias`) taken from ``corrected``: the QAT start
    whose round-to-nearest forward is the bias-corrected one."""
    flat, flat_rounded, flat_corrected = (traverse_util.flatten_dict(t) for t in (variables, rounded, corrected))
    return traverse_util.unflatten_dict({
        path: flat_corrected[path] if not np.array_equal(flat_rounded[path], flat_corrected[path]) else value
        for path, value in flat.items()})


def _kept_layers(config: QatRunConfig, work: workload_lib.Workload) -> tuple[str, ...]:
    """The layers whose widths a width search keeps (the first and last at --keep_first_last_bits,
    unless 0); checks every budget against its smallest feasible value before any long work."""
    if config.search is None:
        return ()
    kept = (work.layers[0], work.layers[-1]) if config.ptq.keep_first_last_bits else ()
    policy = ptq.build_policy(work.calls, config.ptq)
    searched = width_search.searched_layers(policy, kept)
    counts = energy.count_layers(work.model, work.spec.example_input(1))
    fixed = {n: b for n, b in policy_lib.bits_table(policy).items() if n not in searched}
    workload_lib.translate_errors(lambda: width_search.check_budgets(counts, searched, fixed, config.search),
                                  {f"{kind} budget": flag for kind, flag in (("relative_energy", "budget"), *(
                                      (k, f"max_{k}") for k in allocation.BUDGET_KINDS[1:]))})
    return kept


def _search_widths(config: QatRunConfig, work: workload_lib.Workload, policy: dict, stats: dict, kept: tuple,
                   images: np.ndarray, labels: np.ndarray, out: str, started: float,
                   on_step: Callable[[int], None] | None) -> tuple[qat.QatStart, dict]:
    """The width search (``--learn_bits``): ``(the QAT start at the learned widths, what the search
    did for results.json)``. Checkpointed in WORKDIR/qat/search/checkpoints and resumed exactly; a
    finished search is kept in WORKDIR/qat/search/result and reused by ``--resume``."""
    example = work.spec.example_input(1)
    search = width_search.prepare(work.model, work.variables, policy, work.calls, example=example,
                                  config=config.search, calibrate=lambda p: work.calibrated(stats, config.ptq, policy=p),
                                  qat_config=config.qat, keep=kept, weight_method=config.ptq.weight_method)
    if config.width_init == "fisher":
        estimate = work.second_order(stats, config.ptq, config.search.candidate_bits, method="fisher",
                                     micro_batch=FISHER_MICRO_BATCH)
        rows = {n: i for i, n in enumerate(estimate.layers)}
        cost = {n: estimate.weight[rows[n]][:, None] + estimate.activation[rows[n]][None, :] for n in search.setup.searched}
        search, report = width_search.warm_start(search, cost)
        common.log("width search: starting from the Fisher MILP's widths (" + ", ".join(
            f"{k} {v:.4g}" for k, v in report["usage"].items()) + ")")
    directory = os.path.join(os.path.abspath(out), "search")
    result_dir = os.path.join(directory, "result")
    if os.path.isfile(os.path.join(result_dir, width_search.SEARCH_FILE)):
        trainables, batch_stats, info = width_search.load(result_dir)
        common.log(f"width search: reusing the finished search in {result_dir}")
    else:
        trainables, batch_stats, info = _run_search(config, work, search, images, labels, directory, started, on_step)
        width_search.save(result_dir, trainables, batch_stats, info)
    return width_search.qat_start(search, trainables, batch_stats, info), info


def _run_search(config: QatRunConfig, work: workload_lib.Workload, search: width_search.SearchStart,
                images: np.ndarray, labels: np.ndarray, directory: str, started: float,
                on_step: Callable[[int], None] | None) -> tuple[dict, Any, dict]:
    """Trains the weights, step sizes and width preferences for --search_epochs; returns the
    trainables, BatchNorm statistics and :func:`width_search.fix_widths`' result with the search curve."""
    begin = time.perf_counter()
    total_steps = config.search_epochs * (len(images) // config.train_batch_size)
    optimizer, schedule = _optimizer(config, total_steps, width_learning_rate=config.width_learning_rate)
    state = training.TrainState(jnp.zeros((), jnp.int32), search.trainables, search.variables.get("batch_stats", {}),
                                optimizer.init(search.trainables))
    checkpoints = loop.Checkpoints(os.path.join(directory, "checkpoints"))
    try:
        state, curve = loop.resume(checkpoints, state, _fingerprint(config), asked=config.resume)
        forward = functools.partial(width_search.forward, work.model, qat_config=config.qat, config=config.search)
        state, _, step_fn, batch_sharding = _placed_step(config, work, optimizer, state, search.setup, forward)
        budgets = dict(config.search.budgets)
        trace = []  # the search curve: losses and usages (absolute) at every progress line

        def on_log(step_number, values):
            trace.append({"step": step_number, "loss": values["loss"], "cross_entropy": values["cross_entropy"],
                          **{f"{which}_{k}": values[f"{which}_{k}"] * bound for k, bound in budgets.items()
                             for which in ("expected", "most_probable")}})
            common.log("width search: " + ", ".join(
                f"{k} expected {trace[-1][f'expected_{k}']:.4g}, most probable {trace[-1][f'most_probable_{k}']:.4g} "
                f"(budget {bound:.4g})" for k, bound in budgets.items()))

        common.log(f"width search of {len(search.setup.searched)} layers among {config.search.candidate_bits} bits "
                   f"({config.search.relaxation} relaxation) for {config.search_epochs} epochs x "
                   f"{total_steps // config.search_epochs} steps under " + ", ".join(f"{k} <= {v:.4g}" for k, v in budgets.items()))
        state = loop.fit(state, step_fn, images, labels,
                         batch_size=config.train_batch_size, epochs=config.search_epochs, seed=config.workload.seed,
                         checkpoints=checkpoints, meta=lambda: {"config": _fingerprint(config), "curve": curve},
                         evaluate=None, curve=curve, learning_rate=schedule,
                         batch_sharding=batch_sharding, log_every=config.log_every,
                         checkpoint_every=config.checkpoint_every, started=started, on_step=on_step, on_log=on_log)
    finally:
        checkpoints.close()
    trainables, batch_stats = jax.device_get((state.params, state.batch_stats))
    widths = width_search.fix_widths(search, trainables["logits"])
    common.log("width search: " + ", ".join(f"{k} {widths['usage'][k]:.4g} of {widths['budgets'][k]:.4g}"
                                            for k in widths["budgets"])
               + (" (the most probable widths exceeded a budget: the MILP chose the most probable feasible ones)"
                  if widths["repaired"] else ""))
    return trainables, batch_stats, {**widths, "curve": trace, "epochs": curve, "steps": total_steps,
                                     "seconds": time.perf_counter() - begin}


def _quantized_state(setup: qat.QatSetup, variables: dict, state: training.TrainState) -> ptq.QuantizedState:
    """The quantized model that a training ``state`` stands for (run in inference mode)."""
    return ptq.QuantizedState(*qat.quantized_model(setup, variables, state.params, state.batch_stats))


def _train_accuracy(work: workload_lib.Workload, state: ptq.QuantizedState, images: np.ndarray,
                    labels: np.ndarray, batch_size: int) -> dict:
    """Top-1 of the final model on (at most :data:`TRAIN_ACCURACY_IMAGES`) training images, unaugmented."""
    num = min(len(images), TRAIN_ACCURACY_IMAGES)
    batches = ((data.normalize(images[i:i + batch_size], work.preprocessing), labels[i:i + batch_size])
               for i in range(0, num, batch_size))
    evaluation = work.quantized_evaluator(state, batches, batch_size=batch_size, num_classes=work.num_classes)
    return {"top1": evaluation["top1"], "images": num}


def main(argv):
    del argv
    r = run(config_from_flags())
    search = r["width_search"]
    if r["control"]:
        widths = ""
    elif search is not None:
        widths = " at " + ", ".join(f"{k} {search['usage'][k]:.4g} of {v:.4g}" for k, v in search["budgets"].items())
    elif r["config"].get("bits_json"):
        widths = f" (widths of {r['config']['bits_json']}, energy {r['energy']['relative']:.4g})"
    else:
        widths = f" W{r['w_bits']}A{r['a_bits']}"
    start = "round-to-nearest" + (" + bias correction" if r["config"].get("bias_correction") else "")
    print(f"{r['model']} {r['method']}{widths} after {r['config']['epochs']} epochs: top-1 {r['top1']:.2f}% on "
          f"{r['num_eval_images']} images (FP32 {r['fp32_top1']:.2f}%"
          + (f", {start} {r['nearest_top1']:.2f}%" if r["nearest_top1"] is not None else "")
          + f"), training-set top-1 {r['train_top1']:.2f}% on {r['train_eval_images']} images -> {r['results_path']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
