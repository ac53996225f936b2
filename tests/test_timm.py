"""timm models (PyTorch Image Models): inputs with defaults, timm's layers through the public
rule API, tensor factories in descriptions, and where a model stops the trace."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import morphcli
from tests.helpers import assert_one_error_line, assert_same_function, invoke, outputs_of

timm = pytest.importorskip("timm")


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm statistics and affines, layer scales and heads (timm starts some at zero or
    1e-6, which would hide a wrong branch), as scripts/zoo.py does for torchvision."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.named_parameters(), *model.named_buffers()]:
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("running_var",) or "gamma" in leaf or leaf.startswith("ls"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif leaf in ("running_mean", "bias") or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (leaf == "weight"))
    return model.eval()


def _max_diff(a: nn.Module, b: nn.Module, shape: tuple[int, ...]) -> float:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (ya,), (yb,) = outputs_of(a, [x]), outputs_of(b, [x])
    assert ya.shape == yb.shape
    return float((ya.double() - yb.double()).abs().max())


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return _randomised(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2,
                                         num_heads=2, num_classes=10))


# ---------------------------------------------------------------- 1. inputs with defaults


class _Defaults(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                causal: bool = False, scale: float = 1.0) -> torch.Tensor:
        h = self.fc(x)
        if mask is not None:
            h = h + mask
        if causal:
            h = h * 2
        return self.out(h) * scale


def test_defaulted_arguments_are_no_inputs() -> None:
    model = _Defaults().eval()
    wide, result = morphcli.widen(model, "fc", by=3, input_shapes=[(2, 4)])
    placeholders = [n.name for n in wide.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x"]
    assert result.check.equivalent
    assert not any("assert" in str(n.target) for n in wide.graph.nodes)
    assert _max_diff(model, wide, (3, 4)) < 1e-6


def test_defaulted_argument_given_a_shape_is_an_input() -> None:
    from morphcli.morphs.runner import as_graph_module

    model = _Defaults().eval()
    gm = as_graph_module(model, [(2, 4), (2, 6)])
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["x", "mask"]
    x, m = torch.randn(2, 4), torch.randn(2, 6)
    with torch.no_grad():
        assert float((model(x, m) - gm(x, m)).abs().max()) == 0.0


def test_timm_vit_widens_with_one_input_shape(tmp_path: Path) -> None:
    model = _vit()
    src, out = tmp_path / "vit.pt", tmp_path / "wide.pt"
    torch.save(model, src)
    r = invoke("widen", src, "blocks.0.mlp.fc1", "--by", "8", "--input-shape", "1,3,32,32",
                "--trust", "-o", out)
    assert r.code == 0, r.stderr
    wide = morphcli.load(out)
    assert wide.get_submodule("blocks.0.mlp.fc1").out_features == 32 * 4 + 8
    assert _max_diff(model, wide, (2, 3, 32, 32)) < 1e-5


# ---------------------------------------------------------------- 2. timm's layers, by the API


def test_timm_batchnormact_and_linear_widen_and_store(tmp_path: Path) -> None:
    """LCNet: BatchNormAct2d (hardswish) after every conv, timm's Linear as classifier."""
    torch.manual_seed(0)
    model = _randomised(timm.create_model("lcnet_050", pretrained=False))
    src, out = tmp_path / "lcnet.pt", tmp_path / "wide.pt"
    torch.save(model.state_dict(), src)
    arch = ["--arch", "timm:create_model", "--arch-kwargs", '{"model_name": "lcnet_050"}']
    r = invoke("widen", src, "blocks.2.0.conv_pw", "--factor", "2", "--init", "copy",
                "--input-shape", "1,3,32,32", *arch, "-o", out)
    assert r.code == 0, r.stderr
    wide = morphcli.load(out)
    assert type(wide.get_submodule("blocks.2.0.bn2")).__name__ == "BatchNormAct2d"
    assert wide.get_submodule("blocks.2.0.bn2").running_var.shape == (2 * 64,)
    assert set(wide.state_dict()) == set(model.state_dict())  # timm's own keys
    assert _max_diff(model, wide, (2, 3, 32, 32)) < 1e-5

    r = invoke("widen", src, "conv_head", "--by", "16", "--input-shape", "1,3,32,32", *arch,
                "-o", out)
    assert r.code == 0, r.stderr
    wide = morphcli.load(out)
    assert type(wide.get_submodule("classifier")) is nn.Linear
    assert wide.get_submodule("classifier").in_features == 1280 + 16
    assert _max_diff(model, wide, (2, 3, 32, 32)) < 1e-5


