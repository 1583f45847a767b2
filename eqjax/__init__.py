"""eqjax: energy-aware post-training quantization and mixed precision of vision models in JAX.

Tensors (the study's eqs. 3-4, straight-through gradients; bits may be traced):
  ``quantize(x, bits, *, scale=None, axis=None, signed=True)``, ``quantize_int``, ``dequantize``.

Any Flax model, Linen or NNX (``eqjax.ptq``; layers are named by their module or attribute path,
timm names for ours; an NNX module is passed with ``variables=None``):
  ``PTQConfig(w_bits=4, a_bits=4)``            how to quantize (rules, estimators, first/last 8 bits)
  ``calibrate(model, variables, batches, config) -> policy``      activation clips from images
  ``quantize_model(model, variables, policy) -> (apply_fn, state)``   ``apply_fn(state, images)``
  ``evaluate(apply_fn, state, batches, batch_size=...)``           top-1 / top-5, sharded
  ``sweep(model, variables, policy, batches, ...)``                layer sensitivity (eq. 5)

Packages, by layer (DESIGN): ``eqjax.quant`` (``numerics``, ``calibration``, ``policy``,
``layers``, ``intercept``, ``nnx_model``, ``apply``, ``folding``), ``eqjax.algorithms`` (``energy`` (eq. 7), ``sensitivity``,
``second_order``, ``mixed_precision`` (eq. 6, budgets), ``allocation``, ``ranking``,
``reconstruction``, ``vit_quant``, ``pareto``, ``metrics``), then ``ptq`` (the pipeline),
``models`` (ResNet-18, DeiT-Tiny, EfficientNet-Lite0 with timm names), ``data``, ``checkpoint``,
``training`` and ``storage`` (atomic writes; digests checked on every read back). Every module is also reachable by its short name (``eqjax.numerics``,
``from eqjax import reconstruction``, ``import eqjax.vit_quant``), as before the grouping.
Integer execution and export live in ``eqjax.deploy`` (``packing``, ``artifact``, ``integer``,
``onnx_export``; imported by name, ``from eqjax.deploy import artifact``).

Example:
  >>> import jax.numpy as jnp
  >>> import eqjax
  >>> x = jnp.array([0.6, -1.0, 0.25, 0.1])
  >>> [round(float(v), 4) for v in eqjax.quantize(x, 4)]     # s = max|x| / 7
  [0.5714, -1.0, 0.2857, 0.1429]
"""

import importlib
import sys

from eqjax.quant.numerics import dequantize, quantize, quantize_int
from eqjax.ptq import PTQConfig, QuantizedState, bits_table, calibrate, evaluate, sweep
from eqjax.ptq import quantize as quantize_model

# The short names user code has always imported (``eqjax.numerics``, ``import eqjax.reconstruction``)
# are the grouped modules themselves: one module object under two names, nothing copied.
_GROUPED = {"quant": ("numerics", "calibration", "policy", "layers", "intercept", "nnx_model", "apply", "folding",
                      "equalization"),
            "algorithms": ("energy", "sensitivity", "second_order", "mixed_precision", "allocation", "ranking",
                           "ranking_core", "reconstruction", "reconstruction_core", "qat", "width_search", "vit_quant", "pareto",
                           "metrics")}
for _package, _names in _GROUPED.items():
    for _name in _names:
        _module = importlib.import_module(f"eqjax.{_package}.{_name}")
        sys.modules.setdefault(f"eqjax.{_name}", _module)
        globals()[_name] = _module
del _package, _names, _name, _module

__version__ = "0.1.0"

__all__ = ["calibration", "numerics", "policy", "quantize", "quantize_int", "dequantize", "PTQConfig",
           "QuantizedState", "calibrate", "quantize_model", "evaluate", "sweep", "bits_table",
           "__version__"]
