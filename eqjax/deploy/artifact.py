"""The integer artifact of a quantized model: integer weights, scales and a manifest in one file.

From ``(model, variables, policy)`` — and a reconstruction's rounding or a QAT result's learned
step sizes when there are any — :func:`build` makes what an integer runtime executes:

* every BatchNorm folded into the conv before it, in the integer domain: a fold factor
  ``f = γ/√(σ²+ε)`` [out] turns ``(q, s)`` into ``(sign(f)·q, |f|·s)`` (the same integers, so the
  artifact computes what the fake-quant evaluation computed), the BatchNorm into a bias;
* weights as integers on their ``w_bits`` grid [kernel shape] with per-output-channel float32
  scales [out]: ``W ≈ s·q`` (the study's eqs. 3-4);
* per-tensor activation scales ``s_x = clip / q_max`` [inputs] and their grid (signed or not);
* everything else (biases, LayerNorms, unquantized layers) as float32.

:func:`save` writes one safetensors file: int8 weights as bytes, int4 two per byte, int2 four
per byte (:mod:`eqjax.deploy.packing`), a manifest (layers, widths, shapes, preprocessing) and a
digest of every tensor and of the manifest (:mod:`eqjax.storage`), to a temporary name renamed
into place. :func:`load` checks the digests, so a truncated or altered file is an error naming
it, never a wrong model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eqjax import storage
from eqjax.deploy import packing
from eqjax.algorithms import reconstruction
from eqjax.quant import apply, folding, intercept, numerics, policy as policy_lib
from eqjax.quant.policy import UNIFORM, LayerQuant

__all__ = ["FORMAT", "IntegerLayer", "IntegerArtifact", "integer_weights", "build", "float_artifact", "save",
           "load", "check_matches"]

FORMAT = "eqjax-integer-artifact/1"
INTEGER_KINDS = ("conv", "dense", "matmul")


@flax.struct.dataclass
class IntegerLayer:
    """One quantized layer as integers.

    Attributes:
      weight: int8 [kernel shape] on the ``w_bits`` grid, or None (a parameter-free matmul, or
        weights left in float).
      w_scale: float32 [out] per-output-channel weight scale (``kernel ≈ w_scale · weight``).
      a_scale: float32 [n] per-tensor scale of each activation input, or None (inputs in float).
      kind: ``conv``, ``dense`` or ``matmul``.
      w_bits, a_bits: the widths, None where not quantized.
      a_signed: per input, the signed grid ``[-2^(b-1), 2^(b-1)-1]`` or the unsigned ``[0, 2^b-1]``.
    """

    weight: Any
    w_scale: Any
    a_scale: Any
    kind: str = flax.struct.field(pytree_node=False)
    w_bits: int | None = flax.struct.field(pytree_node=False)
    a_bits: int | None = flax.struct.field(pytree_node=False)
    a_signed: tuple[bool, ...] = flax.struct.field(pytree_node=False, default=())

    def describe(self) -> dict[str, Any]:
        """The manifest entry of this layer (no arrays)."""
        return {"kind": self.kind, "w_bits": self.w_bits, "a_bits": self.a_bits, "a_signed": list(self.a_signed),
                "kernel_shape": None if self.weight is None else list(np.shape(self.weight))}


@dataclasses.dataclass(frozen=True)
class IntegerArtifact:
    """``layers`` ``{name: IntegerLayer}``; ``variables``: the folded float variables without the
    kernels that ``layers`` hold; ``manifest``: JSON-ready description (format, layers,
    preprocessing, input shape, source)."""

    layers: dict[str, IntegerLayer]
    variables: dict
    manifest: dict


def _unsupported(name: str, lq: LayerQuant, kind: str) -> str | None:
    if kind not in INTEGER_KINDS:
        return f"{kind} layers have no integer form here (conv, dense and matmul do)"
    if lq.w_channel_axes is not None:
        return f"per-channel weight scales along axes {lq.w_channel_axes.axes} (only the last kernel axis)"
    if lq.a_kind is not None and bool(np.any(np.asarray(lq.a_kind) != UNIFORM)):
        return "a log or twin activation quantizer (integer grids are uniform)"
    if lq.a_offset is not None and bool(np.any(np.asarray(lq.a_offset) != 0)):
        return "an asymmetric activation grid (LSQ+ offset) with no integer zero point"
    for what, bits, on in (("weight", lq.w_bits, lq.w_enabled), ("activation", lq.a_bits, lq.a_enabled)):
        if bool(on) and int(bits) > 8:
            return f"{int(bits)}-bit {what}s (integer artifacts hold 2 to 8 bits)"
    return None


def integer_weights(variables: Mapping, policy: Mapping[str, LayerQuant], *, weight_method: str = "absmax",
                    weight_scales: Mapping[str, Any] | None = None,
                    rounding: Mapping[str, Any] | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{layer: (q int8 [kernel shape], scale float32 [out])}`` of every weight-quantized layer.

    ``q = clamp(round(kernel / s), q_min, q_max)`` with the same float32 arithmetic as
    :func:`eqjax.quant.apply.quantize_weights` (so ``s·q`` *is* the fake-quantized kernel), or
    ``clamp(floor(kernel / s) + up, ...)`` for a reconstruction's ``rounding`` ``{layer: up}``.
    ``s`` comes from ``weight_scales`` (reconstruction, QAT, ranking) or from ``weight_method``.
    """
    weight_scales, rounding = dict(weight_scales or {}), dict(rounding or {})
    out = {}
    for name, lq in policy.items():
        module = intercept.module_variables(variables, name)
        if module is None or "kernel" not in module or not bool(lq.w_enabled):
            continue
        kernel = jnp.asarray(module["kernel"], jnp.float32)
        axes = apply.channel_axes(lq, kernel.ndim)
        if name in weight_scales:
            scale = jnp.asarray(weight_scales[name], jnp.float32)
        else:
            scale = apply.kernel_scale(kernel, lq.w_bits, axes=axes, method=weight_method)
        scale_b = scale.reshape(apply.channel_shape(kernel.shape, axes))
        q_min, q_max = (q.reshape((1,) * kernel.ndim) for q in numerics.quant_range(lq.w_bits))
        if name in rounding:
            q = reconstruction.integer_kernel(kernel, scale, rounding[name], lq)
        else:
            q = numerics._integer_grid(kernel, scale_b, q_min, q_max)
        out[name] = (np.asarray(q).astype(np.int8), np.asarray(scale, np.float32))
    return out


