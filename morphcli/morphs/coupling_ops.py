"""The op tables of the coupling walk (``morphs.coupling``): which functions and methods act
elementwise, spatially, as reductions or as size reads, and small readers of fx node arguments."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.nn import functional as F

# Ops that act elementwise (with broadcasting) on all their tensor arguments.
ELEMENTWISE_FUNCS: set[Any] = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.neg, operator.pos,
    torch.add, torch.sub, torch.mul, torch.div, torch.relu, torch.sigmoid, torch.tanh,
    torch.clamp, torch.neg, torch.abs, torch.where, torch.addcmul, torch.addcdiv,
    F.relu, F.relu6, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.selu, F.celu, F.softplus, F.hardtanh, F.dropout, F.sigmoid, F.tanh, F.prelu,
}
ELEMENTWISE_METHODS = {
    "add", "sub", "mul", "div", "relu", "sigmoid", "tanh", "clamp", "contiguous", "clone",
    "float", "to", "type_as", "neg", "abs", "exp", "add_", "mul_", "relu_", "sigmoid_",
    "detach", "__add__", "__mul__", "__sub__", "addcmul", "addcdiv", "expand_as",
}
SPATIAL_FUNCS: set[Any] = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool2d,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.max_pool1d, F.max_pool2d, F.max_pool3d,
    F.interpolate, F.pad,
}
REDUCTIONS = {"mean", "sum", "amax", "amin"}
UNIFORM_REDUCTIONS = {"mean", "amax", "amin"}  # unchanged by copying every unit k times
SHAPE_METHODS = {"size", "dim"}


def arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def index_axis(index: Any, dim: int, rank: int) -> int | None:
    """Where axis ``dim`` lands after ``x[index]``; None if the index touches it."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        pos = items.index(Ellipsis)
        items = items[:pos] + (slice(None),) * (rank - len(items) + 1) + items[pos + 1 :]
    out = 0
    for axis in range(rank):
        item = items[axis] if axis < len(items) else slice(None)
        if axis == dim:
            return out if item == slice(None) else None
        if item is None:
            out += 1
        if isinstance(item, slice):
            out += 1
    return None


def reduced_axes(node: fx.Node, rank: int) -> list[int] | None:
    """The axes a reduction (mean/sum/amax/amin, or ``norm``, whose first argument is p)
    reduces, or None for all of them."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    dims = arg(node, 2, "dim", None) if name == "norm" else arg(node, 1, "dim", None)
    if dims is None:
        return None
    return [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"{node.op} {t}"
    return getattr(t, "__name__", str(t))
