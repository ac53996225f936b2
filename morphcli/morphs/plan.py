"""The resize plan: what a morph did to the model's tensors, as a record apart from the graph.

For each layer a widen resizes: its path, the rule that resized it and the channel map of its
outputs, inputs or channels (which old unit every new unit copies, which units are new, whether
copies are divided); per-unit tensors the graph reads directly (layer scales); kernel growth;
and, filled after any morph by comparing the models' states, the tensors added, removed and
replaced by values no map expresses (a decomposed layer, a swapped activation's parameters).

A widen builds the plan first; ``resize_layer`` is the one function that applies an entry, to
the layer's weights and, through ``replay``, to tensors shaped like its parameters: that is how
the optimizer state (Adam moments, momentum buffers) follows the weights (``io.training``). New
units get zero state, copied units copy it, divided units are divided like the weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from morphcli.rules.channel_map import ZERO, ChannelMap

if TYPE_CHECKING:
    from morphcli.rules.linear_layers import ResizeContext

_JSON_UNITS = 4096  # longer maps are summarised in --json (their counts stay exact)


@dataclass
class LayerResize:
    """One layer resized by a rule: ``kind`` is widen_out / widen_in (a producer or consumer,
    possibly both), channelwise or kernel."""

    path: str
    kind: str
    old: nn.Module  # the layer before the morph (shared with the original model)
    rule: Any = None
    out_map: ChannelMap | None = None
    in_map: ChannelMap | None = None
    kernel: int | None = None
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # constructor attributes

    @property
    def replayable(self) -> bool:
        """Rules of morphcli's own resize only through the context, so their state can follow;
        a rule registered from outside may draw its own random values."""
        module = getattr(self.rule, "__module__", "") or ""
        return self.kind == "kernel" or module.startswith("morphcli.")


@dataclass
class ResizePlan:
    """What a morph did to the model's tensors (``MorphResult.plan``; ``to_json`` is what
    ``--dry-run --json`` prints as ``resize_plan``)."""

    init: str = "zero"
    mirror: bool = False  # new units copy their source's incoming weights (LayerNorm)
    layers: list[LayerResize] = field(default_factory=list)
    attrs: list[tuple[str, int, ChannelMap]] = field(default_factory=list)  # key, axis, map
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # new values that no map expresses
    notes: list[str] = field(default_factory=list)

    def mapped(self) -> set[str]:
        """State keys whose new values the plan derives from their old ones, by a map."""
        keys = {key for key, _, _ in self.attrs}
        for layer in self.layers:
            if layer.replayable:
                keys |= {f"{layer.path}.{n}" for n, _ in layer.old.named_parameters()}
                keys |= {f"{layer.path}.{n}" for n, _ in layer.old.named_buffers()}
        return keys

    def complete(self, old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> None:
        """Fill added/removed/replaced from the two models' states (after the morph)."""
        mapped = self.mapped()
        self.added = [k for k in new if k not in old]
        self.removed = [k for k in old if k not in new]
        self.replaced = [k for k in new if k in old and k not in mapped and differs(
            old[k], new[k])]

    def to_json(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "layers": [_layer_json(layer, self.init == "copy") for layer in self.layers],
            "tensors": [{"key": k, "axis": a, "map": _map_json(m, False)}
                        for k, a, m in self.attrs],
            "added": list(self.added),
            "removed": list(self.removed),
            "replaced": list(self.replaced),
            "notes": list(self.notes),
        }


def resize_layer(entry: LayerResize, layer: nn.Module, ctx: ResizeContext) -> nn.Module:
    """The one place a plan's entry is applied: to the layer's weights (``ctx`` of the morph)
    or, through ``replay``, to a probe holding optimizer state (``ctx.state``)."""
    from morphcli.rules.linear_layers import grow_kernel

    if entry.kind == "kernel":
        assert entry.kernel is not None
        return grow_kernel(layer, entry.kernel)
    if entry.kind == "channelwise":
        return entry.rule.resize(layer, entry.out_map, ctx)
    return entry.rule.resize(layer, entry.out_map, entry.in_map, ctx)


def replay(plan: ResizePlan, layer: LayerResize,
           tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``layer``'s resize applied to ``tensors`` (parameter name -> a tensor shaped like that
    parameter, zeros where missing): the state of each of its resized parameters."""
    from morphcli.rules.linear_layers import ResizeContext

    with torch.no_grad():
        probe = copy.deepcopy(layer.old)
        for name, param in list(probe.named_parameters()):
            value = tensors.get(name)
            _set(probe, name, value.detach().to(param.dtype) if value is not None
                 else torch.zeros_like(param))
        ctx = ResizeContext(plan.init, torch.Generator().manual_seed(0), 0.0,
                            mirror=plan.mirror, state=True)
        out = resize_layer(layer, probe, ctx)
        grown = {n: p.detach() for n, p in out.named_parameters()}
        if layer.kind == "channelwise" and plan.init == ZERO and not plan.mirror and \
                not isinstance(layer.old, nn.MultiheadAttention):  # (it zeroes its own)
            # Per-channel parameters of new units borrow their source's values, but they are
            # new units: their state starts at zero.
            assert layer.out_map is not None
            fresh = layer.out_map.new.nonzero().flatten()
            for t in grown.values():
                if t.dim() and t.shape[0] == layer.out_map.width:
                    t.index_fill_(0, fresh, 0)
        return grown


def constructor_changes(old: nn.Module, new: nn.Module) -> dict[str, tuple[Any, Any]]:
    """The layer's plain attributes (sizes, groups, padding) that the resize changed."""
    out = {}
    for name, before in vars(old).items():
        after = vars(new).get(name)
        if not name.startswith("_") and isinstance(before, (int, tuple)) and after != before:
            out[name] = (before, after)
    return out


def _set(module: nn.Module, name: str, value: torch.Tensor) -> None:
    *parents, leaf = name.split(".")
    owner = module.get_submodule(".".join(parents)) if parents else module
    owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Another shape, dtype or value (the same storage is the same tensor, unread)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return True
    return a.data_ptr() != b.data_ptr() and not torch.equal(a, b)


def _layer_json(layer: LayerResize, copy_init: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"layer": layer.path, "resize": layer.kind,
                           "type": type(layer.old).__name__}
    divided = copy_init and layer.kind != "channelwise"  # Net2Net divides consumers' copies
    if layer.out_map is not None:
        out["outputs" if layer.kind != "channelwise" else "channels"] = _map_json(
            layer.out_map, False)
    if layer.in_map is not None:
        out["inputs"] = _map_json(layer.in_map, divided)
    if layer.kernel is not None:
        out["kernel"] = layer.kernel
    if layer.changes:
        out["constructor"] = {k: [a, b] for k, (a, b) in layer.changes.items()}
    return out


def _map_json(cmap: ChannelMap, divided: bool) -> dict[str, Any]:
    """Old and new width, the source of every unit and which are new; long maps summarised."""
    doc: dict[str, Any] = {"old_width": cmap.old_width, "width": cmap.width,
                           "new_units": int(cmap.new.sum())}
    if divided:
        doc["divided_by_copy_count"] = True
    if cmap.width <= _JSON_UNITS:
        doc["src"] = cmap.src.tolist()
        doc["new"] = cmap.new.nonzero().flatten().tolist()
    return doc
