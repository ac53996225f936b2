"""``deepen``: insert a layer after LAYER that computes the identity, so the function is kept.

The new layer follows LAYER's output: ``(N, F)`` features (or ``(..., F)`` tokens read by a
Linear) get ``Linear(F, F)``; feature maps ``(N, C, *spatial)`` get a stride-1, same-padded
``Conv{1,2,3}d(C, C, kernel)``. Initialisation is Net2DeeperNet's identity or NetMorph's
decomposition (see ``rules.successors``). Options add an identity-initialised BatchNorm, an
activation that provably changes nothing, or wrap the block as ``x + f(x)`` with ``f(x) = 0``.

BatchNorm is the identity in eval mode only: in train mode it normalises with batch statistics.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn
from torch.optim import Optimizer

from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.graph.edit import clone_structure, finish, free_name, replace_module, tensor_shape
from morphcli.graph.layers import Layer, LayerNotFoundError, find_one_layer, layers
from morphcli.modules import (
    ACTIVATIONS,
    FeaturesLastBatchNorm,
    IdentityStartActivation,
    make_activation,
)
from morphcli.morphs import limits
from morphcli.morphs.result import Change, MorphResult
from morphcli.morphs.runner import CheckOptions, Grown, as_graph_module, run_api
from morphcli.rules import activations as act_rules
from morphcli.rules.registry import lookup, supported
from morphcli.rules.successors import conv_type

INITS = ("identity", "decompose")

_NORMS: dict[int, type[nn.modules.batchnorm._BatchNorm]] = {
    0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
# Layers whose output is a feature map (N, C, *spatial) / features on the last dimension.
_MAP_LAYERS = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm,
               nn.modules.instancenorm._InstanceNorm, nn.modules.pooling._MaxPoolNd,
               nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
               nn.modules.pooling._AdaptiveMaxPoolNd)
_FEATURE_LAYERS = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.Bilinear)


@dataclass(frozen=True)
class DeepenOptions:
    """What ``deepen`` inserts after the layer ``after``.

    ``noise`` is the standard deviation of Gaussian noise added to the new layer's weight (never
    to existing ones): it breaks symmetry and makes the morph approximate.
    """

    after: str
    init: str = "identity"
    kernel: int = 3
    norm: bool = False
    activation: str | None = None
    residual: bool = False
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise InputError(f"unknown --init {self.init!r}; choose from {', '.join(INITS)}")
        limits.check_int("--kernel", self.kernel, 1, limits.MAX_KERNEL)
        limits.check_seed(self.seed)
        if self.kernel % 2 == 0:
            raise InputError(f"--kernel must be a positive odd number (same padding needs a "
                             f"centre tap), not {self.kernel}")
        if not math.isfinite(self.noise) or self.noise < 0:
            raise InputError(f"--noise must be a finite standard deviation >= 0, not {self.noise}")
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise InputError(f"unknown --activation {self.activation!r}; choose from "
                             f"{', '.join(sorted(ACTIVATIONS))}")
        if self.residual and self.init == "decompose":
            raise InputError("--residual zero-initialises the new block, so there is nothing to "
                             "decompose; use --init identity with --residual")


def deepen(
    model: nn.Module | str | Path,
    after: str,
    *,
    init: str = "identity",
    kernel: int = 3,
    norm: bool = False,
    activation: str | None = None,
    residual: bool = False,
    noise: float = 0.0,
    seed: int = 0,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    check: CheckOptions | None = None,
    optimizer: Optimizer | None = None,
) -> Grown:
    """Insert an identity layer after ``after``; returns the new model and a checked result
    (with ``optimizer``: the new model, that optimizer carried over, the result).

    >>> new, result = morphcli.deepen("sample_models/cnn.pt", after="conv3", norm=True)
    >>> result.check.equivalent
    True
    """
    gm = as_graph_module(model, input_shapes)
    options = DeepenOptions(after, init, kernel, norm, activation, residual, noise, seed)
    return run_api(deepen_graph, model, gm, options, check or CheckOptions(seed=seed), optimizer)


def deepen_graph(gm: fx.GraphModule, options: DeepenOptions) -> tuple[fx.GraphModule, MorphResult]:
    """The morph proper: ``gm`` is left unchanged; the result shares its untouched layers."""
    target = _resolve(gm, options.after)
    shape, dtype = _tensor_of(target)
    follow = _follow(target, shape)
    new = clone_structure(gm)
    node = next(n for n in new.graph.nodes if n.name == target.node.name)
    gen = torch.Generator().manual_seed(options.seed)
    result = MorphResult("deepen", target.name)
    device = _device(target, gm)
    kernel = options.kernel if follow.spatial else 1
    limits.check_new_elements(f"the new layer after {target.name} ({follow.channels:,} "
                              f"channels, kernel {kernel})",
                              follow.channels ** 2 * kernel ** follow.spatial)
    if options.kernel != kernel:
        result.notes.append(f"--kernel {options.kernel} ignored: the new layer is a Linear")
    base = str(target.node.target) if target.module is not None else target.node.name
    block: list[tuple[str, nn.Module]] = []

    # The new layer (and, for decompose, LAYER re-expressed).
    deep_name = free_name(new, f"{base}_deep")
    if options.init == "decompose":
        layer, mixing = _decompose(new, node, target, kernel, gen, result)
        how = f"decomposed: {mixing}" + (" at the centre tap" if follow.spatial else "")
    else:
        build = lookup("identity", follow.cls)
        assert build is not None, follow.cls  # registered for Linear and Conv1d/2d/3d
        layer = build(follow.cls, follow.channels, kernel, dtype)
        how = "identity"
    block.append((deep_name, layer))
    result.notes.append(f"{deep_name}: {_describe_layer(layer)}, {how} "
                        f"({'features' if not follow.spatial else 'feature map'} {list(shape)})")

    norm = None
    if options.norm:
        norm = _identity_norm(follow, shape, dtype)
        block.append((free_name(new, f"{deep_name}_bn"), norm))
        result.notes.append("BatchNorm is the identity in eval mode only; in train mode it "
                            "normalises with batch statistics")

    if options.activation is not None:
        act, note = _activation(target, options.activation, options.residual)
        block.append((free_name(new, f"{deep_name}_act"), act))
        result.notes.append(note)

    if options.residual:
        last = norm if norm is not None else layer
        with torch.no_grad():  # f(x) = 0: BN with zero scale and shift outputs exactly 0
            for t in _tensors(last, "weight", "bias"):
                t.zero_()
        result.notes.append(f"residual: x + f(x) with {'the BatchNorm' if norm else deep_name} "
                            "zero-initialised, so f(x) = 0")

    if options.noise > 0:
        with torch.no_grad():
            (w,) = _tensors(layer, "weight")
            w.add_(torch.randn(w.shape, generator=gen, dtype=torch.float64).to(w.dtype)
                   * options.noise)
        masked = options.residual and norm is not None
        result.exact = masked
        result.notes.append(
            f"--noise {options.noise:g} on {deep_name}.weight only; " + (
                "the zeroed BatchNorm masks it, so the function is unchanged" if masked else
                "the morph is approximate: the check measures by how much it differs"))

    _insert(new, node, block, options.residual, gm.training, device, dtype, result)
    return finish(new), result


@dataclass(frozen=True)
class _Follow:
    """The layer type that fits the tensor: Linear over the last dim, or ConvNd over dim 1."""

    cls: type[nn.Module]
    channels: int
    spatial: int  # 0 for Linear


def _resolve(gm: fx.GraphModule, name: str) -> Layer:
    try:
        return find_one_layer(gm, name)
    except LayerNotFoundError:
        for n in gm.graph.nodes:
            if n.name == name and n.op in ("placeholder", "output"):
                what = "input" if n.op == "placeholder" else "output node"
                raise UnsupportedMorphError(
                    f"{name!r} is the model's {what}, not a layer; deepen after a layer (the "
                    "last layer is fine: the new one then produces the output)") from None
        raise


def _tensor_of(target: Layer) -> tuple[tuple[int, ...], torch.dtype]:
    meta = target.node.meta.get("tensor_meta")
    shape = tensor_shape(target.node)
    if meta is None or shape is None:
        raise UnsupportedMorphError(
            f"cannot deepen after {target.name}: its output is not a single tensor "
            f"({type(meta).__name__ if meta is not None else 'no shape known'})")
    if not meta.dtype.is_floating_point:
        raise UnsupportedMorphError(
            f"cannot deepen after {target.name}: its output is a {meta.dtype} tensor, and only "
            "floating-point tensors can feed a new layer")
    return shape, meta.dtype


def _follow(target: Layer, shape: tuple[int, ...]) -> _Follow:
    """Linear for features, ConvNd for feature maps; LAYER's own type decides ambiguous ranks."""
    rank = len(shape)
    linear = _Follow(nn.Linear, shape[-1], 0)
    if rank < 2:
        raise UnsupportedMorphError(
            f"cannot deepen after {target.name}: its output has shape {list(shape)}; a new "
            "layer needs a batch of features (N, F) or feature maps (N, C, ...)")
    if rank == 2 or isinstance(target.module, _FEATURE_LAYERS):
        return linear
    conv = conv_type(rank - 2)
    as_map = _Follow(conv, shape[1], rank - 2) if conv is not None else None
    if isinstance(target.module, _MAP_LAYERS) and as_map is not None:
        return as_map
    for user in target.node.users:  # e.g. tokens (N, L, F) read by a Linear
        if user.op != "call_module":
            continue
        m = user.graph.owning_module.get_submodule(str(user.target))  # type: ignore[union-attr]
        if isinstance(m, nn.Linear) and m.in_features == shape[-1]:
            return linear
        if as_map is not None and isinstance(m, as_map.cls) and m.in_channels == shape[1]:
            return as_map
    if as_map is not None:
        return as_map
    raise UnsupportedMorphError(
        f"cannot deepen after {target.name}: its output {list(shape)} is neither features read "
        "by a Linear nor a 1-3-d feature map (N, C, ...)")


