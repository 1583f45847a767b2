"""Run ANY Flax model under a quantization policy, without editing the model (Linen; NNX through
:mod:`eqjax.quant.nnx_model`).

* Weights: :func:`quantize_weights` fake-quantizes every policy layer's ``kernel`` per
  output channel as a pure map over params: along the last axis (HWIO convs, [in, out]
  dense), or along the axes of ``LayerQuant.w_channel_axes`` (``DenseGeneral`` features,
  ``Einsum`` output letters; :func:`kernel_scale`).
* Activations: :func:`quantized_apply` intercepts each quantizable call (the weighted
  layers and attention matmuls of :mod:`eqjax.quant.layers`) and fake-quantizes its inputs
  per tensor with the policy's calibrated clip, signed or unsigned grid.
* Calibration: :func:`collect_activation_stats` accumulates per-layer input statistics
  of the full-precision model over batches.

Bits, clips and switches are arrays in the policy: changing them never recompiles.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqjax.quant import calibration, intercept, numerics
from eqjax.quant.intercept import LayerCall
from eqjax.quant.policy import LOG, TWIN, LayerQuant

__all__ = ["batch_images", "channel_axes", "channel_shape", "kernel_scale", "check_weighted_layers", "quantize_weights", "quantize_input", "quantize_layer_inputs", "quantized_apply", "collect_activation_stats", "init_activation_stats"]


def batch_images(batch: Any) -> jax.Array:
    """The images of a batch given as ``images`` or ``(images, labels)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def channel_axes(lq: LayerQuant, kernel_ndim: int) -> tuple[int, ...]:
    """The kernel axes of ``lq``'s output channels (the last axis unless ``w_channel_axes`` says)."""
    return (kernel_ndim - 1,) if lq.w_channel_axes is None else lq.w_channel_axes.axes


