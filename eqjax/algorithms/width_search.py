"""Bit widths learned under a budget: the study's eq. (2) solved by gradient descent.

    minimise  L_task(θ̂)  subject to  E(θ̂) <= E_budget                              (eq. 2)

Every searched layer l chooses its weight width and its activation width among candidates
``b_1 .. b_K`` with probabilities ``p_w[l] = softmax(α_w[l] / τ)`` and ``p_a[l] = softmax(α_a[l] / τ)``.
The forward pass mixes the candidates' quantized tensors (EdMIPS, Cai & Vasconcelos, CVPR 2020):

    W_l = Σ_k h_w[l, k] · Q(W_l; s_w[l, k], b_k)      x_l = Σ_k h_a[l, k] · Q(x_l; s_a[l, k], b_k)

with ``h = p`` (``relaxation='soft'``) or the one-hot of the most probable width with the gradient
of ``p`` (``'hard'``: the forward is the policy that will be deployed). Each candidate has its own
LSQ step sizes (per output channel for weights, per tensor for inputs), started from calibration at
its width, with LSQ's gradient scale. The budget's usage is differentiable and exact at one-hot
probabilities: for every kind of :data:`eqjax.algorithms.allocation.BUDGET_KINDS`,

    U(p) = Σ_l p_w[l]ᵀ T_l p_a[l] + U_fixed,    T_l[i, j] = usage of layer l at (b_i, b_j)

where ``T_l`` is :func:`eqjax.algorithms.allocation.usage_tables` — for ``relative_energy`` the
energy model's eq. (7) MAC and DRAM terms (:func:`eqjax.algorithms.energy.layer_energy`), one
energy model, not a copy. The penalty reads the usage of the most probable widths (the policy that
will be deployed) with the gradient of the expected usage (straight through),
``Ũ = U(onehot(argmax p)) + U(p) - stop_gradient(U(p))``, and adds to the loss

    μ · (max(0, m - 1) + max(0, 1 - δ - m)),  m = max_budgets Ũ / B
                          (fill_budget, the default: the binding budget is used to within δ, none exceeded)
    μ · Σ_budgets max(0, Ũ / B - 1)   (fill_budget=False: a hinge above the budgets only)

Filling is the default because the hinge alone leaves widths unused: measured on ResNet-18
(BUILD_NOTES), Adam's second moments remember the penalty's large gradients while the usage is
over the budget, and the task loss's small ones then barely move the widths back up. The dead
band ``δ`` (``fill_tolerance``) keeps a search that sits just below the budget from being pushed
over it: widths are discrete, and a push up flips whole layers to wider candidates.

After the search, :func:`fix_widths` takes the most probable widths; when they exceed a budget
(the expected usage of a mixture is not the usage of its most probable member), the exact MILP of
:func:`eqjax.algorithms.allocation.allocate` picks the most probable feasible widths instead
(cost ``-log p_w - log p_a``), and says so. :func:`qat_start` turns the result into the start of
QAT at those widths (:mod:`eqjax.algorithms.qat`), with the searched weights and the step sizes of
the chosen candidates.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from eqjax import storage, training
from eqjax.algorithms import allocation, energy as energy_lib, qat
from eqjax.quant import apply, folding, intercept, numerics, policy as policy_lib
from eqjax.quant.intercept import LayerCall
from eqjax.quant.policy import Policy

__all__ = ["RELAXATIONS", "SearchConfig", "SearchSetup", "SearchStart", "prepare", "warm_start", "searched_layers",
           "check_budgets",
           "probabilities",
           "relaxed_usage", "forward", "fix_widths", "qat_start", "save", "load", "SearchResult", "search"]

RELAXATIONS = ("soft", "hard")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SearchConfig:
    """What the width search optimises (errors name the field).

    Attributes:
      budgets: ``((kind, bound), ...)`` with kinds of :data:`allocation.BUDGET_KINDS`, e.g.
        ``(('relative_energy', 0.12),)``; every one holds for the final widths.
      candidate_bits: the widths every searched layer may take, for weights and for activations.
      relaxation: ``soft`` (mixture by probabilities) or ``hard`` (the most probable width in the
        forward pass, gradients through the probabilities).
      penalty: ``μ`` of the budget penalty.
      fill_budget: drive the binding budget's usage into ``[1 - fill_tolerance, 1]`` of the budget,
        or only penalise usage above the budgets (a hinge).
      fill_tolerance: ``δ``, the dead band below the budget.
      temperature: ``τ`` of the softmax over candidates.
      energy_model: the energy model of a ``relative_energy`` budget.
    """

    budgets: tuple[tuple[str, float], ...]
    candidate_bits: tuple[int, ...] = (2, 3, 4, 6, 8)
    relaxation: str = "soft"
    penalty: float = 10.0
    fill_budget: bool = True
    fill_tolerance: float = 0.02
    temperature: float = 1.0
    energy_model: energy_lib.EnergyModel = energy_lib.PRESETS["paper"]

    def __post_init__(self):
        if not self.candidate_bits:
            raise ValueError("candidate_bits is empty: give the widths a layer may take, e.g. 2,3,4,6,8")
        for b in self.candidate_bits:
            numerics.check_bits(b, name="candidate_bits")
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            raise ValueError(f"candidate_bits must be distinct, got {tuple(self.candidate_bits)}")
        if not self.budgets:
            raise ValueError(f"budgets is empty: give at least one of {', '.join(allocation.BUDGET_KINDS)}")
        kinds = [k for k, _ in self.budgets]
        unknown = [k for k in kinds if k not in allocation.BUDGET_KINDS]
        if unknown:
            raise ValueError(f"budgets has unknown kinds {unknown}; known: {', '.join(allocation.BUDGET_KINDS)}")
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"budgets gives a kind twice: {kinds}")
        bad = {k: v for k, v in self.budgets if not (np.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"budgets must be positive numbers, got {bad}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        if not self.penalty > 0:
            raise ValueError(f"penalty must be > 0, got {self.penalty}")
        if not 0.0 <= self.fill_tolerance < 1.0:
            raise ValueError(f"fill_tolerance must be in [0, 1), got {self.fill_tolerance}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@flax.struct.dataclass
class SearchSetup:
    """What the search step reads and never changes; arrays only.

    Attributes:
      qat: the :class:`eqjax.algorithms.qat.QatSetup` of the layers that keep their widths
        (``policy``: those layers; their step sizes are trained as in QAT).
      searched_policy: ``{layer: LayerQuant}`` of the searched layers (switches, grids; bits unused).
      candidates: int32 [K] candidate widths.
      weight_elements: ``{layer: N}`` float32 [] weights per output channel of each searched layer.
      input_elements: ``{layer: N}`` float32 [n] values per image of each searched layer's inputs.
      usage: ``{kind: float32 [L, K, K]}`` each searched layer's usage at (w, a) candidates, over
        the budget.
      fixed_usage: ``{kind: float32 []}`` the other layers' usage, over the budget.
      searched: the searched layer names, in the order of the ``L`` axis (static).
    """

    qat: qat.QatSetup
    searched_policy: dict
    candidates: jax.Array
    weight_elements: dict
    input_elements: dict
    usage: dict
    fixed_usage: dict
    searched: tuple = flax.struct.field(pytree_node=False, default=())


class SearchStart(NamedTuple):
    """What :func:`prepare` returns.

    Attributes:
      variables: the model's variables (full precision; BatchNorms not folded).
      setup: the :class:`SearchSetup`.
      trainables: ``{'model', 'w_step', 'a_step'}`` as in QAT for the layers that keep their
        widths, plus ``'w_steps': {layer: [K, C]}``, ``'a_steps': {layer: [K, n]}`` and
        ``'logits': {'w': [L, K], 'a': [L, K]}`` (zeros: every candidate equally likely) for the
        searched ones.
      policy: the calibrated policy the search started from (every layer).
      counts: the model's :func:`eqjax.algorithms.energy.count_layers` (batch 1).
      fixed_bits: ``{layer: {'w', 'a'}}`` of the layers that keep their widths.
      config: the :class:`SearchConfig`.
    """

    variables: dict
    setup: SearchSetup
    trainables: dict
    policy: Policy
    counts: list
    fixed_bits: dict
    config: SearchConfig


def _q_max(bits: jax.Array, signed: jax.Array) -> jax.Array:
    return numerics.quant_range(bits, signed=signed)[1]


def prepare(model: nn.Module, variables: Mapping, policy: Policy, calls: Sequence[LayerCall], *,
            example: Any, config: SearchConfig, calibrate: Callable[[Policy], Policy],
            qat_config: qat.QatConfig = qat.QatConfig(), keep: Sequence[str] = (),
            weight_method: str = "absmax") -> SearchStart:
    """The start of a width search from a full-precision model and a calibrated policy.

    Searched: every layer with quantized weights and inputs that ``keep`` does not name; the others
    (``keep``, e.g. the first and last layer; attention matmuls; layers left in full precision)
    keep the policy's widths.

    Args:
      model, variables: the Flax linen model (inference mode) and its variables.
      policy: a calibrated policy of the model's layers.
      calls: the model's layer calls (``eqjax.ptq.layer_calls``).
      example: an input batch (array or ShapeDtypeStruct) for tracing.
      config: the search.
      calibrate: ``policy -> policy`` with activation clips calibrated at its widths (e.g.
        ``lambda p: eqjax.ptq.with_clips(p, statistics, ptq_config)``): each candidate's start.
      qat_config: the QAT options (``batchnorm``, distillation); LSQ+ offsets are not searched.
      keep: layers whose widths stay the policy's.
      weight_method: weight scale estimator of each candidate's start.

    Raises:
      ValueError: an uncalibrated policy, ``keep`` naming layers the policy lacks, nothing left to
        search, LSQ+ (``asymmetric``), or a budget below the usage of every searched layer at the
        narrowest candidate (the message gives that smallest feasible value).
    """
    if qat_config.asymmetric:
        raise ValueError("the width search learns symmetric grids: asymmetric (LSQ+) applies to QAT after it")
    unknown = [n for n in keep if n not in policy]
    if unknown:
        raise ValueError(f"keep names layers the policy lacks: {', '.join(unknown)}")
    start = qat.prepare(model, variables, policy, calls, example=example, config=qat_config,
                        weight_method=weight_method)
    searched = searched_layers(policy, keep)
    if not searched:
        raise ValueError("no layer to search: every layer is kept, unquantized or without weights")
    candidates = tuple(int(b) for b in config.candidate_bits)
    counts = energy_lib.count_layers(model, jax.ShapeDtypeStruct((1, *example.shape[1:]), example.dtype),
                                     variables=variables)
    fixed_bits = {n: b for n, b in policy_lib.bits_table(policy).items() if n not in searched}
    check_budgets(counts, searched, fixed_bits, config)

    # Each candidate's step sizes: its own calibration (activations) and estimator (weights).
    folded = folding.fold_pairs(dict(variables), list(start.setup.folded))
    a_steps = {n: [] for n in searched}
    w_steps = {n: [] for n in searched}
    for b in candidates:
        calibrated = calibrate(policy_lib.set_bits({n: policy[n] for n in searched}, {n: b for n in searched}))
        for n in searched:
            lq = calibrated[n]
            a_steps[n].append(lq.a_clip / _q_max(lq.a_bits, lq.a_signed))
            kernel = intercept.module_variables(folded, n)["kernel"]
            w_steps[n].append(apply.kernel_scale(kernel, b, axes=apply.channel_axes(lq, kernel.ndim),
                                                 method=weight_method).reshape(-1))
    kept = lambda tree: {n: v for n, v in tree.items() if n not in searched}
    only = lambda tree: {n: tree[n] for n in searched}
    trainables = {"model": start.trainables["model"], "w_step": kept(start.trainables["w_step"]),
                  "a_step": kept(start.trainables["a_step"]),
                  "w_steps": {n: jnp.stack(v).astype(jnp.float32) for n, v in w_steps.items()},
                  "a_steps": {n: jnp.stack(v).astype(jnp.float32) for n, v in a_steps.items()},
                  "logits": {"w": jnp.zeros((len(searched), len(candidates)), jnp.float32),
                             "a": jnp.zeros((len(searched), len(candidates)), jnp.float32)}}

    budgets = dict(config.budgets)
    tables, fixed = allocation.usage_tables(counts, searched, list(itertools.product(candidates, candidates)),
                                            fixed_bits, list(budgets), config.energy_model)
    k = len(candidates)
    setup = SearchSetup(
        qat=start.setup.replace(policy=kept(policy), weight_elements=kept(start.setup.weight_elements),
                                input_elements=kept(start.setup.input_elements)),
        searched_policy=only(policy), candidates=jnp.asarray(candidates, jnp.int32),
        weight_elements=only(start.setup.weight_elements), input_elements=only(start.setup.input_elements),
        usage={kind: jnp.asarray(tables[kind].reshape(len(searched), k, k) / budgets[kind], jnp.float32)
               for kind in budgets},
        fixed_usage={kind: jnp.float32(fixed[kind] / budgets[kind]) for kind in budgets}, searched=searched)
    return SearchStart(start.variables, setup, trainables, policy, counts, fixed_bits, config)


def warm_start(start: SearchStart, cost: Mapping[str, Any], *, confidence: float = 2.0) -> tuple[SearchStart, dict]:
    """``start`` whose width preferences favour the exact MILP's allocation
    (:func:`eqjax.algorithms.allocation.allocate`) of ``cost`` under the same budgets: each chosen
    width gets logit ``confidence`` (probability ``e^c / (e^c + K - 1)``), the others 0, and the
    search refines them with the task loss. Returns ``(start, the MILP's report)``.

    Args:
      cost: ``{searched layer: [K, K]}`` estimated loss increase at (weight, activation) candidates,
        e.g. :class:`eqjax.algorithms.second_order.SecondOrderResult`'s ``weight[l][:, None] +
        activation[l][None, :]``.
    """
    setup, config = start.setup, start.config
    missing = [n for n in setup.searched if n not in cost]
    if missing:
        raise ValueError(f"cost lacks searched layers: {', '.join(missing[:5])}")
    candidates = [int(b) for b in np.asarray(setup.candidates)]
    report = allocation.allocate({n: np.asarray(cost[n], np.float64) for n in setup.searched}, start.counts,
                                 budgets=dict(config.budgets), w_bits=candidates, a_bits=candidates,
                                 fixed_bits=start.fixed_bits, energy_model=config.energy_model)
    k = len(candidates)
    logits = {key: np.zeros((len(setup.searched), k), np.float32) for key in ("w", "a")}
    for i, n in enumerate(setup.searched):
        logits["w"][i, candidates.index(report["bits"][n]["w"])] = confidence
        logits["a"][i, candidates.index(report["bits"][n]["a"])] = confidence
    trainables = {**start.trainables, "logits": {key: jnp.asarray(v) for key, v in logits.items()}}
    return start._replace(trainables=trainables), report


def searched_layers(policy: Policy, keep: Sequence[str] = ()) -> tuple[str, ...]:
    """The layers a search chooses widths for: quantized weights and inputs, not in ``keep``."""
    return tuple(n for n, lq in policy.items() if bool(lq.w_enabled) and bool(lq.a_enabled) and n not in set(keep))


def check_budgets(counts: Sequence[energy_lib.LayerCount], searched: Sequence[str], fixed_bits: Mapping[str, Mapping],
                  config: SearchConfig) -> None:
    """Raises ValueError when a budget is below its smallest feasible value: every searched layer at
    the narrowest candidate, the others at ``fixed_bits`` (:func:`allocation.check_feasible`)."""
    b = min(config.candidate_bits)
    allocation.check_feasible(counts, {**fixed_bits, **{n: {"w": b, "a": b} for n in searched}},
                              dict(config.budgets), config.energy_model,
                              narrowest=f"every searched layer at {b} bits, the others as the policy says")


def probabilities(logits: Mapping[str, jax.Array], *, temperature: float = 1.0) -> dict[str, jax.Array]:
    """``{'w': [L, K], 'a': [L, K]}`` candidate probabilities ``softmax(α / τ)``."""
    return {key: jax.nn.softmax(value / temperature, axis=-1) for key, value in logits.items()}


def relaxed_usage(usage: Mapping[str, Any], fixed_usage: Mapping[str, Any], p_w: Any, p_a: Any) -> dict[str, Any]:
    """``{kind: Σ_l p_w[l]ᵀ T_l p_a[l] + fixed}`` for tables ``usage[kind]`` [L, K, K] and
    probabilities [L, K] (NumPy or JAX arrays): the expected usage, exact at one-hot probabilities."""
    xp = jnp if isinstance(p_w, jax.Array) else np
    return {kind: xp.einsum("lw,lwa,la->", p_w, table, p_a) + fixed_usage[kind] for kind, table in usage.items()}


def _mixing(p: jax.Array, relaxation: str) -> jax.Array:
    """The weights [L, K] by which the candidates' tensors mix: ``p``, or (``hard``) the one-hot of
    the most probable candidate whose gradient is that of ``p`` (straight through)."""
    if relaxation == "soft":
        return p
    hard = jax.nn.one_hot(jnp.argmax(p, axis=-1), p.shape[-1], dtype=p.dtype)
    return hard + p - jax.lax.stop_gradient(p)


def _steps(steps: jax.Array, elements: jax.Array, bits: jax.Array, signed: Any, gradient_scale: bool) -> jax.Array:
    steps = jnp.maximum(steps, qat.MIN_STEP)
    if gradient_scale:
        steps = numerics.scale_gradient(steps, numerics.lsq_gradient_scale(elements, bits, signed=signed))
    return steps


def forward(model: nn.Module, setup: SearchSetup, trainables: Mapping, batch_stats: Any, images: jax.Array, *,
            qat_config: qat.QatConfig, config: SearchConfig) -> tuple[jax.Array, Any, jax.Array, dict]:
    """Logits [batch, classes] of ``images`` (normalised) under the mixture of candidate widths,
    the BatchNorm statistics after the batch (as :func:`eqjax.algorithms.qat.forward`), the budget
    penalty (module docstring) and metrics: each budget's usage over its bound, expected
    (``expected_<kind>``) and at the most probable widths (``most_probable_<kind>``).
    ``functools.partial(forward, model, qat_config=..., config=...)`` is a ``forward_fn`` of
    :func:`eqjax.algorithms.qat.make_step`."""
    p = probabilities(trainables["logits"], temperature=config.temperature)
    h_w, h_a = _mixing(p["w"], config.relaxation), _mixing(p["a"], config.relaxation)
    bits = setup.candidates
    kept_policy, kept_scales = qat.learned_policy(setup.qat, trainables, gradient_scale=qat_config.gradient_scale)
    variables = {"params": trainables["model"], **({"batch_stats": batch_stats} if batch_stats else {})}
    variables = apply.quantize_weights(folding.fold_pairs(variables, setup.qat.folded), kept_policy, scales=kept_scales)
    row = {name: i for i, name in enumerate(setup.searched)}
    for name in setup.searched:
        lq = setup.searched_policy[name]
        kernel = intercept.module_variables(variables, name)["kernel"]
        axes = apply.channel_axes(lq, kernel.ndim)
        steps = _steps(trainables["w_steps"][name], setup.weight_elements[name], bits[:, None], True,
                       qat_config.gradient_scale)
        mixed = jnp.zeros(kernel.shape, jnp.float32)
        for k in range(bits.shape[0]):
            q_min, q_max = numerics.quant_range(bits[k])
            quantized = numerics.fake_quant(kernel.astype(jnp.float32),
                                            steps[k].reshape(apply.channel_shape(kernel.shape, axes)),
                                            q_min.reshape((1,) * kernel.ndim), q_max.reshape((1,) * kernel.ndim))
            mixed = mixed + h_w[row[name], k] * quantized
        variables = intercept.replace_module_variable(variables, name, "kernel", mixed.astype(kernel.dtype))

    def quantize_inputs(name, lq, inputs):
        if name not in row:
            return apply.quantize_layer_inputs(lq, inputs)
        out = list(inputs)
        steps = _steps(trainables["a_steps"][name], setup.input_elements[name][None, :], bits[:, None],
                       lq.a_signed[None, :], qat_config.gradient_scale)
        for i in range(lq.a_clip.shape[0]):
            x = inputs[i]
            mixed = jnp.zeros_like(x)
            for k in range(bits.shape[0]):
                clip = steps[k, i] * _q_max(bits[k], lq.a_signed[i])
                mixed = mixed + h_a[row[name], k].astype(x.dtype) * numerics.quantize_clipped(
                    x, bits[k], clip, signed=lq.a_signed[i])
            out[i] = mixed
        return out

    policy = {**kept_policy, **setup.searched_policy}
    kwargs = dict(quantize_kernels=False, input_quantizer=quantize_inputs)
    if qat_config.batchnorm == "update" and batch_stats:
        logits, updates = apply.quantized_apply(model, variables, policy, images, train=True, mutable=["batch_stats"],
                                                **kwargs)
        batch_stats = updates["batch_stats"]
    else:
        logits = apply.quantized_apply(model, variables, policy, images, **kwargs)
    usage = relaxed_usage(setup.usage, setup.fixed_usage, p["w"], p["a"])
    one_hot = {k: jax.nn.one_hot(jnp.argmax(v, axis=-1), v.shape[-1]) for k, v in p.items()}
    most_probable = relaxed_usage(setup.usage, setup.fixed_usage, one_hot["w"], one_hot["a"])
    through = [most_probable[k] + u - jax.lax.stop_gradient(u) for k, u in usage.items()]
    if config.fill_budget:
        m = jnp.max(jnp.stack(through))
        penalty = config.penalty * (jnp.maximum(m - 1.0, 0.0) + jnp.maximum(1.0 - config.fill_tolerance - m, 0.0))
    else:
        penalty = config.penalty * sum(jnp.maximum(u - 1.0, 0.0) for u in through)
    metrics = {**{f"expected_{kind}": u for kind, u in usage.items()},
               **{f"most_probable_{kind}": u for kind, u in most_probable.items()}}
    return logits, batch_stats, penalty, metrics


def fix_widths(start: SearchStart, logits: Mapping[str, Any]) -> dict[str, Any]:
    """The widths a search ends with: the most probable candidates, or, when they exceed a budget,
    the most probable feasible ones (the exact MILP over ``-log p_w - log p_a``).

    Returns:
      ``{'bits': {layer: {'w', 'a'}} (every layer), 'most_probable': {searched layer: {'w', 'a'}},
      'repaired': whether the most probable widths exceeded a budget, 'usage': {kind: value},
      'budgets': {kind: bound}, 'expected_usage': {kind: U(p)}, 'probabilities': {layer: {'w': [K],
      'a': [K]}}}``; every usage recomputed by :func:`eqjax.algorithms.allocation.measured_usage`
      is within its budget.
    """
    config, setup = start.config, start.setup
    candidates = [int(b) for b in np.asarray(setup.candidates)]
    p = {k: np.asarray(v, np.float64) for k, v in probabilities(
        {k: np.asarray(v, np.float32) for k, v in logits.items()}, temperature=config.temperature).items()}
    budgets = dict(config.budgets)
    most_probable = {n: {"w": candidates[int(np.argmax(p["w"][i]))], "a": candidates[int(np.argmax(p["a"][i]))]}
                     for i, n in enumerate(setup.searched)}
    measure = lambda bits: {k: allocation.measured_usage(start.counts, bits, k, config.energy_model) for k in budgets}
    bits = {**start.fixed_bits, **most_probable}
    repaired = any(u > budgets[k] for k, u in measure(bits).items())
    if repaired:
        log_p = {k: np.log(np.maximum(v, 1e-30)) for k, v in p.items()}
        cost = {n: -(log_p["w"][i][:, None] + log_p["a"][i][None, :]) for i, n in enumerate(setup.searched)}
        report = allocation.allocate(cost, start.counts, budgets=budgets, w_bits=candidates, a_bits=candidates,
                                     fixed_bits=start.fixed_bits, energy_model=config.energy_model)
        bits = {**start.fixed_bits, **{n: report["bits"][n] for n in setup.searched}}
    usage = {k: float(v) for k, v in measure(bits).items()}
    expected = relaxed_usage({k: np.asarray(v, np.float64) * budgets[k] for k, v in setup.usage.items()},
                             {k: float(v) * budgets[k] for k, v in setup.fixed_usage.items()}, p["w"], p["a"])
    return {"bits": {n: bits[n] for n in start.policy}, "most_probable": most_probable, "repaired": repaired,
            "usage": usage, "budgets": {k: float(v) for k, v in budgets.items()},
            "expected_usage": {k: float(v) for k, v in expected.items()},
            "probabilities": {n: {"w": p["w"][i].tolist(), "a": p["a"][i].tolist()}
                              for i, n in enumerate(setup.searched)}}


def qat_start(start: SearchStart, trainables: Mapping, batch_stats: Any, widths: Mapping) -> qat.QatStart:
    """The start of QAT at the widths of :func:`fix_widths`: the searched weights (and BatchNorm
    statistics), the kept layers' step sizes, and each searched layer's step sizes of its chosen
    candidates (the policy's clips are those steps' ``s · Q_P``)."""
    setup, candidates = start.setup, [int(b) for b in np.asarray(start.setup.candidates)]
    bits = {n: (widths["bits"][n]["w"], widths["bits"][n]["a"]) for n in setup.searched}
    w_step = {**{n: jnp.asarray(v) for n, v in trainables["w_step"].items()},
              **{n: jnp.asarray(trainables["w_steps"][n])[candidates.index(bits[n][0])] for n in setup.searched}}
    a_step = {**{n: jnp.asarray(v) for n, v in trainables["a_step"].items()},
              **{n: jnp.asarray(trainables["a_steps"][n])[candidates.index(bits[n][1])] for n in setup.searched}}
    policy = policy_lib.set_bits(start.policy, bits)
    for n, lq in policy.items():
        clip = jnp.maximum(a_step[n], qat.MIN_STEP) * _q_max(lq.a_bits, lq.a_signed)
        policy[n] = lq._replace(a_clip=jnp.where(jnp.isfinite(lq.a_clip), clip, lq.a_clip).astype(jnp.float32))
    qat_setup = qat.QatSetup(policy, {**setup.qat.weight_elements, **setup.weight_elements},
                             {**setup.qat.input_elements, **setup.input_elements}, setup.qat.folded)
    variables = {**start.variables, "params": trainables["model"], **({"batch_stats": batch_stats} if batch_stats else {})}
    return qat.QatStart(variables, qat_setup, {"model": trainables["model"], "w_step": w_step, "a_step": a_step})


SEARCH_FILE = "width_search.json"


def save(directory: str, trainables: Mapping, batch_stats: Any, widths: Mapping[str, Any]) -> str:
    """Writes a finished search (its trainables, BatchNorm statistics and :func:`fix_widths`
    result) to ``directory`` atomically, with the digests :func:`load` checks."""
    return storage.save_tree(directory, {"trainables": trainables, "batch_stats": batch_stats or {}},
                             {"widths": widths}, meta_file=SEARCH_FILE)


def load(directory: str) -> tuple[dict, Any, dict]:
    """``(trainables, batch_stats, widths)`` of a :func:`save`'d search.

    Raises:
      FileNotFoundError: ``directory`` holds no search.
      eqjax.storage.CorruptFileError: one that is not the one saved (names the file).
    """
    tree, meta = storage.load_tree(directory, meta_file=SEARCH_FILE, what="finished width search")
    return tree["trainables"], tree["batch_stats"], meta["widths"]


class SearchResult(NamedTuple):
    """What :func:`search` returns.

    Attributes:
      start: the :class:`SearchStart`.
      trainables: the trainables after the search.
      batch_stats: the BatchNorm statistics after the search.
      widths: :func:`fix_widths`' result.
      qat: :func:`qat_start` at those widths: QAT continues from it.
    """

    start: SearchStart
    trainables: dict
    batch_stats: Any
    widths: dict
    qat: qat.QatStart


def search(model: nn.Module, variables: Mapping, policy: Policy, calls: Sequence[LayerCall],
           batches: Iterable[tuple[Any, Any]], *, config: SearchConfig, calibrate: Callable[[Policy], Policy],
           optimizer: optax.GradientTransformation | None = None, qat_config: qat.QatConfig = qat.QatConfig(),
           keep: Sequence[str] = (), mean: Any = None, std: Any = None,
           weight_method: str = "absmax") -> SearchResult:
    """Learns the widths of ``policy``'s layers under ``config.budgets`` on ``batches`` and fixes them:
    :func:`prepare`, one :func:`eqjax.algorithms.qat.make_step` with :func:`forward` per batch,
    :func:`fix_widths`, :func:`qat_start` (``experiments.qat --learn_bits`` adds checkpoints, exact
    resume and progress around the same pieces).

    Args:
      model, variables, policy, calls: as :func:`prepare`.
      batches: ``(images [B, H, W, C], labels [B])`` pairs, uint8 with ``mean`` / ``std`` or
        normalised floats without (as :func:`eqjax.algorithms.qat.make_step`); every batch of one shape.
      config, calibrate, qat_config, keep, weight_method: as :func:`prepare`.
      optimizer: of the trainables (:func:`eqjax.algorithms.qat.make_optimizer` with a ``logits``
        transform); default SGD 1e-3 (weights), 1e-2 (step sizes), Adam 0.1 (width preferences).

    Returns:
      :class:`SearchResult`.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("batches is empty: the search needs training images")
    images = np.asarray(first[0])
    example = jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32)
    start = prepare(model, variables, policy, calls, example=example, config=config, calibrate=calibrate,
                    qat_config=qat_config, keep=keep, weight_method=weight_method)
    optimizer = optimizer or qat.make_optimizer(optax.sgd(1e-3, momentum=0.9), optax.sgd(1e-2, momentum=0.9),
                                                optax.adam(0.1))
    step = qat.make_step(model, optimizer, qat_config, seed=0, mean=mean, std=std, augmentation=False,
                         forward_fn=functools.partial(forward, model, qat_config=qat_config, config=config))
    state = training.TrainState(jnp.zeros((), jnp.int32), start.trainables, start.variables.get("batch_stats", {}),
                                optimizer.init(start.trainables))
    for batch_images, batch_labels in itertools.chain([first], batches):
        state, _ = step(state, start.setup, variables, jnp.asarray(batch_images), jnp.asarray(batch_labels))
    trainables, batch_stats = jax.device_get((state.params, state.batch_stats))
    widths = fix_widths(start, trainables["logits"])
    return SearchResult(start, trainables, batch_stats, widths, qat_start(start, trainables, batch_stats, widths))
