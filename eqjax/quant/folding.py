"""Deployment-faithful PTQ: BatchNorm folded into the preceding conv, and bias correction.

**Folding.** An integer kernel runs ``conv(x, W·f) + b'`` where a Flax model runs
``BN(conv(x, W))`` with ``f = γ / √(σ² + ε)`` per output channel and ``b' = β − f·μ``
(+ ``f·b`` for a conv bias). :func:`fold_batchnorm` rewrites the *variables* so the same model
computes the folded network: the kernel becomes ``W·f`` and the BatchNorm a pure bias add
(``γ = 1``, ``μ = 0``, ``σ² = 1 − ε``, ``β = b'``). The model code is unchanged, so every
quantizer, policy and reconstruction works on it as is.

With per-output-channel symmetric weight scales (eqjax's), quantization commutes with the
fold: ``Q(W·f) = f·Q(W)`` channel by channel (the absmax scale scales by ``|f|`` and rounding
is odd), so folding changes no quantized output beyond float rounding; it matters for where
bias correction writes its correction and for per-tensor weight grids.

**Bias correction** (Nagel et al., ICCV 2019, "empirical" form): quantizing the weights shifts
each output channel's mean by ``δ = E[conv(x, Ŵ − W)]``; subtracting ``δ`` from the layer's
bias (a dense or conv bias, or the mean of the BatchNorm that follows) removes it.
:func:`correct_bias` measures ``δ`` on calibration images, with ``x`` the full-precision
input of every layer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqjax.quant import intercept
from eqjax.quant.policy import LayerQuant

# Layers a BatchNorm folds into: the kernel's last axis is its output channel.
FOLDABLE_TYPES = (nn.Conv, nn.Dense)

__all__ = ["ConvBatchNorm", "conv_batchnorm_pairs", "batchnorm_factors", "fold_batchnorm", "fold_pairs", "bias_shifts", "correct_bias"]


@dataclasses.dataclass(frozen=True)
class ConvBatchNorm:
    """A conv (or dense) layer whose output goes straight into a BatchNorm."""

    layer: str
    batchnorm: str
    epsilon: float


def conv_batchnorm_pairs(model: nn.Module, example: Any) -> list[ConvBatchNorm]:
    """The (layer, BatchNorm) pairs of ``model``, found by tracing on inputs shaped like ``example``.

    A pair is a BatchNorm call whose input *is* the output of a conv or dense call.
    """
    outputs: dict[int, tuple[str, Any]] = {}  # id(output) -> (layer, output: kept alive for the id)
    pairs: list[ConvBatchNorm] = []

    def record(name, module, call, args, kwargs):
        out = call(*args, **kwargs)
        if isinstance(module, nn.BatchNorm):
            source = outputs.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                pairs.append(ConvBatchNorm(source[0], name, float(module.epsilon)))
        elif isinstance(module, FOLDABLE_TYPES):
            outputs[id(out)] = (name, out)
        return out

    example = jax.ShapeDtypeStruct(np.shape(example), getattr(example, "dtype", jnp.float32))
    with intercept.intercept_calls(record, select=lambda m: isinstance(m, FOLDABLE_TYPES + (nn.BatchNorm,))):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)
    return list(dict.fromkeys(pairs))


def _channel_shape(kernel: jax.Array) -> tuple[int, ...]:
    return (1,) * (kernel.ndim - 1) + (-1,)


def batchnorm_factors(variables: Mapping, pairs: Iterable[ConvBatchNorm]) -> dict[str, jax.Array]:
    """``{layer: f}`` with ``f = γ / √(σ² + ε)`` [out] of the BatchNorm after each layer of ``pairs``.

    Raises:
      ValueError: a BatchNorm without a learned bias (``use_bias=False``) or running statistics,
        which cannot be folded.
    """
    factors = {}
    for pair in pairs:
        norm = intercept.module_variables(variables, pair.batchnorm)
        stats = intercept.module_variables(variables, pair.batchnorm, collection="batch_stats")
        if norm is None or "bias" not in norm or stats is None:
            raise ValueError(f"cannot fold BatchNorm {pair.batchnorm}: it needs a bias parameter and "
                             "running statistics (batch_stats)")
        var = stats["var"].astype(jnp.float32)
        gamma = norm["scale"].astype(jnp.float32) if "scale" in norm else jnp.ones_like(var)
        factors[pair.layer] = gamma * jax.lax.rsqrt(var + pair.epsilon)
    return factors


def fold_batchnorm(model: nn.Module, variables: Mapping, example: Any) -> tuple[dict, list[ConvBatchNorm]]:
    """``variables`` with every BatchNorm folded into the conv/dense layer before it.

    Args:
      model, variables: a Flax model in inference mode and its variables
        (``params`` and ``batch_stats``).
      example: an input batch (array or ShapeDtypeStruct), for tracing.

    Returns:
      ``(folded variables, pairs)``: the same model computes the same function (to float
      rounding) with kernels ``W·f`` and each BatchNorm reduced to a bias add.

    Raises:
      ValueError: a BatchNorm without a learned bias (``use_bias=False``), which cannot hold
        the folded shift.
    """
    pairs = conv_batchnorm_pairs(model, example)
    return fold_pairs(variables, pairs), pairs


def fold_pairs(variables: Mapping, pairs: Iterable[ConvBatchNorm]) -> dict:
    """``variables`` with the BatchNorm of each of ``pairs`` folded into its layer (as
    :func:`fold_batchnorm`, for pairs found once); a pure function, differentiable in the
    parameters (quantization-aware training folds with it in every step)."""
    pairs = tuple(pairs)
    factors = batchnorm_factors(variables, pairs)
    out = dict(variables)
    for pair in pairs:
        layer = intercept.module_variables(variables, pair.layer)
        norm = intercept.module_variables(variables, pair.batchnorm)
        stats = intercept.module_variables(variables, pair.batchnorm, collection="batch_stats")
        factor = factors[pair.layer]
        shift = norm["bias"].astype(jnp.float32) - factor * stats["mean"].astype(jnp.float32)
        kernel = layer["kernel"]
        out = intercept.replace_module_variable(
            out, pair.layer, "kernel", (kernel.astype(jnp.float32) * factor.reshape(_channel_shape(kernel))).astype(kernel.dtype))
        if "bias" in layer:
            shift = shift + factor * layer["bias"].astype(jnp.float32)
            out = intercept.replace_module_variable(out, pair.layer, "bias", jnp.zeros_like(layer["bias"]))
        if "scale" in norm:
            out = intercept.replace_module_variable(out, pair.batchnorm, "scale", jnp.ones_like(norm["scale"]))
        out = intercept.replace_module_variable(out, pair.batchnorm, "bias", shift.astype(norm["bias"].dtype))
        out = intercept.replace_module_variable(out, pair.batchnorm, "mean", jnp.zeros_like(stats["mean"]),
                                                collection="batch_stats")
        out = intercept.replace_module_variable(out, pair.batchnorm, "var",
                                                jnp.full_like(stats["var"], 1.0 - pair.epsilon),
                                                collection="batch_stats")
    return out


def bias_shifts(model: nn.Module, variables: Mapping, quantized_variables: Mapping,
                layers: Iterable[str], batches: Iterable[jax.Array]) -> dict[str, np.ndarray]:
    """``δ = E[layer(x; Ŵ − W)]`` per output channel [out] of each of ``layers``.

    ``x`` is the layer's input in the full-precision model, ``Ŵ`` its kernel in
    ``quantized_variables``; the mean runs over the images and every spatial position.
    """
    layers = tuple(layers)
    deltas = {n: (intercept.module_variables(quantized_variables, n)["kernel"].astype(jnp.float32)
                  - intercept.module_variables(variables, n)["kernel"].astype(jnp.float32)) for n in layers}

    @jax.jit
    def batch_sums(variables, deltas, images):
        """Per layer: the sum over rows (images × positions) of layer(x; Ŵ − W) [out], and the rows."""
        sums, rows, busy = {}, {}, []

        def record(name, module, call, args, kwargs):
            if busy or name not in deltas or name in sums:
                return call(*args, **kwargs)
            params = {k: jnp.zeros_like(v) for k, v in module.variables["params"].items()}
            params["kernel"] = deltas[name].astype(params["kernel"].dtype)
            busy.append(name)  # the error layer's own call goes straight through
            shifted = module.clone(parent=None, name=None).apply({"params": params}, *args, **kwargs)
            busy.pop()
            sums[name] = jnp.sum(shifted.astype(jnp.float32).reshape(-1, shifted.shape[-1]), axis=0)
            rows[name] = shifted.size // shifted.shape[-1]
            return call(*args, **kwargs)

        with intercept.intercept_calls(record):
            model.apply(variables, images)
        return sums, rows

    totals: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for images in batches:
        sums, rows = batch_sums(variables, deltas, images)
        for name, s in sums.items():
            totals[name] = totals.get(name, 0.0) + np.asarray(s, np.float64)
            counts[name] = counts.get(name, 0) + int(rows[name])
    missing = [n for n in layers if n not in totals]
    if missing:
        raise ValueError(f"no calibration images, or layers the model never called: {', '.join(missing[:5])}")
    return {n: (totals[n] / counts[n]).astype(np.float32) for n in layers}


def correct_bias(model: nn.Module, variables: Mapping, quantized_variables: Mapping,
                 policy: Mapping[str, LayerQuant], batches: Iterable[jax.Array], *,
                 example: Any) -> tuple[dict, dict[str, str]]:
    """``quantized_variables`` with each weight-quantized layer's output mean shift removed.

    Args:
      model, variables: the full-precision model.
      quantized_variables: the same variables with quantized kernels (e.g. from
        :func:`eqjax.quant.apply.quantize_weights` or reconstruction).
      policy: which layers have quantized weights (``w_enabled``).
      batches: calibration images ``[B, H, W, C]``.
      example: an input batch, for tracing the conv → BatchNorm pairs.

    Returns:
      ``(corrected variables, where)``: ``where[layer]`` is ``'batchnorm'`` (the correction
      went into the running mean of the BatchNorm after it), ``'bias'``, or ``'none'`` for a
      layer with neither (left as it is).
    """
    followed_by = {p.layer: p.batchnorm for p in conv_batchnorm_pairs(model, example)}
    layers = [n for n, lq in policy.items() if bool(lq.w_enabled)
              and "kernel" in (intercept.module_variables(variables, n) or {})]
    shifts = bias_shifts(model, variables, quantized_variables, layers, batches)
    out, where = dict(quantized_variables), {}
    for name, delta in shifts.items():
        if name in followed_by:  # BN(y − δ) = BN'(y) with mean μ + δ
            stats = intercept.module_variables(out, followed_by[name], collection="batch_stats")
            out = intercept.replace_module_variable(out, followed_by[name], "mean",
                                                    (stats["mean"] + delta).astype(stats["mean"].dtype),
                                                    collection="batch_stats")
            where[name] = "batchnorm"
        elif "bias" in intercept.module_variables(out, name):
            bias = intercept.module_variables(out, name)["bias"]
            out = intercept.replace_module_variable(out, name, "bias", (bias - delta).astype(bias.dtype))
            where[name] = "bias"
        else:
            where[name] = "none"
    return out, where
