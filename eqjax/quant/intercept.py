"""Which module calls are quantizable layers, their timm-style names, and tracing them.

Quantizable layers are the calls of ``nn.Conv`` and ``nn.Dense`` (weights and inputs
quantized) and of :class:`ActivationMatmul` (the attention matmuls QK^T and softmax·V,
both operands activations). A layer's name is its Flax module path joined by dots; the
models in :mod:`eqjax.models` name their modules so that this is timm's name
(``layer3.1.conv2``, ``blocks.8.mlp.fc2``). Any Flax linen model works: nothing here
edits it, calls are only observed through ``nn.intercept_methods``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["ActivationMatmul", "LayerCall", "layer_name", "is_quantizable", "intercept_calls",
           "trace_layers", "weighted_layer_names", "check_layer_names", "module_variables",
           "replace_module_variable", "closest_names"]


class ActivationMatmul(nn.Module):
    """``jnp.einsum(equation, a, b)`` between two activations, as an interceptable module.

    Attention routes QK^T and softmax(QK^T)·V through this so that quantization (and
    energy counting) can see both operands. It has no parameters.
    """

    equation: str

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum(self.equation, a, b)


WEIGHTED_TYPES = (nn.Conv, nn.Dense)


def is_quantizable(module: nn.Module) -> bool:
    return isinstance(module, WEIGHTED_TYPES + (ActivationMatmul,))


def layer_name(module: nn.Module) -> str:
    """timm-style dotted name of a bound module: its Flax path joined by '.'."""
    return ".".join(module.path)


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a quantizable layer, as seen while tracing.

    Attributes:
      name: dotted module path (timm name).
      kind: ``conv``, ``dense`` or ``matmul``.
      input_shapes: shapes of the activation inputs (one, or two for a matmul).
      output_shape: shape of the output.
      kernel_shape: shape of the weight (None for a matmul).
      feature_group_count: conv groups (depthwise convs have groups = channels).
      equation: the einsum equation of a matmul.
    """

    name: str
    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...] | None = None
    feature_group_count: int = 1
    equation: str | None = None


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv):
        return "conv"
    if isinstance(module, nn.Dense):
        return "dense"
    return "matmul"


# handler(name, module, call, args, kwargs) -> output; ``call(*args, **kwargs)`` runs the layer.
CallHandler = Callable[[str, nn.Module, Callable[..., Any], tuple, dict], Any]


