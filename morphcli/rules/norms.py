"""Channelwise rules: layers whose per-channel parameters and statistics follow a channel map."""

from __future__ import annotations

from typing import TypeVar

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from morphcli.modules import FeaturesLastBatchNorm
from morphcli.rules.channel_map import ChannelMap, follow, set_buffer, set_param, shallow_copy
from morphcli.rules.registry import register

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
       nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)

N = TypeVar("N", bound=nn.Module)


@register("channelwise", *_BN)
class NormRule:
    """BatchNorm/InstanceNorm normalise each channel alone: parameters and running statistics
    are indexed by the map, so copied channels are normalised exactly like their source."""

    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return 1

    @staticmethod
    def why_not(m: nn.Module) -> str | None:
        return None

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return True

    @staticmethod
    def resize(m: _NormBase, cmap: ChannelMap, ctx: object) -> nn.Module:
        new = _with_affine_followed(m, cmap)
        for name in ("running_mean", "running_var"):
            buffer = m._buffers.get(name)
            if buffer is not None:
                set_buffer(new, name, follow(buffer, 0, cmap))
        new.num_features = cmap.width
        return new


@register("channelwise", FeaturesLastBatchNorm)
class FeaturesLastNormRule(NormRule):
    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return rank - 1


@register("channelwise", nn.LayerNorm)
class LayerNormRule:
    """LayerNorm over the widened (last) axis: its mean and variance over the units stay the
    same only when every unit is copied equally often, so it is never channelwise on its own
    (``applies`` is False); the coupling walk arranges such a map (``Group.uniform``) and then
    resizes it here. Over other axes it passes the units through (``LayerNormAcross``)."""

    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return rank - 1

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return False

    @staticmethod
    def why_not(m: nn.LayerNorm) -> str | None:
        if len(m.normalized_shape) != 1:
            return (f"LayerNorm over {len(m.normalized_shape)} axes normalises over the widened "
                    "units together with others")
        return None

    @staticmethod
    def resize(m: nn.LayerNorm, cmap: ChannelMap, ctx: object) -> nn.Module:
        new = _with_affine_followed(m, cmap)
        new.normalized_shape = (cmap.width,)
        return new


@register("channelwise", nn.GroupNorm)
class GroupNormRule:
    """GroupNorm with one channel per group is channelwise. With more channels per group, new
    channels would join a group's statistics: the coupling walk copies every channel of a
    group equally often inside its group (``Group.uniform``, one block per group), which
    keeps them, and then resizes it here."""

    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return 1

    @staticmethod
    def applies(m: nn.GroupNorm) -> bool:
        return m.num_groups == m.num_channels

    @staticmethod
    def why_not(m: nn.GroupNorm) -> str | None:
        return None

    @staticmethod
    def resize(m: nn.GroupNorm, cmap: ChannelMap, ctx: object) -> nn.Module:
        new = _with_affine_followed(m, cmap)
        if m.num_groups == m.num_channels:
            new.num_groups = cmap.width
        new.num_channels = cmap.width
        return new


@register("channelwise", nn.PReLU)
class PReLURule:
    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return 1

    @staticmethod
    def applies(m: nn.PReLU) -> bool:
        return m.num_parameters > 1

    @staticmethod
    def why_not(m: nn.Module) -> str | None:
        return None

    @staticmethod
    def resize(m: nn.PReLU, cmap: ChannelMap, ctx: object) -> nn.Module:
        new = shallow_copy(m)
        set_param(new, "weight", follow(m.weight, 0, cmap))
        new.num_parameters = cmap.width
        return new


def _with_affine_followed(m: N, cmap: ChannelMap) -> N:
    """A copy of norm layer ``m`` whose per-unit scale and shift (if any) follow the map."""
    new = shallow_copy(m)
    for name in ("weight", "bias"):
        param = m._parameters.get(name)
        if param is not None:
            set_param(new, name, follow(param, 0, cmap))
    return new
