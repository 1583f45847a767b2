"""Scale estimators (absmax = the study's eq. 4, percentile, MSE search) and running statistics.

Two ways to estimate a scale:

* over one tensor (weights, or a batch of activations): :func:`estimate_scale`
  with ``method`` in ``absmax | percentile | mse``, per tensor or per channel;
* over many batches of activations: :func:`init_stats` / :func:`update_stats`
  accumulate, in float32, the minimum, maximum and a histogram of |x| whose range
  grows as larger values arrive; :func:`scale_from_stats` turns them into a scale
  with the same three methods.

All functions are pure and jit-compatible (the method and the histogram size are
static; bits may be traced).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eqjax.quant import numerics

METHODS = ("absmax", "percentile", "mse")

__all__ = [
    "METHODS",
    "estimate_scale",
    "percentile_scale",
    "mse_scale",
    "RunningStats",
    "init_stats",
    "update_stats",
    "scale_from_stats",
]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_percentile(percentile: float) -> None:
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")


def _magnitude(x: jax.Array, signed: bool) -> jax.Array:
    x = x.astype(numerics.compute_dtype(x.dtype))
    return jnp.abs(x) if signed else jnp.maximum(x, 0)


def _channels_last(x: jax.Array, axis: int | None) -> jax.Array:
    """[..] -> [N] (per tensor) or [N, C] (per channel along ``axis``)."""
    if axis is None:
        return x.reshape(-1)
    return jnp.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])


def percentile_scale(x: jax.typing.ArrayLike, bits: Any, *, percentile: float = 99.99,
                     axis: int | None = None, signed: bool = True) -> jax.Array:
    """Clips at the ``percentile`` of |x| (of x if unsigned): ``s = P(|x|) / q_max``.

    Returns:
      float32 scale of shape [] or [x.shape[axis]]; a zero clip falls back to absmax.
    """
    x = jnp.asarray(x)
    absmax = numerics.absmax_scale(x, bits, axis=axis, signed=signed)  # checks values and bits first
    _check_percentile(percentile)
    axis = numerics.normalize_axis(axis, x.ndim)
    magnitude = _channels_last(_magnitude(x, signed), axis)
    clip = jnp.percentile(magnitude, percentile, axis=0)
    _, q_max = numerics.quant_range(bits, signed=signed, dtype=clip.dtype)
    return jnp.where(clip > 0, clip / q_max, absmax)


def _grid_candidates(absmax_scale: jax.Array, num_candidates: int, min_ratio: float) -> jax.Array:
    """[K, ...] scales ``r * absmax_scale`` for ``r`` from ``min_ratio`` to 1."""
    ratios = jnp.linspace(min_ratio, 1.0, num_candidates, dtype=absmax_scale.dtype)
    return ratios.reshape((-1,) + (1,) * absmax_scale.ndim) * absmax_scale[None]


def mse_scale(x: jax.typing.ArrayLike, bits: Any, *, axis: int | None = None, signed: bool = True,
              num_candidates: int = 100, min_ratio: float = 0.2) -> jax.Array:
    """Grid search of the clipping ratio minimising ``mean((quantize(x, s) - x)^2)``.

    Candidates are ``s = r * absmax_scale`` for ``num_candidates`` ratios ``r`` in
    [min_ratio, 1]; the best one is chosen per tensor or per channel. The search is a
    ``lax.map`` over candidates, so memory stays at a few copies of ``x``.

    Returns:
      float32 scale of shape [] or [x.shape[axis]], never worse in MSE than absmax.
    """
    x = jnp.asarray(x)
    absmax = numerics.absmax_scale(x, bits, axis=axis, signed=signed)  # checks values and bits first
    if num_candidates < 1 or not 0.0 < min_ratio <= 1.0:
        raise ValueError(f"need num_candidates >= 1 and min_ratio in (0, 1], "
                         f"got {num_candidates} and {min_ratio}")
    axis = numerics.normalize_axis(axis, x.ndim)
    flat = _channels_last(x.astype(numerics.compute_dtype(x.dtype)), axis)
    q_min, q_max = numerics.quant_range(bits, signed=signed, dtype=flat.dtype)
    candidates = _grid_candidates(absmax, num_candidates, min_ratio)

    def error(scale):
        q = numerics.fake_quant(flat, scale.reshape((1,) * (flat.ndim - scale.ndim) + scale.shape),
                                q_min, q_max)
        return jnp.mean(jnp.square(q - flat), axis=0)

    errors = jax.lax.map(error, candidates)  # [K] or [K, C]
    best = jnp.argmin(errors, axis=0)
    return jnp.take_along_axis(candidates, best[None], axis=0)[0]


def estimate_scale(x: jax.typing.ArrayLike, bits: Any, *, method: str = "absmax",
                   axis: int | None = None, signed: bool = True, percentile: float = 99.99,
                   num_candidates: int = 100) -> jax.Array:
    """Scale of one tensor by ``method``: ``absmax`` (eq. 4), ``percentile`` or ``mse``.

    Args:
      x: floating array.
      bits: Python int or integer array of shape [].
      method: one of :data:`METHODS`.
      axis: None (per tensor) or the channel axis.
      signed: signed or unsigned grid.
      percentile: for ``method='percentile'``.
      num_candidates: grid size for ``method='mse'``.

    Returns:
      float32 scale of shape [] or [x.shape[axis]].
    """
    _check_method(method)
    if method == "absmax":
        return numerics.absmax_scale(x, bits, axis=axis, signed=signed)
    if method == "percentile":
        return percentile_scale(x, bits, percentile=percentile, axis=axis, signed=signed)
    return mse_scale(x, bits, axis=axis, signed=signed, num_candidates=num_candidates)


# ----------------------------------------------------------------------------
# Running statistics over many batches (activations, per tensor)
# ----------------------------------------------------------------------------


class RunningStats(NamedTuple):
    """Per-tensor activation statistics, accumulated in float32.

    Attributes:
      minimum: [] smallest value seen (tells whether an unsigned grid fits).
      maximum: [] largest value seen.
      histogram: [num_bins] counts of |x| over equal bins of [0, hist_max].
      hist_max: [] upper end of the histogram range (= max |x| seen).
      count: [] number of values seen.
    """

    minimum: jax.Array
    maximum: jax.Array
    histogram: jax.Array
    hist_max: jax.Array
    count: jax.Array

    @property
    def absmax(self) -> jax.Array:
        return jnp.maximum(jnp.abs(self.minimum), jnp.abs(self.maximum))

    @property
    def nonnegative(self) -> jax.Array:
        """Whether every value seen was >= 0 (then the unsigned grid applies)."""
        return self.minimum >= 0


def init_stats(num_bins: int = 2048) -> RunningStats:
    """Empty statistics: min +inf, max -inf, zero histogram over [0, 0]."""
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins}")
    f32 = jnp.float32
    return RunningStats(jnp.asarray(jnp.inf, f32), jnp.asarray(-jnp.inf, f32),
                        jnp.zeros((num_bins,), f32), jnp.asarray(0.0, f32), jnp.asarray(0.0, f32))


def _rebin(histogram: jax.Array, old_max: jax.Array, new_max: jax.Array) -> jax.Array:
    """Moves counts of a histogram over [0, old_max] onto bins over [0, new_max >= old_max].

    The cumulative counts are interpolated linearly at the new edges (counts are
    spread uniformly inside each old bin), which conserves the total.
    """
    n = histogram.shape[0]
    old_edges = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.float32) * old_max
    new_edges = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.float32) * new_max
    cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(histogram)])
    # An empty histogram over [0, 0]: nothing to move.
    new_cdf = jnp.where(old_max > 0, jnp.interp(new_edges, old_edges, cdf), 0.0)
    return jnp.diff(new_cdf)


def update_stats(stats: RunningStats, x: jax.typing.ArrayLike) -> RunningStats:
    """Adds the values of ``x`` (any non-empty shape) to ``stats``. Pure; jit-compatible.

    Raises:
      ValueError: ``x`` holds no values (nothing to add; its shape is named).
    """
    x = jnp.asarray(x)
    if x.size == 0:
        raise ValueError(f"update_stats needs at least one value, got an empty array of shape {x.shape}")
    x = x.astype(jnp.float32).reshape(-1)
    minimum = jnp.minimum(stats.minimum, jnp.min(x))
    maximum = jnp.maximum(stats.maximum, jnp.max(x))
    magnitude = jnp.abs(x)
    hist_max = jnp.maximum(stats.hist_max, jnp.max(magnitude))
    histogram = _rebin(stats.histogram, stats.hist_max, hist_max)
    n = histogram.shape[0]
    safe_max = jnp.where(hist_max > 0, hist_max, 1.0)
    index = jnp.clip(jnp.floor(magnitude / safe_max * n), 0, n - 1).astype(jnp.int32)
    histogram = histogram + jnp.zeros_like(histogram).at[index].add(1.0)
    return RunningStats(minimum, maximum, histogram, hist_max,
                        stats.count + jnp.asarray(x.size, jnp.float32))


def _histogram_percentile(stats: RunningStats, percentile: float) -> jax.Array:
    n = stats.histogram.shape[0]
    edges = jnp.linspace(0.0, 1.0, n + 1, dtype=jnp.float32) * stats.hist_max
    cdf = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(stats.histogram)])
    return jnp.interp(percentile / 100.0 * cdf[-1], cdf, edges)


def _histogram_mse(stats: RunningStats, q_min, q_max, candidates: jax.Array) -> jax.Array:
    """Quantization MSE of the histogram's bin centres, one per candidate scale. [K]."""
    n = stats.histogram.shape[0]
    centres = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n * stats.hist_max

    def error(scale):
        q = numerics.fake_quant(centres, scale, q_min, q_max)
        return jnp.sum(stats.histogram * jnp.square(q - centres))

    return jax.lax.map(error, candidates)


