"""Train a registry model from scratch on CIFAR-sized images: the starting point for PTQ.

Recipes (``RECIPES``; any flag overrides its field):
  resnet18_cifar: SGD, Nesterov momentum 0.9, lr 0.1 at batch 128, weight decay 5e-4 on kernels,
                  cosine schedule with 2% warm-up, label smoothing 0.1, 200 epochs.
  vit_tiny_cifar: AdamW, lr 1e-3 at batch 256, weight decay 0.05, cosine with 5% warm-up,
                  gradient-norm clip 1.0, label smoothing 0.1, 200 epochs.
Both use random crop (4-pixel zero padding) and horizontal flip; the normalisation mean/std
are computed from the training images and stored with the weights.

    python -m experiments.train --model=resnet18_cifar \
        --dataset=tfds:cifar100:train --eval_dataset=tfds:cifar100:test --workdir=runs/r18_c100

A short CPU run on the shared CIFAR-10 archive (~4 min on 2 cores; expected about 19% top-1,
see BUILD_NOTES.md for the measured figures and the recipe's target):

    python -m experiments.train --model=resnet18_cifar --epochs=1 --train_images=4096 \
        --eval_images=1000 --dataset=tar:../shared/data/cifar10/train.tar \
        --eval_dataset=tar:../shared/data/cifar10/test.tar --workdir=runs/r18_train_smoke

Writes WORKDIR/train/checkpoints/<step>/ (orbax: parameters, BatchNorm statistics, optimizer
state and step, plus the run's config and curve), WORKDIR/train/results.json (config,
environment, per-epoch curve, final accuracy; rewritten after every epoch),
WORKDIR/train/curve.png and WORKDIR/train/final/, a checkpoint that
``python -m experiments.ptq --weights=WORKDIR/train/final`` loads. ``--resume`` continues a
killed run from its latest checkpoint and ends with exactly the parameters of an uninterrupted
run; without it, a workdir that already holds checkpoints is refused, never overwritten.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import NamedSharding, PartitionSpec

from eqjax import checkpoint, data, models, training
from eqjax.algorithms import metrics
from experiments import common, loop


@dataclasses.dataclass(frozen=True)
class Recipe:
    optimizer: str
    learning_rate: float  # at reference_batch_size; scaled linearly with the batch size
    reference_batch_size: int
    weight_decay: float
    batch_size: int
    epochs: int
    schedule: str
    warmup_fraction: float
    label_smoothing: float
    clip_grad_norm: float


RECIPES = {
    "resnet18_cifar": Recipe("sgd", 0.1, 128, 5e-4, 128, 200, "cosine", 0.02, 0.1, 0.0),
    "vit_tiny_cifar": Recipe("adamw", 1e-3, 256, 0.05, 256, 200, "cosine", 0.05, 0.1, 1.0),
}

# Run settings that are not part of a recipe, with their defaults.
DEFAULTS = {"dataset": "tfds:cifar100:train", "eval_dataset": "tfds:cifar100:test", "train_images": None,
            "eval_images": None, "num_classes": None, "augment": True, "compute_dtype": "auto", "seed": 0,
            "checkpoint_every": 1000, "log_every": 50, "resume": False, "workdir": "runs/default"}

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines this script's flags (when it runs as a program; importing it defines none)."""
    flags.DEFINE_enum("model", "resnet18_cifar", list(RECIPES), "Registry name of the model to train.")
    flags.DEFINE_string("dataset", DEFAULTS["dataset"], "Training dataset spec (eqjax.data).")
    flags.DEFINE_string("eval_dataset", DEFAULTS["eval_dataset"], "Evaluation dataset spec.")
    flags.DEFINE_integer("train_images", None, "Train on this many images (default all).")
    flags.DEFINE_integer("eval_images", None, "Evaluate on this many images (default all).")
    flags.DEFINE_integer("num_classes", None, "Classes (default: largest training label + 1).")
    flags.DEFINE_integer("epochs", None, "Epochs (default: the recipe's).")
    flags.DEFINE_integer("batch_size", None, "Global batch size, split over all local devices (default: recipe's).")
    flags.DEFINE_enum("optimizer", None, list(training.OPTIMIZERS), "Optimizer (default: the recipe's).")
    flags.DEFINE_float("learning_rate", None, "Peak learning rate (default: recipe's, scaled by batch size).")
    flags.DEFINE_float("weight_decay", None, "Weight decay on kernels (default: recipe's).")
    flags.DEFINE_enum("schedule", None, list(training.SCHEDULES), "Learning-rate schedule (default: recipe's).")
    flags.DEFINE_float("warmup_fraction", None, "Share of the steps spent warming up (cosine).")
    flags.DEFINE_float("label_smoothing", None, "Label smoothing (default: recipe's).")
    flags.DEFINE_float("clip_grad_norm", None, "Global gradient-norm clip; 0 = off (default: recipe's).")
    flags.DEFINE_bool("augment", DEFAULTS["augment"], "Random crop + horizontal flip.")
    flags.DEFINE_enum("compute_dtype", DEFAULTS["compute_dtype"], ["auto", "float32", "bfloat16"],
                      "Activation dtype; auto = bfloat16 on GPU/TPU, float32 on CPU. Parameters stay float32.")
    flags.DEFINE_integer("seed", DEFAULTS["seed"], "Seed of initialisation, data order and augmentation.")
    flags.DEFINE_integer("checkpoint_every", DEFAULTS["checkpoint_every"],
                         "Also checkpoint every N steps (always at epoch ends).")
    flags.DEFINE_integer("log_every", DEFAULTS["log_every"], "Progress line every N steps.")
    flags.DEFINE_bool("resume", DEFAULTS["resume"], "Continue from the latest checkpoint in WORKDIR/train.")
    flags.DEFINE_string("workdir", DEFAULTS["workdir"], "Output folder; results go to WORKDIR/train/.")