def _activation_scales(lq: LayerQuant) -> np.ndarray:
    """``clip / q_max`` per input, computed as :func:`eqjax.quant.numerics.quantize_clipped` does."""
    scales = []
    for clip, signed in zip(np.asarray(lq.a_clip), np.asarray(lq.a_signed)):
        _, q_max = numerics.quant_range(lq.a_bits, signed=bool(signed))
        scales.append(numerics._scaled(jnp.float32(clip), q_max))
    return np.asarray(jnp.stack(scales), np.float32)


def build(model: nn.Module, variables: Mapping, policy: Mapping[str, LayerQuant], *, example: Any,
          weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None, weight_method: str = "absmax",
          manifest: Mapping[str, Any] | None = None) -> IntegerArtifact:
    """The integer artifact of ``model`` under a calibrated ``policy``.

    Args:
      model, variables: a Flax Linen model and its full-precision variables (BatchNorms folded
        or not; a BatchNorm after a conv/dense is folded here).
      policy: calibrated, uniform grids of 2-8 bits on conv/dense/matmul layers.
      example: an input batch (array or ShapeDtypeStruct) for tracing.
      weights: :func:`integer_weights` of ``variables`` (a reconstruction's or QAT's), else
        round-to-nearest with ``weight_method``.
      manifest: extra manifest entries (model name, preprocessing, where the policy came from).

    Raises:
      ValueError: an uncalibrated policy, or a layer whose quantizer has no integer form (names
        the layer and why), or a fold that leaves an integer outside its grid.
    """
    policy_lib.check_calibrated(policy)
    calls = {c.name: c for c in intercept.trace_layers(model, example, variables=variables)}
    policy_lib.validate(policy, calls)
    for name, lq in policy.items():
        reason = _unsupported(name, lq, calls[name].kind) if bool(lq.w_enabled) or bool(lq.a_enabled) else None
        if reason:
            raise ValueError(f"layer {name!r} cannot be exported as integers: {reason}")
    weights = dict(weights) if weights is not None else integer_weights(variables, policy, weight_method=weight_method)
    pairs = folding.conv_batchnorm_pairs(model, example)
    factors = {n: np.asarray(f) for n, f in folding.batchnorm_factors(variables, pairs).items()}
    folded = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32) if np.issubdtype(np.asarray(a).dtype, np.floating)
                                    else np.asarray(a), folding.fold_pairs(variables, pairs))
    layers = {}
    for name, lq in policy.items():
        if not (bool(lq.w_enabled) or bool(lq.a_enabled)):
            continue
        weight = w_scale = None
        if name in weights:
            q, scale = weights[name]
            if name in factors:  # W·f = (sign(f)·q)·(|f|·s) channel by channel
                q, scale = q.astype(np.int16) * np.sign(factors[name]).astype(np.int16), scale * np.abs(factors[name])
                low, high = numerics.quant_range(lq.w_bits)
                if np.any(q < float(low)) or np.any(q > float(high)) or not np.all(scale > 0):
                    raise ValueError(f"layer {name!r}: folding its BatchNorm (a zero or negative factor) leaves "
                                     f"weights outside the {int(lq.w_bits)}-bit grid")
            weight, w_scale = np.asarray(q, np.int8), np.asarray(scale, np.float32)
            folded = intercept.replace_module_variable(folded, name, "kernel", None)
        a_on = bool(lq.a_enabled)
        layers[name] = IntegerLayer(weight, w_scale, _activation_scales(lq) if a_on else None,
                                    kind=calls[name].kind, w_bits=int(lq.w_bits) if weight is not None else None,
                                    a_bits=int(lq.a_bits) if a_on else None,
                                    a_signed=tuple(bool(s) for s in np.asarray(lq.a_signed)) if a_on else ())
    folded = _drop_none(folded)
    example_shape = list(np.shape(example))
    info = {"format": FORMAT, "input_shape": [None] + example_shape[1:],
            "layers": {n: layer.describe() for n, layer in layers.items()},
            "folded_batchnorms": {p.layer: p.batchnorm for p in pairs}, **dict(manifest or {})}
    return IntegerArtifact(layers, folded, info)


