"""Analytical energy model (the study's eq. 7), counted from the traced model.

    E = sum_l N_MAC,l * E_MAC(b_w,l, b_a,l) + sum_l N_mem,l(b) * E_mem

Counts come from abstract evaluation of the real model (no compute), so they include
what the study's code leaves out: the token dimension of linear layers and the
attention matmuls QK^T and softmax·V (both operands activations). Per layer l:

* MACs: conv ``prod(output) * kh * kw * c_in / groups``; dense ``prod(output) * d_in``
  (every token; ``DenseGeneral`` / ``Einsum``: every contracted kernel dimension); transposed
  conv ``prod(input[:-1]) * prod(kernel)``; matmul ``prod`` of all einsum index sizes
  (:mod:`eqjax.quant.layers`).
* memory (bits moved to or from DRAM), each term a switch of :class:`EnergyModel`:
  weights read once per batch (kernel at ``b_w``, bias at 32 bits); inputs read at
  ``b_a``; outputs written at ``b_a`` (requantized on write). Full-precision layers use
  32 bits everywhere. Normalisation, softmax, residual adds and pooling are not counted.

Energy models are data (a frozen dataclass): ``paper`` (E_MAC ∝ b_w·b_a, E_DRAM ∝ b,
one 32-bit DRAM access = 200 32-bit MACs), ``horowitz45nm`` (pJ, Horowitz ISSCC 2014 via
QKeras' fits) and ``horowitz45nm_sram`` (activations in on-chip SRAM), or your own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from eqjax.quant import intercept, nnx_model

FP_BITS = 32

__all__ = ["LayerCount", "EnergyModel", "PRESETS", "get_preset", "load_energy_model", "count_layers",
           "layer_energy", "energy_report", "relative_energy"]


@dataclasses.dataclass(frozen=True)
class LayerCount:
    """What one layer computes and moves, for one batch.

    Attributes:
      name: timm layer name.
      kind: ``conv``, ``conv_transpose``, ``dense``, ``einsum`` or ``matmul``.
      macs: multiply-accumulates.
      weight_elements: kernel elements (0 for a matmul).
      bias_elements: bias elements.
      input_elements: activation elements read (all inputs).
      output_elements: activation elements written.
    """

    name: str
    kind: str
    macs: int
    weight_elements: int
    bias_elements: int
    input_elements: int
    output_elements: int


def count_layers(model: nn.Module, inputs: Any, *, variables: Any = None) -> list[LayerCount]:
    """Per-layer counts of ``model`` on ``inputs`` ([batch, ...] array or ShapeDtypeStruct).

    Weights are counted by walking the (abstract) params pytree of each layer. ``model`` is a
    Linen module, or an NNX module with ``variables=None``. Matrix products outside every
    quantizable layer are not counted, with a warning (``intercept.UnattributedOpWarning``).
    """
    model, variables = nnx_model.as_functional(model, variables)
    calls = intercept.trace_layers(model, inputs, variables=variables)
    if variables is None:
        variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
    params = variables["params"]
    counts = {}
    for call in calls:
        weights = bias = 0
        if call.kind != "matmul":
            node = intercept.module_variables(params, call.name, collection=None)
            weights = math.prod(node["kernel"].shape)
            bias = math.prod(node["bias"].shape) if "bias" in node else 0
        count = LayerCount(call.name, call.kind, call.macs, weights, bias,
                           sum(math.prod(s) for s in call.input_shapes), math.prod(call.output_shape))
        if call.name in counts:  # a module called twice: add its compute, weights once
            prev = counts[call.name]
            count = dataclasses.replace(prev, macs=prev.macs + count.macs,
                                        input_elements=prev.input_elements + count.input_elements,
                                        output_elements=prev.output_elements + count.output_elements)
        counts[call.name] = count
    return list(counts.values())


@dataclasses.dataclass(frozen=True)
class EnergyModel:
    """Energy per operation, as data.

    ``E_MAC(b_w, b_a) = mac_product * b_w * b_a + mac_linear * (b_w + b_a) / 2 + mac_constant``
    for quantized layers; a full-precision layer costs ``fp32_mac`` per MAC (or the
    formula at 32 bits when None). Memory: ``weight_per_bit`` / ``activation_per_bit``
    per bit moved; ``count_weights``, ``count_inputs``, ``count_outputs`` choose the terms.
    Units are the model's own (``unit``).
    """

    name: str
    unit: str
    mac_product: float
    mac_linear: float = 0.0
    mac_constant: float = 0.0
    fp32_mac: float | None = None
    weight_per_bit: float = 0.0
    activation_per_bit: float = 0.0
    count_weights: bool = True
    count_inputs: bool = True
    count_outputs: bool = True

    def __post_init__(self):
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.type in ("float", "float | None") and getattr(self, f.name) is not None}
        bad = {k: v for k, v in values.items() if not (math.isfinite(v) and v >= 0)}
        if bad:
            raise ValueError(f"energy model {self.name!r}: energies must be finite and >= 0, got {bad}")

    def mac_energy(self, w_bits: float, a_bits: float) -> float:
        """Energy of one MAC with ``w_bits`` x ``a_bits`` operands (None = full precision)."""
        if w_bits == FP_BITS and a_bits == FP_BITS and self.fp32_mac is not None:
            return self.fp32_mac
        return self.mac_product * w_bits * a_bits + self.mac_linear * (w_bits + a_bits) / 2 + self.mac_constant

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# QKeras' fits of Horowitz (ISSCC 2014), 45 nm: int mult = 0.002994791667 b^2 + 0.001041666667 b pJ,
# 32-bit int add (accumulator) 0.1 pJ, FP32 MAC 3.7 + 0.9 pJ, DRAM 1300 pJ / 64 bit, SRAM 32 KB 20 pJ / 64 bit.
PRESETS: dict[str, EnergyModel] = {
    "paper": EnergyModel("paper", "32-bit MAC", mac_product=1.0 / (FP_BITS * FP_BITS),
                         weight_per_bit=200.0 / FP_BITS, activation_per_bit=200.0 / FP_BITS),
    "horowitz45nm": EnergyModel("horowitz45nm", "pJ", mac_product=0.002994791667,
                                mac_linear=0.001041666667, mac_constant=0.1, fp32_mac=4.6,
                                weight_per_bit=1300.0 / 64, activation_per_bit=1300.0 / 64),
    "horowitz45nm_sram": EnergyModel("horowitz45nm_sram", "pJ", mac_product=0.002994791667,
                                     mac_linear=0.001041666667, mac_constant=0.1, fp32_mac=4.6,
                                     weight_per_bit=1300.0 / 64, activation_per_bit=20.0 / 64),
}


def get_preset(name: str) -> EnergyModel:
    if name not in PRESETS:
        raise ValueError(f"unknown energy preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def load_energy_model(path: str) -> EnergyModel:
    """A user-defined model from a JSON object with :class:`EnergyModel`'s fields.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: a file that is not a JSON object, unknown or missing fields, or values of the
        wrong type (each names the file and the field).
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no energy model file at {path}")
    try:
        with open(path) as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"energy model file {path} is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"energy model file {path} must hold a JSON object of EnergyModel fields, "
                         f"got a {type(fields).__name__}")
    known = {f.name: f for f in dataclasses.fields(EnergyModel)}
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown energy model fields {unknown}; known: {sorted(known)}")
    required = [n for n, f in known.items() if f.default is dataclasses.MISSING and n not in fields]
    if required:
        raise ValueError(f"{path}: energy model fields {required} are missing")
    for name, value in fields.items():
        kind = known[name].type
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {"str": isinstance(value, str), "bool": isinstance(value, bool), "float": number,
              "float | None": number or value is None}[kind]
        if not ok:
            raise ValueError(f"{path}: energy model field {name!r} must be {kind.replace(' | None', ' or null')}, "
                             f"got {value!r}")
    return EnergyModel(**fields)


