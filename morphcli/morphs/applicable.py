"""Which morphs apply to a layer, as ``morph inspect`` reports them.

widen is decided by the real coupling analysis (so a layer whose units would reach the model's
output is not listed); deepen and swap by the rules their commands use.
"""

from __future__ import annotations

import torch.fx as fx

from morphcli.errors import MorphError
from morphcli.graph.edit import tensor_shape
from morphcli.graph.layers import Layer
from morphcli.rules import registry


def applicable_morphs(gm: fx.GraphModule, layer: Layer) -> list[str]:
    out = []
    if _can_deepen(layer):
        out.append("deepen")
    if _can_widen(gm, layer):
        out.append("widen")
    if _can_swap(layer):
        out.append("swap")
    return out


def _can_deepen(layer: Layer) -> bool:
    meta = layer.node.meta.get("tensor_meta")
    return (meta is not None and hasattr(meta, "shape") and len(meta.shape) >= 2
            and meta.dtype.is_floating_point)


def _can_widen(gm: fx.GraphModule, layer: Layer) -> bool:
    m = layer.module
    if m is None or registry.lookup("widen_out", m) is None or tensor_shape(layer.node) is None:
        return False
    channelwise = registry.lookup("channelwise", m)
    if channelwise is not None and channelwise.applies(m):
        return False
    from morphcli.morphs.coupling import analyse

    try:
        analyse(gm, layer.node)
    except MorphError:
        return False
    return True


def _can_swap(layer: Layer) -> bool:
    from morphcli.morphs import swap

    checker = getattr(swap, "can_swap", None)
    if checker is not None:
        return bool(checker(layer))
    return layer.module is not None and registry.lookup("activation", layer.module) is not None


