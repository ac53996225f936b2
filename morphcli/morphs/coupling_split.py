"""Splits along the widened axis, for the coupling walk (``morphs.coupling``).

A split (``split``, ``chunk``, ``tensor_split``, a slice ``x[:, a:b]``) cuts a tensor (the
whole) into pieces that each hold a range of its units; a concatenation is the same cut seen
from the other side. Walking forward into a split, each piece gets a group whose map is its
range of the whole's map. Walking backward from a piece (or a concat's output), the whole's map
is assembled from the maps of its widened pieces, its other units left as they are. For a
piece to receive exactly its old units and the new copies of them, the root map keeps the
units of every range together (``Coupling.segments``, for ``split_growth.root_map``); the split
sizes and slice bounds are then rewritten to the new widths (``rewrite``).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from morphcli.errors import UnsupportedMorphError
from morphcli.graph.edit import tensor_shape
from morphcli.morphs.coupling_ops import arg
from morphcli.morphs.coupling_plan import PRODUCT_REFUSAL, Coupling, Group, Piece, Whole
from morphcli.morphs.result import Change
from morphcli.morphs.split_ops import (
    Range,
    cut_axis,
    is_cat,
    is_flatten,
    is_split,
    running,
    slice_entries,
    slice_range,
    split_pieces,
    split_sizes,
    width_of,
)
from morphcli.rules.channel_map import ChannelMap

if TYPE_CHECKING:
    from morphcli.morphs.coupling import _Walker



# -- the walk


def forward(w: _Walker, node: fx.Node, user: fx.Node, dim: int, rank: int) -> bool:
    """``user`` reads the widened ``node``: handled here if it cuts it (or is the concat that
    ``node`` is a part of); False leaves it to the walk."""
    plan = w.plan
    group = plan.tensors[node][1]
    if is_cat(user) and arg(user, 1, "dim", 0) % rank == dim and user in plan.tensors and \
            plan.tensors[user][1].source is not user:
        # a concat whose layout was set from its output's side: its parts are pieces of it
        # (or tied to one: MambaOut's ``g * cat(i, conv(c))``, g, i, c pieces of one split)
        tied = [b if a is group else a for a, b in plan.ties if group is a or group is b]
        if any(isinstance(g.layout, Piece) and g.layout.whole is user for g in [group, *tied]):
            return True
        w.refuse(user, "two differently laid out sets of units meet here")
    cut = _cut_of(w, user, node, dim, rank)
    if cut is None:
        return False
    ranges, pieces, out_dims, along = cut
    if not along:  # cut along another axis: every piece has every unit
        for nodes, d in zip(pieces, out_dims, strict=True):
            for p in nodes:
                w.follow(p, d, group)
        return True
    if user not in plan.cuts:
        plan.cuts.append(user)
    if isinstance(group.layout, Whole) and group.layout.whole is node:
        return True  # its map is assembled from its pieces; the others keep their units
    for (lo, hi), nodes, d in zip(ranges, pieces, out_dims, strict=True):
        if nodes:
            _restricted(w, node, nodes, lo, hi, d, source=nodes[0])
    return True


def backward(w: _Walker, node: fx.Node, dim: int, group: Group) -> bool:
    """``node`` must carry ``group``'s units: handled here if it is a concat along the units
    or a piece of a cut tensor; False leaves it to the walk."""
    if is_cat(node):
        rank = len(tensor_shape(node) or ())
        if arg(node, 1, "dim", 0) % rank != dim:
            return False
        _cat_parts(w, node, dim)
        return True
    found = _piece_of(w, node, dim)
    if found is None:
        return False
    whole, whole_dim, siblings, along = found
    for s in siblings:  # the same piece read twice (``xs[0]`` at two places)
        if s is not node:
            w.follow(s, dim, group)
    if not along:  # cut along another axis: the whole has the same units
        w.join(whole, whole_dim, group)
        return True
    plan = w.plan
    if whole in plan.tensors:
        held_dim, held = plan.tensors[whole]
        layout = held.layout
        if not (isinstance(layout, Whole) and layout.whole is whole) or held_dim != whole_dim:
            w.refuse(node, "two differently laid out sets of units meet here")
        if is_cat(whole):
            _cat_parts(w, whole, whole_dim)  # the parts under this piece now carry units
        return True
    assembled = Group(node, layout=Whole(whole))
    plan.derived[whole] = lambda: _assemble(plan, whole)
    w.join(whole, whole_dim, assembled)
    return True


def _restricted(w: _Walker, whole: fx.Node, nodes: list[fx.Node], lo: int, hi: int,
                dim: int, source: fx.Node) -> None:
    """``nodes`` carry units ``lo:hi`` of ``whole``: one new group, its map cut from the
    whole's. ``source`` is the piece itself for a split's output (its units come from the
    whole), or the concat for a concat's part (whose own producers must then be walked)."""
    plan = w.plan
    group = Group(source, layout=Piece(whole, lo, hi))
    plan.derived[nodes[0]] = lambda: _cut_map(plan, whole, lo, hi, nodes[0])
    for n in nodes:
        if source is nodes[0]:
            w.follow(n, dim, group)  # (no walk back from a split's piece: the whole is known)
        else:
            w.join(n, dim, group)


