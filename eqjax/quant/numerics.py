"""Uniform symmetric quantization with straight-through gradients (no Flax here).

The study's eqs. (3)-(4):

    x_hat = s * clamp(round(x / s), q_min, q_max),    s = max|x| / q_max

with the signed grid ``q_min = -2^(b-1)``, ``q_max = 2^(b-1) - 1`` and, for
non-negative data such as post-ReLU activations, the unsigned grid ``q_min = 0``,
``q_max = 2^b - 1`` (then ``s = max(x) / q_max``).

Bit widths and scales are *data*: ``bits`` may be a Python int or a traced
integer array, so one compiled function serves every bit width and ``vmap`` can
sweep them.

Rounding is round-half-to-even (``jnp.round``, like ``torch.round`` and
``numpy.round``): 0.5 -> 0, 1.5 -> 2, 2.5 -> 2.

Behaviour under ``jit`` (values traced, so no Python error can be raised):
invalid bits (outside [2, 16]) or a non-positive / non-finite scale give NaN
outputs, never a crash or a silent clip; NaN inputs stay NaN; +-inf inputs
clamp to the ends of the grid. An absmax scale of data holding NaN or Inf is
NaN or Inf, hence NaN output: never a stand-in scale. With concrete values the
same inputs raise ValueError instead (:func:`check_values`), as do empty arrays.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 2
MAX_BITS = 16

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "check_values",
    "normalize_axis",
    "compute_dtype",
    "quant_range",
    "absmax_scale",
    "quantize",
    "quantize_clipped",
    "quantize_int",
    "dequantize",
    "fake_quant",
    "log_quantize_clipped",
    "twin_quantize_clipped",
    "scale_gradient",
    "lsq_gradient_scale",
]


# ----------------------------------------------------------------------------
# Argument checks (eager: they see concrete values; traced values pass through)
# ----------------------------------------------------------------------------


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def check_values(x: Any, *, name: str = "x") -> None:
    """Raises ValueError when concrete ``x`` is empty or holds NaN/Inf (a scale estimated from
    it would be meaningless). Traced values are not checked (their scale comes out NaN)."""
    if _is_traced(x):
        return
    shape = np.shape(x)
    if np.size(x) == 0:
        raise ValueError(f"{name} is empty (shape {shape}): nothing to estimate a scale from")
    values = np.asarray(x)
    if np.issubdtype(values.dtype, np.floating) or values.dtype.name == "bfloat16":
        values = values.astype(np.float32)
        finite = np.isfinite(values)
        if not finite.all():
            bad = values[~finite]
            raise ValueError(f"{name} holds {bad.size} non-finite values of {values.size} (e.g. "
                             f"{bad[:3].tolist()}): the scale would be NaN/Inf; clean the input or pass a scale")


def check_bits(bits: Any, *, name: str = "bits") -> None:
    """Raises if ``bits`` is not an integer in [2, 16] (traced values are not checked).

    Args:
      bits: a Python int, or an integer array of shape [] (concrete or traced).
      name: how the value is called in the error message (e.g. a flag name).

    Raises:
      TypeError: ``bits`` is not an integer (a float, a bool, a float array).
      ValueError: ``bits`` is outside [2, 16] or not a scalar.
    """
    if isinstance(bits, bool):
        raise TypeError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got bool {bits}")
    if isinstance(bits, (int, np.integer)):
        if not MIN_BITS <= int(bits) <= MAX_BITS:
            raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        return
    if isinstance(bits, (jax.Array, np.ndarray)):
        if not jnp.issubdtype(bits.dtype, jnp.integer):
            raise TypeError(f"{name} must have an integer dtype, got {bits.dtype}")
        if bits.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {bits.shape}")
        if not _is_traced(bits):
            value = int(bits)
            if not MIN_BITS <= value <= MAX_BITS:
                raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {value}")
        return
    raise TypeError(
        f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}] or an integer array, "
        f"got {type(bits).__name__} {bits!r}"
    )


def _check_float(x: jax.Array, name: str = "x") -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")


def normalize_axis(axis: int | None, ndim: int) -> int | None:
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int or None, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of rank {ndim} "
                         f"(expected -{ndim} <= axis < {ndim})")
    return int(axis) % ndim


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs (statistics and rounding in float32), else ``dtype``."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if jnp.finfo(dtype).bits < 32 else dtype


# ----------------------------------------------------------------------------
# Grids and scales
# ----------------------------------------------------------------------------


def quant_range(bits: Any, *, signed: Any = True, dtype=jnp.float32) -> tuple[jax.Array, jax.Array]:
    """Integer grid ends ``(q_min, q_max)`` as float arrays.

    Signed: ``(-2^(b-1), 2^(b-1) - 1)``; unsigned: ``(0, 2^b - 1)``. Traced bits
    outside [2, 16] give NaN ends (see the module docstring).

    Args:
      bits: Python int or integer array of shape [].
      signed: Python bool, or a bool array of shape [] (then the grid is data too).
      dtype: float dtype of the result.

    Returns:
      ``(q_min, q_max)``, two arrays of shape [] and ``dtype``.
    """
    # Integer shifts, not exp2: XLA's exp2 is approximate (2^15 -> 32767.998 on CPU).
    b = jnp.asarray(bits).astype(jnp.int32)
    valid = (b >= MIN_BITS) & (b <= MAX_BITS)
    one = jnp.ones_like(b)
    half = jnp.left_shift(one, jnp.clip(b - 1, 0, 30))
    signed_ends = (-half, half - 1)
    unsigned_ends = (jnp.zeros_like(b), jnp.left_shift(one, jnp.clip(b, 0, 30)) - 1)
    if isinstance(signed, (bool, np.bool_)):
        q_min, q_max = signed_ends if signed else unsigned_ends
    else:
        if getattr(signed, "dtype", None) != jnp.bool_:
            raise ValueError(f"signed must be a bool or a boolean array, got {signed!r}")
        q_min = jnp.where(signed, signed_ends[0], unsigned_ends[0])
        q_max = jnp.where(signed, signed_ends[1], unsigned_ends[1])
    nan = jnp.asarray(jnp.nan, dtype)
    return jnp.where(valid, q_min.astype(dtype), nan), jnp.where(valid, q_max.astype(dtype), nan)


def quantize_clipped(x: jax.Array, bits: Any, clip: jax.Array, *, signed: Any = True) -> jax.Array:
    """Fake-quantizes ``x`` to the grid whose largest level is ``clip``: ``s = clip / q_max``.

    The form used for calibrated activations: the clipping value (absmax, a
    percentile, an MSE-optimal clip) is data and independent of ``bits``, so the
    same calibration serves every bit width. All of ``bits``, ``clip`` and
    ``signed`` may be traced. Gradient: as :func:`fake_quant` (to ``clip`` through
    the scale).

    Args:
      x: floating array.
      bits: integer of shape [].
      clip: positive float of shape [].
      signed: bool (Python or array of shape []).

    Returns:
      Array of ``x``'s shape and dtype.
    """
    cdtype = compute_dtype(x.dtype)
    q_min, q_max = quant_range(bits, signed=signed, dtype=cdtype)
    clip = jnp.asarray(clip, cdtype)
    scale = _scaled(jnp.where((clip > 0) & jnp.isfinite(clip), clip, jnp.nan), q_max)
    return fake_quant(x.astype(cdtype), scale, q_min, q_max).astype(x.dtype)


def _reduction_axes(ndim: int, axis: int | None) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis)


def absmax_scale(x: jax.typing.ArrayLike, bits: Any, *, axis: int | None = None,
                 signed: bool = True) -> jax.Array:
    """The study's eq. (4): ``s = max|x| / (2^(b-1) - 1)`` (unsigned: ``max(x) / (2^b - 1)``).

    An all-zero tensor (or channel) gets ``s = 1 / q_max`` instead of 0, so that
    values and gradients stay finite; it still quantizes to exactly 0.

    Args:
      x: array of any shape.
      bits: Python int or integer array of shape [].
      axis: None for one scale per tensor, else the channel axis kept.
      signed: signed or unsigned grid.

    Returns:
      float32 scale of shape [] (per tensor) or [x.shape[axis]] (per channel).

    Raises:
      ValueError: concrete ``x`` that is empty or holds NaN/Inf (:func:`check_values`).
    """
    check_values(x)
    x = jnp.asarray(x)
    _check_float(x)
    check_bits(bits)
    axis = normalize_axis(axis, x.ndim)
    _, q_max = quant_range(bits, signed=signed, dtype=compute_dtype(x.dtype))
    xc = x.astype(q_max.dtype)
    magnitude = jnp.abs(xc) if signed else jnp.maximum(xc, 0)
    peak = jnp.max(magnitude, axis=_reduction_axes(x.ndim, axis))
    peak = jnp.where(peak == 0, jnp.ones_like(peak), peak)  # all zeros: any scale; NaN stays NaN
    return _scaled(peak, q_max)


def _broadcast_scale(scale: jax.Array, ndim: int, axis: int | None, channels: int | None) -> jax.Array:
    """Reshapes a scale of shape [] or [C] so that it broadcasts against x (same rank)."""
    if scale.ndim == 0:
        return scale.reshape((1,) * ndim)
    if axis is not None and scale.shape == (channels,):
        shape = [1] * ndim
        shape[axis] = channels
        return scale.reshape(shape)
    expected = "[]" if axis is None else f"[] or [{channels}] (x.shape[{axis}])"
    raise ValueError(f"scale must have shape {expected}, got shape {scale.shape}")


def _check_scale_values(scale: jax.Array) -> None:
    if _is_traced(scale):
        return
    values = np.asarray(scale)
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ValueError(f"scale must be positive and finite, got {bad[:8].tolist()}"
                         f"{' ...' if bad.size > 8 else ''}")


# ----------------------------------------------------------------------------
# The straight-through fake quantizer
# ----------------------------------------------------------------------------


def _sum_to_shape(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast result back to ``shape`` (leading axes and size-1 axes summed)."""
    lead = a.ndim - len(shape)
    a = jnp.sum(a, axis=tuple(range(lead))) if lead else a
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and a.shape[i] != 1)
    return jnp.sum(a, axis=axes, keepdims=True).reshape(shape)


