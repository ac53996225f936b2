"""``widen``: give a layer more output units and update every layer its units reach.

Net2WiderNet (``init="copy"``): new units copy random existing ones and consumers divide the
copies' weights by the replication count. Network Morphism (``init="zero"``, the default): new
units get random incoming weights at the existing scale and zero outgoing weights, which keeps
the function exactly and lets training break the symmetry without noise.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd
from torch.optim import Optimizer

from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.graph.edit import clone_structure, finish, replace_module, tensor_shape
from morphcli.graph.layers import find_one_layer
from morphcli.morphs import coupling_split, limits, split_growth
from morphcli.morphs.coupling import analyse
from morphcli.morphs.coupling_plan import Coupling, Group, assign_maps
from morphcli.morphs.coupling_sizes import fold_size_reads, heads_root
from morphcli.morphs.plan import LayerResize, ResizePlan, constructor_changes, resize_layer
from morphcli.morphs.result import Change, MorphResult
from morphcli.morphs.runner import CheckOptions, Grown, as_graph_module, run_api
from morphcli.rules import registry
from morphcli.rules.channel_map import COPY, ZERO, ChannelMap, follow
from morphcli.rules.linear_layers import ResizeContext

INITS = (ZERO, COPY)


@dataclass(frozen=True)
class WidenOptions:
    layer: str
    to: int | None = None
    by: int | None = None
    factor: float | None = None
    init: str = ZERO
    noise: float = 0.0
    kernel: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        limits.check_widen_numbers(self.to, self.by, self.factor, self.noise, self.kernel,
                                   self.seed)


def widen(
    model: nn.Module | str | Path,
    layer: str,
    *,
    to: int | None = None,
    by: int | None = None,
    factor: float | None = None,
    init: str = ZERO,
    noise: float = 0.0,
    kernel: int | None = None,
    seed: int = 0,
    check: bool | CheckOptions = True,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    optimizer: Optimizer | None = None,
) -> Grown:
    """Widen ``layer`` (and everything coupled to it); returns the new model and the record
    (with ``optimizer``: the new model, that optimizer carried over, the record).

    >>> wide, result = morphcli.widen("sample_models/cnn.pt", "conv2", factor=2)
    >>> result.check.equivalent
    True
    """
    gm = as_graph_module(model, input_shapes)
    options = WidenOptions(layer, to, by, factor, init, noise, kernel, seed)
    checking = (check if isinstance(check, CheckOptions)
                else CheckOptions(enabled=bool(check), seed=seed))
    return run_api(widen_graph, model, gm, options, checking, optimizer)


def widen_graph(gm: fx.GraphModule, opts: WidenOptions) -> tuple[fx.GraphModule, MorphResult]:
    """The morph itself: ``gm`` is left untouched; the result shares every unchanged layer."""
    if opts.init not in INITS:
        raise InputError(f"unknown --init {opts.init!r} for widen; choose {' or '.join(INITS)}")
    if opts.noise < 0:
        raise InputError("--noise must be zero or positive")
    layer = find_one_layer(gm, opts.layer)
    if layer.module is None:
        raise UnsupportedMorphError(
            f"{opts.layer} is a function call ({layer.type_name}), not a layer with weights; "
            f"widen applies to {', '.join(registry.supported('widen_out'))}")
    depthwise = registry.lookup("channelwise", layer.module)
    if depthwise is not None and registry.lookup("widen_out", layer.module) is not None and \
            depthwise.applies(layer.module):
        raise UnsupportedMorphError(
            f"{opts.layer} is a depthwise convolution: its channels are its input's; widen the "
            "layer that feeds it and it grows with it")
    new = clone_structure(gm)
    target = next(n for n in new.graph.nodes if n.name == layer.node.name)
    result = MorphResult("widen", layer.name, exact=opts.noise == 0)
    sizing = [x for x in (opts.to, opts.by, opts.factor) if x is not None]
    if len(sizing) > 1:
        raise InputError("give only one of --to, --by and --factor")
    if not sizing and opts.kernel is None:
        raise InputError("say how much wider: --to N, --by N or --factor F (or --kernel K)")
    if sizing:
        _widen_units(new, target, opts, result)
    if opts.kernel is not None:
        old = new.get_submodule(str(target.target))
        _check_kernel_size(target, old, opts.kernel)
        entry = LayerResize(str(target.target), "kernel", old, kernel=opts.kernel)
        grown = resize_layer(entry, old, ResizeContext(opts.init, torch.Generator()))
        assert isinstance(old, _ConvNd) and isinstance(grown, _ConvNd)  # (or refused)
        replace_module(new, entry.path, grown)
        entry.changes = constructor_changes(old, grown)
        result.plan.layers.append(entry)
        result.changes.append(Change("resized", f"{target.target}.weight",
                                     list(old.weight.shape), list(grown.weight.shape),
                                     f"kernel {tuple(old.kernel_size)} -> "
                                     f"{tuple(grown.kernel_size)}, "
                                     f"padding {tuple(old.padding)} -> {tuple(grown.padding)}"))
    if opts.noise:
        result.notes.append(f"noise (std {opts.noise:g}) was added to the new units' weights only; "
                            "the morph is approximate")
    return finish(new), result


def _new_width(old: int, opts: WidenOptions) -> int:
    if opts.to is not None:
        if opts.to <= old:
            raise InputError(f"--to {opts.to} must be larger than the current width {old}")
        return opts.to
    if opts.by is not None:
        if opts.by < 1:
            raise InputError("--by must be at least 1")
        width = old + opts.by
    else:
        assert opts.factor is not None
        width = round(old * opts.factor)
        if opts.factor <= 1 or width <= old:
            raise InputError(f"--factor {opts.factor:g} does not add a unit to width {old}")
    if width > limits.MAX_UNITS:
        option = f"--by {opts.by}" if opts.by is not None else f"--factor {opts.factor:g}"
        raise InputError(f"{option} would make the layer {width:,} units wide (from {old:,}); "
                         f"a layer may have at most {limits.MAX_UNITS:,}")
    return width


def _check_new_size(gm: fx.GraphModule, plan: Coupling, target: fx.Node, old: int,
                    width: int) -> None:
    """The layers a widen resizes grow about ``width / old`` times: refuse before allocating
    when that is more weights than one morph may create (a huge --to on a big convolution)."""
    paths = dict.fromkeys([*(str(n.target) for n in plan.producers),
                           *(str(n.target) for n, _ in plan.consumers),
                           *(str(n.target) for n in plan.channelwise)])
    now = sum(p.numel() for path in paths for p in gm.get_submodule(path).parameters())
    limits.check_new_elements(f"widening {target.target} to {width:,} units", now * width // old)


def _check_kernel_size(target: fx.Node, conv: nn.Module, kernel: int) -> None:
    weight = getattr(conv, "weight", None)
    sizes = getattr(conv, "kernel_size", None)
    if isinstance(weight, torch.Tensor) and isinstance(sizes, tuple):
        taps = math.prod(sizes)
        limits.check_new_elements(f"{target.target} with a {kernel}-wide kernel",
                                  weight.numel() // max(taps, 1) * kernel ** len(sizes))


def _widen_units(gm: fx.GraphModule, target: fx.Node, opts: WidenOptions,
                 result: MorphResult) -> None:
    plan = analyse(gm, target)
    dim = plan.tensors[target][0]
    old = (tensor_shape(target) or ())[dim]
    width = _new_width(old, opts)
    _check_new_size(gm, plan, target, old, width)
    gen = torch.Generator().manual_seed(opts.seed)
    group = plan.tensors[target][1]
    blocks = group.blocks
    if group.heads is not None:
        root = _whole_heads(target, group, old, width, opts, result, gen)
    elif group.uniform is not None:  # (its multiple of the old width is one of the blocks too)
        root = _replicated(target, group.uniform, old, width, blocks, opts, result)
    elif blocks > 1 and width % blocks:
        raise UnsupportedMorphError(
            f"cannot widen {target.target} to {width}: its units meet grouped convolutions "
            f"({blocks} groups), so the new width must be a multiple of {blocks} "
            f"(e.g. --to {(width // blocks + 1) * blocks})")
    elif blocks > 1:
        root = ChannelMap.grow_blocks(old, width, blocks, gen)
    else:
        root = ChannelMap.grow(old, width, gen)
    if plan.segments:  # pieces of a split take ranges of the units: each range grows apart
        root = split_growth.root_map(plan, old, width, blocks, group.uniform is not None, gen)
    for (lo, hi), (_, product) in zip(plan.frozen_ranges, plan.frozen, strict=True):
        result.notes.append(f"units {lo}:{hi} keep their width: product {product.name!r} sums "
                            "over them (as over a query's and a key's features)")
    if blocks > 1:
        result.notes.append(f"new units are added inside each of the {blocks} channel groups")
    assign_maps(plan, target, root)
    ctx = ResizeContext(opts.init, gen, opts.noise, mirror=group.uniform is not None)
    record = result.plan
    record.init, record.mirror = opts.init, ctx.mirror
    for entry in _resized_layers(gm, plan):  # the plan first, then applied to the weights
        new_module = resize_layer(entry, entry.old, ctx)
        replace_module(gm, entry.path, new_module)
        entry.changes = constructor_changes(entry.old, new_module)
        record.layers.append(entry)
        result.changes.extend(_diff(entry.path, entry.old, new_module))
    fold_size_reads(plan.size_reads)
    result.changes.extend(_rewrite_reshapes(plan))
    result.changes.extend(coupling_split.rewrite(plan))
    result.changes.extend(_rewrite_norm_shapes(plan))
    result.changes.extend(_resize_attrs(gm, plan, record))
    coupled = [str(p.target) for p in plan.producers if p is not target]
    if coupled:
        result.notes.append(f"widened together with {', '.join(coupled)} (their outputs meet "
                            f"{str(target.target)}'s in an elementwise op)")
    result.notes.append(f"{target.target}: {old} -> {width} units, init {opts.init}")


def _replicated(target: fx.Node, norm: fx.Node, old: int, width: int, blocks: int,
                opts: WidenOptions, result: MorphResult) -> ChannelMap:
    """The map for units a norm (or a mean) reads statistics over: every unit copied equally
    often."""
    kind = _statistics_kind(target.graph.owning_module, norm)
    if width % old:
        raise UnsupportedMorphError(
            f"cannot widen {target.target} to {width}: its units reach {kind} (node "
            f"{norm.name!r}), whose statistics over them stay the same only when every unit "
            f"is copied equally often, so the new width must be a multiple of {old} "
            f"(e.g. --factor 2)")
    how = ("new units copy their source's incoming weights and have zero outgoing weights"
           if opts.init == ZERO else "consumers divide each unit's weights by its copy count")
    result.notes.append(f"every unit is copied {width // old} times because {kind} (node "
                        f"{norm.name!r}) reads statistics over them; {how}")
    return ChannelMap.replicate(old, width, blocks)


def _statistics_kind(gm: Any, node: fx.Node) -> str:
    """'a LayerNorm', 'a GroupNorm' or 'a mean' (of the op ``Group.uniform`` names)."""
    if node.op == "call_module" and gm is not None:
        return f"a {type(gm.get_submodule(str(node.target))).__name__}"
    named = {F.layer_norm: "LayerNorm", F.group_norm: "GroupNorm"}
    name = node.target if isinstance(node.target, str) else named.get(
        node.target, getattr(node.target, "__name__", "op"))
    return f"a {name}"


def _whole_heads(target: fx.Node, group: Group, old: int, width: int, opts: WidenOptions,
                 result: MorphResult, gen: torch.Generator) -> ChannelMap:
    """The map for units a reshape splits into heads (``coupling_sizes.tiled``)."""
    assert group.heads is not None
    outer, inner, where = group.heads
    step = outer * inner
    # Tiled alike in every outer block, copies stay in their block: a grouped convolution
    # whose groups are whole outer blocks (ResNeSt's radix) keeps its groups.
    crossed = outer % group.blocks != 0
    if width % step or crossed:
        why = (f"its units also meet a grouped convolution ({group.blocks} groups) whose "
               f"groups cut across those {outer} blocks" if crossed else
               f"the new width must be a multiple of {step} (e.g. --to "
               f"{(width // step + 1) * step})")
        raise UnsupportedMorphError(
            f"cannot widen {target.target} to {width}: node {where.name!r} splits its units "
            f"into {outer} x heads x {inner}, so new units come as whole heads, and {why}")
    if group.uniform is not None:
        _replicated(target, group.uniform, old, width, 1, opts, result)  # (refuses or notes)
    if inner == 1:  # (SKNet's paths x channels: the channels are the units)
        result.notes.append(f"new units come alike in each of the {outer} blocks node "
                            f"{where.name!r} splits them into: {old // step} -> {width // step} "
                            "units per block")
    else:
        layout = f"{outer} x heads x {inner}" if outer > 1 else f"heads of {inner}"
        result.notes.append(f"new units come as whole heads of {inner} (node {where.name!r} "
                            f"splits them into {layout}): {old // step} -> {width // step} heads")
    return heads_root(old, width, outer, inner, group.uniform is not None, gen)


def _resized_layers(gm: fx.GraphModule, plan: Coupling) -> Iterator[LayerResize]:
    """The resize plan's entry of every layer whose weights change."""
    out_maps = {str(n.target): plan.map_of(n) for n in plan.producers}
    in_maps: dict[str, ChannelMap] = {}
    for node, inp in plan.consumers:
        in_maps[str(node.target)] = plan.map_of(inp)
    cw_maps = {str(n.target): plan.map_of(_node(n.args[0])) for n in plan.channelwise}
    for path in dict.fromkeys([*out_maps, *in_maps, *cw_maps]):
        old = gm.get_submodule(path)
        if path in cw_maps:
            rule = _rule("channelwise", old)
            yield LayerResize(path, "channelwise", old, rule, out_map=cw_maps[path])
            continue
        kind = "widen_out" if path in out_maps else "widen_in"
        rule = _rule(kind, old)
        yield LayerResize(path, kind, old, rule, out_maps.get(path), in_maps.get(path))


