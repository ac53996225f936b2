"""Editing a GraphModule without touching the original: the original is kept for the check."""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from morphcli.graph.inputs import INPUTS_META
from morphcli.graph.shapes import snapshot
from morphcli.graph.trace import propagate_shapes, refresh_shapes

# Where clone_structure leaves the original's node signatures for finish (popped there).
_BEFORE = "morphcli.before_edit"


def clone_structure(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph that shares every layer object with ``gm``.

    Unchanged parameters are shared, not copied; a morph must replace a layer it changes
    (``replace_module``), never modify it in place.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, env)
    graph.output(output).meta = dict(gm.graph.output_node().meta)  # graph_copy skips it
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    new.meta.update(gm.meta)
    new.meta[_BEFORE] = snapshot(gm)
    return new


def replace_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` in ``gm`` only (containers on the path are ``gm``'s own)."""
    *parents, leaf = path.split(".")
    owner: nn.Module = gm
    for part in parents:
        owner = getattr(owner, part)
    setattr(owner, leaf, module)


def free_name(gm: fx.GraphModule, base: str) -> str:
    """``base`` if no attribute has that path yet, else ``base_2``, ``base_3``, ..."""
    taken = {name for name, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()}
    taken |= {n for n, _ in gm.named_buffers()}
    name, i = base, 2
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    """Validate the edited graph, regenerate its code and refresh shapes."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.eval()  # new layers are built in train mode; the result is run and checked in eval mode
    before = gm.meta.pop(_BEFORE, None)
    if gm.meta.get(INPUTS_META):
        # Only the edited part needs new shapes: a full pass costs a forward of the whole model.
        if before is not None:
            refresh_shapes(gm, before)
        else:
            propagate_shapes(gm)
    return gm


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
