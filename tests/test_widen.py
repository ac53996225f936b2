"""widen: exactness over init x sample model x layer, coupling cases, refusals, CLI."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import TV_SHAPE, sample_shape
from helpers import assert_same_function, run_cli
from torch import nn

import morphcli
from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.graph.inputs import INPUTS_META
from morphcli.morphs.runner import CheckOptions

NO_CHECK = CheckOptions(enabled=False)


def graph_module(model: nn.Module, shape: tuple[int, ...]) -> torch.fx.GraphModule:
    from morphcli.io.api import to_graph_module
    from morphcli.io.checkpoint import Checkpoint

    return to_graph_module(Checkpoint("test", module=model.eval()), input_shapes=[shape])


def sample_model(name: str) -> torch.fx.GraphModule:
    from conftest import _sample_build

    return graph_module(_sample_build().build(f"{name}.pt"), sample_shape(f"{name}.pt"))


def same_function(a: torch.fx.GraphModule, b: torch.fx.GraphModule, *,
                  exact: bool = False) -> float:
    """The same function, measured with plain torch (not morph's check), on two seeded batches
    of 4 at input scales 1 and 10: bit for bit with ``exact``, else within 1e-6 of each
    output's scale (float32 round-off; the tool's own check allows 1e-5). Returns max abs."""
    spec = a.meta[INPUTS_META][0]
    shape = (4, *spec.shape[1:])
    if spec.dtype != "float32":
        x = torch.randint(0, spec.high or 2, shape, generator=torch.Generator().manual_seed(0))
        return assert_same_function(a, b, [x], exact=exact).max_abs
    return assert_same_function(a, b, [shape], exact=exact, seeds=(0, 1),
                                scales=(1.0, 10.0)).max_abs

CASES = [
    ("cnn", "conv1"), ("cnn", "conv2"), ("cnn", "conv3"), ("cnn", "conv4"), ("cnn", "fc1"),
    ("mlp", "fc1"), ("mlp", "fc2"),
    ("resnet", "stem"), ("resnet", "block_conv1"), ("resnet", "block_conv2"),
    ("resnet", "branch_a"), ("resnet", "branch_b"), ("resnet", "pointwise"),
]


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("name,layer", CASES)
def test_widen_sample_layers_exact(name: str, layer: str, init: str) -> None:
    gm = sample_model(name)
    old_width = _units(gm, layer)
    wide, result = morphcli.widen(gm, layer, by=5, init=init, seed=3, check=NO_CHECK)
    assert _units(wide, layer) == old_width + 5
    assert result.exact
    # Zero-init new units add zero terms to every consumer's sums, which BLAS may add in
    # another order (1 ulp apart on AVX-512 CPUs): round-off, not bit for bit.
    same_function(gm, wide)
    # the original model is untouched and still shares unchanged layers
    assert _units(gm, layer) == old_width


def test_widen_residual_group_widens_every_producer() -> None:
    gm = sample_model("resnet")
    wide, result = morphcli.widen(gm, "stem", to=24, check=NO_CHECK)
    changed = {c.name for c in result.changes}
    # stem and block_conv2 feed the residual add: both grow, with BN statistics following
    assert wide.get_submodule("stem").out_channels == 24
    assert wide.get_submodule("block_conv2").out_channels == 24
    assert wide.get_submodule("block_conv1").in_channels == 24
    assert {"stem_bn.running_var", "block_bn2.running_mean", "branch_a.weight"} <= changed
    assert any("block_conv2" in n for n in result.notes)
    same_function(gm, wide)


def test_widen_concat_shifts_offsets_and_grows_depthwise_groups() -> None:
    gm = sample_model("resnet")
    wide, _ = morphcli.widen(gm, "branch_a", by=4, init="copy", check=NO_CHECK)
    dw = wide.get_submodule("depthwise")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (20, 20, 20)
    assert wide.get_submodule("pointwise").in_channels == 20
    same_function(gm, wide)


def test_widen_through_flatten_into_linear() -> None:
    gm = sample_model("cnn")
    wide, _ = morphcli.widen(gm, "conv4", by=2, check=NO_CHECK)
    # conv4's 64 channels reach fc1 as 64 blocks of 4x4 features
    assert wide.get_submodule("fc1").in_features == (64 + 2) * 16
    same_function(gm, wide)


def test_depthwise_conv_is_refused_as_target_with_hint() -> None:
    with pytest.raises(UnsupportedMorphError, match="depthwise.*widen the layer that feeds it"):
        morphcli.widen(sample_model("resnet"), "depthwise", by=2, check=NO_CHECK)


def test_widen_refuses_when_units_reach_the_output() -> None:
    with pytest.raises(UnsupportedMorphError, match="output"):
        morphcli.widen(sample_model("cnn"), "fc2", by=2, check=NO_CHECK)


@pytest.mark.parametrize("kwargs,message", [
    ({"to": 10}, "larger than the current width"),
    ({"by": 0}, "at least 1"),
    ({"factor": 1.0}, "does not add a unit"),
    ({"to": 40, "by": 2}, "only one of"),
    ({}, "how much wider"),
    ({"by": 2, "init": "random"}, "unknown --init"),
])
def test_widen_bad_sizes(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        morphcli.widen(sample_model("cnn"), "conv2", check=NO_CHECK, **kwargs)


class _Coupled(nn.Module):
    """Squeeze-excitation gate, a channels-last Linear after permute, a literal reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se_reduce = nn.Conv2d(8, 4, 1)
        self.se_expand = nn.Conv2d(4, 8, 1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        squeezed = y.mean((2, 3), keepdim=True)
        gate = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(squeezed))))
        y = y * gate
        y = self.mix(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(y.reshape(-1, 8 * 4 * 4))


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("layer,expect", [
    ("conv", {"se_expand": "out_channels", "se_reduce": "in_channels", "mix": "in_features"}),
    ("mix", {"head": "in_features"}),
    ("se_reduce", {"se_expand": "in_channels"}),
])
def test_widen_gates_permutes_and_literal_reshapes(layer: str, expect: dict, init: str) -> None:
    torch.manual_seed(0)
    gm = graph_module(_Coupled(), (2, 3, 4, 4))
    wide, result = morphcli.widen(gm, layer, by=3, init=init, check=NO_CHECK)
    for path, attr in expect.items():
        assert getattr(wide.get_submodule(path), attr) > getattr(gm.get_submodule(path), attr)
    same_function(gm, wide)


def test_widen_rewrites_literal_reshape_size() -> None:
    torch.manual_seed(0)
    gm = graph_module(_Coupled(), (2, 3, 4, 4))
    wide, result = morphcli.widen(gm, "mix", by=2, check=NO_CHECK)
    rewired = [c for c in result.changes if c.action == "rewired"]
    assert rewired and rewired[0].new == str(10 * 16)
    assert wide.get_submodule("head").in_features == 160


class _Norms(nn.Module):
    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(self.conv(x)))


