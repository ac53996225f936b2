"""Widen rules for layers with weight matrices: Linear, Conv1d/2d/3d, ConvTranspose, Embedding.

A rule says which tensor axis holds the layer's units and how to resize its weights when its
outputs (``out_map``) and/or inputs (``in_map``) grow; depthwise convolutions are channelwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from morphcli.rules.channel_map import (
    COPY,
    ChannelMap,
    follow,
    grow_inputs,
    grow_outputs,
    set_param,
    shallow_copy,
)
from morphcli.rules.registry import register


@dataclass(frozen=True)
class ResizeContext:
    init: str
    gen: torch.Generator
    noise: float = 0.0
    # New units must equal their source going in (a LayerNorm normalises over them), so
    # producers copy rows even for zero init; consumers still follow ``init``.
    mirror: bool = False
    # Resizing optimizer state shaped like the weights (``morphs.plan.replay``), not the
    # weights: where the weights get fresh random units, the state gets zeros.
    state: bool = False

    def grown_rows(self, t: torch.Tensor, axis: int, cmap: ChannelMap,
                   is_bias: bool = False) -> torch.Tensor:
        """A producer's ``t`` grown along ``axis`` by ``cmap``: new rows copy their source
        (copy init, or ``mirror``) or are fresh random ones (zero init)."""
        init = COPY if self.mirror else self.init
        return grow_outputs(t, axis, cmap, init, self.gen, self.noise,
                            is_bias=is_bias or self.state)


def _last(rank: int) -> int:
    return rank - 1


@register("widen_out", nn.Linear)
@register("widen_in", nn.Linear)
class LinearRule:
    @staticmethod
    def out_dim(m: nn.Module, rank: int) -> int:
        return _last(rank)

    @staticmethod
    def in_dim(m: nn.Module, rank: int) -> int:
        return _last(rank)

    @staticmethod
    def why_not_out(m: nn.Module) -> str | None:
        return None

    @staticmethod
    def why_not_in(m: nn.Module) -> str | None:
        return None

    @staticmethod
    def resize(m: nn.Linear, out_map: ChannelMap | None, in_map: ChannelMap | None,
               ctx: ResizeContext) -> nn.Module:
        new = shallow_copy(m)
        w = m.weight
        if out_map is not None:
            w = ctx.grown_rows(w, 0, out_map)
            if m.bias is not None:
                set_param(new, "bias", ctx.grown_rows(m.bias, 0, out_map, is_bias=True))
            new.out_features = out_map.width
        if in_map is not None:
            w = grow_inputs(w, 1, in_map, ctx.init, ctx.gen, ctx.noise if out_map is None else 0.0)
            new.in_features = in_map.width
        set_param(new, "weight", w)
        return new


_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def is_depthwise(m: nn.Module) -> bool:
    return (isinstance(m, _CONV) and m.groups > 1 and m.groups == m.in_channels
            == m.out_channels)


@register("widen_out", *_CONV, *_CONV_T)
@register("widen_in", *_CONV, *_CONV_T)
class ConvRule:
    """Weights are (out, in/groups, *k) for Conv and (in, out/groups, *k) for ConvTranspose."""

    @staticmethod
    def out_dim(m: nn.Module, rank: int) -> int:
        return 1

    in_dim = out_dim

    @staticmethod
    def why_not_out(m: nn.Module) -> str | None:
        if m.groups != 1 and isinstance(m, _CONV_T):
            return f"grouped transposed convolution (groups={m.groups})"
        return None

    why_not_in = why_not_out

    @staticmethod
    def resize(m: _ConvNd, out_map: ChannelMap | None, in_map: ChannelMap | None,
               ctx: ResizeContext) -> nn.Module:
        transposed = isinstance(m, _CONV_T)
        out_axis, in_axis = (1, 0) if transposed else (0, 1)
        new = shallow_copy(m)
        w = m.weight
        if out_map is not None:
            w = ctx.grown_rows(w, out_axis, out_map)
            if m.bias is not None:
                set_param(new, "bias", ctx.grown_rows(m.bias, 0, out_map, is_bias=True))
            new.out_channels = out_map.width
        if in_map is not None:
            noise = ctx.noise if out_map is None else 0.0
            if m.groups == 1:
                w = grow_inputs(w, in_axis, in_map, ctx.init, ctx.gen, noise)
            else:
                w = _grow_grouped_inputs(w, m.groups, in_map, ctx, noise)
            new.in_channels = in_map.width
        set_param(new, "weight", w)
        return new


def _grow_grouped_inputs(w: torch.Tensor, groups: int, cmap: ChannelMap, ctx: ResizeContext,
                         noise: float) -> torch.Tensor:
    """A grouped conv's weight is (out, in/groups, *k): group g's rows read input block g.
    Each block's map (aligned by the coupling analysis) resizes that group's columns."""
    rows, old_b, new_b = w.shape[0] // groups, cmap.old_width // groups, cmap.width // groups
    parts = []
    for g in range(groups):
        local = ChannelMap(cmap.src[g * new_b:(g + 1) * new_b] - g * old_b,
                           cmap.new[g * new_b:(g + 1) * new_b], old_b)
        parts.append(grow_inputs(w[g * rows:(g + 1) * rows], 1, local, ctx.init, ctx.gen, noise))
    return torch.cat(parts, 0)


@register("channelwise", *_CONV)
class DepthwiseConvRule:
    """A depthwise conv filters each channel alone: filters follow the map, groups grow."""

    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return 1

    @staticmethod
    def why_not(m: nn.Module) -> str | None:
        if not is_depthwise(m):
            return None if m.groups == 1 else f"grouped convolution (groups={m.groups})"
        return None

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return is_depthwise(m)

    @staticmethod
    def resize(m: _ConvNd, cmap: ChannelMap, ctx: ResizeContext) -> nn.Module:
        new = shallow_copy(m)
        set_param(new, "weight", follow(m.weight, 0, cmap))
        if m.bias is not None:
            set_param(new, "bias", follow(m.bias, 0, cmap))
        new.in_channels = new.out_channels = new.groups = cmap.width
        return new


@register("widen_out", nn.Embedding)
class EmbeddingRule:
    @staticmethod
    def out_dim(m: nn.Module, rank: int) -> int:
        return _last(rank)

    @staticmethod
    def why_not_out(m: nn.Module) -> str | None:
        if m.max_norm is not None:
            return "an Embedding with max_norm renormalises rows, so new units change old ones"
        return None

    @staticmethod
    def resize(m: nn.Embedding, out_map: ChannelMap | None, in_map: ChannelMap | None,
               ctx: ResizeContext) -> nn.Module:
        new = shallow_copy(m)
        assert out_map is not None
        set_param(new, "weight", ctx.grown_rows(m.weight, 1, out_map))
        new.embedding_dim = out_map.width
        return new


def grow_kernel(m: nn.Module, size: int) -> nn.Module:
    """Network Morphism's kernel-size morph: zero-pad the kernel and the padding alike."""
    from morphcli.errors import UnsupportedMorphError

    if not isinstance(m, _CONV):
        raise UnsupportedMorphError(f"--kernel applies to Conv1d/2d/3d, not {type(m).__name__}")
    if size % 2 == 0:
        raise UnsupportedMorphError(f"--kernel must be odd to stay centred, not {size}")
    if isinstance(m.padding, str):
        raise UnsupportedMorphError(f"padding={m.padding!r} is symbolic; --kernel needs numbers")
    if m.padding_mode != "zeros":
        raise UnsupportedMorphError(
            f"padding_mode={m.padding_mode!r}: only zero padding keeps the grown kernel exact")
    grow = []
    for k in m.kernel_size:
        if size < k or (size - k) % 2:
            raise UnsupportedMorphError(
                f"--kernel {size} cannot centre the existing {tuple(m.kernel_size)} kernel "
                "(it must be larger by an even amount)")
        grow.append((size - k) // 2)
    pad: list[int] = []
    for g in reversed(grow):
        pad += [g, g]
    new = shallow_copy(m)
    set_param(new, "weight", torch.nn.functional.pad(m.weight.detach(), pad))
    new.kernel_size = tuple(size for _ in m.kernel_size)
    new.padding = tuple(p + g * d for p, g, d in zip(m.padding, grow, m.dilation, strict=True))
    new._reversed_padding_repeated_twice = [x for p in reversed(new.padding) for x in (p, p)]
    return new
