"""The pure core of ranking-aware PTQ (Liu et al., NeurIPS 2021): losses and search, no Flax.

Per transformer block, with full-precision output O and attention scores A (before softmax)
and their quantized counterparts Ô and Â, Liu et al. (eqs. 9-11) maximise

    Γ(O, Ô) − γ · L_rank,    L_rank = Σ_rows Σ_{i<j} Φ((Â_i − Â_j) · sign(A_i − A_j)),
    Φ(p) = max(θ − p, 0),

where Γ is the Pearson correlation (or cosine similarity). Here the rank loss is the *mean*
hinge over valid pairs (so γ does not depend on the sequence length) and we minimise
``(1 − Γ) + γ·L_rank``. Arrays in, arrays out; :mod:`eqjax.algorithms.ranking` applies this to a model.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SIMILARITIES = ("pearson", "cosine")

__all__ = ["SIMILARITIES", "cosine_similarity", "pearson_correlation", "similarity", "ranking_loss",
           "kept_order_fraction", "ranking_objective", "search_grid"]


def _flat(x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def cosine_similarity(a: jax.Array, b: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """Cosine similarity of ``a`` and ``b`` [batch, ...] per example -> [batch]."""
    a, b = _flat(a), _flat(b)
    return jnp.sum(a * b, -1) / jnp.sqrt(jnp.sum(a * a, -1) * jnp.sum(b * b, -1) + eps)


def pearson_correlation(a: jax.Array, b: jax.Array, *, eps: float = 1e-12) -> jax.Array:
    """Pearson correlation of ``a`` and ``b`` [batch, ...] per example, over all other axes -> [batch]:
    the cosine similarity of the centred values."""
    a, b = _flat(a), _flat(b)
    return cosine_similarity(a - jnp.mean(a, -1, keepdims=True), b - jnp.mean(b, -1, keepdims=True), eps=eps)


def similarity(a: jax.Array, b: jax.Array, *, kind: str = "pearson") -> jax.Array:
    """Mean over the batch of :func:`pearson_correlation` or :func:`cosine_similarity`."""
    if kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
    fn = pearson_correlation if kind == "pearson" else cosine_similarity
    return jnp.mean(fn(a, b))


def _pairs(reference: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """sign(A_i − A_j) [..., K, K] and the valid pairs: i < j, A_i ≠ A_j, and ``mask``."""
    reference = reference.astype(jnp.float32)
    order = jnp.sign(reference[..., :, None] - reference[..., None, :])
    keys = reference.shape[-1]
    upper = jnp.broadcast_to(jnp.arange(keys)[:, None] < jnp.arange(keys)[None, :], order.shape)
    valid = upper & (order != 0)
    if mask is not None:
        valid = valid & jnp.broadcast_to(mask, order.shape)
    return order, valid


def ranking_loss(reference: jax.Array, quantized: jax.Array, *, margin: float = 0.0,
                 mask: jax.Array | None = None) -> jax.Array:
    """Mean pairwise hinge ``max(θ − (Â_i − Â_j)·sign(A_i − A_j), 0)`` over the valid pairs.

    Args:
      reference: full-precision scores [..., K] (e.g. [batch, heads, queries, keys]); each
        row's keys are ranked.
      quantized: quantized scores, same shape.
      margin: θ >= 0; 0 makes the loss exactly 0 when every order is kept.
      mask: optional bool pairs mask broadcastable to [..., K, K] (True = counted).

    Returns:
      Scalar; 0 (with zero, finite gradients) when no pair is valid.
    """
    order, valid = _pairs(reference, mask)
    q = quantized.astype(jnp.float32)
    hinge = jax.nn.relu(margin - (q[..., :, None] - q[..., None, :]) * order)
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, hinge, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)


def kept_order_fraction(reference: jax.Array, quantized: jax.Array, *,
                        mask: jax.Array | None = None) -> jax.Array:
    """Share of valid key pairs (see :func:`ranking_loss`) whose order ``quantized`` keeps strictly."""
    order, valid = _pairs(reference, mask)
    q = quantized.astype(jnp.float32)
    kept = jnp.sign(q[..., :, None] - q[..., None, :]) == order
    count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
    return jnp.sum(kept & valid).astype(jnp.float32) / count


def ranking_objective(fp_out: jax.Array, q_out: jax.Array, fp_scores: Sequence[jax.Array],
                      q_scores: Sequence[jax.Array], *, gamma: float = 0.1, margin: float = 0.0,
                      similarity_kind: str = "pearson") -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(1 − Γ(O, Ô)) + γ · mean_layers L_rank(A, Â)``; returns (loss, parts)."""
    sim = similarity(fp_out, q_out, kind=similarity_kind)
    rank = (sum(ranking_loss(a, b, margin=margin) for a, b in zip(fp_scores, q_scores))
            / max(len(fp_scores), 1))
    return (1.0 - sim) + gamma * rank, {"similarity": sim, "rank": rank}


def search_grid(evaluate: Callable[[Mapping], Any], init: Mapping[str, Mapping[str, jax.Array]], *,
                grid: Sequence[float], rounds: int) -> tuple[dict, dict[str, Any] | None]:
    """The paper's alternating search over interval multipliers.

    For each round and each layer (sorted by name), set its weight log-scales, then its
    activation log-clips, to ``init + log(g)`` for the ``g`` in ``grid`` that minimises
    ``evaluate(log_scales)[0]``, keeping the other layers at their current values.

    Args:
      evaluate: ``log_scales -> (objective, ...)``.
      init: ``{'w': {layer: log scales}, 'a': {layer: log clips}}``.
      grid: multipliers of the initial values (include 1.0 to never get worse).
      rounds: passes over all layers.

    Returns:
      ``(best log_scales, None)``, or ``(init, {'step', 'loss', 'layer'})`` when an objective
      is not finite.
    """
    log_grid = [float(np.log(g)) for g in grid]
    current = init  # replaced, never mutated
    for round_index in range(1, rounds + 1):
        for name in sorted(set(init["w"]) | set(init["a"])):
            for kind in ("w", "a"):
                if name not in init[kind]:
                    continue
                best_value, best = None, current[kind][name]
                for g in log_grid:
                    trial = {**current, kind: {**current[kind], name: init[kind][name] + g}}
                    value = float(evaluate(trial)[0])
                    if not np.isfinite(value):
                        return init, {"step": round_index, "loss": value, "layer": name}
                    if best_value is None or value < best_value:
                        best_value, best = value, trial[kind][name]
                current = {**current, kind: {**current[kind], name: best}}
    return current, None
