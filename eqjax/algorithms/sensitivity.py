"""Layer sensitivity (the study's eq. 5) for every layer and bit width in ONE compiled call.

For layer l quantized alone at b bits (weights and inputs), on calibration images:

* ``l2``:      S_l = ||y_l,full - y_l,quant||_2, y_l the output of layer l (eq. 5);
* ``rel_l2``:  S_l / ||y_l,full||_2, comparable across layers of different sizes;
* ``kl``:      mean KL(softmax(z_full) || softmax(z_quant)) of the logits z;
* ``top1_agreement``: fraction of images whose argmax is unchanged;
* ``delta_loss``: mean cross-entropy increase against the labels (when given).

All L x B single-layer policies are stacked into one pytree and evaluated by one jitted
function (``lax.map`` over chunks of ``vmap``), with images sharded over a device mesh.
Since only layer l is quantized, the inputs of layer l equal the full-precision ones and
its output difference is measured exactly, in the same forward as the logits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eqjax.quant import apply, intercept, nnx_model, numerics
from eqjax.algorithms.metrics import data_mesh
from eqjax.quant.policy import LayerQuant

METRICS = ("l2", "rel_l2", "kl", "top1_agreement", "delta_loss")


@dataclasses.dataclass(frozen=True)
class SensitivityResult:
    """Scores ``[layer, bits]`` per metric (numpy), with the layers and bit widths swept."""

    layers: tuple[str, ...]
    bits: tuple[int, ...]
    scores: dict[str, np.ndarray]
    num_images: int

    def table(self, metric: str, bits: int) -> dict[str, float]:
        """``{layer: score}`` of one metric at one bit width."""
        if metric not in self.scores:
            raise ValueError(f"metric must be one of {tuple(self.scores)}, got {metric!r}")
        if bits not in self.bits:
            raise ValueError(f"bits {bits} were not swept; swept: {self.bits}")
        column = self.bits.index(bits)
        return {name: float(self.scores[metric][i, column]) for i, name in enumerate(self.layers)}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "bits": list(self.bits), "num_images": self.num_images,
                "scores": {m: v.tolist() for m, v in self.scores.items()}}


def single_layer_policies(policy: Mapping[str, LayerQuant], layers: Sequence[str],
                          bits: Sequence[int]) -> dict[str, LayerQuant]:
    """``policy`` with a leading axis of size ``len(layers) * len(bits)``: entry (i, j)
    quantizes only ``layers[i]`` at ``bits[j]`` (weights and activations)."""
    unknown = [n for n in layers if n not in policy]
    if unknown:
        raise ValueError(f"layers not in the policy: {', '.join(unknown)}")
    if not layers:
        raise ValueError("no layers to sweep")
    for b in bits:
        numerics.check_bits(b, name="sensitivity bits")
    configs = [(name, b) for name in layers for b in bits]
    stacked = {}
    for name, lq in policy.items():
        on = np.array([n == name for n, _ in configs])
        b = np.array([bb if n == name else 8 for n, bb in configs], np.int32)
        stacked[name] = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (len(configs),) + leaf.shape), lq)._replace(
            w_bits=jnp.asarray(b), a_bits=jnp.asarray(b),
            w_enabled=jnp.asarray(on & bool(lq.w_enabled)), a_enabled=jnp.asarray(on & bool(lq.a_enabled)))
    return stacked


def _forward_recording(model, variables, policy, images, fp_outputs, first_quantized=None):
    """Quantized forward; returns (logits, {layer: per-image squared output difference vs fp_outputs}).

    Without ``fp_outputs`` this is the full-precision pass and records every layer's output
    and its call index (forward order) instead. With ``first_quantized`` (a traced call
    index), layer calls before it return their recorded full-precision output instead of
    computing it: exact, since nothing before the first quantized layer is quantized, and
    it skips about half of the convolutions of a single-layer configuration on average.
    """
    diffs, order = {}, {}

    def record(name, module, call, args, kwargs):
        lq = policy.get(name) if policy is not None else None
        compute = lambda: call(*(apply.quantize_layer_inputs(lq, args) if lq is not None else args), **kwargs)
        if fp_outputs is None:
            out = call(*args, **kwargs)
            if name in order:  # called twice: its output is not one tensor, never skip it
                order[name] = None
            else:
                order[name] = len(order)
            diffs[name] = out
            return out
        recorded = fp_outputs.get(name)
        if first_quantized is not None and recorded is not None and recorded[1] is not None:
            out = jax.lax.cond(recorded[1] < first_quantized, lambda: recorded[0], compute)
        else:
            out = compute()
        if recorded is not None and lq is not None:  # only the quantized layer's own difference is used
            def squared_difference():
                sq = jnp.square(out.astype(jnp.float32) - recorded[0].astype(jnp.float32))
                return jnp.sum(sq, axis=tuple(range(1, sq.ndim)))

            diffs[name] = jax.lax.cond(lq.w_enabled | lq.a_enabled, squared_difference,
                                       lambda: jnp.zeros(out.shape[:1], jnp.float32))
        return out

    with intercept.intercept_calls(record):
        logits = model.apply(variables, images)
    if fp_outputs is None:
        diffs = {name: (out, order[name]) for name, out in diffs.items()}
    return logits.astype(jnp.float32), diffs


def _first_quantized_call(policy: Mapping[str, LayerQuant], recorded: Mapping[str, tuple]) -> jax.Array:
    """The forward-order call index of the first layer ``policy`` quantizes (traced int32)."""
    none = len(recorded)
    first = jnp.asarray(none, jnp.int32)
    for name, lq in policy.items():
        if name in recorded:
            index = recorded[name][1] or 0  # a layer called twice: skip nothing
            first = jnp.minimum(first, jnp.where(lq.w_enabled | lq.a_enabled, index, none))
    return first


def make_sweep(model: nn.Module, layers: Sequence[str], *, chunk_size: int = 8):
    """The compiled sweep ``(variables, stacked_policy, images, labels, mask) -> partial sums``.

    Returns per-config sums over the batch: squared output difference of each swept
    layer's own output, KL, agreement count, loss delta; plus FP output norms.
    """
    layers = tuple(layers)

    @jax.jit
    def sweep(variables, stacked, images, labels, mask):
        fp_logits, recorded = _forward_recording(model, variables, None, images, None)
        fp_outputs = {n: recorded[n][0].astype(jnp.float32) for n in layers}
        fp_logp = jax.nn.log_softmax(fp_logits)
        fp_loss = -jnp.take_along_axis(fp_logp, labels[:, None], axis=-1)[:, 0]
        weights = mask.astype(jnp.float32)

        def one(policy):
            qvars = apply.quantize_weights(variables, policy)
            logits, diffs = _forward_recording(model, qvars, policy, images, recorded,
                                               _first_quantized_call(policy, recorded))
            logp = jax.nn.log_softmax(logits)
            kl = jnp.sum(jnp.exp(fp_logp) * (fp_logp - logp), axis=-1)
            agree = (jnp.argmax(logits, -1) == jnp.argmax(fp_logits, -1)).astype(jnp.float32)
            loss = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
            # Each config quantizes one layer; the others' differences are zero.
            own = sum(diffs[n] for n in layers)
            return {"sq_diff": jnp.sum(own * weights), "kl": jnp.sum(kl * weights), "agree": jnp.sum(agree * weights),
                    "dloss": jnp.sum((loss - fp_loss) * weights)}

        # chunk 1 maps without vmap, so the prefix-skipping cond really branches.
        sums = jax.lax.map(one, stacked, batch_size=chunk_size if chunk_size > 1 else None)
        per_image = lambda a: jnp.sum(jnp.square(a), axis=tuple(range(1, a.ndim)))
        norms = jnp.stack([jnp.sum(per_image(fp_outputs[n]) * weights) for n in layers])
        return sums, norms

    return sweep


def sweep_sensitivity(model: nn.Module, variables: Any, policy: Mapping[str, LayerQuant],
                      batches: Iterable[tuple[np.ndarray, np.ndarray]], *, layers: Sequence[str],
                      bits: Sequence[int] = (4, 6, 8), batch_size: int, chunk_size: int | None = None,
                      mesh: Mesh | None = None, on_batch=None) -> SensitivityResult:
    """Sensitivity of every layer in ``layers`` at every bit width in ``bits``.

    Args:
      model, variables: the full-precision model.
      policy: a calibrated policy (its clips are used; its bits are replaced).
      batches: ``(images, labels)``; labels < 0 mean unlabelled (``delta_loss`` then 0).
      layers: the layers to sweep (e.g. the conv/dense layers).
      bits: bit widths, all in one call.
      batch_size: the largest batch (padded; one compilation).
      chunk_size: configurations evaluated together by ``vmap`` (bounds memory). Default:
        1 on CPU (vmapping conv kernels makes XLA:CPU use slow grouped convolutions:
        4.2x slower at 8, see BUILD_NOTES), 8 on accelerators.
      mesh: devices to shard images over (default all local devices).

    Returns:
      :class:`SensitivityResult` with scores ``[len(layers), len(bits)]`` per metric.

    Short batches are padded and the padding is masked out of every metric.
    """
    model, variables = nnx_model.as_functional(model, variables)
    mesh = mesh or data_mesh()
    if chunk_size is None:
        chunk_size = 1 if jax.default_backend() == "cpu" else 8
    devices = mesh.devices.size
    padded = -(-batch_size // devices) * devices
    stacked = single_layer_policies(policy, layers, bits)
    sweep = make_sweep(model, layers, chunk_size=chunk_size)
    shard = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    variables, stacked = jax.device_put((variables, stacked), replicated)
    totals, norms, seen, labelled = None, None, 0, True
    for images, labels in batches:
        n = len(labels)
        if n > padded:
            raise ValueError(f"a batch of {n} images exceeds batch_size={batch_size}")
        labelled &= bool(np.all(labels >= 0))
        pad = padded - n
        images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
        labels = np.concatenate([np.maximum(labels, 0), np.zeros((pad,), labels.dtype)]).astype(np.int32)
        mask = np.arange(padded) < n
        sums, batch_norms = sweep(variables, stacked, *jax.device_put((images, labels, mask), shard))
        sums, batch_norms = jax.device_get((sums, batch_norms))
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
        norms = batch_norms if norms is None else norms + batch_norms
        seen += n
        if on_batch is not None:
            on_batch(seen)
    if seen == 0:
        raise ValueError("no images for the sensitivity sweep")
    shape = (len(layers), len(bits))
    l2 = np.sqrt(totals["sq_diff"]).reshape(shape)
    scores = {"l2": l2, "rel_l2": l2 / np.sqrt(np.maximum(norms, 1e-30))[:, None],
              "kl": (totals["kl"] / seen).reshape(shape),
              "top1_agreement": (totals["agree"] / seen).reshape(shape),
              "delta_loss": (totals["dloss"] / seen).reshape(shape) if labelled else np.zeros(shape)}
    return SensitivityResult(tuple(layers), tuple(int(b) for b in bits), scores, seen)
