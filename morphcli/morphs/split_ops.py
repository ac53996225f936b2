"""Reading the cuts of a tensor from fx nodes: splits (``split``, ``chunk``, ``tensor_split``)
and slices (``x[:, a:b]``), for ``morphs.coupling_split``."""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from morphcli.graph.edit import tensor_shape
from morphcli.morphs.coupling_ops import arg

SPLIT_METHODS = {"split", "split_with_sizes", "chunk", "tensor_split"}
SPLIT_FUNCS: set[Any] = {torch.split, torch.chunk, torch.tensor_split}
Range = tuple[int, int]


def is_cat(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is torch.cat


def is_split(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SPLIT_METHODS
    return node.op == "call_function" and node.target in SPLIT_FUNCS


def width_of(node: fx.Node, dim: int) -> int:
    shape = tensor_shape(node)
    assert shape is not None  # every tensor the walk reaches has a known shape
    return int(shape[dim])


def cut_axis(op: fx.Node, rank: int) -> int:
    """The input axis a split cuts along."""
    return int(arg(op, 2, "dim", 0)) % rank


def running(sizes: list[int]) -> list[int]:
    out, total = [], 0
    for s in sizes:
        total += s
        out.append(total)
    return out


def split_sizes(op: fx.Node, width: int) -> list[int] | None:
    """The piece sizes ``op`` cuts ``width`` units into, as torch computes them."""
    size = op.args[1] if len(op.args) > 1 else next(
        (v for k, v in op.kwargs.items() if k != "dim"), None)
    name = op.target if isinstance(op.target, str) else getattr(op.target, "__name__", "")
    if isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
        if name == "tensor_split":
            bounds = [0, *(min(max(int(s), 0), width) for s in size), width]
            return [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
        return [int(s) for s in size] if sum(size) == width else None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        return None
    if name == "tensor_split":
        return [width // size + (i < width % size) for i in range(size)]
    step = math.ceil(width / size) if name == "chunk" else size
    if step == 0:
        return None
    return [step] * (width // step) + ([width % step] if width % step else [])


def split_pieces(op: fx.Node, n: int) -> list[list[fx.Node]] | None:
    pieces: list[list[fx.Node]] = [[] for _ in range(n)]
    for u in op.users:
        index = u.args[1] if len(u.args) > 1 else None
        if u.op != "call_function" or u.target is not operator.getitem or \
                not isinstance(index, int) or not -n <= index < n:
            return None
        pieces[index % n].append(u)
    return pieces


def slice_entries(op: fx.Node) -> list[tuple[Any, int | None, int | None, int | None]] | None:
    """``x[index]`` as (item, input axis, output axis, position in the index) per entry; None
    unless the index holds only slices, integers, None and Ellipsis."""
    if op.op != "call_function" or op.target is not operator.getitem:
        return None
    src = op.args[0]
    shape = tensor_shape(src) if isinstance(src, fx.Node) else None
    index = op.args[1]
    if shape is None:
        return None
    items = list(index) if isinstance(index, tuple) else [index]
    if not all(i is None or i is Ellipsis or isinstance(i, (slice, int)) for i in items) or \
            any(isinstance(i, bool) for i in items):
        return None
    rank = len(shape)
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    entries: list[tuple[Any, int | None, int | None, int | None]] = []
    axis = out = 0
    for pos, item in enumerate(items):
        if item is Ellipsis:
            for _ in range(rank - consumed):
                entries.append((slice(None), axis, out, None))
                axis, out = axis + 1, out + 1
        elif item is None:
            entries.append((None, None, out, pos))
            out += 1
        else:
            keeps = isinstance(item, slice)
            entries.append((item, axis, out if keeps else None, pos))
            axis, out = axis + 1, out + keeps
    while axis < rank:
        entries.append((slice(None), axis, out, None))
        axis, out = axis + 1, out + 1
    return entries


def slice_range(item: slice, width: int) -> Range | None:
    if item.step not in (None, 1) or not all(
            b is None or (isinstance(b, int) and not isinstance(b, bool))
            for b in (item.start, item.stop)):
        return None
    lo, hi, _ = item.indices(width)
    return lo, max(lo, hi)


def is_flatten(node: fx.Node) -> bool:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_module", "call_function", "call_method") and (
        name in ("flatten", "view", "reshape") or "flatten" in str(name).lower())
