"""eqjax: energy-aware post-training quantization and mixed precision of vision models in JAX.

Tensors (the study's eqs. 3-4, straight-through gradients; bits may be traced):
  ``quantize(x, bits, *, scale=None, axis=None, signed=True)``, ``quantize_int``, ``dequantize``.

Any Flax model (``eqjax.ptq``; layers are named by their module path, timm names for ours):
  ``PTQConfig(w_bits=4, a_bits=4)``            how to quantize (rules, estimators, first/last 8 bits)
  ``calibrate(model, variables, batches, config) -> policy``      activation clips from images
  ``quantize_model(model, variables, policy) -> (apply_fn, state)``   ``apply_fn(state, images)``
  ``evaluate(apply_fn, state, batches, batch_size=...)``           top-1 / top-5, sharded
  ``sweep(model, variables, policy, batches, ...)``                layer sensitivity (eq. 5)

Modules: ``numerics`` · ``calibration`` (scale estimators) · ``policy`` (per-layer bits and
clips as a pytree) · ``apply`` (quantized forward of any Flax model) · ``intercept`` (layer
calls and names) · ``energy`` (eq. 7) · ``sensitivity`` · ``mixed_precision`` (eq. 6 and
energy budgets) · ``ranking`` / ``ranking_core`` (ranking-aware PTQ for ViTs) · ``metrics`` ·
``models`` (ResNet-18, DeiT-Tiny, EfficientNet-Lite0 with timm names) · ``data`` · ``checkpoint``.

Example:
  >>> import jax.numpy as jnp
  >>> import eqjax
  >>> x = jnp.array([0.6, -1.0, 0.25, 0.1])
  >>> [round(float(v), 4) for v in eqjax.quantize(x, 4)]     # s = max|x| / 7
  [0.5714, -1.0, 0.2857, 0.1429]
"""

from eqjax import calibration, numerics, policy
from eqjax.numerics import dequantize, quantize, quantize_int
from eqjax.ptq import PTQConfig, QuantizedState, bits_table, calibrate, evaluate, sweep
from eqjax.ptq import quantize as quantize_model

__version__ = "0.1.0"

__all__ = ["calibration", "numerics", "policy", "quantize", "quantize_int", "dequantize", "PTQConfig",
           "QuantizedState", "calibrate", "quantize_model", "evaluate", "sweep", "bits_table",
           "__version__"]
