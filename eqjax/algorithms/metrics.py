"""Top-k accuracy, evaluated batch-parallel over all local devices."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """[batch] bool: whether ``labels`` is among the ``k`` largest ``logits`` [batch, classes].

    Ties count against the label (its logit must be strictly among the top k).
    """
    label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    return rank < k


def data_mesh() -> Mesh:
    """A 1-D mesh over all local devices, axis ``data``."""
    return Mesh(np.asarray(jax.local_devices()), ("data",))


def single_device_mesh() -> Mesh:
    """A mesh over the first local device only."""
    return Mesh(np.asarray(jax.local_devices()[:1]), ("data",))


Progress = Callable[[dict[str, float]], None]


class Evaluator:
    """Top-1/top-5 accuracy of ``logits_fn(state, images)``, one jitted, sharded step.

    Hold one per logits function: evaluating many states (FP32 variables, policies of any
    bits) with it compiles once per state structure and batch shape. Batches are padded to
    ``batch_size`` rounded up to a multiple of the device count and sharded along the
    batch over ``mesh`` (default: all local devices); the state is replicated.
    """

    def __init__(self, logits_fn: Callable[[Any, jax.Array], jax.Array], *, mesh: Mesh | None = None):
        self.mesh = mesh or data_mesh()

        @jax.jit
        def step(state, images, labels, valid):
            logits = logits_fn(state, images).astype(jnp.float32)
            top1 = jnp.sum(topk_correct(logits, labels, 1) & valid)
            top5 = jnp.sum(topk_correct(logits, labels, min(5, logits.shape[-1])) & valid)
            return top1, top5

        self._step = step

    def __call__(self, state: Any, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_size: int,
                 num_classes: int | None = None, on_progress: Progress | None = None) -> dict[str, float]:
        """Evaluates ``state`` on ``batches``.

        Args:
          state: any pytree the logits function takes (variables, ``(variables, policy)``, ...).
          batches: ``(images [B, H, W, C], labels [B])`` pairs, e.g. from
            :func:`eqjax.data.iterate_batches`; B <= ``batch_size``.
          batch_size: the largest batch.
          num_classes: when given, labels must be in [0, num_classes).
          on_progress: called after every batch with ``{'images', 'top1', 'images_per_second'}``.

        Returns:
          ``{'top1', 'top5', 'num_images', 'seconds', 'images_per_second'}`` (accuracies in %).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        devices = self.mesh.devices.size
        padded = -(-batch_size // devices) * devices
        data_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        state = jax.device_put(state, NamedSharding(self.mesh, PartitionSpec()))
        correct1 = correct5 = seen = 0
        start = time.perf_counter()
        for images, labels in batches:
            n = len(labels)
            if n > padded:
                raise ValueError(f"a batch of {n} images exceeds batch_size={batch_size}")
            if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
                raise ValueError(f"labels must be in [0, {num_classes}) for this model, "
                                 f"got a batch with labels in [{labels.min()}, {labels.max()}]")
            pad = padded - n
            images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
            labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
            valid = np.arange(padded) < n
            c1, c5 = self._step(state, *jax.device_put((images, labels, valid), data_sharding))
            correct1, correct5, seen = correct1 + int(c1), correct5 + int(c5), seen + n
            if on_progress is not None:
                on_progress({"images": seen, "top1": 100 * correct1 / seen,
                             "images_per_second": seen / (time.perf_counter() - start)})
        if seen == 0:
            raise ValueError("no images to evaluate")
        seconds = time.perf_counter() - start
        return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "num_images": seen,
                "seconds": seconds, "images_per_second": seen / seconds}


def make_evaluator(logits_fn: Callable[[Any, jax.Array], jax.Array], *, mesh: Mesh | None = None) -> Evaluator:
    """An :class:`Evaluator` for ``logits_fn(state, images [B, H, W, C]) -> logits [B, classes]``."""
    return Evaluator(logits_fn, mesh=mesh)


def evaluate(logits_fn: Callable[[Any, jax.Array], jax.Array], state: Any,
             batches: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_size: int,
             num_classes: int | None = None, mesh: Mesh | None = None,
             on_progress: Progress | None = None) -> dict[str, float]:
    """One-off evaluation: ``make_evaluator(logits_fn, mesh=mesh)(state, batches, ...)``.

    Compiles for this call; to evaluate several states, hold one :func:`make_evaluator`.
    """
    return make_evaluator(logits_fn, mesh=mesh)(state, batches, batch_size=batch_size,
                                                num_classes=num_classes, on_progress=on_progress)
