"""Flax models with timm layer names, and their registry (``eqjax.models.get(name)``)."""

from eqjax.models.registry import ModelSpec, Preprocessing, get, names, register

__all__ = ["ModelSpec", "Preprocessing", "get", "names", "register"]
