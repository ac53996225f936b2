"""One table of layer rules keyed by (morph kind, layer type), filled through a decorator.

Rule kinds:
  ``widen_out``   grow a layer's output units by an index map (Linear, Conv, Embedding, ...)
  ``widen_in``    grow a layer's input units, dividing copied units' weights
  ``channelwise`` per-channel parameters that follow the map (BatchNorm, PReLU, LayerNorm, ...)
  ``passthrough`` layers that act per element or per channel without parameters (ReLU, pooling)
  ``identity``    build a function-preserving successor layer for a tensor (deepen)
  ``decompose``   re-express a linear layer as two whose composition equals it (deepen)
  ``activation``  activations that ``swap`` accepts
Lookup walks the layer's class hierarchy, so subclasses inherit their base's rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

KINDS = ("widen_out", "widen_in", "channelwise", "passthrough", "identity", "decompose",
         "activation")

_RULES: dict[tuple[str, type], Any] = {}
T = TypeVar("T")


def register(kind: str, *types: type) -> Callable[[T], T]:
    """``@register("widen_out", nn.Linear)`` above a rule function or class."""
    if kind not in KINDS:
        raise ValueError(f"unknown rule kind {kind!r}")

    def deco(rule: T) -> T:
        for t in types:
            _RULES[(kind, t)] = rule
        return rule

    return deco


def lookup(kind: str, layer: nn.Module | type) -> Any | None:
    _load_rules()
    cls = layer if isinstance(layer, type) else type(layer)
    for base in cls.__mro__:
        rule = _RULES.get((kind, base))
        if rule is not None:
            return rule
    return None


def supported(kind: str) -> list[str]:
    """Names of the layer types registered for ``kind`` (for error messages and tests)."""
    _load_rules()
    return sorted(t.__name__ for k, t in _RULES if k == kind)


def entries() -> dict[tuple[str, type], Any]:
    _load_rules()
    return dict(_RULES)


def _load_rules() -> None:
    # Rule modules register themselves on import; importing here keeps one entry point.
    from morphcli.rules import (  # noqa: F401
        activations,
        attention,
        linear_layers,
        norms,
        passthrough,
        successors,
    )