# Fields that may differ between a run and its resumption (they do not change the parameters).
RESUMABLE_CHANGES = ("workdir", "resume", "log_every", "checkpoint_every", "eval_images", "eval_dataset")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A fully resolved training run (flags over the model's recipe)."""

    model: str
    dataset: str
    eval_dataset: str
    train_images: int | None
    eval_images: int | None
    num_classes: int | None
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    schedule: str
    warmup_fraction: float
    label_smoothing: float
    clip_grad_norm: float
    augment: bool
    compute_dtype: str
    seed: int
    checkpoint_every: int
    log_every: int
    resume: bool
    workdir: str

    @classmethod
    def from_recipe(cls, model: str, **overrides) -> "TrainConfig":
        """The recipe of ``model`` with ``overrides`` (None values keep the recipe's)."""
        if model not in RECIPES:
            raise ValueError(f"no training recipe for model {model!r}; known: {', '.join(RECIPES)}")
        recipe = dataclasses.asdict(RECIPES[model])
        reference = recipe.pop("reference_batch_size")
        fields = {**DEFAULTS, **recipe}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("learning_rate") is None:
            fields["learning_rate"] = recipe["learning_rate"] * fields["batch_size"] / reference
        return cls(model=model, **fields)

    def validate(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every}
        for name in ("train_images", "eval_images", "num_classes"):
            if getattr(self, name) is not None:
                positive[name] = getattr(self, name)
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"--{name} must be >= 1, got {value}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"--warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        devices = jax.local_device_count()
        if self.batch_size % devices:
            raise ValueError(f"--batch_size={self.batch_size} must be a multiple of the {devices} local devices")


def config_from_flags() -> TrainConfig:
    names = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "model"]
    return TrainConfig.from_recipe(FLAGS.model, **{n: FLAGS[n].value for n in names})


def _fingerprint(config: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in RESUMABLE_CHANGES}


def _compute_dtype(name: str):
    if name == "auto":
        name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return jnp.dtype(name)