def channel_shape(kernel_shape: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The shape that a flat per-channel scale [prod(kernel_shape[axes])] takes to broadcast against
    the kernel: the kernel's sizes along ``axes``, 1 elsewhere."""
    return tuple(size if axis in axes else 1 for axis, size in enumerate(kernel_shape))


def kernel_scale(kernel: jax.Array, bits: Any, *, axes: Sequence[int], method: str = "absmax") -> jax.Array:
    """Per-output-channel weight scales (eq. 4 for ``absmax``) of ``kernel``, flat [prod(kernel.shape[axes])]
    in row-major order of ``axes``; reshape with :func:`channel_shape` to broadcast."""
    axes = tuple(axes)
    if axes == (kernel.ndim - 1,):
        return calibration.estimate_scale(kernel, bits, method=method, axis=-1)
    others = [a for a in range(kernel.ndim) if a not in axes]
    channels = int(np.prod([kernel.shape[a] for a in axes]))
    flat = jnp.transpose(kernel, others + list(axes)).reshape(-1, channels)
    return calibration.estimate_scale(flat, bits, method=method, axis=-1)


def quantize_weights(variables: Mapping, policy: Mapping[str, LayerQuant], *,
                     method: str = "absmax", scales: Mapping[str, jax.Array] | None = None) -> dict:
    """Variables with each weighted policy layer's kernel fake-quantized per output channel.

    Args:
      variables: ``{'params': ..., ...}`` whose module paths are the policy's names.
      policy: ``{name: LayerQuant}``; layers with ``w_enabled`` False are left as they are.
      method: weight scale estimator, ``absmax`` (eq. 4), ``percentile`` or ``mse``.
      scales: per-output-channel scales (flat, as :func:`kernel_scale` gives) for some layers
        (e.g. optimized by :mod:`eqjax.algorithms.ranking`); they replace the estimator and
        receive gradients (LSQ).

    Returns:
      Variables of the same structure (jit-compatible; bits may be traced).

    Raises:
      ValueError: weight scales for layers the policy lacks; a policy layer with quantized
        weights (concretely ``w_enabled``) and no kernel in ``variables``.
    """
    calibration._check_method(method)
    scales = scales or {}
    unknown = [n for n in scales if n not in policy]
    if unknown:
        raise ValueError(f"weight scales for layers not in the policy: {', '.join(unknown)}")
    check_weighted_layers(variables, policy)
    out = dict(variables)
    for name, lq in policy.items():
        module = intercept.module_variables(variables, name)
        if module is None or "kernel" not in module:
            continue  # a parameter-free layer (attention matmul): its w_enabled is False
        kernel = module["kernel"]
        axes = channel_axes(lq, kernel.ndim)
        if name in scales:
            scale = jnp.asarray(scales[name], jnp.float32)
        else:
            scale = jax.lax.stop_gradient(kernel_scale(kernel, lq.w_bits, axes=axes, method=method))
        q_min, q_max = numerics.quant_range(lq.w_bits, dtype=jnp.float32)
        quantized = numerics.fake_quant(kernel.astype(jnp.float32), scale.reshape(channel_shape(kernel.shape, axes)),
                                        q_min.reshape((1,) * kernel.ndim),
                                        q_max.reshape((1,) * kernel.ndim)).astype(kernel.dtype)
        out = intercept.replace_module_variable(out, name, "kernel", jnp.where(lq.w_enabled, quantized, kernel))
    return out


def check_weighted_layers(variables: Mapping, policy: Mapping[str, LayerQuant]) -> None:
    """Raises ValueError when a policy layer with quantized weights has no kernel in ``variables``.

    Parameter-free layers (attention matmuls) have ``w_enabled`` False. Entries whose
    ``w_enabled`` is traced are left to :func:`quantized_apply`, which checks every policy
    name against the layers the model calls, while tracing.
    """
    for name, lq in policy.items():
        module = intercept.module_variables(variables, name)
        if module is not None and "kernel" in module:
            continue
        if not isinstance(lq.w_enabled, jax.core.Tracer) and bool(np.any(lq.w_enabled)):
            close = intercept.closest_names(name, _kernel_names(variables))
            raise ValueError(f"policy layer {name!r} has no kernel in the model's params"
                             + (f" (closest: {', '.join(close)})" if close else ""))


def _kernel_names(variables: Mapping) -> list[str]:
    """Dotted paths of every module with a ``kernel`` in ``variables['params']``."""
    return [".".join(p.key for p in path[1:-1])
            for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
            if getattr(path[-1], "key", None) == "kernel" and getattr(path[0], "key", None) == "params"]


def quantize_input(lq: LayerQuant, index: int, x: jax.Array, bits: Any = None) -> jax.Array:
    """Input ``index`` of a layer call fake-quantized per tensor by ``lq`` (whether or not
    ``lq.a_enabled``), with the quantizer that ``lq.a_kind[index]`` names.

    ``UNIFORM``: clip ``a_clip`` on the signed or unsigned grid (``a_signed``), shifted by
    ``a_offset`` when the policy has offsets. ``LOG``: the
    log quantizer of base ``a_log_base``. ``TWIN``: coarse range ``a_clip``, fine range
    ``a_clip * a_fine_ratio``. The kind is data: one compiled function serves every mix of kinds in
    layers that have kinds (``a_kind`` not None). ``bits`` overrides ``lq.a_bits``.
    """
    bits = lq.a_bits if bits is None else bits
    if lq.a_offset is None:
        out = numerics.quantize_clipped(x, bits, lq.a_clip[index], signed=lq.a_signed[index])
    else:  # LSQ+: the grid shifted by its offset (gradient to the offset where x clamps)
        offset = lq.a_offset[index].astype(x.dtype)
        out = numerics.quantize_clipped(x - offset, bits, lq.a_clip[index], signed=lq.a_signed[index]) + offset
    if lq.a_kind is not None:
        kind = lq.a_kind[index]
        # Unselected branches get valid parameters: their zero cotangents then stay zero (0 * NaN is not).
        base = jnp.where(kind == LOG, lq.a_log_base[index], 2.0)
        ratio = jnp.where(kind == TWIN, lq.a_fine_ratio[index], 0.5)
        log = numerics.log_quantize_clipped(x, bits, lq.a_clip[index], base)
        twin = numerics.twin_quantize_clipped(x, bits, lq.a_clip[index], lq.a_clip[index] * ratio)
        out = jnp.where(kind == LOG, log, jnp.where(kind == TWIN, twin, out))
    return out


def quantize_layer_inputs(lq: LayerQuant, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    """The activation inputs of one layer call, fake-quantized per tensor by ``lq``.

    Input i uses :func:`quantize_input`; inputs beyond the policy's count pass through;
    ``lq.a_enabled`` False returns them unchanged (as data).
    """
    out = list(inputs)
    for i in range(lq.a_clip.shape[0]):
        out[i] = jnp.where(lq.a_enabled, quantize_input(lq, i, out[i]), out[i])
    return out


def quantized_apply(model: nn.Module, variables: Mapping, policy: Mapping[str, LayerQuant],
                    *args, quantize_kernels: bool = True, weight_method: str = "absmax",
                    input_quantizer: Callable[[str, LayerQuant, Sequence[jax.Array]], Sequence[jax.Array]] | None = None,
                    **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with weights and layer inputs fake-quantized.

    Args:
      model: any Flax linen module whose layers the policy names (timm names for eqjax models).
      variables: full-precision variables (or already quantized ones with
        ``quantize_kernels=False``, to quantize weights once for many batches).
      policy: ``{name: LayerQuant}`` with calibrated clips for enabled layers.
      quantize_kernels: apply :func:`quantize_weights` first.
      weight_method: estimator for weight scales.
      input_quantizer: ``(name, lq, inputs) -> inputs`` quantizes the inputs of each policy layer's
        call instead of :func:`quantize_layer_inputs` (e.g. a mixture over candidate widths,
        :mod:`eqjax.algorithms.width_search`).

    Returns:
      Whatever ``model.apply`` returns (logits).

    Raises:
      ValueError (while tracing): a policy entry that names no layer the model called, or a
        quantizable layer the model called without a policy entry (names and closest matches).
    """
    if quantize_kernels:
        variables = quantize_weights(variables, policy, method=weight_method)
    seen: list[str] = []
    quantize = input_quantizer or (lambda name, lq, inputs: quantize_layer_inputs(lq, inputs))

    def quantize_inputs(name, module, call, call_args, call_kwargs):
        seen.append(name)
        lq = policy.get(name)
        return call(*(call_args if lq is None else quantize(name, lq, call_args)), **call_kwargs)

    with intercept.intercept_calls(quantize_inputs):
        out = model.apply(variables, *args, **kwargs)
    # Checked while tracing (no cost per call): a misspelt or stale name never runs unquantized.
    intercept.check_layer_names(policy, dict.fromkeys(seen), prefix="policy does not match the model",
                                missing_label="model layers missing from the policy")
    return out


def init_activation_stats(calls: Iterable[LayerCall], *, num_bins: int = 2048) -> dict:
    """Empty statistics ``{name: (RunningStats per input, ...)}`` for the given layer calls."""
    return {c.name: tuple(calibration.init_stats(num_bins) for _ in c.input_shapes) for c in calls}


def collect_activation_stats(model: nn.Module, variables: Mapping, batches: Iterable[Any],
                             stats: Mapping[str, tuple], *,
                             on_batch: Callable[[int], None] | None = None) -> dict:
    """Accumulates the inputs of every layer in ``stats`` over full-precision forwards.

    Args:
      model: the Flax module (run in inference mode: BatchNorm uses running averages).
      variables: its full-precision variables.
      batches: iterable of input arrays [batch, ...] (one compilation per distinct shape).
      stats: from :func:`init_activation_stats`.
      on_batch: called with the number of images seen, for progress output.

    Returns:
      Updated statistics, same structure.
    """

    @jax.jit
    def step(variables, stats, images):
        new = dict(stats)

        def record(name, module, call, call_args, call_kwargs):
            if name in new:
                new[name] = tuple(calibration.update_stats(s, a) for s, a in zip(new[name], call_args))
            return call(*call_args, **call_kwargs)

        with intercept.intercept_calls(record):
            model.apply(variables, images)
        return new

    seen = 0
    stats = dict(stats)
    for images in batches:
        stats = step(variables, stats, jnp.asarray(images))
        seen += len(images)
        if on_batch is not None:
            on_batch(seen)
    if seen == 0:
        raise ValueError("no calibration images")
    return stats
