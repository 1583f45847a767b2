"""Which Flax modules are quantizable layers, and what eqjax needs to know of each.

A *weighted* layer multiplies an activation by a ``kernel`` parameter; quantization fakes
its kernel per output channel and its input per tensor, and the energy model counts its
MACs and bytes. A *matmul* multiplies two activations (attention's QK^T and softmax·V).

======================  ==========================  ==============  =========================
Linen                   NNX                         kind            kernel output axes
======================  ==========================  ==============  =========================
``Dense``               ``Linear``                  dense           last
``DenseGeneral``        ``LinearGeneral``           dense           batch axes + features
``Conv`` (any groups)   ``Conv``                    conv            last
``ConvTranspose``       ``ConvTranspose``           conv_transpose  last (``transpose_kernel``:
                                                                    the one before)
``Einsum``              ``Einsum``                  einsum          kernel letters in the output
:class:`ActivationMatmul`, the einsums inside an
attention module (``MultiHeadDotProductAttention``,
``SelfAttention``, ``nnx.MultiHeadAttention``)      matmul          (no kernel)
======================  ==========================  ==============  =========================

MACs (per call): dense, conv and einsum ``prod(output) * prod(contracted kernel dims)`` (every
token, every output pixel; grouped convs count their group size); a transposed conv every
input pixel against the whole kernel, ``prod(input[:-1]) * prod(kernel)``; a matmul the
product of its einsum's index sizes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["ActivationMatmul", "AttentionEinsum", "kind_of", "is_weighted", "is_attention", "kernel_of",
           "kernel_out_axes", "einsum_equation", "einsum_macs", "layer_macs", "WEIGHTED_KINDS"]


class ActivationMatmul(nn.Module):
    """``jnp.einsum(equation, a, b)`` between two activations, as an interceptable module.

    eqjax's own attention routes QK^T and softmax(QK^T)·V through this so that quantization
    (and energy counting) can see both operands. It has no parameters. Flax's own attention
    modules need nothing of the kind: their einsums are seen as :class:`AttentionEinsum`.
    """

    equation: str

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum(self.equation, a, b)


@dataclasses.dataclass(frozen=True)
class AttentionEinsum:
    """An einsum between two activations inside an attention module, seen as a layer.

    What the interception handler receives as ``module`` for it (a Flax attention module's
    QK^T is ``<attention>.qk_matmul``, its softmax·V ``<attention>.av_matmul``).
    """

    equation: str


_LINEN_KINDS = ((nn.ConvTranspose, "conv_transpose"), (nn.Conv, "conv"), (nn.DenseGeneral, "dense"),
                (nn.Dense, "dense"), (nn.Einsum, "einsum"), (ActivationMatmul, "matmul"))
_NNX_KINDS = ((nnx.ConvTranspose, "conv_transpose"), (nnx.Conv, "conv"), (nnx.LinearGeneral, "dense"),
              (nnx.Linear, "dense"), (nnx.Einsum, "einsum"))
WEIGHTED_KINDS = ("dense", "conv", "conv_transpose", "einsum")
ATTENTION_TYPES = (nn.MultiHeadDotProductAttention, nnx.MultiHeadAttention)


def kind_of(module: Any) -> str | None:
    """``dense``, ``conv``, ``conv_transpose``, ``einsum``, ``matmul``, or None (not a layer)."""
    if isinstance(module, AttentionEinsum):
        return "matmul"
    for types in (_LINEN_KINDS, _NNX_KINDS):
        for cls, kind in types:
            if isinstance(module, cls):
                return kind
    return None


def is_weighted(module: Any) -> bool:
    """Whether ``module`` multiplies its input by a kernel (Linen or NNX)."""
    return kind_of(module) in WEIGHTED_KINDS


def is_attention(module: Any) -> bool:
    """Whether ``module`` is a Flax attention module whose einsums are matmul layers."""
    return isinstance(module, ATTENTION_TYPES)


def kernel_of(module: Any) -> jax.Array:
    """The kernel of a bound Linen or an NNX weighted layer."""
    if isinstance(module, nnx.Module):
        return module.kernel[...]
    return module.variables["params"]["kernel"]


def _einsum_operands(equation: str) -> tuple[list[str], str]:
    equation = equation.replace(" ", "")
    if "->" not in equation:
        raise ValueError(f"einsum {equation!r}: eqjax needs an explicit output ('...->...')")
    inputs, output = equation.split("->")
    return inputs.split(","), output


def einsum_equation(module: Any, kwargs: Mapping[str, Any]) -> str:
    """The equation an ``Einsum`` layer computes (a call's ``einsum_str`` wins over the field)."""
    equation = kwargs.get("einsum_str") or module.einsum_str
    if equation is None:
        raise ValueError(f"Einsum layer {module!r} has no einsum_str")
    return equation


def kernel_out_axes(module: Any, kernel_ndim: int, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """The kernel axes indexing output channels (one scale per index along them; sorted).

    Raises:
      ValueError: an ``Einsum`` whose kernel operand has an ellipsis (its axes are not known).
    """
    kind = kind_of(module)
    if kind == "conv_transpose" and module.transpose_kernel:
        return (kernel_ndim - 2,)
    if isinstance(module, nn.DenseGeneral):
        features = module.features if isinstance(module.features, tuple) else (module.features,)
        batch = len(module.batch_dims) if isinstance(module.batch_dims, tuple) else 0
        return tuple(range(batch)) + tuple(range(kernel_ndim - len(features), kernel_ndim))
    if isinstance(module, nnx.LinearGeneral):
        batch = len(module.batch_axis)
        return tuple(range(batch)) + tuple(range(kernel_ndim - len(module.out_features), kernel_ndim))
    if kind == "einsum":
        equation = einsum_equation(module, kwargs)
        operands, output = _einsum_operands(equation)
        letters = operands[1]
        if "." in letters or len(letters) != kernel_ndim:
            raise ValueError(f"Einsum {equation!r}: the kernel operand {letters!r} must name each of its "
                             f"{kernel_ndim} axes (no '...')")
        axes = tuple(i for i, letter in enumerate(letters) if letter in output)
        return axes or (kernel_ndim - 1,)
    return (kernel_ndim - 1,)


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-accumulates of ``jnp.einsum(equation, *operands)``: the product of every index
    size, the broadcast ``...`` dimensions included.

    Example:
      >>> einsum_macs("...qhd,...khd->...hqk", [(2, 5, 3, 4), (2, 7, 3, 4)])
      840
    """
    operands, _ = _einsum_operands(equation)
    if len(operands) != len(shapes):
        raise ValueError(f"einsum {equation!r} has {len(operands)} operands, got {len(shapes)} shapes")
    sizes: dict[str, int] = {}
    ellipsis: list[int] = []
    for letters, shape in zip(operands, shapes):
        shape = tuple(shape)
        if "..." in letters:
            head, tail = letters.split("...")
            extra = shape[len(head):len(shape) - len(tail)]
            # '...' dimensions broadcast from the right, as in NumPy.
            padded = [1] * (len(extra) - len(ellipsis)) + ellipsis
            lead = [1] * (len(padded) - len(extra)) + list(extra)
            ellipsis = [max(a, b) for a, b in zip(padded, lead)]
            named = list(zip(head, shape[:len(head)])) + list(zip(tail, shape[len(shape) - len(tail):]))
        else:
            named = list(zip(letters, shape))
        for letter, size in named:
            sizes[letter] = max(sizes.get(letter, 1), size)
    return math.prod(sizes.values()) * math.prod(ellipsis)


def layer_macs(kind: str, input_shapes: Sequence[tuple[int, ...]], output_shape: tuple[int, ...],
               kernel_shape: tuple[int, ...] | None, out_axes: tuple[int, ...] | None,
               equation: str | None) -> int:
    """MACs of one layer call (the table in this module's docstring)."""
    if kind == "matmul":
        return einsum_macs(equation, input_shapes)
    if kind == "einsum":
        return einsum_macs(equation, [input_shapes[0], kernel_shape])
    if kind == "conv_transpose":
        return math.prod(input_shapes[0][:-1]) * math.prod(kernel_shape)
    contracted = [size for axis, size in enumerate(kernel_shape) if axis not in out_axes]
    return math.prod(output_shape) * math.prod(contracted)
