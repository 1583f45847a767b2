"""The integer forward of an :class:`~eqjax.deploy.artifact.IntegerArtifact` in JAX.

Every quantized conv / dense / matmul runs on integer operands with an int32 accumulator:

    q_x = clamp(round(x / s_x), q_min, q_max)                     (per tensor, the study's eq. 3)
    acc = conv(q_x, q_w)                    int8 × int8 → int32   (``preferred_element_type``)
    y   = (s_x · s_w) · acc + bias                                (one rescale per output channel)

``q_x`` and ``q_w`` are the integers that the fake-quant evaluation implies (same float32
rounding), so ``acc`` is exactly ``conv(x̂, ŵ) / (s_x·s_w)`` of that evaluation, and the logits
equal it to float rounding. Operands are held in int8, which XLA:CPU runs through YNNPACK
(it has no fast int16 convolution; ``benchmarks/integer_forward_bench.py`` times both): an unsigned 8-bit grid
``[0, 255]`` is shifted to ``q − 128`` and the shift added back exactly,
``conv(q, w) = conv(q − 128, w) + 128 · conv(1, w)`` (the second term counts the kernel taps
inside the image, so padding stays exact). Everything between layers (bias adds, ReLU,
pooling, residual adds, LayerNorm, softmax) runs in float32, as integer runtimes with float
fallbacks do.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from eqjax.deploy.artifact import IntegerArtifact, IntegerLayer
from eqjax.quant import intercept, numerics

__all__ = ["quantize_activation", "integer_logits_fn", "cpu_integer_jit", "integer_jit", "integer_apply",
           "dequantized_variables"]

SHIFT = 128  # the offset that moves an unsigned 8-bit grid into int8


def quantize_activation(x: jax.Array, scale: jax.Array, bits: int, signed: bool) -> tuple[jax.Array, int]:
    """``(q − shift, shift)``: the integers of ``x`` on the ``bits`` grid of ``scale`` as int8,
    ``shift`` 128 for the unsigned 8-bit grid, else 0 (same arithmetic as the fake quantizer)."""
    q_min, q_max = numerics.quant_range(bits, signed=signed)
    q = numerics._integer_grid(x.astype(jnp.float32), scale, q_min, q_max)
    shift = SHIFT if (bits == 8 and not signed) else 0
    return (q - shift).astype(jnp.int8), shift


def _keep_dtypes(*arrays, **_):
    """Flax's dtype promotion, switched off: int8 operands stay int8."""
    return arrays


def exact_in_float32(layer: IntegerLayer, module: Any) -> bool:
    """Whether a grouped conv's int32 accumulator is also exact in float32: every partial sum of
    ``taps · max|q_x| · max|q_w|`` stays below 2^24. XLA:CPU has no fast grouped (depthwise)
    int8 convolution; a 3x3 / 5x5 depthwise conv at 8 bits sums at most 25·128·127 < 2^24."""
    if layer.kind != "conv" or not isinstance(module, nn.Conv) or module.feature_group_count == 1:
        return False
    taps = int(np.prod(np.shape(layer.weight)[:-1]))  # kernel window x input channels per group
    largest_input = 1 << (layer.a_bits - 1) if layer.a_signed[0] or layer.a_bits == 8 else (1 << layer.a_bits) - 1
    return taps * largest_input * (1 << (layer.w_bits - 1)) < 1 << 24


def _integer_call(module: Any, kind: str, *, float_accumulator: bool = False) -> Callable[..., jax.Array]:
    """``f(*int8 operands) -> int32``: the layer's own contraction on integers, bias left out;
    ``float_accumulator``: computed in float32 on the same integers (exact where
    :func:`exact_in_float32`), then converted."""
    if kind == "matmul":
        return functools.partial(jnp.einsum, module.equation, preferred_element_type=jnp.int32)
    if kind == "conv" and isinstance(module, nn.Conv) and float_accumulator:
        clone = module.clone(parent=None, name=None, use_bias=False, promote_dtype=_keep_dtypes)
        return lambda x, weight: clone.apply({"params": {"kernel": weight.astype(jnp.float32)}},
                                             x.astype(jnp.float32)).round().astype(jnp.int32)
    if kind == "conv" and isinstance(module, nn.Conv):
        clone = module.clone(parent=None, name=None, use_bias=False, promote_dtype=_keep_dtypes,
                             conv_general_dilated=functools.partial(lax.conv_general_dilated,
                                                                    preferred_element_type=jnp.int32))
    elif kind == "dense" and type(module) is nn.Dense:
        clone = module.clone(parent=None, name=None, use_bias=False, promote_dtype=_keep_dtypes,
                             dot_general=functools.partial(lax.dot_general, preferred_element_type=jnp.int32))
    else:
        raise ValueError(f"no integer kernel for a {type(module).__name__} ({kind}); nn.Conv, nn.Dense and "
                         "activation matmuls have one")
    return lambda x, weight: clone.apply({"params": {"kernel": weight}}, x)


def _shifted_product(f: Callable[..., jax.Array], operands: list[jax.Array], shifts: list[int]) -> jax.Array:
    """``f(q_1, ..., q_n)`` for integers held as ``q_i − shift_i``: a multilinear ``f`` expands
    exactly into products over the shifted operands and ``shift · ones``."""
    total = None
    n = len(operands)
    for mask in range(1 << n):  # term: operand i from the shift (bit i set) or from the int8 value
        factor, args = 1, []
        for i in range(n):
            if mask >> i & 1:
                if not shifts[i]:
                    break
                factor *= shifts[i]
                args.append(jnp.ones_like(operands[i]))
            else:
                args.append(operands[i])
        else:
            term = f(*args)
            total = term * factor if total is None else total + term * factor
    return total