def _rule(kind: str, layer: nn.Module) -> Any:
    rule = registry.lookup(kind, layer)
    assert rule is not None  # the walk records only layers that have a rule of this kind
    return rule


def _node(arg: Any) -> fx.Node:
    assert isinstance(arg, fx.Node)  # a channelwise layer's input is a tensor of the graph
    return arg


def _diff(path: str, old: nn.Module, new: nn.Module) -> list[Change]:
    changes = []
    old_tensors = _tensors_of(old)
    new_tensors = _tensors_of(new)
    for name, t in new_tensors.items():
        before = old_tensors.get(name)
        if before is None or before.shape != t.shape:
            changes.append(Change("resized", f"{path}.{name}",
                                  list(before.shape) if before is not None else None,
                                  list(t.shape)))
    return changes


def _tensors_of(m: nn.Module) -> dict[str, torch.Tensor]:
    """A layer's tensors, with those of its own sub-layers (attention's out_proj)."""
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


def _resize_attrs(gm: fx.GraphModule, plan: Coupling, record: ResizePlan) -> list[Change]:
    """Per-unit tensors read directly by the graph (layer scales) follow the map."""
    changes = []
    for node in plan.attrs:
        path = str(node.target)
        *parents, leaf = path.split(".")
        owner = gm.get_submodule(".".join(parents)) if parents else gm
        old = getattr(owner, leaf)
        axis, cmap = plan.tensors[node][0], plan.map_of(node)
        record.attrs.append((path, axis, cmap))
        value = follow(old, axis, cmap)
        if isinstance(old, nn.Parameter):
            setattr(owner, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(leaf, value)
        changes.append(Change("resized", path, list(old.shape), list(value.shape)))
    return changes


def _rewrite_norm_shapes(plan: Coupling) -> list[Change]:
    """The literal normalized_shape of F.layer_norm calls over the widened units."""
    changes = []
    for node in plan.norm_shapes:
        width = plan.map_of(node).width
        args, kwargs = list(node.args), dict(node.kwargs)
        old = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        new = type(old)([width]) if isinstance(old, (tuple, list)) else width
        if len(args) > 1:
            args[1] = new
        else:
            kwargs["normalized_shape"] = new
        node.args, node.kwargs = tuple(args), kwargs
        changes.append(Change("rewired", node.name, str(old), str(new), "normalized_shape"))
    return changes


def _rewrite_reshapes(plan: Coupling) -> list[Change]:
    """Literal sizes of view/reshape calls that hold the widened axis."""
    changes = []
    for node, _ in plan.rewrites:
        dim = plan.tensors[node][0]
        old_size = (tensor_shape(node) or ())[dim]
        new_size = plan.map_of(node).width
        args = list(node.args)
        second = args[1] if len(args) == 2 else None
        packed = isinstance(second, (tuple, list))
        sizes: list[Any] = list(second) if isinstance(second, (tuple, list)) else args[1:]
        if dim >= len(sizes):
            raise UnsupportedMorphError(f"cannot widen: cannot read the sizes of {node.name!r}")
        value = sizes[dim]
        if value == -1:
            continue
        how = f"{node.target} size constant"
        if isinstance(value, fx.Node):  # computed at run time (from the batch size, say)
            sizes[dim] = _scaled(node, value, old_size, new_size)
            how = f"{node.target} size computed at run time, scaled to the new width"
        elif value != old_size:
            raise UnsupportedMorphError(f"cannot widen: unexpected size {value} in {node.name!r}")
        else:
            sizes[dim] = new_size
        if packed:
            node.args = (args[0], tuple(sizes) if isinstance(second, tuple) else sizes)
        else:
            node.args = (args[0], *sizes)
        changes.append(Change("rewired", node.name, str(old_size), str(new_size), how))
    return changes


def _scaled(at: fx.Node, value: fx.Node, old: int, new: int) -> fx.Node:
    """``value * new / old`` computed before ``at``: a size that holds the widened units among
    others (MobileViT's ``B * C * n_h``), which the batch size makes a run-time value; it holds
    whole units, so it divides exactly."""
    step = math.gcd(old, new)
    with at.graph.inserting_before(at):
        units = at.graph.call_function(operator.floordiv, (value, old // step))
        return at.graph.call_function(operator.mul, (units, new // step))
