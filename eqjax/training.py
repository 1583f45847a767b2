"""Supervised training of the registry models: optimizers, augmentation, one train step.

Pure functions over a :class:`TrainState` pytree. The step is a function of
``(state, images, labels)`` and the run's seed only (the augmentation key is
``fold_in(seed_key, state.step)``), so a run resumed from a checkpoint repeats the
uninterrupted run exactly. ``experiments/train.py`` adds data, checkpoints and logging.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")


@flax.struct.dataclass
class TrainState:
    """Everything a training step changes.

    Attributes:
      step: int32 scalar, optimizer steps taken.
      params: model parameters (float32).
      batch_stats: BatchNorm running statistics (``{}`` for models without BN).
      opt_state: optax state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        """Flax variables for inference (``params`` and, if any, ``batch_stats``)."""
        return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def init_state(variables: dict[str, Any], optimizer: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}),
                      optimizer.init(params))


def learning_rate_schedule(schedule: str, *, peak: float, total_steps: int,
                           warmup_steps: int) -> optax.Schedule:
    """``cosine``: linear warm-up to ``peak``, cosine decay to 0 at ``total_steps``.
    ``onecycle``: Smith's one-cycle (cosine up for 30% of the steps, then down); no extra warm-up.

    Raises:
      ValueError: unknown schedule, ``total_steps`` < 1, or warm-up not shorter than training.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warm-up must be shorter than training: {warmup_steps} warm-up steps of "
                         f"{total_steps}")
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, total_steps)
    if schedule == "onecycle":
        return optax.cosine_onecycle_schedule(total_steps, peak)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _is_kernel(params: Any) -> Any:
    """Weight decay applies to conv/dense kernels only (not biases, norms, embeddings)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def make_optimizer(name: str, learning_rate: optax.Schedule, *, weight_decay: float,
                   momentum: float = 0.9, clip_grad_norm: float = 0.0) -> optax.GradientTransformation:
    """``sgd``: SGD with Nesterov momentum and L2 weight decay on kernels (the CNN recipe).
    ``adamw``: AdamW with decoupled decay on kernels (the ViT recipe).
    ``clip_grad_norm`` > 0 clips the global gradient norm first.
    """
    if weight_decay < 0 or clip_grad_norm < 0:
        raise ValueError(f"weight_decay and clip_grad_norm must be >= 0, got {weight_decay}, {clip_grad_norm}")
    chain = [optax.clip_by_global_norm(clip_grad_norm)] if clip_grad_norm > 0 else []
    if name == "sgd":
        chain += [optax.add_decayed_weights(weight_decay, mask=_is_kernel),
                  optax.sgd(learning_rate, momentum=momentum, nesterov=True)]
    elif name == "adamw":
        chain += [optax.adamw(learning_rate, weight_decay=weight_decay, mask=_is_kernel)]
    else:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
    return optax.chain(*chain)


def augment(key: jax.Array, images: jax.Array, *, pad: int = 4) -> jax.Array:
    """CIFAR augmentation: random crop from a zero-padded image, random horizontal flip.

    Args:
      key: PRNG key.
      images: [batch, H, W, C], any dtype.
      pad: padding on each side before cropping back to H x W (torchvision ``RandomCrop(padding=4)``).

    Returns:
      [batch, H, W, C], same dtype.
    """
    batch, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch,))
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(image, offset, flip):
        crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
        return jnp.where(flip, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, offsets, flips)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
    """uint8 [..., 3] -> float32 ``(x/255 - mean) / std`` (as :func:`eqjax.data.normalize`)."""
    shape = (1,) * (images.ndim - 1) + (-1,)
    return (images.astype(jnp.float32) / 255.0 - mean.reshape(shape)) / std.reshape(shape)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0) -> jax.Array:
    """Mean softmax cross-entropy of logits [batch, classes] against int labels [batch]."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation, *, seed: int,
                    mean: Any, std: Any, label_smoothing: float = 0.0,
                    augmentation: bool = True) -> Callable:
    """A jitted ``step(state, images uint8 [B, H, W, 3], labels [B]) -> (state, metrics)``.

    Metrics: ``loss`` (with label smoothing) and ``accuracy`` on the augmented batch.
    Under a data-parallel sharding of the batch, XLA averages the gradients (and BatchNorm
    statistics) over all devices.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    base_key = jax.random.key(seed)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)

    @jax.jit
    def step(state: TrainState, images: jax.Array, labels: jax.Array):
        if augmentation:
            images = augment(jax.random.fold_in(base_key, state.step), images)
        x = normalize(images, mean, std)

        def loss_fn(params):
            variables = {"params": params}
            if state.batch_stats:
                variables["batch_stats"] = state.batch_stats
                logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
                batch_stats = updates["batch_stats"]
            else:
                logits, batch_stats = model.apply(variables, x, train=True), {}
            loss = cross_entropy(logits, labels, label_smoothing=label_smoothing)
            return loss, (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float rates
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
        return new_state, {"loss": loss, "accuracy": accuracy}

    return step
