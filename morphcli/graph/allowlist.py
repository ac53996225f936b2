"""What a stored architecture description may name: layer types, functions, methods, attributes.

Descriptions come from files, so nothing outside these tables is ever imported or called.
Functions are limited to pure tensor maths (torch's ``__torch_function__``-overridable set),
which excludes file and process access such as ``torch.save`` or ``torch.load``.
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from torch import nn

# Attributes that may be read from a tensor in a graph (``x.shape``); nothing that climbs to
# classes, modules or globals.
SAFE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "T", "mT", "real", "imag", "is_cuda"})

# operator helpers that build callables, which could reach arbitrary methods, are excluded.
_OPERATOR_EXCLUDED = {"attrgetter", "methodcaller", "itemgetter", "call"}

# Tensor methods that leave tensor maths (storage, numpy, hooks, autograd) are excluded.
_METHODS_EXCLUDED = {
    "numpy", "tolist", "storage", "untyped_storage", "share_memory_", "register_hook",
    "register_post_accumulate_grad_hook", "backward", "data_ptr", "pin_memory",
}


@functools.cache
def module_types() -> dict[str, type[nn.Module]]:
    """Allowlisted layer classes by qualified name: all of torch.nn plus morphcli.modules."""
    from morphcli import modules as own

    table: dict[str, type[nn.Module]] = {}
    for namespace in (nn, own):
        for name in dir(namespace):
            obj = getattr(namespace, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module):
                table[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return table


def module_type_name(m: nn.Module) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


@functools.cache
def functions() -> dict[str, Callable[..., Any]]:
    """Allowlisted call_function targets by their stored name."""
    table: dict[str, Callable[..., Any]] = {}
    overridable = torch.overrides.get_overridable_functions()
    for namespace, prefix in ((torch, "torch"), (nn.functional, "torch.nn.functional")):
        for fn in overridable.get(namespace, []):
            name = getattr(fn, "__name__", None)
            if name and getattr(namespace, name, None) is fn:
                table[f"{prefix}.{name}"] = fn
    for name in dir(operator):
        fn = getattr(operator, name)
        if callable(fn) and not name.startswith("__") and name not in _OPERATOR_EXCLUDED:
            table[f"operator.{name}"] = fn
    for name in ("sqrt", "floor", "ceil", "prod", "exp", "log"):
        table[f"math.{name}"] = getattr(math, name)
    table["torch._assert"] = torch._assert
    for name in FACTORIES:  # no tensor argument, so not overridable, yet pure tensor maths
        table[f"torch.{name}"] = getattr(torch, name)
    table["builtins.getattr"] = builtins.getattr
    return table


# Tensor factories sized by their arguments, which shape inference and graph.budget count
# before any real run (torch.empty is left out: its memory is uninitialised).
FACTORIES = ("zeros", "ones", "full", "arange", "eye", "linspace")
_FACTORY_KWARGS = frozenset({"dtype", "layout", "device", "requires_grad"})


def factory_problem(fn: object, kwargs: dict[str, Any]) -> str | None:
    """Why a call of ``fn`` cannot be stored or rebuilt, if it is a factory with a keyword
    that could leave tensor maths: a device that is not read from a tensor (``x.device``) would
    let a description allocate on a real device while morphcli sizes the graph on meta."""
    if not any(fn is getattr(torch, name) for name in FACTORIES):
        return None
    extra = sorted(set(kwargs) - _FACTORY_KWARGS)
    if extra:
        return f"{getattr(fn, '__name__', fn)} with keyword {extra[0]!r}"
    device = kwargs.get("device")
    if device is not None and not isinstance(device, torch.fx.Node):
        return (f"{getattr(fn, '__name__', fn)} on a fixed device {str(device)!r} (only a "
                "tensor's own device, x.device, can be stored)")
    return None


# Functions that libraries wrap as fx leaves (``torch.fx.wrap``: their shape arithmetic
# cannot be traced), so a traced graph calls them by reference. Each is pure tensor maths;
# stored by this exact name and imported only when a description names one.
LIBRARY_FUNCTIONS = frozenset({
    "torchvision.models.swin_transformer._get_relative_position_bias",
    "torchvision.models.swin_transformer._patch_merging_pad",
    "torchvision.models.swin_transformer.shifted_window_attention",
})


def library_function(name: Any) -> Callable[..., Any] | None:
    """The allowlisted library function stored as ``name`` (None: not one, or not installed)."""
    if not isinstance(name, str) or name not in LIBRARY_FUNCTIONS:
        return None
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    return fn if callable(fn) else None


def library_name(fn: Any) -> str | None:
    """The stored name of ``fn`` if it is an allowlisted library function."""
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}"
    return name if name in LIBRARY_FUNCTIONS and library_function(name) is fn else None


@functools.cache
def function_names() -> dict[int, str]:
    return {id(fn): name for name, fn in functions().items()}


@functools.cache
def tensor_methods() -> frozenset[str]:
    """Allowlisted call_method names: public Tensor methods that torch can override."""
    names = set()
    for fn in torch.overrides.get_overridable_functions().get(torch.Tensor, []):
        name = getattr(fn, "__name__", "")
        if name and not name.startswith("_") and name not in _METHODS_EXCLUDED:
            names.add(name)
    return frozenset(names)