def _cat_parts(w: _Walker, cat: fx.Node, dim: int) -> None:
    """A concat whose output's layout is given: each part under a widened range carries that
    range of it."""
    plan = w.plan
    layout = plan.tensors[cat][1].layout
    width = width_of(cat, dim)
    covered = ([(lo, hi) for lo, hi, _ in _slots(plan, cat)]
               if isinstance(layout, Whole) and layout.whole is cat else [(0, width)])
    start = 0
    for part in arg(cat, 0, "tensors", []):
        if not isinstance(part, fx.Node):
            w.refuse(cat, "one of its parts is not a tensor of the graph")
        end = start + width_of(part, dim)
        if any(lo < end and start < hi for lo, hi in covered) and end > start:
            have = plan.tensors.get(part)
            ok = have is not None and isinstance(have[1].layout, Piece) and \
                have[1].layout.whole is cat and (have[1].layout.lo, have[1].layout.hi) == \
                (start, end)
            if not ok:
                _restricted(w, cat, [part], start, end, dim, source=cat)
        start = end


def tie(plan: Coupling, keep: Group, drop: Group) -> bool:
    """Two pieces of equal width meet (a depthwise conv's output added to the next chunk;
    MambaOut's gate times the concat of the other two pieces): accepted for ``finish`` to
    place, if their ranges of the root can grow alike."""
    a, b = _tied_span(plan, keep), _tied_span(plan, drop)
    if a is None or b is None or a[2] - a[1] != b[2] - b[1]:
        return False
    if not any(k is keep and d is drop or k is drop and d is keep for k, d in plan.ties):
        plan.ties.append((keep, drop))
    return True


def _tied_span(plan: Coupling, group: Group) -> tuple[fx.Node, int, int] | None:
    """The units a group holds as a range of one tensor: a piece's of its whole, a concat's
    (whose parts may be pieces) of itself; None for any other group."""
    layout, source = group.layout, group.source
    if isinstance(layout, Piece):
        return layout.whole, layout.lo, layout.hi
    if layout is None and source is not None and is_cat(source) and source in plan.tensors:
        return source, 0, width_of(source, plan.tensors[source][0])
    return None


# -- what a cut is