def _decompose(new: fx.GraphModule, node: fx.Node, target: Layer, kernel: int,
               gen: torch.Generator, result: MorphResult) -> tuple[nn.Module, str]:
    """Re-express LAYER in ``new`` (a new module object); return the successor and what its
    mixing Q is."""
    rule = lookup("decompose", target.module) if target.module is not None else None
    if rule is None:
        raise UnsupportedMorphError(
            f"--init decompose re-expresses the layer it follows, so that layer must be linear "
            f"({', '.join(supported('decompose'))}); {target.name} is {_kind(target)}; "
            "use --init identity")
    head, tail, mixing = rule(target.module, kernel, gen)
    path = str(node.target)
    shared = sum(1 for n in new.graph.nodes if n.op == "call_module" and n.target == path) > 1
    if shared:  # the other call sites keep the original layer
        site = free_name(new, f"{path}_decomposed")
        new.add_submodule(site, head)
        node.target = site
        result.changes.append(Change("added", site, None, type(head).__name__,
                                     f"{target.name} re-expressed for this call site only"))
    else:
        replace_module(new, path, head)
        site = path
    for key, tensor in head.state_dict().items():
        old = target.module.state_dict()[key]  # type: ignore[union-attr]
        if tensor.is_floating_point() and key in ("weight", "bias"):
            result.changes.append(Change("replaced", f"{site}.{key}", list(old.shape),
                                         list(tensor.shape), "re-expressed as Q^-1 " + (
                                             "W" if key == "weight" else "b")))
    result.notes.append(f"{target.name} re-expressed as Q^-1 W, Q^-1 b with {mixing}, so that "
                        "the new layer (Q) composed with it equals the original")
    return tail, mixing


