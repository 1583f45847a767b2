"""Quantizers for Vision Transformers beyond the uniform grid, as data in the policy.

Three published remedies for the activations that uniform per-tensor quantization handles
worst in a ViT:

* post-Softmax attention (the first operand of ``attn.av_matmul``): a logarithmic grid,
  base 2 (FQ-ViT, RepQ-ViT) or an adaptive base searched per layer (AdaLog, Wu et al. 2024);
* post-GELU activations (the input of ``mlp.fc2``): the twin-uniform grid of PTQ4ViT
  (Yuan et al., 2022), a fine range near zero and a coarse one for the tail, its split searched;
* post-LayerNorm activations (inputs of ``attn.qkv`` and ``mlp.fc1``), whose channels differ
  in range by orders of magnitude: RepQ-ViT's scale reparameterization (Li et al., 2023),
  per-channel ranges folded into the LayerNorm affine and the next layer's weight rows, so
  that inference stays per-tensor and the FP32 function is unchanged.

Kinds, bases and fine ranges are arrays in :class:`~eqjax.quant.policy.LayerQuant`: one compiled
forward serves every mix of them (see :func:`eqjax.quant.apply.quantize_input`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqjax.quant import apply, intercept
from eqjax.quant.policy import QUANTIZER_KINDS, UNIFORM, LayerQuant, Policy

__all__ = ["SOFTMAX_LAYERS", "GELU_LAYERS", "LOG_BASES", "FINE_RATIOS", "matching_layers", "with_quantizer",
           "search_quantizer", "LayerNormDense", "layernorm_dense_pairs", "reparameterize_layernorms"]

# timm / eqjax names of the layers whose first input is post-Softmax and post-GELU.
SOFTMAX_LAYERS = r".*attn\.av_matmul"
GELU_LAYERS = r".*mlp\.fc2"
# Search candidates: log bases 2^(1/k) (AdaLog) and fine/coarse range ratios 2^-m (twin).
LOG_BASES = tuple(float(2.0 ** (1.0 / k)) for k in (1, 1.5, 2, 3, 4, 6, 8))
FINE_RATIOS = tuple(float(2.0 ** -m) for m in range(1, 8))


def matching_layers(policy: Mapping[str, LayerQuant], pattern: str) -> list[str]:
    """The policy layers whose name fully matches ``pattern``; an error when there are none."""
    names = [n for n in policy if re.fullmatch(pattern, n)]
    if not names:
        raise ValueError(f"no layer of the policy matches {pattern!r} (e.g. {', '.join(list(policy)[:3])})")
    return names


def _with_kinds(lq: LayerQuant) -> LayerQuant:
    """``lq`` with kind arrays (all uniform) if it has none yet."""
    if lq.a_kind is not None:
        return lq
    n = lq.a_clip.shape[0]
    return lq._replace(a_kind=jnp.full((n,), UNIFORM, jnp.int32), a_log_base=jnp.full((n,), 2.0, jnp.float32),
                       a_fine_ratio=jnp.full((n,), jnp.nan, jnp.float32))


def with_quantizer(policy: Mapping[str, LayerQuant], layers: Sequence[str], kind: str, *, index: int = 0,
                   log_base: float | Mapping[str, float] = 2.0,
                   fine_ratio: float | Mapping[str, float] = 1 / 8) -> Policy:
    """A copy of ``policy`` in which input ``index`` of each of ``layers`` uses quantizer ``kind``.

    Args:
      policy: a calibrated policy (clips finite for ``layers``).
      layers: layer names.
      kind: ``uniform``, ``log`` or ``twin``.
      index: which input of the layer call (0: the activation; for ``av_matmul`` the
        attention probabilities).
      log_base: base of ``log`` (> 1), one for all layers or per layer.
      fine_ratio: for ``twin``, the fine range's end as a fraction of the clip, in (0, 1),
        one for all layers or per layer.

    Raises:
      ValueError: an unknown kind; a layer not in the policy or not calibrated; ``log`` on an
        input that calibration saw negative (a signed input); ``twin`` below 3 bits; a base
        <= 1 or a ratio outside (0, 1).
    """
    if kind not in QUANTIZER_KINDS:
        raise ValueError(f"unknown quantizer {kind!r}; known: {', '.join(QUANTIZER_KINDS)}")
    per_layer = lambda v, name: float(v[name] if isinstance(v, Mapping) else v)
    new = dict(policy)
    for name in layers:
        if name not in policy:
            close = intercept.closest_names(name, policy)
            raise ValueError(f"layer {name!r} is not in the policy" + (f" (closest: {', '.join(close)})" if close else ""))
        lq = _with_kinds(policy[name])
        if not 0 <= index < lq.a_clip.shape[0]:
            raise ValueError(f"{name} has {lq.a_clip.shape[0]} activation inputs; input {index} does not exist")
        clip = float(lq.a_clip[index])
        if not np.isfinite(clip):
            raise ValueError(f"{name} is not calibrated (no clip for input {index}): calibrate the policy first")
        base, ratio = per_layer(log_base, name), per_layer(fine_ratio, name)
        if kind == "log":
            if bool(lq.a_signed[index]):
                raise ValueError(f"a log quantizer needs a non-negative input, but calibration saw negative values "
                                 f"at input {index} of {name} (signed grid); use it on post-Softmax inputs")
            if not base > 1:
                raise ValueError(f"log base must be > 1, got {base} for {name}")
        if kind == "twin":
            if int(lq.a_bits) < 3:
                raise ValueError(f"the twin quantizer needs at least 3 activation bits, {name} has {int(lq.a_bits)}")
            if not 0 < ratio < 1:
                raise ValueError(f"twin fine_ratio must be in (0, 1), got {ratio} for {name}")
        new[name] = lq._replace(a_kind=lq.a_kind.at[index].set(QUANTIZER_KINDS[kind]),
                                a_log_base=lq.a_log_base.at[index].set(base if kind == "log" else lq.a_log_base[index]),
                                a_fine_ratio=lq.a_fine_ratio.at[index].set(
                                    ratio if kind == "twin" else lq.a_fine_ratio[index]))
    return new


def search_quantizer(model: nn.Module, variables: Mapping, policy: Mapping[str, LayerQuant],
                     batches: Iterable[Any], layers: Sequence[str], kind: str, *,
                     candidates: Sequence[float] | None = None, index: int = 0) -> tuple[Policy, dict]:
    """Picks, per layer, the log base (``kind='log'``, AdaLog) or twin fine ratio (``'twin'``)
    that minimises the layer's output error ``Σ ||f(x) - f(q(x))||²`` over ``batches``.

    Each layer sees its full-precision input (the rest of the model is not quantized), and
    the output is the layer's own (attention·V for ``av_matmul``, fc2's for post-GELU),
    so the error weighs each quantization error by what the layer does with it.

    Args:
      model, variables: the Flax model and its (full-precision) variables.
      policy: calibrated policy; ``layers`` get ``kind`` (checked as :func:`with_quantizer`).
      batches: image batches [B, H, W, 3] (arrays or (images, labels) pairs).
      layers: the layers to search.
      kind: ``log`` or ``twin``.
      candidates: bases (> 1) or ratios in (0, 1); default :data:`LOG_BASES` / :data:`FINE_RATIOS`.
      index: input of the layer call.

    Returns:
      ``(policy with the best candidate per layer, {layer: {candidate: summed error}})``.
    """
    if kind not in ("log", "twin"):
        raise ValueError(f"search_quantizer searches 'log' bases or 'twin' ratios, not {kind!r}")
    candidates = tuple(candidates or (LOG_BASES if kind == "log" else FINE_RATIOS))
    option = "log_base" if kind == "log" else "fine_ratio"
    trial = [with_quantizer(policy, layers, kind, index=index, **{option: c}) for c in candidates]
    stacked = {n: jax.tree.map(lambda *leaves: jnp.stack(leaves), *[t[n] for t in trial]) for n in layers}

    @jax.jit
    def errors(variables, stacked, images):
        out = {}

        def measure(name, module, call, args, kwargs):
            reference = call(*args, **kwargs)
            if name in stacked:
                per_candidate = []
                for k in range(len(candidates)):
                    lq = jax.tree.map(lambda leaf: leaf[k], stacked[name])
                    quantized = list(args)
                    quantized[index] = apply.quantize_input(lq, index, args[index])
                    diff = _call_again(module, call, quantized, kwargs).astype(jnp.float32) - reference.astype(jnp.float32)
                    per_candidate.append(jnp.sum(jnp.square(diff)))
                out[name] = jnp.stack(per_candidate)
            return reference

        with intercept.intercept_calls(measure):
            model.apply(variables, images)
        return out

    total = {n: np.zeros(len(candidates)) for n in layers}
    for batch in batches:
        for name, e in errors(variables, stacked, jnp.asarray(apply.batch_images(batch))).items():
            total[name] += np.asarray(e, np.float64)
    best = {n: candidates[int(np.argmin(total[n]))] for n in layers}
    report = {n: {f"{c:.6g}": float(e) for c, e in zip(candidates, total[n])} for n in layers}
    return with_quantizer(policy, layers, kind, index=index, **{option: best}), report


def _call_again(module: nn.Module, call, args: Sequence[jax.Array], kwargs: dict) -> jax.Array:
    """The layer's output on other inputs, within the same forward pass. A Dense cannot be
    called twice in one scope (Flax would create its parameters again), so its product is
    written out; parameter-free layers (attention matmuls) are called."""
    if isinstance(module, nn.Dense):
        params = module.variables["params"]
        y = jnp.dot(args[0], params["kernel"].astype(args[0].dtype))
        return y + params["bias"].astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,)) if "bias" in params else y
    if module.variables:
        raise ValueError(f"searching a quantizer for a {type(module).__name__} layer is not supported "
                         "(Dense layers and attention matmuls are)")
    return call(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerNormDense:
    """A LayerNorm whose output is the input of the Dense layers ``dense`` (and nothing else)."""

    norm: str
    dense: tuple[str, ...]


def layernorm_dense_pairs(model: nn.Module, example: Any) -> list[LayerNormDense]:
    """The LayerNorms of ``model`` whose output goes straight into Dense layers, by tracing.

    In a pre-norm transformer block ``norm1`` feeds ``attn.qkv`` and ``norm2`` feeds
    ``mlp.fc1``. The reparameterization assumes the LayerNorm output feeds only these
    layers, as in every timm ViT/DeiT block.
    """
    outputs: dict[int, tuple[str, Any]] = {}
    found: dict[str, list[str]] = {}

    def record(name, module, call, args, kwargs):
        out = call(*args, **kwargs)
        if isinstance(module, nn.LayerNorm):
            outputs[id(out)] = (name, out)
        elif isinstance(module, nn.Dense):
            source = outputs.get(id(args[0]))
            if source is not None and source[1] is args[0]:
                found.setdefault(source[0], []).append(name)
        return out

    example = jax.ShapeDtypeStruct(np.shape(example), getattr(example, "dtype", jnp.float32))
    with intercept.intercept_calls(record, select=lambda m: isinstance(m, (nn.LayerNorm, nn.Dense))):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)
    return [LayerNormDense(norm, tuple(dict.fromkeys(dense))) for norm, dense in found.items()]


def reparameterize_layernorms(model: nn.Module, variables: Mapping, batches: Iterable[Any], *,
                              example: Any) -> tuple[dict, dict[str, np.ndarray]]:
    """RepQ-ViT's scale reparameterization of post-LayerNorm activations (Li et al., 2023, eq. 8).

    For each LayerNorm → Dense pair, with ``s_c`` the largest |value| of output channel ``c``
    over the calibration ``batches`` and ``r_c = s_c / mean(s)``:

        γ' = γ / r,   β' = β / r,   W'[c, :] = r_c · W[c, :]

    so ``LN'(x) W' = LN(x) W`` (the FP32 function is unchanged) while every channel of the
    new activation ``LN'(x) = LN(x) / r`` spans the same range ``mean(s)``: a per-tensor clip
    fits all channels, as a per-channel one did before. Recalibrate the policy afterwards.

    Args:
      model, variables: the Flax model and its full-precision variables.
      batches: calibration image batches (arrays or (images, labels) pairs).
      example: an input batch or ShapeDtypeStruct, for finding the pairs.

    Returns:
      ``(new variables, {layernorm name: r})``.

    Raises:
      ValueError: the model has no LayerNorm → Dense pairs, or a LayerNorm without scale/bias.
    """
    pairs = layernorm_dense_pairs(model, example)
    if not pairs:
        raise ValueError("the model has no LayerNorm whose output feeds a Dense layer; nothing to reparameterize")
    norms = {p.norm for p in pairs}

    @jax.jit
    def channel_absmax(variables, images):
        out = {}

        def record(name, module, call, args, kwargs):
            y = call(*args, **kwargs)
            if name in norms:
                out[name] = jnp.max(jnp.abs(y.astype(jnp.float32)).reshape(-1, y.shape[-1]), axis=0)
            return y

        with intercept.intercept_calls(record, select=lambda m: isinstance(m, nn.LayerNorm)):
            model.apply(variables, images)
        return out

    peak = None
    for batch in batches:
        current = channel_absmax(variables, jnp.asarray(apply.batch_images(batch)))
        peak = current if peak is None else jax.tree.map(jnp.maximum, peak, current)
    if peak is None:
        raise ValueError("no calibration images for the reparameterization")
    out, ratios = dict(variables), {}
    for pair in pairs:
        norm = intercept.module_variables(variables, pair.norm)
        if norm is None or "scale" not in norm or "bias" not in norm:
            raise ValueError(f"LayerNorm {pair.norm} needs a scale and a bias to take the reparameterization")
        s = jnp.maximum(peak[pair.norm], 1e-8)
        r = s / jnp.mean(s)
        out = intercept.replace_module_variable(out, pair.norm, "scale", (norm["scale"] / r).astype(norm["scale"].dtype))
        out = intercept.replace_module_variable(out, pair.norm, "bias", (norm["bias"] / r).astype(norm["bias"].dtype))
        for dense in pair.dense:
            kernel = intercept.module_variables(variables, dense)["kernel"]
            out = intercept.replace_module_variable(out, dense, "kernel", (kernel * r[:, None]).astype(kernel.dtype))
        ratios[pair.norm] = np.asarray(r)
    return out, ratios
