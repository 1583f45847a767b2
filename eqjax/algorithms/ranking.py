"""Ranking-aware post-training quantization of Vision Transformers: the Flax glue.

The losses are in :mod:`eqjax.algorithms.ranking_core` (pure). Here the scales are optimised block by
block, in forward order, with the quantized outputs of the earlier (already optimised)
blocks as inputs and the full-precision model's block outputs as targets: per-output-channel
weight scales and per-tensor activation clips of every layer in the block (including the
operands of the attention matmuls), log-parametrised, initialised from calibration (absmax),
by Adam (optax) through the straight-through quantizers (:func:`eqjax.quant.numerics.fake_quant`,
LSQ gradients), or by the paper's alternating search over a grid of interval multipliers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqjax.quant import apply, intercept
from eqjax.quant.policy import LayerQuant
from eqjax.algorithms.ranking_core import (SIMILARITIES, cosine_similarity, kept_order_fraction, pearson_correlation,
                                ranking_loss, ranking_objective, search_grid, similarity)

__all__ = ["METHODS", "SCORES_SUFFIX", "Block", "RankingResult", "block_policy", "init_block_scales",
           "apply_scales", "block_forward", "find_blocks", "first_block_inputs", "check_options",
           "ranking_ptq", "attention_agreement",
           # re-exported from ranking_core
           "SIMILARITIES", "cosine_similarity", "pearson_correlation", "similarity", "ranking_loss",
           "kept_order_fraction", "ranking_objective", "search_grid"]

METHODS = ("adam", "grid")
SCORES_SUFFIX = "qk_matmul"  # the attention-score matmul of eqjax ViTs: blocks.N.attn.qk_matmul


# ---------------------------------------------------------------- one block, quantized


def block_policy(policy: Mapping[str, LayerQuant], path: str) -> dict[str, LayerQuant]:
    """The policy entries of the layers inside block ``path``, keyed by name relative to it."""
    prefix = path + "."
    return {name[len(prefix):]: lq for name, lq in policy.items() if name.startswith(prefix)}


def init_block_scales(params: Mapping, policy: Mapping[str, LayerQuant]) -> dict[str, dict[str, jax.Array]]:
    """Log-scales from calibration: ``{'w': {layer: log absmax scale [channels]}, 'a': {layer: log clip [inputs]}}``.

    ``params`` and ``policy`` are relative to the block. Disabled quantizers get no entry.
    """
    log_w, log_a = {}, {}
    for name, lq in policy.items():
        node = intercept.module_variables(params, name, collection=None) or {}
        if "kernel" in node and bool(lq.w_enabled):
            scale = apply.kernel_scale(node["kernel"], lq.w_bits, method="absmax",
                                       axes=apply.channel_axes(lq, node["kernel"].ndim))
            log_w[name] = jnp.log(jnp.maximum(scale.astype(jnp.float32), 1e-12))  # all-zero channels
        if bool(lq.a_enabled) and lq.a_clip.shape[0]:
            if not bool(jnp.all(jnp.isfinite(lq.a_clip) & (lq.a_clip > 0))):
                raise ValueError(f"layer {name!r}: activation clips are not calibrated ({lq.a_clip})")
            log_a[name] = jnp.log(lq.a_clip.astype(jnp.float32))
    return {"w": log_w, "a": log_a}


def apply_scales(policy: Mapping[str, LayerQuant],
                 log_scales: Mapping[str, Mapping[str, jax.Array]]) -> tuple[dict, dict]:
    """(policy with clips ``exp(log_a)``, weight scales ``exp(log_w)``) for
    :func:`eqjax.quant.apply.quantize_weights`."""
    new_policy = {name: (lq._replace(a_clip=jnp.exp(log_scales["a"][name])) if name in log_scales["a"] else lq)
                  for name, lq in policy.items()}
    return new_policy, {name: jnp.exp(v) for name, v in log_scales["w"].items()}


@contextlib.contextmanager
def recording_scores(scores_suffix: str):
    """Collects, into the yielded list, the outputs of the layers named ``*scores_suffix``."""
    scores = []

    def record(name, module, call, args, kwargs):
        out = call(*args, **kwargs)
        if name.endswith(scores_suffix):
            scores.append(out)
        return out

    with intercept.intercept_calls(record):
        yield scores


def block_forward(module: nn.Module, params: Mapping, x: jax.Array, *,
                  policy: Mapping[str, LayerQuant] | None = None,
                  log_scales: Mapping[str, Mapping[str, jax.Array]] | None = None,
                  scores_suffix: str = SCORES_SUFFIX) -> tuple[jax.Array, list[jax.Array]]:
    """One block (unbound ``module``) on tokens ``x`` [batch, tokens, dim], full precision or
    quantized by ``policy`` with ``log_scales``; returns (output, [attention scores per score layer])."""
    variables = {"params": params}
    with recording_scores(scores_suffix) as scores:
        if policy is None:
            out = module.apply(variables, x)
        else:
            policy, weight_scales = apply_scales(policy, log_scales)
            variables = apply.quantize_weights(variables, policy, scales=weight_scales)
            out = apply.quantized_apply(module, variables, policy, x, quantize_kernels=False)
    return out, scores


def score_rows(scores: Sequence[jax.Array], rows: jax.Array | None) -> list[jax.Array]:
    """The query rows ``rows`` of scores [batch, heads, queries, keys] (all when None)."""
    return list(scores) if rows is None else [s[..., rows, :] for s in scores]


def even_rows(tokens: int, num_rows: int | None) -> jax.Array | None:
    """``num_rows`` evenly spaced query rows of ``tokens`` (None = all), for fixed measurements."""
    if num_rows is None or num_rows >= tokens:
        return None
    return jnp.asarray(np.linspace(0, tokens - 1, num_rows).round().astype(np.int32))


def _in_batches(fn: Callable[[np.ndarray], jax.Array], x: np.ndarray, batch_size: int) -> np.ndarray:
    """``fn`` over ``x`` in batches of ``batch_size`` along axis 0, concatenated on the host."""
    return np.concatenate([np.asarray(fn(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


@functools.lru_cache(maxsize=8)
def _block_functions(module: nn.Module, scores_suffix: str, similarity_kind: str):
    """Jitted loss and Adam step of one block architecture (shared by equal blocks: one compilation)."""

    def loss(log_scales, params, policy, x_q, x_fp, rows, gamma, margin):
        fp_out, fp_scores = block_forward(module, params, x_fp, scores_suffix=scores_suffix)
        q_out, q_scores = block_forward(module, params, x_q, policy=policy, log_scales=log_scales,
                                        scores_suffix=scores_suffix)
        fp_out, fp_scores = jax.lax.stop_gradient((fp_out, fp_scores))
        return ranking_objective(fp_out, q_out, score_rows(fp_scores, rows), score_rows(q_scores, rows),
                                 gamma=gamma, margin=margin, similarity_kind=similarity_kind)

    def adam_step(log_scales, opt_state, learning_rate, params, policy, x_q, x_fp, rows, gamma, margin):
        (value, parts), grads = jax.value_and_grad(loss, has_aux=True)(
            log_scales, params, policy, x_q, x_fp, rows, gamma, margin)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float rates
            updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, log_scales)
        return optax.apply_updates(log_scales, updates), opt_state, value, parts

    forward = lambda params, policy, log_scales, x: block_forward(
        module, params, x, policy=policy, log_scales=log_scales, scores_suffix=scores_suffix)[0]
    fp_forward = lambda params, x: block_forward(module, params, x, scores_suffix=scores_suffix)[0]
    return jax.jit(loss), jax.jit(adam_step), jax.jit(forward), jax.jit(fp_forward)


# ---------------------------------------------------------------- the whole model


@dataclasses.dataclass(frozen=True)
class Block:
    """A transformer block of a model: its path (``blocks.3``) and an unbound copy of its module."""

    path: str
    module: nn.Module


def find_blocks(model: nn.Module, example: jax.ShapeDtypeStruct, *,
                is_block: Callable[[nn.Module], bool]) -> list[Block]:
    """The modules for which ``is_block`` holds, in forward order (traced abstractly)."""
    blocks = {}

    def record(name, module, call, args, kwargs):
        blocks.setdefault(name, module.clone(parent=None, name=None))
        return call(*args, **kwargs)

    with intercept.intercept_calls(record, select=is_block):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(example.shape, example.dtype))
    return [Block(path, module) for path, module in blocks.items()]


def first_block_inputs(model: nn.Module, variables: Mapping, images: np.ndarray, *, first: Block,
                       policy: Mapping[str, LayerQuant] | None = None,
                       batch_size: int) -> np.ndarray:
    """The tokens entering block ``first`` for all ``images`` [N, H, W, C] -> [N, tokens, dim],
    from the full-precision model, or from the model quantized by ``policy`` (the layers before
    the block, e.g. the 8-bit patch embedding)."""

    @jax.jit
    def run(variables, policy, x):
        captured = []

        def capture(name, module, call, args, kwargs):
            if name == first.path:
                captured.append(args[0])
            return call(*args, **kwargs)

        with intercept.intercept_calls(capture, select=lambda module: True):
            if policy is None:
                model.apply(variables, x)
            else:
                apply.quantized_apply(model, variables, policy, x)
        return captured[0]

    return _in_batches(lambda x: run(variables, policy, x), images, batch_size)


@dataclasses.dataclass
class RankingResult:
    """Output of :func:`ranking_ptq`.

    Attributes:
      policy: the input policy with optimised activation clips.
      weight_scales: ``{layer: per-output-channel scale [out]}`` of the optimised layers, for
        ``apply.quantize_weights(variables, policy, scales=weight_scales)``.
      blocks: per block: path, objective/similarity/rank before and after, steps, seconds.
      stopped_at: ``{'block', 'step', 'loss'}`` if a non-finite loss stopped the optimisation
        (that block and the later ones keep their calibrated scales), else None.
    """

    policy: dict[str, LayerQuant]
    weight_scales: dict[str, jax.Array]
    blocks: list[dict[str, Any]]
    stopped_at: dict[str, Any] | None = None


def check_options(*, gamma: float, steps: int, method: str, similarity_kind: str, margin: float,
                  batch_size: int, learning_rate: float) -> None:
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if similarity_kind not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity_kind!r}")
    if not margin >= 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if batch_size < 1 or not learning_rate > 0:
        raise ValueError(f"batch_size must be >= 1 and learning_rate > 0, got {batch_size}, {learning_rate}")


def ranking_ptq(model: nn.Module, variables: Mapping, policy: Mapping[str, LayerQuant],
                images: np.ndarray, *, is_block: Callable[[nn.Module], bool], method: str = "adam",
                steps: int = 200, batch_size: int = 32, learning_rate: float = 1e-2,
                gamma: float = 0.1, margin: float = 0.0, similarity_kind: str = "pearson",
                num_rows: int | None = 32, grid: Sequence[float] = tuple(np.linspace(0.3, 1.2, 19)),
                seed: int = 0, scores_suffix: str = SCORES_SUFFIX,
                on_block: Callable[[dict[str, Any]], None] | None = None) -> RankingResult:
    """Ranking-aware PTQ: optimises the scales of every transformer block of ``model``.

    Args:
      model, variables: the full-precision ViT.
      policy: a calibrated policy (its bits and absmax clips are the starting point).
      images: calibration images [N, H, W, C], preprocessed.
      is_block: which modules are the transformer blocks (e.g. ``isinstance(m, vit.Block)``).
      method: ``adam`` (``steps`` Adam steps of ``batch_size`` random images per block) or
        ``grid`` (``steps`` rounds of the alternating search: each layer's weight scales, then
        its activation clips, set to the best multiple in ``grid`` of their calibrated value,
        on the first ``batch_size`` images).
      gamma: γ, weight of the rank loss. margin: θ.
      similarity_kind: ``pearson`` or ``cosine``.
      num_rows: attention query rows ranked per step (random; None = all). The pairs of one
        row number K^2/2, so DeiT's 197 tokens make all rows costly.
      seed: of the mini-batches and rows.
      on_block: called with each block's report, for progress output.

    Raises:
      ValueError: bad options, a model without attention blocks or score layers.
    """
    check_options(gamma=gamma, steps=steps, method=method, similarity_kind=similarity_kind,
                  margin=margin, batch_size=batch_size, learning_rate=learning_rate)
    images = np.asarray(images)
    blocks = find_blocks(model, jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype), is_block=is_block)
    score_layers = [n for n in policy if n.endswith(scores_suffix)]
    if not blocks or not score_layers:
        raise ValueError(f"{type(model).__name__} has no attention layers (no transformer blocks or "
                         f"'*{scores_suffix}' layers in the policy): ranking-aware PTQ needs a ViT")
    x_fp = first_block_inputs(model, variables, images, first=blocks[0], batch_size=batch_size)
    qvars = apply.quantize_weights(variables, policy)
    x_q = first_block_inputs(model, qvars, images, first=blocks[0], policy=policy, batch_size=batch_size)

    rng = np.random.default_rng(seed)
    policy, weight_scales, reports, stopped_at = dict(policy), {}, [], None
    fixed = np.arange(min(batch_size, len(images)))
    for block in blocks:
        started = time.perf_counter()
        params = intercept.module_variables(variables, block.path)
        local = block_policy(policy, block.path)
        init = init_block_scales(params, local)
        loss_fn, adam_step, forward, fp_forward = _block_functions(block.module, scores_suffix, similarity_kind)
        tokens = x_q.shape[1]
        pick_rows = lambda: (None if num_rows is None or num_rows >= tokens
                             else jnp.asarray(np.sort(rng.choice(tokens, num_rows, replace=False))))
        eval_rows = even_rows(tokens, num_rows)
        evaluate = lambda ls: loss_fn(ls, params, local, x_q[fixed], x_fp[fixed], eval_rows, gamma, margin)
        before, before_parts = evaluate(init)
        log_scales, failure = init, None
        if stopped_at is None:
            if method == "adam":
                log_scales, failure = _optimize_adam(adam_step, init, params, local, x_q, x_fp, rng,
                                                     pick_rows, steps=steps, batch_size=batch_size,
                                                     learning_rate=learning_rate, gamma=gamma, margin=margin)
            else:
                log_scales, failure = search_grid(evaluate, init, grid=grid, rounds=steps)
        if failure is not None:
            stopped_at = {"block": block.path, **failure}
            log_scales = init
        after, after_parts = evaluate(log_scales)
        local_policy, local_scales = apply_scales(local, log_scales)
        policy.update({f"{block.path}.{k}": v for k, v in local_policy.items()})
        weight_scales.update({f"{block.path}.{k}": v for k, v in local_scales.items()})
        x_q = _in_batches(lambda x: forward(params, local, log_scales, x), x_q, batch_size)
        x_fp = _in_batches(lambda x: fp_forward(params, x), x_fp, batch_size)
        report = {"block": block.path, "method": method, "optimized": stopped_at is None,
                  "objective_before": float(before), "objective_after": float(after),
                  "similarity_before": float(before_parts["similarity"]),
                  "similarity_after": float(after_parts["similarity"]),
                  "rank_before": float(before_parts["rank"]), "rank_after": float(after_parts["rank"]),
                  "seconds": time.perf_counter() - started}
        reports.append(report)
        if on_block is not None:
            on_block(report)
    return RankingResult(policy, weight_scales, reports, stopped_at)


def _optimize_adam(adam_step, init, params, policy, x_q, x_fp, rng, pick_rows, *, steps, batch_size,
                   learning_rate, gamma, margin):
    log_scales = init
    opt_state = optax.adam(learning_rate).init(init)
    for step in range(1, steps + 1):
        idx = np.sort(rng.choice(len(x_q), min(batch_size, len(x_q)), replace=False))
        log_scales, opt_state, value, _ = adam_step(log_scales, opt_state, learning_rate, params, policy,
                                                    x_q[idx], x_fp[idx], pick_rows(), gamma, margin)
        if not np.isfinite(float(value)):
            return init, {"step": step, "loss": float(value)}
    return log_scales, None


def attention_agreement(model: nn.Module, variables: Mapping, qvariables: Mapping,
                        policy: Mapping[str, LayerQuant], images: jax.Array, *,
                        num_rows: int | None = 32, scores_suffix: str = SCORES_SUFFIX) -> dict[str, jax.Array]:
    """How far the quantized model keeps the full-precision one, on a batch of images.

    Returns ``kept_order`` (the share of attention-score key pairs, over every score layer and
    ``num_rows`` evenly spaced query rows, whose order the quantized model keeps) and
    ``logit_similarity`` (Pearson correlation of the logits, mean over images).
    ``qvariables``: the quantized weights (``apply.quantize_weights``).
    """
    with recording_scores(scores_suffix) as fp_scores:
        fp_logits = model.apply(variables, images)
    with recording_scores(scores_suffix) as q_scores:
        q_logits = apply.quantized_apply(model, qvariables, policy, images, quantize_kernels=False)
    if not fp_scores:
        raise ValueError(f"no '*{scores_suffix}' layers in {type(model).__name__}")
    rows = even_rows(fp_scores[0].shape[-2], num_rows)
    kept = jnp.mean(jnp.stack([kept_order_fraction(a, b) for a, b in
                               zip(score_rows(fp_scores, rows), score_rows(q_scores, rows))]))
    return {"kept_order": kept, "logit_similarity": jnp.mean(pearson_correlation(fp_logits, q_logits))}
