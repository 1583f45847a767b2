"""Which module calls are quantizable layers, their timm-style names, and tracing them.

The one interception point of eqjax, for Flax Linen and Flax NNX models alike:

* every call of a weighted layer (``Dense``, ``DenseGeneral``, ``Conv`` of any groups,
  ``ConvTranspose``, ``Einsum``, and their NNX twins ``Linear``, ``LinearGeneral``, ...; the
  table in :mod:`eqjax.quant.layers`) goes through the handlers of the active
  :func:`intercept_calls` contexts, with the layer's name and its arguments;
* inside a Flax attention module (``MultiHeadDotProductAttention``, ``SelfAttention``,
  ``nnx.MultiHeadAttention``, or :class:`ActivationMatmul` in eqjax's own models) the
  einsums between two activations (QK^T, softmax·V) are layers too, named
  ``<attention>.qk_matmul`` and ``<attention>.av_matmul``;
* :func:`trace_layers` finds every such call without computing, and warns
  (:class:`UnattributedOpWarning`) about any matrix product or convolution outside them —
  say a ``jnp.dot`` on a raw ``self.param`` — naming the module and source line, since
  eqjax can neither quantize nor count it.

Why module interception, not ``dot_general`` interception: weights are quantized as a pure
map over the params pytree before the forward (so reconstruction, ranking and QAT can own
them), which needs each kernel's module path and output axes; a module call carries both,
a bare ``dot_general`` carries neither. Function-level patching is kept to the one place
that has no module: the einsums of attention (``jnp.einsum`` is swapped only while an
intercept context is open, and acts only inside an attention module's own body).

A layer's name is its module path joined by dots (Linen: the Flax path; NNX: the attribute
path, list indices included), so that eqjax's models carry timm's names
(``layer3.1.conv2``, ``blocks.8.mlp.fc2``). Nothing here edits a model: Linen calls are
observed through ``nn.intercept_methods``; NNX models run through
:mod:`eqjax.quant.nnx_model`, which routes their layer calls here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import threading
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from eqjax.quant import layers
from eqjax.quant.layers import ActivationMatmul, AttentionEinsum

__all__ = ["ActivationMatmul", "AttentionEinsum", "LayerCall", "Trace", "UnattributedOp", "UnattributedOpWarning",
           "layer_name", "is_quantizable", "intercept_calls", "dispatch", "trace_layers", "trace",
           "weighted_layer_names", "check_layer_names", "module_variables", "replace_module_variable",
           "closest_names"]

MATMUL_NAMES = ("qk_matmul", "av_matmul")


def is_quantizable(module: Any) -> bool:
    """Weighted layers and activation matmuls (Linen, NNX, and attention einsums)."""
    return layers.kind_of(module) is not None


def layer_name(module: nn.Module) -> str:
    """timm-style dotted name of a bound Linen module: its Flax path joined by '.'."""
    return ".".join(module.path)


@dataclasses.dataclass(frozen=True)
class LayerCall:
    """One call of a quantizable layer, as seen while tracing.

    Attributes:
      name: dotted module path (timm name).
      kind: ``dense``, ``conv``, ``conv_transpose``, ``einsum`` or ``matmul``.
      input_shapes: shapes of the activation inputs (one, or two for a matmul).
      output_shape: shape of the output.
      kernel_shape: shape of the weight (None for a matmul).
      feature_group_count: conv groups (depthwise convs have groups = channels).
      equation: the einsum equation of an einsum layer or a matmul.
      kernel_out_axes: the kernel axes of the output channels (per-channel scales run along
        them; None for a matmul).
    """

    name: str
    kind: str
    input_shapes: tuple[tuple[int, ...], ...]
    output_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...] | None = None
    feature_group_count: int = 1
    equation: str | None = None
    kernel_out_axes: tuple[int, ...] | None = None

    @property
    def macs(self) -> int:
        """Multiply-accumulates of this call (:func:`eqjax.quant.layers.layer_macs`)."""
        return layers.layer_macs(self.kind, self.input_shapes, self.output_shape, self.kernel_shape,
                                 self.kernel_out_axes, self.equation)


# handler(name, module, call, args, kwargs) -> output; ``call(*args, **kwargs)`` runs the layer.
CallHandler = Callable[[str, Any, Callable[..., Any], tuple, dict], Any]


class _Frame:
    """A module call in progress: its module, name, and the attention einsums seen in its body."""

    __slots__ = ("module", "name", "attention", "einsums")

    def __init__(self, module: Any, name: str, attention: bool):
        self.module, self.name, self.attention, self.einsums = module, name, attention, 0


class _State(threading.local):
    def __init__(self):
        self.contexts: list[tuple[CallHandler, Callable[[Any], bool]]] = []
        self.frames: list[_Frame] = []


_STATE = _State()
_ORIGINAL_EINSUM = jnp.einsum


@contextlib.contextmanager
def _entered(module: Any, name: str, *, attention: bool = False):
    _STATE.frames.append(_Frame(module, name, attention))
    try:
        yield
    finally:
        _STATE.frames.pop()


def _chain(name: str, module: Any, call: Callable, args: tuple, kwargs: dict,
           contexts: Sequence[tuple[CallHandler, Callable[[Any], bool]]]) -> Any:
    """``call`` through the handlers of ``contexts`` that select ``module``, outermost first
    (the order in which Flax applies nested method interceptors)."""

    def run(i, call_args, call_kwargs):
        if i == len(contexts):
            return call(*call_args, **call_kwargs)
        handler, select = contexts[i]
        next_call = lambda *a, **k: run(i + 1, a, k)
        if select(module):
            return handler(name, module, next_call, call_args, call_kwargs)
        return next_call(*call_args, **call_kwargs)

    return run(0, tuple(args), dict(kwargs))


def dispatch(name: str, module: Any, call: Callable, args: tuple, kwargs: dict) -> Any:
    """Runs one module call (``call(*args, **kwargs)``) through every active context.

    What the Linen interceptor does for Linen modules, for modules that Flax does not
    intercept (NNX layers, called by :mod:`eqjax.quant.nnx_model`). A module already in
    progress (a subclass calling ``super().__call__``) is not dispatched twice.
    """
    frames = _STATE.frames
    if frames and frames[-1].module is module:
        return call(*args, **kwargs)
    with _entered(module, name, attention=layers.is_attention(module)):
        return _chain(name, module, call, args, kwargs, list(_STATE.contexts))


def _attention_einsum(subscripts, *operands, **kwargs):
    """``jnp.einsum`` while a context is open: inside an attention module's own body, an einsum of
    two operands is the layer ``<attention>.qk_matmul`` / ``av_matmul`` (then ``matmul_<i>``)."""
    frames = _STATE.frames
    frame = frames[-1] if frames else None
    if frame is None or not frame.attention or not isinstance(subscripts, str) or len(operands) != 2:
        return _ORIGINAL_EINSUM(subscripts, *operands, **kwargs)
    index = frame.einsums
    frame.einsums += 1
    name = ".".join(filter(None, (frame.name, MATMUL_NAMES[index] if index < len(MATMUL_NAMES)
                                  else f"matmul_{index}")))
    descriptor = AttentionEinsum(subscripts.replace(" ", ""))
    call = lambda a, b: _ORIGINAL_EINSUM(subscripts, a, b, **kwargs)
    with _entered(descriptor, name):  # einsums inside the handlers are plain einsums
        return _chain(name, descriptor, call, operands, {}, list(_STATE.contexts))


_ORIGINAL_DOT_PRODUCT_ATTENTION = jax.nn.dot_product_attention


def _attention_dot_product(query, key, value, bias=None, mask=None, *, scale=None, is_causal=False,
                           **options):
    """``jax.nn.dot_product_attention`` inside an attention module's body (NNX attention calls it),
    computed as flax's Linen attention does (query scaled first, float32 softmax) so that its two
    einsums are the layers ``qk_matmul`` and ``av_matmul``; elsewhere, or with options it does not
    cover (sequence lengths, local windows, grouped heads), the fused original."""
    frames = _STATE.frames
    plain = (frames and frames[-1].attention and not any(v is not None for v in options.values())
             and query.ndim == 4 and key.shape[-2] == query.shape[-2])
    if not plain:
        return _ORIGINAL_DOT_PRODUCT_ATTENTION(query, key, value, bias, mask, scale=scale,
                                               is_causal=is_causal, **options)
    dtype = query.dtype
    if scale is None:
        query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    else:
        query = query * jnp.asarray(scale, dtype)
    logits = jnp.einsum("...qhd,...khd->...hqk", query, key)
    if bias is not None:
        logits = logits + bias
    if is_causal:
        causal = jnp.tril(jnp.ones(logits.shape[-2:], bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)
    return jnp.einsum("...hqk,...khd->...qhd", weights, value)


@contextlib.contextmanager
def _attention_patched():
    """``jnp.einsum`` and ``jax.nn.dot_product_attention`` swapped for the attention-aware ones
    (they act only inside an attention module's body) while any context is open."""
    installed = jnp.einsum is _attention_einsum
    if not installed:
        jnp.einsum, jax.nn.dot_product_attention = _attention_einsum, _attention_dot_product
    try:
        yield
    finally:
        if not installed:
            jnp.einsum, jax.nn.dot_product_attention = _ORIGINAL_EINSUM, _ORIGINAL_DOT_PRODUCT_ATTENTION


@contextlib.contextmanager
def intercept_calls(handler: CallHandler, *, select: Callable[[Any], bool] = is_quantizable):
    """A context in which every ``__call__`` of a selected module goes through ``handler``.

    The one interception point of eqjax: tracing, calibration, quantized apply, the
    sensitivity sweep, ranking-aware PTQ and the energy count all see layer calls here.

    Args:
      handler: ``handler(name, module, call, args, kwargs)`` returns the call's output;
        ``name`` is the module's dotted path (its timm name), ``call(*args, **kwargs)``
        runs the layer (the handler may change the arguments, the output, or skip it).
        ``module`` is a bound Linen module, an NNX module, or an :class:`AttentionEinsum`.
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
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        name = layer_name(module)
        with _entered(module, name, attention=layers.is_attention(module)):
            if select(module):
                return handler(name, module, next_fun, args, kwargs)
            return next_fun(*args, **kwargs)

    entry = (handler, select)
    _STATE.contexts.append(entry)
    try:
        with _attention_patched(), nn.intercept_methods(interceptor):
            yield
    finally:
        _STATE.contexts.remove(entry)


class UnattributedOpWarning(UserWarning):
    """A matrix product or convolution that no quantizable layer computes (left in float32, not counted)."""


@dataclasses.dataclass(frozen=True)
class UnattributedOp:
    """A ``dot_general`` / ``conv_general_dilated`` outside every quantizable layer.

    Attributes:
      primitive: the JAX primitive.
      operand_shapes: its operands' shapes.
      module: dotted path of the innermost module whose body computes it (``""``: the top).
      source: ``file:line (function)`` of the user code that called it, when JAX knows it.
    """

    primitive: str
    operand_shapes: tuple[tuple[int, ...], ...]
    module: str
    source: str

    def describe(self) -> str:
        shapes = " x ".join(str(list(s)) for s in self.operand_shapes)
        return f"{self.primitive} {shapes} in module {self.module or '<top>'!r} at {self.source}"


@dataclasses.dataclass(frozen=True)
class Trace:
    """What :func:`trace` found: the quantizable layer calls and the operations outside them."""

    calls: tuple[LayerCall, ...]
    unattributed: tuple[UnattributedOp, ...]


_LAYER_SCOPE = "eqjax.layer"
_MODULE_SCOPE = "eqjax.module:"
_OPS = ("dot_general", "conv_general_dilated")


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for item in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _source(eqn) -> str:
    try:
        from jax._src import source_info_util  # no public API names a jaxpr equation's user frame
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # pragma: no cover - a JAX without it: the module path still says where
        return "an unknown line"


def _unattributed(jaxpr, stack: str = "") -> list[UnattributedOp]:
    found = []
    for eqn in jaxpr.eqns:
        where = "/".join(filter(None, (stack, str(eqn.source_info.name_stack))))
        if _LAYER_SCOPE in where:
            continue
        if eqn.primitive.name in _OPS:
            modules = [part.split(_MODULE_SCOPE, 1)[1] for part in where.split("/") if _MODULE_SCOPE in part]
            found.append(UnattributedOp(eqn.primitive.name, tuple(tuple(v.aval.shape) for v in eqn.invars),
                                        modules[-1] if modules else "", _source(eqn)))
        for sub in _sub_jaxprs(eqn.params):
            found.extend(_unattributed(sub, where))
    return found


def trace(model: Any, inputs: Any, *, variables: Any = None, method_kwargs: dict | None = None) -> Trace:
    """The quantizable layer calls of ``model`` in call order, and the products outside them.

    Uses abstract evaluation (``jax.make_jaxpr`` on shapes): no FLOPs, no activation memory.

    Args:
      model: a Flax linen module, or an NNX model as :func:`eqjax.quant.nnx_model.functional` gives.
      inputs: an array or ``jax.ShapeDtypeStruct`` (e.g. ``[batch, H, W, C]``).
      variables: the model's variables; when None the model is initialised abstractly.
      method_kwargs: extra keyword arguments of ``model.__call__``.
    """
    records: list[LayerCall] = []
    kwargs = method_kwargs or {}

    def record(name, module, call, args, call_kwargs):
        if not is_quantizable(module):
            with jax.named_scope(_MODULE_SCOPE + name):
                return call(*args, **call_kwargs)
        with jax.named_scope(_LAYER_SCOPE):
            out = call(*args, **call_kwargs)
        kind = layers.kind_of(module)
        kernel = out_axes = None
        if kind in layers.WEIGHTED_KINDS:
            kernel = tuple(layers.kernel_of(module).shape)
            out_axes = layers.kernel_out_axes(module, len(kernel), call_kwargs)
        equation = getattr(module, "equation", None)
        if kind == "einsum":
            equation = layers.einsum_equation(module, call_kwargs)
        records.append(LayerCall(
            name=name, kind=kind, input_shapes=tuple(tuple(jnp.shape(a)) for a in args),
            output_shape=tuple(out.shape), kernel_shape=kernel,
            feature_group_count=getattr(module, "feature_group_count", 1), equation=equation,
            kernel_out_axes=out_axes))
        return out

    def run(x):
        with intercept_calls(record, select=lambda module: True):
            if variables is None:
                return model.init(jax.random.key(0), x, **kwargs)
            return model.apply(variables, x, **kwargs)

    closed = jax.make_jaxpr(run)(inputs)
    return Trace(tuple(records), tuple(_unattributed(closed.jaxpr)))


def trace_layers(model: Any, inputs: Any, *, variables: Any = None,
                 method_kwargs: dict | None = None) -> list[LayerCall]:
    """The quantizable layer calls of ``model`` in call order (see :func:`trace`).

    Warns with :class:`UnattributedOpWarning` when the model computes a matrix product or a
    convolution outside every quantizable layer (it stays in float32 and out of the energy).

    Returns:
      One :class:`LayerCall` per call, in order.
    """
    found = trace(model, inputs, variables=variables, method_kwargs=method_kwargs)
    if found.unattributed:
        listed = "; ".join(op.describe() for op in found.unattributed[:5])
        more = f" (and {len(found.unattributed) - 5} more)" if len(found.unattributed) > 5 else ""
        warnings.warn(f"{len(found.unattributed)} matrix product(s)/convolution(s) are not computed by a layer "
                      f"eqjax can quantize, so they stay in float32 and are not counted in the energy: "
                      f"{listed}{more}. Compute them with a Flax layer (nn.Dense, nn.Einsum, ...) or "
                      f"eqjax.quant.intercept.ActivationMatmul.", UnattributedOpWarning, stacklevel=2)
    return list(found.calls)


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
                            collection: str = "params", create: bool = False) -> dict:
    """A copy of variables ``tree`` with ``tree[collection][name...][leaf] = value``
    (untouched branches shared). Raises KeyError when the module has no such variable, unless
    ``create``: then the missing branches are added (an integer artifact's variables lack the
    kernels its integer layers hold)."""
    path = (collection, *(name.split(".") if name else ()), leaf)

    def replace(node, depth):
        key = path[depth]
        if not isinstance(node, Mapping) or (key not in node and not create):
            raise KeyError(f"no variable {'/'.join(path)} in the model")
        new = dict(node)
        new[key] = value if depth == len(path) - 1 else replace(node.get(key, {}), depth + 1)
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
