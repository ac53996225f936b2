"""Sizes in the coupling walk (``morphs.coupling``): sizes the model reads at run time, and where
the widened axis goes through a view/reshape.

A size read of the widened axis (``B, N, C = x.shape``, ``x.size(-1)``) is replaced by its old
value when the widen is applied, and the integer arithmetic fed by it (``C // heads``) is folded
on old values: every layer the units do not reach keeps computing with the sizes it had. Where
the widened tensor itself is reshaped, the reshape's size for the axis holding the units is set
to the new width (``widen._rewrite_reshapes``), or, computed at run time from the batch size
with the units among other axes (MobileViT's ``B * C * n_h``), scaled by new / old width.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate
from torch.nn import functional as F

from morphcli.errors import UnsupportedMorphError
from morphcli.graph.edit import tensor_shape
from morphcli.rules.channel_map import ChannelMap

# Attributes of a tensor that do not depend on its sizes.
_SIZE_FREE_ATTRS = {"ndim", "dtype", "device", "is_cuda", "requires_grad", "layout"}
# Python integer arithmetic fx records on traced sizes; folded once their inputs are constants.
_FOLDABLE: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
    operator.mod, operator.pow, operator.neg, operator.eq, operator.ne, operator.lt,
    operator.le, operator.gt, operator.ge, operator.and_, operator.or_, operator.not_,
    math.sqrt, math.ceil, math.floor, int, float, max, min,
}


def widened_reads(read: fx.Node, dim: int, rank: int) -> list[fx.Node] | str:
    """The nodes among ``read`` (``x.shape``, ``x.size()``, ``x.size(d)``, ``x.dim()``) and
    its uses that hold the size of axis ``dim`` of ``x``; or why they cannot be told."""
    if read.op == "call_method" and read.target == "dim":
        return []
    if read.op == "call_function" and read.target is getattr:
        if read.args[1] in _SIZE_FREE_ATTRS:
            return []
        if read.args[1] != "shape":
            return f"it reads the tensor's {read.args[1]!r}"
    elif read.op == "call_method" and read.target == "size":
        axis = read.args[1] if len(read.args) > 1 else read.kwargs.get("dim")
        if axis is not None:
            return [read] if isinstance(axis, int) and axis % rank == dim else \
                [] if isinstance(axis, int) else "it reads a size at a computed axis"
    found = []
    for use in read.users:
        index = use.args[1] if use.op == "call_function" and use.target is operator.getitem \
            else None
        if isinstance(index, int):
            if index % rank == dim:
                found.append(use)
        elif isinstance(index, slice):
            if dim in range(rank)[index]:
                return "it reads the widened size among several (a slice of the shape)"
        else:
            return "it reads the whole shape, widened size included"
    return found


def fold_size_reads(reads: list[tuple[fx.Node, int]]) -> None:
    """Replace each size read by its old value, folding the arithmetic fed by it."""
    for node, value in reads:
        if node.graph is not None and node in node.graph.nodes:  # (not folded already)
            _substitute(node, value)


def _substitute(node: fx.Node, value: Any) -> None:
    graph = node.graph
    for user in list(node.users):
        user.args = map_aggregate(user.args, lambda a: value if a is node else a)
        user.kwargs = map_aggregate(user.kwargs, lambda a: value if a is node else a)
        fn = user.target
        if user.op == "call_function" and fn in _FOLDABLE and not user.all_input_nodes:
            assert callable(fn)  # (a call_function's target is the function)
            _substitute(user, fn(*user.args, **user.kwargs))
    graph.erase_node(node)


@dataclass(frozen=True)
class Reshaped:
    """Where a view/reshape puts the widened axis: at ``axis`` of its output, as it was
    (``kind`` "keep"), merged with the ``block`` elements of the axes after it ("merge"), or
    split into ``outer`` x units x ``inner`` output axes, the units axis just before the last
    factor ("split": heads x head_dim); a split covers output axes ``first`` to ``last``."""

    kind: str
    axis: int
    block: int = 1
    outer: int = 1
    inner: int = 1
    first: int = 0
    last: int = 0


def reshaped_axis(shape_in: tuple[int, ...], shape_out: tuple[int, ...],
                  dim: int) -> Reshaped | None:
    """Where axis ``dim`` of ``shape_in`` lands in ``shape_out``; None if the reshape mixes
    it with the axes before it."""
    before, size = math.prod(shape_in[:dim]), shape_in[dim]
    # Axes of size 1 make several positions fit: the widened axis kept as it is comes first.
    fits = [p for p in range(len(shape_out)) if math.prod(shape_out[:p]) == before]
    for p in fits:
        if shape_out[p] == size:
            return Reshaped("keep", p)
    for p in fits:
        if shape_out[p] > size:  # merged with the axes after it
            span, end = size, dim
            while span < shape_out[p] and end + 1 < len(shape_in):
                end += 1
                span *= shape_in[end]
            if span == shape_out[p]:
                return Reshaped("merge", p, block=span // size)
        elif 1 < shape_out[p] < size:  # split into several axes
            span, end = shape_out[p], p
            while span < size and end + 1 < len(shape_out):
                end += 1
                span *= shape_out[end]
            if span == size and end > p:
                units = end - 1
                return Reshaped("split", units, outer=math.prod(shape_out[p:units]),
                                inner=shape_out[end], first=p, last=end)
    return None


def folded_axis(shape_in: tuple[int, ...], dim: int, shape_out: tuple[int, ...],
                outer: int = 1, inner: int = 1) -> tuple[int, int, int] | None:
    """The output axis of a view/reshape that holds the units of input axis ``dim`` whole (laid
    out ``outer`` x units x ``inner`` on it), and their layout there, (axis, outer, inner);
    None if the reshape cuts the units apart.

    Told by element strides, whatever the axes around the units do: Swin's 2 x 2 x C patch
    merge, or MobileViT's unfolding into patches, which folds the channels into the batch
    axis between the batch and the patch rows (``reshape(B * C * n_h, p_h, n_w, p_w)``) and
    later splits them out again."""
    units = shape_in[dim] // (outer * inner)
    after = inner * math.prod(shape_in[dim + 1:])  # elements per unit, in memory order
    for p, size in enumerate(shape_out):
        stride = math.prod(shape_out[p + 1:])
        if units > 1 and after % stride == 0 and size % (units * (after // stride)) == 0:
            return p, size // (units * (after // stride)), after // stride
    return None


# Why a view/reshape is refused when ``reshaped_axis`` and ``folded_axis`` find no place.
CUT_UNITS = "it cuts the widened units apart: no axis of its output holds them whole"


def view_shapes(node: fx.Node) -> tuple[fx.Node, tuple[int, ...], tuple[int, ...]] | None:
    """A view/reshape's input and both shapes, if known."""
    src = node.args[0] if node.args else None
    shape_in = tensor_shape(src) if isinstance(src, fx.Node) else None
    shape_out = tensor_shape(node)
    if not isinstance(src, fx.Node) or shape_in is None or shape_out is None or \
            node.target not in ("view", "reshape"):
        return None
    return src, tuple(shape_in), tuple(shape_out)


