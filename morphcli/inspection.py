"""``morph inspect`` as data: every layer with its shapes, parameters and applicable morphs."""

from __future__ import annotations

from typing import Any

import torch.fx as fx

from morphcli.graph.inputs import INPUTS_META
from morphcli.graph.layers import layers

SCHEMA = "morphcli.inspect/1"


def summarize(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON document ``morph inspect --json`` prints (schema documented in README)."""
    from morphcli.morphs.applicable import applicable_morphs

    rows = []
    for layer in layers(gm):
        params = sum(p.numel() for p in layer.module.parameters()) if layer.module else 0
        rows.append({
            "name": layer.name,
            "type": layer.type_name,
            "op": layer.node.op,
            "input_shapes": [_shape(a) for a in layer.node.all_input_nodes],
            "output_shapes": _out_shapes(layer.node),
            "params": params,
            "morphs": applicable_morphs(gm, layer),
        })
    specs = gm.meta.get(INPUTS_META) or ()
    all_params = list(gm.parameters())
    tensors = [*all_params, *gm.buffers()]
    return {
        "schema": SCHEMA,
        "inputs": [s.to_json() for s in specs],
        "outputs": _out_shapes(next(n for n in gm.graph.nodes if n.op == "output")),
        "layers": rows,
        "totals": {
            "layers": sum(1 for r in rows if r["op"] == "call_module"),
            "ops": sum(1 for r in rows if r["op"] != "call_module"),
            "params": sum(p.numel() for p in all_params),
            "trainable_params": sum(p.numel() for p in all_params if p.requires_grad),
            "bytes": sum(t.numel() * t.element_size() for t in tensors),
        },
    }


def _shape(node: fx.Node) -> list[int] | None:
    meta = node.meta.get("tensor_meta")
    return list(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _out_shapes(node: fx.Node) -> list[list[int] | None]:
    if node.op == "output":
        return [_shape(a) for a in node.all_input_nodes]
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return [None]
    if hasattr(meta, "shape"):
        return [list(meta.shape)]
    return [list(m.shape) for m in _flat_meta(meta)]


def _flat_meta(meta: Any) -> list[Any]:
    if hasattr(meta, "shape"):
        return [meta]
    if isinstance(meta, (list, tuple)):
        return [m for x in meta for m in _flat_meta(x)]
    return []


