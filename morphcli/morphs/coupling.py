"""Coupling analysis for widening: which layers must change together, and with which maps.

Starting from the widened layer's output, the walk follows the widened axis forward to every
consumer and backward to every other producer that must share the same units (residual adds,
channel-wise gates). Tensors that must hold the same units form a group with one map; a
concatenation or a flatten starts a new group whose map is derived from its inputs' maps.
Whatever the walk cannot map exactly is refused, naming the op.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NoReturn

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from morphcli.errors import UnsupportedMorphError
from morphcli.graph.edit import tensor_shape
from morphcli.morphs import coupling_split
from morphcli.morphs.coupling_ops import (
    ELEMENTWISE_FUNCS,
    ELEMENTWISE_METHODS,
    REDUCTIONS,
    SHAPE_METHODS,
    SPATIAL_FUNCS,
    UNIFORM_REDUCTIONS,
    arg,
    op_name,
    reduced_axes,
)
from morphcli.morphs.coupling_plan import PRODUCT_REFUSAL, Coupling, Group, Piece, Whole
from morphcli.morphs.coupling_sizes import (
    CUT_UNITS,
    folded_axis,
    indexed_axis,
    is_batched_product,
    is_regrouping,
    kept_axis,
    merged_into,
    pads_other_axes,
    product_axes,
    repeated_axis,
    reshaped_axis,
    rolled_axis,
    split_from,
    tiled,
    unbound,
    untiled,
    view_shapes,
    widened_reads,
)
from morphcli.morphs.split_ops import is_cat
from morphcli.rules import registry
from morphcli.rules.channel_map import ChannelMap

# How many layouts of ambiguous splits the walk tries before it refuses.
_MAX_WALKS = 8


def analyse(gm: fx.GraphModule, target: fx.Node) -> Coupling:
    """The coupling plan for widening ``target``'s output (maps filled by ``assign_maps``).

    A reshape that splits the widened axis into several (paths x channels, heads x head_dim)
    does not say which of them carries the units: the walk takes the heads first and, if that
    is refused, walks again with the next axis (SKNet's and ResNeSt's paths x channels). So
    does a reshape that puts a size-1 axis before the units: kept as they are, or read as one
    head (PVT-v2's single-head queries). The refusal given is that of the walk that reached
    the most tensors (the first of those), walks that guessed no single head first."""
    choices: dict[fx.Node, int] = {}
    furthest: tuple[tuple[bool, int], UnsupportedMorphError] | None = None
    for _ in range(_MAX_WALKS):
        walker = _Walker(gm, target, choices)
        try:
            walker.run()
        except UnsupportedMorphError as e:
            # (a walk that read a size-1 axis as a single head is a guess: its refusal is
            # given only if every other walk was refused sooner)
            reach = (not walker.guessed, len(walker.plan.tensors))
            if furthest is None or reach > furthest[0]:
                furthest = (reach, e)
            retry = walker.next_choices()
            if retry is None:
                break
            choices = retry
            continue
        coupling_split.finish(walker.plan)
        return walker.plan
    assert furthest is not None
    raise furthest[1]


class _Walker:
    def __init__(self, gm: fx.GraphModule, target: fx.Node,
                 choices: dict[fx.Node, int] | None = None) -> None:
        self.gm = gm
        self.target = target
        # Splits of the widened axis met, in order: reshape -> (axis chosen, axes it may be).
        self.choices = dict(choices or {})
        self.splits: list[tuple[fx.Node, int, list[int]]] = []
        self.guessed = False  # a size-1 axis taken as a single head
        self.plan = Coupling()
        self.queue: list[fx.Node] = []
        self.sites = _call_sites(gm)
        self.forwarded: set[fx.Node] = set()
        self.shared: dict[str, dict[fx.Node, Any]] = {}  # shared layer -> its calls reached
        self.uniform_cats: list[tuple[fx.Node, fx.Node, str]] = []  # (norm, concat, refusal)
        self.split_cats: list[tuple[fx.Node, fx.Node]] = []  # (reshape, concat it splits)
        # Groups split from another into (outer, units, inner), and groups merged from such
        # axes: id -> (that group, outer, inner). A merge undoing a split meets its source.
        self.untiled: dict[int, tuple[Group, int, int]] = {}
        self.retiled: dict[int, tuple[Group, int, int]] = {}

    # -- bookkeeping

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))

    def join(self, node: Any, dim: int, group: Group) -> None:
        """``node`` (an fx argument) carries ``group``'s units on ``dim``; merge groups if it
        already had one."""
        if not isinstance(node, fx.Node):
            raise UnsupportedMorphError(f"cannot widen: the widened units meet a constant "
                                        f"({type(node).__name__}), whose size cannot change")
        shape = tensor_shape(node)
        if shape is None:
            self.refuse(node, "its shape is unknown")
        dim = dim % len(shape)
        if node in self.plan.tensors:
            old_dim, old_group = self.plan.tensors[node]
            if old_dim != dim:
                self.refuse(node, "the widened units would sit on two different axes")
            if old_group is not group:
                self.merge(old_group, group, node)
            return
        self.plan.tensors[node] = (dim, group)
        self.queue.append(node)

    def follow(self, user: fx.Node, dim: int, group: Group) -> None:
        """``user`` carries the units because one of its inputs does: no backward walk needed."""
        self.forwarded.add(user)
        self.join(user, dim, group)

    def merge(self, keep: Group, drop: Group, where: fx.Node) -> None:
        # Each group has its own layout source (the widened layer, a concat or a flatten);
        # two of them meeting at one tensor cannot both hold, unless both are pieces whose
        # ranges of the root can grow alike.
        if coupling_split.tie(self.plan, keep, drop):
            return
        if self.same_layout(keep, drop):
            self.plan.same.append((keep, drop))
            return
        self.refuse(where, "two differently laid out sets of units meet here")

    def same_layout(self, a: Group, b: Group) -> bool:
        """Whether two groups hold the same units by construction: split alike from one
        group, merged alike from one, or split from one and merged back the same way
        (EfficientFormerV2's values: heads x head_dim, multiplied by the attention, merged
        back and added to their own depthwise conv)."""
        return self.layout_of(a) == self.layout_of(b)

    def layout_of(self, group: Group, depth: int = 0) -> Any:
        """A key equal for groups that hold the same units (``same_layout``)."""
        if depth > 100:
            return id(group)
        for step, back, kind in ((self.retiled, self.untiled, "tiled"),
                                 (self.untiled, self.retiled, "untiled")):
            made = step.get(id(group))
            if made is not None:
                undone = back.get(id(made[0]))
                if undone is not None and undone[1:] == made[1:]:
                    return self.layout_of(undone[0], depth + 1)
                return (kind, self.layout_of(made[0], depth + 1), *made[1:])
        return id(group)

    def choose(self, node: fx.Node, default: int, first: int, last: int,
               shape: tuple[int, ...]) -> int:
        """Which of axes ``first..last`` (a split of the widened axis, or those a reshape merges
        into it) carries the units: ``default`` (the heads) unless a later walk chose
        another (see ``analyse``). Other axes of size 1 hold no units (one head can become
        several; one of ResNeSt's cardinality groups stays one)."""
        return self.choose_among(node, [default, *(a for a in range(first, last + 1)
                                                   if a != default and shape[a] > 1)])

    def choose_among(self, node: fx.Node, axes: list[int]) -> int:
        """``axes[0]`` unless a later walk chose another of ``axes`` (see ``analyse``)."""
        if all(n is not node for n, _, _ in self.splits):
            self.splits.append((node, self.choices.get(node, axes[0]), axes))
        return self.choices.get(node, axes[0])

    def next_choices(self) -> dict[fx.Node, int] | None:
        """After a refused walk: the latest split with an axis not tried yet takes it (the
        splits met after it fall back to their first choice); None when all were tried."""
        for i in range(len(self.splits) - 1, -1, -1):
            node, chosen, axes = self.splits[i]
            if chosen != axes[-1]:
                kept = {n: a for n, a, _ in self.splits[:i]}
                return {**kept, node: axes[axes.index(chosen) + 1]}
        return None

    def refuse(self, node: fx.Node, why: str) -> NoReturn:
        op = node.op
        what = (f"{node.target} ({type(self.module(node)).__name__})" if op == "call_module"
                else op_name(node))
        raise UnsupportedMorphError(f"cannot widen: the widened units reach {what} at node "
                                    f"{node.name!r}, and {why}")

    # -- the walk

    def run(self) -> None:
        root = Group(None)
        mod = self.module(self.target)
        rule = registry.lookup("widen_out", mod)
        shape = tensor_shape(self.target)
        if rule is None or shape is None:
            raise UnsupportedMorphError(
                f"{self.target.target} is a {type(mod).__name__}; widen applies to "
                f"{', '.join(registry.supported('widen_out'))}")
        self.join(self.target, rule.out_dim(mod, len(shape)), root)
        while self.queue:
            node = self.queue.pop(0)
            self.backward(node)
            for user in list(node.users):
                self.forward(node, user)
        self.shared_layers()
        self.uniform_concats()
        self.split_concats()

    def backward(self, node: fx.Node) -> None:
        """How ``node`` is produced decides what else must carry its units."""
        dim, group = self.plan.tensors[node]
        if node is group.source or node in self.forwarded:
            return  # its units come from an input already in the plan
        if self.is_norm(node):  # its units are its input's
            self.norm_over_units(node, dim, len(tensor_shape(node) or ()), group)
            self.join(node.args[0], dim, group)
            return
        if node.op == "call_module":
            m = self.module(node)
            rule = registry.lookup("widen_out", m)
            channelwise = registry.lookup("channelwise", m)
            if rule is not None and channelwise is not None and channelwise.applies(m):
                rule = None  # a depthwise conv is channelwise, not a producer
            if rule is not None:
                rank = len(tensor_shape(node) or ())
                if rule.out_dim(m, rank) == dim:
                    why = rule.why_not_out(m)
                    if why:
                        self.refuse(node, why)
                    self.require_blocks(node, group, getattr(m, "groups", 1))
                    self.shared_check(node, node)
                    if node not in self.plan.producers:
                        self.plan.producers.append(node)
                    return
                if isinstance(m, nn.Linear):  # units on a leading axis pass through a Linear
                    self.join(node.args[0], dim, group)
                    return
            cw = registry.lookup("channelwise", m)
            if cw is not None and cw.applies(m):
                self.add_channelwise(node, m, cw, dim)
                self.join(node.args[0], dim, group)
                return
            pt = registry.lookup("passthrough", m)
            if pt is not None and pt.keeps(m, dim, len(tensor_shape(node) or ())):
                self.join(node.args[0], dim, group)
                return
            self.refuse(node, "its output cannot be widened")
        if self.is_elementwise(node) or \
                (is_batched_product(node) and dim < len(tensor_shape(node) or ()) - 2):
            self.join_operands(node, dim, group)  # (a product: each head on its own)
            return
        if is_batched_product(node):  # rows of the first factor, columns of the second
            rank = len(tensor_shape(node) or ())
            for operand, axis in product_axes(node):
                shape = tensor_shape(operand) if isinstance(operand, fx.Node) else None
                if axis == dim - rank and shape is not None and len(shape) >= 2:
                    self.join(operand, len(shape) + axis, group)
                    return
            self.refuse(node, "its output axis is not one a factor carries")
        if node.op == "call_function" and isinstance(node.args[0], fx.Node) and (
                (node.target in SPATIAL_FUNCS and node.target is not F.pad and dim == 1) or
                (node.target is F.pad and pads_other_axes(node, dim,
                                                          len(tensor_shape(node) or ())))):
            self.join(node.args[0], dim, group)  # pooled, resized or padded along positions
            return
        piece = unbound(node)
        if piece is not None:
            src, axis = piece
            self.join(src, dim + 1 if axis <= dim else dim, group)
            return
        if node.op == "call_function" and node.target is torch.cat:
            rank = len(tensor_shape(node) or ())
            if arg(node, 1, "dim", 0) % rank != dim:  # joined along another axis (tokens)
                for part in arg(node, 0, "tensors", []):
                    self.join(part, dim, group)
                return
        if node.op == "call_function" and node.target is torch.stack:
            rank = len(tensor_shape(node) or ())
            axis = arg(node, 1, "dim", 0) % rank
            if axis == dim:
                self.refuse(node, "it stacks tensors along the widened axis")
            for part in arg(node, 0, "tensors", []):  # every part carries the units
                self.join(part, dim - 1 if axis < dim else dim, group)
            return
        if coupling_split.backward(self, node, dim, group):  # a concat's output, a piece
            return
        if is_regrouping(node):  # (walking forward from its input records any rewrite)
            kept = kept_axis(node, dim)
            if kept is not None:
                self.join(node.args[0], kept, group)
                if node.op == "call_method" and node.target in ("reshape_as", "view_as"):
                    self.join(node.args[1], dim, group)  # the sizes are that tensor's
                return
            split = split_from(node, dim)
            if split is not None:  # heads widened from their side (CaiT's talking heads)
                self.tile_back(node, *split, group)
                return
            merged = merged_into(node, dim)
            if merged is not None:  # the units are one of the input axes merged into ``dim``
                src, first, last, default = merged
                shape = tensor_shape(src) or ()
                axis = self.choose(node, default, first, last, shape)
                self.untile_back(node, src, axis, math.prod(shape[first:axis]),
                                 math.prod(shape[axis + 1:last + 1]), group)
                return
            if self.unfolded(node, dim, group):
                return
        attention = _attention_output_of(self.gm, node)
        if attention is not None:  # its units are its query's: widen from there
            self.join(arg(attention, 0, "query", None), dim, group)
            return
        if node.op in ("call_function", "call_method"):
            moved = self.axis_through(node, dim, backward=True)
            if moved is not None:
                self.join(node.args[0], moved, group)
                return
        if node.op == "get_attr":  # a per-unit tensor of the model (e.g. a layer scale)
            readers = [n for n in self.gm.graph.nodes
                       if n.op == "get_attr" and n.target == node.target]
            if len(readers) > 1:
                self.refuse(node, f"tensor {node.target} is read at several places")
            if node not in self.plan.attrs:
                self.plan.attrs.append(node)
            return
        if node.op == "placeholder":
            self.refuse(node, "it is a model input, whose shape cannot change")
        if op_name(node) in ("flatten", "call_method flatten"):  # (other axes pass above)
            self.refuse(node, "its units are positions it merges (a patch embedding's "
                        "tokens), whose number the input's size decides")
        self.refuse(node, "morphcli cannot widen the tensor it produces")

    def forward(self, node: fx.Node, user: fx.Node) -> None:
        """What ``user`` does with the widened ``node``."""
        dim, group = self.plan.tensors[node]
        rank = len(tensor_shape(node) or ())
        if user.op == "output":
            raise UnsupportedMorphError(
                "cannot widen: the widened units reach the model's output (node "
                f"{node.name!r}), which would change the output shape")
        if self.is_norm(user):
            if user.args[0] is node:  # (its weight and bias are joined with its input)
                self.norm_over_units(user, dim, rank, group)
                self.follow(user, dim, group)
            return
        if user.op == "call_module":
            m = self.module(user)
            if isinstance(m, nn.MultiheadAttention):
                self.attention(user, m, dim, rank, group)
                return
            cw = registry.lookup("channelwise", m)
            if cw is not None and cw.applies(m):
                if cw.channel_dim(m, rank) != dim:
                    self.refuse(user, "it is channelwise on another axis")
                self.add_channelwise(user, m, cw, dim)
                self.follow(user, dim, group)
                return
            rule = registry.lookup("widen_in", m)
            if rule is not None and user.args and user.args[0] is node:
                if rule.in_dim(m, rank) == dim:
                    why = rule.why_not_in(m)
                    if why:
                        self.refuse(user, why)
                    self.require_blocks(user, group, getattr(m, "groups", 1))
                    self.shared_check(user, node)
                    if (user, node) not in self.plan.consumers:
                        self.plan.consumers.append((user, node))
                    return
                if isinstance(m, nn.Linear):
                    self.follow(user, dim, group)
                    return
                if isinstance(m, nn.modules.conv._ConvNd):
                    self.refuse(user, "a convolution slides along the widened axis (as ECA's "
                                "Conv1d across channels), so each unit's neighbours, new units "
                                "among them, enter its output")
            if isinstance(m, nn.Flatten):
                self.flatten(node, user, dim, m.start_dim, m.end_dim)
                return
            pt = registry.lookup("passthrough", m)
            if pt is not None and pt.keeps(m, dim, rank):
                self.follow(user, dim, group)
                return
            self.refuse(user, "morphcli has no rule to follow the widened units through it")
        if self.is_elementwise(user):
            self.follow(user, dim + (len(tensor_shape(user) or ()) - rank), group)
            self.join_operands(user, self.plan.tensors[user][0], self.plan.tensors[user][1])
            return
        self.through_op(node, user, dim, rank, group)

    # -- functional ops

    def is_elementwise(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            return node.target in ELEMENTWISE_FUNCS
        return node.op == "call_method" and node.target in ELEMENTWISE_METHODS

    def join_operands(self, node: fx.Node, dim: int, group: Group) -> None:
        """Every full-size operand of an elementwise op must carry the same units."""
        out_rank = len(tensor_shape(node) or ())
        old = _old_width(self, group, node)
        for operand in node.all_input_nodes:
            shape = tensor_shape(operand)
            if shape is None:
                continue
            d = dim - (out_rank - len(shape))
            if d < 0 or shape[d] == 1:
                continue  # broadcast along the widened axis: the same value for every unit
            if old is not None and shape[d] != old:
                self.refuse(node, f"operand {operand.name!r} has {shape[d]} units, not {old}")
            self.join(operand, d, group)

    def through_op(self, node: fx.Node, user: fx.Node, dim: int, rank: int, group: Group) -> None:
        target = user.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if coupling_split.forward(self, node, user, dim, rank):  # a split, a slice
            return
        if user.op == "call_function" and target is torch.cat:
            self.concat(node, user, dim, rank)
            return
        if user.op == "call_function" and target is torch.stack:
            # stacked along a new axis: every part carries the same units (SKNet's paths)
            axis = arg(user, 1, "dim", 0) % (rank + 1)
            for t in arg(user, 0, "tensors", []):
                self.join(t, dim, group)
            self.follow(user, dim + 1 if axis <= dim else dim, group)
            return
        if name == "flatten" and user.args[0] is node:
            start = arg(user, 1, "start_dim", 0)
            end = arg(user, 2, "end_dim", -1)
            self.flatten(node, user, dim, start, end)
            return
        if name in ("view", "reshape") and user.args[0] is node:
            self.reshape(node, user, dim, rank)
            return
        if user.op == "call_method" and name in ("reshape_as", "view_as"):
            self.reshape_as(node, user, dim)
            return
        if name == "unbind":
            self.unbind(node, user, dim, rank)
            return
        if is_batched_product(user):
            self.batched_product(node, user, dim, rank)
            return
        if user.op == "call_function" and target is F.pad and user.args[0] is node:
            if not pads_other_axes(user, dim, rank):
                self.refuse(user, "it pads the widened axis, which would add units no layer "
                            "computes")
            self.follow(user, dim, self.plan.tensors[node][1])
            return
        if user.op == "call_function" and target in SPATIAL_FUNCS:
            if dim != 1 or user.args[0] is not node:
                self.refuse(user, "it pools or resizes along the widened axis")
            self.follow(user, dim, group)
            return
        if name in SHAPE_METHODS or (user.op == "call_function" and target is getattr):
            self.shape_read(user, dim)
            return
        moved = self.axis_through(user, dim, backward=False)
        if moved is not None:
            self.follow(user, moved, group)
            return
        if name in UNIFORM_REDUCTIONS and dim in (reduced_axes(user, rank) or ()):
            # A mean or maximum over the units (GRN's mean response) is unchanged when every
            # unit is copied equally often: its value is the old one, broadcast as before.
            self.uniform(user, group, f"{name} over the units")
            return
        self.refuse(user, "morphcli has no rule to follow the widened units through it")

    def axis_through(self, node: fx.Node, dim: int, backward: bool) -> int | None:
        """Where the widened axis lands through permute/transpose/reductions/softmax/getitem
        (or, ``backward``, where it came from); None if the op mixes or drops it."""
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node):
            return None
        in_rank = len(tensor_shape(src) or ())
        if name == "permute":
            dims: Any = node.args[1:] if node.op == "call_method" else node.args[1]
            if node.op == "call_method" and len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            dims = [d % in_rank for d in dims]
            return dims[dim] if backward else dims.index(dim)
        if name == "transpose":
            a, b = (arg(node, 1, "dim0", 0) % in_rank, arg(node, 2, "dim1", 1) % in_rank)
            return {a: b, b: a}.get(dim, dim)
        if name in ("softmax", "log_softmax"):  # along another axis: each unit on its own
            axis = arg(node, 1, "dim", None)
            return dim if isinstance(axis, int) and axis % in_rank != dim else None
        if (name in REDUCTIONS or name == "norm") and not backward:
            dims = reduced_axes(node, in_rank)
            if dims is None or dim in dims:
                return None
            keep = arg(node, 3 if name == "norm" else 2, "keepdim", False)
            return dim if keep else dim - sum(1 for d in dims if d < dim)
        if name == "getitem":
            return indexed_axis(node.args[1], dim, in_rank, backward)
        if name == "roll":
            return rolled_axis(node, dim, in_rank)
        if name == "repeat":
            return repeated_axis(node, dim, in_rank, backward)
        if name == "normalize" and node.op == "call_function":  # F.normalize along another axis
            return dim if arg(node, 2, "dim", 1) % in_rank != dim else None
        if name == "expand":
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                sizes = tuple(sizes[0])
            lead = len(sizes) - in_rank  # expand may add leading axes
            out_dim, in_dim = (dim, dim - lead) if backward else (dim + lead, dim)
            if 0 <= in_dim < in_rank and sizes[out_dim] == -1:  # the axis is kept as it is
                return in_dim if backward else out_dim
            return None
        if name in ("unsqueeze",) and not backward:
            at = arg(node, 1, "dim", 0) % (in_rank + 1)
            return dim + 1 if at <= dim else dim
        return None

    def shape_read(self, user: fx.Node, dim: int) -> None:
        """A size read: those of the widened axis get their old value (``coupling_sizes``)."""
        src = user.args[0]
        shape = (tensor_shape(src) if isinstance(src, fx.Node) else None) or ()
        reads = widened_reads(user, dim, max(len(shape), 1))
        if isinstance(reads, str):
            self.refuse(user, reads)
        for read in reads:
            if all(r is not read for r, _ in self.plan.size_reads):
                self.plan.size_reads.append((read, shape[dim]))

    # -- derived layouts

    def concat(self, node: fx.Node, user: fx.Node, dim: int, rank: int) -> None:
        axis = arg(user, 1, "dim", 0) % rank
        tensors = arg(user, 0, "tensors", [])
        if axis != dim:  # concatenated along another axis: every part carries the same units
            group = self.plan.tensors[node][1]
            for t in tensors:
                self.join(t, dim, group)
            self.follow(user, dim, group)
            return
        if user in self.plan.derived:
            return
        plan = self.plan

        def derive() -> ChannelMap:
            parts = [plan.map_of(t) if t in plan.tensors else ChannelMap.identity(
                tensor_shape(t)[dim]) for t in tensors]  # type: ignore[index]
            out = parts[0]
            for p in parts[1:]:
                out = out.concat(p)
            return out

        plan.derived[user] = derive
        self.follow(user, dim, Group(user))

    def flatten(self, node: fx.Node, user: fx.Node, dim: int, start: int, end: int) -> None:
        shape = tensor_shape(node) or ()
        rank = len(shape)
        start, end = start % rank, end % rank
        group = self.plan.tensors[node][1]
        if dim < start:
            self.follow(user, dim, group)
            return
        if dim > end:
            self.follow(user, dim - (end - start), group)
            return
        outer, inner = math.prod(shape[start:dim]), math.prod(shape[dim + 1 : end + 1])
        if outer == 1:
            self.derive_expand(node, user, start, inner)
            return
        self.derive_tiled(node, user, start, outer, inner)  # (Swin's patch merging: 2x2xC)

    def unfolded(self, node: fx.Node, dim: int, group: Group) -> bool:
        """Walking back through a view/reshape whose input holds output axis ``dim``'s units
        folded with other axes (MobileViT's patches: ``folded_axis``), or holds alone the
        units that ``dim`` holds folded; joins that input if so."""
        shapes = view_shapes(node)
        if shapes is None:
            return False
        src, shape_in, shape_out = shapes
        tiles = self.retiled.get(id(group))
        back = folded_axis(shape_out, dim, shape_in, *tiles[1:]) if tiles else None
        if tiles is not None and back is not None and back[1:] == (1, 1):
            self.untile_back(node, src, back[0], *tiles[1:], group)
            return True
        folded = folded_axis(shape_out, dim, shape_in)
        if folded is not None:
            self.tile_back(node, src, *folded, group)
        return folded is not None

    def tile_back(self, node: fx.Node, src: fx.Node, axis: int, outer: int, inner: int,
                  group: Group) -> None:
        """``src`` (``node``'s input) holds ``node``'s units on ``axis`` as outer x units x
        inner."""
        made = Group(node)
        self.plan.derived[src] = lambda: tiled(self.plan.map_of(node), outer, inner)
        self.retiled[id(made)] = (group, outer, inner)
        self.join(src, axis, made)

    def untile_back(self, node: fx.Node, src: fx.Node, axis: int, outer: int, inner: int,
                    group: Group) -> None:
        """``src`` (``node``'s input) holds alone on ``axis`` the units that ``node`` holds as
        outer x units x inner."""
        part = Group(node)
        self.plan.derived[src] = lambda: untiled(self.plan.map_of(node), outer, inner,
                                                 f"node {node.name!r}")
        self.untiled[id(part)] = (group, outer, inner)
        self.join(src, axis, part)

    def derive_tiled(self, node: fx.Node, user: fx.Node, axis: int, outer: int,
                     inner: int) -> None:
        """``user``'s ``axis`` merges ``outer`` x units x ``inner`` of ``node``."""
        plan = self.plan
        if user not in plan.derived:
            plan.derived[user] = lambda: tiled(plan.map_of(node), outer, inner)
            self.follow(user, axis, Group(user))
            self.retiled[id(plan.tensors[user][1])] = (plan.tensors[node][1], outer, inner)
            if outer > 1:
                plan.interleaved.add(user)

    def reshape(self, node: fx.Node, user: fx.Node, dim: int, rank: int) -> None:
        """A view/reshape that keeps the widened axis, merges it with the axes after it (as
        flatten) or splits it; the size given for it is rewritten."""
        to = reshaped_axis(tensor_shape(node) or (), tensor_shape(user) or (), dim)
        if (user, node) not in self.plan.rewrites:
            self.plan.rewrites.append((user, node))
        if user in self.plan.tensors and (to is None or to.kind != "keep"):
            return  # reached from its output: walking back derives one layout from the other
        if to is None:
            shape_in, shape_out = tensor_shape(node) or (), tensor_shape(user) or ()
            tiles = self.retiled.get(id(self.plan.tensors[node][1]))
            if tiles is not None:  # folded with other axes before: do they part again here?
                back = folded_axis(shape_in, dim, shape_out, *tiles[1:])
                if back is not None and back[1:] == (1, 1):
                    self.split_heads(node, user, back[0], *tiles[1:])
                    return
            folded = folded_axis(shape_in, dim, shape_out)  # merged with axes around it
            if folded is None:
                self.refuse(user, CUT_UNITS)
            self.derive_tiled(node, user, *folded)
            return
        if to.kind == "keep":
            shape = tensor_shape(user) or ()
            # A size-1 axis added before the kept one may be a single head (PVT-v2's query,
            # ``reshape(B, N, heads, -1)`` with one head): tried if keeping is refused.
            if to.axis > 0 and shape[to.axis - 1] == 1 and len(shape) > rank and \
                    self.choose_among(user, [to.axis, to.axis - 1]) != to.axis:
                self.guessed = True
                self.split_heads(node, user, to.axis - 1, 1, shape[to.axis])
                return
            self.follow(user, to.axis, self.plan.tensors[node][1])
        elif to.kind == "merge":
            self.derive_expand(node, user, to.axis, to.block)
        else:
            shape = tensor_shape(user) or ()
            axis = self.choose(user, to.axis, to.first, to.last, shape)
            self.split_heads(node, user, axis, math.prod(shape[to.first:axis]),
                             math.prod(shape[axis + 1:to.last + 1]))

    def split_heads(self, node: fx.Node, user: fx.Node, axis: int, outer: int,
                    inner: int) -> None:
        """A reshape splitting the widened axis into (outer, heads, inner) axes (qkv into 3 x
        heads x head_dim): the heads axis carries the units, which come as whole heads."""
        if user in self.plan.tensors:  # walked back from the heads: the units are tiled
            return
        group = self.plan.tensors[node][1]
        if group.source is None:
            if group.heads is not None and group.heads[:2] != (outer, inner):
                self.refuse(user, "the units are split into heads in two different ways")
            group.heads = group.heads or (outer, inner, user)
        elif is_cat(group.source) and group.layout is None:
            self.split_cats.append((user, group.source))
        plan = self.plan
        if user not in plan.derived:
            plan.derived[user] = lambda: untiled(plan.map_of(node), outer, inner,
                                                 f"node {user.name!r}")
            self.follow(user, axis, Group(user))
            self.untiled[id(plan.tensors[user][1])] = (group, outer, inner)

    def unbind(self, node: fx.Node, user: fx.Node, dim: int, rank: int) -> None:
        """``x.unbind(d)`` along another axis: every piece carries the units."""
        axis = arg(user, 1, "dim", 0) % rank
        if axis == dim:
            self.refuse(user, "it takes the widened axis apart")
        group = self.plan.tensors[node][1]
        for use in user.users:
            if use.op != "call_function" or use.target is not operator.getitem:
                self.refuse(use, "it reads the pieces of an unbind together")
            self.follow(use, dim - 1 if axis < dim else dim, group)

    def batched_product(self, node: fx.Node, user: fx.Node, dim: int, rank: int) -> None:
        """matmul or attention with the units on a batch axis (the heads): every operand
        carries them there, and so does the product; on the rows of matmul's first factor,
        the columns of its second or attention's value features, only the product does."""
        out_rank = len(tensor_shape(user) or ())
        group = self.plan.tensors[node][1]
        if dim < rank - 2:
            out = dim + out_rank - rank
            self.follow(user, out, group)
            self.join_operands(user, out, group)
            return
        if rank >= 2 and any(operand is node and axis == dim - rank
                             for operand, axis in product_axes(user)):
            self.follow(user, out_rank + dim - rank, group)
            return
        if isinstance(group.layout, Piece):  # a piece summed over keeps its width
            if all(g is not group for g, _ in self.plan.frozen):
                self.plan.frozen.append((group, user))
            return
        self.refuse(user, PRODUCT_REFUSAL)

    def reshape_as(self, node: fx.Node, user: fx.Node, dim: int) -> None:
        """``x.reshape_as(other)``: the sizes follow ``other``, so the widened axis must be
        one that ``x`` and ``other`` both carry, kept in place."""
        group = self.plan.tensors[node][1]
        if user.args[0] is node:
            to = reshaped_axis(tensor_shape(node) or (), tensor_shape(user) or (), dim)
            if to is None or to.kind != "keep":
                self.refuse(user, "it reshapes the widened axis in a way morphcli cannot follow")
            self.join(user.args[1], to.axis, group)
            self.follow(user, to.axis, group)
            return
        kept = kept_axis(user, dim)  # ``node`` is ``other``: its sizes are the output's
        if kept is None:
            self.refuse(user, "it reshapes another tensor to the widened sizes")
        self.join(user.args[0], kept, group)
        self.follow(user, dim, group)

    def derive_expand(self, node: fx.Node, user: fx.Node, out_dim: int, block: int) -> None:
        plan = self.plan
        if user not in plan.derived:
            plan.derived[user] = lambda: plan.map_of(node).expand(block)
            self.follow(user, out_dim, Group(user))
            self.retiled[id(plan.tensors[user][1])] = (plan.tensors[node][1], 1, block)

    # -- layers

    def add_channelwise(self, node: fx.Node, m: nn.Module, rule: Any, dim: int) -> None:
        why = rule.why_not(m)
        if why:
            self.refuse(node, why)
        self.shared_check(node, node.args[0])
        if node not in self.plan.channelwise:
            self.plan.channelwise.append(node)

    def attention(self, node: fx.Node, m: nn.Module, dim: int, rank: int,
                  group: Group) -> None:
        """Self-attention reads and writes the same embedding: its output carries the units
        of its input (``rules.attention`` resizes its projections)."""
        if dim != rank - 1:
            self.refuse(node, "attention mixes positions along the widened axis")
        q, k, v = (arg(node, i, name, None) for i, name in enumerate(("query", "key", "value")))
        if not (q is k is v):
            self.refuse(node, "its keys or values come from another tensor (cross-attention)")
        self.add_channelwise(node, m, registry.lookup("channelwise", m), dim)
        for use in node.users:
            index = use.args[1] if use.target is operator.getitem else None
            if index == 0:
                self.follow(use, dim, group)
            elif use.users or index != 1:  # (``y, _ = attn(...)`` leaves the weights unread)
                self.refuse(use, "the attention weights are read (only the attention's first "
                            "output can carry the units)")

    def is_norm(self, node: fx.Node) -> bool:
        """A LayerNorm or a GroupNorm with several channels per group (module or function):
        statistics over the units, kept only by copying every unit equally often."""
        if node.op == "call_module":
            m = self.module(node)
            return isinstance(m, nn.LayerNorm) or (
                isinstance(m, nn.GroupNorm) and m.num_groups != m.num_channels)
        return node.op == "call_function" and node.target in (F.layer_norm, F.group_norm)

    def norm_over_units(self, node: fx.Node, dim: int, rank: int, group: Group) -> None:
        """A norm (``is_norm``) that the units reach. Over other axes they pass through. Over
        the units, its mean and variance stay the same only if every unit is copied equally
        often and new units equal their source (``Group.uniform``); a GroupNorm's copies
        stay in their group (one block per group). Its parameters follow the map."""
        module = self.module(node) if node.op == "call_module" else None
        if isinstance(module, nn.GroupNorm) or node.target is F.group_norm:
            self.group_norm_over_units(node, module, dim, group)
            return
        shape: Any = module.normalized_shape if module is not None else \
            arg(node, 1, "normalized_shape", ())
        if dim < rank - len(shape):
            return
        if len(shape) != 1 or dim != rank - 1:
            self.refuse(node, "LayerNorm normalises over the widened units together with "
                        "other axes")
        self.uniform(node, group, "LayerNorm")
        if module is not None:
            self.add_channelwise(node, module, registry.lookup("channelwise", module), dim)
            return
        self.join_affine(node, 2, 3, group)
        if node not in self.plan.norm_shapes:
            self.plan.norm_shapes.append(node)

    def group_norm_over_units(self, node: fx.Node, module: nn.Module | None, dim: int,
                              group: Group) -> None:
        groups = module.num_groups if isinstance(module, nn.GroupNorm) else \
            arg(node, 1, "num_groups", None)
        if dim != 1 or not isinstance(groups, int):
            self.refuse(node, "GroupNorm normalises over the widened units together with "
                        "its channels")
        self.uniform(node, group, "GroupNorm")
        self.require_blocks(node, group, groups)
        if module is not None:
            self.add_channelwise(node, module, registry.lookup("channelwise", module), dim)
        else:
            self.join_affine(node, 2, 3, group)

    def uniform(self, node: fx.Node, group: Group, kind: str) -> None:
        """Every unit of ``group`` must be copied equally often (for ``node``'s statistics)."""
        root, links = group, {**self.retiled, **self.untiled}
        while root.source is not None and id(root) in links:
            root = links[id(root)][0]  # every unit copied equally often stays so, (un)tiled
        why = (f"{kind} normalises over units laid out by a concatenation or flatten, which "
               "cannot all be copied equally often")
        held = root.layout.whole if isinstance(root.layout, Whole) else \
            root.source if root.source is not None and is_cat(root.source) and \
            root.layout is None else None
        if held is not None:
            # Assembled from pieces of the widened units (EdgeNeXt's split convs): copied
            # equally often if the widened layer's are, checked once the walk is done.
            self.uniform_cats.append((node, held, why))
            root = self.plan.tensors[self.target][1]
        if root.source is not None:
            self.refuse(node, why)
        root.uniform = root.uniform or node

    def split_concats(self) -> None:
        """A concat split into heads (ShuffleNet's channel shuffle of ``cat([x1, branch])``)
        comes as whole heads only if every part widens."""
        for reshape, cat in self.split_cats:
            kept = [p for p in arg(cat, 0, "tensors", []) if p not in self.plan.tensors]
            if kept:
                self.refuse(reshape, f"it splits into heads the units of concat {cat.name!r}, "
                            f"whose part {getattr(kept[0], 'name', kept[0])!r} keeps its "
                            "width, so the units do not come as whole heads")

    def uniform_concats(self) -> None:
        """A tensor a norm needs uniform, assembled from pieces, holds only ranges of the
        widened units."""
        for norm, held, why in self.uniform_cats:
            if not coupling_split.of_root_ranges(self.plan, held):
                self.refuse(norm, why)

    def join_affine(self, node: fx.Node, weight: int, bias: int, group: Group) -> None:
        """A functional norm's weight and bias (get_attr nodes) follow the units."""
        for i, name in ((weight, "weight"), (bias, "bias")):
            param = arg(node, i, name, None)
            if isinstance(param, fx.Node):
                self.join(param, 0, group)

    def require_blocks(self, node: fx.Node, group: Group, groups: int) -> None:
        """A grouped convolution reads (or writes) its channels in ``groups`` blocks: the map
        must add units inside each block, copying units of the same block."""
        if groups == 1:
            return
        made = self.retiled.get(id(group))
        if made is not None and made[1] % groups == 0:
            return  # tiled alike in outer blocks that are whole groups (ResNeSt's radix)
        if group.source is not None:
            self.refuse(node, f"a grouped convolution (groups={groups}) reads units laid out by "
                        "a concatenation or flatten")
        group.blocks = math.lcm(group.blocks, groups)

    def shared_check(self, node: fx.Node, carries: Any) -> None:
        """A layer called at several places is widened once for all of them: ``carries`` (the
        call's widened input or output) is checked against the other calls' at the end."""
        if len(self.sites.get(str(node.target), ())) > 1:
            self.shared.setdefault(str(node.target), {})[node] = carries

    def shared_layers(self) -> None:
        """Every call of a shared layer must carry the same units the same way."""
        for path, seen in self.shared.items():
            sites = self.sites[path]
            placed = {(self.plan.tensors[t][0], id(self.plan.tensors[t][1]))
                      for t in seen.values() if t in self.plan.tensors}
            if len(seen) < len(sites) or len(placed) != 1:
                self.refuse(sites[0], f"layer {path} is called at {len(sites)} places and "
                            f"widening it would change all of them, "
                            + ("and the widened units reach only some of them"
                               if len(seen) < len(sites) else "with differently laid out "
                               "units"))


def _old_width(walker: _Walker, group: Group, node: fx.Node) -> int | None:
    for n, (d, g) in walker.plan.tensors.items():
        if g is group:
            shape = tensor_shape(n)
            if shape is not None:
                return shape[d]
    return None


def _call_sites(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    sites: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites.setdefault(str(n.target), []).append(n)
    return sites


def _attention_output_of(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The MultiheadAttention call whose output ``node`` is (``attn(q, k, v)[0]``), if any."""
    if node.op != "call_function" or node.target is not operator.getitem or node.args[1] != 0:
        return None
    src = node.args[0]
    if isinstance(src, fx.Node) and src.op == "call_module" and \
            isinstance(gm.get_submodule(str(src.target)), nn.MultiheadAttention):
        return src
    return None
