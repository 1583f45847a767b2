"""Convolution kernels the models plug into ``nn.Conv(conv_general_dilated=...)``.

XLA:CPU runs depthwise convolutions (``feature_group_count == channels``) at about
0.3 GMAC/s; as a sum of k*k shifted, per-channel-scaled slices of the input, which
XLA fuses into one elementwise loop, they run several times faster (figures in
BUILD_NOTES.md). Pointwise (1x1, stride 1) convolutions run as a matrix product, whose
gradients XLA:CPU computes about twice as fast as a convolution's. Other backends keep
``lax.conv_general_dilated``. The module stays an
``nn.Conv`` either way, so quantization and energy counting see it unchanged. Code that
reads convolutions as ``lax.conv_general_dilated`` calls (Qwix's interception, the ONNX
export) traces under :func:`lax_convolutions`.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax


def _is_channels_last(dimension_numbers, ndim: int) -> bool:
    if dimension_numbers is None:
        return False
    dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers) \
        if not isinstance(dimension_numbers, lax.ConvDimensionNumbers) else dimension_numbers
    spatial = tuple(range(1, ndim - 1))
    return (dn.lhs_spec == (0, ndim - 1) + spatial and dn.out_spec == (0, ndim - 1) + spatial
            and dn.rhs_spec == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))


def depthwise_shift_add(lhs: jax.Array, rhs: jax.Array, window_strides, padding) -> jax.Array:
    """Depthwise 2-D conv as a sum of shifted slices.

    Args:
      lhs: [batch, H, W, C] input.
      rhs: [kh, kw, 1, C] kernel.
      window_strides: (sh, sw).
      padding: a lax padding string or ((top, bottom), (left, right)).

    Returns:
      [batch, H_out, W_out, C], equal to ``lax.conv_general_dilated(...,
      feature_group_count=C)`` up to float rounding.
    """
    kh, kw = rhs.shape[:2]
    sh, sw = window_strides
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), (sh, sw), padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    h_out = (x.shape[1] - kh) // sh + 1
    w_out = (x.shape[2] - kw) // sw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            window = lax.slice(x, (0, i, j, 0),
                               (x.shape[0], i + (h_out - 1) * sh + 1, j + (w_out - 1) * sw + 1, x.shape[3]),
                               (1, sh, sw, 1))
            term = window * rhs[i, j, 0][None, None, None, :]
            out = term if out is None else out + term
    return out


def _no_padding(padding) -> bool:
    return isinstance(padding, str) or all(p == (0, 0) for p in padding)  # a 1x1 window pads nothing


_LAX_ONLY = [0]  # > 0 inside lax_convolutions()


@contextlib.contextmanager
def lax_convolutions():
    """Within (at trace time): :func:`conv_general_dilated` is ``lax.conv_general_dilated`` itself,
    no shift-add or matrix-product paths."""
    _LAX_ONLY[0] += 1
    try:
        yield
    finally:
        _LAX_ONLY[0] -= 1


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
    """``lax.conv_general_dilated`` with the fast depthwise and pointwise paths on CPU (same signature)."""
    undilated = all(d == 1 for d in (lhs_dilation or (1,))) and all(d == 1 for d in (rhs_dilation or (1,)))
    plain = (jax.default_backend() == "cpu" and not _LAX_ONLY[0] and lhs.ndim == 4 and undilated and not kwargs
             and _is_channels_last(dimension_numbers, lhs.ndim))
    if (plain and feature_group_count == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[2] == 1
            and feature_group_count > 1):
        return depthwise_shift_add(lhs, rhs, window_strides, padding)
    if (plain and feature_group_count == 1 and rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1)
            and _no_padding(padding)):
        return jnp.einsum("bhwc,co->bhwo", lhs, rhs[0, 0], precision=precision)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                    rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                    feature_group_count=feature_group_count, precision=precision,
                                    **kwargs)
