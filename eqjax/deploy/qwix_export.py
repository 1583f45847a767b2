"""An integer artifact as a Qwix PTQ model: Qwix rules plus Qwix's own pre-quantized params.

Qwix (``pip install qwix``, part of the ``deploy`` extra) runs a Flax model's
``conv_general_dilated`` / ``dot_general`` on integer operands (``QArray``:
``original ≈ (qvalue − zero_point) · scale``). :func:`export` turns an
:class:`~eqjax.deploy.artifact.IntegerArtifact` — round-to-nearest, a reconstruction's rounding
or QAT's learned steps, whatever built it — into

* one ``qwix.QuantizationRule`` per quantized layer (its exact module path, its op, its integer
  types, static activation scales), for ``qwix.quantize_model(model, qwix.PtqProvider(rules))``;
* the variables that model takes: the artifact's folded float variables, each kernel as Qwix's
  ``WithAux(QArray(q, s_w))`` with the artifact's integers, each input scale ``s_x`` as Qwix's
  static ``<op>_lhs_scale`` (and ``_lhs_zero_point``).

The integers are eqjax's, so Qwix computes what the integer forward computes (test: the logits
agree to float rounding). Grids map onto Qwix types without changing a value:

  =====================  ==========================  ================================
  eqjax input grid       Qwix activation type        why exact
  =====================  ==========================  ================================
  signed, b bits         ``int{b}`` (int8, int4)     same range ``[-2^(b-1), 2^(b-1)-1]``
  unsigned, 8 bits       int8, zero point −128       ``q − 128`` on int8, as ``integer``
  unsigned, b < 8 bits   ``int{b+1}``, symmetric     ``[0, 2^b−1]`` is its top half
  =====================  ==========================  ================================

The unsigned rows hold for inputs that are never negative (the unsigned grid is calibrated on
such inputs, e.g. ReLU outputs); a negative value, which eqjax's grid clips to 0, would keep
its sign on Qwix's signed grid. Qwix runs a layer on one integer type, so the kernel uses the
activation's type (a 4-bit kernel in an ``int5`` container; its values are unchanged).

Refused, each naming the layer: activation × activation matmuls (attention), a conv with float
inputs (Qwix quantizes a conv's two operands together), weights wider than their activations'
type, and — on XLA:CPU — types stored in 4 bits (``int4``, ``int3``, ``int2``), whose
convolutions XLA:CPU does not compile.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqjax.deploy.artifact import IntegerArtifact
from eqjax.models import ops
from eqjax.quant import intercept
from eqjax.quant.policy import LayerQuant

__all__ = ["QwixLayer", "QwixModel", "layer_types", "check_policy", "require_qwix", "export"]

OPS = {"conv": "conv_general_dilated", "dense": "dot_general"}


@dataclasses.dataclass(frozen=True)
class QwixLayer:
    """How one eqjax layer runs in Qwix.

    Attributes:
      path: the Flax module path Qwix matches (``/``-joined).
      op: the intercepted op (``conv_general_dilated`` or ``dot_general``).
      weight_bits, act_bits: Qwix's integer types of the kernel and of the input
        (``int{bits}``); ``act_bits`` None where the input stays float (a weight-only dense).
      zero_point: the input's integer zero point (−128 for eqjax's unsigned 8-bit grid) or None.
    """

    path: str
    op: str
    weight_bits: int
    act_bits: int | None
    zero_point: int | None

    def describe(self) -> dict[str, Any]:
        return {"module_path": self.path, "op": self.op, "weight_qtype": f"int{self.weight_bits}",
                "act_qtype": None if self.act_bits is None else f"int{self.act_bits}",
                "act_zero_point": self.zero_point}


@dataclasses.dataclass(frozen=True)
class QwixModel:
    """``model``: the Qwix PTQ model; ``variables``: its pre-quantized variables; ``rules``: the
    ``qwix.QuantizationRule`` list; ``layers``: ``{eqjax layer name: QwixLayer}``."""

    model: nn.Module
    variables: dict
    rules: tuple
    layers: dict[str, QwixLayer]

    def apply(self, variables: Mapping, images: jax.Array) -> jax.Array:
        """``model.apply(variables, images)`` under JAX's standard dtype promotion (Qwix rescales
        int32 accumulators by float scales implicitly), every conv a ``lax.conv_general_dilated``
        that Qwix intercepts (:func:`eqjax.models.ops.lax_convolutions`); jit it."""
        with jax.numpy_dtype_promotion("standard"), ops.lax_convolutions():
            return self.model.apply(variables, images)

    def describe(self) -> dict[str, dict[str, Any]]:
        """JSON-ready ``{layer: rule}``."""
        return {name: layer.describe() for name, layer in self.layers.items()}


def _qtype(bits: int) -> Any:
    """Qwix's name of the signed ``bits``-bit integer type: a JAX dtype or its synthetic string."""
    return {8: jnp.int8, 4: jnp.int4}.get(bits, f"int{bits}")


