"""widen through sizes read at run time and reshapes (``morphs.coupling_sizes``): size reads
folded to their old values, reshapes followed both ways, layer scales read through a reshape,
reshape_as, heads split out of the units, patch merging; small modules per pattern, then timm
models (ViT, ConvNeXt, Swin, LeViT) at small inputs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_function
from torch import nn
from torch.nn import functional as F

import morphcli
from morphcli.errors import UnsupportedMorphError
from morphcli.morphs.runner import CheckOptions

NO_CHECK = CheckOptions(enabled=False)


def _random(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (layer scales far from their 1e-6 start, norms off 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (p.ndim == 1) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.2)
    return model.eval()


def _widen_exact(model: nn.Module, layer: str, shape: tuple[int, ...], **kwargs: object
                 ) -> tuple[nn.Module, float]:
    """Widen ``layer`` of ``model`` (both inits) and measure it against the original with
    plain torch; returns the copy-init model and the worst max rel diff."""
    worst, wide = 0.0, None
    for init in ("zero", "copy"):
        wide, result = morphcli.widen(model, layer, init=init, check=NO_CHECK,
                                      input_shapes=[shape], **kwargs)
        same = assert_same_function(model, wide, [(2, *shape[1:])], seeds=(0, 1),
                                    scales=(1.0, 10.0))
        worst = max(worst, same.max_rel)
    assert wide is not None
    return wide, worst


# ---------------------------------------------------------------- sizes read at run time


class _SizeReads(nn.Module):
    """The widened tensor's sizes read at run time: in a reshape of the widened tensor itself
    (which must take the new width) and in a scale (which must keep the old one)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        b, n, c = h.shape
        flat = h.reshape(b * n, c) * c ** -0.5 + h.size(-1)
        return self.fc2(flat).reshape(b, n, -1)


def test_size_reads_of_the_widened_axis_keep_their_old_value() -> None:
    model = _random(_SizeReads())
    wide, worst = _widen_exact(model, "fc1", (1, 3, 6), factor=2)
    assert worst < 1e-6
    assert wide.fc1.out_features == 16 and wide.fc2.in_features == 16
    reads = [n for n in wide.graph.nodes if n.op == "call_method" and n.target == "size"]
    assert reads == []  # the read of the widened size became the constant 8


class _StreamHeads(nn.Module):
    """CoaT's pattern: the residual stream's width C read at run time and split into heads of
    the attention's (unwidened) projection: ``C // heads`` must stay the old head size."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.qkv = nn.Linear(8, 24)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        return self.head(x + self.proj(a))


def test_a_stream_width_read_at_run_time_keeps_the_heads_of_other_layers() -> None:
    model = _random(_StreamHeads())
    wide, worst = _widen_exact(model, "embed", (1, 4, 5), factor=2)
    assert worst < 1e-6
    assert (wide.embed.out_features, wide.proj.out_features) == (16, 16)
    assert (wide.qkv.in_features, wide.qkv.out_features) == (16, 24)


def test_reading_the_whole_shape_is_refused_with_the_reason() -> None:
    class WholeShape(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)
            return self.fc2(h) + torch.zeros(h.shape).sum()

    with pytest.raises(UnsupportedMorphError, match="reads the whole shape"):
        morphcli.widen(WholeShape(), "fc1", by=2, input_shapes=[(1, 4)])


# ---------------------------------------------------------------- reshapes


class _LayerScale(nn.Module):
    """ConvNeXt v1's layer scale: a per-channel parameter read through a reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.pw1, self.pw2 = nn.Conv2d(6, 6, 1), nn.Conv2d(6, 6, 1)
        self.gamma = nn.Parameter(torch.full((6,), 1e-6))
        self.scale = nn.Parameter(torch.full((6,), 1e-6))
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x + self.pw1(x).mul(self.gamma.reshape(1, -1, 1, 1))
        x = x + self.pw2(x) * self.scale.view((6, 1, 1))  # (PoolFormer: literal sizes)
        return self.out(x)


def test_layer_scales_read_through_a_reshape_follow_the_channel_map() -> None:
    model = _random(_LayerScale())
    assert model.gamma.abs().min() > 1e-3  # far from 1e-6: a wrong branch would show
    wide, worst = _widen_exact(model, "conv", (1, 3, 8, 8), by=3)
    assert worst < 1e-6
    assert wide.gamma.shape == (9,) and wide.scale.shape == (9,)


