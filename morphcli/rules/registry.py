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

``register_rule`` and ``register_substitute`` are the public entry points for layer types
outside torch.nn (a user's own, timm's: see ``morphcli.contrib.timm``); README documents them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

KINDS = ("widen_out", "widen_in", "channelwise", "passthrough", "identity", "decompose",
         "activation")

_RULES: dict[tuple[str, type], Any] = {}
T = TypeVar("T")

# What each public kind's rule must provide (see README "Your own layer types").
PROTOCOL: dict[str, tuple[str, ...]] = {
    "widen_out": ("out_dim", "why_not_out", "resize"),
    "widen_in": ("in_dim", "why_not_in", "resize"),
    "channelwise": ("channel_dim", "applies", "why_not", "resize"),
    "passthrough": ("keeps",),
}
# Types registered from outside: tracing keeps them as single layers (fx leaves), exactly
# these classes (a subclass may compute something else in its own forward).
_LEAVES: set[type] = set()


def register(kind: str, *types: type) -> Callable[[T], T]:
    """``@register("widen_out", nn.Linear)`` above a rule function or class."""
    if kind not in KINDS:
        raise ValueError(f"unknown rule kind {kind!r}")

    def deco(rule: T) -> T:
        for t in types:
            _RULES[(kind, t)] = rule
        return rule

    return deco


def register_rule(kind: str, *types: type[nn.Module]) -> Callable[[T], T]:
    """Register ``rule`` for your own layer ``types``; tracing then keeps each of them as one
    layer, so widen follows the units through it by the rule. ``kind`` is one of
    ``widen_out``, ``widen_in``, ``channelwise``, ``passthrough`` (see ``PROTOCOL``).

    >>> @morphcli.register_rule("channelwise", Scale)
    ... class ScaleRule:
    ...     channel_dim = staticmethod(lambda m, rank: 1)
    ...     applies = staticmethod(lambda m: True)
    ...     why_not = staticmethod(lambda m: None)
    ...     resize = staticmethod(lambda m, cmap, ctx: Scale(cmap.width))
    """
    if kind not in PROTOCOL:
        raise ValueError(f"unknown rule kind {kind!r}; choose from {', '.join(PROTOCOL)}")
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad or not types:
        raise TypeError(f"register_rule takes nn.Module subclasses, not {bad or 'nothing'}")
    _load_rules()  # the package's own rules first, so a user's rule replaces one of them

    def deco(rule: T) -> T:
        missing = [a for a in PROTOCOL[kind] if not callable(getattr(rule, a, None))]
        if missing:
            raise TypeError(f"a {kind!r} rule needs {', '.join(missing)}")
        register(kind, *types)(rule)
        _LEAVES.update(types)
        return rule

    return deco


def register_substitute(layer_type: type[nn.Module] | str,
                        make: Callable[[Any], nn.Module | None]) -> None:
    """Replace every layer of exactly ``layer_type`` (a class or its qualified name) by
    ``make(layer)`` before tracing: an equivalent built from torch.nn or morphcli's layers,
    with the same parameter names, which morphcli can then follow and store. ``make`` returns
    None to keep a layer it cannot replace exactly.

    >>> morphcli.register_substitute(timm.layers.Linear, lambda m: plain_linear(m))
    """
    from morphcli.modules import SUBSTITUTES

    key = layer_type if isinstance(layer_type, str) else \
        f"{layer_type.__module__}.{layer_type.__qualname__}"
    SUBSTITUTES[key] = make


def is_leaf(cls: type) -> bool:
    """Whether tracing keeps layers of ``cls`` whole because a rule was registered for it."""
    return cls in _LEAVES


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
