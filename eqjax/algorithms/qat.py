"""Quantization-aware training with learned step sizes, for any Flax model under any eqjax policy.

The model's parameters, one step size per weight output channel and one per activation input
are trained together (LSQ, Esser et al., ICLR 2020), starting from a calibrated policy: its
weight scales (eq. 4, or given ones, e.g. from reconstruction) and activation clips are the
start, ``s_a = clip / Q_P``. The quantizers are the study's eqs. (3)-(4) with the LSQ gradient
of :func:`eqjax.quant.numerics.fake_quant`; the step sizes' gradients are multiplied by LSQ's
``g = 1 / sqrt(N * Q_P)`` (eq. 5; :func:`eqjax.quant.numerics.lsq_gradient_scale`).

Options (:class:`QatConfig`):
* ``asymmetric``: LSQ+ (Bhalgat et al., CVPRW 2020): every signed activation input gets the
  unsigned grid shifted by a learned offset ``β``, initialised from the calibration range
  (``β = min``, ``s = (max - min) / (2^b - 1)``); ``β = 0`` is the symmetric grid.
* ``batchnorm='fold'`` (default): in every step each BatchNorm is folded into the conv before it
  with its statistics frozen (:func:`eqjax.quant.folding.fold_pairs`; Jacob et al., CVPR 2018),
  so the weights quantized are the ones an integer kernel runs, while the parameters trained stay
  ``W``, ``γ``, ``β`` (training the folded kernel ``W·γ/σ`` itself scales each layer's effective
  learning rate by ``σ²/γ²``); ``'update'``: the model trains in its train mode (statistics
  updating) and the BatchNorms are folded at the end.
* ``distill_weight`` > 0: distillation from the full-precision model,
  ``(1 - α) CE + α T² KL(softmax(t/T) || softmax(z/T))`` (Hinton et al., 2015).

Everything the step reads that is not trained (bits, switches, grids) is data in a
:class:`QatSetup`: one compilation serves every policy of the same layers; an all-off policy
(:func:`control_setup`) trains the full-precision control with the identical step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqjax import storage, training
from eqjax.quant import apply, folding, intercept, numerics, policy as policy_lib
from eqjax.quant.intercept import LayerCall
from eqjax.quant.policy import ChannelAxes, LayerQuant, Policy

__all__ = ["BATCHNORM_MODES", "QatConfig", "QatSetup", "QatStart", "QatResult", "prepare", "control_setup",
           "learned_policy", "forward", "quantized_model", "distillation_loss", "make_optimizer", "init_state", "make_step", "finalize",
           "quantized_variables", "save", "load"]

BATCHNORM_MODES = ("fold", "update")
STATE_FILE = "qat_state.json"
MIN_STEP = 1e-8  # a step size that training drives below this acts as this (never zero or negative)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QatConfig:
    """How the quantized model is trained (errors name the field).

    Attributes:
      batchnorm: ``fold`` (frozen statistics folded before weight quantization) or ``update``.
      asymmetric: LSQ+ learned offsets for the signed activation inputs.
      distill_weight: ``α`` of the distillation loss (0 = plain cross-entropy).
      temperature: ``T`` of the distillation loss.
      label_smoothing: of the cross-entropy term.
      gradient_scale: multiply step-size gradients by LSQ's ``g``.
    """

    batchnorm: str = "fold"
    asymmetric: bool = False
    distill_weight: float = 0.0
    temperature: float = 1.0
    label_smoothing: float = 0.0
    gradient_scale: bool = True

    def __post_init__(self):
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {self.batchnorm!r}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


@flax.struct.dataclass
class QatSetup:
    """What the step reads and never changes; arrays only.

    Attributes:
      policy: bits, switches and grids; its ``a_clip`` / ``a_offset`` are replaced by the
        learned ones in every step.
      weight_elements: ``{layer: N}`` float32 [] weights per output channel (LSQ's ``N_W``).
      input_elements: ``{layer: N}`` float32 [n] values per image of each input (``N_F``).
      folded: the (layer, BatchNorm) pairs folded in every step (``fold`` mode; static structure,
        the same for every policy of a model).
    """

    policy: Policy
    weight_elements: dict
    input_elements: dict
    folded: tuple = flax.struct.field(pytree_node=False, default=())


class QatStart(NamedTuple):
    """What :func:`prepare` returns.

    Attributes:
      variables: the model's variables (full precision; BatchNorms not folded).
      setup: the :class:`QatSetup`.
      trainables: ``{'model': params, 'w_step': {layer: [C]}, 'a_step': {layer: [n]}}`` plus
        ``'a_offset': {layer: [n]}`` when asymmetric.
    """

    variables: dict
    setup: QatSetup
    trainables: dict


class QatResult(NamedTuple):
    """A trained quantized model: ``quantized_variables(result)`` and ``result.policy`` are its
    quantized forward (:func:`eqjax.ptq.quantized_logits_fn`).

    Attributes:
      variables: full-precision variables after training (BatchNorms folded).
      policy: bits, switches and the learned activation clips and offsets.
      weight_scales: ``{layer: [C]}`` learned weight step sizes (flat, as ``apply.kernel_scale``).
      info: how it was made (JSON-serialisable).
    """

    variables: dict
    policy: Policy
    weight_scales: dict
    info: dict


def _q_max(lq: LayerQuant) -> jax.Array:
    """``Q_P`` of every activation input of ``lq`` [n]."""
    return jax.vmap(lambda signed: numerics.quant_range(lq.a_bits, signed=signed)[1])(lq.a_signed)


def _kernel(variables: Mapping, name: str) -> jax.Array | None:
    module = intercept.module_variables(variables, name)
    return None if module is None else module.get("kernel")


def _asymmetric_start(lq: LayerQuant, stats: Sequence | None) -> LayerQuant:
    """LSQ+'s start for signed inputs: the unsigned grid over [min, max] of calibration
    (``β = min``), or over [-clip, clip] without statistics; unsigned inputs keep ``β = 0``."""
    clips, signed, offsets = [], [], []
    for i in range(lq.a_clip.shape[0]):
        clip, is_signed = float(lq.a_clip[i]), bool(lq.a_signed[i])
        if not is_signed or not np.isfinite(clip):
            clips.append(clip), signed.append(is_signed), offsets.append(0.0)
            continue
        low, high = (-clip, clip) if stats is None else (float(stats[i].minimum), float(stats[i].maximum))
        clips.append(high - low), signed.append(False), offsets.append(low)
    return lq._replace(a_clip=jnp.asarray(clips, jnp.float32), a_signed=jnp.asarray(signed),
                       a_offset=jnp.asarray(offsets, jnp.float32))


def prepare(model: nn.Module, variables: Mapping, policy: Policy, calls: Sequence[LayerCall], *,
            example: Any, config: QatConfig = QatConfig(), weight_scales: Mapping[str, jax.Array] | None = None,
            statistics: Mapping[str, Sequence] | None = None, weight_method: str = "absmax") -> QatStart:
    """The starting point of QAT from a full-precision model and a calibrated policy.

    Args:
      model, variables: the Flax linen model (inference mode) and its variables.
      policy: a calibrated policy of the model's layers (any: uniform, mixed, percentile, ...).
      calls: the model's layer calls (``eqjax.ptq.layer_calls``): activation sizes per image.
      example: an input batch (array or ShapeDtypeStruct), for tracing the BatchNorm pairs.
      config: the options.
      weight_scales: start weight step sizes for some layers (flat [C], e.g. reconstruction's, of
        the kernels in ``variables``; scaled by ``|γ/σ|`` where a BatchNorm folds in); the others
        start at ``weight_method``'s scale of the (folded) kernel.
      statistics: the calibration statistics (``eqjax.ptq.collect_statistics``), for LSQ+'s start.
      weight_method: weight scale estimator of the start.

    Returns:
      :class:`QatStart`.

    Raises:
      ValueError: an uncalibrated policy, one that names layers the model lacks, or scales for
        layers without a kernel.
    """
    policy_lib.check_calibrated(policy)
    policy_lib.validate(policy, dict.fromkeys(c.name for c in calls))
    apply.check_weighted_layers(variables, policy)
    weight_scales = dict(weight_scales or {})
    variables = dict(variables)
    pairs = folding.conv_batchnorm_pairs(model, example) if config.batchnorm == "fold" else []
    factors = folding.batchnorm_factors(variables, pairs)
    folded = folding.fold_pairs(variables, pairs)  # the kernels that are quantized
    if config.asymmetric:
        policy = {n: _asymmetric_start(lq, None if statistics is None else statistics[n]) for n, lq in policy.items()}
    per_image = {c.name: jnp.asarray([np.prod(s[1:]) for s in c.input_shapes], jnp.float32) for c in calls}
    w_step, weight_elements, a_step = {}, {}, {}
    for name, lq in policy.items():
        kernel = _kernel(folded, name)
        if kernel is not None:
            axes = apply.channel_axes(lq, kernel.ndim)
            scale = weight_scales.pop(name, None)
            if scale is None:
                scale = apply.kernel_scale(kernel, lq.w_bits, axes=axes, method=weight_method)
            elif name in factors:
                scale = jnp.asarray(scale, jnp.float32) * jnp.abs(factors[name])
            w_step[name] = jnp.asarray(scale, jnp.float32).reshape(-1)
            weight_elements[name] = jnp.float32(kernel.size // w_step[name].size)
        clip = jnp.where(jnp.isfinite(lq.a_clip), lq.a_clip, _q_max(lq))  # unused (disabled) inputs: step 1
        a_step[name] = (clip / _q_max(lq)).astype(jnp.float32)
    if weight_scales:
        raise ValueError(f"weight scales for layers without a kernel: {', '.join(sorted(weight_scales))}")
    trainables = {"model": variables["params"], "w_step": w_step, "a_step": a_step}
    if config.asymmetric:
        trainables["a_offset"] = {n: lq.a_offset for n, lq in policy.items()}
    setup = QatSetup(policy, weight_elements, {n: per_image[n] for n in policy}, tuple(pairs))
    return QatStart(variables, setup, trainables)


def control_setup(setup: QatSetup) -> QatSetup:
    """``setup`` with every quantizer switched off: the full-precision control trained by the same
    step (same compilation, schedule and data)."""
    off = {n: lq._replace(w_enabled=jnp.zeros_like(lq.w_enabled), a_enabled=jnp.zeros_like(lq.a_enabled))
           for n, lq in setup.policy.items()}
    return setup.replace(policy=off)


def learned_policy(setup: QatSetup, trainables: Mapping, *, gradient_scale: bool = True
                   ) -> tuple[Policy, dict[str, jax.Array]]:
    """The policy and weight scales that ``trainables`` stand for: ``a_clip = s_a * Q_P`` (and the
    learned offsets), weight scales ``s_w``; with ``gradient_scale`` their gradients carry LSQ's ``g``.

    Returns:
      ``(policy, weight_scales)`` for :func:`eqjax.quant.apply.quantize_weights` and
      :func:`eqjax.quant.apply.quantized_apply`.
    """
    policy, scales = {}, {}
    for name, lq in setup.policy.items():
        step = jnp.maximum(trainables["a_step"][name], MIN_STEP)
        if gradient_scale:
            step = numerics.scale_gradient(step, numerics.lsq_gradient_scale(
                setup.input_elements[name], lq.a_bits, signed=lq.a_signed))
        offset = trainables["a_offset"][name] if "a_offset" in trainables else lq.a_offset
        policy[name] = lq._replace(a_clip=step * _q_max(lq), a_offset=offset)
        if name in trainables["w_step"]:
            w_step = jnp.maximum(trainables["w_step"][name], MIN_STEP)
            if gradient_scale:
                w_step = numerics.scale_gradient(w_step, numerics.lsq_gradient_scale(
                    setup.weight_elements[name], lq.w_bits))
            scales[name] = w_step
    return policy, scales


def forward(model: nn.Module, setup: QatSetup, trainables: Mapping, batch_stats: Any, images: jax.Array, *,
            config: QatConfig) -> tuple[jax.Array, Any]:
    """Quantized logits [batch, classes] of ``images`` (normalised) and the BatchNorm statistics
    after the batch (unchanged in ``fold`` mode, where ``setup.folded`` fold first)."""
    policy, scales = learned_policy(setup, trainables, gradient_scale=config.gradient_scale)
    variables = {"params": trainables["model"], **({"batch_stats": batch_stats} if batch_stats else {})}
    variables = apply.quantize_weights(folding.fold_pairs(variables, setup.folded), policy, scales=scales)
    if config.batchnorm == "update" and batch_stats:
        logits, updates = apply.quantized_apply(model, variables, policy, images, quantize_kernels=False,
                                                train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    return apply.quantized_apply(model, variables, policy, images, quantize_kernels=False), batch_stats


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
    """``T² · mean_batch KL(softmax(t/T) || softmax(z/T))`` of logits [batch, classes]."""
    t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    z = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - z), axis=-1))


def make_optimizer(weights: optax.GradientTransformation, steps: optax.GradientTransformation,
                   logits: optax.GradientTransformation | None = None) -> optax.GradientTransformation:
    """``weights`` for the model's parameters, ``steps`` for the step sizes and offsets, ``logits``
    for the width preferences of a width search (:mod:`eqjax.algorithms.width_search`): separate
    learning rates in one optax state."""
    groups = {"weights": weights, "steps": steps, **({"logits": logits} if logits is not None else {})}
    label = lambda key: "weights" if key == "model" else "logits" if key == "logits" and logits is not None else "steps"
    return optax.multi_transform(groups, lambda trainables: {key: jax.tree_util.tree_map(
        lambda _, key=key: label(key), sub) for key, sub in trainables.items()})


def init_state(start: QatStart, optimizer: optax.GradientTransformation) -> training.TrainState:
    """The training state at step 0: the trainables of ``start`` and ``optimizer``'s state."""
    return training.TrainState(jnp.zeros((), jnp.int32), start.trainables, start.variables.get("batch_stats", {}),
                               optimizer.init(start.trainables))


def make_step(model: nn.Module, optimizer: optax.GradientTransformation, config: QatConfig, *, seed: int,
              mean: Any = None, std: Any = None, augmentation: bool = True,
              forward_fn: Callable | None = None) -> Callable:
    """A jitted ``step(state, setup, teacher_variables, images [B, H, W, C], labels [B]) -> (state,
    metrics)`` with ``state`` a :class:`eqjax.training.TrainState` whose params are the trainables
    (:func:`init_state`).

    Images are uint8, normalised in the step with ``mean`` / ``std`` (as
    :func:`eqjax.training.normalize`), or already normalised floats when ``mean`` is None;
    ``augmentation`` crops and flips them first (:func:`eqjax.training.augment`). The augmentation key is ``fold_in(seed, state.step)`` (a resumed run repeats the
    uninterrupted one); ``teacher_variables`` are the full-precision model's (read only with
    distillation). Metrics: ``loss``, ``cross_entropy``, ``distillation``, ``accuracy``.

    ``forward_fn(setup, trainables, batch_stats, images) -> (logits, batch_stats, extra_loss,
    extra_metrics)`` replaces :func:`forward` (e.g. a width search's mixture forward and its budget
    penalty); ``extra_loss`` is added to the loss and ``extra_metrics`` to the metrics.
    """
    base_key = jax.random.key(seed)
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std (uint8 images), or neither (normalised images)")
    normalize = ((lambda images: images) if mean is None else functools.partial(
        training.normalize, mean=jnp.asarray(mean, jnp.float32), std=jnp.asarray(std, jnp.float32)))
    alpha = config.distill_weight
    if forward_fn is None:
        def forward_fn(setup, trainables, batch_stats, images):
            return (*forward(model, setup, trainables, batch_stats, images, config=config),
                    jnp.zeros((), jnp.float32), {})

    @jax.jit
    def step(state: training.TrainState, setup: QatSetup, teacher_variables: Any, images: jax.Array,
             labels: jax.Array):
        if augmentation:
            images = training.augment(jax.random.fold_in(base_key, state.step), images)
        x = normalize(images)
        teacher = jax.lax.stop_gradient(model.apply(teacher_variables, x)) if alpha > 0 else None

        def loss_fn(trainables):
            logits, batch_stats, extra, extra_metrics = forward_fn(setup, trainables, state.batch_stats, x)
            ce = training.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)
            kd = (distillation_loss(logits, teacher, temperature=config.temperature) if alpha > 0
                  else jnp.zeros((), jnp.float32))
            return (1.0 - alpha) * ce + alpha * kd + extra, (logits, batch_stats, ce, kd, extra_metrics)

        (loss, (logits, batch_stats, ce, kd, extra_metrics)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(state.params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int counts and float rates
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "cross_entropy": ce, "distillation": kd,
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels), **extra_metrics}
        return training.TrainState(state.step + 1, params, batch_stats, opt_state), metrics

    return step