def split_from(node: fx.Node, dim: int) -> tuple[fx.Node, int, int, int] | None:
    """For a view/reshape whose output axis ``dim`` is one of the axes an input axis is split
    into (outer x units x inner: qkv's heads, or SKNet's paths x channels, units last): that
    input, its axis, outer and inner; else None."""
    shapes = view_shapes(node)
    if shapes is None:
        return None
    src, shape_in, shape_out = shapes
    for d in range(len(shape_in)):
        to = reshaped_axis(shape_in, shape_out, d)
        if to is not None and to.kind == "split" and to.first <= dim <= to.last:
            return (src, d, math.prod(shape_out[to.first:dim]),
                    math.prod(shape_out[dim + 1:to.last + 1]))
    return None


def merged_into(node: fx.Node, dim: int) -> tuple[fx.Node, int, int, int] | None:
    """For a view/reshape whose output axis ``dim`` merges input axes ``first`` to ``last``
    (ResNeSt's radix x channels): that input, first, last and the axis the heads convention
    picks (``reshaped_axis``); else None. (A flatten's merged axis is a patch embedding's
    tokens, refused by name.)"""
    shapes = view_shapes(node)
    if shapes is None:
        return None
    src, shape_in, shape_out = shapes
    back = reshaped_axis(shape_out, shape_in, dim)
    if back is None or back.kind != "split":
        return None
    return src, back.first, back.last, back.axis


