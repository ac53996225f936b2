"""Widening the embedding that a self-attention layer reads and writes (a transformer's stream).

``nn.MultiheadAttention`` has one width, ``embed_dim``, for its input, its output and its
queries, keys and values, so the stream's units pass through it like a channelwise layer: its
input columns and output rows follow the stream's map. Its inner width grows with it, head by
head: head j's original dimensions keep their place at the start of the (wider) head, and the
new ones get random queries and values but zero keys and zero output columns, so every score
``q·k`` and every output is unchanged and training still reaches them (zero keys get gradients
through the random queries, zero output columns through the random values). Queries are scaled
by sqrt(new head_dim / old head_dim), which undoes the wider head's 1/sqrt(head_dim).
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

from morphcli.errors import UnsupportedMorphError
from morphcli.rules.channel_map import (
    ChannelMap,
    grow_inputs,
    set_param,
    shallow_copy,
)
from morphcli.rules.registry import register

L = TypeVar("L", bound=nn.Linear)


@register("channelwise", nn.MultiheadAttention)
class SelfAttentionRule:
    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return rank - 1

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return True

    @staticmethod
    def why_not(m: nn.Module) -> str | None:
        if not m._qkv_same_embed_dim:
            return "its keys and values have their own widths (kdim, vdim)"
        if m.bias_k is not None or m.add_zero_attn:
            return "it appends learned or zero keys (add_bias_kv, add_zero_attn)"
        return None

    @staticmethod
    def resize(m: nn.MultiheadAttention, cmap: ChannelMap, ctx) -> nn.Module:
        heads, old = m.num_heads, m.embed_dim
        width = cmap.width
        if width % heads:
            raise UnsupportedMorphError(
                f"cannot widen: a MultiheadAttention with {heads} heads needs a width that is a "
                f"multiple of {heads}, not {width}")
        d_old, d_new = old // heads, width // heads
        # Where each original inner dimension goes: the start of its (wider) head.
        kept = (torch.arange(old) // d_old) * d_new + torch.arange(old) % d_old
        fresh = torch.ones(width, dtype=torch.bool)
        fresh[kept] = False
        scale = math.sqrt(d_new / d_old)
        weight = grow_inputs(m.in_proj_weight, 1, cmap, ctx.init, ctx.gen)  # (3*old, width)
        bias = m.in_proj_bias.detach() if m.in_proj_bias is not None else None
        new_weight = weight.new_zeros(3 * width, width)
        new_bias = weight.new_zeros(3 * width) if bias is not None else None
        std = float(weight.std()) or 1.0
        for part in range(3):  # queries, keys, values
            rows = weight[part * old:(part + 1) * old]
            block = new_weight[part * width:(part + 1) * width]
            block[kept] = rows * scale if part == 0 else rows
            if part != 1 and not getattr(ctx, "state", False):  # new queries and values
                # are random (their optimizer state zero); new keys stay zero
                block[fresh] = torch.randn(int(fresh.sum()), width, generator=ctx.gen,
                                           dtype=block.dtype) * std
            if bias is not None and new_bias is not None:
                b = bias[part * old:(part + 1) * old]
                new_bias[part * width:(part + 1) * width][kept] = b * scale if part == 0 else b

        new = shallow_copy(m)
        set_param(new, "in_proj_weight", new_weight)
        if new_bias is not None:
            set_param(new, "in_proj_bias", new_bias)
        new.out_proj = _out_projection(m.out_proj, cmap, kept, width, ctx)
        new.embed_dim = new.kdim = new.vdim = width
        new.head_dim = d_new
        return new


def _out_projection(proj: L, cmap: ChannelMap, kept: torch.Tensor, width: int, ctx) -> L:
    """Rows follow the stream's map; the new inner dimensions get zero columns."""
    rows = ctx.grown_rows(proj.weight, 0, cmap)
    weight = rows.new_zeros(width, width)
    weight[:, kept] = rows
    new = shallow_copy(proj)
    set_param(new, "weight", weight)
    if proj.bias is not None:
        set_param(new, "bias", ctx.grown_rows(proj.bias, 0, cmap, is_bias=True))
    new.in_features = new.out_features = width
    return new
