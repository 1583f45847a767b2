"""eqjax: energy-aware post-training quantization and mixed precision of vision models in JAX.

The public entry point for user code is :func:`eqjax.quantize` (eqs. 3-4 of the
study, with a straight-through gradient). Submodules: ``numerics`` (quantizers),
``calibration`` (scale estimators and running statistics), ``models`` (Flax
models and their registry), ``checkpoint`` (converted weights on disk).
"""

from eqjax import calibration, numerics
from eqjax.numerics import dequantize, quantize, quantize_int

__version__ = "0.1.0"

__all__ = ["calibration", "numerics", "quantize", "quantize_int", "dequantize", "__version__"]
