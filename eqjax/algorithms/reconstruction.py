"""Reconstruction PTQ of any Flax model, unit by unit: AdaRound, BRECQ and QDrop.

A *unit* is a block of the model (a ResNet BasicBlock, an EfficientNet block, a ViT block:
whatever ``is_block`` selects) or a single quantizable layer outside every block. Units are
reconstructed in forward order. For unit k, with ``x_q`` its input in the model whose earlier
units are already quantized and ``x_fp`` its full-precision input, minimise

    ||unit_q(x) − unit_fp(x_fp)||²  +  λ · Σ (1 − |2h(V) − 1|^β)

over the rounding variables V of every weight in the unit (AdaRound, see
:mod:`eqjax.algorithms.reconstruction_core`) and, for BRECQ and QDrop, the log activation clips of every
layer input in the unit (LSQ gradients through :func:`eqjax.quant.numerics.fake_quant`), with Adam
(optax) on mini-batches of the calibration images. ``x`` is ``x_q`` (AdaRound, BRECQ) or,
for QDrop, ``x_q`` with each element replaced by ``x_fp`` with probability ``p``; QDrop also
drops the quantization of each activation inside the unit with probability ``p``.

* ``adaround``: every layer is its own unit, activation clips stay as calibrated;
* ``brecq``:    blocks as units, clips learned jointly (Li et al., ICLR 2021);
* ``qdrop``:    as brecq, with drop probability ``p`` (0.5; Wei et al., ICLR 2022); p = 0 is brecq.

Weight scales stay at the calibrated per-channel values; the rounding becomes hard at the
end. Bits are data and units of one architecture share one compiled step. A unit's calibration
activations stay on the device and its mini-batches are drawn there (:func:`_optimize`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqjax import storage
from eqjax.quant import apply, calibration, intercept, nnx_model, numerics, policy as policy_lib
from eqjax.quant.layers import is_weighted
from eqjax.algorithms import metrics, ranking
from eqjax.algorithms import reconstruction_core as core
from eqjax.quant.policy import LayerQuant, Policy

METHODS = ("adaround", "brecq", "qdrop")

__all__ = ["METHODS", "ReconstructionConfig", "Unit", "ReconstructionResult", "find_units", "reconstruct", "integer_kernel",
           "fisher_weights", "quantized_variables", "save", "load"]


ACTIVATION_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReconstructionConfig:
    """How to reconstruct. Checked on construction (errors name the field).

    Attributes:
      method: ``adaround``, ``brecq`` or ``qdrop``.
      iterations: Adam steps per unit.
      batch_size: calibration images per step.
      rounding_lr: Adam learning rate of the rounding variables V.
      clip_lr: Adam learning rate of the log activation clips (brecq, qdrop).
      rounding_weight: λ of the rounding regularizer.
      warmup: share of the iterations without the regularizer.
      beta: (start, end) of the annealed exponent β.
      drop_prob: QDrop's p (qdrop only; 0 makes it brecq).
      fisher: weight each unit's output error by the diagonal Fisher (BRECQ): the squared
        gradient of KL(FP ‖ quantized) w.r.t. the unit output in the round-to-nearest model,
        normalised to mean 1 per unit (so ``rounding_weight`` keeps its meaning).
      ranking_weight: γ of an extra ranking-aware term for ViT blocks (Liu et al., 2021):
        ``γ · L_rank`` between the full-precision and quantized attention scores of the unit's
        ``*.qk_matmul`` layers on ``ranking_rows`` evenly spaced query rows; 0 = off.
      ranking_rows: query rows per score layer in the ranking term.
      seed: mini-batches and QDrop masks.
      activation_dtype: how a unit's calibration activations (inputs, targets, Fisher weights)
        are held on the device: ``float32`` or ``bfloat16`` (half the memory; each mini-batch
        is computed in float32).
      chunk_steps: optimisation steps per compiled call (a ``lax.fori_loop``); None: 1 on the CPU,
        100 elsewhere (:func:`steps_per_call`). The loss is checked for non-finite values and
        progress reported at the first call end at least 100 steps after the last check.
    """

    method: str = "brecq"
    iterations: int = 1000
    batch_size: int = 32
    rounding_lr: float = 1e-3
    clip_lr: float = 1e-3
    rounding_weight: float = 0.01
    warmup: float = 0.2
    beta: tuple[float, float] = (20.0, 2.0)
    drop_prob: float = 0.5
    fisher: bool = False
    ranking_weight: float = 0.0
    ranking_rows: int = 32
    seed: int = 0
    activation_dtype: str = "float32"
    chunk_steps: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(f"activation_dtype must be one of {ACTIVATION_DTYPES}, got {self.activation_dtype!r}")
        if self.chunk_steps is not None and self.chunk_steps < 1:
            raise ValueError(f"chunk_steps must be >= 1 or None, got {self.chunk_steps}")
        for name in ("iterations", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rounding_lr", "clip_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("rounding_weight", "ranking_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ranking_rows < 1:
            raise ValueError(f"ranking_rows must be >= 1, got {self.ranking_rows}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {self.drop_prob}")

    @property
    def learns_clips(self) -> bool:
        return self.method != "adaround"

    @property
    def effective_drop_prob(self) -> float:
        return self.drop_prob if self.method == "qdrop" else 0.0


@dataclasses.dataclass(frozen=True)
class Unit:
    """A reconstruction unit: its module path, an unbound copy of its module, the non-array
    arguments it is called with, and the global names of its quantizable layers."""

    path: str
    module: Any  # an unbound Linen module, or an NnxModel of the NNX submodule
    static_args: tuple
    layers: tuple[str, ...]

    def local(self, name: str) -> str:
        """The layer's name inside the unit ("" for a single-layer unit)."""
        return "" if name == self.path else name[len(self.path) + 1:]


