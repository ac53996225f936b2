"""The zoo matrix: every morph on (a seeded sample of) every layer it applies to, over the
torchvision zoo or the timm one.

Shared by ``scripts/coverage.py`` (the full matrix and the README table) and the CI slices in
``tests/test_zoo.py`` and ``tests/test_timm_zoo.py``. Models are built with ``weights=None`` or
``pretrained=False``: nothing is downloaded.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

import morphcli
from morphcli.errors import MorphError
from morphcli.graph.layers import Layer, layers
from morphcli.morphs.applicable import applicable_morphs
from morphcli.morphs.runner import CheckOptions

# name -> (builder kwargs, input shape). Small inputs keep the matrix affordable on 2 cores;
# ViT is built for 64x64 images (its position embedding follows image_size).
MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "resnet18": ({}, (1, 3, 64, 64)),
    "resnet50": ({}, (1, 3, 64, 64)),
    "mobilenet_v2": ({}, (1, 3, 64, 64)),
    "mobilenet_v3_small": ({}, (1, 3, 64, 64)),
    "efficientnet_b0": ({}, (1, 3, 64, 64)),
    "densenet121": ({}, (1, 3, 64, 64)),
    "vgg11_bn": ({}, (1, 3, 64, 64)),
    "convnext_tiny": ({}, (1, 3, 64, 64)),
    "vit_b_16": ({"image_size": 64}, (1, 3, 64, 64)),
    "regnet_x_400mf": ({}, (1, 3, 64, 64)),
    "shufflenet_v2_x0_5": ({}, (1, 3, 64, 64)),
    "squeezenet1_0": ({}, (1, 3, 64, 64)),
}

_S64 = (1, 3, 64, 64)
_IMG64 = {"img_size": 64}
# timm models, the smallest of each family: name -> (create_model kwargs, input shape). 64x64
# images; models whose position embeddings or attention biases follow the image size are built
# for it (img_size), Swin with 4x4 windows to fit its 16x16 patch grid. EfficientFormer-L1's
# last-stage attention bias is fixed at 7x7 tokens (it has no img_size), so it needs 224x224.
TIMM_MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    # ResNet and its variants
    "resnet18": ({}, _S64), "resnet26d": ({}, _S64), "seresnet18": ({}, _S64),
    "ecaresnet26t": ({}, _S64), "resnext26ts": ({}, _S64), "res2net50_14w_8s": ({}, _S64),
    "skresnet18": ({}, _S64), "resnest14d": ({}, _S64),
    # EfficientNet / MobileNet families
    "efficientnet_b0": ({}, _S64), "mixnet_s": ({}, _S64), "tinynet_e": ({}, _S64),
    "mobilenetv2_050": ({}, _S64), "mobilenetv3_small_050": ({}, _S64),
    "mobilenetv3_large_075": ({}, _S64), "lcnet_050": ({}, _S64), "rexnet_100": ({}, _S64),
    "ghostnet_050": ({}, _S64), "ghostnetv2_100": ({}, _S64), "repvit_m0_9": ({}, _S64),
    "hgnetv2_b0": ({}, _S64),
    # other CNNs
    "regnetx_002": ({}, _S64), "regnety_002": ({}, _S64), "hrnet_w18_small": ({}, _S64),
    "dla34": ({}, _S64), "cspresnet50": ({}, _S64), "cspdarknet53": ({}, _S64),
    "dpn68": ({}, _S64), "densenet121": ({}, _S64), "vovnet39a": ({}, _S64),
    "repvgg_a0": ({}, _S64), "mobileone_s0": ({}, _S64), "selecsls42b": ({}, _S64),
    "gernet_s": ({}, _S64), "starnet_s050": ({}, _S64),
    # ConvNeXt and MetaFormer-style
    "convnext_atto": ({}, _S64), "convnextv2_atto": ({}, _S64), "poolformer_s12": ({}, _S64),
    "inception_next_tiny": ({}, _S64), "mambaout_femto": ({}, _S64),
    "edgenext_xx_small": ({}, _S64), "fastvit_t8": ({}, _S64),
    # transformers and MLPs
    "vit_tiny_patch16_224": (_IMG64, _S64), "deit_tiny_patch16_224": (_IMG64, _S64),
    "cait_xxs24_224": (_IMG64, _S64), "xcit_nano_12_p16_224": (_IMG64, _S64),
    "pit_ti_224": (_IMG64, _S64), "levit_128s": (_IMG64, _S64),
    "coat_lite_tiny": (_IMG64, _S64), "pvt_v2_b0": ({}, _S64),
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4}, _S64),
    "efficientformer_l1": ({}, (1, 3, 224, 224)), "efficientformerv2_s0": (_IMG64, _S64),
    "mixer_s16_224": (_IMG64, _S64), "resmlp_12_224": (_IMG64, _S64),
    # branching in Python on sizes: traced at the input size
    "mobilevit_xxs": ({}, _S64), "tf_efficientnet_lite0": ({}, _S64),
    "tiny_vit_5m_224": ({}, (1, 3, 224, 224)), "efficientvit_m0": (_IMG64, _S64),
}
# timm models that do not load, each refused naming the model's line. None since branches on
# sizes are taken as the input takes them (MobileViT, TinyViT, EfficientViT, TF padding).
TIMM_UNTRACEABLE: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {}
ZOOS = {"torchvision": MODELS, "timm": TIMM_MODELS}

# Each variant is one row of the table: (morph, variant label, keyword arguments).
DEEPEN_VARIANTS = [
    {"init": "identity"}, {"init": "decompose"}, {"init": "identity", "norm": True},
    {"init": "identity", "activation": "relu"}, {"init": "identity", "residual": True},
    {"init": "decompose", "norm": True, "activation": "gelu"},
]
# Doubling keeps every width a multiple of any grouped convolution's groups.
WIDEN_VARIANTS = [{"init": "zero", "factor": 2}, {"init": "copy", "factor": 2}]
SWAP_VARIANTS = [{"to": "gelu"}, {"to": "silu", "approx": True}]
MORPHS = {"deepen": DEEPEN_VARIANTS, "widen": WIDEN_VARIANTS, "swap": SWAP_VARIANTS}

CHECK = CheckOptions(samples=4, batch_size=2)


@dataclass
class Cell:
    """One (model, morph) cell of the coverage table."""

    tried: int = 0
    exact: int = 0
    approx: int = 0  # approximate by request (swap --approx): measured, not a failure
    refused: Counter = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)
    worst_rel: float = 0.0


def build(name: str, trust_pickle: bool = False, zoo: str = "torchvision") -> fx.GraphModule:
    """Load NAME of ZOO the way users have it: a state_dict with --arch
    (``torchvision.models:NAME``, or ``timm:create_model`` with ``model_name``), or a whole
    pickle with --trust (both through morphcli's loader, from bytes in memory)."""
    import io

    from morphcli.io.api import to_graph_module
    from morphcli.io.torch_file import read_torch

    model, arch, kwargs, shape = source(name, zoo)
    buf = io.BytesIO()
    torch.save(model if trust_pickle else model.state_dict(), buf)
    buf.seek(0)
    ckpt = read_torch(name, buf, trust=trust_pickle)
    return to_graph_module(ckpt, arch=None if trust_pickle else arch, arch_kwargs=kwargs,
                           input_shapes=[shape])


def source(name: str, zoo: str) -> tuple[torch.nn.Module, str, dict[str, Any], tuple[int, ...]]:
    """The model as ``build`` loads it (seeded, randomised as if trained: the same each call),
    the --arch and --arch-kwargs that rebuild it, and its input shape."""
    model, arch, kwargs, shape = _fresh(name, zoo)
    _trained_like(model)
    return model, arch, kwargs, shape


def _fresh(name: str, zoo: str) -> tuple[torch.nn.Module, str, dict[str, Any], tuple[int, ...]]:
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        kwargs, shape = {**TIMM_MODELS, **TIMM_UNTRACEABLE}[name]
        kwargs = {"model_name": name, **kwargs}
        return timm.create_model(**kwargs).eval(), "timm:create_model", kwargs, shape
    import torchvision

    kwargs, shape = MODELS[name]
    model = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    return model, f"torchvision.models:{name}", kwargs, shape


def _trained_like(model: torch.nn.Module) -> None:
    """Make every weight matter to the output, as training would.

    A fresh torchvision model starts some tensors at a constant: ViT's classification head and
    class token at zero (so the output is 0 whatever the body computes and every check passes
    vacuously), ConvNeXt's layer scales at 1e-6 (so a wrong residual branch moves the output by
    1e-6 of its scale, inside the tolerance), BatchNorm and LayerNorm at 1 and 0 with unit
    statistics (so a wrong channel order goes unseen). timm likewise starts its layer scales
    (``gamma``, ``ls.gamma``, ``layer_scale``) at 1e-6 or 1e-5 and some heads at zero. Every
    such constant tensor gets seeded random values added."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)


def candidates(gm: fx.GraphModule, morph: str, limit: int | None, seed: int = 0) -> list[Layer]:
    """The layers inspect says ``morph`` applies to; a seeded sample of ``limit`` of them."""
    found = [la for la in layers(gm) if morph in applicable_morphs(gm, la)]
    if limit is not None and len(found) > limit:
        found = sorted(random.Random(seed).sample(found, limit), key=lambda la: found.index(la))
    return found


def widen_unlisted(gm: fx.GraphModule) -> tuple[int, Counter]:
    """Layers of a type widen has a rule for that ``inspect`` does not list for widen: how many
    there are of that type, and why the coupling analysis refuses each one not listed."""
    from morphcli.morphs.coupling import analyse
    from morphcli.rules import registry

    typed, refused = 0, Counter()
    for la in layers(gm):
        m = la.module
        if m is None or registry.lookup("widen_out", m) is None:
            continue
        channelwise = registry.lookup("channelwise", m)
        if channelwise is not None and channelwise.applies(m):
            continue  # a per-channel layer (depthwise conv): widened with its producer
        typed += 1
        try:
            analyse(gm, la.node)
        except MorphError as e:
            refused[reason(str(e))] += 1
    return typed, refused


OUTPUT_REASON = "reach the model's output"


@dataclass
class Widenable:
    """Conv2d and Linear layers of one model against inspect's widen listing. ``total`` counts
    those of a widenable kind: depthwise convs (widened with their producer) and the final
    classifiers (their units are the model's output) are left out of it and counted apart."""

    total: int = 0
    listed: int = 0
    depthwise: int = 0
    classifiers: int = 0
    refused: Counter = field(default_factory=Counter)  # normalised reason -> layers

    @property
    def percent(self) -> float:
        return 100.0 * self.listed / self.total if self.total else 100.0


def widenable(gm: fx.GraphModule) -> Widenable:
    """Count, for each Conv2d and Linear layer, whether ``inspect`` lists widen for it, and the
    coupling analysis's reason when it does not."""
    from morphcli.graph.edit import tensor_shape
    from morphcli.morphs.coupling import analyse
    from morphcli.rules import registry

    out = Widenable()
    for la in layers(gm):
        m = la.module
        if not isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        channelwise = registry.lookup("channelwise", m)
        if channelwise is not None and channelwise.applies(m):
            out.depthwise += 1
            continue
        if registry.lookup("widen_out", m) is None or tensor_shape(la.node) is None:
            why = "no widen rule" if tensor_shape(la.node) is not None else "no recorded shape"
        else:
            try:
                analyse(gm, la.node)
                why = None
            except MorphError as e:
                why = reason(str(e))
        if why is not None and OUTPUT_REASON in why:
            out.classifiers += 1
            continue
        out.total += 1
        if why is None:
            out.listed += 1
        else:
            out.refused[why] += 1
    return out


def run_cell(gm: fx.GraphModule, morph: str, targets: list[Layer],
             tick: Callable[[], None] = lambda: None) -> Cell:
    """Try every variant of ``morph`` on ``targets``, rotating variants across layers for
    deepen (all combinations on every layer would be 6x the work) and trying all for others."""
    cell = Cell()
    fn = getattr(morphcli, morph)
    for i, layer in enumerate(targets):
        variants = MORPHS[morph]
        if morph == "deepen" and not isinstance(layer.module, (torch.nn.Linear,
                                                              torch.nn.modules.conv._ConvNd)):
            # decompose re-expresses the layer it follows, so it needs a Linear or Conv there
            variants = [v for v in variants if v["init"] != "decompose"]
        chosen = [variants[i % len(variants)]] if morph == "deepen" else variants
        for kwargs in chosen:
            kwargs = _distinct_target(layer, kwargs) if morph == "swap" else kwargs
            cell.tried += 1
            try:
                if morph == "deepen":
                    _, result = fn(gm, after=layer.name, check=CHECK, **kwargs)
                else:
                    _, result = fn(gm, layer.name, check=CHECK, **kwargs)
            except MorphError as e:
                cell.refused[reason(str(e))] += 1
                continue
            except Exception as e:  # a crash is a bug: recorded as a failure
                cell.failed.append(f"{layer.name} {kwargs}: crash {type(e).__name__}: {e}")
                continue
            finally:
                tick()
            report = result.check
            assert report is not None
            if not result.exact:
                cell.approx += 1
            elif report.equivalent:
                cell.exact += 1
                cell.worst_rel = max(cell.worst_rel, report.max_rel)
            else:
                cell.failed.append(f"{layer.name} {kwargs}: {report.summary()}")
    return cell


def _distinct_target(layer: Layer, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Swap to another activation than the layer's own (gelu <-> silu)."""
    current = layer.type_name.lower()
    if kwargs["to"] in current:
        return {**kwargs, "to": "silu" if kwargs["to"] == "gelu" else "gelu"}
    return kwargs


def reason(message: str) -> str:
    """A refusal message without its layer and node names, so equal reasons count together."""
    text = re.sub(r"'[^'\s]*'", "'…'", message)
    text = re.sub(r"reach \S+ \((\w+)\) at node", r"reach a \1 at node", text)
    text = re.sub(r"^[\w.@]+ is ", "LAYER is ", text)
    return text[:160]


def matrix(names: list[str], limit: int | None) -> Iterator[tuple[str, str, Cell]]:
    for name in names:
        gm = build(name)
        for morph in MORPHS:
            yield name, morph, run_cell(gm, morph, candidates(gm, morph, limit))


EXPORT_FORMATS = (".safetensors", ".pt2", ".onnx")


def export_roundtrip(gm: fx.GraphModule, folder: Any) -> dict[str, str]:
    """Morph ``gm`` once (deepen after the first layer it applies to, then widen), write the
    result in every export format, read each back and check it against the morphed model."""
    from pathlib import Path

    from morphcli.writing import write_verified

    status: dict[str, str] = {}
    model = gm
    for morph in ("deepen", "widen"):
        targets = candidates(model, morph, 1)
        if targets:
            kwargs = {"after": targets[0].name} if morph == "deepen" else {"factor": 2}
            args = () if morph == "deepen" else (targets[0].name,)
            model, _ = getattr(morphcli, morph)(model, *args, check=CHECK, **kwargs)
    for suffix in EXPORT_FORMATS:
        path = Path(folder) / f"morphed{suffix}"
        try:
            write_verified(model, path)
            report = morphcli.check(model, path, samples=4, batch_size=3,
                                    rtol=1e-4 if suffix == ".onnx" else 1e-5)
            status[suffix] = "ok" if report.equivalent else f"differs: {report.summary()}"
        except MorphError as e:
            status[suffix] = f"refused: {e}"
    return status
