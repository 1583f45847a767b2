"""Flax NNX models through the same library API and the same interception point as Linen.

eqjax's algorithms are pure functions of ``(model, variables, policy, data)`` that call
``model.apply(variables, ...)``. :func:`functional` gives an NNX module that face:

* ``variables`` are plain nested dicts, ``{'params': ..., 'batch_stats': ...}`` (``nnx.Param``
  and ``nnx.BatchStat``; other state such as RNG counters stays with the graph), keyed by
  attribute names, list indices as strings; so ``variables['params']['blocks']['0']['attn']
  ['query']['kernel']`` is the layer ``blocks.0.attn.query``, as in Linen;
* ``apply(variables, *args)`` merges a fresh module from them (``nnx.merge``) and calls it,
  every layer call going through :func:`eqjax.quant.intercept.dispatch` under the layer's
  attribute path: calibration, quantized apply, sensitivity sweeps and the energy count see
  NNX layers exactly as Linen ones, and one compilation serves every policy.

:class:`QuantizedModule` is the quantized model as an NNX module again (``nnx.split`` /
``nnx.merge`` / ``nnx.jit`` work on it): the model with fake-quantized kernels and the policy
as state.

Example:
  >>> from flax import nnx
  >>> import jax, jax.numpy as jnp
  >>> net = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  >>> model, variables = functional(net)
  >>> sorted(variables["params"])
  ['bias', 'kernel']
  >>> bool(jnp.allclose(model.apply(variables, jnp.ones((1, 3))), net(jnp.ones((1, 3)))))
  True
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import jax
from flax import nnx

from eqjax.quant import apply, intercept, policy as policy_lib

__all__ = ["NnxModel", "functional", "as_functional", "QuantizedModule", "PolicyState", "layer_names"]

_COLLECTIONS = (("params", nnx.Param), ("batch_stats", nnx.BatchStat))


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _with_template_keys(template: Any, tree: Any, path: str = "") -> Any:
    """``tree`` (string keys) re-keyed like ``template`` (an NNX pure dict, int list indices)."""
    if not isinstance(template, Mapping):
        return tree
    if not isinstance(tree, Mapping):
        raise ValueError(f"NNX variables: expected a dict at {path or '<top>'!r}, got {type(tree).__name__}")
    missing = [str(k) for k in template if str(k) not in tree]
    unknown = sorted(set(tree) - {str(k) for k in template})
    if missing or unknown:
        raise ValueError(f"NNX variables do not match the model at {path or '<top>'!r}: "
                         f"missing {missing}, unknown {unknown}")
    return {k: _with_template_keys(v, tree[str(k)], f"{path}.{k}".lstrip(".")) for k, v in template.items()}


def layer_names(module: nnx.Module) -> dict[int, str]:
    """``{id(submodule): dotted attribute path}`` of every module in an NNX graph (the top is ``""``)."""
    return {id(node): ".".join(str(p) for p in path)
            for path, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}


@contextlib.contextmanager
def _dispatching(module: nnx.Module):
    """While open, every ``__call__`` of a module of this graph goes through ``intercept.dispatch``."""
    names = layer_names(module)
    classes = {type(node) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Module)}
    originals = {cls: (cls.__dict__.get("__call__"), cls.__call__) for cls in classes if hasattr(cls, "__call__")}

    def wrap(original):
        def __call__(self, *args, **kwargs):
            name = names.get(id(self))
            if name is None:
                return original(self, *args, **kwargs)
            return intercept.dispatch(name, self, lambda *a, **k: original(self, *a, **k), args, kwargs)
        return __call__

    for cls, (_, resolved) in originals.items():
        cls.__call__ = wrap(resolved)
    try:
        yield
    finally:
        for cls, (own, _) in originals.items():
            if own is None:
                del cls.__call__
            else:
                cls.__call__ = own


class NnxModel:
    """A Linen-like functional face of an NNX model: ``apply(variables, *args, **kwargs)``.

    Made by :func:`functional`; holds the graph definition and the state that is not in
    ``variables`` (RNG counters, caches). Hashable by identity, so it can be a static argument.
    """

    def __init__(self, graphdef: Any, templates: Mapping[str, Any], rest: Any):
        self.graphdef, self._templates, self._rest = graphdef, dict(templates), rest
        self._template_dicts = {c: nnx.to_pure_dict(t) for c, t in self._templates.items()}

    def _states(self, variables: Mapping[str, Any]) -> list:
        unknown = sorted(set(variables) - set(self._templates))
        if unknown:
            raise ValueError(f"NNX variables have collections the model lacks: {unknown}")
        states = []
        for collection, template in self._templates.items():
            state = jax.tree.map(lambda leaf: leaf, template)  # a fresh State to fill
            tree = variables.get(collection, {})
            nnx.replace_by_pure_dict(state, _with_template_keys(self._template_dicts[collection], tree))
            states.append(state)
        return states

    def merge(self, variables: Mapping[str, Any]) -> nnx.Module:
        """A fresh NNX module with ``variables``."""
        return nnx.merge(self.graphdef, *self._states(variables), self._rest)

    def apply(self, variables: Mapping[str, Any], *args, **kwargs) -> Any:
        """The module with ``variables`` called on ``args``, its layer calls dispatched by name."""
        module = self.merge(variables)
        with _dispatching(module):
            return module(*args, **kwargs)

    def submodel(self, path: str) -> "NnxModel":
        """The functional face of the submodule at dotted attribute ``path`` (its variables are the
        subtree of this model's at that path), e.g. a block that reconstruction runs on its own."""
        node = self.merge(self.init(None))
        for key in (path.split(".") if path else ()):
            node = node[int(key)] if isinstance(node, (list, tuple, nnx.List)) else getattr(node, key)
        return functional(node)[0]

    def init(self, rng: Any, *args, **kwargs) -> dict:
        """The variables the model was made with; with arguments, the model is also called on them
        (as Linen's ``init`` is, so that tracing ``init`` sees every layer call). ``rng`` is unused."""
        del rng
        variables = {c: _string_keys(d) for c, d in self._template_dicts.items()}
        if args or kwargs:
            self.apply(variables, *args, **kwargs)
        return variables


def functional(model: nnx.Module) -> tuple[NnxModel, dict]:
    """``(NnxModel, variables)`` for an NNX module: use them wherever eqjax takes a Linen model.

    ``variables`` holds ``nnx.Param`` under ``params`` and ``nnx.BatchStat`` under
    ``batch_stats`` as nested dicts. Call ``model.eval()`` first for inference behaviour
    (BatchNorm running averages, no dropout).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"functional() takes an nnx.Module, got {type(model).__name__}")
    graphdef, *states = nnx.split(model, *(t for _, t in _COLLECTIONS), ...)
    templates = {c: s for (c, _), s in zip(_COLLECTIONS, states[:-1]) if len(s)}
    wrapper = NnxModel(graphdef, templates, states[-1])
    return wrapper, wrapper.init(None)


def as_functional(model: Any, variables: Any) -> tuple[Any, Any]:
    """``(model, variables)`` unchanged for Linen; :func:`functional` for an NNX module.

    An NNX module carries its own state: ``variables`` must then be None.
    """
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise ValueError("an NNX model carries its own state: pass variables=None "
                             "(or use eqjax.quant.nnx_model.functional(model) and its variables)")
        return functional(model)
    return model, variables


class PolicyState(nnx.Variable):
    """The quantization policy of a :class:`QuantizedModule` (a pytree of arrays), as NNX state."""


class QuantizedModule(nnx.Module):
    """An NNX model quantized under a policy, itself an NNX module.

    Attributes:
      model: the model, its kernels fake-quantized per output channel.
      policy: :class:`PolicyState` holding the ``{layer: LayerQuant}`` policy.

    Calling it runs the model with every layer input fake-quantized as the policy says
    (``eqjax.quant.apply.quantized_apply``); ``nnx.split``, ``nnx.merge`` and ``nnx.jit`` work
    on it, and changing the policy's arrays never recompiles.
    """

    def __init__(self, model: nnx.Module, policy: Mapping[str, Any], *, weight_method: str = "absmax"):
        policy_lib.check_calibrated(policy)
        functional_model, variables = functional(model)
        quantized = jax.jit(apply.quantize_weights, static_argnames="method")(
            variables, dict(policy), method=weight_method)
        self.model = functional_model.merge(quantized)
        self.policy = PolicyState(dict(policy))

    def __call__(self, *args, **kwargs):
        functional_model, variables = functional(self.model)
        return apply.quantized_apply(functional_model, variables, self.policy.get_value(), *args,
                                     quantize_kernels=False, **kwargs)
