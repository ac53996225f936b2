"""Channel maps: which original unit each unit of a widened tensor mirrors, and how to resize
weights along one axis by such a map (Net2WiderNet copies, or NetMorph zero-init units)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

COPY, ZERO = "copy", "zero"


@dataclass(frozen=True)
class ChannelMap:
    """``src[j]``: the original unit that unit ``j`` copies (copy init) or whose per-channel
    parameters it borrows (zero init); ``new[j]``: unit ``j`` did not exist before."""

    src: torch.Tensor
    new: torch.Tensor
    old_width: int

    @property
    def width(self) -> int:
        return int(self.src.numel())

    @staticmethod
    def identity(width: int) -> ChannelMap:
        return ChannelMap(torch.arange(width), torch.zeros(width, dtype=torch.bool), width)

    @staticmethod
    def grow(old: int, new_width: int, gen: torch.Generator) -> ChannelMap:
        """The first ``old`` units unchanged, then new ones mirroring random originals."""
        extra = torch.randint(0, old, (new_width - old,), generator=gen)
        new = torch.arange(new_width) >= old
        return ChannelMap(torch.cat([torch.arange(old), extra]), new, old)

    @staticmethod
    def grow_blocks(old: int, new_width: int, blocks: int, gen: torch.Generator) -> ChannelMap:
        """``grow`` within each of ``blocks`` equal blocks (the groups of a grouped conv)."""
        old_b, new_b = old // blocks, new_width // blocks
        parts = [ChannelMap.grow(old_b, new_b, gen) for _ in range(blocks)]
        src = torch.cat([p.src + i * old_b for i, p in enumerate(parts)])
        return ChannelMap(src, torch.cat([p.new for p in parts]), old)

    @staticmethod
    def grow_segments(old_sizes: list[int], new_sizes: list[int], gen: torch.Generator,
                      replicate: bool = False) -> ChannelMap:
        """``grow`` (or ``replicate``) each consecutive segment of the units on its own: the
        new units of a segment follow it and copy units of it (pieces of a split)."""
        src, new, start = [], [], 0
        for old, width in zip(old_sizes, new_sizes, strict=True):
            if old:
                part = (ChannelMap.replicate(old, width) if replicate
                        else ChannelMap.grow(old, width, gen))
                src.append(part.src + start)
                new.append(part.new)
            start += old
        empty = torch.zeros(0, dtype=torch.long)
        return ChannelMap(torch.cat([empty, *src]), torch.cat([empty.bool(), *new]), start)

    @staticmethod
    def replicate(old: int, new_width: int, blocks: int = 1) -> ChannelMap:
        """Every unit copied ``new_width // old`` times, within each of ``blocks`` blocks (the
        original units first in each block, as ``grow_blocks`` places them): the layout that
        keeps a LayerNorm's mean and variance over the units."""
        copies, old_b = new_width // old, old // blocks
        block = torch.arange(old_b).repeat(copies)
        src = torch.cat([block + i * old_b for i in range(blocks)])
        fresh = torch.arange(old_b * copies) >= old_b
        return ChannelMap(src, fresh.repeat(blocks), old)

    def counts(self) -> torch.Tensor:
        """How many units mirror each original unit (the Net2WiderNet divisor)."""
        return torch.bincount(self.src, minlength=self.old_width)

    def concat(self, other: ChannelMap) -> ChannelMap:
        """The map of ``cat([a, b])`` given the maps of ``a`` and ``b``."""
        return ChannelMap(torch.cat([self.src, other.src + self.old_width]),
                          torch.cat([self.new, other.new]), self.old_width + other.old_width)

    def expand(self, block: int) -> ChannelMap:
        """Each unit becomes ``block`` consecutive units (flattening trailing dimensions)."""
        offs = torch.arange(block)
        src = (self.src[:, None] * block + offs).reshape(-1)
        return ChannelMap(src, self.new.repeat_interleave(block), self.old_width * block)

    def same_as(self, other: ChannelMap) -> bool:
        return (self.old_width == other.old_width and torch.equal(self.src, other.src)
                and torch.equal(self.new, other.new))


def grow_outputs(t: torch.Tensor, axis: int, cmap: ChannelMap, init: str,
                 gen: torch.Generator, noise: float = 0.0, is_bias: bool = False) -> torch.Tensor:
    """Rows of a producer: copies of their source units (copy), or fresh random units at the
    scale of the existing ones (zero; biases of new units start at 0)."""
    out = t.detach().index_select(axis, cmap.src)  # a new tensor: the only full-size copy
    new_idx = cmap.new.nonzero().flatten()
    if new_idx.numel() == 0:
        return out
    if init == ZERO:
        fresh = torch.zeros_like(out.index_select(axis, new_idx))
        if not is_bias:
            std = float(t.detach().float().std()) if t.numel() > 1 else 1.0
            fresh = torch.randn(fresh.shape, generator=gen, dtype=out.dtype) * (std or 1.0)
        out.index_copy_(axis, new_idx, fresh)
    if noise and not is_bias:
        sl = out.index_select(axis, new_idx)
        noisy = sl + torch.randn(sl.shape, generator=gen, dtype=sl.dtype) * noise
        out.index_copy_(axis, new_idx, noisy)
    return out


def grow_inputs(t: torch.Tensor, axis: int, cmap: ChannelMap, init: str,
                gen: torch.Generator, noise: float = 0.0) -> torch.Tensor:
    """Columns of a consumer: divided by the replication count (copy), or zero for new units
    (zero), so the layer's output is unchanged."""
    out = t.detach().index_select(axis, cmap.src)  # a new tensor, changed in place below
    shape = [1] * out.dim()
    shape[axis] = -1
    new_idx = cmap.new.nonzero().flatten()
    if init == COPY:
        out.div_(cmap.counts().index_select(0, cmap.src).to(out.dtype).reshape(shape))
    else:
        out.index_fill_(axis, new_idx, 0)
    if noise and new_idx.numel():
        sl = out.index_select(axis, new_idx)
        noisy = sl + torch.randn(sl.shape, generator=gen, dtype=sl.dtype) * noise
        out.index_copy_(axis, new_idx, noisy)
    return out


def follow(t: torch.Tensor, axis: int, cmap: ChannelMap) -> torch.Tensor:
    """Per-channel parameters and statistics follow the map (BatchNorm, depthwise filters)."""
    return t.detach().index_select(axis, cmap.src)


M = TypeVar("M", bound=nn.Module)


def shallow_copy(m: M) -> M:
    """A new module object whose parameter and buffer tables can be replaced without touching
    ``m`` (which the original model still uses)."""
    new = copy.copy(m)
    new._parameters = m._parameters.copy()
    new._buffers = m._buffers.copy()
    new._modules = m._modules.copy()
    return new


def set_param(m: nn.Module, name: str, value: torch.Tensor) -> None:
    old = m._parameters[name]
    assert old is not None
    m._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)


def set_buffer(m: nn.Module, name: str, value: torch.Tensor) -> None:
    m._buffers[name] = value
