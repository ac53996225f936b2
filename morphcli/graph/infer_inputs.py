"""Decide a model's input specs: given shapes, stored ones, or inferred from the first layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch.fx as fx
from torch import nn

from morphcli.errors import InputError
from morphcli.graph.inputs import InputSpec


def resolve_inputs(
    module: nn.Module, graph: fx.Graph, shapes: Sequence[tuple[int, ...]] | None
) -> tuple[InputSpec, ...]:
    """Build one InputSpec per placeholder; integer dtype where the input feeds an Embedding."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if shapes:
        if len(shapes) != len(placeholders):
            raise InputError(
                f"the model takes {len(placeholders)} input(s) but {len(shapes)} "
                "--input-shape value(s) were given"
            )
        return tuple(_spec_for(module, p, s) for p, s in zip(placeholders, shapes, strict=True))
    return tuple(_inferred(module, p) for p in placeholders)


def _first_layer(module: nn.Module, node: fx.Node) -> nn.Module | None:
    """The layer that first consumes ``node``, looking through flatten and dropout."""
    for user in node.users:
        if user.op == "call_module":
            layer = module.get_submodule(str(user.target))
            if isinstance(layer, (nn.Flatten, nn.Dropout, nn.Identity)):
                return _first_layer(module, user)
            return layer
    return None


def _spec_for(module: nn.Module, node: fx.Node, shape: tuple[int, ...]) -> InputSpec:
    layer = _first_layer(module, node)
    if isinstance(layer, nn.Embedding):
        return InputSpec(shape, "int64", layer.num_embeddings)
    return InputSpec(shape)


def _inferred(module: nn.Module, node: fx.Node) -> InputSpec:
    layer = _first_layer(module, node)
    direct = layer is not None and any(
        u.op == "call_module" and module.get_submodule(str(u.target)) is layer for u in node.users
    )
    if isinstance(layer, nn.Linear) and direct:
        return InputSpec((1, layer.in_features))
    what = (f"its first layer is {type(layer).__name__}" if layer is not None
            else "no layer reads it")
    raise InputError(
        f"cannot infer the shape of input {node.name!r} ({what}); "
        "pass --input-shape, e.g. --input-shape 1,3,32,32"
    )