def find_units(model: nn.Module, example: Any, policy: Mapping[str, LayerQuant], *,
               is_block: Callable[[nn.Module], bool] | None = None,
               blocks: Sequence[str] | None = None) -> list[Unit]:
    """The units of ``model`` in forward order, traced abstractly.

    Args:
      example: an input batch (array or ShapeDtypeStruct).
      policy: the layers to quantize (every one ends up in exactly one unit).
      is_block: which modules are blocks; None makes every layer its own unit.
      blocks: instead of ``is_block``, the module paths of the blocks.

    Raises:
      ValueError: a block path that names no module of the model.
    """
    wanted = set(blocks or ())
    if blocks:
        select_block = lambda name, module: name in wanted
    else:
        select_block = lambda name, module: is_block is not None and is_block(module)
    found: dict[str, tuple[nn.Module, tuple, bool]] = {}  # path -> (unbound module, static args, is block)

    def record(name, module, call, args, kwargs):
        inside_block = any(name.startswith(p + ".") for p, (_, _, block) in found.items() if block)
        if not inside_block and name not in found:
            block = select_block(name, module)
            if block or (is_weighted(module) and name in policy):
                static = tuple(a for a in args[1:] if not hasattr(a, "shape"))  # e.g. train=False
                unbound = (model.submodel(name) if isinstance(model, nnx_model.NnxModel)
                           else module.clone(parent=None, name=None))
                found[name] = (unbound, static, block)
        return call(*args, **kwargs)

    example = jax.ShapeDtypeStruct(np.shape(example), getattr(example, "dtype", jnp.float32))
    with intercept.intercept_calls(record, select=lambda module: True):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)
    missing_blocks = sorted(wanted - set(found))
    if missing_blocks:
        raise ValueError(f"blocks that name no module of the model: {', '.join(missing_blocks)}")
    units = []
    for path, (module, static, block) in found.items():
        layers = tuple(n for n in policy if n == path or (block and n.startswith(path + ".")))
        if layers:
            units.append(Unit(path, module, static, layers))
    covered = {n for u in units for n in u.layers}
    # Parameter-free layers outside every block (attention matmuls) keep their calibrated clips.
    missing = [n for n, lq in policy.items() if n not in covered and bool(lq.w_enabled)]
    if missing:
        raise ValueError(f"policy layers in no unit (not called by the model?): {', '.join(missing)}")
    return units


@dataclasses.dataclass
class ReconstructionResult:
    """Output of :func:`reconstruct`.

    Attributes:
      policy: the input policy with the learned activation clips.
      rounding: ``{layer: int8 [kernel shape]}``, 1 where the weight rounds up (floor + 1).
      weight_scales: ``{layer: float32 [out]}`` the per-channel scales used.
      units: per unit: path, layers, loss before/after, iterations, seconds, stopped.
      info: method, iterations, images, wall time (for results.json).
    """

    policy: Policy
    rounding: dict[str, np.ndarray]
    weight_scales: dict[str, np.ndarray]
    units: list[dict[str, Any]]
    info: dict[str, Any]


def _channel_scale(scale: jax.Array, kernel: jax.Array, lq: LayerQuant) -> jax.Array:
    """A flat per-output-channel scale shaped to broadcast against its kernel."""
    return jnp.reshape(scale, apply.channel_shape(kernel.shape, apply.channel_axes(lq, kernel.ndim)))


def _sub_variables(variables: Mapping, path: str) -> dict:
    found = {c: intercept.module_variables(variables, path, collection=c) for c in variables}
    return {c: v for c, v in found.items() if v is not None}