def kept_axis(node: fx.Node, dim: int) -> int | None:
    """The axis of a view/reshape's input that output axis ``dim`` is, unchanged; else None."""
    src = node.args[0]
    shape_in = tensor_shape(src) if isinstance(src, fx.Node) else None
    shape_out = tensor_shape(node)
    if shape_in is None or shape_out is None:
        return None
    back = reshaped_axis(shape_out, shape_in, dim)
    return back.axis if back is not None and back.kind == "keep" else None


# Ops that only regroup the elements of their input, in order: their output's sizes say where
# each input axis went.
_REGROUPING_METHODS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze",
                       "reshape_as", "view_as"}
_REGROUPING_FUNCS: set[Any] = {torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
# Products over the last two axes, batched over the others (each head on its own).
_PRODUCT_FUNCS: set[Any] = {operator.matmul, torch.matmul, torch.bmm,
                            F.scaled_dot_product_attention}
_PRODUCT_METHODS = {"matmul", "bmm", "__matmul__"}


def is_regrouping(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _REGROUPING_METHODS
    return node.op == "call_function" and node.target in _REGROUPING_FUNCS


def is_batched_product(node: fx.Node) -> bool:
    """matmul, bmm or scaled dot-product attention: batched over all but the last two axes."""
    if node.op == "call_method":
        return node.target in _PRODUCT_METHODS
    return node.op == "call_function" and node.target in _PRODUCT_FUNCS


def product_axes(node: fx.Node) -> list[tuple[Any, int]]:
    """The operand axes whose units a product's output keeps on its last two axes, as
    (operand, axis from the end): matmul's rows of the first operand (-2) and columns of the
    second (-1); attention's value features (-1). The other non-batch axes are summed over."""
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
        return [(value, -1)]
    operands = [*node.args[:2], *(node.kwargs.get(k) for k in ("other", "mat2")
                                   if k in node.kwargs)]
    return list(zip(operands[:2], (-2, -1), strict=False))


def unbound(node: fx.Node) -> tuple[fx.Node, int] | None:
    """For ``x.unbind(d)[i]``: ``x`` and ``d``; else None."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node) or not _is_unbind(src) or not isinstance(src.args[0], fx.Node):
        return None
    rank = len(tensor_shape(src.args[0]) or (1,))
    axis = src.args[1] if len(src.args) > 1 else src.kwargs.get("dim", 0)
    return (src.args[0], axis % rank) if isinstance(axis, int) else None


def _is_unbind(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "unbind") or \
        (node.op == "call_function" and node.target is torch.unbind)


def indexed_axis(index: Any, dim: int, in_rank: int, backward: bool) -> int | None:
    """Where axis ``dim`` of ``x`` lands in ``x[index]`` (or, ``backward``, which axis of ``x``
    output axis ``dim`` is); None if the index touches it. One tensor index is followed (a
    lookup table ``t[idx]``, ``t[:, idx]``): it replaces its axis by the index's axes."""
    from morphcli.morphs.coupling_ops import index_axis

    items = index if isinstance(index, tuple) else (index,)
    tensors = [i for i, item in enumerate(items) if isinstance(item, fx.Node)]
    if not tensors:
        if not backward:
            return index_axis(index, dim, in_rank)
        if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
            return None
        found = [d for d in range(in_rank) if index_axis(index, d, in_rank) == dim]
        return found[0] if found else None
    at = tensors[0]
    shape = tensor_shape(items[at])
    meta = items[at].meta.get("tensor_meta")
    if len(tensors) > 1 or shape is None or getattr(meta, "dtype", None) == torch.bool or \
            any(item != slice(None) for i, item in enumerate(items) if i != at):
        return None
    r = len(shape)
    if backward:
        return dim if dim < at else dim - r + 1 if dim >= at + r else None
    return dim if dim < at else dim + r - 1 if dim > at else None


def rolled_axis(node: fx.Node, dim: int, rank: int) -> int | None:
    """``torch.roll`` along other axes keeps the widened one in place."""
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if dims is None:
        return None  # rolls the flattened tensor
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return dim if all(isinstance(d, int) and d % rank != dim for d in dims) else None


def repeated_axis(node: fx.Node, dim: int, rank: int, backward: bool) -> int | None:
    """``x.repeat(*sizes)`` that repeats other axes (XCiT's position encoding over the batch)
    keeps the widened one, shifted by any leading axes it adds."""
    sizes: Any = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    lead = len(sizes) - rank  # (``rank`` is the input's)
    out_dim, in_dim = (dim, dim - lead) if backward else (dim + lead, dim)
    if lead < 0 or not 0 <= in_dim < rank or sizes[out_dim] != 1:
        return None
    return in_dim if backward else out_dim


def pads_other_axes(node: fx.Node, dim: int, rank: int) -> bool:
    """Whether ``F.pad`` leaves the widened axis unpadded (pads come in pairs, last axis first)."""
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pads, (list, tuple)):
        return False
    at = 2 * (rank - 1 - dim)
    return at >= len(pads) or (pads[at] == 0 and pads[at + 1] == 0)


# -- heads: a widened axis split into (outer, heads, inner) axes


def tiled(heads: ChannelMap, outer: int, inner: int) -> ChannelMap:
    """The map of an axis laid out as ``outer x heads x inner`` (qkv: 3 x heads x head_dim)
    given the map of its heads: each head is widened or copied whole, the same in every outer
    block (a new head's query, key and value come from the same head)."""
    block = heads.expand(inner)
    src = torch.cat([block.src + o * block.old_width for o in range(outer)])
    return ChannelMap(src, block.new.repeat(outer), block.old_width * outer)


def untiled(cmap: ChannelMap, outer: int, inner: int, where: str) -> ChannelMap:
    """The heads' map of an axis laid out as ``outer x heads x inner``; refuses a map that does
    not move whole heads alike in every outer block."""
    block = cmap.width // outer
    if cmap.width % (outer * inner) or cmap.old_width % (outer * inner):
        raise UnsupportedMorphError(f"cannot widen: {where} splits the widened units into "
                                    f"blocks of {inner}, which the new width does not fill")
    heads = ChannelMap(cmap.src[:block:inner] // inner, cmap.new[:block:inner],
                       cmap.old_width // (outer * inner))
    if not tiled(heads, outer, inner).same_as(cmap):
        raise UnsupportedMorphError(f"cannot widen: {where} splits the widened units into "
                                    f"heads of {inner}, and the units are not laid out "
                                    "by whole heads")
    return heads


def heads_root(old: int, width: int, outer: int, inner: int, uniform: bool,
               gen: torch.Generator) -> ChannelMap:
    """The widened layer's map when its units are split into heads: whole new heads."""
    heads, new_heads = old // (outer * inner), width // (outer * inner)
    cmap = ChannelMap.replicate(heads, new_heads) if uniform else \
        ChannelMap.grow(heads, new_heads, gen)
    return tiled(cmap, outer, inner)