def _cut_of(w: _Walker, op: fx.Node, whole: fx.Node, dim: int, rank: int
            ) -> tuple[list[Range], list[list[fx.Node]], list[int], bool] | None:
    """For a split or slice ``op`` of ``whole``: the old unit range of each piece along
    ``dim``, the nodes holding each piece, the axis the units land on in each, and whether
    it cuts along ``dim`` at all; None if ``op`` is no cut of the units."""
    if is_split(op):
        if op.args[0] is not whole:
            return None
        axis = int(arg(op, 2, "dim", 0)) % rank
        sizes = split_sizes(op, width_of(whole, axis))
        if sizes is None:
            w.refuse(op, "its split sizes are computed at run time or cannot be read")
        pieces = split_pieces(op, len(sizes))
        if pieces is None:
            w.refuse(op, "its pieces are used together (only xs[i] of a split is followed)")
        if axis != dim:
            return [(0, width_of(whole, dim))] * len(sizes), pieces, [dim] * len(sizes), False
        bounds = [0, *running(sizes)]
        return list(zip(bounds, bounds[1:], strict=False)), pieces, [dim] * len(sizes), True
    if op.op != "call_function" or op.target is not operator.getitem or op.args[0] is not whole:
        return None
    entries = slice_entries(op)
    if entries is None:
        return None
    at = [e for e in entries if e[1] == dim]
    if not at:
        return None
    item, _, out_axis, _ = at[0]
    if not isinstance(item, slice) or item == slice(None) or out_axis is None:
        return None  # an integer index drops the axis: left to the walk, which refuses it
    span = slice_range(item, width_of(whole, dim))
    if span is None:
        w.refuse(op, "it slices the widened axis with a step or computed bounds")
    return [span], [[op]], [out_axis], True


