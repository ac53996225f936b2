"""A cheaper input size for checking a morph, where a smaller input still exercises every layer.

A check runs the original and the morphed model on the same random inputs; for a ResNet-50 at
224x224 that is most of a second per sample and model. Convolutions, pooling and pointwise
layers do the same thing at every position, so a morph that is exact on a 56x56 image is exact
on a 224x224 one, provided the smaller input still reaches every weight. An image-like input
(floating point, batch x channels x spatial...) is therefore shrunk by the largest power of two
for which, in every model checked:

- the graph accepts it (shapes are worked out without running anything, see graph.shapes);
- every tap of every convolution and pooling window still meets real input at some output
  position (a 3x3 kernel on a 1x1 map would test only its centre weight);
- no adaptive pooling has to upsample (its output would repeat one value);
- every tensor in the graph keeps its size or shrinks by that factor, give or take the
  rounding of strided layers (sizes that do not scale, as after unpadded convolutions or a crop
  taken at fixed positions, mean the layers see a different picture at the smaller size).

Anything else (calls of functional convolutions, non-image inputs) is checked at full size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import TensorMetadata

from morphcli.graph import shapes
from morphcli.graph.inputs import InputSpec

_WINDOWED = (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd)
_ADAPTIVE = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)
# Functions whose windows this module does not inspect: a graph calling one is checked at full
# size. Adaptive pooling is inspected, as a function or as a layer.
_FUNCTIONAL_WINDOWS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                       "conv_transpose3d", "max_pool1d", "max_pool2d", "max_pool3d",
                       "avg_pool1d", "avg_pool2d", "avg_pool3d", "unfold", "fold",
                       "interpolate", "upsample", "pixel_shuffle", "pixel_unshuffle"}
_FUNCTIONAL_ADAPTIVE = {"adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
                        "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d"}


def reduced(models: Sequence[fx.GraphModule],
            specs: Sequence[InputSpec]) -> tuple[InputSpec, ...] | None:
    """The smallest input specs (spatial sizes divided by a power of two) that still exercise
    every layer of every model, or None when only the full size does.

    >>> reduced([resnet50_gm], [InputSpec((1, 3, 224, 224))])
    (InputSpec(shape=(1, 3, 56, 56), ...),)
    """
    full = [_recorded(gm) for gm in models]
    if any(f is None for f in full) or any(_has_functional_windows(gm) for gm in models):
        return None
    for factor in _factors(specs):
        small = tuple(_shrink(s, factor) for s in specs)
        if all(_exercised(gm, f, small, factor) for gm, f in zip(models, full, strict=True)):  # type: ignore[arg-type]
            return small
    return None


def _factors(specs: Sequence[InputSpec]) -> list[int]:
    """Powers of two that divide every spatial size of every image-like input, largest first."""
    spatial = [d for s in specs if _image_like(s) for d in s.shape[2:]]
    if not spatial:
        return []
    out, f = [], 2
    while all(d % f == 0 for d in spatial):
        out.append(f)
        f *= 2
    return out[::-1]


def _image_like(spec: InputSpec) -> bool:
    return len(spec.shape) >= 3 and spec.dtype.startswith(("float", "bfloat"))


def _shrink(spec: InputSpec, factor: int) -> InputSpec:
    if not _image_like(spec):
        return spec
    return InputSpec((*spec.shape[:2], *(d // factor for d in spec.shape[2:])), spec.dtype,
                     spec.high)


def _recorded(gm: fx.GraphModule) -> dict[fx.Node, Any] | None:
    out = {n: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    return out if any(isinstance(m, TensorMetadata) for m in out.values()) else None


def _has_functional_windows(gm: fx.GraphModule) -> bool:
    """Windows this module cannot inspect: functional convolutions and pooling, and library
    functions called by reference (Swin's window attention, whose windows and relative position
    bias a shrunken map would hardly use)."""
    from morphcli.graph.allowlist import library_name

    return any(n.op == "call_function" and (
        getattr(n.target, "__name__", "") in _FUNCTIONAL_WINDOWS or library_name(n.target))
        for n in gm.graph.nodes)


def _exercised(gm: fx.GraphModule, full: dict[fx.Node, Any], small_specs: tuple[InputSpec, ...],
               factor: int) -> bool:
    try:
        small = shapes.at(gm, small_specs)
    except Exception:
        return False  # the graph does not take the smaller input
    for node in gm.graph.nodes:
        if not _scaled(full.get(node), small.get(node), factor):
            return False
        before = small.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) \
            else None
        if node.op == "call_function" and getattr(node.target, "__name__", "") in \
                _FUNCTIONAL_ADAPTIVE and not _no_upsampling(before, small.get(node)):
            return False
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        if isinstance(module, _WINDOWED) and not _all_taps(module, before, small.get(node)):
            return False
        if isinstance(module, _ADAPTIVE) and not _no_upsampling(before, small.get(node)):
            return False
    return True


def _scaled(full: Any, small: Any, factor: int) -> bool:
    """Same structure, and every size the same or divided by ``factor`` (rounding either way)."""
    if isinstance(full, TensorMetadata) or isinstance(small, TensorMetadata):
        if not (isinstance(full, TensorMetadata) and isinstance(small, TensorMetadata)):
            return False
        if len(full.shape) != len(small.shape) or full.dtype != small.dtype:
            return False
        return all(s == f or (s >= 1 and abs(s * factor - f) < factor)
                   for f, s in zip(full.shape, small.shape, strict=True))
    if isinstance(full, (list, tuple)) and isinstance(small, (list, tuple)):
        return len(full) == len(small) and all(_scaled(f, s, factor)
                                               for f, s in zip(full, small, strict=True))
    return True  # no tensor here: sizes and flags change with the input, that is fine


def _all_taps(m: nn.Module, x: Any, y: Any) -> bool:
    """Whether every kernel tap meets real input (not padding) at some output position."""
    if not (isinstance(x, TensorMetadata) and isinstance(y, TensorMetadata)):
        return False
    spatial = len(y.shape) - 2
    if spatial < 1 or len(x.shape) != len(y.shape):
        return False
    kernel = _per_dim(m.kernel_size, spatial)
    stride = _per_dim(m.stride or m.kernel_size, spatial)
    dilation = _per_dim(getattr(m, "dilation", 1), spatial)
    padding = getattr(m, "padding", 0)
    if padding == "valid":
        padding = 0
    if padding == "same":
        padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel, strict=True))
    padding = _per_dim(padding, spatial)
    transposed = getattr(m, "transposed", False)
    for i in range(spatial):
        n_in, n_out = x.shape[2 + i], y.shape[2 + i]
        k, s, p, d = kernel[i], stride[i], padding[i], dilation[i]
        for tap in range(k):
            if transposed:  # input position a reaches output a*s - p + tap*d
                hit = any(0 <= a * s - p + tap * d < n_out for a in range(n_in))
            else:  # output position o reads input o*s - p + tap*d
                hit = any(0 <= o * s - p + tap * d < n_in for o in range(n_out))
            if not hit:
                return False
    return True


def _no_upsampling(x: Any, y: Any) -> bool:
    if not (isinstance(x, TensorMetadata) and isinstance(y, TensorMetadata)):
        return False
    return all(a >= b for a, b in zip(x.shape[2:], y.shape[2:], strict=False))


def _per_dim(v: Any, n: int) -> tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)
