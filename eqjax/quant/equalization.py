"""Cross-layer equalization (Nagel et al., ICCV 2019, "Data-free quantization", section 4.1).

Two layers with a positively homogeneous function between them (ReLU, or nothing),
``y = W2 · f(W1 x + b1)``, compute the same ``y`` after output channel ``i`` of the first is
divided by ``s_i`` and input channel ``i`` of the second multiplied by it
(``f(z / s) = f(z) / s`` for ``s > 0``). With ``r1_i`` the range (max |w|) of output channel ``i``
of ``W1`` and ``r2_i`` that of input channel ``i`` of ``W2``,

    s_i = sqrt(r1_i / r2_i)                                              (Nagel et al., eq. 11)

gives both the range ``sqrt(r1_i · r2_i)``: per-tensor and per-channel weight grids lose less to
channels whose ranges differ by orders of magnitude, as depthwise convolutions' do. Chains
(1×1 expand → depthwise → 1×1 project) are equalized pair by pair until the scales settle.

BatchNorms are folded first (:func:`eqjax.quant.folding.fold_batchnorm`: each becomes a bias add,
which scales with its channel). ReLU6 is not positively homogeneous (its clip at 6 does not
scale): a model is equalized in its ReLU variant (as AIMET does), whose FP32 function differs
where activations exceed 6 — measure it (``experiments.ptq --equalize`` reports both).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from eqjax.quant import folding, intercept

__all__ = ["EqualizationPair", "pair_scales", "equalize"]


@dataclasses.dataclass(frozen=True)
class EqualizationPair:
    """A layer whose output feeds the next one through ReLU (or nothing), nothing else reading it.

    Attributes:
      first: the producing conv/dense layer (output channels on the kernel's last axis).
      second: the consuming conv/dense layer: a regular one (input channels on the kernel's
        second-to-last axis) or a depthwise conv (kernel [kh, kw, 1, C]).
    """

    first: str
    second: str


def _is_depthwise(kernel: np.ndarray, channels: int) -> bool:
    return kernel.ndim == 4 and kernel.shape[2] == 1 and kernel.shape[3] == channels and channels > 1


def _input_ranges(kernel: np.ndarray, channels: int) -> np.ndarray:
    """max |w| per input channel [channels] of a consuming kernel (depthwise: per channel)."""
    if _is_depthwise(kernel, channels):
        return np.abs(kernel).reshape(-1, channels).max(axis=0)
    if kernel.shape[-2] != channels:
        raise ValueError(f"kernel {kernel.shape} does not read {channels} input channels on its second-to-last axis "
                         "(grouped convolutions other than depthwise are not equalized)")
    return np.moveaxis(np.abs(kernel), -2, 0).reshape(channels, -1).max(axis=1)


def pair_scales(first_kernel: np.ndarray, second_kernel: np.ndarray) -> np.ndarray:
    """``s`` [C] of eq. 11 for the output channels of ``first_kernel`` ([..., C]) and the input
    channels of ``second_kernel``; 1 where either range is zero."""
    first = np.asarray(first_kernel, np.float64)
    channels = first.shape[-1]
    r1 = np.abs(first).reshape(-1, channels).max(axis=0)
    r2 = _input_ranges(np.asarray(second_kernel, np.float64), channels)
    with np.errstate(divide="ignore", invalid="ignore"):
        scales = np.sqrt(r1 / r2)
    return np.where((r1 > 0) & (r2 > 0) & np.isfinite(scales), scales, 1.0)


def _scaled_input(kernel: np.ndarray, scales: np.ndarray) -> np.ndarray:
    channels = scales.shape[0]
    if _is_depthwise(kernel, channels):
        return kernel * scales
    shape = [1] * kernel.ndim
    shape[-2] = channels
    return kernel * scales.reshape(shape)


def equalize(model: Any, variables: Mapping, pairs: Sequence[EqualizationPair], *, example: Any,
             iterations: int = 20, tolerance: float = 1e-6) -> tuple[dict, dict[str, Any]]:
    """``variables`` with every BatchNorm folded and every pair equalized.

    Args:
      model, variables: a Flax linen model in inference mode (with positively homogeneous
        functions between the layers of each pair) and its variables.
      pairs: the layer pairs (e.g. ``eqjax.models.efficientnet.equalization_pairs``).
      example: an input batch (array or ShapeDtypeStruct), for tracing the BatchNorms.
      iterations: sweeps over the pairs at most.
      tolerance: stop when no scale of a sweep is further than this from 1 (in log).

    Returns:
      ``(variables, report)``; ``report``: ``{'pairs', 'sweeps', 'max_log_scale' (of the last
      sweep), 'range_ratio_before', 'range_ratio_after'}``, the ratios being the median over
      the pairs' first layers of max / median output-channel range.

    Raises:
      ValueError: a pair naming a layer without a kernel, or channel counts that do not match.
    """
    variables, batchnorm_pairs = folding.fold_batchnorm(model, variables, example)
    bias_of = {p.layer: p.batchnorm for p in batchnorm_pairs}  # folded: the BatchNorm is the bias add
    kernels: dict[str, np.ndarray] = {}
    for pair in pairs:
        for name in (pair.first, pair.second):
            module = intercept.module_variables(variables, name)
            if module is None or "kernel" not in module:
                raise ValueError(f"equalization pair {pair.first} -> {pair.second}: {name!r} has no kernel")
            kernels[name] = np.asarray(module["kernel"], np.float64)
    biases: dict[str, tuple[str, np.ndarray]] = {}  # first layer -> (module holding its bias, bias)
    for pair in pairs:
        holder = bias_of.get(pair.first, pair.first)
        bias = (intercept.module_variables(variables, holder) or {}).get("bias")
        if bias is not None:
            biases[pair.first] = (holder, np.asarray(bias, np.float64))
    ratio = lambda: float(np.median([_spread(kernels[p.first]) for p in pairs])) if pairs else 1.0
    before = ratio()
    sweeps, worst = 0, 0.0
    for sweeps in range(1, iterations + 1):
        worst = 0.0
        for pair in pairs:
            first, second = kernels[pair.first], kernels[pair.second]
            if first.shape[-1] != (second.shape[-1] if _is_depthwise(second, first.shape[-1]) else second.shape[-2]):
                raise ValueError(f"equalization pair {pair.first} -> {pair.second}: {first.shape[-1]} output channels "
                                 f"do not feed kernel {second.shape}")
            scales = pair_scales(first, second)
            kernels[pair.first] = first / scales
            kernels[pair.second] = _scaled_input(second, scales)
            if pair.first in biases:
                holder, bias = biases[pair.first]
                biases[pair.first] = (holder, bias / scales)
            worst = max(worst, float(np.max(np.abs(np.log(scales)))))
        if worst < tolerance:
            break
    out = dict(variables)
    for name, kernel in kernels.items():
        dtype = intercept.module_variables(variables, name)["kernel"].dtype
        out = intercept.replace_module_variable(out, name, "kernel", jnp.asarray(kernel, dtype))
    for holder, bias in biases.values():
        dtype = intercept.module_variables(variables, holder)["bias"].dtype
        out = intercept.replace_module_variable(out, holder, "bias", jnp.asarray(bias, dtype))
    return out, {"pairs": len(pairs), "sweeps": sweeps, "max_log_scale": worst, "range_ratio_before": before,
                 "range_ratio_after": ratio()}


def _spread(kernel: np.ndarray) -> float:
    """max / median of a kernel's output-channel ranges (robust to channels that are all zero)."""
    ranges = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0)
    median = float(np.median(ranges))
    return float(ranges.max()) / median if median > 0 else float("inf")
