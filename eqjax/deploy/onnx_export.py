"""An :class:`~eqjax.deploy.artifact.IntegerArtifact` as an ONNX graph in QDQ form, for ONNX Runtime
(and TensorRT, OpenVINO, QNN, which read the same format).

The graph is written from the model's own jaxpr, not from a hand-kept list of layers: the
model runs once under the interception point with every quantized input routed through a
``qdq`` marker primitive and every integer kernel through a ``weight`` marker, and
:func:`jaxpr_to_onnx` translates the jaxpr primitive by primitive. So any Flax Linen model
whose primitives have a translation exports, and the graph is what JAX runs:

* a quantized input becomes ``QuantizeLinear → DequantizeLinear`` in uint8 (zero point 0, or 128
  for a signed grid: the same levels); grids narrower than 8 bits clip to their range first,
  which rounds the same way;
* an integer kernel becomes an integer initializer (``weight_type``: uint8 levels + 128 by
  default, int8, or packed INT4) with a per-output-channel ``DequantizeLinear``; a constant bias
  that follows a conv is folded into the Conv (int32 at scale ``s_x · s_w`` when every layer is
  W8A8, the form ONNX Runtime fuses into ``QLinearConv``; float otherwise);
* everything whose inputs are constant (BatchNorm arithmetic, biases) is evaluated here;
* with ``residual_scales`` (:func:`residual_scales`, calibrated in ONNX Runtime on the exact
  graph) both operands of every residual add go on 8-bit grids too: an identity shortcut reads
  the DequantizeLinear its block's first conv reads, a conv's output gets an absmax grid
  (unsigned where it was never negative). Every conv then ends in a quantizer, which is what
  ONNX Runtime needs to run it as ``QLinearConv`` (otherwise it dequantizes the kernel and
  convolves in float); a ReLU or ReLU6 ahead of an unsigned grid that saturates inside it is
  left to the grid (the same integers), so it does not stand between a conv and its quantizer. This is
  the full-integer model integer runtimes execute, one step past eqjax's fake quantization
  (which quantizes layer inputs only), so its accuracy is measured separately.

Layouts stay JAX's (NHWC): each conv is wrapped in two Transposes, which ONNX Runtime's
transpose optimizer cancels where it can (all of them once every conv is integer). The graph
has a fixed batch size (JAX traces shapes). The ``onnx`` package is needed (``pip install
'eqjax[deploy]'``); it is imported here only.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from eqjax.deploy import packing
from eqjax.storage import write_atomic
from eqjax.deploy.artifact import IntegerArtifact
from eqjax.deploy.integer import dequantized_variables
from eqjax.models import ops
from eqjax.quant import intercept, numerics

__all__ = ["qdq_p", "weight_p", "WEIGHT_TYPES", "INEXACT_ORT_OPTIMIZERS", "RECORD", "traced_jaxpr", "export",
           "residual_scales", "session", "jaxpr_to_onnx", "OPSET"]

OPSET = 21  # INT4 tensors and per-axis DequantizeLinear

qdq_p = jex_core.Primitive("eqjax_qdq")
qdq_p.def_abstract_eval(lambda x, **_: x)
qdq_p.def_impl(lambda x, *, scale, bits, signed: numerics.quantize_clipped(
    x, bits, jnp.float32(scale) * numerics.quant_range(bits, signed=signed)[1], signed=signed))

weight_p = jex_core.Primitive("eqjax_weight")
weight_p.def_abstract_eval(lambda kernel, **_: kernel)
weight_p.def_impl(lambda kernel, *, name: kernel)


def _require_onnx():
    try:
        import onnx
    except ImportError as e:  # an optional extra
        raise ImportError("ONNX export needs the onnx package: pip install 'eqjax[deploy]'") from e
    return onnx


def traced_jaxpr(model: nn.Module, artifact: IntegerArtifact, example: Any) -> jax.core.ClosedJaxpr:
    """The jaxpr of ``model`` under ``artifact`` with the ``qdq`` and ``weight`` markers (fixed batch)."""
    variables = dequantized_variables(artifact)
    layers = artifact.layers

    def handler(name, module, call, args, kwargs):
        layer = layers.get(name)
        if layer is None:
            return call(*args, **kwargs)
        args = list(args)
        if layer.a_scale is not None:
            for i, scale in enumerate(np.asarray(layer.a_scale)):
                args[i] = qdq_p.bind(args[i], scale=float(scale), bits=int(layer.a_bits), signed=bool(layer.a_signed[i]))
        if layer.weight is None:
            return call(*args, **kwargs)
        params = dict(module.variables["params"])
        params["kernel"] = weight_p.bind(params["kernel"], name=name)
        return module.clone(parent=None, name=None).apply({"params": params}, *args, **kwargs)

    def run(images):  # lax's own convolutions: ONNX Conv nodes, not the CPU shift-add forms
        with intercept.intercept_calls(handler), ops.lax_convolutions():
            return model.apply(variables, images)

    return jax.make_jaxpr(run)(jnp.zeros(np.shape(example), jnp.float32))


WEIGHT_TYPES = ("uint8", "int8", "int4")


def export(model: nn.Module, artifact: IntegerArtifact, *, batch_size: int, weight_type: str = "uint8",
           residual_scales: Any = None, path: str | None = None) -> Any:
    """The ONNX ``ModelProto`` of ``model`` under ``artifact`` for batches of ``batch_size``.

    Args:
      model: the Flax Linen model the artifact was built for.
      artifact: from :func:`eqjax.deploy.artifact.build` or ``load``.
      batch_size: the graph's fixed batch size.
      weight_type: how the integer weights are stored: ``uint8`` (the signed levels + 128, zero
        point 128: ONNX Runtime's U8U8 kernels, exact on every x86 CPU), ``int8`` (its U8S8 kernels:
        faster with AVX-VNNI, but on AVX2-only CPUs ``vpmaddubsw`` saturates pairs of products at
        int16 and results drift), or ``int4`` (weights of at most 4 bits packed two per byte, the
        rest as ``uint8``; ONNX Runtime dequantizes them and runs a float conv).
      residual_scales: None (residual adds in float: the fake-quant model exactly), or
        :func:`residual_scales`' ``{operand: {"scale", "signed"}}``: both operands of every residual add on
        8-bit grids, so that every conv ends in a quantizer and ONNX Runtime runs all of them as
        ``QLinearConv`` (a different model: its accuracy is measured, not assumed).
      path: also write the model there (atomically).

    Raises:
      ValueError: a primitive without an ONNX translation (named, with where it is in the model).
    """
    onnx = _require_onnx()
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    shape = [batch_size] + list(artifact.manifest["input_shape"][1:])
    closed = traced_jaxpr(model, artifact, jax.ShapeDtypeStruct(shape, jnp.float32))
    proto = jaxpr_to_onnx(closed, artifact, weight_type=weight_type, residuals=residual_scales)
    onnx.checker.check_model(proto)
    if path is not None:
        data = proto.SerializeToString()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        write_atomic(path, write)
    return proto


def residual_scales(model: nn.Module, artifact: IntegerArtifact, batches: Any, *, threads: int | None = None
                    ) -> dict[str, dict[str, Any]]:
    """``{operand: {"scale", "signed"}}``: the 8-bit absmax grid of every residual-add operand that
    no layer quantizes at 8 bits (a conv's output before the add) — unsigned, ``max / 255``, where
    it was never negative (a ReLU output, whose ReLU the quantizer then absorbs), else signed,
    ``max|x| / 127`` — over ``batches`` (image arrays of one batch size, the calibration images),
    run in ONNX Runtime on the exact graph. For :func:`export`."""
    batches = [np.asarray(b, np.float32) for b in batches]
    if not batches or any(len(b) != len(batches[0]) for b in batches):
        raise ValueError(f"residual_scales needs batches of one size, got sizes {[len(b) for b in batches]}")
    recording = export(model, artifact, batch_size=len(batches[0]), residual_scales=RECORD)
    names = [o.name for o in recording.graph.output[1:]]
    run = session(recording, threads=threads)
    largest, smallest = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for images in batches:
        for name, value in zip(names, run.run(names, {"images": images})):
            largest[name] = max(largest[name], float(np.max(np.abs(value))))
            smallest[name] = min(smallest[name], float(np.min(value)))
    out = {}
    for name, value in largest.items():
        signed = smallest[name] < 0
        out[name] = {"scale": (value if value > 0 else 1.0) / (127.0 if signed else 255.0), "signed": signed}
    return out


# ONNX Runtime rewrites that change what the graph computes (on ResNet-18 W4A4 from the shared
# checkpoint, each moved top-1 predictions): WeightBiasQuantization re-quantizes the float conv
# biases of narrow widths to int32 at s_x·s_w; ConvAddActivationFusion folds a residual add and
# the clip after it into the conv and changes outputs by up to 0.23 (logits of a random batch).
INEXACT_ORT_OPTIMIZERS = ("WeightBiasQuantization", "ConvAddActivationFusion")


def session(model: Any, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of ``model`` (a ``ModelProto``, bytes or a path) with every graph
    optimization on (QDQ fusion into integer kernels, transpose cancelling) but the inexact ones
    (:data:`INEXACT_ORT_OPTIMIZERS`); ``threads`` intra-op."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("running ONNX graphs needs onnxruntime: pip install 'eqjax[deploy]'") from e
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(INEXACT_ORT_OPTIMIZERS))


# ----------------------------------------------------------------------------
# jaxpr → ONNX
# ----------------------------------------------------------------------------


def _minimal(value: np.ndarray) -> np.ndarray:
    """A broadcast constant reduced to its distinct values (size-1 axes where it repeats)."""
    value = np.asarray(value)
    index = tuple(slice(0, 1) if stride == 0 and n > 1 else slice(None) for stride, n in zip(value.strides, value.shape))
    return np.ascontiguousarray(value[index])


class _Graph:
    """ONNX nodes and initializers under construction; values are names or numpy constants."""

    def __init__(self, onnx, artifact: IntegerArtifact, weight_type: str, residuals: Any = None):
        self.onnx, self.helper = onnx, onnx.helper
        self.artifact, self.weight_type = artifact, weight_type
        self.nodes, self.initializers, self.counter = [], [], 0
        self.info: dict[str, tuple] = {}  # ONNX name of a DequantizeLinear output -> ('qdq', its scale)
        self.grids: dict[tuple, str] = {}  # (tensor, scale, bits, signed) -> its DequantizeLinear output
        # Residual adds: None (float, as JAX computes them), RECORD (their float operands as extra
        # outputs, for residual_scales) or {operand key: {"scale", "signed"}} (each on an 8-bit grid).
        self.residuals, self.residual_count, self.recorded = residuals, 0, []
        # int32 conv biases only where every integer layer is W8A8: one rounded bias ahead of a
        # narrower grid moved 3.5% of ResNet-18 W4A4's predictions (its first conv is W8A8).
        self.int32_biases = all((l.w_bits, l.a_bits) == (8, 8) for l in artifact.layers.values() if l.weight is not None)

    def fresh(self, hint: str) -> str:
        self.counter += 1
        return f"{hint}_{self.counter}"

    def constant(self, value: Any, hint: str = "c", dtype=None) -> str:
        value = _minimal(np.asarray(value)) if dtype is None else np.asarray(value, dtype)
        if dtype is None and value.dtype == np.float64:
            value = value.astype(np.float32)
        name = self.fresh(hint)
        self.initializers.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list, hint: str | None = None, outputs: int = 1, **attrs) -> Any:
        inputs = [x if isinstance(x, str) else self.constant(x) for x in inputs]
        names = [self.fresh(hint or op.lower()) for _ in range(outputs)]
        self.nodes.append(self.helper.make_node(op, inputs, names, **attrs))
        return names[0] if outputs == 1 else names


def _ints(values) -> np.ndarray:
    return np.asarray(list(values), np.int64)


def _is_const(x) -> bool:
    return isinstance(x, (np.ndarray, np.generic))


# Primitives evaluated on broadcast constants in their small form (then broadcast again).
_ELEMENTWISE = {"add", "sub", "mul", "div", "max", "min", "pow", "neg", "exp", "log", "rsqrt", "sqrt", "abs",
                "integer_pow", "square", "convert_element_type", "erf", "erfc", "tanh", "logistic"}


def _bind(eqn, values: list) -> Any:
    """``eqn``'s primitive applied to concrete values (as :func:`jax.core.eval_jaxpr` does)."""
    return eqn.primitive.bind(*[jnp.asarray(x) for x in values], **eqn.primitive.get_bind_params(eqn.params))


def _fold_constant(eqn, invals: list) -> list:
    """The outputs of ``eqn`` on constant inputs; broadcasts stay numpy views (no large initializers)."""
    name = eqn.primitive.name
    if name == "broadcast_in_dim":
        shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
        inter = [1] * len(shape)
        for i, d in enumerate(dims):
            inter[d] = np.shape(invals[0])[i]
        return [np.broadcast_to(np.reshape(invals[0], inter), shape)]
    if name in _ELEMENTWISE and len(eqn.outvars) == 1 and eqn.outvars[0].aval.shape:
        small = np.broadcast_arrays(*[_minimal(x) for x in invals])
        out = _bind(eqn, small)
        return [np.broadcast_to(np.asarray(out), eqn.outvars[0].aval.shape)]
    out = _bind(eqn, invals)
    return [np.asarray(o) for o in (out if eqn.primitive.multiple_results else [out])]


def jaxpr_to_onnx(closed: jax.core.ClosedJaxpr, artifact: IntegerArtifact, *, weight_type: str = "uint8",
                  residuals: Any = None) -> Any:
    """Translates a jaxpr from :func:`traced_jaxpr` into an ONNX ``ModelProto`` (input ``images``,
    output ``logits``; with ``residuals=RECORD`` also each residual operand it would quantize)."""
    onnx = _require_onnx()
    graph = _Graph(onnx, artifact, weight_type, residuals)
    jaxpr = closed.jaxpr
    env: dict = {}
    for var, const in zip(jaxpr.constvars, closed.consts):
        env[var] = np.asarray(const)
    (image_var,) = jaxpr.invars
    env[image_var] = "images"
    outputs = _translate(graph, jaxpr, env)
    (logits,) = outputs
    if _is_const(logits):
        raise ValueError("the model's output does not depend on its input")
    graph.nodes.append(graph.helper.make_node("Identity", [logits], ["logits"]))
    to_onnx = lambda aval: onnx.helper.np_dtype_to_tensor_dtype(np.dtype(aval.dtype))
    inputs = [onnx.helper.make_tensor_value_info("images", to_onnx(image_var.aval), list(image_var.aval.shape))]
    out_aval = jaxpr.outvars[0].aval
    outs = [onnx.helper.make_tensor_value_info("logits", to_onnx(out_aval), list(out_aval.shape))]
    for key, value, shape in graph.recorded:
        graph.nodes.append(graph.helper.make_node("Identity", [value], [key]))
        outs.append(onnx.helper.make_tensor_value_info(key, onnx.TensorProto.FLOAT, shape))
    g = onnx.helper.make_graph(graph.nodes, "eqjax", inputs, outs, graph.initializers)
    return onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", OPSET)], producer_name="eqjax")


def _read(env, atom):
    if isinstance(atom, jex_core.Literal):
        return np.asarray(atom.val, dtype=atom.aval.dtype)
    return env[atom]


def _translate(graph: _Graph, jaxpr, env: dict, *, inner: bool = False) -> list:
    counts: dict = {}
    for eqn in jaxpr.eqns:
        for v in eqn.invars:
            if not isinstance(v, jex_core.Literal):
                counts[v] = counts.get(v, 0) + 1
    for v in jaxpr.outvars:
        if not isinstance(v, jex_core.Literal):
            counts[v] = counts.get(v, 0) + 1
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        name = eqn.primitive.name
        if all(_is_const(x) for x in invals) and name not in ("eqjax_weight", "eqjax_qdq"):
            for var, value in zip(eqn.outvars, _fold_constant(eqn, invals)):
                env[var] = value
            continue
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            sub_jaxpr, consts = sub
            inner_env = {v: np.asarray(c) for v, c in zip(sub_jaxpr.constvars, consts)}
            inner_env.update(zip(sub_jaxpr.invars, invals))
            outs = _translate(graph, sub_jaxpr, inner_env, inner=True)
        else:
            rule = _RULES.get(name)
            if rule is None:
                source = getattr(eqn.source_info, "name_stack", "")
                raise ValueError(f"ONNX export: the JAX primitive {name!r} (in {source or 'the model'}) has no "
                                 "ONNX translation yet")
            single = rule(graph, eqn, invals, single_use=[counts.get(v, 0) == 1 for v in eqn.outvars])
            outs = single if eqn.primitive.multiple_results else [single]
        for var, value in zip(eqn.outvars, outs):
            env[var] = value
    # A pending ReLU leaves a call (jax.nn.relu6 is one) as it is: every reader sees one value.
    return [value if inner and isinstance(value, _PendingRelu) else _materialize(graph, value)
            for value in (_read(env, v) for v in jaxpr.outvars)]


def _sub_jaxpr(eqn):
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        value = eqn.params.get(key)
        if value is None:
            continue
        if hasattr(value, "consts"):
            return value.jaxpr, value.consts
        if hasattr(value, "eqns"):
            return value, ()
    return None


# ----------------------------------------------------------------------------
# Translation rules: (graph, eqn, input values, single_use) -> output value
# ----------------------------------------------------------------------------


def _materialize(graph: _Graph, value):
    """A value as an ONNX input: a pending Conv (bias not yet known) written out as its nodes, an
    artifact kernel used by something other than a conv or a dense layer as its DequantizeLinear."""
    if isinstance(value, _PendingConv):
        return value.emit(graph, None)
    if isinstance(value, _PendingRelu):
        return value.emit(graph)
    if isinstance(value, _WeightRef):  # written once, however many ops read it (depthwise taps)
        if value.materialized is None:
            value.materialized = _weight_input(graph, value.name, value.kernel, tuple(range(value.kernel.ndim)))
        return value.materialized
    return value


class _PendingConv:
    """A conv whose output may still take a constant per-channel bias (Conv's B input)."""

    def __init__(self, x, weight_layer, kernel, params, out_shape):
        self.x, self.weight_layer, self.kernel, self.params, self.out_shape = x, weight_layer, kernel, params, out_shape
        self.result = None

    def emit(self, graph: _Graph, bias: np.ndarray | None) -> str:
        if self.result is not None:
            return self.result
        dn = self.params["dimension_numbers"]
        lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
        x = graph.node("Transpose", [self.x], perm=list(lhs_spec))
        layer = None if bias is None else _full_integer_layer(graph, bias, self.x, self.weight_layer)
        w = _weight_input(graph, self.weight_layer, self.kernel, rhs_spec, layer)
        inputs = [x, w]
        if bias is not None:
            inputs.append(_bias_input(graph, bias, self.x, self.weight_layer, layer))
        if any(d != 1 for d in self.params["lhs_dilation"]) or self.params["batch_group_count"] != 1:
            raise ValueError("ONNX export: transposed or batch-grouped convolutions are not supported")
        padding = self.params["padding"]
        kernel_shape = [np.shape(self.kernel)[d] for d in rhs_spec[2:]]
        y = graph.node("Conv", inputs, kernel_shape=kernel_shape, strides=list(self.params["window_strides"]),
                       pads=[lo for lo, _ in padding] + [hi for _, hi in padding],
                       dilations=list(self.params["rhs_dilation"]), group=int(self.params["feature_group_count"]))
        self.result = graph.node("Transpose", [y], perm=[int(i) for i in np.argsort(out_spec)])
        return self.result


def _weight_input(graph: _Graph, weight, kernel, perm, layer=None) -> str:
    """The kernel transposed by ``perm``: an integer initializer with its per-channel DequantizeLinear
    when it is an artifact kernel (channel axis = where the kernel's last axis lands; ``layer``
    in place of the artifact's), else a float one."""
    if weight is None:
        return graph.constant(np.transpose(np.asarray(kernel, np.float32), perm), "kernel")
    layer = layer or graph.artifact.layers[weight]
    q = np.transpose(np.asarray(layer.weight, np.int8), perm)
    axis = list(perm).index(np.ndim(layer.weight) - 1)
    onnx = graph.onnx
    if graph.weight_type == "int4" and layer.w_bits <= 4:
        # Raw bytes, two values per byte, low nibble first: ONNX's INT4 layout, and packing.pack's.
        tensor = onnx.helper.make_tensor(graph.fresh(f"{weight}.q"), onnx.TensorProto.INT4, q.shape,
                                         packing.pack(q, 4).tobytes(), raw=True)
        zero = onnx.helper.make_tensor(graph.fresh("zp"), onnx.TensorProto.INT4, [q.shape[axis]],
                                       packing.pack(np.zeros(q.shape[axis], np.int8), 4).tobytes(), raw=True)
        graph.initializers += [tensor, zero]
        q_name, zp_name = tensor.name, zero.name
    elif graph.weight_type in ("uint8", "int4"):  # the same levels, offset by 128 (exact in ONNX Runtime's U8U8 kernels)
        q_name = graph.constant((q.astype(np.int16) + 128).astype(np.uint8), f"{weight}.q", dtype=np.uint8)
        zp_name = graph.constant(np.full(q.shape[axis], 128, np.uint8), "zp", dtype=np.uint8)
    else:
        q_name = graph.constant(q, f"{weight}.q", dtype=np.int8)
        zp_name = graph.constant(np.zeros(q.shape[axis], np.int8), "zp", dtype=np.int8)
    scale = graph.constant(np.asarray(layer.w_scale, np.float32), f"{weight}.scale", dtype=np.float32)
    return graph.node("DequantizeLinear", [q_name, scale, zp_name], f"{weight}.w", axis=axis)


def _int32_levels(graph: _Graph, bias: np.ndarray, x, layer) -> np.ndarray | None:
    """``bias / (s_x · s_w)`` per channel (float64), or None where the conv's input is not quantized."""
    source = graph.info.get(x) if isinstance(x, str) else None
    if layer is None or source is None or source[0] != "qdq":
        return None
    scale = np.float32(source[1]) * np.asarray(layer.w_scale, np.float32)  # the bias's DequantizeLinear scale
    return np.asarray(bias, np.float64) / scale.astype(np.float64)


def _full_integer_layer(graph: _Graph, bias: np.ndarray, x, weight):
    """In the full-integer graph, the layer with every channel whose bias int32 cannot hold (2^31
    accumulator units or more: weights ~1e-9 of the bias, EfficientNet-Lite0's dead channels)
    turned into its bias alone — zero kernel, a scale that holds the bias — so the conv still runs
    as ``QLinearConv``; None where nothing changes (and always in the exact graph)."""
    layer = graph.artifact.layers.get(weight)
    levels = _int32_levels(graph, bias, x, layer)
    if not isinstance(graph.residuals, dict) or not graph.int32_biases or levels is None:
        return None
    over = np.abs(levels) >= 2**30
    if not over.any():
        return None
    s_x = float(graph.info[x][1])
    weight_q, w_scale = np.array(layer.weight), np.array(layer.w_scale, np.float64)
    weight_q[..., over] = 0
    w_scale[over] = np.abs(np.asarray(bias, np.float64)[over]) / (s_x * 2**24)
    return layer.replace(weight=weight_q, w_scale=w_scale.astype(np.float32))


def _bias_input(graph: _Graph, bias: np.ndarray, x, weight, layer=None) -> str:
    """A conv bias: int32 at scale ``s_x · s_w`` behind a DequantizeLinear in an all-W8A8 graph (the
    form ONNX Runtime fuses into ``QLinearConv``; rounding the bias moves outputs by at most half
    an accumulator unit), else float (exact; narrower convs run dequantized in float anyway) — also
    where a channel's bias is 2^31 accumulator units or more (a channel with a tiny weight scale,
    as EfficientNet-Lite0 has), which int32 cannot hold."""
    layer = layer or graph.artifact.layers.get(weight)
    levels = _int32_levels(graph, bias, x, layer)
    if levels is None or not graph.int32_biases or not np.all(np.abs(levels) < 2**31 - 1):
        return graph.constant(np.asarray(bias, np.float32), "bias", dtype=np.float32)
    scale = np.float32(graph.info[x][1]) * np.asarray(layer.w_scale, np.float32)
    q = np.round(levels).astype(np.int32)
    return graph.node("DequantizeLinear", [graph.constant(q, "bias.q", dtype=np.int32),
                                           graph.constant(scale.astype(np.float32), "bias.scale", dtype=np.float32),
                                           graph.constant(np.zeros_like(q), "bias.zp", dtype=np.int32)], "bias", axis=0)


def _qdq(graph: _Graph, eqn, invals, single_use):
    (x,) = invals
    scale, bits, signed = eqn.params["scale"], eqn.params["bits"], eqn.params["signed"]
    activation = None
    if isinstance(x, _PendingRelu) and x.absorbed_by(scale, bits, signed):
        activation, x = x, x.x  # the grid's own saturation is the ReLU (and the ReLU6 clip)
    x = _materialize(graph, x)
    q_min, q_max = (float(v) for v in numerics.quant_range(bits, signed=signed))
    source = x
    if (source, scale, bits, signed) in graph.grids:  # a tensor two layers read on one grid: one quantizer
        return graph.grids[(source, scale, bits, signed)]
    if bits < 8:  # clip to the narrower grid first; clip-then-round = round-then-clip
        x = graph.node("Clip", [x, np.float32(q_min * scale), np.float32(q_max * scale)])
    out = _quantize_dequantize(graph, x, scale, signed)
    graph.grids[(source, scale, bits, signed)] = out
    if activation is not None and activation.quantized is None:
        activation.quantized = (out, bits)
    return out


def _quantize_dequantize(graph: _Graph, x: str, scale: float, signed: bool) -> str:
    # uint8 for every grid (a signed one with zero point 128, the same levels): ONNX Runtime's x86
    # kernels take uint8 activations, and its int8-to-uint8 rewrite fails on some graphs.
    scale_name = graph.constant(np.float32(scale), "a.scale", dtype=np.float32)
    zero = graph.constant(np.asarray(128 if signed else 0, np.uint8), "a.zp", dtype=np.uint8)
    q = graph.node("QuantizeLinear", [x, scale_name, zero], "q")
    out = graph.node("DequantizeLinear", [q, scale_name, zero], "dq")
    graph.info[out] = ("qdq", np.float32(scale))
    return out


RECORD = "record"


def _residual_operand(graph: _Graph, x: str, key: str, shape: list[int]) -> str:
    """One float operand of a residual add, on an 8-bit grid: the DequantizeLinear of the same
    tensor where a layer already quantizes it at 8 bits (an identity shortcut: the values the
    block's first conv reads), else the calibrated grid ``residuals[key]``."""
    if x in graph.info:
        return x
    first = next(((key, out) for key, out in graph.grids.items() if key[0] == x), None)  # its first quantizer
    if first is not None and first[0][2] == 8:
        return first[1]
    if graph.residuals == RECORD:
        graph.recorded.append((key, x, shape))
        return x
    if key not in graph.residuals:
        raise ValueError(f"ONNX export: no scale for residual operand {key!r} (residual_scales of this model "
                         f"and artifact give {', '.join(sorted(graph.residuals)) or 'none'})")
    grid = graph.residuals[key]
    return _quantize_dequantize(graph, x, float(grid["scale"]), signed=bool(grid["signed"]))


def _weight(graph: _Graph, eqn, invals, single_use):
    return _WeightRef(eqn.params["name"], invals[0])


class _WeightRef:
    """An artifact kernel: written by the layer that uses it, in that layer's layout."""

    def __init__(self, name, kernel):
        self.name, self.kernel = name, np.asarray(kernel)
        self.materialized: str | None = None  # its DequantizeLinear in the kernel's own layout, once written


def _conv(graph: _Graph, eqn, invals, single_use):
    x, w = invals
    if _is_const(x):
        raise ValueError("ONNX export: a convolution of a constant input")
    x = _materialize(graph, x)
    if isinstance(w, _WeightRef):
        pending = _PendingConv(x, w.name, w.kernel, eqn.params, eqn.outvars[0].aval.shape)
    elif _is_const(w):
        pending = _PendingConv(x, None, w, eqn.params, eqn.outvars[0].aval.shape)
    else:
        raise ValueError("ONNX export: a convolution with a computed kernel")
    return pending if single_use[0] else pending.emit(graph, None)


def _channel_bias(value: np.ndarray, pending: _PendingConv) -> np.ndarray | None:
    """``value`` as a per-output-channel vector when it varies only along the conv's feature axis."""
    small = _minimal(value)
    feature = pending.params["dimension_numbers"].out_spec[1]
    ndim = len(pending.out_shape)
    if small.ndim != ndim or any(n != 1 for i, n in enumerate(small.shape) if i != feature):
        return None
    return np.broadcast_to(small, [1 if i != feature else pending.out_shape[feature] for i in range(ndim)]).reshape(-1)


def _binary(op):
    def rule(graph, eqn, invals, single_use):
        a, b = invals
        if op == "Add" and isinstance(a, _PendingConv) and _is_const(b) and a.result is None:
            bias = _channel_bias(b, a)
            if bias is not None:
                return a.emit(graph, bias.astype(np.float32))
        if op == "Add" and isinstance(b, _PendingConv) and _is_const(a) and b.result is None:
            bias = _channel_bias(a, b)
            if bias is not None:
                return b.emit(graph, bias.astype(np.float32))
        if op in ("Add", "Sub") and _is_const(b) and not np.any(_minimal(b)):
            return a  # x ± 0 (a folded BatchNorm's mean): nothing to compute, a pending conv stays pending
        if op in ("Mul", "Div") and _is_const(b) and np.all(_minimal(b) == 1):
            return a
        if op == "Min" and isinstance(a, _PendingRelu) and a.result is None and a.high is None and _is_const(b) \
                and _minimal(b).size == 1 and float(_minimal(b).reshape(())) > 0:
            return _PendingRelu(a.x, float(_minimal(b).reshape(())))
        if op == "Add" and graph.residuals is not None:  # a block output's ReLU that a layer's grid absorbed
            a, b = (v.quantized[0] if isinstance(v, _PendingRelu) and v.quantized and v.quantized[1] == 8 else v
                    for v in (a, b))
        a, b = _materialize(graph, a), _materialize(graph, b)
        if op == "Add" and graph.residuals is not None and not _is_const(a) and not _is_const(b) \
                and len(eqn.outvars[0].aval.shape) >= 3:
            k = graph.residual_count
            graph.residual_count += 1
            shape = list(eqn.outvars[0].aval.shape)
            a, b = (_residual_operand(graph, v, f"residual{k}.{i}", shape) for i, v in enumerate((a, b)))
        if op == "Max" and _is_const(b) and not np.any(_minimal(b)):
            return _PendingRelu(a)
        return graph.node(op, [a, b])
    return rule


class _PendingRelu:
    """``max(x, 0)`` — or ``min(max(x, 0), high)`` (ReLU6) — written when something reads it.
    A quantizer whose unsigned grid saturates inside ``[0, high]`` reads ``x`` itself, the
    same integers (:func:`_qdq`), so ONNX Runtime sees the conv before it end in a quantizer
    and runs it as ``QLinearConv``."""

    def __init__(self, x: str, high: float | None = None):
        self.x, self.high, self.result = x, high, None
        self.quantized: tuple[str, int] | None = None  # (DequantizeLinear output, bits) of a grid that absorbed it

    def emit(self, graph: _Graph) -> str:
        if self.result is None:
            self.result = graph.node("Relu", [self.x]) if self.high is None else \
                graph.node("Clip", [self.x, np.float32(0), np.float32(self.high)])
        return self.result

    def absorbed_by(self, scale: float, bits: int, signed: bool) -> bool:
        """Whether quantizing ``x`` gives the integers of quantizing this activation of ``x``:
        an unsigned grid (negatives round to 0 either way) whose top level is reached below
        ``high`` (``high / scale > q_max − ½``, so ``high`` rounds to ``q_max``)."""
        q_max = (1 << bits) - 1
        return not signed and (self.high is None or np.float32(self.high) / np.float32(scale) > q_max - 0.5)


def _unary(op):
    return lambda graph, eqn, invals, single_use: graph.node(op, [_materialize(graph, invals[0])])


def _rsqrt(graph, eqn, invals, single_use):
    return graph.node("Reciprocal", [graph.node("Sqrt", [_materialize(graph, invals[0])])])


def _erfc(graph, eqn, invals, single_use):
    return graph.node("Sub", [np.float32(1.0), graph.node("Erf", [_materialize(graph, invals[0])])])


def _square(graph, eqn, invals, single_use):
    x = _materialize(graph, invals[0])
    return graph.node("Mul", [x, x])


def _integer_pow(graph, eqn, invals, single_use):
    x = _materialize(graph, invals[0])
    y = eqn.params["y"]
    if y == 2:
        return graph.node("Mul", [x, x])
    return graph.node("Pow", [x, np.float32(y)])


def _identity(graph, eqn, invals, single_use):
    return _materialize(graph, invals[0])


def _convert(graph, eqn, invals, single_use):
    dtype = np.dtype(eqn.params["new_dtype"])
    x = _materialize(graph, invals[0])
    if dtype == np.dtype(eqn.invars[0].aval.dtype):
        return x
    return graph.node("Cast", [x], to=graph.helper.np_dtype_to_tensor_dtype(dtype))


def _reshape_to(graph, x, shape):
    return graph.node("Reshape", [_materialize(graph, x), _ints(shape)])


def _reshape(graph, eqn, invals, single_use):
    return _reshape_to(graph, invals[0], eqn.outvars[0].aval.shape)


def _broadcast_in_dim(graph, eqn, invals, single_use):
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    in_shape = eqn.invars[0].aval.shape
    inter = [1] * len(shape)
    for i, d in enumerate(dims):
        inter[d] = in_shape[i]
    x = _reshape_to(graph, invals[0], inter)
    return graph.node("Expand", [x, _ints(shape)])


def _transpose(graph, eqn, invals, single_use):
    return graph.node("Transpose", [_materialize(graph, invals[0])], perm=list(eqn.params["permutation"]))


def _reduce(op):
    def rule(graph, eqn, invals, single_use):
        return graph.node(op, [_materialize(graph, invals[0]), _ints(eqn.params["axes"])], keepdims=0)
    return rule


def _dot_general(graph, eqn, invals, single_use):
    a, b = invals
    (ca, cb), (ba, bb) = eqn.params["dimension_numbers"]
    a_shape, b_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    if (isinstance(b, _WeightRef) or _is_const(b)) and len(b_shape) == 2 and tuple(ca) == (len(a_shape) - 1,) \
            and tuple(cb) == (0,) and not ba:  # a dense layer: x [..., in] @ kernel [in, out]
        kernel = _weight_input(graph, b.name, b.kernel, (0, 1)) if isinstance(b, _WeightRef) else b
        return graph.node("MatMul", [_materialize(graph, a), kernel])
    if isinstance(b, _WeightRef):
        b = _weight_input(graph, b.name, b.kernel, tuple(range(len(b_shape))))
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    a_sub = [next(letters) for _ in a_shape]
    b_sub = [None] * len(b_shape)
    for i, j in zip(ba, bb):
        b_sub[j] = a_sub[i]
    for i, j in zip(ca, cb):
        b_sub[j] = a_sub[i]
    b_sub = [s or next(letters) for s in b_sub]
    out = [a_sub[i] for i in ba] + [s for i, s in enumerate(a_sub) if i not in ba and i not in ca] \
        + [s for j, s in enumerate(b_sub) if j not in bb and j not in cb]
    equation = f"{''.join(a_sub)},{''.join(b_sub)}->{''.join(out)}"
    return graph.node("Einsum", [_materialize(graph, a), _materialize(graph, b)], equation=equation)


def _pad(graph, eqn, invals, single_use):
    x, value = invals
    config = eqn.params["padding_config"]
    if any(interior for _, _, interior in config) or any(lo < 0 or hi < 0 for lo, hi, _ in config):
        raise ValueError("ONNX export: interior or negative padding is not supported")
    pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
    return graph.node("Pad", [_materialize(graph, x), _ints(pads), np.asarray(value, np.float32).reshape(())])


def _slice(graph, eqn, invals, single_use):
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    return graph.node("Slice", [_materialize(graph, invals[0]), _ints(starts), _ints(limits),
                                _ints(range(len(starts))), _ints(strides)])


def _squeeze(graph, eqn, invals, single_use):
    return _reshape_to(graph, invals[0], eqn.outvars[0].aval.shape)


def _concatenate(graph, eqn, invals, single_use):
    values = []
    for value, var in zip(invals, eqn.invars):
        values.append(graph.constant(np.broadcast_to(value, var.aval.shape), "c", dtype=np.float32)
                      if _is_const(value) else _materialize(graph, value))
    return graph.node("Concat", values, axis=int(eqn.params["dimension"]))


def _reduce_window_max(graph, eqn, invals, single_use):
    dims, strides, padding = eqn.params["window_dimensions"], eqn.params["window_strides"], eqn.params["padding"]
    if dims[0] != 1 or dims[-1] != 1:
        raise ValueError("ONNX export: pooling over the batch or channel axis is not supported")
    x = graph.node("Transpose", [_materialize(graph, invals[0])], perm=[0, 3, 1, 2])
    y = graph.node("MaxPool", [x], kernel_shape=list(dims[1:-1]), strides=list(strides[1:-1]),
                   pads=[lo for lo, _ in padding[1:-1]] + [hi for _, hi in padding[1:-1]])
    return graph.node("Transpose", [y], perm=[0, 2, 3, 1])


_RULES = {
    "eqjax_qdq": _qdq, "eqjax_weight": _weight, "conv_general_dilated": _conv, "dot_general": _dot_general,
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "div": _binary("Div"),
    "max": _binary("Max"), "min": _binary("Min"), "pow": _binary("Pow"),
    "neg": _unary("Neg"), "exp": _unary("Exp"), "log": _unary("Log"), "tanh": _unary("Tanh"),
    "logistic": _unary("Sigmoid"), "erf": _unary("Erf"), "sqrt": _unary("Sqrt"), "abs": _unary("Abs"),
    "rsqrt": _rsqrt, "erfc": _erfc, "square": _square, "integer_pow": _integer_pow,
    "stop_gradient": _identity, "copy": _identity, "copy_p": _identity, "convert_element_type": _convert,
    "reshape": _reshape, "broadcast_in_dim": _broadcast_in_dim, "transpose": _transpose, "squeeze": _squeeze,
    "expand_dims": _reshape, "reduce_sum": _reduce("ReduceSum"), "reduce_max": _reduce("ReduceMax"),
    "reduce_min": _reduce("ReduceMin"), "pad": _pad, "slice": _slice, "concatenate": _concatenate,
    "reduce_window_max": _reduce_window_max,
}