def _identity_norm(follow: _Follow, shape: tuple[int, ...], dtype: torch.dtype) -> nn.Module:
    """BatchNorm with mean 0, var 1, scale sqrt(1 + eps), shift 0: the identity in eval mode."""
    if not follow.spatial and len(shape) > 2:  # (N, tokens, F): BatchNorm1d would take dim 1
        bn: nn.modules.batchnorm._BatchNorm = FeaturesLastBatchNorm(follow.channels, dtype=dtype)
    else:
        bn = _NORMS[follow.spatial](follow.channels, dtype=dtype)
    weight, bias = _tensors(bn, "weight", "bias")
    with torch.no_grad():
        weight.fill_(math.sqrt(1.0 + bn.eps))
        bias.zero_()
    return bn


def _activation(target: Layer, name: str, residual: bool) -> tuple[nn.Module, str]:
    """A plain activation where it provably changes nothing, else IdentityStartActivation."""
    plain = make_activation(name)
    label = type(plain).__name__
    if name == "identity":
        return plain, "activation: identity (plain)"
    if residual:  # f(x) = act(0) must be 0
        if float(plain(torch.zeros(1)).abs().max()) == 0.0:
            return plain, f"activation: plain {label}, exact since {label}(0) = 0 in x + f(x)"
    else:
        spec = act_rules.activation_spec(target.node, target.module)
        values = act_rules.output_range(*spec) if spec is not None else None
        if act_rules.fixes(name, values):
            assert values is not None
            return plain, (f"activation: plain {label}, exact since {target.name}'s output lies "
                           f"in [{values[0]:g}, {values[1]:g}] where {label} is the identity")
    return IdentityStartActivation(name), (
        f"activation: IdentityStartActivation({name}) = (1 - a)*{name}(x) + a*x with learnable "
        f"a = 1, the identity now ({label} alone would change the function); training can move "
        "a towards 0")