Bits = Mapping[str, Mapping[str, Any]]  # {name: {'w': bits | None, 'a': bits | None}}


def layer_energy(count: LayerCount, w_bits: int | None, a_bits: int | None,
                 model: EnergyModel) -> dict[str, float]:
    """``{'mac', 'memory', 'total'}`` energy of one layer; None bits = full precision."""
    w = FP_BITS if w_bits is None else w_bits
    a = FP_BITS if a_bits is None else a_bits
    if count.kind == "matmul":
        w = a  # both operands are activations
    mac = count.macs * model.mac_energy(w, a)
    memory = 0.0
    if model.count_weights:
        memory += (count.weight_elements * w + count.bias_elements * FP_BITS) * model.weight_per_bit
    if model.count_inputs:
        memory += count.input_elements * a * model.activation_per_bit
    if model.count_outputs:
        memory += count.output_elements * a * model.activation_per_bit
    return {"mac": mac, "memory": memory, "total": mac + memory}


def energy_report(counts: Sequence[LayerCount], bits: Bits | None, model: EnergyModel) -> dict[str, Any]:
    """Total, MAC and memory energy, per layer, and relative to the all-FP32 model.

    Args:
      counts: from :func:`count_layers`.
      bits: ``{name: {'w': .., 'a': ..}}`` for every layer (``policy.bits_table``); None
        means the FP32 model.
      model: an :class:`EnergyModel`.

    Returns:
      ``{'model', 'unit', 'total', 'mac', 'memory', 'mac_share', 'memory_share',
      'relative', 'fp32_total', 'macs', 'weight_elements', 'operations', 'per_layer': [...]}``;
      ``operations`` says what was counted: ``{kind: number of layers}`` (``conv``, ``dense``,
      ``matmul``, ...). Products outside every layer are not in it (``count_layers`` warns).
    """
    if bits is not None:
        intercept.check_layer_names(bits, [c.name for c in counts], prefix="bits do not match the model",
                                    missing_label="model layers without bits")
    per_layer, fp32_total = [], 0.0
    for c in counts:
        b = bits[c.name] if bits is not None else {"w": None, "a": None}
        e = layer_energy(c, b["w"], b["a"], model)
        fp32_total += layer_energy(c, None, None, model)["total"]
        per_layer.append({"name": c.name, "kind": c.kind, "w_bits": b["w"], "a_bits": b["a"],
                          "macs": c.macs, "weight_elements": c.weight_elements, **e})
    if fp32_total <= 0:
        raise ValueError(f"energy model {model.name!r} gives the FP32 model zero energy: nothing to compare")
    mac = sum(e["mac"] for e in per_layer)
    memory = sum(e["memory"] for e in per_layer)
    total = mac + memory
    return {"model": model.name, "unit": model.unit, "total": total, "mac": mac, "memory": memory,
            "mac_share": mac / total, "memory_share": memory / total, "relative": total / fp32_total,
            "fp32_total": fp32_total, "macs": sum(c.macs for c in counts),
            "weight_elements": sum(c.weight_elements for c in counts),
            "operations": {kind: sum(c.kind == kind for c in counts) for kind in dict.fromkeys(c.kind for c in counts)},
            "per_layer": per_layer}


def relative_energy(counts: Sequence[LayerCount], bits: Bits, model: EnergyModel) -> float:
    """Energy of ``bits`` relative to the FP32 model."""
    return energy_report(counts, bits, model)["relative"]