def layer_types(name: str, kind: str, w_bits: int | None, a_bits: int | None, a_signed: tuple[bool, ...] = (),
                *, backend: str = "cpu") -> QwixLayer:
    """The Qwix types of one layer (module docstring's table): its ``kind`` (conv / dense /
    matmul), kernel width (None: float kernel), input width (None: float input) and grid.

    Raises:
      ValueError: the layer has no exact Qwix form (names the layer and why).
    """
    problem = None
    act_bits = zero_point = None
    if kind not in OPS:
        problem = (f"a {kind} of two activations (Qwix's einsum rules are not generated here; "
                   "leave the policy's matmuls in float for a Qwix export)")
    elif w_bits is None:
        problem = "activations quantized with a float kernel (Qwix quantizes a layer's kernel with its input)"
    elif a_bits is None:
        if kind == "conv":
            problem = "a conv with float inputs (Qwix's conv_general_dilated quantizes both operands)"
    elif len(a_signed) != 1:
        problem = f"{len(a_signed)} quantized inputs (a conv or dense has one)"
    elif a_signed[0]:
        act_bits = a_bits
    elif a_bits == 8:
        act_bits, zero_point = 8, -128
    else:
        act_bits = a_bits + 1
    weight_bits = w_bits if act_bits is None else act_bits
    if problem is None and w_bits > weight_bits:
        problem = (f"{w_bits}-bit weights do not fit the int{act_bits} type of its {a_bits}-bit inputs "
                   "(Qwix runs a layer on one integer type)")
    narrowest = min(weight_bits or 8, act_bits or 8)
    if problem is None and backend == "cpu" and narrowest <= 4:
        problem = (f"Qwix holds int{narrowest} in 4-bit storage, which XLA:CPU does not compile in a "
                   "convolution or product (export on a GPU or TPU)")
    if problem:
        raise ValueError(f"layer {name!r} has no Qwix form: {problem}")
    return QwixLayer(name.replace(".", "/"), OPS[kind], weight_bits, act_bits, zero_point)


def check_policy(model: nn.Module, policy: Mapping[str, LayerQuant], *, example: Any,
                 backend: str | None = None) -> dict[str, QwixLayer]:
    """:func:`layer_types` of every quantized layer of a calibrated ``policy`` (before any long
    work: the artifact of any rounding of this policy has these types)."""
    calls = {c.name: c for c in intercept.trace_layers(model, example)}
    out = {}
    for name, lq in policy.items():
        w_on = bool(lq.w_enabled) and calls[name].kernel_shape is not None
        if w_on or bool(lq.a_enabled):
            out[name] = layer_types(name, calls[name].kind, int(lq.w_bits) if w_on else None,
                                    int(lq.a_bits) if bool(lq.a_enabled) else None,
                                    tuple(bool(s) for s in np.asarray(lq.a_signed)) if bool(lq.a_enabled) else (),
                                    backend=backend or jax.default_backend())
    return out