class _ReshapeAs(nn.Module):
    """LeViT's Linear + BatchNorm1d over the flattened tokens, reshaped back with reshape_as."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.bn(h.flatten(0, 1)).reshape_as(h))


def test_reshape_as_takes_the_widened_sizes_of_its_target() -> None:
    model = _random(_ReshapeAs())
    wide, worst = _widen_exact(model, "fc1", (1, 5, 4), by=2)
    assert worst < 1e-6
    assert wide.bn.num_features == 8


class _PatchMerging(nn.Module):
    """Swin's patch merging: 2 x 2 neighbours' channels flattened into 4C, then a LayerNorm
    over them; and window partitions that view the channels-last tensor at run-time sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(16)
        self.reduction = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, H, W, C)
        b, h, w, c = x.shape
        windows = x.view(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5)
        x = windows.reshape(-1, 2, 2, c).view(b, h // 2, w // 2, 2, 2, c)
        x = F.pad(torch.roll(x, shifts=1, dims=1), (0, 0, 0, 1))[..., :2, :]
        x = x.flatten(3)  # (B, H/2, W/2, 4C): the units tiled 4 times
        return self.reduction(self.norm(x))


def test_patch_merging_widens_a_tiled_map_under_a_layer_norm() -> None:
    model = _random(_PatchMerging())
    wide, worst = _widen_exact(model, "embed", (1, 4, 4, 3), factor=2)
    assert worst < 1e-6
    assert wide.norm.normalized_shape == (32,) and wide.reduction.in_features == 32
    with pytest.raises(UnsupportedMorphError, match="LayerNorm"):  # not every unit copied alike
        morphcli.widen(model, "embed", by=1, input_shapes=[(1, 4, 4, 3)])


class _SharedPositionConv(nn.Module):
    """CoaT's convolutional position encoding: one depthwise conv applied to the stream in
    every block of a stage (and, ``elsewhere``, also to a tensor the units do not reach)."""

    def __init__(self, elsewhere: bool) -> None:
        super().__init__()
        self.elsewhere = elsewhere
        self.embed, self.cpe = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc1, self.fc2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.side, self.out, self.out2 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.cpe(h)
        h = h + self.fc1(h)
        h = h + self.cpe(h)
        h = h + self.fc2(h)
        return self.out(h) + self.out2(self.cpe(self.side(x))) if self.elsewhere else self.out(h)


def test_a_layer_called_at_several_places_widens_when_the_units_reach_all_alike() -> None:
    model = _random(_SharedPositionConv(elsewhere=False))
    wide, worst = _widen_exact(model, "embed", (1, 3, 6, 6), by=3)
    assert worst < 1e-6
    assert wide.cpe.weight.shape == (7, 1, 3, 3) and wide.fc2.out_channels == 7
    with pytest.raises(UnsupportedMorphError, match="called at 3 places.*only some of them"):
        morphcli.widen(_SharedPositionConv(elsewhere=True), "embed", by=3,
                       input_shapes=[(1, 3, 6, 6)])


class _RepeatNormalize(nn.Module):
    """XCiT's pattern: a per-channel tensor repeated over the batch and tokens, and
    F.normalize along the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.pos = nn.Parameter(torch.zeros(1, 1, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(x) + self.pos.repeat(b, n, 1)
        return self.fc2(F.normalize(h, dim=1))


def test_repeat_and_normalize_along_other_axes_keep_the_units() -> None:
    model = _random(_RepeatNormalize())
    wide, worst = _widen_exact(model, "fc1", (1, 5, 4), by=2)
    assert worst < 1e-6
    assert wide.get_parameter("pos").shape == (1, 1, 8)


class _Shuffle(nn.Module):
    """ShuffleNet's channel shuffle: the units' groups interleave before a dense conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, c, hh, ww = h.shape
        return self.o(h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww))


def test_a_channel_shuffle_before_a_dense_layer_is_followed_exactly() -> None:
    """The view splits the units into 2 groups (taken as heads: new units come as whole
    groups), the transpose interleaves them, and the reshape merges them back: the consumer's
    columns follow that interleaved layout, so the function is unchanged."""
    model = _random(_Shuffle())
    wide, worst = _widen_exact(model, "a", (1, 3, 4, 4), by=8)
    assert worst < 1e-6
    assert wide.get_submodule("a").out_channels == wide.get_submodule("o").in_channels == 16
    with pytest.raises(UnsupportedMorphError, match="multiple of 4"):  # whole groups of 4
        morphcli.widen(model, "a", by=2, input_shapes=[(1, 3, 4, 4)])