def float_artifact(model: nn.Module, variables: Mapping, *, example: Any,
                   manifest: Mapping[str, Any] | None = None) -> IntegerArtifact:
    """The full-precision model as an artifact without integer layers (BatchNorms folded): the
    reference that sizes, exports and latencies are compared with."""
    folded, pairs = folding.fold_batchnorm(model, variables, example)
    folded = jax.tree_util.tree_map(np.asarray, folded)
    info = {"format": FORMAT, "input_shape": [None] + list(np.shape(example))[1:], "layers": {},
            "folded_batchnorms": {p.layer: p.batchnorm for p in pairs}, **dict(manifest or {})}
    return IntegerArtifact({}, folded, info)


def _drop_none(tree: Mapping) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            value = _drop_none(value)
        if value is not None:
            out[key] = value
    return out


def check_matches(artifact: IntegerArtifact, model: nn.Module, example: Any) -> None:
    """Raises ValueError when ``artifact`` was not made for ``model`` (layer names, kinds or kernel
    shapes differ, named)."""
    calls = {c.name: c for c in intercept.trace_layers(model, example)}
    problems = []
    for name, layer in artifact.layers.items():
        call = calls.get(name)
        if call is None:
            problems.append(f"{name} (not a layer of the model)")
        elif call.kind != layer.kind:
            problems.append(f"{name} (a {layer.kind} in the artifact, a {call.kind} in the model)")
        elif layer.weight is not None and tuple(call.kernel_shape) != tuple(np.shape(layer.weight)):
            problems.append(f"{name} (kernel {tuple(np.shape(layer.weight))} in the artifact, "
                            f"{tuple(call.kernel_shape)} in the model)")
    if problems:
        raise ValueError(f"the artifact does not match the model: {'; '.join(problems[:5])}"
                         + (f" and {len(problems) - 5} more" if len(problems) > 5 else ""))