def quantized_model(setup: QatSetup, variables: Mapping, trainables: Mapping, batch_stats: Any
                    ) -> tuple[dict, Policy]:
    """The quantized model that a training state stands for, for inference: ``(variables with every
    weight-quantized kernel on its learned grid, policy)``, BatchNorms folded as in training
    (``fold`` mode), for :func:`eqjax.ptq.quantized_logits_fn` (jit-compatible)."""
    policy, scales = learned_policy(setup, trainables, gradient_scale=False)
    variables = {**variables, "params": trainables["model"], **({"batch_stats": batch_stats} if batch_stats else {})}
    return apply.quantize_weights(folding.fold_pairs(variables, setup.folded), policy, scales=scales), policy


def finalize(model: nn.Module, start: QatStart, trainables: Mapping, batch_stats: Any, *, config: QatConfig,
             example: Any, info: Mapping[str, Any] | None = None) -> QatResult:
    """The trained model as a :class:`QatResult` (no gradient scaling; step sizes as learned), with
    every BatchNorm folded.

    In ``update`` mode the BatchNorms are folded now, and each folded layer's weight step sizes
    scale by ``|γ / √(σ² + ε)|`` with its kernel, so the quantized function is the one trained
    (exactly for positive factors; for negative ones the signed grid's ends swap, which changes
    only weights clamped at its ends).
    """
    policy, scales = learned_policy(start.setup, trainables, gradient_scale=False)
    variables = {**start.variables, "params": trainables["model"], **({"batch_stats": batch_stats} if batch_stats else {})}
    variables = folding.fold_pairs(variables, start.setup.folded)
    if config.batchnorm == "update":
        pairs = folding.conv_batchnorm_pairs(model, example)
        factors = folding.batchnorm_factors(variables, pairs)
        variables = folding.fold_pairs(variables, pairs)
        scales = {n: s * jnp.abs(factors[n]).reshape(s.shape) if n in factors else s for n, s in scales.items()}
    as_numpy = lambda tree: jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
    return QatResult(as_numpy(variables), as_numpy(policy), as_numpy(scales), dict(info or {}))


