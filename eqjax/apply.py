"""Run ANY Flax linen model under a quantization policy, without editing the model.

* Weights: :func:`quantize_weights` fake-quantizes every policy layer's ``kernel`` per
  output channel (last axis: HWIO convs, [in, out] dense) as a pure map over params.
* Activations: :func:`quantized_apply` intercepts each quantizable call (``nn.Conv``,
  ``nn.Dense``, :class:`~eqjax.intercept.ActivationMatmul`) and fake-quantizes its
  inputs per tensor with the policy's calibrated clip, signed or unsigned grid.
* Calibration: :func:`collect_activation_stats` accumulates per-layer input statistics
  of the full-precision model over batches.

Bits, clips and switches are arrays in the policy: changing them never recompiles.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from eqjax import calibration, numerics
from eqjax.intercept import LayerCall, is_quantizable, layer_name
from eqjax.policy import LayerQuant

__all__ = ["quantize_weights", "quantize_layer_inputs", "quantized_apply", "collect_activation_stats", "init_activation_stats"]


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Mapping, path: Sequence[str], value: Any) -> dict:
    """A copy of nested dict ``tree`` with ``tree[path] = value`` (shares untouched branches)."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = _replace(tree[path[0]], path[1:], value)
    return new


def quantize_weights(variables: Mapping, policy: Mapping[str, LayerQuant], *,
                     method: str = "absmax", scales: Mapping[str, jax.Array] | None = None) -> dict:
    """Variables with each weighted policy layer's kernel fake-quantized per output channel.

    Args:
      variables: ``{'params': ..., ...}`` whose module paths are the policy's names.
      policy: ``{name: LayerQuant}``; layers with ``w_enabled`` False are left as they are.
      method: weight scale estimator, ``absmax`` (eq. 4), ``percentile`` or ``mse``.
      scales: per-output-channel scales [out] for some layers (e.g. optimized by
        :mod:`eqjax.ranking`); they replace the estimator and receive gradients (LSQ).

    Returns:
      Variables of the same structure (jit-compatible; bits may be traced).
    """
    calibration._check_method(method)
    scales = scales or {}
    out = dict(variables)
    for name, lq in policy.items():
        path = ("params", *name.split("."), "kernel")
        try:
            kernel = _get(variables, path)
        except (KeyError, TypeError):
            continue  # attention matmuls have no kernel (their w_enabled is False)
        if name in scales:
            scale = jnp.asarray(scales[name], jnp.float32)
        else:
            scale = jax.lax.stop_gradient(
                calibration.estimate_scale(kernel, lq.w_bits, method=method, axis=-1))
        q_min, q_max = numerics.quant_range(lq.w_bits, dtype=jnp.float32)
        shape = (1,) * (kernel.ndim - 1) + (-1,)
        quantized = numerics.fake_quant(kernel.astype(jnp.float32), scale.reshape(shape),
                                        q_min.reshape((1,) * kernel.ndim),
                                        q_max.reshape((1,) * kernel.ndim)).astype(kernel.dtype)
        out = _replace(out, path, jnp.where(lq.w_enabled, quantized, kernel))
    return out


def quantize_layer_inputs(lq: LayerQuant, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    """The activation inputs of one layer call, fake-quantized per tensor by ``lq``.

    Input i uses clip ``lq.a_clip[i]`` and grid ``lq.a_signed[i]``; inputs beyond the
    policy's count pass through; ``lq.a_enabled`` False returns them unchanged (as data).
    """
    out = list(inputs)
    for i in range(lq.a_clip.shape[0]):
        q = numerics.quantize_clipped(out[i], lq.a_bits, lq.a_clip[i], signed=lq.a_signed[i])
        out[i] = jnp.where(lq.a_enabled, q, out[i])
    return out


def quantized_apply(model: nn.Module, variables: Mapping, policy: Mapping[str, LayerQuant],
                    *args, quantize_kernels: bool = True, weight_method: str = "absmax",
                    **kwargs) -> Any:
    """``model.apply(variables, *args, **kwargs)`` with weights and layer inputs fake-quantized.

    Args:
      model: any Flax linen module whose layers the policy names (timm names for eqjax models).
      variables: full-precision variables (or already quantized ones with
        ``quantize_kernels=False``, to quantize weights once for many batches).
      policy: ``{name: LayerQuant}`` with calibrated clips for enabled layers.
      quantize_kernels: apply :func:`quantize_weights` first.
      weight_method: estimator for weight scales.

    Returns:
      Whatever ``model.apply`` returns (logits).
    """
    if quantize_kernels:
        variables = quantize_weights(variables, policy, method=weight_method)

    def interceptor(next_fun, call_args, call_kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not is_quantizable(module):
            return next_fun(*call_args, **call_kwargs)
        lq = policy.get(layer_name(module))
        if lq is None:
            return next_fun(*call_args, **call_kwargs)
        return next_fun(*quantize_layer_inputs(lq, call_args), **call_kwargs)

    with nn.intercept_methods(interceptor):
        return model.apply(variables, *args, **kwargs)


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

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name == "__call__" and is_quantizable(module):
                name = layer_name(module)
                if name in new:
                    new[name] = tuple(calibration.update_stats(s, a) for s, a in zip(new[name], call_args))
            return next_fun(*call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
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
