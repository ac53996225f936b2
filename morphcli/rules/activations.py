"""Activations ``swap`` accepts and ``deepen --activation`` reasons about.

A module rule (kind ``activation``) names the activation in ``modules.ACTIVATIONS`` and the
constructor arguments that rebuild it; parameters (PReLU's slopes) travel in its state_dict.
Functional call sites (``F.relu(x)``, ``torch.sigmoid(x)``, ``x.relu()``) are keyed by the
function object or method name in ``_FUNCTIONS``: the registry is keyed by layer types, and a
function is not one.

Also here: the range of values each activation can output, and the set of inputs each one maps
to themselves, so ``deepen --activation`` can prove when a plain activation changes nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn import functional as F

from morphcli.rules.registry import register

Interval = tuple[float, float]
_INF = math.inf


@dataclass(frozen=True)
class ActivationRule:
    """Rebuild an activation module as ``(name in ACTIVATIONS, constructor kwargs)``."""

    name: str
    args: tuple[str, ...] = ()

    def spec(self, module: nn.Module) -> tuple[str, dict[str, Any]]:
        # ``inplace`` is never carried over: a blend reads its input twice.
        return self.name, {a: _plain(getattr(module, a)) for a in self.args}


for _types, _rule in (
    ((nn.ReLU,), ActivationRule("relu")),
    ((nn.ReLU6,), ActivationRule("relu6")),
    ((nn.LeakyReLU,), ActivationRule("leaky_relu", ("negative_slope",))),
    ((nn.PReLU,), ActivationRule("prelu", ("num_parameters",))),
    ((nn.ELU,), ActivationRule("elu", ("alpha",))),
    ((nn.SELU,), ActivationRule("selu")),
    ((nn.CELU,), ActivationRule("celu", ("alpha",))),
    ((nn.GELU,), ActivationRule("gelu", ("approximate",))),
    ((nn.SiLU,), ActivationRule("silu")),
    ((nn.Mish,), ActivationRule("mish")),
    ((nn.Tanh,), ActivationRule("tanh")),
    ((nn.Sigmoid,), ActivationRule("sigmoid")),
    ((nn.Hardswish,), ActivationRule("hardswish")),
    ((nn.Hardsigmoid,), ActivationRule("hardsigmoid")),
    ((nn.Hardtanh,), ActivationRule("hardtanh", ("min_val", "max_val"))),
    ((nn.Softplus,), ActivationRule("softplus", ("beta", "threshold"))),
    ((nn.Softsign,), ActivationRule("softsign")),
    ((nn.Tanhshrink,), ActivationRule("tanhshrink")),
    ((nn.LogSigmoid,), ActivationRule("logsigmoid")),
):
    register("activation", *_types)(_rule)


@dataclass(frozen=True)
class _Functional:
    """A functional activation: its name and the positional parameters after the input."""

    name: str
    params: tuple[str, ...] = ()
    defaults: dict[str, Any] = field(default_factory=dict)


@functools.cache
def _functions() -> dict[Any, _Functional]:
    """call_function targets (by object) and call_method names (by string)."""
    inplace = ("inplace",)
    table: dict[Any, _Functional] = {
        F.relu: _Functional("relu", inplace),
        F.relu6: _Functional("relu6", inplace),
        F.leaky_relu: _Functional("leaky_relu", ("negative_slope", "inplace"),
                                  {"negative_slope": 0.01}),
        F.elu: _Functional("elu", ("alpha", "inplace"), {"alpha": 1.0}),
        F.selu: _Functional("selu", inplace),
        F.celu: _Functional("celu", ("alpha", "inplace"), {"alpha": 1.0}),
        F.gelu: _Functional("gelu", ("approximate",), {"approximate": "none"}),
        F.silu: _Functional("silu", inplace),
        F.mish: _Functional("mish", inplace),
        F.tanh: _Functional("tanh"),
        F.sigmoid: _Functional("sigmoid"),
        F.hardswish: _Functional("hardswish", inplace),
        F.hardsigmoid: _Functional("hardsigmoid", inplace),
        F.hardtanh: _Functional("hardtanh", ("min_val", "max_val", "inplace"),
                                {"min_val": -1.0, "max_val": 1.0}),
        F.softplus: _Functional("softplus", ("beta", "threshold"),
                                {"beta": 1.0, "threshold": 20.0}),
        F.softsign: _Functional("softsign"),
        F.tanhshrink: _Functional("tanhshrink"),
        F.logsigmoid: _Functional("logsigmoid"),
        torch.relu: _Functional("relu"),
        torch.sigmoid: _Functional("sigmoid"),
        torch.tanh: _Functional("tanh"),
        torch.selu: _Functional("selu"),
        torch.celu: _Functional("celu", ("alpha",), {"alpha": 1.0}),
    }
    for method in ("relu", "sigmoid", "tanh"):
        table[method] = _Functional(method)
    return table


def functional_names() -> list[str]:
    """Names of the functional activations ``swap`` rebuilds as modules (for messages)."""
    return sorted({f"{getattr(k, '__name__', k)}" for k in _functions()})


def activation_spec(node: fx.Node,
                    module: nn.Module | None = None) -> tuple[str, dict[str, Any]] | None:
    """``(name, kwargs)`` rebuilding the activation a call site runs, or None if none we know.

    ``module`` is the called module of a ``call_module`` node. A functional site whose
    arguments are not constants (a computed slope) gives None too.
    """
    from morphcli.rules.registry import lookup

    if node.op == "call_module":
        rule = lookup("activation", module) if module is not None else None
        return rule.spec(module) if rule is not None else None
    if node.op not in ("call_function", "call_method"):
        return None
    try:
        fn = _functions().get(node.target)
    except TypeError:  # an unhashable target is no activation of ours
        return None
    if fn is None:
        return None
    extra = node.args[1:]
    if len(extra) > len(fn.params):
        return None
    values = dict(zip(fn.params, extra, strict=False))
    for k, v in node.kwargs.items():
        if k in ("input", "self"):
            continue
        if k not in fn.params:
            return None
        values[k] = v
    if any(isinstance(v, fx.Node) for v in values.values()):
        return None
    kwargs = {k: _plain(v) for k, v in values.items() if k != "inplace"}
    return fn.name, {**{k: v for k, v in fn.defaults.items() if k not in kwargs}, **kwargs}


def activation_input(node: fx.Node) -> fx.Node | None:
    """The tensor an activation site reads (first argument or ``input=`` / ``self=``)."""
    if node.args:
        arg = node.args[0]
    else:
        arg = node.kwargs.get("input", node.kwargs.get("self"))
    return arg if isinstance(arg, fx.Node) else None


def output_range(name: str, kwargs: dict[str, Any]) -> Interval | None:
    """Values the activation can output (closed interval), or None if unbounded both ways."""
    ranges: dict[str, Interval] = {
        "relu": (0.0, _INF), "relu6": (0.0, 6.0), "sigmoid": (0.0, 1.0),
        "hardsigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0),
        "softplus": (0.0, _INF),
    }
    if name == "hardtanh":
        return float(kwargs.get("min_val", -1.0)), float(kwargs.get("max_val", 1.0))
    return ranges.get(name)


# Inputs a default-constructed activation returns unchanged, bit for bit (closed intervals).
# ELU/CELU compute x * 1.0 for x > 0 and (exp(0) - 1) * alpha = 0 at 0; PReLU and LeakyReLU
# return x for x >= 0.
FIXED_SETS: dict[str, Interval] = {
    "identity": (-_INF, _INF),
    "relu": (0.0, _INF),
    "leaky_relu": (0.0, _INF),
    "prelu": (0.0, _INF),
    "elu": (0.0, _INF),
    "celu": (0.0, _INF),
    "relu6": (0.0, 6.0),
    "hardtanh": (-1.0, 1.0),
}


def fixes(activation: str, values: Interval | None) -> bool:
    """True when ``activation`` (default arguments) leaves every value in ``values`` unchanged."""
    fixed = FIXED_SETS.get(activation)
    return values is not None and fixed is not None and fixed[0] <= values[0] and \
        values[1] <= fixed[1]


def _plain(v: Any) -> Any:
    """JSON-friendly constructor arguments (tuples from torch attributes become lists)."""
    if isinstance(v, torch.Tensor):
        return v.item()
    return list(v) if isinstance(v, tuple) else v
