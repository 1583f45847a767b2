"""Post-training quantization of any Flax model, as a flag-free library API.

The model-level pipeline in four calls; every argument is data, nothing reads flags or prints:

* :func:`calibrate` — run the full-precision model over calibration batches, record every
  quantizable layer's inputs, and return a policy with calibrated activation clips;
* :func:`quantize` — fake-quantize the weights once and return ``(apply_fn, state)``:
  ``apply_fn(state, images)`` is the quantized forward (weights per output channel, layer
  inputs per tensor, the study's eqs. 3-4);
* :func:`evaluate` — top-1/top-5 of any ``apply_fn`` over labelled batches, sharded over all
  local devices (hold a :func:`eqjax.algorithms.metrics.make_evaluator` to evaluate many states with
  one compilation);
* :func:`sweep` — layer sensitivity (eq. 5) of every layer at every bit width in one
  compiled call.

A :class:`PTQConfig` says how: bits, the first/last-layer rule, regex rules, estimators.
Progress goes to an optional ``on_progress`` callback. Errors name the argument at fault.

Every function takes a Flax Linen model with its variables, or a Flax NNX module with
``variables=None`` (its own state; :mod:`eqjax.quant.nnx_model`); layers are named by their
module (Linen) or attribute (NNX) paths.

Example (a small CNN defined here; any Flax linen model works):
  >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
  >>> class CNN(nn.Module):
  ...     @nn.compact
  ...     def __call__(self, x):
  ...         x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
  ...         x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
  ...         return nn.Dense(10, name="head")(x.mean(axis=(1, 2)))
  >>> model, images = CNN(), jax.random.normal(jax.random.key(0), (32, 16, 16, 3))
  >>> variables = model.init(jax.random.key(1), images[:1])
  >>> config = PTQConfig(w_bits=4, a_bits=4, keep_first_last_bits=None)
  >>> policy = calibrate(model, variables, [images[:16], images[16:]], config)
  >>> apply_fn, state = quantize(model, variables, policy)
  >>> apply_fn(state, images).shape
  (32, 10)
  >>> {name: bits["w"] for name, bits in bits_table(policy).items()}
  {'conv1': 4, 'conv2': 4, 'head': 4}
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import numpy as np

from eqjax.quant import apply, calibration, intercept, nnx_model, numerics, policy as policy_lib
from eqjax.algorithms import metrics, sensitivity
from eqjax.quant.intercept import LayerCall
from eqjax.quant.policy import Policy

__all__ = ["PTQConfig", "QuantizedState", "layer_calls", "build_policy", "collect_statistics",
           "with_clips", "calibrate", "quantize", "quantized_logits_fn", "evaluate", "sweep", "bits_table"]

bits_table = policy_lib.bits_table

Progress = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PTQConfig:
    """How a model is quantized. Checked on construction (errors name the field).

    Attributes:
      w_bits: weight bits of every layer (per output channel).
      a_bits: activation bits (per tensor); None = ``w_bits``.
      keep_first_last_bits: bits of the first and last conv/dense layer (the study keeps
        them at 8); None quantizes them like the rest.
      rules: ``(regex, bits)`` or ``(regex, (w_bits, a_bits))`` on layer names, first match
        wins, above the first/last rule; a rule matching no layer is an error.
      quantize_matmuls: quantize both operands of attention matmuls (at ``a_bits``).
      calib_method: activation clip estimator: ``absmax`` (eq. 4), ``percentile``, ``mse``.
      weight_method: weight scale estimator (same choices).
      unsigned_activations: inputs never negative during calibration get the unsigned grid.
      percentile: for ``calib_method='percentile'``.
    """

    w_bits: int = 8
    a_bits: int | None = None
    keep_first_last_bits: int | None = 8
    rules: tuple[tuple[str, Any], ...] = ()
    quantize_matmuls: bool = True
    calib_method: str = "absmax"
    weight_method: str = "absmax"
    unsigned_activations: bool = True
    percentile: float = 99.99

    def __post_init__(self):
        numerics.check_bits(self.w_bits, name="w_bits")
        if self.a_bits is not None:
            numerics.check_bits(self.a_bits, name="a_bits")
        if self.keep_first_last_bits is not None:
            numerics.check_bits(self.keep_first_last_bits, name="keep_first_last_bits")
        for name in ("calib_method", "weight_method"):
            if getattr(self, name) not in calibration.METHODS:
                raise ValueError(f"{name} must be one of {calibration.METHODS}, got {getattr(self, name)!r}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        object.__setattr__(self, "rules", tuple(tuple(r) for r in self.rules))

    @property
    def activation_bits(self) -> int:
        return self.w_bits if self.a_bits is None else self.a_bits


@flax.struct.dataclass
class QuantizedState:
    """What :func:`quantize` returns beside the apply function: a pytree.

    Attributes:
      variables: the model's variables with every policy layer's kernel fake-quantized.
      policy: the policy (activation clips, bits, switches as arrays).
    """

    variables: Any
    policy: Policy


def layer_calls(model: nn.Module, example: Any, *, variables: Any = None) -> list[LayerCall]:
    """The quantizable layer calls of ``model`` on inputs shaped like ``example`` (no compute)."""
    model, variables = nnx_model.as_functional(model, variables)
    example = jax.ShapeDtypeStruct(np.shape(example), getattr(example, "dtype", np.float32))
    return intercept.trace_layers(model, example, variables=variables)


def build_policy(calls: Sequence[LayerCall], config: PTQConfig) -> Policy:
    """An uncalibrated policy for ``calls`` (from :func:`layer_calls`) as ``config`` says."""
    return policy_lib.build(calls, w_bits=config.w_bits, a_bits=config.activation_bits,
                            keep_first_last_bits=config.keep_first_last_bits, rules=config.rules,
                            quantize_matmuls=config.quantize_matmuls)


def collect_statistics(model: nn.Module, variables: Any, batches: Iterable[Any], *,
                       calls: Sequence[LayerCall], on_progress: Progress | None = None) -> dict:
    """Running statistics of every layer's inputs over full-precision forwards of ``batches``.

    Args:
      batches: arrays ``[B, ...]`` or ``(images, labels)`` pairs.
      calls: the layers to record (:func:`layer_calls`).
      on_progress: called with ``{'images': seen}`` after every batch.
    """
    report = None if on_progress is None else (lambda n: on_progress({"images": n}))
    return apply.collect_activation_stats(model, variables, (apply.batch_images(b) for b in batches),
                                          apply.init_activation_stats(calls), on_batch=report)


def with_clips(policy: Policy, statistics: Mapping, config: PTQConfig) -> Policy:
    """``policy`` with activation clips from :func:`collect_statistics` by ``config.calib_method``."""
    return policy_lib.with_activation_clips(policy, statistics, method=config.calib_method,
                                            unsigned_if_nonnegative=config.unsigned_activations,
                                            percentile=config.percentile)


def calibrate(model: nn.Module, variables: Any, batches: Iterable[Any], config: PTQConfig = PTQConfig(), *,
              policy: Policy | None = None, statistics: Mapping | None = None,
              on_progress: Progress | None = None) -> Policy:
    """A calibrated policy for ``model``: the study's calibration (256 images in the paper).

    Args:
      model, variables: the full-precision Flax model.
      batches: calibration images ``[B, H, W, C]`` (or ``(images, labels)`` pairs).
      config: bits, rules and estimators.
      policy: start from this policy instead of building one from ``config`` (its names are
        checked against the model's layers).
      statistics: reuse statistics from :func:`collect_statistics` instead of running the model.
      on_progress: progress callback (``{'images': seen}``).

    Returns:
      ``{layer name: LayerQuant}`` with finite activation clips for every enabled layer.

    Raises:
      ValueError: no calibration images; a policy or rule that does not match the model.
    """
    model, variables = nnx_model.as_functional(model, variables)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("batches is empty: calibration needs at least one batch of images")
    calls = layer_calls(model, apply.batch_images(first), variables=variables)
    if policy is None:
        policy = build_policy(calls, config)
    else:
        policy_lib.validate(policy, dict.fromkeys(c.name for c in calls))
    if statistics is None:
        statistics = collect_statistics(model, variables, itertools.chain([first], iterator), calls=calls,
                                        on_progress=on_progress)
    return with_clips(policy, statistics, config)


_quantize_weights = jax.jit(apply.quantize_weights, static_argnames="method")


def quantized_logits_fn(model: nn.Module) -> Callable[[QuantizedState, jax.Array], jax.Array]:
    """``apply_fn(state, images)``: the quantized forward of ``model`` for a :class:`QuantizedState`."""

    def apply_fn(state: QuantizedState, images: jax.Array) -> jax.Array:
        return apply.quantized_apply(model, state.variables, state.policy, images, quantize_kernels=False)

    return apply_fn


def quantize(model: nn.Module, variables: Any, policy: Policy, *, weight_method: str = "absmax",
             weight_scales: Mapping[str, jax.Array] | None = None
             ) -> tuple[Callable[[QuantizedState, jax.Array], jax.Array], QuantizedState]:
    """Quantizes ``model`` under a calibrated ``policy``.

    Weights are fake-quantized once here (per output channel, ``weight_method``, or the given
    ``weight_scales`` e.g. from ranking-aware PTQ); activations in every call of ``apply_fn``.

    Returns:
      ``(apply_fn, state)`` with ``apply_fn(state, images) -> logits``; ``state`` is a pytree,
      so ``jax.jit(apply_fn)`` compiles once for every policy of the same layers.

    Raises:
      ValueError: a policy that is not calibrated, or names a layer the model lacks.
    """
    model, variables = nnx_model.as_functional(model, variables)
    policy_lib.check_calibrated(policy)
    apply.check_weighted_layers(variables, policy)  # here, not under the jit below
    qvars = _quantize_weights(variables, policy, method=weight_method, scales=weight_scales)
    return quantized_logits_fn(model), QuantizedState(qvars, policy)


def evaluate(apply_fn: Callable[[Any, jax.Array], jax.Array], state: Any, batches: Iterable[tuple],
             *, batch_size: int, num_classes: int | None = None,
             on_progress: Progress | None = None) -> dict[str, float]:
    """Top-1/top-5 (%) of ``apply_fn(state, images)`` over ``(images, labels)`` batches.

    A one-off evaluation; for many states hold ``eqjax.algorithms.metrics.make_evaluator(apply_fn)``.
    """
    return metrics.evaluate(apply_fn, state, batches, batch_size=batch_size, num_classes=num_classes,
                            on_progress=on_progress)


def sweep(model: nn.Module, variables: Any, policy: Policy, batches: Iterable[tuple], *,
          layers: Sequence[str] | None = None, bits: Sequence[int] = (4, 6, 8), batch_size: int,
          chunk_size: int | None = None, on_progress: Progress | None = None) -> sensitivity.SensitivityResult:
    """Sensitivity (eq. 5 and the logit metrics) of each layer alone at each of ``bits``.

    Args:
      policy: a calibrated policy (its clips are used, its bits replaced).
      batches: ``(images, labels)``; labels < 0 mean unlabelled.
      layers: the layers to sweep (default: every weighted layer of the policy).

    Returns:
      :class:`eqjax.algorithms.sensitivity.SensitivityResult`.
    """
    if layers is None:
        layers = [name for name, lq in policy.items() if bool(lq.w_enabled)]
    report = None if on_progress is None else (lambda n: on_progress({"images": n}))
    return sensitivity.sweep_sensitivity(model, variables, policy, batches, layers=layers, bits=bits,
                                         batch_size=batch_size, chunk_size=chunk_size, on_batch=report)