class _ShuffleThenChunk(nn.Module):
    """ShuffleNet v2: the shuffled channels are chunked in two, each half read by a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.q = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, c, hh, ww = h.shape
        h = h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)
        u, v = h.chunk(2, dim=1)
        return self.p(u) + self.q(v)


def test_a_split_of_shuffled_channels_is_refused_with_the_reason() -> None:
    """No half of the shuffled channels is one range of the widened layer's units."""
    with pytest.raises(UnsupportedMorphError, match="a split cuts the units that 'reshape' "
                       "interleaves"):
        morphcli.widen(_random(_ShuffleThenChunk()), "a", by=8, input_shapes=[(1, 3, 4, 4)])


# ---------------------------------------------------------------- heads


class _Attention(nn.Module):
    """timm-style attention: qkv split into (3, heads, head_dim), scaled dot-product attention
    or the explicit matmul form with a relative position bias looked up from a table."""

    def __init__(self, explicit: bool) -> None:
        super().__init__()
        self.explicit, self.heads = explicit, 2
        self.qkv, self.proj, self.out = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)
        self.table = nn.Parameter(torch.zeros(7, 2))
        self.register_buffer("index", torch.randint(0, 7, (16,),
                                                    generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.explicit:
            bias = self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
            attn = (q * q.shape[-1] ** -0.5 @ k.transpose(-2, -1) + bias).softmax(-1)
            y = attn @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out(self.proj(y.transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("explicit", [False, True])
def test_heads_are_widened_whole_and_alike_in_q_k_and_v(explicit: bool) -> None:
    model = _random(_Attention(explicit))
    wide, worst = _widen_exact(model, "qkv", (1, 4, 8), factor=2)
    assert worst < 1e-6
    assert wide.qkv.out_features == 48 and wide.proj.in_features == 16
    if explicit:  # the bias table has one column per head
        assert wide.get_parameter("table").shape == (7, 4)
    _, result = morphcli.widen(model, "qkv", by=12, input_shapes=[(1, 4, 8)])
    assert result.check.equivalent and any("2 -> 3 heads" in n for n in result.notes)


class _TalkingHeads(nn.Module):
    """CaiT's talking heads: Linear layers mixing the heads of the attention weights."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj, self.out = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(8, 3)
        self.proj_l, self.proj_w = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        attn = self.proj_l((q @ k.transpose(-2, -1)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.proj_w(attn.softmax(-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(self.proj((attn @ v).transpose(1, 2).reshape(b, n, c)))


@pytest.mark.parametrize("layer", ["proj_w", "proj_l"])
def test_heads_widened_from_a_layer_mixing_them(layer: str) -> None:
    model = _random(_TalkingHeads())
    wide, worst = _widen_exact(model, layer, (1, 4, 8), by=2)
    assert worst < 1e-6
    # proj_w's new heads weight new value heads: the qkv grows by whole heads with it
    assert wide.qkv.out_features == (48 if layer == "proj_w" else 24)
    assert wide.proj_l.in_features == (4 if layer == "proj_w" else 2)


def test_widening_by_part_of_a_head_is_refused_with_the_multiple() -> None:
    with pytest.raises(UnsupportedMorphError, match=r"whole heads.*multiple of 12.*--to 36"):
        morphcli.widen(_Attention(False), "qkv", by=5, input_shapes=[(1, 4, 8)])


# ---------------------------------------------------------------- timm models

timm = pytest.importorskip("timm")


def _timm(name: str, **kwargs: object) -> nn.Module:
    """A timm model with its initial weights, and random per-channel tensors and statistics:
    layer scales (1e-6 at the start) and norms (1 and 0) would hide a wrong branch."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name_, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and t.ndim == 1:
                scale_like = "gamma" in name_ or name_.endswith(("var", "scale"))
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if scale_like else
                        torch.randn(t.shape, generator=g) * 0.2 + name_.endswith("weight"))
    return model.eval()


def _widenable(model: nn.Module, shape: tuple[int, ...]) -> tuple[int, int]:
    """(layers inspect lists for widen, layers of a kind widen has a rule for)."""
    from morphcli.graph.layers import layers
    from morphcli.morphs.applicable import applicable_morphs
    from morphcli.morphs.runner import as_graph_module
    from morphcli.rules import registry

    gm = as_graph_module(model, [shape])
    kinds = [la for la in layers(gm) if la.module is not None and
             registry.lookup("widen_out", la.module) is not None and
             not getattr(la.module, "groups", 1) == getattr(la.module, "in_channels", 0) > 1]
    return sum("widen" in applicable_morphs(gm, la) for la in kinds), len(kinds)


@pytest.mark.parametrize("name,kwargs,shape,expected", [
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, (1, 3, 32, 32), (9, 10)),
    ("convnext_atto", {}, (1, 3, 32, 32), (28, 29)),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7, "depths": (2, 2, 2, 2)},
     (1, 3, 56, 56), (36, 37)),
])
def test_timm_layers_widenable(name: str, kwargs: dict, shape: tuple[int, ...],
                               expected: tuple[int, int]) -> None:
    # (every layer but the head, whose units would reach the model's output)
    assert _widenable(_timm(name, **kwargs), shape) == expected


