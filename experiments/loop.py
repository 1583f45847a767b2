"""The training loop that experiments.train and experiments.qat share: epochs over uint8 images in
a fixed per-epoch order, a progress line with the ETA, an evaluation and a checkpoint at every
epoch end, orbax checkpoints that a killed run resumes from exactly.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from eqjax import storage
from experiments import common

CHECKPOINTS_KEPT = 2


def epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
    """The image order of one epoch: a permutation determined by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(num_images)


def format_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Checkpoints:
    """Orbax checkpoints of the train state plus the run's config and curve (JSON). The JSON also
    holds the digests of every array of the state and of itself (:mod:`eqjax.storage`), checked
    on restore: a checkpoint reads back as written or counts as corrupt."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manager = ocp.CheckpointManager(
            directory, options=ocp.CheckpointManagerOptions(max_to_keep=CHECKPOINTS_KEPT),
            item_names=("state", "meta"))

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: Any, meta: dict[str, Any]) -> None:
        step = int(state.step)
        if step in self.manager.all_steps():
            return
        state = jax.tree_util.tree_map(np.array, jax.device_get(state))  # a copy the async write owns
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(storage.with_integrity(meta, state))))

    def restore(self, template: Any) -> tuple[Any, dict[str, Any]]:
        """The newest intact checkpoint (readable, and matching its digests). A corrupt newer one is
        reported in one line and moved to ``corrupt_checkpoints/`` beside the checkpoints (kept
        for inspection, out of the way of the steps this run saves again).

        Raises:
          ValueError: no checkpoint can be restored.
        """
        failures: list[tuple[int, str]] = []  # (step, reason)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with storage.quiet_orbax_errors():
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(jax.tree_util.tree_map(np.asarray, template)),
                        meta=ocp.args.JsonRestore()))
                meta = storage.check_integrity(restored["meta"], restored["state"],
                                               where=os.path.join(self.directory, str(step)))
            except Exception as e:  # orbax raises many types for missing/corrupt/mismatched files
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                failures.append((step, reason))
                common.log(f"WARNING: checkpoint step {step} in {self.directory} cannot be restored ({reason})")
                continue
            if failures:
                self._set_aside([s for s, _ in failures])
                common.log(f"resuming from the newest intact checkpoint, step {step}")
            return restored["state"], meta
        listing = "; ".join(f"step {s}: {reason}" for s, reason in failures)
        raise ValueError(f"no intact checkpoint in {self.directory} ({listing}); "
                         "start again in another --workdir")

    def _set_aside(self, steps: list[int]) -> None:
        aside = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
        os.makedirs(aside, exist_ok=True)
        for step in steps:
            target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(os.path.join(self.directory, str(step)), target)
            common.log(f"moved the corrupt checkpoint step {step} to {target}")
        self.manager.reload()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_resumable(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
    """Raises ValueError listing the settings in which the checkpoint's run (``saved``) and this one
    (``current``) differ: a resumed run must be the same run."""
    different = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if different:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in sorted(different.items()))
        raise ValueError(f"--resume: the checkpoint in {directory} was written by a different run "
                         f"({listing}); use the same flags or another --workdir")


def resume(checkpoints: Checkpoints, state: Any, fingerprint: dict[str, Any], *, asked: bool) -> tuple[Any, list]:
    """``(state, curve)`` from the newest checkpoint when there is one (after
    :func:`check_resumable` against ``fingerprint``), else ``(state, [])``; ``asked``: whether
    ``--resume`` was given, to say that there was nothing to resume from."""
    if checkpoints.latest() is not None:
        state, meta = checkpoints.restore(state)
        check_resumable(meta["config"], fingerprint, checkpoints.directory)
        common.log(f"resumed from step {int(state.step)} of {checkpoints.directory}")
        return state, meta["curve"]
    if asked:
        common.log(f"--resume: no checkpoint in {checkpoints.directory} yet, starting from scratch")
    return state, []


def fit(state: Any, step_fn: Callable, images: np.ndarray, labels: np.ndarray, *, batch_size: int, epochs: int,
        seed: int, checkpoints: Checkpoints, meta: Callable[[], dict], evaluate: Callable[[Any], dict] | None,
        curve: list, learning_rate: Callable[[int], Any], batch_sharding: Any, log_every: int,
        checkpoint_every: int, started: float, eval_every: int = 1, on_step: Callable[[int], None] | None = None,
        on_epoch: Callable[[], None] | None = None, on_log: Callable[[int, dict], None] | None = None) -> Any:
    """Runs ``step_fn(state, images, labels) -> (state, metrics)`` from ``state.step`` to the end.

    Epoch ``e`` visits the images in :func:`epoch_order` ``(seed, e)``, ``batch_size`` at a time
    (a last partial batch is dropped). Every ``log_every`` steps a progress line (loss, accuracy,
    learning rate, img/s, ETA; a non-finite loss stops the run); at every epoch end a curve entry
    (the mean of every metric over the epoch as ``train_<name>``, ``evaluate(state)``'s ``top1``
    and ``top5`` every ``eval_every`` epochs and after the last, else None (always None without
    ``evaluate``), the wall time), a checkpoint and ``on_epoch()``; also a checkpoint every
    ``checkpoint_every`` steps. ``curve`` is extended in place.
    ``on_log(step, metrics)`` receives the step's metrics (floats) with every progress line.

    Returns:
      The final state.
    """
    steps_per_epoch = len(images) // batch_size
    total_steps = epochs * steps_per_epoch
    step = int(state.step)
    window_start, window_images, run_start, run_first_step = time.perf_counter(), 0, time.perf_counter(), step
    epoch_metrics, order, order_epoch = [], None, None
    while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(seed, epoch, len(images)), epoch
        idx = order[position * batch_size:(position + 1) * batch_size]
        batch = jax.device_put((images[idx], labels[idx]), batch_sharding)
        state, step_metrics = step_fn(state, *batch)
        step += 1
        epoch_metrics.append(step_metrics)
        window_images += batch_size
        if on_step is not None:
            on_step(step)
        if step % log_every == 0 or step == total_steps:
            loss = float(step_metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss} at step {step}; lower "
                                         "--learning_rate (the last checkpoint is kept)")
            now = time.perf_counter()
            rate = window_images / (now - window_start)
            eta = (now - run_start) / (step - run_first_step) * (total_steps - step)
            common.log(f"step {step}/{total_steps} epoch {epoch + 1}/{epochs} loss {loss:.4f} "
                       f"acc {100 * float(step_metrics['accuracy']):.1f}% lr {float(learning_rate(step)):.4g} "
                       f"{rate:.0f} img/s ETA {format_seconds(eta)}")
            window_start, window_images = now, 0
            if on_log is not None:
                on_log(step, {name: float(value) for name, value in step_metrics.items()})
        if step % steps_per_epoch == 0:
            due = evaluate is not None and ((step // steps_per_epoch) % eval_every == 0 or step == total_steps)
            evaluation = evaluate(state) if due else {"top1": None, "top5": None}
            means = {name: float(np.mean([float(m[name]) for m in epoch_metrics])) for name in epoch_metrics[0]}
            entry = {"epoch": step // steps_per_epoch, "step": step, "train_loss": means.pop("loss"),
                     "train_accuracy": 100 * means.pop("accuracy"),
                     **{f"train_{name}": value for name, value in means.items()},
                     "eval_top1": evaluation["top1"], "eval_top5": evaluation["top5"],
                     "wall_s": time.perf_counter() - started}
            curve.append(entry)
            epoch_metrics = []
            common.log(f"epoch {entry['epoch']}: train loss {entry['train_loss']:.4f}" + (
                f", eval top-1 {evaluation['top1']:.2f}% top-5 {evaluation['top5']:.2f}%" if due else ""))
            checkpoints.save(state, meta())
            if on_epoch is not None:
                on_epoch()
        elif step % checkpoint_every == 0:
            checkpoints.save(state, meta())
    return state