def intercept_calls(handler: CallHandler, *,
                    select: Callable[[nn.Module], bool] = is_quantizable) -> contextlib.AbstractContextManager:
    """A context in which every ``__call__`` of a selected module goes through ``handler``.

    The one interception point of eqjax: tracing, calibration, quantized apply, the
    sensitivity sweep, ranking-aware PTQ and the energy count all see layer calls here.

    Args:
      handler: ``handler(name, module, call, args, kwargs)`` returns the call's output;
        ``name`` is the module's dotted path (its timm name), ``call(*args, **kwargs)``
        runs the layer (the handler may change the arguments, the output, or skip it).
      select: which modules are seen (default: the quantizable layers).

    Example:
      >>> import flax.linen as nn, jax.numpy as jnp
      >>> net = nn.Dense(2)
      >>> params = net.init(jax.random.key(0), jnp.ones((1, 3)))
      >>> seen = []
      >>> def record(name, module, call, args, kwargs):
      ...     seen.append((name or "<top>", args[0].shape))
      ...     return call(*args, **kwargs)
      >>> with intercept_calls(record):
      ...     _ = net.apply(params, jnp.ones((4, 3)))
      >>> seen
      [('<top>', (4, 3))]
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not select(module):
            return next_fun(*args, **kwargs)
        return handler(layer_name(module), module, next_fun, args, kwargs)

    return nn.intercept_methods(interceptor)


def trace_layers(model: nn.Module, inputs: Any, *, variables: Any = None,
                 method_kwargs: dict | None = None) -> list[LayerCall]:
    """The quantizable layer calls of ``model`` in call order, without running it.

    Uses abstract evaluation (``jax.eval_shape``): no FLOPs, no memory for activations.

    Args:
      model: any Flax linen module.
      inputs: an array or ``jax.ShapeDtypeStruct`` (e.g. ``[batch, H, W, C]``).
      variables: the model's variables; when None the model is initialised abstractly.
      method_kwargs: extra keyword arguments of ``model.__call__``.

    Returns:
      One :class:`LayerCall` per call, in order.
    """
    records: list[LayerCall] = []
    kwargs = method_kwargs or {}

    def record(name, module, call, args, call_kwargs):
        out = call(*args, **call_kwargs)
        kernel = None
        if isinstance(module, WEIGHTED_TYPES):
            kernel = tuple(module.variables["params"]["kernel"].shape)
        records.append(LayerCall(
            name=name, kind=_kind(module),
            input_shapes=tuple(tuple(a.shape) for a in args), output_shape=tuple(out.shape),
            kernel_shape=kernel,
            feature_group_count=getattr(module, "feature_group_count", 1),
            equation=getattr(module, "equation", None)))
        return out

    def run(x):
        with intercept_calls(record):
            if variables is None:
                return model.init(jax.random.key(0), x, **kwargs)
            return model.apply(variables, x, **kwargs)

    jax.eval_shape(run, inputs)
    return records


def module_variables(tree: Mapping, name: str, *, collection: str | None = "params") -> Mapping | None:
    """The variables of module ``name`` (dotted path) in ``tree``, or None if it has none.

    Args:
      tree: Flax variables ``{'params': ...}`` (``collection`` given) or one collection.
      name: dotted module path (``layer1.0.conv1``; ``""`` is the top module).
      collection: the collection to look in, or None when ``tree`` is one already.
    """
    node = tree[collection] if collection is not None else tree
    for key in (name.split(".") if name else ()):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, Mapping) else None


def replace_module_variable(tree: Mapping, name: str, leaf: str, value: Any, *,
                            collection: str = "params") -> dict:
    """A copy of variables ``tree`` with ``tree[collection][name...][leaf] = value``
    (untouched branches shared). Raises KeyError when the module has no such variable."""
    path = (collection, *(name.split(".") if name else ()), leaf)

    def replace(node, depth):
        key = path[depth]
        if not isinstance(node, Mapping) or key not in node:
            raise KeyError(f"no variable {'/'.join(path)} in the model")
        new = dict(node)
        new[key] = value if depth == len(path) - 1 else replace(node[key], depth + 1)
        return new

    return replace(tree, 0)


def closest_names(name: str, candidates: Iterable[str], *, limit: int = 3) -> list[str]:
    """Up to ``limit`` candidates that look like ``name`` (for "did you mean" messages)."""
    return difflib.get_close_matches(name, list(candidates), n=limit, cutoff=0.5)


def check_layer_names(given: Iterable[str], model_layers: Iterable[str], *, prefix: str,
                      missing_label: str) -> None:
    """Raises ValueError listing names in ``given`` the model lacks and model layers ``given`` lacks.

    Args:
      given: layer names of a policy, a bits table, ...
      model_layers: the model's layer names.
      prefix: start of the message, e.g. ``policy does not match the model``.
      missing_label: how model layers absent from ``given`` are described.
    """
    expected = list(model_layers)
    given = list(given)
    unknown = [n for n in given if n not in set(expected)]
    missing = [n for n in expected if n not in set(given)]
    if unknown or missing:
        parts = []
        if unknown:
            described = [n + (f" (closest: {', '.join(close)})" if (close := closest_names(n, expected)) else "")
                         for n in unknown]
            parts.append(f"layers not in the model ({len(unknown)}): {', '.join(described)}")
        if missing:
            parts.append(f"{missing_label} ({len(missing)}): {', '.join(missing)}")
        raise ValueError(f"{prefix}: " + "; ".join(parts))


def weighted_layer_names(calls: Sequence[LayerCall]) -> tuple[str, ...]:
    """Names of the conv/dense calls (the study's "layers"), first occurrence order."""
    return tuple(dict.fromkeys(c.name for c in calls if c.kind != "matmul"))
