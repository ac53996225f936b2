"""timm (PyTorch Image Models) layers, supported through the public rule API only.

Imported by tracing when a model holds a layer from a ``timm`` module. Each timm layer below is
replaced before tracing by an exact equivalent with the same parameter and buffer names (so the
state_dict still loads into timm): its Linear by torch's, BatchNormAct2d by morphcli's
BatchNormAct2d, one channelwise layer that widen follows and a description can store, and
Conv2dSame by morphcli's, which pads the same way inside one layer.
"""

from __future__ import annotations

from typing import Any

from timm.layers import BatchNormAct2d as TimmBatchNormAct2d
from timm.layers import Conv2dSame as TimmConv2dSame
from timm.layers import Linear as TimmLinear
from torch import nn

from morphcli import modules
from morphcli.rules.norms import NormRule
from morphcli.rules.registry import lookup, register_rule, register_substitute

# timm's own activations and the name (and arguments) of the torch.nn one computing the same.
_TIMM_ACTIVATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "GELU": ("gelu", {}),
    "GELUTanh": ("gelu", {"approximate": "tanh"}),
    "Swish": ("silu", {}),
    "Sigmoid": ("sigmoid", {}),
    "Tanh": ("tanh", {}),
    "HardSwish": ("hardswish", {}),
    "HardSigmoid": ("hardsigmoid", {}),
    "Mish": ("mish", {}),
}


def plain_linear(m: TimmLinear) -> nn.Linear:
    """timm's Linear only casts weights when scripted: torch's Linear, same tensors."""
    new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
    _share_tensors(m, new)
    return new


def conv2d_same(m: TimmConv2dSame) -> nn.Module:
    """morphcli's Conv2dSame (the same padding at run time, a layer widen follows) for
    timm's, which pads and calls the functional conv inside its forward."""
    new = modules.Conv2dSame(m.in_channels, m.out_channels, m.kernel_size, m.stride,
                             m.dilation, m.groups, m.bias is not None)
    _share_tensors(m, new)
    return new


def batch_norm_act(m: TimmBatchNormAct2d) -> nn.Module | None:
    """morphcli's BatchNormAct2d for timm's, or None (kept, traced as functions) when its drop
    layer is not the identity or its activation has no torch.nn equivalent."""
    named = activation_name(m.act)
    if named is None or type(m.drop) is not nn.Identity:
        return None
    new = modules.BatchNormAct2d(m.num_features, m.eps, m.momentum, m.affine,
                                 m.track_running_stats, *named)
    _share_tensors(m, new)
    return new


def activation_name(act: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """(name, kwargs) that ``morphcli.modules.make_activation`` rebuilds ``act`` from."""
    if type(act).__module__.startswith("timm."):
        return _TIMM_ACTIVATIONS.get(type(act).__name__)
    if act._parameters or act._buffers or not type(act).__module__.startswith("torch.nn."):
        return None  # a learnt slope (PReLU) would need its tensor stored beside the name
    if type(act) is nn.Identity:
        return "identity", {}
    rule = lookup("activation", act)  # swap's table: the name and the constructor arguments
    return rule.spec(act) if rule is not None else None


def _share_tensors(old: nn.Module, new: nn.Module) -> None:
    new._parameters = dict(old._parameters)
    new._buffers = dict(old._buffers)
    new.train(old.training)


register_substitute(TimmLinear, plain_linear)
register_substitute(TimmBatchNormAct2d, batch_norm_act)
register_substitute(TimmConv2dSame, conv2d_same)
# Its parameters and running statistics follow a channel map as BatchNorm2d's do; the
# activation after them acts per element, so the whole layer is channelwise.
register_rule("channelwise", modules.BatchNormAct2d)(NormRule)