def _load_split(text: str, flag: str, num: int | None, num_flag: str, seed: int, pre: models.Preprocessing):
    source = data.open_dataset(text, name=f"--{flag}")
    indices = data.sample_indices(len(source), num, seed=seed, name=f"--{num_flag}")
    labels = source.labels[indices].astype(np.int32)
    if labels.min() < 0:
        raise ValueError(f"--{flag}={text} has unlabelled images; training and evaluation need labels")
    common.log(f"decoding {len(indices)} images of {source.spec}")
    start = time.perf_counter()
    images = data.load_uint8(source, indices, pre)
    common.log(f"decoded {len(images)} images in {time.perf_counter() - start:.1f} s")
    return images, labels


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images [N, H, W, 3], in [0, 1] units."""
    pixels = images.reshape(-1, images.shape[-1])
    total, squares = np.zeros(pixels.shape[-1]), np.zeros(pixels.shape[-1])
    for start in range(0, len(pixels), 1 << 20):  # float64 in chunks, not a 1.2 GB copy of CIFAR
        chunk = pixels[start:start + (1 << 20)].astype(np.float64) / 255.0
        total, squares = total + chunk.sum(0), squares + np.square(chunk).sum(0)
    mean = total / len(pixels)
    std = np.sqrt(np.maximum(squares / len(pixels) - np.square(mean), 0.0))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _plot_curve(path: str, curve: list[dict[str, Any]], model: str) -> None:
    plt = common.pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [c["epoch"] for c in curve]
    ax1.plot(epochs, [c["train_loss"] for c in curve], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss")
    ax2.plot(epochs, [c["train_accuracy"] for c in curve], marker="o", label="train (augmented)")
    ax2.plot(epochs, [c["eval_top1"] for c in curve], marker="o", label="eval top-1")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy (%)")
    ax2.legend()
    fig.suptitle(model)
    common.save_figure(fig, path)


def run(config: TrainConfig, *, model_overrides: dict[str, Any] | None = None,
        on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Trains ``config.model``; returns the results written to WORKDIR/train/results.json.

    Args:
      config: the run.
      model_overrides: constructor fields of the model (e.g. a smaller ``depth`` in tests).
      on_step: called with the step number after each step (e.g. to stop a run early).
    """
    config.validate()
    started = time.perf_counter()
    spec = models.get(config.model)
    out = common.output_dir(config.workdir, "train")
    checkpoints = loop.Checkpoints(os.path.join(os.path.abspath(out), "checkpoints"))
    try:
        if checkpoints.latest() is not None and not config.resume:
            raise FileExistsError(f"{checkpoints.directory} holds checkpoints up to step "
                                  f"{checkpoints.latest()}; pass --resume to continue that run or "
                                  "choose another --workdir (nothing was overwritten)")
        return _train(config, spec, out, checkpoints, model_overrides or {}, on_step, started)
    finally:
        checkpoints.close()


def _load_data(config: TrainConfig, spec: models.ModelSpec):
    """Training and evaluation images (uint8, decoded once), labels, classes, and the
    normalisation computed from the training images."""
    geometry = models.Preprocessing(spec.input_size, (0.0,) * 3, (1.0,) * 3)
    train_images, train_labels = _load_split(config.dataset, "dataset", config.train_images, "train_images",
                                             config.seed, geometry)
    num_classes = config.num_classes or int(train_labels.max()) + 1
    eval_images, eval_labels = _load_split(config.eval_dataset, "eval_dataset", config.eval_images, "eval_images",
                                           config.seed, geometry)
    for flag, labels in (("dataset", train_labels), ("eval_dataset", eval_labels)):
        if labels.max() >= num_classes:
            raise ValueError(f"--{flag} has labels up to {labels.max()}, but --num_classes={num_classes}")
    mean, std = _channel_stats(train_images)
    return (train_images, train_labels), (eval_images, eval_labels), num_classes, mean, std