def test_timm_conv2d_same_widens_and_stores(tmp_path: Path) -> None:
    """TF-ported EfficientNet-Lite: its strided depthwise convs are timm's Conv2dSame, which
    pads for TensorFlow's "SAME" inside its forward (odd sizes: the extra row at the end)."""
    torch.manual_seed(0)
    model = _randomised(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert type(model.blocks[2][0].conv_dw).__name__ == "Conv2dSame"
    src, out = tmp_path / "lite.pt", tmp_path / "wide.pt"
    torch.save(model.state_dict(), src)
    arch = ["--arch", "timm:create_model", "--arch-kwargs",
            '{"model_name": "tf_efficientnet_lite0"}']
    r = invoke("widen", src, "blocks.2.0.conv_pw", "--factor", "2", "--init", "copy",
               "--input-shape", "1,3,33,33", *arch, "-o", out)
    assert r.code == 0, r.stderr
    wide = morphcli.load(out)
    dw = wide.get_submodule("blocks.2.0.conv_dw")
    assert type(dw) is morphcli.modules.Conv2dSame and dw.weight.shape[0] == 2 * 144
    assert set(wide.state_dict()) == set(model.state_dict())  # timm's own keys
    assert _max_diff(model, wide, (2, 3, 33, 33)) < 1e-5


def test_timm_activations_map_to_equal_torch_ones() -> None:
    """Walk the contrib table: each timm activation and the torch.nn one named for it agree."""
    from timm.layers import activations

    from morphcli.contrib.timm import _TIMM_ACTIVATIONS, activation_name
    from morphcli.modules import make_activation

    x = torch.linspace(-8, 8, 401)
    for cls_name in _TIMM_ACTIVATIONS:
        act = getattr(activations, cls_name)()
        rebuilt = make_activation(*activation_name(act))
        assert float((act(x) - rebuilt(x)).abs().max()) < 1e-6, cls_name
    assert activation_name(nn.PReLU()) is None  # its slope is a tensor: kept as timm's layer


# (model, widenable Conv2d/Linear layers, all of them): before timm's BatchNormAct2d and Linear
# were followed, 0/45, 16/82, 9/54 and 0/72 (depthwise convs and classifiers count in "all");
# dpn68 was 45/72 before widen followed its channel slices (morphs.coupling_split).
ZOO = [("regnetx_002", 44, 45), ("efficientnet_b0", 65, 82),
       ("mobilenetv3_small_050", 42, 54), ("dpn68", 71, 72)]


@pytest.mark.parametrize(("name", "widenable", "total"), ZOO)
def test_timm_zoo_slice(name: str, widenable: int, total: int) -> None:
    """Layers listed for widen, and a seeded sample of them widened and compared with the
    timm model itself (norms, layer scales and heads randomised first)."""
    import random

    from morphcli.graph.layers import layers
    from morphcli.morphs.applicable import applicable_morphs
    from morphcli.morphs.runner import as_graph_module

    torch.manual_seed(0)
    model = _randomised(timm.create_model(name, pretrained=False))
    gm = as_graph_module(model, [(1, 3, 64, 64)])
    convs = [lay for lay in layers(gm) if isinstance(lay.module, (nn.Conv2d, nn.Linear))]
    listed = [lay.name for lay in convs if "widen" in applicable_morphs(gm, lay)]
    assert (len(listed), len(convs)) == (widenable, total)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).double()
    for i, layer in enumerate(random.Random(0).sample(listed, 2)):
        wide, _ = morphcli.widen(gm, layer, factor=2, init=("copy", "zero")[i], check=False)
        with torch.no_grad():
            diff = float((wide(x).double() - y).abs().max())
        assert diff <= 1e-5 * max(1.0, float(y.abs().max())), (layer, diff)


