"""ONNX Runtime's fused integer kernels against its unfused reference, per weight storage.

One QDQ layer (uint8 activations, per-channel int8 or uint8+128 weights, a dense or a 3x3 conv,
with and without a QuantizeLinear after it) run once with every graph optimization and once
with none; prints the largest difference of the outputs. On AVX2 CPUs without VNNI the U8S8
kernels (int8 weights) saturate pairs of products in ``vpmaddubsw``; U8U8 (uint8 weights, zero
point 128, what ``eqjax.deploy.onnx_export`` writes by default) stays exact.

    python -m benchmarks.onnx_weight_type_probe
"""

from __future__ import annotations

import numpy as np


def max_difference(op: str, weight_type: str, with_quantize: bool, *, seed: int = 0) -> float:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    k, n = 64, 32
    x = (np.abs(rng.normal(size=(8, k) if op == "MatMul" else (8, k, 6, 6))) * 3).astype(np.float32)
    q = rng.integers(-127, 128, (k, n) if op == "MatMul" else (n, k, 3, 3)).astype(np.int8)
    scale = (rng.uniform(0.5, 1.5, n) * 0.01).astype(np.float32)
    if weight_type == "uint8":
        stored, zero = (q.astype(np.int16) + 128).astype(np.uint8), np.full(n, 128, np.uint8)
    else:
        stored, zero = q, np.zeros(n, np.int8)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "a_scale"),
             numpy_helper.from_array(np.array(0, np.uint8), "a_zero"), numpy_helper.from_array(stored, "w_q"),
             numpy_helper.from_array(scale, "w_scale"), numpy_helper.from_array(zero, "w_zero"),
             numpy_helper.from_array(np.array(0.05, np.float32), "y_scale")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zero"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "a_scale", "a_zero"], ["x_dq"]),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"], axis=1 if op == "MatMul" else 0),
             helper.make_node(op, ["x_dq", "w_dq"], ["y0"], **({} if op == "MatMul" else {"pads": [1, 1, 1, 1]}))]
    if with_quantize:
        nodes += [helper.make_node("QuantizeLinear", ["y0", "y_scale", "a_zero"], ["y_q"]),
                  helper.make_node("DequantizeLinear", ["y_q", "y_scale", "a_zero"], ["y"])]
    else:
        nodes += [helper.make_node("Identity", ["y0"], ["y"])]
        inits.pop()
    out_shape = [8, n] if op == "MatMul" else [8, n, 6, 6]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]).SerializeToString()
    outputs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.log_severity_level = 3
        outputs.append(ort.InferenceSession(model, options).run(None, {"x": x})[0])
    return float(np.max(np.abs(outputs[0] - outputs[1])))


def main() -> None:
    for op in ("MatMul", "Conv"):
        for weight_type in ("int8", "uint8"):
            for with_quantize in (False, True):
                print(f"{op:6s} weights {weight_type:5s} {'with' if with_quantize else 'no  '} output Q: "
                      f"max |fused - reference| = {max_difference(op, weight_type, with_quantize):.4g}")


if __name__ == "__main__":
    main()