def quantized_variables(result: QatResult) -> dict:
    """The variables of ``result`` with every weight-quantized kernel on its learned grid."""
    return apply.quantize_weights(result.variables, result.policy, scales=result.weight_scales)


def save(directory: str, result: QatResult) -> str:
    """Writes ``result`` (variables, policy, weight scales, info) to ``directory`` atomically, with
    the digests :func:`load` checks (:mod:`eqjax.storage`)."""
    layers = {n: {f: np.asarray(v) for f, v in lq._asdict().items() if f != "w_channel_axes" and v is not None}
              for n, lq in result.policy.items()}
    channel_axes = {n: list(lq.w_channel_axes.axes) for n, lq in result.policy.items() if lq.w_channel_axes}
    meta = {"layers": list(result.policy), "channel_axes": channel_axes, "info": result.info,
            "bits": policy_lib.bits_table(result.policy)}
    return storage.save_tree(directory, {"variables": result.variables, "policy": layers,
                                         "weight_scales": result.weight_scales}, meta, meta_file=STATE_FILE)


def load(directory: str) -> QatResult:
    """Reads a :func:`save`'d result, checked against its digests.

    Raises:
      FileNotFoundError: ``directory`` holds no QAT state.
      eqjax.storage.CorruptFileError: a state that is not the one saved (names the file).
    """
    arrays, meta = storage.load_tree(directory, meta_file=STATE_FILE,
                                     what="QAT state (experiments.qat writes it)")
    policy = {}
    for name in meta["layers"]:
        fields = {f: jnp.asarray(v) for f, v in arrays["policy"][name].items()}
        axes = meta["channel_axes"].get(name)
        policy[name] = LayerQuant(**fields, w_channel_axes=ChannelAxes(tuple(axes)) if axes else None)
    scales = {n: np.asarray(v) for n, v in arrays["weight_scales"].items()}
    return QatResult(arrays["variables"], policy, scales, meta["info"])