@pytest.mark.parametrize("norm", [
    nn.GroupNorm(8, 8), nn.InstanceNorm2d(8, affine=True), nn.PReLU(8),
])
def test_widen_channelwise_norm_layers(norm: nn.Module) -> None:
    torch.manual_seed(0)
    gm = graph_module(_Norms(norm), (2, 3, 6, 6))
    wide, _ = morphcli.widen(gm, "conv", by=3, init="copy", check=NO_CHECK)
    same_function(gm, wide)


class GroupNorm1(nn.GroupNorm):
    """timm's GroupNorm1 (PoolFormer): one group, traced into F.group_norm."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.group_norm(x, 1, self.weight, self.bias, self.eps)


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("norm", [nn.GroupNorm(2, 8), nn.GroupNorm(1, 8), GroupNorm1(8)])
def test_group_norm_copies_every_channel_equally_inside_its_group(norm: nn.Module,
                                                                  init: str) -> None:
    """Statistics over a group's channels (and positions) stay the same when every channel of
    the group is copied equally often into that group: --factor 2 is exact, +3 is refused."""
    torch.manual_seed(0)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    gm = graph_module(_Norms(norm), (2, 3, 6, 6))
    wide = _copied_twice_in_groups(gm, init, norm.num_groups, "GroupNorm")
    new = wide.get_submodule("norm")
    assert new.weight.shape == new.bias.shape == (16,)
    if type(norm) is nn.GroupNorm:
        assert (new.num_groups, new.num_channels) == (norm.num_groups, 16)


def _copied_twice_in_groups(gm: torch.fx.GraphModule, init: str, groups: int,
                            kind: str) -> torch.fx.GraphModule:
    """Widen ``conv`` (8 units) x2: exact, every unit copied once inside its group (its old
    units first, then their copies), the note names ``kind``; +3 units is refused."""
    wide, result = morphcli.widen(gm, "conv", factor=2, init=init)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    half = 8 // groups
    rows = wide.get_submodule("conv").weight.detach()
    for g in range(groups):  # copies equal their source going in
        block = rows[g * 2 * half:(g + 1) * 2 * half]
        assert torch.equal(block[half:], block[:half])
    assert any(kind in note and "copied 2 times" in note for note in result.notes)
    with pytest.raises(UnsupportedMorphError, match=f"{kind} .*multiple of 8"):
        morphcli.widen(gm, "conv", by=3, check=NO_CHECK)
    return wide


class PreNormBlock(nn.Module):
    """A transformer-style residual stream: x + fc2(gelu(fc1(ln(x)))), then a final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.ln, self.fc1 = nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 16)
        self.fc2, self.ln2, self.head = nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        for norm in (self.ln, self.ln2):  # not the 1 and 0 a fresh LayerNorm starts with
            nn.init.normal_(norm.weight)
            nn.init.normal_(norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln(h))))
        return self.head(self.ln2(h))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """torchvision ConvNeXt's LayerNorm2d: traced into permutes around F.layer_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps
        )
        return x.permute(0, 3, 1, 2)


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("layer,copies", [("inp", 2), ("fc2", 3)])
def test_layernorm_over_widened_units_copies_every_unit_equally(
    layer: str, copies: int, init: str
) -> None:
    torch.manual_seed(0)
    gm = graph_module(PreNormBlock(), (2, 5, 6))
    wide, result = morphcli.widen(gm, layer, to=8 * copies, init=init)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    # the whole residual stream widens together, both norms follow the map
    for name in ("inp", "fc2"):
        assert wide.get_submodule(name).out_features == 8 * copies
    for name in ("ln", "ln2"):
        norm = wide.get_submodule(name)
        assert norm.normalized_shape == (8 * copies,)
        assert torch.equal(norm.weight, gm.get_submodule(name).weight.repeat(copies))
    # new units equal their source going in; going out they are zero (zero) or share (copy)
    rows = wide.get_submodule(layer).weight.detach()
    assert torch.equal(rows[8:16], rows[:8])
    cols = wide.get_submodule("fc1").weight.detach()
    old_cols = gm.get_submodule("fc1").weight.detach()
    if init == "zero":
        assert torch.equal(cols[:, :8], old_cols) and torch.count_nonzero(cols[:, 8:]) == 0
    else:
        assert torch.allclose(cols[:, :8] * copies, old_cols)
    assert any(f"copied {copies} times" in note for note in result.notes)


def test_layernorm_needs_a_multiple_of_the_width() -> None:
    gm = graph_module(PreNormBlock(), (2, 5, 6))
    with pytest.raises(UnsupportedMorphError, match="multiple of 8 \\(e.g. --factor 2\\)"):
        morphcli.widen(gm, "inp", by=2, check=NO_CHECK)
    # a layer whose units the norms do not see is free to grow by any amount
    wide, _ = morphcli.widen(gm, "fc1", by=3, check=NO_CHECK)
    same_function(gm, wide)


def test_layernorm_over_units_and_another_axis_is_refused() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 5, 5]), nn.Flatten(), nn.Linear(100, 2)
    )
    with pytest.raises(UnsupportedMorphError, match="together with other axes"):
        morphcli.widen(graph_module(model, (2, 3, 5, 5)), "0", factor=2, check=NO_CHECK)


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_functional_layer_norm_over_channels(init: str) -> None:
    torch.manual_seed(0)
    norm = ChannelsFirstLayerNorm(8)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm, nn.Conv2d(8, 4, 3))
    gm = graph_module(model, (2, 3, 8, 8))
    wide, result = morphcli.widen(gm, "0", factor=2, init=init)
    assert result.check.equivalent
    same_function(gm, wide)
    rewired = [c for c in result.changes if c.action == "rewired"]
    assert [(c.old, c.new) for c in rewired] == [("(8,)", "(16,)")]
    assert {c.name for c in result.changes if c.action == "resized"} >= {"1.weight", "1.bias"}


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("layer", ["0", "3"])
def test_grouped_conv_keeps_new_units_inside_groups(layer: str, init: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(12, 2, 1))
    gm = graph_module(model, (2, 3, 6, 6))
    wide, result = morphcli.widen(gm, layer, by=4, init=init, check=NO_CHECK)
    grouped = wide.get_submodule("3")
    assert grouped.groups == 4
    assert (grouped.in_channels, grouped.out_channels) == ((12, 12) if layer == "0" else (8, 16))
    same_function(gm, wide)
    with pytest.raises(UnsupportedMorphError, match="multiple of 4 \\(e.g. --to"):
        morphcli.widen(gm, layer, by=3, check=NO_CHECK)


def test_conv_transpose_and_embedding() -> None:
    torch.manual_seed(0)
    deconv = nn.Sequential(nn.ConvTranspose2d(3, 6, 3), nn.ReLU(), nn.ConvTranspose2d(6, 2, 3))
    gm = graph_module(deconv, (2, 3, 5, 5))
    for init in ("zero", "copy"):
        wide, _ = morphcli.widen(gm, "0", by=3, init=init, check=NO_CHECK)
        assert wide.get_submodule("2").in_channels == 9
        same_function(gm, wide)
    emb = nn.Sequential(nn.Embedding(50, 6), nn.Linear(6, 3))
    gm = graph_module(emb, (2, 7))
    wide, _ = morphcli.widen(gm, "0", to=10, init="copy", check=NO_CHECK)
    assert wide.get_submodule("0").embedding_dim == 10
    same_function(gm, wide)


def test_kernel_morph_exact_for_strided_dilated_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    gm = graph_module(model, (2, 3, 11, 11))
    wide, result = morphcli.widen(gm, "0", kernel=7, by=2, check=NO_CHECK)
    conv = wide.get_submodule("0")
    assert conv.kernel_size == (7, 7) and conv.padding == (5, 5)
    same_function(gm, wide)
    with pytest.raises(UnsupportedMorphError, match="odd"):
        morphcli.widen(gm, "0", kernel=4, check=NO_CHECK)


def test_noise_is_labelled_approximate_and_measured() -> None:
    gm = sample_model("mlp")
    _, result = morphcli.widen(gm, "fc1", by=8, init="copy", noise=0.1)
    assert not result.exact
    assert result.check is not None and result.check.max_abs > 1e-4
    assert not result.check.equivalent


def test_seed_gives_byte_identical_files(tmp_path, sample_dir) -> None:
    digests = []
    for i in range(2):
        out = tmp_path / f"w{i}.pt"
        code, _, err = run_cli("widen", str(sample_dir / "cnn.pt"), "conv2", "--by", "7",
                               "--init", "copy", "--seed", "5", "-o", str(out))
        assert code == 0, err
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_torchvision_resnet18_coupled_group(resnet18) -> None:
    gm = graph_module(resnet18, TV_SHAPE)
    wide, result = morphcli.widen(gm, "layer1.0.conv2", by=16, init="copy", check=NO_CHECK)
    # layer1's residual stream: the stem conv and every block's last conv widen together
    for path in ("conv1", "layer1.0.conv2", "layer1.1.conv2"):
        assert wide.get_submodule(path).out_channels == 80
    assert wide.get_submodule("layer2.0.downsample.0").in_channels == 80
    same_function(gm, wide)


def _units(gm: nn.Module, path: str) -> int:
    m = gm.get_submodule(path)
    for attr in ("out_channels", "out_features", "embedding_dim"):
        if hasattr(m, attr):
            return getattr(m, attr)
    raise AssertionError(path)


class _LayerScale(nn.Module):
    """A per-channel parameter read by the graph (ConvNeXt's layer scale) on a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.body = nn.Conv2d(6, 6, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y + self.scale * self.body(y))


def test_widen_resizes_graph_parameters_like_layer_scale() -> None:
    torch.manual_seed(0)
    gm = graph_module(_LayerScale(), (2, 3, 5, 5))
    wide, result = morphcli.widen(gm, "conv", by=2, init="copy", check=NO_CHECK)
    assert wide.scale.shape == (8, 1, 1) and gm.scale.shape == (6, 1, 1)
    assert "scale" in {c.name for c in result.changes}
    same_function(gm, wide)


# ---------------------------------------------------------------- attention (transformer streams)


class AttentionBlock(nn.Module):
    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 16), nn.Linear(16, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.attn(y, y, y, need_weights=False)
        x = x + y
        return x + self.fc2(torch.relu(self.fc1(self.ln_2(x))))


class TinyViT(nn.Module):
    """torchvision's ViT in small: patch conv, reshape and permute, class token (expand, cat
    along the tokens), position embedding, pre-norm attention blocks, the class token's head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.pos = nn.Parameter(torch.randn(1, 5, 8))
        self.b1, self.b2 = AttentionBlock(), AttentionBlock()
        self.ln, self.head = nn.LayerNorm(8), nn.Linear(8, 3)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                nn.init.normal_(m.weight)
                nn.init.normal_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.proj(x).reshape(n, 8, 4).permute(0, 2, 1)
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1) + self.pos
        return self.head(self.ln(self.b2(self.b1(x)))[:, 0])


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("layer", ["proj", "b1.fc2", "b2.fc2"])
def test_transformer_stream_widens_through_attention(layer: str, init: str) -> None:
    torch.manual_seed(0)
    gm = graph_module(TinyViT(), (2, 3, 8, 8))
    wide, result = morphcli.widen(gm, layer, factor=2, init=init)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    # the whole stream widens: patch conv, class token, position embedding, both blocks
    assert wide.proj.out_channels == 16
    assert wide.cls.shape == (1, 1, 16) and wide.pos.shape == (1, 5, 16)
    assert torch.equal(wide.pos[..., :8], gm.pos) and torch.equal(wide.pos[..., 8:], gm.pos)
    old, attn = gm.b1.attn, wide.b1.attn
    assert (attn.embed_dim, attn.head_dim, attn.num_heads) == (16, 8, 2)
    assert attn.out_proj.weight.shape == (16, 16) and attn.in_proj_weight.shape == (48, 16)
    # head j's original dimensions open head j; its new keys and output columns are zero
    kept = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    fresh = torch.tensor([4, 5, 6, 7, 12, 13, 14, 15])
    keys = attn.in_proj_weight.detach()[16:32]
    assert torch.count_nonzero(keys[fresh]) == 0
    assert torch.count_nonzero(attn.out_proj.weight.detach()[:, fresh]) == 0
    queries = attn.in_proj_weight.detach()[:16]
    assert torch.count_nonzero(queries[fresh]) == queries[fresh].numel()  # trainable
    scale = 2 ** 0.5  # sqrt(new head_dim / old head_dim)
    old_q = old.in_proj_weight.detach()[:8]
    divisor = 2 if init == "copy" else 1
    assert torch.allclose(queries[kept][:, :8] * divisor, old_q * scale, atol=1e-6)


def test_attention_refusals() -> None:
    torch.manual_seed(0)

    class Plain(nn.Module):  # a stream through attention, without LayerNorm
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.attn, self.out = (nn.Linear(4, 8), nn.MultiheadAttention(8, 2),
                                             nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(self.attn(h, h, h)[0])

    gm = graph_module(Plain(), (3, 2, 4))
    with pytest.raises(UnsupportedMorphError, match="multiple of 2, not 9"):
        morphcli.widen(gm, "inp", by=1, check=NO_CHECK)
    wide, result = morphcli.widen(gm, "inp", by=2, init="zero")
    assert result.check.equivalent and wide.attn.embed_dim == 10

    class Cross(Plain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            return self.out(self.attn(h, x.repeat(1, 1, 2), x.repeat(1, 1, 2))[0])

    with pytest.raises(UnsupportedMorphError, match="cross-attention"):
        morphcli.widen(graph_module(Cross(), (3, 2, 4)), "inp", by=2, check=NO_CHECK)

    class Weights(Plain):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            y, w = self.attn(h, h, h)
            return self.out(y) + w.sum()

    with pytest.raises(UnsupportedMorphError, match="attention weights are read"):
        morphcli.widen(graph_module(Weights(), (3, 2, 4)), "inp", by=2, check=NO_CHECK)


class AffineGate(nn.Module):
    """ResMLP's Affine (addcmul of per-channel tensors) and an SE-style gate read back through
    expand_as: both carry the widened channels elementwise."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.alpha = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.beta = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.fc = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.addcmul(self.beta, self.alpha, self.conv(x))
        g = torch.sigmoid(self.fc(h.mean((2, 3), keepdim=True)))
        return self.out(h * g.expand_as(h))


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_widen_through_addcmul_and_expand_as(init: str) -> None:
    torch.manual_seed(0)
    gm = graph_module(AffineGate(), (2, 3, 6, 6))
    wide, result = morphcli.widen(gm, "conv", by=3, init=init)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    assert wide.alpha.shape == wide.beta.shape == (1, 11, 1, 1)
    assert wide.get_submodule("fc").in_channels == 11


class ResponseNorm(nn.Module):
    """ConvNeXt-V2's global response norm (channels first): each channel's L2 response over
    the positions, divided by the mean response over the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.bias = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        g = h.norm(p=2, dim=(2, 3), keepdim=True)
        n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
        return self.out(h + torch.addcmul(self.bias, self.weight, h * n))


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_mean_over_the_units_copies_every_unit_equally(init: str) -> None:
    torch.manual_seed(0)
    _copied_twice_in_groups(graph_module(ResponseNorm(), (2, 3, 6, 6)), init, 1, "a mean")


class StackedPaths(nn.Module):
    """SKNet's selective kernel: two paths stacked along a new axis, weighted, summed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 5, padding=2)
        self.weights = nn.Parameter(torch.randn(1, 2, 8, 1, 1))
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths = torch.stack([self.a(x), self.b(x)], dim=1)
        return self.out((paths * self.weights.softmax(dim=1)).sum(1))


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_widen_through_stack_along_a_new_axis(init: str) -> None:
    torch.manual_seed(0)
    gm = graph_module(StackedPaths(), (2, 3, 6, 6))
    wide, result = morphcli.widen(gm, "a", by=3, init=init)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    assert wide.get_submodule("b").out_channels == 11  # stacked with a: widened together
    assert wide.weights.shape == (1, 2, 11, 1, 1)


class TokenMixer(nn.Module):
    """ResMLP/Mixer: patch tokens, a Linear across the tokens, a residual over them."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.tokens = nn.Linear(9, 9)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2)  # (B, 8, 9 tokens)
        t = t + self.tokens(t)
        return self.head(t.mean(2))


def test_widening_the_token_count_is_refused_with_the_reason() -> None:
    gm = graph_module(TokenMixer(), (2, 3, 6, 6))
    with pytest.raises(UnsupportedMorphError, match="positions it merges .* the input's size"):
        morphcli.widen(gm, "tokens", by=2, check=NO_CHECK)
    wide, _ = morphcli.widen(gm, "patch", by=2, check=NO_CHECK)  # the channels grow
    same_function(gm, wide)


class ResizedGate(nn.Module):
    """GhostNetV2's attention: a gate computed at a lower resolution, resized back up."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gate = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(nn.functional.avg_pool2d(x, 2)))
        return self.out(self.conv(x) * nn.functional.interpolate(g, size=x.shape[-2:]))


@pytest.mark.parametrize("layer", ["conv", "gate"])
def test_widen_through_a_resize_reached_backwards(layer: str) -> None:
    torch.manual_seed(0)
    gm = graph_module(ResizedGate(), (2, 3, 8, 8))
    wide, result = morphcli.widen(gm, layer, by=3)
    assert result.check.equivalent and result.exact
    same_function(gm, wide)
    assert wide.get_submodule("gate").out_channels == wide.get_submodule("conv").out_channels == 11
