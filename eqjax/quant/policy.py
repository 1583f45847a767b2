"""Per-layer quantization policy: a pytree of arrays keyed by timm layer name.

A policy is ``dict[str, LayerQuant]``. Every field is an array, so one compiled
forward serves every policy, ``vmap`` sweeps stacked policies and ``grad`` reaches
the clipping values. Constructors build it from uniform bits, the study's rule of
keeping the first and last layer at 8 bits, and ``(regex, bits)`` rules (first match
wins, as in qwix / big_vision).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eqjax.quant import calibration, intercept, numerics
from eqjax.quant.intercept import LayerCall

__all__ = ["LayerQuant", "ChannelAxes", "Policy", "UNIFORM", "LOG", "TWIN", "QUANTIZER_KINDS", "build", "validate", "with_activation_clips", "bits_table",
           "set_bits", "is_calibrated", "uncalibrated_layers", "check_calibrated"]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ChannelAxes:
    """The kernel axes of a layer's output channels, as static structure (no leaves).

    ``LayerQuant.w_channel_axes`` holds one for kernels whose output channels are not just
    the last axis (``DenseGeneral`` with several features, ``Einsum``, a ``ConvTranspose``
    with ``transpose_kernel``): one weight scale per index along ``axes``. It lives in the
    pytree's structure, so bits and scales stay data and ``vmap`` over stacked policies works.
    """

    axes: tuple[int, ...]


class LayerQuant(NamedTuple):
    """How one layer is quantized. Shapes in brackets; ``n`` = number of activation inputs
    (1 for conv/dense, 2 for an attention matmul).

    Attributes:
      w_bits: int32 [] weight bits (per output channel, absmax or a chosen estimator).
      a_bits: int32 [] activation bits (per tensor).
      w_enabled: bool [] quantize the weight (False for matmuls, which have none).
      a_enabled: bool [] quantize the activation inputs.
      a_clip: float32 [n] calibrated clipping value of each input (NaN until calibrated).
      a_signed: bool [n] signed grid, or unsigned (0..2^b-1) for non-negative inputs.
      a_kind: None (every input on the uniform grid of eqs. 3-4, the default), or int32 [n]:
        the quantizer of each input, ``UNIFORM``, ``LOG`` (post-Softmax:
        :func:`~eqjax.quant.numerics.log_quantize_clipped`) or ``TWIN`` (post-GELU:
        :func:`~eqjax.quant.numerics.twin_quantize_clipped`); see :mod:`eqjax.algorithms.vit_quant`. A layer
        with kinds computes all three quantizers and selects by data, so changing kinds,
        bases or bits never recompiles; layers without pay for the uniform one only.
      a_log_base: None, or float32 [n] base of a ``LOG`` input (2 = log2; ignored otherwise).
      a_fine_ratio: None, or float32 [n] end of the fine range of a ``TWIN`` input, as a fraction
        of ``a_clip`` (so a learned clip moves both ranges).
      w_channel_axes: None (one weight scale per index of the kernel's last axis), or the
        :class:`ChannelAxes` of a kernel whose output channels span other axes.
      a_offset: None (grids centred on zero), or float32 [n] the offset ``β`` of each uniform input's
        grid, ``x_hat = β + s * clamp(round((x - β) / s), q_min, q_max)`` (LSQ+'s asymmetric grid,
        learned by :mod:`eqjax.algorithms.qat`; ``β = 0`` is the symmetric grid).
    """

    w_bits: jax.Array
    a_bits: jax.Array
    w_enabled: jax.Array
    a_enabled: jax.Array
    a_clip: jax.Array
    a_signed: jax.Array
    a_kind: jax.Array | None = None
    a_log_base: jax.Array | None = None
    a_fine_ratio: jax.Array | None = None
    w_channel_axes: ChannelAxes | None = None
    a_offset: jax.Array | None = None


# Values of LayerQuant.a_kind.
UNIFORM, LOG, TWIN = 0, 1, 2
QUANTIZER_KINDS = {"uniform": UNIFORM, "log": LOG, "twin": TWIN}

Policy = dict[str, LayerQuant]
BitsRule = tuple[str, Any]  # (regex, bits) or (regex, (w_bits, a_bits))


def _pair(bits: Any, what: str) -> tuple[int, int]:
    w, a = (bits, bits) if not isinstance(bits, (tuple, list)) else tuple(bits)
    numerics.check_bits(w, name=f"{what} weight bits")
    numerics.check_bits(a, name=f"{what} activation bits")
    return int(w), int(a)


def _channel_axes(call: LayerCall) -> ChannelAxes | None:
    """The call's kernel output axes when they are not the last axis alone (else None)."""
    if call.kernel_out_axes is None or call.kernel_out_axes == (len(call.kernel_shape) - 1,):
        return None
    return ChannelAxes(tuple(call.kernel_out_axes))


def _layer(w_bits: int, a_bits: int, num_inputs: int, weighted: bool, enabled: bool = True,
           channel_axes: ChannelAxes | None = None) -> LayerQuant:
    return LayerQuant(jnp.int32(w_bits), jnp.int32(a_bits), jnp.asarray(weighted and enabled),
                      jnp.asarray(enabled), jnp.full((num_inputs,), jnp.nan, jnp.float32),
                      jnp.ones((num_inputs,), bool), w_channel_axes=channel_axes)


def build(calls: Sequence[LayerCall], *, w_bits: int, a_bits: int | None = None,
          keep_first_last_bits: int | None = 8, rules: Iterable[BitsRule] = (),
          quantize_matmuls: bool = True) -> Policy:
    """A policy for the layers of a traced model (``ModelSpec.trace()`` / ``trace_layers``).

    Precedence: ``rules`` (first match wins) > first/last layer > uniform bits.

    Args:
      calls: the model's quantizable layer calls.
      w_bits: weight bits of every layer.
      a_bits: activation bits (default ``w_bits``).
      keep_first_last_bits: bits of the first and last conv/dense layer (weights and
        activations), the study's default 8; None quantizes them like the rest.
      rules: ``(regex, bits)`` or ``(regex, (w_bits, a_bits))`` on layer names; a rule
        that matches no layer is an error (a misspelt rule never goes unnoticed).
      quantize_matmuls: quantize the operands of attention matmuls (at ``a_bits``).

    Returns:
      ``{layer name: LayerQuant}`` in call order, activation clips not yet calibrated.
    """
    a_bits = w_bits if a_bits is None else a_bits
    default = _pair((w_bits, a_bits), "uniform")
    edge = None if keep_first_last_bits is None else _pair(keep_first_last_bits, "first/last layer")
    compiled = [(re.compile(pattern), _pair(bits, f"rule {pattern!r}")) for pattern, bits in rules]
    weighted = [c.name for c in calls if c.kind != "matmul"]
    if not weighted:
        raise ValueError("the model has no conv/dense layers to quantize")
    edges = {weighted[0], weighted[-1]}
    used_rules = set()
    policy: Policy = {}
    for call in calls:
        if call.name in policy:
            continue
        bits = default
        if edge is not None and call.name in edges:
            bits = edge
        for pattern, rule_bits in compiled:
            if pattern.fullmatch(call.name) or pattern.search(call.name):
                bits = rule_bits
                used_rules.add(pattern.pattern)
                break
        is_matmul = call.kind == "matmul"
        policy[call.name] = _layer(bits[0], bits[1], len(call.input_shapes), not is_matmul,
                                   enabled=quantize_matmuls or not is_matmul, channel_axes=_channel_axes(call))
    unused = [pattern.pattern for pattern, _ in compiled if pattern.pattern not in used_rules]
    if unused:
        names = list(policy)
        described = [p + (f" (closest layers: {', '.join(close)})"
                          if (close := intercept.closest_names(p, names)) else "") for p in unused]
        raise ValueError(f"bits rules that match no layer of the model: {'; '.join(described)}")
    return policy


def validate(policy: Mapping[str, LayerQuant], layer_names: Iterable[str]) -> None:
    """Raises ValueError listing layers the policy names but the model lacks, and vice versa."""
    intercept.check_layer_names(policy, layer_names, prefix="policy does not match the model",
                                missing_label="model layers missing from the policy")


def set_bits(policy: Policy, bits: Mapping[str, Any]) -> Policy:
    """A copy with ``{name: bits or (w_bits, a_bits)}`` changed (clips kept: they are bit-free
    for absmax/percentile; recalibrate after changing bits with the ``mse`` method)."""
    unknown = [n for n in bits if n not in policy]
    if unknown:
        raise ValueError(f"set_bits: layers not in the policy ({len(unknown)}): {', '.join(unknown)}")
    new = dict(policy)
    for name, b in bits.items():
        w, a = _pair(b, name)
        new[name] = new[name]._replace(w_bits=jnp.int32(w), a_bits=jnp.int32(a))
    return new


def uncalibrated_layers(policy: Mapping[str, LayerQuant]) -> list[str]:
    """The enabled layers without finite activation clips (concrete policies only)."""
    return [name for name, lq in policy.items()
            if bool(lq.a_enabled) and not bool(np.all(np.isfinite(np.asarray(lq.a_clip))))]


def is_calibrated(policy: Mapping[str, LayerQuant]) -> bool:
    """Whether every enabled layer has finite activation clips (concrete policies only)."""
    return not uncalibrated_layers(policy)


def check_calibrated(policy: Mapping[str, LayerQuant]) -> None:
    """Raises ValueError naming the enabled layers without activation clips (before long work)."""
    bad = uncalibrated_layers(policy)
    if bad:
        raise ValueError(f"policy is not calibrated ({len(bad)} layers without activation clips, e.g. "
                         f"{', '.join(bad[:3])}): calibrate it first (eqjax.ptq.calibrate)")


_scale_from_stats = jax.jit(calibration.scale_from_stats,
                            static_argnames=("method", "signed", "percentile", "num_candidates",
                                             "min_ratio"))


def with_activation_clips(policy: Policy, stats: Mapping[str, Sequence[calibration.RunningStats]], *,
                          method: str = "absmax", unsigned_if_nonnegative: bool = True,
                          percentile: float = 99.99) -> Policy:
    """Fills ``a_clip`` / ``a_signed`` from activation statistics (see ``apply.collect_activation_stats``).

    ``clip = scale * q_max`` with the scale of ``calibration.scale_from_stats`` at the
    layer's ``a_bits``: the absmax clip is max|x| (eq. 4), the percentile clip the
    percentile of |x|, the MSE clip the best one for those bits. Inputs never negative
    during calibration (post-ReLU) get the unsigned grid unless
    ``unsigned_if_nonnegative`` is False (the study's signed-everywhere setting).
    """
    calibration._check_method(method)
    missing = [n for n in policy if n not in stats]
    if missing:
        raise ValueError(f"no activation statistics for {len(missing)} layers: {', '.join(missing[:10])}")
    new = {}
    for name, lq in policy.items():
        clips, signs = [], []
        for s in stats[name]:
            signed = not (unsigned_if_nonnegative and bool(s.nonnegative))
            scale = _scale_from_stats(s, lq.a_bits, method=method, signed=signed, percentile=percentile)
            _, q_max = numerics.quant_range(lq.a_bits, signed=signed)
            clips.append(scale * q_max)
            signs.append(signed)
        new[name] = lq._replace(a_clip=jnp.stack(clips).astype(jnp.float32), a_signed=jnp.asarray(signs))
    return new


def bits_table(policy: Mapping[str, LayerQuant]) -> dict[str, dict[str, Any]]:
    """``{name: {'w': bits or None, 'a': bits or None}}`` (None = not quantized), for reports."""
    table = {}
    for name, lq in policy.items():
        table[name] = {"w": int(lq.w_bits) if bool(lq.w_enabled) else None,
                       "a": int(lq.a_bits) if bool(lq.a_enabled) else None}
    return table
