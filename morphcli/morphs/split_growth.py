"""The widened layer's map when pieces of a split take ranges of its units
(``morphs.coupling_split``): each range grows on its own, by its share of the new units, and
ranges that must carry the same units grow alike."""

from __future__ import annotations

import torch

from morphcli.errors import UnsupportedMorphError
from morphcli.morphs.coupling_plan import Coupling
from morphcli.morphs.split_ops import running
from morphcli.rules.channel_map import ChannelMap


def root_map(plan: Coupling, old: int, width: int, blocks: int, uniform: bool,
             gen: torch.Generator) -> ChannelMap:
    """The widened layer's map when pieces take ranges of its units: every range (and every
    block of a grouped convolution) grows on its own, by its share of the new units; tied
    ranges grow alike."""
    step = old // blocks
    edges = sorted({0, old, *plan.segments, *(step * k for k in range(1, blocks))})
    sizes = [b - a for a, b in zip(edges, edges[1:], strict=False)]
    if plan.tied and blocks > 1:
        raise UnsupportedMorphError("cannot widen: pieces that must carry the same units meet "
                                    "a grouped convolution")
    classes = _tie_classes(edges, plan.tied)
    frozen = [any(lo <= a < hi for lo, hi in plan.frozen_ranges) for a in edges[:-1]]
    if any(frozen):
        return _around_frozen(sizes, frozen, width, blocks, uniform or bool(plan.tied), gen)
    if uniform:
        grown = [s * (width // old) for s in sizes]
    elif plan.tied:
        grown = _tied_shares(sizes, classes, width)
    else:
        grown = []
        block_of = [a // step for a in edges[:-1]]
        for b in range(blocks):
            mine = [s for s, k in zip(sizes, block_of, strict=True) if k == b]
            grown.extend(_shares(mine, width // blocks))
    cmap = ChannelMap.grow_segments(sizes, grown, gen, replicate=uniform)
    if not plan.tied:
        return cmap
    # every segment of a class takes the layout its first one drew
    starts_old, starts_new = edges[:-1], [0, *running(grown)][:-1]
    src, new = cmap.src.clone(), cmap.new.clone()
    for i, first in enumerate(classes):
        if first != i:
            a, b, n = starts_new[first], starts_new[i], grown[i]
            src[b:b + n] = cmap.src[a:a + n] - starts_old[first] + starts_old[i]
            new[b:b + n] = cmap.new[a:a + n]
    return ChannelMap(src, new, old)


def _around_frozen(sizes: list[int], frozen: list[bool], width: int, blocks: int,
                   constrained: bool, gen: torch.Generator) -> ChannelMap:
    """Segments a product sums over keep their size; the others share the new units."""
    free = [s for s, f in zip(sizes, frozen, strict=True) if not f]
    if not free or constrained or blocks > 1:
        why = ("every piece of them is summed over by a product" if not free else
               "the pieces that can grow must also grow alike or in groups")
        raise UnsupportedMorphError(f"cannot widen: pieces of the units reach a product that "
                                    f"sums over them (as a query and a key), so they keep "
                                    f"their width, and {why}")
    shares = iter(_shares(free, width - sum(s for s, f in zip(sizes, frozen, strict=True) if f)))
    grown = [s if f else next(shares) for s, f in zip(sizes, frozen, strict=True)]
    return ChannelMap.grow_segments(sizes, grown, gen)


def _tie_classes(edges: list[int], tied: list[tuple[int, int, int]]) -> list[int]:
    """For each segment between ``edges``, the first segment it must grow like."""
    index = {a: i for i, a in enumerate(edges[:-1])}
    parent = list(range(len(index)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b, n in tied:
        for x in edges:
            if a <= x < a + n:
                i, j = find(index[x]), find(index[x - a + b])
                parent[max(i, j)] = min(i, j)
    return [find(i) for i in range(len(parent))]


def _tied_shares(sizes: list[int], classes: list[int], width: int) -> list[int]:
    """``_shares`` where the segments of a class grow by the same number of units."""
    members: dict[int, list[int]] = {}
    for i, c in enumerate(classes):
        members.setdefault(c, []).append(i)
    firsts = sorted(members)
    extra, old = width - sum(sizes), sum(sizes)
    exact = [extra * sizes[c] / old for c in firsts]
    per = [int(x) for x in exact]
    left = extra - sum(p * len(members[c]) for p, c in zip(per, firsts, strict=True))
    for k in sorted(range(len(firsts)), key=lambda k: (per[k] - exact[k], k)):
        n = len(members[firsts[k]])
        if n <= left:
            per[k] += 1
            left -= n
    if left:
        raise UnsupportedMorphError(
            f"cannot widen to {width} units: pieces that must carry the same units grow by the "
            "same number of units, which this width does not allow (e.g. --factor 2)")
    out = list(sizes)
    for p, c in zip(per, firsts, strict=True):
        for i in members[c]:
            out[i] += p
    return out


def _shares(sizes: list[int], total: int) -> list[int]:
    """``sizes`` grown to sum to ``total``, each in proportion (largest remainders first)."""
    old = sum(sizes)
    extra = total - old
    exact = [extra * s / old for s in sizes]
    floor = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (floor[i] - exact[i], i))
    for i in order[: extra - sum(floor)]:
        floor[i] += 1
    return [s + f for s, f in zip(sizes, floor, strict=True)]