def _kernels(sub_vars: Mapping, policy: Mapping[str, LayerQuant], local_names: Sequence[str], scales, v,
             q_ranges, hard) -> dict:
    """Unit variables with each weighted layer's kernel AdaRound-quantized."""
    out = dict(sub_vars)
    for name in local_names:
        kernel = intercept.module_variables(sub_vars, name)["kernel"]
        q_min, q_max = q_ranges[name]
        quantized = core.adaround_weights(kernel, _channel_scale(scales[name], kernel, policy[name]), v[name], q_min, q_max,
                                          hard=hard)
        out = intercept.replace_module_variable(out, name, "kernel", quantized.astype(kernel.dtype))
    return out


def _unit_forward(unit_module, static_args, sub_vars, policy, state, scales, x, key, drop_prob, *,
                  quantize: bool = True, hard=False):
    """The unit on ``x``: full precision, or with AdaRound weights and (learned) clips, QDrop'd."""
    if not quantize:
        return unit_module.apply(sub_vars, x, *static_args)
    q_ranges = {n: numerics.quant_range(policy[n].w_bits) for n in state["v"]}
    variables = _kernels(sub_vars, policy, list(state["v"]), scales, state["v"], q_ranges, hard)
    keys = iter(jax.random.split(key, 4 * len(policy) + 1))

    def quantize_inputs(name, module, call, args, kwargs):
        lq = policy[name]
        if name in state["a"]:
            lq = lq._replace(a_clip=jnp.exp(state["a"][name]))
        quantized = apply.quantize_layer_inputs(lq, args)
        mixed = [core.drop_quantization(next(keys), a, q, drop_prob) for a, q in zip(args, quantized)]
        return call(*mixed, **kwargs)

    with intercept.intercept_calls(quantize_inputs):
        return unit_module.apply(variables, x, *static_args)


@functools.lru_cache(maxsize=32)
def _unit_functions(unit_module: nn.Module, static_args: tuple, ranking_rows: int | None = None):
    """Jitted step, loss and forwards of one unit architecture (equal units: one compilation);
    ``ranking_rows`` adds the ranking term on that many query rows of each score layer."""

    def scores_of(forward):
        if ranking_rows is None:
            return forward(), []
        with ranking.recording_scores(ranking.SCORES_SUFFIX) as scores:
            out = forward()
        return out, scores

    def objective(state, sub_vars, policy, scales, x, target, fisher, key, drop_prob, beta, reg_on, weight,
                  fp_scores, ranking_weight):
        out, q_scores = scores_of(lambda: _unit_forward(unit_module, static_args, sub_vars, policy, state, scales,
                                                        x, key, drop_prob))
        error = core.reconstruction_error(out, target, fisher)
        reg = sum((core.rounding_regularizer(v, beta) for v in state["v"].values()), jnp.zeros(()))
        loss = error + jnp.where(reg_on, weight, 0.0) * reg
        if q_scores:
            rows = ranking.even_rows(q_scores[0].shape[-2], ranking_rows)
            rank = jnp.mean(jnp.stack([ranking.ranking_loss(a, b) for a, b in
                                       zip(ranking.score_rows(fp_scores, rows), ranking.score_rows(q_scores, rows))]))
            loss = loss + ranking_weight * rank
        return loss, error

    def step(state, opt_state, sub_vars, policy, scales, x_q, x_fp, target, fisher, key, step_index, hyper):
        beta, reg_on = core.beta_schedule(step_index, hyper["iterations"], warmup=hyper["warmup"],
                                          start=hyper["beta_start"], end=hyper["beta_end"])
        input_key, key = jax.random.split(key)
        x = core.drop_quantization(input_key, x_fp, x_q, hyper["drop_prob"])
        fp_scores = (scores_of(lambda: unit_module.apply(sub_vars, x_fp, *static_args))[1]
                     if ranking_rows is not None else [])
        (loss, error), grads = jax.value_and_grad(objective, has_aux=True)(
            state, sub_vars, policy, scales, x, target, fisher, key, hyper["drop_prob"], beta, reg_on,
            hyper["rounding_weight"], fp_scores, hyper["ranking_weight"])
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float rates
            updates, opt_state = _optimizer(hyper["rounding_lr"], hyper["clip_lr"]).update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss, error

    def sampled_step(carry, step_index, sub_vars, policy, scales, data, hyper, batch):
        """One step on ``batch`` images drawn with the carried key from the device-resident ``data``
        = (x_q, x_fp, target, fisher or None); carry = (state, opt_state, key, loss, error, bad)."""
        state, opt_state, key, _, _, bad = carry
        key, pick, sub = jax.random.split(key, 3)
        idx = jax.random.choice(pick, data[0].shape[0], (batch,), replace=False)
        x_q, x_fp, target, fisher = (None if a is None else jnp.take(a, idx, axis=0).astype(jnp.float32)
                                     for a in data)
        state, opt_state, loss, error = step(state, opt_state, sub_vars, policy, scales, x_q, x_fp, target, fisher,
                                             sub, step_index.astype(jnp.float32), hyper)
        return state, opt_state, key, loss, error, bad | ~jnp.isfinite(loss)

    def chunk(carry, first, count, sub_vars, policy, scales, data, hyper, batch):
        """``count`` sampled steps from step ``first`` (both traced) in one ``lax.fori_loop``."""
        return jax.lax.fori_loop(0, count, lambda i, c: sampled_step(c, first + i, sub_vars, policy, scales, data,
                                                                      hyper, batch), carry)

    def error(state, sub_vars, policy, scales, x, target, hard):
        out = _unit_forward(unit_module, static_args, sub_vars, policy, state, scales, x, jax.random.key(0),
                            0.0, hard=hard)
        return core.reconstruction_error(out, target)

    def fp_forward(sub_vars, x):
        return unit_module.apply(sub_vars, x, *static_args)

    return UnitFunctions(jax.jit(step), jax.jit(sampled_step, static_argnames="batch"),
                         jax.jit(chunk, static_argnames="batch"), jax.jit(error), jax.jit(fp_forward))


