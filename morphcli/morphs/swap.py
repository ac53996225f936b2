"""``swap``: replace an activation by another without changing the function (or, on request,
approximately).

Exact: ``ActivationBlend`` computes ``(1 - t) * old(x) + t * new(x)`` with learnable t = 0, so it
equals the old activation until training moves t. ReLU -> LeakyReLU/PReLU (and LeakyReLU ->
PReLU) becomes a PReLU whose slope starts at the old one: exact and the natural parametric form.
``approx``: the new activation replaces the old outright; the check measures the difference.

A module called at several sites is swapped at all of them (one shared new module, as the old
one was shared), or at the one site ``path@N`` names (that site gets ``path_swap``).
Functional sites (``F.relu(x)``, ``x.sigmoid()``) become a module call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.optim import Optimizer

from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.graph.edit import clone_structure, finish, free_name, replace_module
from morphcli.graph.layers import Layer, find_layer
from morphcli.modules import ACTIVATIONS, ActivationBlend, make_activation
from morphcli.morphs.result import Change, MorphResult
from morphcli.morphs.runner import CheckOptions, Grown, as_graph_module, run_api
from morphcli.rules import activations as act_rules
from morphcli.rules.registry import supported

# (old, new) pairs an exact swap turns into a PReLU whose slope starts at the old slope.
_PRELU_FROM = {("relu", "leaky_relu"), ("relu", "prelu"), ("leaky_relu", "prelu")}


@dataclass(frozen=True)
class SwapOptions:
    """Swap the activation ``layer`` (module path, ``path@N`` or functional node) to ``to``."""

    layer: str
    to: str
    approx: bool = False

    def __post_init__(self) -> None:
        if self.to not in ACTIVATIONS:
            raise InputError(f"unknown --to {self.to!r}; choose from "
                             f"{', '.join(sorted(ACTIVATIONS))}")


def swap(
    model: nn.Module | str | Path,
    layer: str,
    to: str,
    *,
    approx: bool = False,
    seed: int = 0,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    check: CheckOptions | None = None,
    optimizer: Optimizer | None = None,
) -> Grown:
    """Swap activation ``layer`` to ``to``; returns the new model and a checked result
    (with ``optimizer``: the new model, that optimizer carried over, the result).

    >>> new, result = morphcli.swap("sample_models/cnn.pt", "relu", to="gelu")
    >>> [c.name for c in result.changes if c.action == "replaced"][:2]
    ['relu@1', 'relu@2']
    """
    gm = as_graph_module(model, input_shapes)
    return run_api(swap_graph, model, gm, SwapOptions(layer, to, approx),
                   check or CheckOptions(seed=seed), optimizer)


def swap_graph(gm: fx.GraphModule, options: SwapOptions) -> tuple[fx.GraphModule, MorphResult]:
    """The morph proper: ``gm`` is left unchanged; the result shares its untouched layers."""
    sites = find_layer(gm, options.layer)
    old, old_kwargs = _spec(sites[0])  # the sites of one module share its spec
    if old == options.to:
        raise InputError(f"{options.layer} is already a {old} activation; choose another --to")
    new = clone_structure(gm)
    result = MorphResult("swap", options.layer, exact=not options.approx)
    nodes = {n.name: n for n in new.graph.nodes}
    first = sites[0]
    state = first.module.state_dict() if first.module is not None else {}
    module, label, short, note = _replacement(old, old_kwargs, state, options)
    module.to(**_placement(gm, first)).train(gm.training)

    if first.module is not None:
        path = str(first.node.target)
        calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == path)
        if len(sites) == calls:  # every site: the new module takes the old one's place
            replace_module(new, path, module)
            site_path = path
            for key, t in first.module.state_dict().items():
                if key not in module.state_dict():
                    result.changes.append(Change("replaced", f"{path}.{key}", list(t.shape), None,
                                                 "carried into the new module"))
            if calls > 1:
                result.notes.append(f"{path} is called at {calls} sites; all now share the new "
                                    f"module, as they shared the old one (name one with "
                                    f"{path}@N to swap only that site)")
        else:  # one site of several: the others keep the old module
            site_path = free_name(new, f"{path}_swap")
            new.add_submodule(site_path, module)
            nodes[first.node.name].target = site_path
            result.notes.append(f"only {first.name} is swapped (as {site_path}); the other "
                                f"{calls - 1} site(s) of {path} keep the original")
    else:
        site_path = free_name(new, f"{first.node.name}_swap")
        new.add_submodule(site_path, module)
        _to_module_call(new, nodes[first.node.name], site_path)
    for site in sites:
        result.changes.append(Change("replaced", site.name, site.type_name, label, short))
    for key, t in module.state_dict().items():
        result.changes.append(Change("added", f"{site_path}.{key}", None, list(t.shape)))
    result.notes.append(note)
    return finish(new), result


def can_swap(layer: Layer) -> bool:
    """Whether ``swap`` accepts this call site (for ``morph inspect``)."""
    return act_rules.activation_spec(layer.node, layer.module) is not None


def _spec(site: Layer) -> tuple[str, dict[str, Any]]:
    spec = act_rules.activation_spec(site.node, site.module)
    if spec is not None:
        return spec
    if site.module is not None:
        raise UnsupportedMorphError(
            f"{site.name} is a {site.type_name}, not an activation swap knows; supported: "
            f"{', '.join(supported('activation'))}")
    raise UnsupportedMorphError(
        f"{site.name} calls {site.type_name}, which swap cannot rebuild as a module (not a "
        f"known activation, or its arguments are not constants); supported functions: "
        f"{', '.join(act_rules.functional_names())}")


def _replacement(old: str, old_kwargs: dict[str, Any], state: dict[str, torch.Tensor],
                 options: SwapOptions) -> tuple[nn.Module, str, str, str]:
    """(module, label and short note for the plan, full note) for the new activation."""
    to = options.to
    if options.approx:
        module = make_activation(to)
        return module, type(module).__name__, "approximate", (
            f"approximate: plain {type(module).__name__} replaces {old}; the function changes "
            "by the difference the check measures")
    if (old, to) in _PRELU_FROM:
        slope = float(old_kwargs.get("negative_slope", 0.0))
        return nn.PReLU(init=slope), "PReLU", f"slope starts at {slope:g}", (
            f"PReLU with its slope starting at {slope:g}: equal to {old}, the slope is learnable")
    blend = ActivationBlend(old, to, old_kwargs)
    blend.old.load_state_dict(state)  # PReLU slopes carried over
    return blend, f"ActivationBlend({old} -> {to})", "t = 0: equals the old activation", (
        f"ActivationBlend (1 - t)*{old}(x) + t*{to}(x) with learnable t = 0: equal to {old}; "
        f"training can move t towards 1")


def _to_module_call(gm: fx.GraphModule, node: fx.Node, path: str) -> None:
    """Replace a functional activation node by a call of the module at ``path``."""
    x = act_rules.activation_input(node)
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, (x,))
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)


def _placement(gm: fx.GraphModule, site: Layer) -> dict[str, Any]:
    """Device and floating dtype of the site's output, for the new module's parameters."""
    meta = site.node.meta.get("tensor_meta")
    out: dict[str, Any] = {}
    if meta is not None and getattr(meta, "dtype", None) is not None \
            and meta.dtype.is_floating_point:
        out["dtype"] = meta.dtype
    for source in (site.module, gm):
        for p in (source.parameters() if source is not None else ()):
            out["device"] = p.device
            return out
    return out
