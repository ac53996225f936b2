"""Layers without per-channel parameters that keep the channel axis: activations, dropout,
pooling. ``keeps(m, dim, rank)`` says whether widened units on ``dim`` pass through unchanged."""

from __future__ import annotations

from torch import nn

from morphcli.modules import StochasticDepth
from morphcli.rules.registry import register

_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout, StochasticDepth,
)
_POOLS = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d,
    nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ChannelShuffle,
)


@register("passthrough", *_ELEMENTWISE)
class Elementwise:
    @staticmethod
    def keeps(m: nn.Module, dim: int, rank: int) -> bool:
        return True


@register("passthrough", nn.PReLU)
class SharedSlopePReLU:
    """PReLU with one shared slope is elementwise; per-channel PReLU is channelwise."""

    @staticmethod
    def keeps(m: nn.PReLU, dim: int, rank: int) -> bool:
        return m.num_parameters == 1


@register("passthrough", nn.Softmax, nn.LogSoftmax, nn.Softmin)
class AlongDim:
    """Softmax mixes units along its own dimension only."""

    @staticmethod
    def keeps(m: nn.Softmax | nn.LogSoftmax | nn.Softmin, dim: int, rank: int) -> bool:
        return m.dim is not None and m.dim % rank != dim


@register("passthrough", *_POOLS)
class Spatial:
    """Pooling, padding and upsampling act on the trailing spatial dimensions, one channel at
    a time (ChannelShuffle excepted: it permutes channels)."""

    @staticmethod
    def keeps(m: nn.Module, dim: int, rank: int) -> bool:
        return dim == 1 and not isinstance(m, nn.ChannelShuffle)


@register("passthrough", nn.LayerNorm)
class LayerNormAcross:
    """LayerNorm is per position over its trailing dims: other dims pass through."""

    @staticmethod
    def keeps(m: nn.LayerNorm, dim: int, rank: int) -> bool:
        return dim < rank - len(m.normalized_shape)