@pytest.mark.parametrize("name,kwargs,shape,layer", [
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, (1, 3, 32, 32), "blocks.1.attn.qkv"),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, (1, 3, 32, 32), "patch_embed.proj"),
    ("convnext_atto", {}, (1, 3, 32, 32), "stages.1.blocks.0.mlp.fc2"),
    ("levit_128s", {"img_size": 32}, (1, 3, 32, 32), "stages.0.blocks.0.mlp.ln2.linear"),
])
def test_timm_widen_exact(name: str, kwargs: dict, shape: tuple[int, ...], layer: str) -> None:
    model = _timm(name, **kwargs)
    _, worst = _widen_exact(model, layer, shape, factor=2)
    assert worst < 1e-6
    assert math.isfinite(worst)


# ---------------------------------------------------------------- products of activations


class _Products(nn.Module):
    """Values mixed by attention weights from both sides: ``v @ attn`` keeps v's rows (the
    features, EfficientViT's cascaded attention) and ``attn @ v`` its columns; ``q @ k``
    sums over q's features."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(4, 5),
                                          nn.Linear(10, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = (self.q(x) @ self.k(x).transpose(1, 2)).softmax(-1)  # (B, N, N)
        v = self.v(x)  # (B, N, 5)
        rows = (v.transpose(1, 2) @ attn.transpose(1, 2)).transpose(1, 2)
        return self.o(torch.cat([rows, attn @ v], -1))


def test_products_keep_the_rows_and_columns_of_their_factors() -> None:
    model = _random(_Products())
    wide, worst = _widen_exact(model, "v", (1, 7, 4), by=3)
    assert worst < 1e-6
    assert wide.get_submodule("o").in_features == 16
    with pytest.raises(UnsupportedMorphError, match="multiplies along the widened axis .* no "
                       "weight after the product can take it out"):
        morphcli.widen(model, "q", by=2, input_shapes=[(1, 7, 4)])


class _Unfold(nn.Module):
    """MobileViT's unfolding into patches: the channels folded into the batch axis between the
    batch and the patch rows (a size computed from the batch size at run time), mixed as
    tokens by a LayerNorm and a Linear, then folded back."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
        self.norm, self.mix = nn.LayerNorm(4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        b, c, hh, ww = h.shape
        rows = h.reshape(b * c * 2, hh // 2, ww).transpose(1, 2)  # (b*c*2, ww, hh/2)
        tokens = rows.reshape(b, c, -1).transpose(1, 2)  # (b, positions, c)
        tokens = tokens + self.mix(self.norm(tokens))
        back = tokens.transpose(1, 2).reshape(b * c * 2, ww, hh // 2).transpose(1, 2)
        return self.o(back.reshape(b, c, hh, ww))


@pytest.mark.parametrize("layer", ["a", "mix"])
def test_units_folded_into_the_batch_axis_widen_at_any_batch_size(layer: str) -> None:
    """Traced at batch 1, checked at batch 2: the folded size ``b * c * 2`` is scaled at run
    time, not fixed at the traced batch; widening the token mixer walks back through the
    fold."""
    model = _random(_Unfold())
    wide, worst = _widen_exact(model, layer, (1, 3, 4, 6), by=4)
    assert worst < 1e-6
    assert wide.get_submodule("o").in_channels == 8
    assert wide.get_submodule("norm").weight.numel() == 8
    same = assert_same_function(model, wide, [(5, 3, 4, 6)])
    assert same.max_rel < 1e-6


class _CutUnits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.o = nn.Linear(3, 6), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.a(x).reshape(x.shape[0], 3, 4))  # (b, 2, 6) -> (b, 3, 4)


def test_a_reshape_cutting_the_units_apart_is_refused_with_the_reason() -> None:
    with pytest.raises(UnsupportedMorphError, match="it cuts the widened units apart: no "
                       "axis of its output holds them whole"):
        morphcli.widen(_random(_CutUnits()), "a", by=2, input_shapes=[(1, 2, 3)])


class _HeadsMergedBack(nn.Module):
    """EfficientFormerV2's values: split into heads, mixed along the positions, merged back
    and added to their own depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.v, self.o = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 2, 1)
        self.local = nn.Conv2d(8, 8, 3, padding=1, groups=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v(x)
        b, c, hh, ww = v.shape
        heads = v.reshape(b, 2, c // 2, hh * ww).permute(0, 1, 3, 2)  # (b, heads, n, d)
        mixed = heads.softmax(dim=2) * heads
        back = mixed.transpose(2, 3).reshape(b, c, hh, ww)
        return self.o(back + self.local(v))


def test_heads_merged_back_meet_their_source() -> None:
    model = _random(_HeadsMergedBack())
    wide, worst = _widen_exact(model, "v", (1, 3, 4, 4), by=8)
    assert worst < 1e-6
    assert wide.get_submodule("local").out_channels == 16
    with pytest.raises(UnsupportedMorphError, match="whole heads"):
        morphcli.widen(model, "v", by=3, input_shapes=[(1, 3, 4, 4)])


class _SplitQKV(nn.Module):
    """One layer computes queries, keys and values, split apart (EfficientViT's qkv conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(4, 3 + 3 + 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).split([3, 3, 5], dim=-1)
        return self.o((q @ k.transpose(1, 2)).softmax(-1) @ v)


def test_pieces_a_product_sums_over_keep_their_width() -> None:
    """The queries' and keys' features are summed over by q @ k: they keep their width and
    the values take every new unit."""
    model = _random(_SplitQKV())
    wide, worst = _widen_exact(model, "qkv", (1, 7, 4), by=4)
    assert worst < 1e-6
    assert wide.get_submodule("o").in_features == 9
    _, result = morphcli.widen(model, "qkv", by=4, input_shapes=[(1, 7, 4)])
    assert [c.new for c in result.changes if c.note == "split sizes"] == ["[3, 3, 9]"]
    assert sum("keep their width" in n for n in result.notes) == 2


class _SplitQK(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qk, self.o = nn.Linear(4, 6), nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k = self.qk(x).chunk(2, dim=-1)
        return self.o((q @ k.transpose(1, 2)).softmax(-1))


def test_a_layer_whose_every_piece_a_product_sums_over_is_refused() -> None:
    with pytest.raises(UnsupportedMorphError, match="every piece of them is summed over"):
        morphcli.widen(_random(_SplitQK()), "qk", by=2, input_shapes=[(1, 7, 4)])


class _Pads(nn.Module):
    def __init__(self, channels: bool) -> None:
        super().__init__()
        self.channels = channels
        self.a, self.o = nn.Conv2d(3, 4, 1), nn.Conv2d(4 + 2 * channels, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = (1, 1, 1, 1, 1, 1) if self.channels else (1, 1, 0, 2)
        return self.o(F.pad(self.a(x), pads))


def test_pads_along_the_positions_keep_the_units_and_along_them_are_refused() -> None:
    wide, worst = _widen_exact(_random(_Pads(channels=False)), "a", (1, 3, 5, 5), by=3)
    assert worst < 1e-6 and wide.get_submodule("o").in_channels == 7
    with pytest.raises(UnsupportedMorphError, match="it pads the widened axis"):
        morphcli.widen(_random(_Pads(channels=True)), "a", by=3, input_shapes=[(1, 3, 5, 5)])


class _ConcatShuffle(nn.Module):
    """ShuffleNet v2's unit end: ``cat([x1, branch(x2)])``, then the channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.p, self.q, self.o = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.p(x), self.q(x)], dim=1)
        b, c, hh, ww = h.shape
        return self.o(h.view(b, 2, c // 2, hh, ww).transpose(1, 2).reshape(b, c, hh, ww))


def test_a_concat_shuffled_as_heads_needs_every_part_widened() -> None:
    with pytest.raises(UnsupportedMorphError, match="whose part 'q' keeps its width"):
        morphcli.widen(_random(_ConcatShuffle()), "p", by=4, input_shapes=[(1, 3, 4, 4)])