def _piece_of(w: _Walker, node: fx.Node, dim: int
              ) -> tuple[fx.Node, int, list[fx.Node], bool] | None:
    """If ``node`` is a piece of a split or slice: (the whole, the whole's axis for ``dim``,
    every node holding the same piece, whether the cut narrows that axis)."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    src = node.args[0]
    if not isinstance(src, fx.Node):
        return None
    if is_split(src):
        whole = src.args[0]
        if not isinstance(whole, fx.Node):
            return None
        axis = cut_axis(src, len(tensor_shape(whole) or ()))
        sizes = split_sizes(src, width_of(whole, axis))
        pieces = split_pieces(src, len(sizes)) if sizes is not None else None
        if pieces is None:
            w.refuse(src, "its split sizes or the use of its pieces cannot be followed")
        same = next(p for p in pieces if node in p)
        return whole, dim, same, axis == dim
    entries = slice_entries(node)
    if entries is None:
        return None
    at = [e for e in entries if e[2] == dim and e[1] is not None]
    if not at:
        return None
    item, in_axis = at[0][0], at[0][1]
    assert in_axis is not None
    return src, in_axis, [node], isinstance(item, slice) and item != slice(None)


# -- maps


def _slots(plan: Coupling, whole: fx.Node) -> list[tuple[int, int, fx.Node]]:
    """The widened pieces of ``whole`` (a tensor assembled from them), by old range."""
    dim = plan.tensors[whole][0]
    rank = len(tensor_shape(whole) or ())
    found: dict[Range, fx.Node] = {}
    for op in whole.users:
        ranges: list[Range]
        if is_split(op) and op.args[0] is whole and cut_axis(op, rank) == dim:
            sizes = split_sizes(op, width_of(whole, dim)) or []
            bounds = [0, *running(sizes)]
            ranges = list(zip(bounds, bounds[1:], strict=False))
            pieces = split_pieces(op, len(sizes)) or [[] for _ in sizes]
        else:
            item = next((e[0] for e in slice_entries(op) or [] if e[1] == dim), None)
            span = slice_range(item, width_of(whole, dim)) if isinstance(item, slice) and \
                item != slice(None) and op.args[0] is whole else None
            if span is None:
                continue
            ranges, pieces = [span], [[op]]
        for span, nodes in zip(ranges, pieces, strict=True):
            held = [n for n in nodes if n in plan.tensors]
            if held and span[1] > span[0]:
                found.setdefault(span, held[0])
    slots = sorted((lo, hi, n) for (lo, hi), n in found.items())
    for (_, hi, a), (lo, _, b) in zip(slots, slots[1:], strict=False):
        if lo < hi:
            raise UnsupportedMorphError(
                f"cannot widen: pieces {a.name!r} and {b.name!r} of {whole.name!r} overlap, "
                "and their units cannot be laid out for both")
    return slots


def _assemble(plan: Coupling, whole: fx.Node) -> ChannelMap:
    """The map of a tensor built from its widened pieces' maps; units no widened piece covers
    stay as they were."""
    width = width_of(whole, plan.tensors[whole][0])
    out = ChannelMap.identity(0)
    at = 0
    for lo, hi, node in _slots(plan, whole):
        out = out.concat(ChannelMap.identity(lo - at)).concat(plan.map_of(node))
        at = hi
    return out.concat(ChannelMap.identity(width - at))


def _place(cmap: ChannelMap, lo: int, hi: int) -> Range | None:
    """Where units ``lo:hi`` and their copies sit in the new layout; None if apart."""
    inside = ((cmap.src >= lo) & (cmap.src < hi)).nonzero().flatten()
    if inside.numel() == 0:
        at = int((cmap.src < lo).sum())
        return at, at
    a, b = int(inside[0]), int(inside[-1]) + 1
    return (a, b) if b - a == inside.numel() else None


def _cut_map(plan: Coupling, whole: fx.Node, lo: int, hi: int, node: fx.Node) -> ChannelMap:
    cmap = plan.map_of(whole)  # (an AssertionError while the whole's map is not known yet)
    span = _place(cmap, lo, hi)
    if span is None:
        raise UnsupportedMorphError(
            f"cannot widen: node {node.name!r} takes units {lo}:{hi} of {whole.name!r}, and "
            "the new units of that range cannot be kept next to them")
    a, b = span
    return ChannelMap(cmap.src[a:b] - lo, cmap.new[a:b], hi - lo)


# -- where the root map must keep units together


def finish(plan: Coupling) -> None:
    """Every range a piece takes, in the root's old units: ``root_map`` grows each range on
    its own so that its new units sit beside it."""
    cuts: set[int] = set()
    seen: set[int] = set()
    for _, group in plan.tensors.values():
        layout = group.layout
        if isinstance(layout, Piece) and id(group) not in seen:
            seen.add(id(group))
            _translate(plan, layout.whole, layout.lo, cuts, 0)
            _translate(plan, layout.whole, layout.hi, cuts, 0)
    for group, product in plan.frozen:  # (a Piece: see ``_Walker.batched_product``)
        layout = group.layout
        assert isinstance(layout, Piece)
        start = _root_range(plan, layout.whole, layout.lo, layout.hi)
        if start is None:
            raise UnsupportedMorphError(f"cannot widen: the widened units reach node "
                                        f"{product.name!r}, and {PRODUCT_REFUSAL}")
        plan.frozen_ranges.append((start, start + layout.hi - layout.lo))
        cuts |= {start, start + layout.hi - layout.lo}
    if plan.frozen:
        root = next(n for n, (_, g) in plan.tensors.items() if g.source is None)
        kept = set().union(*(range(a, b) for a, b in plan.frozen_ranges))
        if len(kept) >= width_of(root, plan.tensors[root][0]):
            raise UnsupportedMorphError(
                f"cannot widen: the widened units reach node {plan.frozen[0][1].name!r}, and "
                f"{PRODUCT_REFUSAL} (every piece of them is summed over by a product)")
    tied = [_tied_ranges(plan, a, b) for a, b in plan.ties]
    plan.tied = [t for t in tied if t[0] != t[1]]  # (the same range: alike already)
    while True:  # each range of a tie is cut as the other is (ends: within the root's units)
        mirrored = {x + start for a, b, n in plan.tied for start in (a, b)
                    for x in (0, n, *(c - a for c in cuts if a < c < a + n),
                              *(c - b for c in cuts if b < c < b + n))}
        if mirrored <= cuts:
            break
        cuts |= mirrored
    plan.segments = sorted(cuts)


def _tied_ranges(plan: Coupling, a: Group, b: Group) -> tuple[int, int, int]:
    pa, pb = _tied_span(plan, a), _tied_span(plan, b)
    assert pa is not None and pb is not None  # (tie accepts only these)
    n = pa[2] - pa[1]
    ra, rb = _root_range(plan, *pa), _root_range(plan, *pb)
    if ra is None or rb is None or 0 < abs(ra - rb) < n:
        raise UnsupportedMorphError(
            "cannot widen: two differently laid out sets of units meet (pieces of "
            f"{pa[0].name!r} and {pb[0].name!r} that are not two ranges of the widened "
            "layer's units)")
    return ra, rb, n


def _root_range(plan: Coupling, node: fx.Node, lo: int, hi: int) -> int | None:
    """Where units ``lo:hi`` of ``node`` start among the root's units, if they are one range
    of them."""
    for _ in range(1000):
        dim, group = plan.tensors[node]
        layout, source = group.layout, group.source
        if isinstance(layout, Piece):
            node, lo, hi = layout.whole, lo + layout.lo, hi + layout.lo
        elif isinstance(layout, Whole):
            slot = [(a, n) for a, b, n in _slots(plan, layout.whole) if a <= lo and hi <= b]
            if not slot:
                return None
            node, lo, hi = slot[0][1], lo - slot[0][0], hi - slot[0][0]
        elif source is None:
            return lo
        elif is_cat(source):
            return _root_range_of_parts(plan, source, dim, lo, hi)
        else:
            return None
    return None


def of_root_ranges(plan: Coupling, node: fx.Node, depth: int = 0) -> bool:
    """Whether every unit of ``node`` is a unit of the widened layer's, as one range of them,
    or as pieces (a concat's parts, a whole's slots covering it) that each are."""
    if node not in plan.tensors or depth > 100:
        return False
    dim, group = plan.tensors[node]
    width = width_of(node, dim)
    if _root_range(plan, node, 0, width) is not None:
        return True
    if isinstance(group.layout, Whole) and group.layout.whole is node:
        slots, at = _slots(plan, node), 0
        for lo, hi, piece in slots:
            if lo != at or not of_root_ranges(plan, piece, depth + 1):
                return False
            at = hi
        return at == width
    if group.layout is None and group.source is node and is_cat(node):
        return all(isinstance(p, fx.Node) and of_root_ranges(plan, p, depth + 1)
                   for p in arg(node, 0, "tensors", []))
    return False


def _root_range_of_parts(plan: Coupling, cat: fx.Node, dim: int, lo: int, hi: int
                         ) -> int | None:
    """Where units ``lo:hi`` of a concat start among the root's units, if the parts under
    them hold consecutive ranges of them."""
    start, first, expect = 0, None, None
    for part in arg(cat, 0, "tensors", []):
        end = start + width_of(part, dim)
        a, b = max(lo, start), min(hi, end)
        if a < b:
            if part not in plan.tensors:
                return None
            at = _root_range(plan, part, a - start, b - start)
            if at is None or (expect is not None and at != expect):
                return None
            first = at if first is None else first
            expect = at + b - a
        start = end
    return first


def _translate(plan: Coupling, node: fx.Node, p: int, out: set[int], depth: int) -> None:
    """Unit boundary ``p`` of ``node`` as a boundary of the root's units (if it falls inside
    widened units at all)."""
    dim, group = plan.tensors[node]
    if p <= 0 or p >= width_of(node, dim):
        return
    if depth > 1000:
        raise UnsupportedMorphError("cannot widen: the split layouts nest too deeply")
    layout, source = group.layout, group.source
    if isinstance(layout, Piece):
        _translate(plan, layout.whole, p + layout.lo, out, depth + 1)
    elif isinstance(layout, Whole):
        for lo, hi, piece in _slots(plan, layout.whole):
            if lo < p < hi:
                _translate(plan, piece, p - lo, out, depth + 1)
    elif source is None:
        out.add(p)
    elif is_cat(source):
        start = 0
        for part in arg(source, 0, "tensors", []):
            end = start + width_of(part, dim)
            if start < p < end and part in plan.tensors:
                _translate(plan, part, p - start, out, depth + 1)
            start = end
    elif source in plan.interleaved:
        raise UnsupportedMorphError(
            f"cannot widen: a split cuts the units that {source.name!r} interleaves (as a "
            "channel shuffle does), and no range of them is one range of the widened units")
    elif is_flatten(source) and isinstance(source.args[0], fx.Node) and \
            source.args[0] in plan.tensors:
        inp = source.args[0]
        wide = width_of(source, plan.tensors[source][0])
        narrow = width_of(inp, plan.tensors[inp][0])
        if wide < narrow or wide % narrow:  # a split of the units into heads
            raise UnsupportedMorphError(
                f"cannot widen: a split cuts the units that {source.name!r} splits into heads, "
                "and no range of them is one range of the widened units")
        block = wide // narrow
        if p % block:
            raise UnsupportedMorphError(
                f"cannot widen: a split cuts through the features that {source.name!r} "
                "flattens out of one unit")
        _translate(plan, inp, p // block, out, depth + 1)
    else:
        raise UnsupportedMorphError(
            f"cannot widen: a split's range cannot be traced back through {source.name!r}")


# -- rewriting the graph


def rewrite(plan: Coupling) -> list[Change]:
    """Split sizes and slice bounds of every cut of a widened tensor, to the new widths."""
    for a, b in [*plan.ties, *plan.same]:
        if a.cmap is None or b.cmap is None or not a.cmap.same_as(b.cmap):
            raise UnsupportedMorphError("cannot widen: two pieces that must carry the same "
                                        "units would be laid out differently")
    for group, product in plan.frozen:
        if group.cmap is None or group.cmap.width != group.cmap.old_width:
            raise UnsupportedMorphError(f"cannot widen: the widened units reach node "
                                        f"{product.name!r}, and {PRODUCT_REFUSAL}")
    changes = []
    for op in plan.cuts:
        whole = op.args[0]
        assert isinstance(whole, fx.Node)
        dim = plan.tensors[whole][0]
        cmap = plan.map_of(whole)
        if is_split(op):
            sizes = split_sizes(op, width_of(whole, dim))
            assert sizes is not None  # (read by the walk)
            bounds = [0, *running(sizes)]
            spans = [_place(cmap, a, b) for a, b in zip(bounds, bounds[1:], strict=False)]
            new = [s[1] - s[0] for s in spans if s is not None]
            at = [s[0] for s in spans if s is not None]
            if len(new) != len(sizes) or at != [0, *running(new)][:-1]:
                raise UnsupportedMorphError(
                    f"cannot widen: the pieces of split {op.name!r} would not hold their own "
                    "units side by side")
            _check_pieces(plan, op, cmap, bounds, split_pieces(op, len(sizes)) or [])
            old_text, axis = str(sizes), arg(op, 2, "dim", 0)
            op.target = "split" if op.op == "call_method" else torch.split
            op.args, op.kwargs = (whole, new), {"dim": axis}
            changes.append(Change("rewired", op.name, old_text, str(new), "split sizes"))
            continue
        entries = slice_entries(op) or []
        item, _, _, pos = next(e for e in entries if e[1] == dim)
        span = slice_range(item, width_of(whole, dim))
        assert span is not None and pos is not None  # (read by the walk)
        place = _place(cmap, *span)
        if place is None:
            raise UnsupportedMorphError(
                f"cannot widen: slice {op.name!r} would not hold its own units side by side")
        _check_pieces(plan, op, cmap, list(span), [[op]])
        index = op.args[1]
        items = list(index) if isinstance(index, tuple) else [index]
        items[pos] = slice(place[0], place[1])
        op.args = (whole, tuple(items) if isinstance(index, tuple) else items[0])
        changes.append(Change("rewired", op.name, f"{span[0]}:{span[1]}",
                              f"{place[0]}:{place[1]}", "slice bounds"))
    return changes


def _check_pieces(plan: Coupling, op: fx.Node, cmap: ChannelMap, bounds: list[int],
                  pieces: list[list[fx.Node]]) -> None:
    """Every piece receives exactly its range of the whole's new layout: a widened piece has
    that range's map, one the walk did not widen keeps exactly its old units."""
    for (lo, hi), nodes in zip(zip(bounds, bounds[1:], strict=False), pieces, strict=False):
        span = _place(cmap, lo, hi)
        assert span is not None  # (checked by the caller)
        cut = ChannelMap(cmap.src[span[0]:span[1]] - lo, cmap.new[span[0]:span[1]], hi - lo)
        for n in nodes:
            group = plan.tensors[n][1] if n in plan.tensors else None
            if group is None and cut.same_as(ChannelMap.identity(hi - lo)):
                continue
            if group is not None and group.cmap is not None and group.cmap.same_as(cut):
                continue
            raise UnsupportedMorphError(
                f"cannot widen: piece {n.name!r} of {op.name!r} would not receive the units "
                "its consumers are widened for")