def _train(config, spec, out, checkpoints, model_overrides, on_step, started):
    (train_images, train_labels), (eval_images, eval_labels), num_classes, mean, std = _load_data(config, spec)
    preprocessing = models.Preprocessing(spec.input_size, mean, std, 1.0, "bilinear")

    steps_per_epoch = len(train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"--batch_size={config.batch_size} exceeds the {len(train_images)} training images")
    total_steps = config.epochs * steps_per_epoch
    schedule = training.learning_rate_schedule(
        config.schedule, peak=config.learning_rate, total_steps=total_steps,
        warmup_steps=int(config.warmup_fraction * total_steps))
    optimizer = training.make_optimizer(config.optimizer, schedule, weight_decay=config.weight_decay,
                                        clip_grad_norm=config.clip_grad_norm)
    dtype = _compute_dtype(config.compute_dtype)
    model = spec.build(num_classes=num_classes, dtype=dtype, **model_overrides)
    eval_model = spec.build(num_classes=num_classes, **model_overrides)
    variables = jax.jit(model.init)(jax.random.key(config.seed),
                                    jnp.zeros(spec.example_input(1).shape, jnp.float32))
    state = training.init_state(variables, optimizer)
    state, curve = loop.resume(checkpoints, state, _fingerprint(config), asked=config.resume)

    mesh = metrics.data_mesh()
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    train_step = training.make_train_step(model, optimizer, seed=config.seed, mean=mean, std=std,
                                          label_smoothing=config.label_smoothing,
                                          augmentation=config.augment)
    result = {"experiment": "train", "model": spec.name, "num_classes": num_classes,
              "config": dataclasses.asdict(config), "compute_dtype": dtype.name,
              "preprocessing": preprocessing.to_dict(), "environment": common.environment(),
              "num_train_images": len(train_images), "num_eval_images": len(eval_images),
              "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}
    meta = lambda: {"config": _fingerprint(config), "curve": curve}

    mean_array, std_array = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    evaluator = metrics.make_evaluator(  # uint8 batches, normalised on the device as in training
        lambda v, x: eval_model.apply(v, training.normalize(x, mean_array, std_array)), mesh=mesh)

    def evaluate(state):
        batches = ((eval_images[i:i + config.batch_size], eval_labels[i:i + config.batch_size])
                   for i in range(0, len(eval_images), config.batch_size))
        return evaluator(state.variables, batches, batch_size=config.batch_size, num_classes=num_classes,
                         on_progress=common.progress_logger("eval", len(eval_images)))

    common.log(f"training {spec.name} ({num_classes} classes, {dtype.name}) on {len(train_images)} images: "
               f"{config.epochs} epochs x {steps_per_epoch} steps, batch {config.batch_size}, "
               f"{config.optimizer} lr {config.learning_rate:g}, {jax.local_device_count()} devices")
    state = loop.fit(state, train_step, train_images, train_labels, batch_size=config.batch_size,
                     epochs=config.epochs, seed=config.seed, checkpoints=checkpoints, meta=meta, evaluate=evaluate,
                     curve=curve, learning_rate=schedule, batch_sharding=batch_sharding,
                     log_every=config.log_every, checkpoint_every=config.checkpoint_every, started=started,
                     on_step=on_step, on_epoch=lambda: common.write_json_atomic(
                         f"{out}/results.json", {**result, "curve": curve, "finished": False}))

    final = checkpoint.save(os.path.join(out, "final"), jax.device_get(state.variables), model=spec.name,
                            num_classes=num_classes, preprocessing=preprocessing,
                            source=f"experiments.train:{os.path.abspath(out)}", overwrite=True)
    # Every run ends an epoch (total_steps is a multiple of steps_per_epoch), so curve is not empty.
    result.update({"curve": curve, "finished": True, "final_checkpoint": final,
                   "top1": curve[-1]["eval_top1"], "top5": curve[-1]["eval_top5"],
                   "wall_time_s": time.perf_counter() - started})
    _plot_curve(f"{out}/curve.png", curve, spec.name)
    common.write_json_atomic(f"{out}/results.json", result)
    return result


def main(argv):
    del argv
    result = run(config_from_flags())
    print(f"{result['model']}: eval top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% on "
          f"{result['num_eval_images']} images after {result['config']['epochs']} epochs -> "
          f"{result['final_checkpoint']}")


if __name__ == "__main__":
    define_flags()
    common.run_main(main)
