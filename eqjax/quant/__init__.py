"""The quantization layer: tensors, scales, per-layer policies and the quantized forward of any
Flax model (DESIGN's ``numerics → calibration → policy → apply``).

  ``numerics``     quantize / dequantize / fake-quant with straight-through gradients (no Flax)
  ``calibration``  scale estimators (absmax, percentile, MSE) and running statistics
  ``policy``       per-layer ``LayerQuant`` bits, clips and quantizer kinds as a pytree
  ``layers``       which Linen / NNX modules are layers: kind, kernel output axes, MACs
  ``intercept``    layer calls and timm-style names of any Flax model (the one interception point)
  ``nnx_model``    Flax NNX models as ``(model, variables)``; the quantized NNX module
  ``apply``        the quantized forward: weights as a pure map, inputs by interception
  ``folding``      BatchNorm folded into the preceding convolution (what integer kernels run)
  ``equalization`` cross-layer equalization of channel ranges between layer pairs
"""
