"""The pure core of reconstruction PTQ: AdaRound's learned rounding, its regularizer, QDrop.

AdaRound (Nagel et al., ICML 2020, eqs. 21-24): a weight ``w`` with per-channel scale ``s``
is quantized as

    w_q = s · clamp(floor(w/s) + h(V), q_min, q_max),
    h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1),    ζ = 1.1, γ = −0.1  (rectified sigmoid),

where ``V`` (one per weight) is learned by minimising the block's output error plus

    λ · Σ (1 − |2h(V) − 1|^β),

with β annealed from 20 to 2 after a warm-up without the regularizer, which pushes every
h(V) to 0 or 1; at the end the rounding is made hard: ``h = [V ≥ 0]``. ``V`` starts at the
value where h(V) equals the fractional part of w/s, so its hard rounding starts as
round-to-nearest.

QDrop (Wei et al., ICLR 2022): during reconstruction each activation element keeps its
full-precision value with probability ``p`` instead of its quantized one; ``p = 0`` is BRECQ.

Arrays in, arrays out; :mod:`eqjax.algorithms.reconstruction` applies this to the blocks of a model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eqjax.quant import numerics

ZETA, GAMMA = 1.1, -0.1

__all__ = ["ZETA", "GAMMA", "rectified_sigmoid", "init_rounding", "adaround_weights", "rounding_regularizer",
           "beta_schedule", "reconstruction_error", "drop_quantization"]


def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1), elementwise."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_rounding(w: jax.Array, scale: jax.Array) -> jax.Array:
    """V with h(V) = w/s − floor(w/s) (so that hard rounding starts as round-to-nearest).

    Args:
      w: weights, any shape; ``scale`` of the same rank broadcasts against it.
    """
    x = numerics._scaled(w.astype(jnp.float32), scale)  # the same x·(1/s) as the quantizers
    rest = jnp.clip(x - jnp.floor(x), 0.0, 1.0)
    return -jnp.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)


def adaround_weights(w: jax.Array, scale: jax.Array, v: jax.Array, q_min: jax.Array, q_max: jax.Array, *,
                     hard: jax.Array | bool = False) -> jax.Array:
    """``s · clamp(floor(w/s) + h, q_min, q_max)`` with h = h(V) (soft) or [V ≥ 0] (hard).

    ``scale`` has ``w``'s rank (e.g. [1, 1, 1, out] per output channel); ``q_min``/``q_max``
    are scalars. Gradient flows to ``v`` through h(V) (zero where clamped); ``w`` and
    ``scale`` are constants.
    """
    w, scale = jax.lax.stop_gradient((w.astype(jnp.float32), scale))
    q_min, q_max = (jnp.reshape(q, (1,) * w.ndim) for q in (q_min, q_max))
    base = jnp.floor(numerics._scaled(w, scale))
    h = jnp.where(hard, (v >= 0).astype(jnp.float32), rectified_sigmoid(v))
    return jnp.clip(base + h, q_min, q_max) * scale


def rounding_regularizer(v: jax.Array, beta: jax.Array) -> jax.Array:
    """Σ (1 − |2h(V) − 1|^β): 0 when every h(V) is 0 or 1."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_schedule(step: jax.Array, total: jax.Array, *, warmup: float = 0.2, start: float = 20.0,
                  end: float = 2.0) -> tuple[jax.Array, jax.Array]:
    """(β, regularizer on) at ``step`` of ``total``: off for the first ``warmup`` share, then β
    decays linearly from ``start`` to ``end`` (AdaRound's annealing)."""
    step, total = jnp.asarray(step, jnp.float32), jnp.asarray(total, jnp.float32)
    begin = warmup * total
    progress = jnp.clip((step - begin) / jnp.maximum(total - begin, 1.0), 0.0, 1.0)
    return end + (start - end) * (1.0 - progress), step >= begin


def reconstruction_error(output: jax.Array, target: jax.Array, weight: jax.Array | None = None) -> jax.Array:
    """Squared error summed over the last (channel) axis, mean over the rest (BRECQ's ``lp_loss``).

    With ``weight`` (shaped like ``output``): ``Σ weight · (output − target)²``, BRECQ's
    Fisher-weighted loss when ``weight`` is the squared gradient of the task loss w.r.t. the
    output (the diagonal of the empirical Fisher information, Li et al. 2021, eq. 10).
    """
    d2 = jnp.square(output.astype(jnp.float32) - target.astype(jnp.float32))
    if weight is not None:
        d2 = d2 * weight
    return jnp.mean(jnp.sum(d2, axis=-1))


def drop_quantization(key: jax.Array, x: jax.Array, x_quantized: jax.Array, p: jax.Array) -> jax.Array:
    """QDrop: each element is ``x`` with probability ``p``, else ``x_quantized``; p = 0 returns
    ``x_quantized`` exactly."""
    keep_fp = jax.random.bernoulli(key, p, x.shape)
    return jnp.where(keep_fp, x, x_quantized)
