"""Pure state_dict -> Flax variables conversion, placed by the target model's own tree.

After renaming (``rules.py``) a key is ``<module path>.<suffix>``; where it goes is
read off the model's abstract variables, and how it is laid out follows from rank:

| PyTorch                      | Flax                                  | transform          |
|------------------------------|---------------------------------------|--------------------|
| conv ``weight`` [O, I, H, W] | ``params/<path>/kernel`` [H, W, I, O] | transpose (2,3,1,0) |
| linear ``weight`` [O, I]     | ``params/<path>/kernel`` [I, O]       | transpose          |
| norm ``weight`` / ``bias``   | ``params/<path>/scale`` / ``bias``    | none               |
| ``running_mean`` / ``_var``  | ``batch_stats/<path>/mean`` / ``var`` | none               |
| other (``cls_token``, ...)   | ``params/<path>``                     | none               |

Every problem (missing, unexpected, wrongly shaped keys) is collected and raised at
once; nothing is left at its random initialisation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eqjax import models
from weights_convert import rules

CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "state_dict_ema", "model_ema")


class ConversionError(ValueError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.numpy()
    return np.asarray(value)


def unwrap_state_dict(obj: Any) -> dict[str, np.ndarray]:
    """A flat ``{name: array}`` dict from a state_dict or a training checkpoint holding one.

    Unwraps ``{'state_dict': ...}``, ``{'model': ...}`` and similar containers.

    Raises:
      TypeError: ``obj`` is not a state_dict (not a mapping of names to tensors).
    """
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return unwrap_state_dict(obj[key])
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in obj.items()
                   if not (hasattr(v, "shape") and hasattr(v, "dtype"))]
    if not_tensors or not obj:
        raise TypeError("not a state_dict: expected a non-empty mapping of names to tensors; "
                        f"these values are not tensors: {', '.join(not_tensors[:10]) or '(empty)'}")
    return {str(k): _to_numpy(v) for k, v in obj.items()}


def infer_num_classes(spec: models.ModelSpec, state_dict: Mapping[str, np.ndarray]) -> int:
    """Rows of the classifier weight (``fc`` / ``head`` / ``classifier``)."""
    model_rules = rules.RULES.get(spec.name, ())
    for key, value in state_dict.items():
        if rules.rename(key, model_rules) == f"{spec.classifier}.weight":
            return int(value.shape[0])
    raise ConversionError(f"cannot find the classifier weight '{spec.classifier}.weight' of "
                          f"{spec.name} in the checkpoint (keys: {', '.join(list(state_dict)[:8])} ...)")


def _flat_targets(abstract_variables: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_variables)[0]:
        flat[tuple(p.key for p in path)] = leaf
    return flat


def _target_of(name: str, targets: Mapping[tuple[str, ...], Any]) -> tuple[tuple[str, ...], str]:
    """(target path, transform) for a timm-named key."""
    path, _, suffix = name.rpartition(".")
    module = tuple(path.split(".")) if path else ()
    if suffix == "running_mean":
        return ("batch_stats", *module, "mean"), "none"
    if suffix == "running_var":
        return ("batch_stats", *module, "var"), "none"
    if suffix == "weight":
        if ("params", *module, "kernel") in targets:
            return ("params", *module, "kernel"), "kernel"
        return ("params", *module, "scale"), "none"
    if suffix == "bias":
        return ("params", *module, "bias"), "none"
    return ("params", *name.split(".")), "none"


def _transform(value: np.ndarray, how: str) -> np.ndarray:
    if how == "kernel":
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return value.T
    return value


def _untransform(kernel: np.ndarray) -> np.ndarray:
    """:func:`_transform`'s ``kernel`` case backwards: HWIO -> OIHW, [in, out] -> [out, in]."""
    if kernel.ndim == 4:
        return kernel.transpose(3, 2, 0, 1)
    return kernel.T if kernel.ndim == 2 else kernel


def state_dict_of(name: str, variables: Mapping) -> dict[str, np.ndarray]:
    """The timm-named state_dict of Flax ``variables``: :func:`convert` run backwards.

    ``convert(name, state_dict_of(name, variables))`` gives ``variables`` back exactly (tested), so
    a trained model can be written as a plain ``.safetensors`` state_dict that every reader of
    ``--weights=FILE.safetensors`` (and timm) takes.

    Raises:
      ValueError: the model's keys are renamed on conversion (EfficientNet-Lite0), which this
        does not invert.
    """
    if rules.RULES.get(name):
        raise ValueError(f"state_dict_of does not invert the key renaming of {name!r}")
    out = {}
    for path, value in _flat_targets(variables).items():
        value, module = np.asarray(value), ".".join(path[1:-1])
        prefix = f"{module}." if module else ""
        if path[0] == "batch_stats":
            out[prefix + {"mean": "running_mean", "var": "running_var"}[path[-1]]] = value
        elif path[-1] == "kernel":
            out[prefix + "weight"] = _untransform(value)
        elif path[-1] in ("scale", "bias"):
            out[prefix + ("weight" if path[-1] == "scale" else "bias")] = value
        else:
            out[".".join(path[1:])] = value
    return out


def _nest(flat: Mapping[tuple[str, ...], Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def convert(name: str, state_dict: Any, *, num_classes: int | None = None,
            **model_overrides) -> dict:
    """Converts a PyTorch/timm state_dict into the Flax variables of ``eqjax.models.get(name)``.

    Args:
      name: registry name of the model.
      state_dict: mapping of names to tensors/arrays (or a checkpoint holding one).
      num_classes: classifier size; inferred from the checkpoint when None.
      model_overrides: constructor fields of the model (tiny variants).

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` (``batch_stats`` for BatchNorm models) of
      float32 ``jax.Array``s, with the model's own tree structure.

    Raises:
      KeyError: unknown model name.
      TypeError: ``state_dict`` is not a state_dict.
      ConversionError: missing, unexpected or wrongly shaped keys (all listed).
    """
    spec = models.get(name)
    source = unwrap_state_dict(state_dict)
    if num_classes is None:
        num_classes = infer_num_classes(spec, source)
    model = spec.build(num_classes=num_classes, **model_overrides)
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jnp.zeros(spec.example_input().shape, jnp.float32))
    targets = _flat_targets(abstract)
    model_rules = rules.RULES.get(name, ())

    placed: dict[tuple[str, ...], jax.Array] = {}
    unexpected, wrong_shape, misfit_paths = [], [], set()
    for key, value in source.items():
        new_name = rules.rename(key, model_rules)
        if new_name is None:
            continue
        path, how = _target_of(new_name, targets)
        if path not in targets:
            unexpected.append(key)
            continue
        array = _transform(value, how)
        if tuple(array.shape) != tuple(targets[path].shape):
            wrong_shape.append(f"{key}: checkpoint {tuple(value.shape)} -> {tuple(array.shape)}, "
                               f"model {'/'.join(path)} expects {tuple(targets[path].shape)}")
            misfit_paths.add(path)
            continue
        placed[path] = jnp.asarray(array, dtype=targets[path].dtype)
    missing = ["/".join(p) for p in targets if p not in placed and p not in misfit_paths]
    if missing or unexpected or wrong_shape:
        parts = [f"checkpoint does not fit model {name!r} (num_classes={num_classes}):"]
        for title, items in (("missing in checkpoint", missing), ("unexpected keys", unexpected),
                             ("wrong shapes", wrong_shape)):
            if items:
                parts.append(f"  {title} ({len(items)}): " + "; ".join(items))
        raise ConversionError("\n".join(parts))
    return _nest(placed)
