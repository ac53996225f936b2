"""What the coupling walk finds (``morphs.coupling``): groups of tensors that must carry the
same units, the layers they touch, and the channel map each group gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx as fx

from morphcli.errors import UnsupportedMorphError
from morphcli.rules.channel_map import ChannelMap

PRODUCT_REFUSAL = ("it multiplies along the widened axis (a product of two activations, as a "
                   "query and a key): each new unit would add its product to every sum, and "
                   "no weight after the product can take it out")


@dataclass
class Group:
    """Tensors that must carry the same units. ``source`` defines their map: the widened
    layer (None) or a concat/flatten node whose map derives from its inputs."""

    source: fx.Node | None
    cmap: ChannelMap | None = None
    blocks: int = 1  # grouped convolutions in the group: new units must stay in their group
    # A LayerNorm normalising over the units: every unit must be copied equally often
    # (ChannelMap.replicate), so that its mean and variance stay the same.
    uniform: fx.Node | None = None
    # A reshape splits the units into (outer, heads, inner) axes: new units come as whole
    # heads, alike in every outer block (``coupling_sizes.tiled``); the reshape node.
    heads: tuple[int, int, fx.Node] | None = None
    # The group carries one range of another tensor's units (a split's piece, a concat's part)
    # or assembles a tensor from its pieces' groups (``morphs.coupling_split``).
    layout: Piece | Whole | None = None


@dataclass(frozen=True)
class Piece:
    """Units ``lo:hi`` of ``whole`` (old positions along the widened axis)."""

    whole: fx.Node
    lo: int
    hi: int


@dataclass(frozen=True)
class Whole:
    """``whole``'s units are its pieces' units, side by side; what no widened piece covers
    stays as it was."""

    whole: fx.Node


@dataclass
class Coupling:
    """Everything a widen changes: tensor groups and the layers touched."""

    tensors: dict[fx.Node, tuple[int, Group]] = field(default_factory=dict)
    producers: list[fx.Node] = field(default_factory=list)  # outputs grow
    consumers: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (layer, input)
    channelwise: list[fx.Node] = field(default_factory=list)
    derived: dict[fx.Node, Callable[[], ChannelMap]] = field(default_factory=dict)
    # Reads of the widened size (``x.shape[-1]``) and the old size each gets (coupling_sizes)
    size_reads: list[tuple[fx.Node, int]] = field(default_factory=list)
    rewrites: list[tuple[fx.Node, fx.Node]] = field(default_factory=list)  # (reshape, input)
    attrs: list[fx.Node] = field(default_factory=list)  # get_attr tensors that follow the map
    norm_shapes: list[fx.Node] = field(default_factory=list)  # F.layer_norm: normalized_shape
    cuts: list[fx.Node] = field(default_factory=list)  # split/chunk/slice ops whose sizes change
    segments: list[int] = field(default_factory=list)  # where the root map must keep units apart
    # Pieces that must carry the same units (GhostNet's ``cat([x, dw(x)])``), as groups and as
    # (start, start, length) ranges of the root's units that must grow alike.
    ties: list[tuple[Group, Group]] = field(default_factory=list)
    tied: list[tuple[int, int, int]] = field(default_factory=list)
    # Pieces of a split that a product sums over (EfficientViT's queries and keys): they keep
    # their width, the other pieces take the new units. (group, product) and, once the walk
    # is done, their ranges of the root's units.
    frozen: list[tuple[Group, fx.Node]] = field(default_factory=list)
    frozen_ranges: list[tuple[int, int]] = field(default_factory=list)
    # Tensors whose units interleave another's (outer x units x inner, outer > 1: a channel
    # shuffle, Swin's patch merging): no range of them is one range of their input's units.
    interleaved: set[fx.Node] = field(default_factory=set)
    # Groups that hold the same units by construction (a split into heads merged back):
    # their maps must come out equal.
    same: list[tuple[Group, Group]] = field(default_factory=list)

    def map_of(self, node: fx.Node) -> ChannelMap:
        cmap = self.tensors[node][1].cmap
        assert cmap is not None
        return cmap


def assign_maps(plan: Coupling, target: fx.Node, root_map: ChannelMap) -> None:
    """Give every group its map: the root's is given; derived ones are computed from their
    inputs once those are known."""
    plan.tensors[target][1].cmap = root_map
    pending = dict(plan.derived)
    while pending:
        progressed = False
        for node, derive in list(pending.items()):
            try:
                cmap = derive()
            except AssertionError:
                continue  # an input's map is not known yet
            plan.tensors[node][1].cmap = cmap
            del pending[node]
            progressed = True
        if not progressed:
            raise UnsupportedMorphError("cannot widen: the channel layouts depend on each other "
                                        "in a cycle")
    for node, (_, group) in plan.tensors.items():
        if group.cmap is None:
            raise UnsupportedMorphError(f"cannot widen: no channel layout for node {node.name!r}")
