"""Integer execution and export of quantized models (DESIGN's deployment layer, above ``quant``).

  ``packing``   int8 / int4 (two per byte) / int2 (four per byte) storage
  ``artifact``  the integer artifact: BatchNorm folded, integer weights, scales, manifest, one file
  ``integer``   the integer forward in JAX (int8 operands, int32 accumulators, one rescale)
  ``onnx_export``  the artifact as an ONNX QDQ graph for ONNX Runtime (optional ``deploy`` extra)
  ``qwix_export``  the artifact as Qwix rules and pre-quantized params (optional ``deploy`` extra)
"""
