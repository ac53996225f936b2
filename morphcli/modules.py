"""Layers that morphs insert. They are allowlisted for safe loading and export to ONNX and .pt2.

Each constructor takes only JSON-friendly arguments kept as attributes of the same name, so a
stored architecture description can rebuild it without pickled code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# Activation modules by the name users type after --to / --activation.
ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh,
    "softplus": nn.Softplus,
    "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
    "logsigmoid": nn.LogSigmoid,
    "identity": nn.Identity,
}


def make_activation(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    try:
        factory = ACTIVATIONS[name]
    except KeyError:
        from morphcli.errors import InputError

        raise InputError(
            f"unknown activation {name!r}; choose from {', '.join(sorted(ACTIVATIONS))}"
        ) from None
    return factory(**(kwargs or {}))


class IdentityStartActivation(nn.Module):
    """Network Morphism's non-linearity morph: ``(1 - a) * act(x) + a * x``.

    With the learnable ``a`` at 1 it is the identity, so it can be inserted anywhere without
    changing the function; training can move ``a`` towards 0 to make it non-linear.
    """

    def __init__(self, activation: str = "relu", a: float = 1.0) -> None:
        super().__init__()
        self.activation = activation
        self.act = make_activation(activation)
        self.a = nn.Parameter(torch.tensor(float(a)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (1 - self.a) * (self.act(x) - x)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class ActivationBlend(nn.Module):
    """``(1 - t) * old(x) + t * new(x)`` with learnable ``t`` starting at 0: equal to ``old``.

    Used by an exact activation swap; training can move ``t`` to 1 to reach the new activation.
    """

    def __init__(
        self,
        old_activation: str = "relu",
        new_activation: str = "gelu",
        old_kwargs: dict[str, Any] | None = None,
        new_kwargs: dict[str, Any] | None = None,
        t: float = 0.0,
    ) -> None:
        super().__init__()
        self.old_kwargs = dict(old_kwargs or {})
        self.new_kwargs = dict(new_kwargs or {})
        self.old_activation, self.new_activation = old_activation, new_activation
        self.old = make_activation(old_activation, self.old_kwargs)
        self.new = make_activation(new_activation, self.new_kwargs)
        self.t = nn.Parameter(torch.tensor(float(t)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.old(x)
        return a + self.t * (self.new(x) - a)

    def extra_repr(self) -> str:
        return f"old={self.old_activation!r}, new={self.new_activation!r}"


class StochasticDepth(nn.Module):
    """Row-wise or batch-wise stochastic depth (as torchvision.ops.StochasticDepth).

    morphcli substitutes it for torchvision's layer when tracing, so models that use it keep
    their training behaviour and can be stored without torchvision code.
    """

    def __init__(self, p: float = 0.0, mode: str = "row") -> None:
        super().__init__()
        if mode not in ("row", "batch"):
            raise ValueError(f"mode must be 'row' or 'batch', not {mode!r}")
        self.p = p
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        survival = 1.0 - self.p
        shape = [x.shape[0]] + [1] * (x.ndim - 1) if self.mode == "row" else [1] * x.ndim
        noise = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if survival > 0.0:
            noise.div_(survival)
        return x * noise

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}"


class FeaturesLastBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the last dimension of an (N, ..., F) tensor, as BatchNorm1d does over
    dimension 1: what ``deepen --norm`` inserts where features come last (transformer tokens,
    channels-last feature maps), so that it is the identity in eval mode there too."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected a tensor of at least 2 dimensions, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an activation named as after ``--to`` (timm's BatchNormAct2d
    without its drop layer): what morphcli substitutes for timm's layer, with the same
    parameter names, so it is one channelwise layer that can be stored without timm code."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: str = "identity",
                 activation_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.activation = activation
        self.activation_kwargs = dict(activation_kwargs or {})
        self.act = make_activation(activation, self.activation_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


class Conv2dSame(nn.Conv2d):
    """A Conv2d padded as TensorFlow's "SAME" does, from the input's size at run time (timm's
    Conv2dSame, in its tf_ EfficientNets' strided convs): the output has ceil(size / stride)
    positions, the odd padding element on the bottom and right."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any,
                 stride: Any = 1, dilation: Any = 1, groups: int = 1, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups,
                         bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, k, s, d in reversed(list(zip(x.shape[-2:], self.kernel_size, self.stride,
                                                self.dilation, strict=True))):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _stochastic_depth(m: Any) -> nn.Module:
    """Ours for torchvision's StochasticDepth (``m`` is that class, not imported here)."""
    return StochasticDepth(m.p, m.mode)


# Foreign layers (by qualified class name) that tracing replaces with an equivalent of ours.
SUBSTITUTES: dict[str, Callable[[Any], nn.Module | None]] = {
    "torchvision.ops.stochastic_depth.StochasticDepth": _stochastic_depth,
}