# ---------------------------------------------------------------- 3. tensor factories stored


class _Factories(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1], dtype=x.dtype, device=x.device)
        return self.fc(x) + pos + torch.ones(x.shape, device=x.device) + torch.zeros(x.shape)


def test_tensor_factories_are_stored(tmp_path: Path) -> None:
    model = _Factories().eval()
    out = tmp_path / "f.pt"
    morphcli.save(_traced(model), out)
    back = morphcli.load(out)
    called = {n.target for n in back.graph.nodes if n.op == "call_function"}
    assert {torch.arange, torch.ones, torch.zeros} <= called
    assert _max_diff(model, back, (3, 4)) == 0.0


def _traced(model: nn.Module) -> nn.Module:
    from morphcli.morphs.runner import as_graph_module

    return as_graph_module(model, [(1, 4)])


def _tamper_factory(src: Path, dest: Path, **kwargs: object) -> Path:
    import json

    archive = torch.load(src, weights_only=True)
    desc = json.loads(archive["architecture"])
    node = next(n for n in desc["nodes"] if n["target"] == "torch.ones")
    node["kwargs"]["dict"].update(kwargs)
    torch.save({**archive, "architecture": json.dumps(desc)}, dest)
    return dest


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"device": {"device": "cpu"}}, "ones on a fixed device 'cpu'"),
    ({"out": {"node": "x"}}, "ones with keyword 'out'"),
    ({"pin_memory": True}, "ones with keyword 'pin_memory'"),
])
def test_factory_with_a_fixed_device_or_out_is_refused(tmp_path: Path, kwargs: dict,
                                                       message: str) -> None:
    src = tmp_path / "f.pt"
    morphcli.save(_traced(_Factories().eval()), src)
    bad = _tamper_factory(src, tmp_path / "bad.pt", **kwargs)
    r = invoke("inspect", bad)
    assert (r.code, r.stdout) == (2, "")
    assert_one_error_line(r.stderr, message)


def test_edgenext_exports_and_widens(tmp_path: Path) -> None:
    """EdgeNeXt's positional encoding calls torch.zeros and torch.arange: stored now."""
    model = _randomised(timm.create_model("edgenext_xx_small", pretrained=False))
    src, out = tmp_path / "edge.pt", tmp_path / "wide.pt"
    torch.save(model.state_dict(), src)
    arch = ["--arch", "timm:create_model", "--arch-kwargs", '{"model_name": "edgenext_xx_small"}']
    r = invoke("widen", src, "stages.0.blocks.0.mlp.fc1", "--by", "8", "--input-shape",
                "1,3,64,64", *arch, "-o", out)
    assert r.code == 0, r.stderr
    wide = morphcli.load(out)
    assert wide.get_submodule("stages.0.blocks.0.mlp.fc1").out_features == 24 * 4 + 8
    assert _max_diff(model, wide, (2, 3, 64, 64)) < 1e-4


# ---------------------------------------------------------------- 4. where the trace stops


class _Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a branch on a value: no trace can follow it
            return self.fc(x)
        return x


def test_trace_error_names_the_models_line() -> None:
    from morphcli.errors import TraceError

    with pytest.raises(TraceError) as info:
        morphcli.widen(_Branches(), "fc", by=2, input_shapes=[(1, 4)])
    line = _Branches.forward.__code__.co_firstlineno + 1
    assert f"test_timm.py:{line} (if x.sum() > 0:  # a branch" in str(info.value)
    assert "without Python control flow" in str(info.value)