class UnitFunctions(NamedTuple):
    """The compiled functions of one unit architecture (see :func:`_unit_functions`)."""

    step: Callable
    sampled_step: Callable
    chunk: Callable
    error: Callable
    fp_forward: Callable


def _optimizer(rounding_lr, clip_lr) -> optax.GradientTransformation:
    return optax.multi_transform({"v": optax.adam(rounding_lr), "a": optax.adam(clip_lr)},
                                 lambda state: {k: jax.tree_util.tree_map(lambda _: k, state[k]) for k in state})


@functools.lru_cache(maxsize=8)
def _capture_function(model: nn.Module, paths: tuple[str, ...]):
    """Jitted ``(variables, policy, images) -> {path: input of unit path}``, quantized by ``policy``
    (its kernels already in ``variables``)."""

    def capture(variables, policy, images):
        captured = {}

        def record(name, module, call, args, kwargs):
            if name in paths and name not in captured:
                captured[name] = args[0]
            return call(*args, **kwargs)

        with intercept.intercept_calls(record, select=lambda module: True):
            apply.quantized_apply(model, variables, policy, images, quantize_kernels=False)
        return captured

    return jax.jit(capture)


@functools.lru_cache(maxsize=8)
def _output_gradient_function(model: nn.Module, paths: tuple[str, ...]):
    """Jitted ``(variables, policy, images, fp_logits) -> {path: ∂KL/∂(output of unit path)}``
    in the model quantized by ``policy`` (kernels already in ``variables``); KL(FP ‖ quantized)
    is summed over the images, so each image's gradient is its own."""

    def outputs(variables, policy, images, perturbations):
        seen = {}

        def add(name, module, call, args, kwargs):
            out = call(*args, **kwargs)
            if name in paths and name not in seen:
                seen[name] = out
                if perturbations is not None:
                    out = out + perturbations[name]
            return out

        with intercept.intercept_calls(add, select=lambda module: True):
            logits = apply.quantized_apply(model, variables, policy, images, quantize_kernels=False)
        return logits, seen

    def gradients(variables, policy, images, fp_logits):
        _, shapes = jax.eval_shape(lambda: outputs(variables, policy, images, None))

        def kl(perturbations):
            logits, _ = outputs(variables, policy, images, perturbations)
            fp = jax.nn.log_softmax(fp_logits.astype(jnp.float32))
            return jnp.sum(jnp.exp(fp) * (fp - jax.nn.log_softmax(logits.astype(jnp.float32))))

        return jax.grad(kl)({n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()})

    return jax.jit(gradients)


def fisher_weights(model: nn.Module, variables: Mapping, policy: Policy, images: np.ndarray,
                   paths: Sequence[str], *, weight_method: str = "absmax", batch_size: int = 32
                   ) -> dict[str, np.ndarray]:
    """BRECQ's diagonal Fisher of each unit output: ``g²/mean(g²)`` [N, *output shape] with ``g``
    the gradient of KL(FP ‖ round-to-nearest model) w.r.t. the output of unit ``path``."""
    model, variables = nnx_model.as_functional(model, variables)
    qvars = apply.quantize_weights(variables, policy, method=weight_method)
    gradient_fn = _output_gradient_function(model, tuple(paths))
    fp_logits = jax.jit(model.apply)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in paths}
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        for path, g in gradient_fn(qvars, policy, x, fp_logits(variables, x)).items():
            parts[path].append(np.square(np.asarray(g, np.float32)))
    out = {}
    for path, squares in parts.items():
        square = np.concatenate(squares)
        mean = float(square.mean())
        out[path] = square / mean if mean > 0 else np.ones_like(square)
    return out


def _batched(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(fn(x[i:i + batch_size])) for i in range(0, len(x), batch_size)])


