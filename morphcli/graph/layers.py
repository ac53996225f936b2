"""Layers as users name them: module paths, ``path@N`` for one call site, node names for ops."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from morphcli.errors import InputError


class LayerNotFoundError(InputError):
    pass


class AmbiguousLayerError(InputError):
    pass


@dataclass(frozen=True)
class Layer:
    """One call site: the node, the name users type for it, and the module (None for ops)."""

    name: str
    node: fx.Node
    module: nn.Module | None

    @property
    def type_name(self) -> str:
        if self.module is not None:
            return type(self.module).__name__
        target = self.node.target
        return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def layers(gm: fx.GraphModule) -> list[Layer]:
    """Every call site in execution order; a module called N times gets ``path@1..N``."""
    counts: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            seen[node.target] = seen.get(node.target, 0) + 1
            name = node.target if counts[node.target] == 1 else f"{node.target}@{seen[node.target]}"
            out.append(Layer(name, node, gm.get_submodule(node.target)))
        elif node.op in ("call_function", "call_method"):
            out.append(Layer(node.name, node, None))
    return out


def find_layer(gm: fx.GraphModule, name: str) -> list[Layer]:
    """The call sites ``name`` means: all sites of a module path, or the one ``path@N`` names."""
    all_layers = layers(gm)
    exact = [la for la in all_layers if la.name == name]
    if exact:
        return exact
    sites = [la for la in all_layers if la.module is not None and la.node.target == name]
    if sites:
        return sites
    from morphcli.graph.carried import carried

    if name in carried(gm):
        raise LayerNotFoundError(
            f"layer {name!r} is not used by the traced graph (in eval mode, as an auxiliary "
            "head is not), so no morph of it can be checked; it is carried into the output "
            "unchanged")
    names = sorted({str(la.node.target) if la.module is not None else la.name
                    for la in all_layers})
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    if not close:
        close = [n for n in names if name in n][:3]
    hint = (f"; did you mean {', '.join(close)}?" if close
            else "; 'morph inspect MODEL' lists the layers")
    raise LayerNotFoundError(f"no layer named {name!r}{hint}")


def find_one_layer(gm: fx.GraphModule, name: str) -> Layer:
    """Like find_layer, but a module called at several sites must be narrowed with ``@N``."""
    sites = find_layer(gm, name)
    if len(sites) > 1:
        feeds = [", ".join(u.name for u in s.node.users) or "output" for s in sites]
        listing = ", ".join(f"{s.name} (feeds {f})" for s, f in zip(sites, feeds, strict=True))
        raise AmbiguousLayerError(
            f"layer {name!r} is called at {len(sites)} places: {listing}; name one, e.g. "
            f"{sites[0].name}"
        )
    return sites[0]