def _integer_layer(layer: IntegerLayer, module: Any, params: Mapping, inputs: tuple,
                   record: Callable[[jax.Array, list], None] | None) -> jax.Array:
    f = _integer_call(module, layer.kind, float_accumulator=exact_in_float32(layer, module))
    operands, shifts = [], []
    for i, scale in enumerate(layer.a_scale):
        q, shift = quantize_activation(inputs[i], scale, layer.a_bits, layer.a_signed[i])
        operands.append(q)
        shifts.append(shift)
    scale = layer.a_scale[0]
    if layer.kind == "matmul":
        acc = _shifted_product(f, operands, shifts)
        scale = layer.a_scale[0] * layer.a_scale[1]
    else:
        weight = jnp.asarray(layer.weight, jnp.int8)
        acc = f(operands[0], weight)
        if shifts[0]:  # conv(1, w) over one image: the taps inside it, the same for every image
            acc = acc + shifts[0] * f(jnp.ones_like(operands[0][:1]), weight)
        scale = scale * layer.w_scale
    if record is not None:
        record(acc, [q.astype(jnp.int32) + shift for q, shift in zip(operands, shifts)])
    channels = lambda v: jnp.reshape(v, (1,) * (acc.ndim - jnp.ndim(v)) + jnp.shape(v))  # along the last axis
    y = acc.astype(jnp.float32) * channels(scale)
    if "bias" in params:
        y = y + channels(params["bias"].astype(jnp.float32))
    return y


def dequantized_variables(artifact: IntegerArtifact, layers: Mapping[str, IntegerLayer] | None = None) -> dict:
    """The artifact's variables with each integer kernel back as ``s_w · q_w`` in float32 (the
    model that the fake-quant path evaluates, weights included)."""
    out = artifact.variables
    for name, layer in (layers or artifact.layers).items():
        if layer.weight is not None:
            weight = jnp.asarray(layer.weight, jnp.float32)
            kernel = weight * jnp.reshape(jnp.asarray(layer.w_scale, jnp.float32), (1,) * (weight.ndim - 1) + (-1,))
            out = intercept.replace_module_variable(out, name, "kernel", kernel, create=True)
    return out


def integer_logits_fn(model: nn.Module, *, accumulators: dict | None = None
                      ) -> Callable[[Mapping[str, IntegerLayer], Mapping, jax.Array], jax.Array]:
    """``fn(layers, variables, images) -> logits``: the integer forward of ``model`` (jit it;
    ``layers`` and ``variables`` are an artifact's, as pytrees).

    Layers whose inputs stay float (weights only quantized) run in float on ``s_w · q_w``.
    ``accumulators``: a dict that receives ``{layer: (int32 accumulator, [integer inputs])}`` (eager
    calls, tests; the inputs as int32 on their grid, shifts undone).
    """

    def fn(layers, variables, images):
        weight_only = {n: l for n, l in layers.items() if l.a_scale is None}
        variables = dequantized_variables(IntegerArtifact({}, dict(variables), {}), weight_only)

        def handler(name, module, call, args, kwargs):
            layer = layers.get(name)
            if layer is None or layer.a_scale is None:
                return call(*args, **kwargs)
            params = dict(getattr(module, "variables", {}).get("params", {})) if hasattr(module, "variables") else {}
            record = None if accumulators is None else (
                lambda acc, operands: accumulators.__setitem__(name, (acc, operands)))
            return _integer_layer(layer, module, params, args, record)

        with intercept.intercept_calls(handler):
            return model.apply(variables, images)

    return fn


# XLA:CPU runs int8 convolutions and products fast only through YNNPACK; without it (the loop
# emitter) a convolution takes ~40x longer (benchmarks/integer_forward_bench.py). Asked for per compilation, so float code elsewhere
# keeps the process's settings (experiments.xla_cpu turns YNNPACK's fusions off for float).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                        "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def cpu_integer_jit(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """``fn`` jitted, on CPU with YNNPACK's integer kernels (falls back to XLA's defaults on an
    XLA that does not know the option); elsewhere plainly."""
    plain = jax.jit(fn)
    if jax.default_backend() != "cpu":
        return plain
    chosen = [jax.jit(fn, compiler_options=CPU_COMPILER_OPTIONS)]

    def call(*args):
        try:
            return chosen[0](*args)
        except jax.errors.JaxRuntimeError as e:
            if "xla_cpu_experimental_ynn_fusion_type" not in str(e) or chosen[0] is plain:
                raise
            chosen[0] = plain
            return plain(*args)

    return call


def integer_jit(model: nn.Module) -> Callable[[Mapping[str, IntegerLayer], Mapping, jax.Array], jax.Array]:
    """:func:`integer_logits_fn` jitted by :func:`cpu_integer_jit`."""
    return cpu_integer_jit(integer_logits_fn(model))


def integer_apply(model: nn.Module, artifact: IntegerArtifact, images: jax.Array, *,
                  accumulators: dict | None = None) -> jax.Array:
    """Logits of ``images`` [batch, ...] under the integer forward of ``artifact`` (eager)."""
    return integer_logits_fn(model, accumulators=accumulators)(artifact.layers, artifact.variables, images)
