"""Sizes in the coupling walk (``morphs.coupling``): sizes the model reads at run time, and where
the widened axis goes through a view/reshape.

A size read of the widened axis (``B, N, C = x.shape``, ``x.size(-1)``) is replaced by its old
value when the widen is applied, and the integer arithmetic fed by it (``C // heads``) is folded
on old values: every layer the units do not reach keeps computing with the sizes it had. Where
the widened tensor itself is reshaped, the reshape's size for the widened axis is set to the new
width (``widen._rewrite_reshapes``), whatever expression held it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate

from morphcli.graph.edit import tensor_shape

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
    factor ("split": heads x head_dim)."""

    kind: str
    axis: int
    block: int = 1
    outer: int = 1
    inner: int = 1


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
                                inner=shape_out[end])
    return None


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


def is_regrouping(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _REGROUPING_METHODS
    return node.op == "call_function" and node.target in _REGROUPING_FUNCS


def indexed_from(index: Any, out_dim: int, in_rank: int) -> int | None:
    """The input axis of ``x[index]`` whose whole extent is output axis ``out_dim`` (basic
    indexing only); None if there is none."""
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items):
        return None  # advanced indexing moves axes in ways not followed here
    from morphcli.morphs.coupling_ops import index_axis

    for d in range(in_rank):
        if index_axis(index, d, in_rank) == out_dim:
            return d
    return None


def rolled_axis(node: fx.Node, dim: int, rank: int) -> int | None:
    """``torch.roll`` along other axes keeps the widened one in place."""
    dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if dims is None:
        return None  # rolls the flattened tensor
    dims = dims if isinstance(dims, (list, tuple)) else (dims,)
    return dim if all(isinstance(d, int) and d % rank != dim for d in dims) else None


def pads_other_axes(node: fx.Node, dim: int, rank: int) -> bool:
    """Whether ``F.pad`` leaves the widened axis unpadded (pads come in pairs, last axis first)."""
    pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    if not isinstance(pads, (list, tuple)):
        return False
    at = 2 * (rank - 1 - dim)
    return at >= len(pads) or (pads[at] == 0 and pads[at + 1] == 0)