class _SizeBranches(nn.Module):
    """Branches on sizes only (MobileViT's patch resize, TinyViT's window check)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.shape[-1] % 4 != 0:  # not taken at 8x8
            h = nn.functional.interpolate(h, size=(4, 4))
        return self.head(h * 2 if h.size(2) == 8 else h)


class _BatchBranch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[0] == 1 else x


def test_branches_on_sizes_are_taken_at_the_input_shape() -> None:
    torch.manual_seed(0)
    model = _SizeBranches().eval()
    wide, result = morphcli.widen(model, "conv", by=3, input_shapes=[(1, 3, 8, 8)])
    assert result.check.equivalent and result.exact
    code = wide.code
    assert "interpolate" not in code and "size" not in code and "shape" not in code
    for batch in (1, 4):  # the traced branch is the model's at this input size
        x = torch.randn(batch, 3, 8, 8)
        assert_same_function(model, wide, [x], rtol=1e-6)
    from morphcli.errors import TraceError

    with pytest.raises(TraceError, match="branches on its input's sizes, at .*test_timm.py:"
                       ".* does not compute the model at batch 3"):
        morphcli.widen(nn.Sequential(nn.Linear(4, 4), _BatchBranch()), "0", by=2,
                       input_shapes=[(1, 4)])


def test_mobilevit_traces_at_its_input_shape(tmp_path: Path) -> None:
    """MobileViT branches on its feature map's size: traced at 64x64, its widens are exact
    against timm's own model."""
    torch.manual_seed(0)
    model = timm.create_model("mobilevit_xxs", pretrained=False).eval()
    gm = morphcli.load(model, input_shapes=[(1, 3, 64, 64)])
    wide, result = morphcli.widen(gm, "stages.0.0.conv1_1x1.conv", factor=2)
    assert result.check.equivalent and result.exact
    assert_same_function(model, wide, [(2, 3, 64, 64)], rtol=1e-5)


@pytest.mark.parametrize("layer", ["stages.3.1.conv_1x1", "stages.3.1.transformer.1.attn.proj"])
def test_mobilevit_widens_through_its_patch_unfolding(tmp_path: Path, layer: str) -> None:
    """MobileViT folds the channels into the batch axis to cut patches
    (``reshape(B * C * n_h, ...)``, a size computed from the batch size): widening its
    transformer's stream from either side stays exact at batch sizes other than the traced
    one, against timm's model, and after a save and reload."""
    torch.manual_seed(0)
    model = _randomised(timm.create_model("mobilevit_xxs", pretrained=False))
    gm = morphcli.load(model, input_shapes=[(1, 3, 64, 64)])
    wide, result = morphcli.widen(gm, layer, factor=2, init="copy")
    assert result.check.equivalent and result.exact
    assert wide.get_submodule("stages.3.1.transformer.0.attn.qkv").in_features == 160
    assert any("computed at run time" in c.note for c in result.changes)
    assert_same_function(model, wide, [(3, 3, 64, 64)], rtol=1e-5)
    morphcli.save(wide, tmp_path / "wide.pt")
    assert_same_function(model, morphcli.load(tmp_path / "wide.pt"), [(5, 3, 64, 64)], rtol=1e-5)


def test_pvt_v2_single_head_query_grows_a_head() -> None:
    """PVT-v2's first stage has one head: ``reshape(B, N, 1, -1)`` is read as heads once
    keeping the features whole is refused (attention sums over them), so the query grows a
    second head that shares the one key and value head (broadcast), exactly."""
    torch.manual_seed(0)
    model = _randomised(timm.create_model("pvt_v2_b0", pretrained=False))
    gm = morphcli.load(model, input_shapes=[(1, 3, 64, 64)])
    wide, result = morphcli.widen(gm, "stages.0.blocks.0.attn.q", factor=2)
    assert result.check.equivalent and result.exact
    assert any("1 -> 2 heads" in note for note in result.notes)
    attn = wide.get_submodule("stages.0.blocks.0.attn")
    assert (attn.q.out_features, attn.kv.out_features, attn.proj.in_features) == (64, 64, 64)
    assert_same_function(model, wide, [(3, 3, 64, 64)], rtol=1e-5)
