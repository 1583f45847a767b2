"""Top-k accuracy, evaluated batch-parallel over all local devices."""

from __future__ import annotations

import functools
import sys
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


@functools.lru_cache(maxsize=16)
def _eval_step(logits_fn: Callable[[Any, jax.Array], jax.Array]) -> Callable:
    """One jitted step per ``logits_fn``: evaluating many states (policies) compiles once."""

    @jax.jit
    def step(state, images, labels, valid):
        logits = logits_fn(state, images).astype(jnp.float32)
        top1 = jnp.sum(topk_correct(logits, labels, 1) & valid)
        top5 = jnp.sum(topk_correct(logits, labels, min(5, logits.shape[-1])) & valid)
        return top1, top5

    return step


def single_device_mesh() -> Mesh:
    """A mesh over the first local device only."""
    return Mesh(np.asarray(jax.local_devices()[:1]), ("data",))


def evaluate(logits_fn: Callable[[Any, jax.Array], jax.Array], state: Any,
             batches: Iterable[tuple[np.ndarray, np.ndarray]], *, batch_size: int,
             num_classes: int | None = None, num_images: int | None = None,
             label: str = "eval", mesh: Mesh | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy of ``logits_fn(state, images)`` over ``batches``.

    Batches are padded to ``batch_size`` rounded up to a multiple of the device count
    (one compilation) and sharded along the batch over ``mesh`` (default: all local
    devices); ``state`` (variables, policy, ...) is replicated.

    Args:
      logits_fn: ``(state, images [B, H, W, C]) -> logits [B, classes]``.
      state: any pytree.
      batches: ``(images, labels)`` pairs, e.g. from :func:`eqjax.data.iterate_batches`.
      batch_size: the largest batch.
      num_classes: when given, labels must be in [0, num_classes).
      num_images: for the progress line only.
      label: progress line prefix.

    Returns:
      ``{'top1', 'top5', 'num_images', 'seconds', 'images_per_second'}`` (accuracies in %).
    """
    mesh = mesh or data_mesh()
    devices = mesh.devices.size
    padded = -(-batch_size // devices) * devices
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    step = _eval_step(logits_fn)

    correct1 = correct5 = seen = 0
    start = last_report = time.perf_counter()
    interactive = sys.stderr.isatty()
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
        args = jax.device_put((images, labels, valid), data_sharding)
        c1, c5 = step(state, *args)
        correct1, correct5, seen = correct1 + int(c1), correct5 + int(c5), seen + n
        now = time.perf_counter()
        if interactive or now - last_report >= 10.0:
            last_report = now
            total = f"/{num_images}" if num_images else ""
            line = (f"[{label}] {seen}{total} images, top-1 {100 * correct1 / seen:.2f}%, "
                    f"{seen / (now - start):.1f} img/s")
            print("\r" + line if interactive else line, end="" if interactive else "\n",
                  file=sys.stderr, flush=True)
    if interactive:
        print(file=sys.stderr)
    if seen == 0:
        raise ValueError("no images to evaluate")
    seconds = time.perf_counter() - start
    return {"top1": 100.0 * correct1 / seen, "top5": 100.0 * correct5 / seen, "num_images": seen,
            "seconds": seconds, "images_per_second": seen / seconds}