def _disabled(policy: Policy) -> Policy:
    return {n: lq._replace(w_enabled=jnp.asarray(False), a_enabled=jnp.asarray(False)) for n, lq in policy.items()}


def hyperparameters(config: ReconstructionConfig) -> dict[str, jax.Array]:
    """The step's settings as data (one compilation for any of them)."""
    return {"iterations": jnp.float32(config.iterations), "warmup": jnp.float32(config.warmup),
            "beta_start": jnp.float32(config.beta[0]), "beta_end": jnp.float32(config.beta[1]),
            "drop_prob": jnp.float32(config.effective_drop_prob),
            "rounding_weight": jnp.float32(config.rounding_weight),
            "rounding_lr": jnp.float32(config.rounding_lr), "clip_lr": jnp.float32(config.clip_lr),
            "ranking_weight": jnp.float32(config.ranking_weight)}


class UnitProblem(NamedTuple):
    """What one unit's optimisation starts from: its variables, local policy (names inside the
    unit), per-channel weight scales, initial state ``{'v': rounding variables, 'a': log-clips}``,
    inputs ``x_q`` / ``x_fp`` and FP target [N, ...] (host arrays), and the unit architecture's
    compiled :class:`UnitFunctions`."""

    sub_vars: dict
    policy: dict
    scales: dict
    state: dict
    x_q: np.ndarray
    x_fp: np.ndarray
    target: np.ndarray
    functions: "UnitFunctions"


def unit_problem(model: nn.Module, variables: Mapping, policy: Policy, rounding: Mapping, weight_scales: Mapping,
                 unit: "Unit", images: np.ndarray, config: ReconstructionConfig, *, weight_method: str = "absmax",
                 capture=None) -> UnitProblem | None:
    """The optimisation problem of ``unit`` with the units in ``rounding`` already reconstructed
    (None when the unit has nothing to learn)."""
    sub_vars = _sub_variables(variables, unit.path)
    local_policy = {unit.local(n): policy[n] for n in unit.layers}
    kernels = {unit.local(n): intercept.module_variables(variables, n)["kernel"] for n in unit.layers
               if bool(policy[n].w_enabled)}
    scales = {n: apply.kernel_scale(k, local_policy[n].w_bits, method=weight_method,
                                    axes=apply.channel_axes(local_policy[n], k.ndim))
              for n, k in kernels.items()}
    state = {"v": {n: core.init_rounding(k, _channel_scale(scales[n], k, local_policy[n])) for n, k in kernels.items()},
             "a": {n: jnp.log(lq.a_clip) for n, lq in local_policy.items()
                   if config.learns_clips and bool(lq.a_enabled)}}
    if not state["v"] and not state["a"]:
        return None
    capture = capture or _capture_function(model, (unit.path,))
    # Inputs: full precision, and with the finished units quantized as learned.
    qvars = quantized_variables(variables, policy, rounding, weight_scales)
    fp_policy = _disabled(policy)
    x_fp = _batched(lambda x: capture(variables, fp_policy, x)[unit.path], images, 64)
    x_q = _batched(lambda x: capture(qvars, policy, x)[unit.path], images, 64)
    functions = _unit_functions(unit.module, unit.static_args,
                                config.ranking_rows if config.ranking_weight > 0 else None)
    target = _batched(lambda x: functions.fp_forward(sub_vars, x), x_fp, 64)
    return UnitProblem(sub_vars, local_policy, scales, state, x_q, x_fp, target, functions)


