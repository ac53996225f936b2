"""Successor layers for ``deepen``: identity (Net2DeeperNet) and decomposition (NetMorph).

``identity`` rules are keyed by the type of layer to build (Linear, Conv1d/2d/3d) and return a
new layer that maps its input to itself. ``decompose`` rules are keyed by the type of the layer
being deepened: they return that layer re-expressed (a new object) and a successor whose
composition equals the original layer.

Decomposition: with a random orthogonal Q, the re-expressed layer computes ``Q^T (W x + b)`` and
the successor multiplies by Q, so the pair computes ``W x + b`` up to round-off. For convolutions
the successor is a k x k convolution holding Q at the centre tap and zeros elsewhere: a dense
k x k successor cannot be undone by re-expressing the layer before it in general, while a
centred channel mixing can. It is dense across channels, the NetMorph-style decomposition, and
training can grow the outer taps. A grouped layer can only be re-expressed within its groups, so
Q is block-diagonal there, and a diagonal scaling (inverted exactly: ``Q^-1``, not ``Q^T``) for a
depthwise layer.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

from morphcli.rules.registry import register

_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_ConvNd = nn.modules.conv._ConvNd

M = TypeVar("M", bound=nn.Module)


def conv_type(spatial_dims: int) -> type[nn.Module] | None:
    return _CONVS.get(spatial_dims)


@register("identity", nn.Linear)
def identity_linear(cls: type[nn.Module], features: int, kernel: int,
                    dtype: torch.dtype) -> nn.Module:
    """``Linear(F, F)`` with weight I and bias 0 (``kernel`` does not apply)."""
    layer = _zeroed(nn.Linear, features, features, dtype=dtype)
    with torch.no_grad():
        layer.weight.fill_diagonal_(1)
    return layer


@register("identity", nn.Conv1d, nn.Conv2d, nn.Conv3d)
def identity_conv(cls: type[nn.Module], channels: int, kernel: int,
                  dtype: torch.dtype) -> nn.Module:
    """A stride-1, same-padded ``kernel``-wide convolution whose centre tap is I."""
    layer = _centred_conv(cls, channels, kernel, dtype)
    with torch.no_grad():
        _centre(layer.weight).fill_diagonal_(1)
    return layer


@register("decompose", nn.Linear)
def decompose_linear(layer: nn.Module, kernel: int,
                     generator: torch.Generator) -> tuple[nn.Module, nn.Module, str]:
    """``(Q^T-re-expressed copy of layer, Linear with weight Q, what Q is)``."""
    assert isinstance(layer, nn.Linear)
    q = orthogonal(layer.out_features, generator)
    head = _re_expressed(layer, q.T)
    tail = _zeroed(nn.Linear, layer.out_features, layer.out_features, dtype=layer.weight.dtype)
    with torch.no_grad():
        tail.weight.copy_(q.to(tail.weight.dtype))
    return head, tail.to(layer.weight.device), "a random orthogonal Q"


@register("decompose", nn.Conv1d, nn.Conv2d, nn.Conv3d)
def decompose_conv(layer: nn.Module, kernel: int,
                   generator: torch.Generator) -> tuple[nn.Module, nn.Module, str]:
    """``(re-expressed copy, kernel-wide conv with Q at the centre tap, what Q is)``.

    A grouped layer's output channels may only mix within their group, so Q is block-diagonal
    there. A depthwise layer (one channel per group) cannot mix at all; Q is then a random
    diagonal scaling, the only re-expression its filters allow.
    """
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    out, groups = layer.out_channels, layer.groups
    per_group = out // groups
    if per_group == 1:
        q = torch.diag(diagonal_scales(out, generator))
        inverse, what = torch.diag(1.0 / torch.diagonal(q)), (
            "a random diagonal Q (scales of 0.5 to 2, random signs; a depthwise layer's "
            "channels cannot mix)")
    else:
        q = torch.block_diag(*(orthogonal(per_group, generator) for _ in range(groups)))
        inverse, what = q.T, "a random orthogonal Q" + (
            f", block-diagonal within the {groups} groups" if groups > 1 else "")
    head = _re_expressed(layer, inverse)
    tail = _centred_conv(type(layer), out, kernel, layer.weight.dtype)
    with torch.no_grad():
        _centre(tail.weight).copy_(q.to(tail.weight.dtype))
    return head, tail.to(layer.weight.device), what


def orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal n x n matrix (float64), Haar-distributed: QR with R's signs fixed."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)


def diagonal_scales(n: int, generator: torch.Generator) -> torch.Tensor:
    """n random scales (float64), log-uniform in [0.5, 2] with random signs: far from the
    identity yet well conditioned, so dividing by them costs no precision."""
    magnitude = torch.exp2(torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1)
    sign = torch.where(torch.rand(n, generator=generator, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return magnitude * sign


def _re_expressed(layer: nn.Linear | _ConvNd, inverse: torch.Tensor) -> nn.Linear | _ConvNd:
    """A new copy of ``layer`` computing ``inverse (W x + b)`` (float64 maths, stored as
    before), so that Q applied after it gives back ``W x + b``."""
    new = copy.deepcopy(layer)
    with torch.no_grad():
        w = layer.weight.detach().double()
        new.weight.copy_(torch.einsum("oj,j...->o...", inverse, w).to(new.weight.dtype))
        if layer.bias is not None and new.bias is not None:
            new.bias.copy_((inverse @ layer.bias.detach().double()).to(new.bias.dtype))
    return new


def _centred_conv(cls: type[nn.Module], channels: int, kernel: int,
                  dtype: torch.dtype) -> _ConvNd:
    layer = _zeroed(cls, channels, channels, kernel, padding=kernel // 2, dtype=dtype)
    assert isinstance(layer, _ConvNd) and layer.bias is not None
    return layer


def _zeroed(cls: type[M], *args: object, **kwargs: object) -> M:
    """A new layer with all-zero tensors, built without its random initialisation (for a
    Linear(8192, 8192) that is a second of random numbers and an extra copy of the weight)."""
    with torch.device("meta"):
        layer = cls(*args, **kwargs)
    for m in layer.modules():  # (not to_empty: on meta tensors it imports sympy, 0.3 s)
        for name, p in m._parameters.items():
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype),
                                                   requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None:
                m._buffers[name] = torch.zeros(b.shape, dtype=b.dtype)
    return layer


def _centre(weight: torch.Tensor) -> torch.Tensor:
    """The (out, in) slice of a conv weight at the centre tap of every spatial dimension."""
    index = (slice(None), slice(None)) + tuple(k // 2 for k in weight.shape[2:])
    return weight[index]