def _scaled(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale``, computed as ``x * (1 / scale)``.

    XLA rewrites a division by a broadcast scale into this form inside compiled code
    but not in eager ops; writing it out makes eager, jitted and custom_vjp paths
    round identically (so fake quantization equals integer arithmetic bit for bit).
    """
    return x * (1.0 / scale)


def _integer_grid(x: jax.Array, scale: jax.Array, q_min: jax.Array, q_max: jax.Array) -> jax.Array:
    """``clamp(round(x / scale), q_min, q_max)`` as floats: the one rounding rule of this module."""
    return jnp.clip(jnp.round(_scaled(x, scale)), q_min, q_max)


@jax.custom_vjp
def fake_quant(x: jax.Array, scale: jax.Array, q_min: jax.Array, q_max: jax.Array) -> jax.Array:
    """``scale * clamp(round(x / scale), q_min, q_max)`` with an LSQ straight-through gradient.

    All arguments are float arrays of the same rank (``scale``, ``q_min``,
    ``q_max`` broadcast against ``x``); no checks here — use :func:`quantize`.

    Gradients (Esser et al., 2020, LSQ, eq. 3, without its gradient-scale factor,
    which an optimizer can apply):
      d/dx     = 1 where q_min <= x/s <= q_max, else 0 (straight-through estimator);
      d/dscale = round(x/s) - x/s inside, q_min below, q_max above (summed over the
                 elements that share the scale);
      d/dq_min = d/dq_max = 0.
    """
    return _integer_grid(x, scale, q_min, q_max) * scale


def _fake_quant_fwd(x, scale, q_min, q_max):
    return fake_quant(x, scale, q_min, q_max), (x, scale, q_min, q_max)


def _fake_quant_bwd(residuals, g):
    x, scale, q_min, q_max = residuals
    x_s = _scaled(x, scale)
    below, above = x_s < q_min, x_s > q_max
    inside = ~(below | above)
    grad_x = jnp.where(inside, g, jnp.zeros_like(g))
    d_scale = jnp.where(below, q_min, jnp.where(above, q_max, jnp.round(x_s) - x_s))
    grad_scale = _sum_to_shape(g * d_scale, scale.shape)
    return grad_x, grad_scale, jnp.zeros_like(q_min), jnp.zeros_like(q_max)


fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


@jax.custom_vjp
def scale_gradient(x: jax.Array, factor: jax.Array) -> jax.Array:
    """``x`` unchanged in the forward pass; its gradient multiplied by ``factor`` (no gradient to
    ``factor``). LSQ applies its gradient scale ``g`` to the step size this way (Esser et al., 2020,
    section 2.2: ``grad_scale``)."""
    return x


def _scale_gradient_fwd(x, factor):
    return x, factor


def _scale_gradient_bwd(factor, g):
    return (g * factor).astype(g.dtype), jnp.zeros_like(factor)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def lsq_gradient_scale(num_elements: Any, bits: Any, *, signed: Any = True) -> jax.Array:
    """LSQ's step-size gradient scale ``g = 1 / sqrt(N * Q_P)`` (Esser et al., 2020, eq. 5).

    Args:
      num_elements: ``N``, the elements that share the step size (per output channel for a
        weight, per image for an activation); shape [] or broadcastable with ``bits``.
      bits: integer of shape [] (may be traced).
      signed: the grid, so that ``Q_P`` is ``2^(b-1) - 1`` or ``2^b - 1``.

    Returns:
      float32 ``g`` (NaN for bits outside [2, 16], as :func:`quant_range`).
    """
    _, q_max = quant_range(bits, signed=signed, dtype=jnp.float32)
    return jax.lax.rsqrt(jnp.asarray(num_elements, jnp.float32) * q_max)


def _prepare(x, bits, scale, axis, signed):
    """Shared checks and broadcasting of quantize / quantize_int.

    Returns (x in compute dtype, scale broadcast to x's rank, q_min, q_max, axis).
    """
    x = jnp.asarray(x)
    _check_float(x)
    check_bits(bits)
    axis = normalize_axis(axis, x.ndim)
    cdtype = compute_dtype(x.dtype)
    q_min, q_max = quant_range(bits, signed=signed, dtype=cdtype)
    if scale is None:
        scale = jax.lax.stop_gradient(absmax_scale(x, bits, axis=axis, signed=signed))
    else:
        scale = jnp.asarray(scale)
        if not jnp.issubdtype(scale.dtype, jnp.floating):
            raise TypeError(f"scale must be a floating-point array, got dtype {scale.dtype}")
        _check_scale_values(scale)
        # Under jit an invalid scale cannot raise: make it NaN so it shows.
        scale = jnp.where((scale > 0) & jnp.isfinite(scale), scale, jnp.nan)
    channels = None if axis is None else x.shape[axis]
    scale = _broadcast_scale(scale.astype(cdtype), x.ndim, axis, channels)
    ones = (1,) * x.ndim
    return x.astype(cdtype), scale, q_min.reshape(ones), q_max.reshape(ones), axis


def quantize(x: jax.typing.ArrayLike, bits: Any, *, scale: jax.typing.ArrayLike | None = None,
             axis: int | None = None, signed: bool = True) -> jax.Array:
    """Fake-quantizes ``x``: eqs. (3)-(4), ``s * clamp(round(x/s), q_min, q_max)``.

    Args:
      x: floating array of any shape (bf16/f16 are computed in float32).
      bits: Python int in [2, 16] or an integer array of shape [] (may be traced).
      scale: None for the absmax scale of eq. (4) (per tensor, or per channel along
        ``axis``), else a positive finite scale of shape [] or [x.shape[axis]].
      axis: None (per tensor) or the channel axis (output channels for weights).
      signed: signed grid [-2^(b-1), 2^(b-1)-1] or unsigned [0, 2^b-1].

    Returns:
      Array of ``x``'s shape and dtype on the quantization grid.

    Gradient: straight-through to ``x`` inside the clamp range, zero outside; to
    an explicit ``scale`` as in LSQ (see :func:`fake_quant`). A scale computed
    here (``scale=None``) is a constant for differentiation.

    Raises:
      TypeError: non-floating ``x`` or ``scale``, non-integer ``bits``.
      ValueError: bits outside [2, 16], a scale <= 0 or non-finite, an axis out of
        range, a scale of the wrong shape.

    Example:
      >>> w = jnp.array([[0.6, -1.0], [0.25, 0.1]])
      >>> [[round(float(v), 4) for v in row] for row in quantize(w, 4, axis=0)]  # scale max|row| / 7
      [[0.5714, -1.0], [0.25, 0.1071]]
    """
    xc, scale_b, q_min, q_max, _ = _prepare(x, bits, scale, axis, signed)
    return fake_quant(xc, scale_b, q_min, q_max).astype(jnp.asarray(x).dtype)


def quantize_int(x: jax.typing.ArrayLike, bits: Any, *, scale: jax.typing.ArrayLike | None = None,
                 axis: int | None = None, signed: bool = True) -> tuple[jax.Array, jax.Array]:
    """Integer quantization: ``q = clamp(round(x/s), q_min, q_max)`` and its scale.

    The invariant ``quantize(x, ...) == dequantize(*quantize_int(x, ...), axis=axis)``
    holds exactly (same float32 arithmetic).

    Args: as :func:`quantize`.

    Returns:
      ``(q, scale)``: ``q`` of ``x``'s shape in the smallest integer dtype that holds
      the grid when ``bits`` is a Python int (int8/uint8 up to 8 bits, int16/uint16
      up to 16), int32 when ``bits`` is an array; ``scale`` float32 of shape [] or
      [x.shape[axis]].
    """
    xc, scale_b, q_min, q_max, axis = _prepare(x, bits, scale, axis, signed)
    q = _integer_grid(xc, scale_b, q_min, q_max)
    if isinstance(bits, (int, np.integer)):
        width = 8 if bits <= 8 else 16
        dtype = jnp.dtype(f"{'' if signed else 'u'}int{width}")
    else:
        dtype = jnp.int32
    scale_out = scale_b.reshape(()) if axis is None else scale_b.reshape(-1)
    return q.astype(dtype), scale_out


def dequantize(q: jax.typing.ArrayLike, scale: jax.typing.ArrayLike, *, axis: int | None = None,
               dtype=jnp.float32) -> jax.Array:
    """``q * scale``: integer values back to real numbers.

    Args:
      q: integer array.
      scale: shape [] or [q.shape[axis]].
      axis: the channel axis of a per-channel scale.
      dtype: float dtype of the result.

    Returns:
      Array of ``q``'s shape and ``dtype``.
    """
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise TypeError(f"q must be an integer array, got dtype {q.dtype}")
    axis = normalize_axis(axis, q.ndim)
    scale = jnp.asarray(scale)
    channels = None if axis is None else q.shape[axis]
    cdtype = compute_dtype(dtype)
    scale_b = _broadcast_scale(scale.astype(cdtype), q.ndim, axis, channels)
    return (q.astype(cdtype) * scale_b).astype(dtype)


# ----------------------------------------------------------------------------
# Non-uniform activation quantizers of Vision Transformers
# ----------------------------------------------------------------------------


def _straight_through(x: jax.Array, quantized: jax.Array) -> jax.Array:
    """``quantized`` in the forward pass, gradient 1 to ``x`` (no gradient to the grid)."""
    return x + jax.lax.stop_gradient(quantized - x)


def log_quantize_clipped(x: jax.Array, bits: Any, clip: jax.Array, base: jax.Array) -> jax.Array:
    """Logarithmic quantizer of non-negative inputs (post-Softmax attention), as data.

    Levels ``clip * base^-q`` for ``q = 0 .. 2^b - 2`` and 0 (the code ``2^b - 1``): exactly
    ``2^b`` codes. ``q = clamp(round(-log_base(x / clip)), 0)``; values that would round past
    the smallest level become 0. ``base = 2`` is the log2 quantizer of FQ-ViT/RepQ-ViT
    (multiplication becomes a bit shift); a base in (1, 2) is AdaLog's adaptive base, finer
    near ``clip`` and with a shorter range (Wu et al., 2024).

    Args:
      x: floating array; negative values give NaN (a log grid has no negative levels).
      bits: integer of shape [] (may be traced).
      clip: positive float of shape [], the largest level (1 for softmax outputs).
      base: float of shape [], > 1.

    Returns:
      Array of ``x``'s shape and dtype. Gradient: straight-through to ``x``, none to
      ``clip`` or ``base`` (they are chosen by search, not learned).
    """
    cdtype = compute_dtype(x.dtype)
    xc = x.astype(cdtype)
    _, q_max = quant_range(bits, signed=False, dtype=cdtype)  # 2^b - 1: the code of zero
    clip = jnp.asarray(clip, cdtype)
    base = jnp.asarray(base, cdtype)
    valid = (clip > 0) & jnp.isfinite(clip) & (base > 1) & jnp.isfinite(base)
    ratio = jnp.where(xc > 0, xc / clip, 1.0)
    q = jnp.maximum(jnp.round(-jnp.log(ratio) / jnp.log(base)), 0.0)
    levels = clip * jnp.power(base, -q)
    quantized = jnp.where((xc > 0) & (q < q_max), levels, 0.0)
    quantized = jnp.where(valid & (xc >= 0) & ~jnp.isnan(q_max), quantized, jnp.nan)
    return _straight_through(xc, quantized).astype(x.dtype)


def twin_quantize_clipped(x: jax.Array, bits: Any, clip: jax.Array, fine_clip: jax.Array) -> jax.Array:
    """Twin-uniform quantizer of post-GELU activations (PTQ4ViT, Yuan et al., 2022).

    One bit picks the range; the other ``b - 1`` bits are a uniform grid in it:
    a fine signed grid of step ``fine_clip / 2^(b-2)`` on ``[-fine_clip, fine_clip)`` for the
    many values near zero (and GELU's small negative tail), and a coarse unsigned grid of
    step ``clip / (2^(b-1) - 1)`` on ``[0, clip]`` for the rest. Values of either sign beyond
    their range clamp to its end.

    Args:
      x: floating array.
      bits: integer of shape [] (may be traced; at least 2).
      clip: positive float of shape [], the largest level of the coarse range.
      fine_clip: positive float of shape [], the end of the fine range (< ``clip``).

    Returns:
      Array of ``x``'s shape and dtype. Gradient: as :func:`fake_quant` in the range each
      value falls in (straight-through inside it, LSQ to that range's clip).
    """
    cdtype = compute_dtype(x.dtype)
    xc = x.astype(cdtype)
    b = jnp.asarray(bits).astype(jnp.int32)
    fine_min, fine_max = quant_range(b - 1, signed=True, dtype=cdtype)   # -2^(b-2) .. 2^(b-2) - 1
    _, coarse_max = quant_range(b - 1, signed=False, dtype=cdtype)       # 0 .. 2^(b-1) - 1
    # b - 1 = 1 bit (b = 2) is below quant_range's minimum: the grids of a 2-bit twin quantizer
    b_ok = b >= 3
    clip = jnp.asarray(clip, cdtype)
    fine_clip = jnp.asarray(fine_clip, cdtype)
    valid = (clip > 0) & jnp.isfinite(clip) & (fine_clip > 0) & (fine_clip < clip) & b_ok
    fine_scale = jnp.where(valid, fine_clip / -fine_min, jnp.nan)
    coarse_scale = jnp.where(valid, clip / coarse_max, jnp.nan)
    in_fine = xc < fine_clip  # every negative value too: fine_clip > 0
    fine = fake_quant(xc, fine_scale, fine_min, fine_max)
    coarse = fake_quant(xc, coarse_scale, jnp.zeros_like(coarse_max), coarse_max)
    return jnp.where(in_fine, fine, coarse).astype(x.dtype)