def reconstruct(model: nn.Module, variables: Mapping, policy: Policy, images: np.ndarray,
                config: ReconstructionConfig = ReconstructionConfig(), *,
                is_block: Callable[[nn.Module], bool] | None = None, blocks: Sequence[str] | None = None,
                weight_method: str = "absmax",
                on_progress: Callable[[dict[str, Any]], None] | None = None,
                checkpoint_dir: str | None = None) -> ReconstructionResult:
    """Reconstructs every unit of ``model`` in forward order (see the module docstring).

    Args:
      model, variables: the full-precision model.
      policy: a calibrated policy (bits, clips to start from; the first/last rule included).
      images: calibration images [N, H, W, C], preprocessed.
      config: method and optimisation settings.
      is_block / blocks: which modules are blocks (ignored by ``adaround``: layer by layer).
      weight_method: the per-channel weight scale estimator (scales stay fixed).
      on_progress: called after each unit and every 100 steps with ``{'unit', 'index',
        'units', 'step', 'iterations', 'error', 'eta_s'}``.
      checkpoint_dir: where the state is saved after every unit. A run that finds a state
        there made for the same model variables, policy, images and config resumes after its
        last finished unit, with the random streams where they were, so the result equals an
        uninterrupted run's; a state made for anything else is an error, a damaged one is
        moved aside and the reconstruction starts again.

    Returns:
      :class:`ReconstructionResult`; :func:`quantized_variables` gives the model's weights.

    Raises:
      ValueError: an uncalibrated policy, blocks that name no module, no images.
    """
    model, variables = nnx_model.as_functional(model, variables)
    policy_lib.check_calibrated(policy)
    calibration._check_method(weight_method)
    images = np.asarray(images)
    if len(images) == 0:
        raise ValueError("no calibration images")
    if config.method == "adaround":
        is_block, blocks = None, None
    units = find_units(model, images[:1], policy, is_block=is_block, blocks=blocks)
    started = time.perf_counter()
    key = jax.random.key(config.seed)
    hyper = hyperparameters(config)
    capture = _capture_function(model, tuple(u.path for u in units))
    fisher = (fisher_weights(model, variables, policy, images, [u.path for u in units], weight_method=weight_method)
              if config.fisher else {})
    policy = dict(policy)
    rounding, weight_scales, reports = {}, {}, []
    batch = min(config.batch_size, len(images))
    fixed = np.arange(min(len(images), 64))  # the images of the before/after error
    fingerprint = _fingerprint(units, variables, policy, images, config, weight_method)
    first_unit = 0
    saved = _resumable_state(checkpoint_dir, policy, on_progress)
    if saved is not None:
        resume = saved.info.get("resume") or {}
        if resume.get("fingerprint") != fingerprint:
            raise ValueError(f"{checkpoint_dir} holds a reconstruction of other images, layers or settings; "
                             "remove it or use another workdir")
        policy, rounding, weight_scales, reports = dict(saved.policy), dict(saved.rounding), \
            dict(saved.weight_scales), list(saved.units)
        first_unit = resume["next_unit"]
        key = jax.random.wrap_key_data(jnp.asarray(resume["key"], jnp.uint32))
        started -= resume["seconds"]
        if on_progress is not None:
            on_progress({"resumed": True, "index": first_unit, "units": len(units), "path": checkpoint_dir})
    for index, unit in enumerate(units):
        if index < first_unit:
            continue
        unit_start = time.perf_counter()
        problem = unit_problem(model, variables, policy, rounding, weight_scales, unit, images, config,
                               weight_method=weight_method, capture=capture)
        if problem is None:
            continue  # nothing to learn (e.g. a unit whose layers are all disabled)
        sub_vars, local_policy, scales, state = problem.sub_vars, problem.policy, problem.scales, problem.state
        x_q, x_fp, target = problem.x_q, problem.x_fp, problem.target
        error_fn = problem.functions.error
        measure = lambda s: float(error_fn(s, sub_vars, local_policy, scales, x_q[fixed], target[fixed], True))
        before = measure(state)

        def report(it, error):
            if on_progress is not None:
                done = index + it / config.iterations
                on_progress({"unit": unit.path, "index": index, "units": len(units), "step": it,
                             "iterations": config.iterations, "error": error,
                             "eta_s": (time.perf_counter() - started) / done * (len(units) - done)})

        data = device_activations((x_q, x_fp, target, fisher.get(unit.path)), config.activation_dtype)
        state, stopped, key = _optimize(problem.functions, state, (sub_vars, local_policy, scales), data, key=key,
                                        batch=batch, hyper=hyper, config=config, report=report)
        del data
        after = measure(state)
        for local in scales:  # the unit's quantized kernels
            name = f"{unit.path}.{local}" if local else unit.path
            rounding[name] = np.asarray(state["v"][local] >= 0).astype(np.int8)
            weight_scales[name] = np.asarray(scales[local], np.float32)
        for local, log_clip in state["a"].items() if stopped is None else ():  # stopped: calibrated clips
            name = f"{unit.path}.{local}" if local else unit.path
            policy[name] = policy[name]._replace(a_clip=jnp.exp(log_clip).astype(jnp.float32))
        reports.append({"unit": unit.path, "layers": list(unit.layers), "error_nearest": before,
                        "error_after": after, "iterations": config.iterations, "stopped": stopped,
                        "seconds": time.perf_counter() - unit_start})
        if checkpoint_dir is not None:
            resume = {"fingerprint": fingerprint, "next_unit": index + 1,
                      "key": np.asarray(jax.random.key_data(key)).tolist(),
                      "seconds": time.perf_counter() - started}
            save(checkpoint_dir, ReconstructionResult(policy, rounding, weight_scales, reports, {"resume": resume}))
        if on_progress is not None:
            on_progress({"unit": unit.path, "index": index + 1, "units": len(units), "step": config.iterations,
                         "iterations": config.iterations, "error": after, "done": True,
                         "error_nearest": before, "eta_s": (time.perf_counter() - started) / (index + 1)
                         * (len(units) - index - 1)})
    info = {"method": config.method, "iterations": config.iterations, "calibration_images": int(len(images)),
            "batch_size": batch, "drop_prob": config.effective_drop_prob, "units": len(units),
            "weight_method": weight_method, "wall_time_s": time.perf_counter() - started,
            "config": {**dataclasses.asdict(config)},
            "stopped_units": [r["unit"] for r in reports if r["stopped"]]}
    return ReconstructionResult(policy, rounding, weight_scales, reports, info)