def _insert(new: fx.GraphModule, node: fx.Node, block: list[tuple[str, nn.Module]],
            residual: bool, training: bool, device: torch.device, dtype: torch.dtype,
            result: MorphResult) -> None:
    """Install the block's modules and splice ``node -> block [-> + node]`` before its users."""
    names = {la.node.name: la.name for la in layers(new)}
    consumers = list(node.users)
    graph = new.graph
    last = node
    for name, module in block:
        module.to(device=device, dtype=dtype).train(training)
        new.add_submodule(name, module)
        with graph.inserting_after(last):
            last = graph.call_module(name, (last,))
        result.changes.append(Change("added", name, None, _describe_layer(module)))
        for key, tensor in module.state_dict().items():
            result.changes.append(Change("added", f"{name}.{key}", None, list(tensor.shape)))
    if residual:
        with graph.inserting_after(last):
            last = graph.call_function(operator.add, (node, last))
        result.changes.append(Change("added", last.name, None, "add",
                                     f"residual: {names.get(node.name, node.name)} + block"))
    for user in consumers:
        user.replace_input_with(node, last)
        who = "output" if user.op == "output" else names.get(user.name, user.name)
        now = last.target if last.op == "call_module" else last.name
        result.changes.append(Change("rewired", who, None, None, f"reads {now} instead of "
                                     f"{names.get(node.name, node.name)}"))


def _describe_layer(m: nn.Module) -> str:
    if isinstance(m, nn.modules.conv._ConvNd):
        k = "x".join(str(s) for s in m.kernel_size)
        return f"{type(m).__name__}({m.in_channels}, {m.out_channels}, {k})"
    if isinstance(m, nn.Linear):
        return f"Linear({m.in_features}, {m.out_features})"
    if isinstance(m, IdentityStartActivation):
        return f"IdentityStartActivation({m.activation})"
    return type(m).__name__


def _tensors(m: nn.Module, *names: str) -> list[torch.Tensor]:
    """Parameters of a layer we built, by name (typed for the checker)."""
    out = [getattr(m, n) for n in names]
    assert all(isinstance(t, torch.Tensor) for t in out)
    return out


def _kind(layer: Layer) -> str:
    return f"a {layer.type_name}" if layer.module is not None else f"a call of {layer.type_name}"


def _device(target: Layer, gm: fx.GraphModule) -> torch.device:
    for source in (target.module, gm):
        if source is not None:
            for p in source.parameters():
                return p.device
    return torch.device("cpu")