def require_qwix() -> None:
    """Raises ImportError naming the extra when Qwix is not installed."""
    import importlib.util

    if importlib.util.find_spec("qwix") is None:
        raise ImportError("the Qwix export needs the qwix package: pip install 'eqjax[deploy]'")


def _rules(layers: Mapping[str, QwixLayer]) -> list:
    import qwix

    return [qwix.QuantizationRule(
        module_path=re.escape(layer.path), op_names=(layer.op,), weight_qtype=_qtype(layer.weight_bits),
        act_qtype=None if layer.act_bits is None else _qtype(layer.act_bits),
        act_static_scale=True if layer.act_bits is not None else None,
        act_calibration_method=None if layer.act_bits is None else ("minmax" if layer.zero_point else "absmax"))
        for layer in layers.values()]


def export(model: nn.Module, artifact: IntegerArtifact, *, example: Any, backend: str | None = None) -> QwixModel:
    """The Qwix PTQ model of ``artifact`` (built for ``model``) and its pre-quantized variables.

    Args:
      model: the Flax Linen model the artifact was built from (its BatchNorms stay in the
        model; the artifact's variables hold them folded, as identities plus a bias).
      artifact: an :class:`~eqjax.deploy.artifact.IntegerArtifact` (built or loaded).
      example: an input batch (array or ShapeDtypeStruct) for tracing.
      backend: where the model will run (default: JAX's default backend); ``cpu`` refuses the
        4-bit storage types.

    Raises:
      ValueError: a layer with no exact Qwix form (see :func:`layer_types`), or a Qwix
        parameter this export does not know how to fill (names it).
    """
    require_qwix()
    import qwix
    from qwix._src.core import qarray
    from qwix._src.providers import ptq

    backend = backend or jax.default_backend()
    layers = {name: layer_types(name, layer.kind, layer.w_bits if layer.weight is not None else None, layer.a_bits,
                                layer.a_signed, backend=backend) for name, layer in artifact.layers.items()}
    rules = _rules(layers)
    quantized = qwix.quantize_model(model, qwix.PtqProvider(rules))
    with jax.numpy_dtype_promotion("standard"), ops.lax_convolutions():
        abstract = jax.eval_shape(quantized.init, jax.random.key(0), example)
    by_path = {layer.path: (name, layer) for name, layer in layers.items()}
    flat = flax.traverse_util.flatten_dict(abstract["params"], is_leaf=lambda _, x: isinstance(x, ptq.WithAux))
    floats = flax.traverse_util.flatten_dict(artifact.variables["params"])
    params = {}
    for key, template in flat.items():
        module, leaf = "/".join(key[:-1]), key[-1]
        name, qwix_layer = by_path.get(module, (None, None))
        source = artifact.layers[name] if name else None
        if isinstance(template, ptq.WithAux) and isinstance(template.array, qarray.QArray):
            q = jnp.asarray(np.asarray(source.weight), template.array.qvalue.dtype)
            scale = jnp.asarray(source.w_scale, jnp.float32).reshape(template.array.scale.shape)
            params[key] = template.replace(array=qarray.QArray(qvalue=q, scale=scale, zero_point=None,
                                                               qtype=template.array.qtype))
        elif isinstance(template, ptq.WithAux) and leaf == f"{qwix_layer.op}0_lhs_scale":
            params[key] = template.replace(array=jnp.full(template.array.shape, source.a_scale[0], jnp.float32))
        elif qwix_layer is not None and leaf == f"{qwix_layer.op}0_lhs_zero_point":
            params[key] = jnp.full(template.shape, qwix_layer.zero_point, template.dtype)
        elif key in floats:
            params[key] = jnp.asarray(floats[key], template.dtype)
        else:
            raise ValueError(f"Qwix's model has a parameter {'/'.join(key)} that the artifact does not hold "
                             "(a layer Qwix quantized that eqjax did not?)")
    variables = {**jax.tree_util.tree_map(jnp.asarray, {k: v for k, v in artifact.variables.items() if k != "params"}),
                 "params": flax.traverse_util.unflatten_dict(params)}
    return QwixModel(quantized, variables, tuple(rules), layers)