def _resumable_state(checkpoint_dir: str | None, policy: Policy, on_progress) -> ReconstructionResult | None:
    """The partial state in ``checkpoint_dir`` if there is an intact one. A damaged one is moved
    aside to ``<checkpoint_dir>.corrupt-<time>`` (reported through ``on_progress`` as
    ``{'discarded': reason, 'moved_to': path}``) and the reconstruction starts again from the first unit."""
    if checkpoint_dir is None or not os.path.isfile(os.path.join(checkpoint_dir, STATE_FILE)):
        return None
    try:
        return load(checkpoint_dir, policy)
    except storage.CorruptFileError as e:
        aside = f"{os.path.abspath(checkpoint_dir)}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(checkpoint_dir, aside)
        if on_progress is not None:
            on_progress({"discarded": str(e), "moved_to": aside})
        return None


def _fingerprint(units, variables, policy, images: np.ndarray, config: ReconstructionConfig,
                 weight_method: str) -> str:
    """A digest of what a reconstruction depends on (a saved partial state must match it)."""
    digest = hashlib.sha256()
    digest.update(json.dumps([[u.path, list(u.layers)] for u in units]).encode())
    for leaf in jax.tree_util.tree_leaves(variables):
        digest.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    optional = lambda a: None if a is None else np.asarray(a).tolist()
    digest.update(json.dumps({n: [int(lq.w_bits), int(lq.a_bits), np.asarray(lq.a_clip).tolist(),
                                  optional(lq.a_kind), optional(lq.a_log_base), optional(lq.a_fine_ratio)]
                              for n, lq in sorted(policy.items())}).encode())
    digest.update(json.dumps([dataclasses.asdict(config), weight_method, LOOP_VERSION], default=str).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def free_device_bytes() -> int | None:
    """Memory free on all local devices together, or None where the backend does not say (CPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" not in stats:
        return None
    return (stats["bytes_limit"] - stats.get("bytes_in_use", 0)) * len(jax.local_devices())


def device_activations(arrays: Sequence[np.ndarray | None], dtype: str) -> tuple:
    """A unit's calibration activations on the device(s) in ``dtype``: sharded along the image axis
    over all local devices when their number divides the images, else on the default device.

    Raises:
      ValueError: they do not fit the memory the device reports free (GPU/TPU), naming their size
        and the ways out.
    """
    arrays = [None if a is None else np.asarray(a) for a in arrays]
    itemsize = jnp.dtype(dtype).itemsize
    needed = sum(a.size * itemsize for a in arrays if a is not None)
    free = free_device_bytes()
    if free is not None and needed > 0.8 * free:
        raise ValueError(f"a unit's calibration activations need {needed / 2**30:.2f} GiB on the device, "
                         f"{free / 2**30:.2f} GiB are free: use fewer calibration images or "
                         "activation_dtype='bfloat16' (--recon_activation_dtype=bfloat16)")
    mesh = metrics.data_mesh()
    sharding = None
    if mesh.size > 1 and len(arrays[0]) % mesh.size == 0:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    place = lambda a: jax.device_put(jnp.asarray(a, dtype), sharding) if sharding else jnp.asarray(a, dtype)
    return tuple(None if a is None else place(a) for a in arrays)


REPORT_EVERY = 100  # steps between loss checks and progress reports (at least)


def steps_per_call(config: ReconstructionConfig) -> int:
    """``config.chunk_steps``, or by default 1 on the CPU and 100 elsewhere: XLA:CPU compiles the
    weight-gradient convolutions inside a loop without its fast convolution kernels (40-90x
    slower, BUILD_NOTES), so there each step is its own call, still sampling on the device."""
    if config.chunk_steps is not None:
        return config.chunk_steps
    return 1 if jax.default_backend() == "cpu" else 100


def _optimize(functions: UnitFunctions, state, unit_args, data, *, key, batch, hyper, config, report):
    """``config.iterations`` Adam steps on mini-batches drawn on the device from the device-resident
    ``data``, :func:`steps_per_call` steps per call; returns (state on the host, stopped, key).

    At the first call end at least ``REPORT_EVERY`` steps after the last check, and at the end,
    the loss is checked (a
    non-finite one anywhere since the start returns the initial state, i.e. nearest rounding and
    calibrated clips, with ``stopped = {'step', 'loss'}``) and progress reported. The mini-batches
    and QDrop masks come from ``key`` alone, so a run resumed with the saved key is exact.
    """
    init_state, opt_state = state, _optimizer(config.rounding_lr, config.clip_lr).init(state)
    zero = jnp.zeros((), jnp.float32)
    carry = (state, opt_state, key, zero, zero, jnp.asarray(False))
    sharding = data[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):  # the carry replicated, as the calls return it
        carry = jax.device_put(carry, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    per_call = steps_per_call(config)
    done, next_check = 0, REPORT_EVERY
    while done < config.iterations:
        count = min(per_call, config.iterations - done)
        if per_call == 1:
            carry = functions.sampled_step(carry, jnp.int32(done), *unit_args, data, hyper, batch=batch)
        else:
            carry = functions.chunk(carry, jnp.int32(done), jnp.int32(count), *unit_args, data, hyper, batch=batch)
        done += count
        if done >= next_check or done == config.iterations:
            next_check = done + REPORT_EVERY
            if bool(carry[5]):
                return init_state, {"step": done, "loss": float(carry[3])}, carry[2]
            report(done, float(carry[4]))
    return jax.device_get(carry[0]), None, carry[2]  # on the host, as it came in (one layout for the error function)


def integer_kernel(kernel: jax.Array, scale: jax.Array, up: Any, lq: LayerQuant) -> jax.Array:
    """``clamp(floor(w/s) + up, q_min, q_max)`` (float32, kernel shape): a reconstructed kernel's
    integers for its flat per-channel ``scale`` [out] and rounding ``up`` (0/1, kernel shape)."""
    scale = _channel_scale(jnp.asarray(scale, jnp.float32), kernel, lq)
    q_min, q_max = (jnp.reshape(q, (1,) * kernel.ndim) for q in numerics.quant_range(lq.w_bits))
    base = jnp.floor(numerics._scaled(jnp.asarray(kernel, jnp.float32), scale))
    return jnp.clip(base + jnp.asarray(up, jnp.float32), q_min, q_max)


def quantized_variables(variables: Mapping, policy: Mapping[str, LayerQuant],
                        rounding: Mapping[str, np.ndarray], weight_scales: Mapping[str, np.ndarray]) -> dict:
    """The model's variables with each reconstructed kernel ``s · clamp(floor(w/s) + up, q_min, q_max)``."""
    out = dict(variables)
    for name, up in rounding.items():
        kernel = intercept.module_variables(variables, name)["kernel"]
        q = integer_kernel(kernel, weight_scales[name], up, policy[name])
        quantized = q * _channel_scale(jnp.asarray(weight_scales[name]), kernel, policy[name])
        out = intercept.replace_module_variable(out, name, "kernel", quantized.astype(kernel.dtype))
    return out


STATE_FILE = "reconstruction.json"
LOOP_VERSION = "device-chunks-1"  # in the fingerprint: a partial state of another loop is not resumed


def save(directory: str, result: ReconstructionResult) -> str:
    """Writes the reconstructed state (rounding, weight scales, clips, bits, info) atomically, with
    the digests :func:`load` checks (:mod:`eqjax.storage`)."""
    arrays = {"rounding": result.rounding, "weight_scales": result.weight_scales,
              "a_clip": {n: np.asarray(lq.a_clip) for n, lq in result.policy.items()},
              "a_signed": {n: np.asarray(lq.a_signed) for n, lq in result.policy.items()}}
    bits = {n: [int(lq.w_bits), int(lq.a_bits)] for n, lq in result.policy.items()}
    return storage.save_tree(directory, arrays, {"info": result.info, "units": result.units, "bits": bits},
                             meta_file=STATE_FILE)


def load(directory: str, policy: Policy) -> ReconstructionResult:
    """Reads :func:`save`'s state for ``policy`` (same layers and bits, else ValueError), checked
    against its digests (else :class:`eqjax.storage.CorruptFileError`)."""
    arrays, meta = storage.load_tree(directory, meta_file=STATE_FILE, what="reconstructed state")
    bits = {n: [int(lq.w_bits), int(lq.a_bits)] for n, lq in policy.items()}
    if meta["bits"] != bits:
        different = sorted(n for n in set(bits) | set(meta["bits"]) if bits.get(n) != meta["bits"].get(n))
        raise ValueError(f"the reconstructed state in {directory} was made for other layers or bits "
                         f"({', '.join(different[:5])}): reconstruct again for this policy")
    new_policy = {n: lq._replace(a_clip=jnp.asarray(arrays["a_clip"][n]), a_signed=jnp.asarray(arrays["a_signed"][n]))
                  for n, lq in policy.items()}
    return ReconstructionResult(new_policy, {n: np.asarray(v) for n, v in arrays["rounding"].items()},
                                {n: np.asarray(v) for n, v in arrays["weight_scales"].items()},
                                meta["units"], meta["info"])