def scale_from_stats(stats: RunningStats, bits: Any, *, method: str = "absmax",
                     signed: bool = True, percentile: float = 99.99,
                     num_candidates: int = 100, min_ratio: float = 0.2) -> jax.Array:
    """Per-tensor scale from accumulated statistics.

    ``absmax`` uses the exact extreme seen (eq. 4); ``percentile`` and ``mse``
    read the histogram of |x| (resolution ``hist_max / num_bins``). For the
    unsigned grid the statistics must be non-negative (``stats.nonnegative``);
    then |x| = x.

    Returns:
      float32 scale of shape [] (NaN, under jit, for statistics that saw no values).

    Raises:
      ValueError: concrete statistics that never saw a value (``init_stats`` not updated).
    """
    _check_method(method)
    numerics.check_bits(bits)
    if not numerics._is_traced(stats.count) and float(stats.count) == 0:
        raise ValueError("the statistics saw no values (init_stats() never updated): calibrate on at "
                         "least one batch first")
    q_min, q_max = numerics.quant_range(bits, signed=signed, dtype=jnp.float32)
    peak = stats.absmax if signed else jnp.maximum(stats.maximum, 0.0)
    peak = jnp.where(stats.count > 0, jnp.where(peak == 0, 1.0, peak), jnp.nan)
    absmax = peak / q_max
    if method == "absmax":
        return absmax
    if method == "percentile":
        _check_percentile(percentile)
        clip = _histogram_percentile(stats, percentile)
        return jnp.where(clip > 0, clip / q_max, absmax)
    candidates = _grid_candidates(absmax, num_candidates, min_ratio)
    # |x| is symmetric: evaluate on the positive half-grid [0, q_max].
    errors = _histogram_mse(stats, jnp.zeros_like(q_min), q_max, candidates)
    return candidates[jnp.argmin(errors)]
