"""Layers the traced graph does not use, carried unchanged from input to output.

A GraphModule keeps only the submodules its graph calls, so tracing drops what the forward
pass skips in eval mode (googlenet's and inception_v3's auxiliary classifiers: 6.4 M of
googlenet's 13.0 M parameters). Such layers are kept in ``gm.meta[CARRIED_META]`` (path ->
layer): graph edits copy the meta, descriptions list them beside the graph's layers, and the
written .pt / .safetensors file holds their tensors, so nothing of the input is lost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

CARRIED_META = "morphcli.carried"
DROPPED_META = "morphcli.dropped"  # state keys neither the graph nor a carried layer holds


def unused_layers(module: nn.Module, gm: fx.GraphModule,
                  is_leaf: Callable[[nn.Module, str], bool]) -> dict[str, nn.Module]:
    """The leaf layers of ``module`` (as the tracer sees them) holding tensors that ``gm``
    does not hold, by path."""
    used = {id(m) for m in gm.modules()}
    held = {id(t) for t in [*gm.parameters(), *gm.buffers()]}
    out: dict[str, nn.Module] = {}
    covered: list[str] = []  # paths under which every layer is accounted for
    for path, m in module.named_modules():
        if not path or any(path.startswith(p + ".") for p in covered):
            continue
        if id(m) in used and not _container(m):
            covered.append(path)
            continue
        if _container(m) or not is_leaf(m, path):
            continue
        covered.append(path)
        own = [*m.parameters(), *m.buffers()]
        if own and not all(id(t) in held for t in own):
            out[path] = m
    return out


def _container(m: nn.Module) -> bool:
    return type(m) in (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict)


def attach(module: nn.Module, gm: fx.GraphModule,
           is_leaf: Callable[[nn.Module, str], bool]) -> None:
    """Record on ``gm`` what of ``module`` its graph does not use (see the module docstring)."""
    layers = unused_layers(module, gm, is_leaf)
    if layers:
        gm.meta[CARRIED_META] = layers
    kept = {*gm.state_dict(), *carried_state(gm)}
    dropped = [k for k in module.state_dict() if k not in kept]
    if dropped:
        gm.meta[DROPPED_META] = dropped


def carried(gm: nn.Module) -> dict[str, nn.Module]:
    meta = getattr(gm, "meta", None)
    value = meta.get(CARRIED_META) if isinstance(meta, dict) else None
    return dict(value) if value else {}


def carried_state(gm: nn.Module) -> dict[str, torch.Tensor]:
    """The carried layers' state_dict entries, under their full keys."""
    return {f"{path}.{k}": t for path, m in carried(gm).items()
            for k, t in m.state_dict().items()}


def note(gm: nn.Module) -> str | None:
    """A line for the morph's notes naming the carried layers (None when there are none)."""
    layers = carried(gm)
    dropped = list(gm.meta.get(DROPPED_META, ())) if isinstance(gm, fx.GraphModule) else []
    lost = (f"; {len(dropped)} tensors held outside any layer and unused by the graph are not "
            f"written: {', '.join(dropped[:4])}{' ...' if len(dropped) > 4 else ''}"
            if dropped else "")
    if not layers:
        return lost[2:] or None
    n = sum(t.numel() for m in layers.values() for t in m.parameters())
    roots = sorted({p.split(".")[0] for p in layers})
    shown = ", ".join(roots[:6]) + (" ..." if len(roots) > 6 else "")
    return (f"{len(layers)} layers under {shown} ({n:,} parameters) are not used by the traced "
            "graph in eval mode; they are carried unchanged into .pt and .safetensors outputs "
            f"(a .pt2 or .onnx export holds only what the graph computes){lost}")