# ----------------------------------------------------------------------------
# The file
# ----------------------------------------------------------------------------


def _flatten(tree: Mapping, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = np.ascontiguousarray(value)
    return out


def _unflatten(flat: Mapping[str, np.ndarray], prefix: str) -> dict:
    out: dict = {}
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        node = out
        *path, leaf = key[len(prefix):].split("/")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def save(path: str, artifact: IntegerArtifact) -> int:
    """Writes ``artifact`` to one safetensors file at ``path`` (atomically); returns its size in bytes."""
    from safetensors.numpy import save_file

    tensors = _flatten(artifact.variables, "variables/")
    for name, layer in artifact.layers.items():
        if layer.weight is not None:
            tensors[f"layers/{name}/weight"] = packing.pack(np.asarray(layer.weight), layer.w_bits)
            tensors[f"layers/{name}/w_scale"] = np.asarray(layer.w_scale, np.float32)
        if layer.a_scale is not None:
            tensors[f"layers/{name}/a_scale"] = np.asarray(layer.a_scale, np.float32)
    manifest = json.dumps(artifact.manifest, default=str)
    metadata = {"manifest": manifest, "manifest_digest": storage.json_digest(artifact.manifest),
                "digests": json.dumps({k: storage.array_digest(v) for k, v in tensors.items()})}
    storage.write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return os.path.getsize(path)


def load(path: str) -> IntegerArtifact:
    """Reads :func:`save`'s file, every tensor checked against its digest.

    Raises:
      FileNotFoundError: no file at ``path``.
      ValueError: a file that is not an eqjax integer artifact, is truncated, or whose content
        does not match its digests (names the file and the first tensor at fault).
    """
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no integer artifact at {path}")
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the safetensors library's own errors (header, size) say little about the file
        raise storage.CorruptFileError(f"{path} is not a readable integer artifact (truncated or not safetensors: "
                                       f"{e})") from None
    if "manifest" not in metadata or "digests" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not an eqjax integer artifact (no manifest)")
    try:
        manifest, digests = json.loads(metadata["manifest"]), json.loads(metadata["digests"])
    except json.JSONDecodeError as e:
        raise storage.CorruptFileError(f"{path} is damaged: its manifest or digests are not JSON ({e})") from None
    if storage.json_digest(manifest) != metadata.get("manifest_digest"):
        raise storage.CorruptFileError(f"{path} is damaged: its manifest does not match its digest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, this eqjax reads {FORMAT!r}")
    if set(digests) != set(tensors):
        missing = sorted(set(digests) ^ set(tensors))
        raise storage.CorruptFileError(f"{path} is damaged: tensors {', '.join(missing[:3])} are missing or unexpected")
    for key, array in tensors.items():
        if storage.array_digest(array) != digests[key]:
            raise storage.CorruptFileError(f"{path} is damaged: tensor {key!r} does not match its digest")
    layers = {}
    for name, entry in manifest["layers"].items():
        weight = w_scale = a_scale = None
        if entry["kernel_shape"] is not None:
            weight = packing.unpack(tensors[f"layers/{name}/weight"], entry["w_bits"], tuple(entry["kernel_shape"]))
            w_scale = tensors[f"layers/{name}/w_scale"]
        if entry["a_bits"] is not None:
            a_scale = tensors[f"layers/{name}/a_scale"]
        layers[name] = IntegerLayer(weight, w_scale, a_scale, kind=entry["kind"], w_bits=entry["w_bits"],
                                    a_bits=entry["a_bits"], a_signed=tuple(entry["a_signed"]))
    return IntegerArtifact(layers, _unflatten(tensors, "variables/"), manifest)
