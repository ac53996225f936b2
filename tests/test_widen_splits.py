"""widen through splits of the widened axis (split, chunk, tensor_split, slices): each piece
receives its own units and their new copies, split sizes and slice bounds follow."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_function
from torch import nn
from torch.nn import functional as F

import morphcli
from morphcli.errors import UnsupportedMorphError
from morphcli.morphs.runner import CheckOptions

NO_CHECK = CheckOptions(enabled=False)
SHAPE = (2, 3, 6, 6)


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every weight, bias and BatchNorm statistic random (none zero or one), so that a piece
    given another piece's units shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.5)
    return model.eval()


class UnevenSplit(nn.Module):
    """torch.split with uneven sizes, a residual into the second piece, concatenated back in
    the other order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.b = nn.Conv2d(3, 7, 3, padding=1)
        self.bn = nn.BatchNorm2d(7)
        self.out = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(self.a(x), [3, 7], dim=1)
        second = second + self.bn(self.b(x))
        return self.out(torch.cat([second, first], 1))


class ChunkOfOneConv(nn.Module):
    """CSP: one conv's output chunked in two halves, one half through a residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.t = nn.Conv2d(8, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, work = self.a(x).chunk(2, dim=1)
        work = work + self.c(work)
        return self.t(torch.cat([keep, work], 1))


class SliceResidual(nn.Module):
    """ReXNet: a residual added to the first channels only (``y[:, :6] + x``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 9, 1)
        self.o = nn.Conv2d(9, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        y = self.b(h)
        return self.o(torch.cat([y[:, 0:6] + h, y[:, 6:]], dim=1))


class DualPath(nn.Module):
    """DPN: each conv's output sliced into a residual part and a dense part that grows."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(12, 10, 1)
        self.c = nn.Conv2d(14, 10, 1)
        self.o = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        res, dense = h[:, :8], h[:, 8:]
        for conv in (self.b, self.c):
            y = conv(torch.cat([res, dense], 1) if conv is self.c else h)
            res, dense = res + y[:, :8], torch.cat([dense, y[:, 8:]], 1)
        return self.o(torch.cat([res, dense], 1))


class Scales(nn.Module):
    """Res2Net: Tensor.split by a size, each piece through its own conv, added to the next."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.o = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.a(x).split(4, 1)
        sp = self.convs[0](xs[0])
        out = [sp]
        sp = self.convs[1](sp + xs[1])
        return self.o(torch.cat([*out, sp, xs[2]], 1))


class Features(nn.Module):
    """Linear features cut with tensor_split and an Ellipsis slice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 9)
        self.p = nn.Linear(4, 3)
        self.q = nn.Linear(5, 3)
        self.r = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        u, v = torch.tensor_split(h, [4], dim=-1)
        return self.p(u) * self.q(v) + self.r(h[..., 4:])


CASES = [
    (UnevenSplit, "a", SHAPE), (UnevenSplit, "b", SHAPE),
    (ChunkOfOneConv, "a", SHAPE), (ChunkOfOneConv, "c", SHAPE),
    (SliceResidual, "a", SHAPE), (SliceResidual, "b", SHAPE),
    (DualPath, "a", SHAPE), (DualPath, "b", SHAPE), (DualPath, "c", SHAPE),
    (Scales, "a", SHAPE), (Scales, "convs.0", SHAPE),
    (Features, "fc", (4, 5)),
]


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("by", [1, 3, 9])
@pytest.mark.parametrize("cls,layer,shape", CASES)
def test_split_pieces_keep_their_units(cls: type[nn.Module], layer: str,
                                       shape: tuple[int, ...], by: int, init: str) -> None:
    torch.manual_seed(0)
    model = _randomised(cls())
    wide, result = morphcli.widen(model, layer, by=by, init=init, seed=by,
                                  input_shapes=[shape])
    grown = wide.get_submodule(layer)
    old = model.get_submodule(layer)
    assert getattr(grown, "out_channels", getattr(grown, "out_features", 0)) == \
        getattr(old, "out_channels", getattr(old, "out_features", 0)) + by
    assert any(c.action == "rewired" for c in result.changes)
    assert result.check is not None and result.check.equivalent
    same = assert_same_function(model, wide, [shape],
                                seeds=(0, 1), scales=(1.0, 10.0))
    assert same.max_rel < 1e-6


def _rewired(result: morphcli.MorphResult) -> dict[str, str | list[int] | None]:
    return {c.name: c.new for c in result.changes if c.action == "rewired"}


def test_chunk_of_one_conv_grows_both_halves() -> None:
    """The split falls inside the widened layer's units: its new units are placed so that
    each half grows, each half's copies beside it."""
    model = _randomised(ChunkOfOneConv())
    wide, result = morphcli.widen(model, "a", by=4, init="copy", input_shapes=[SHAPE])
    assert _rewired(result) == {"chunk": "[6, 6]"}
    assert wide.get_submodule("c").in_channels == 6
    assert wide.get_submodule("t").in_channels == 12
    plan = next(e for e in result.plan.layers if e.path == "a")
    assert plan.out_map is not None
    src = plan.out_map.src.tolist()
    assert max(src[:6]) < 4 and min(src[6:]) >= 4  # each half holds copies of its own units
    assert result.check is not None and result.check.equivalent


def test_uneven_split_sizes_follow_each_piece() -> None:
    model = _randomised(UnevenSplit())
    _, result = morphcli.widen(model, "a", by=10, input_shapes=[SHAPE])
    assert _rewired(result) == {"split": "[6, 14]"}  # 3:7 grown in proportion
    _, result = morphcli.widen(model, "b", by=2, input_shapes=[SHAPE])
    assert _rewired(result) == {"split": "[3, 9]"}  # only the piece b reaches grows


def test_slice_bounds_follow_the_residual_part() -> None:
    model = _randomised(SliceResidual())
    wide, result = morphcli.widen(model, "a", by=3, input_shapes=[SHAPE])
    # a's units are y's first six: y grows there, and its own last three move along
    assert wide.get_submodule("b").out_channels == 12
    assert set(_rewired(result).values()) == {"0:9", "9:12"}


class NormedChunks(nn.Module):
    """A LayerNorm over the units, then chunked: every unit copied equally often, in each
    half."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.ln = nn.LayerNorm(8)
        self.p = nn.Linear(4, 3)
        self.q = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, v = self.ln(self.fc(x)).chunk(2, -1)
        return self.p(u) * self.q(v)


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_layernorm_then_chunk_replicates_within_each_half(init: str) -> None:
    model = _randomised(NormedChunks())
    wide, result = morphcli.widen(model, "fc", factor=2, init=init, input_shapes=[(4, 5)])
    assert _rewired(result) == {"chunk": "[8, 8]"}
    out_map = next(e for e in result.plan.layers if e.path == "fc").out_map
    assert out_map is not None
    assert out_map.src.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7]
    assert assert_same_function(model, wide, [(4, 5)], seeds=(0, 1)).max_rel < 1e-6
    with pytest.raises(UnsupportedMorphError, match="multiple of 8"):
        morphcli.widen(model, "fc", by=3, input_shapes=[(4, 5)], check=NO_CHECK)


class ChunksThenNorm(nn.Module):
    """EdgeNeXt's split convs: chunks, one through a depthwise conv, concatenated again and
    normalised over the channels (``other``: a concat with a layer the widen leaves alone)."""

    def __init__(self, other: bool = False) -> None:
        super().__init__()
        self.other = other
        self.fc = nn.Linear(5, 8)
        self.dw = nn.Conv1d(4, 4, 3, padding=1, groups=4)
        self.side = nn.Linear(5, 4)
        self.ln = nn.LayerNorm(8)
        self.o = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (batch, tokens, 5)
        u, v = self.fc(x).chunk(2, -1)
        u = self.dw(u.transpose(1, 2)).transpose(1, 2)
        return self.o(self.ln(torch.cat([u, self.side(x) if self.other else v], -1)))


@pytest.mark.parametrize("init", ["zero", "copy"])
def test_a_norm_over_a_concat_of_the_widened_pieces_replicates_them(init: str) -> None:
    model = _randomised(ChunksThenNorm())
    wide, result = morphcli.widen(model, "fc", factor=2, init=init, input_shapes=[(2, 6, 5)])
    out_map = next(e for e in result.plan.layers if e.path == "fc").out_map
    assert out_map is not None and out_map.src.tolist() == [0, 1, 2, 3, 0, 1, 2, 3,
                                                            4, 5, 6, 7, 4, 5, 6, 7]
    assert wide.get_submodule("ln").normalized_shape == (16,)
    assert assert_same_function(model, wide, [(2, 6, 5)], seeds=(0, 1)).max_rel < 1e-6
    with pytest.raises(UnsupportedMorphError, match="LayerNorm normalises over units laid "
                       "out by a concatenation"):  # the side layer's units are not copied
        morphcli.widen(_randomised(ChunksThenNorm(other=True)), "fc", factor=2,
                       input_shapes=[(2, 6, 5)])


class TiedChunks(nn.Module):
    """EdgeNeXt: a depthwise conv's output (the first chunk's units) added to the second
    chunk, so both chunks must carry the same units."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.o = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, q = self.a(x).chunk(2, 1)
        return self.o(self.dw(p) + q)


class Ghost(nn.Module):
    """GhostNet: ``cat([x1, dw(x1)])[:, :out]`` added to a residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.primary = nn.Conv2d(8, 4, 1)
        self.cheap = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.o = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.stem(x))
        x1 = self.primary(h)
        return self.o(torch.cat([x1, self.cheap(x1)], 1)[:, :8] + h)


class GatedConcat(nn.Module):
    """MambaOut's gated conv block: a gate times the concat of the split's other two pieces,
    one of them through a depthwise conv, so the gate's units are the concat's."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.o = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, i, c = torch.split(self.a(x), [6, 4, 2], dim=1)
        return self.o(F.gelu(g) * torch.cat((i, self.dw(c)), dim=1))


@pytest.mark.parametrize("init", ["zero", "copy"])
@pytest.mark.parametrize("cls,layer,old", [(TiedChunks, "a", 8), (Ghost, "stem", 8),
                                           (GatedConcat, "a", 12)])
def test_pieces_that_carry_the_same_units_grow_alike(cls: type[nn.Module], layer: str,
                                                     old: int, init: str) -> None:
    model = _randomised(cls())
    for by in (2, 6):
        wide, result = morphcli.widen(model, layer, by=by, init=init, input_shapes=[SHAPE])
        out_map = next(e for e in result.plan.layers if e.path == layer).out_map
        assert out_map is not None
        half = (old + by) // 2  # the two halves: the same units and copies, old/2 apart
        assert torch.equal(out_map.src[:half] + old // 2, out_map.src[half:])
        assert torch.equal(out_map.new[:half], out_map.new[half:])
        assert assert_same_function(model, wide, [SHAPE], seeds=(0, 1)).max_rel < 1e-6
    with pytest.raises(UnsupportedMorphError, match="grow by the same number of units"):
        morphcli.widen(model, layer, by=1, input_shapes=[SHAPE], check=NO_CHECK)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("cls,layer,shape", [(ChunkOfOneConv, "a", SHAPE),
                                             (Features, "fc", (4, 5))])
def test_rewritten_splits_survive_save_and_load(tmp_path, cls: type[nn.Module], layer: str,
                                                shape: tuple[int, ...], suffix: str) -> None:
    model = _randomised(cls())
    wide, _ = morphcli.widen(model, layer, by=3, input_shapes=[shape])
    morphcli.save(wide, tmp_path / f"wide{suffix}", input_shapes=[shape])
    back = morphcli.load(tmp_path / f"wide{suffix}")
    assert assert_same_function(model, back, [shape], seeds=(0, 1)).max_rel < 1e-6


class _Strided(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.o = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.a(x)[:, ::2])


class _Together(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.o = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(self.a(x), 4, dim=1)
        return self.o(torch.cat(parts[::-1], 1))


@pytest.mark.parametrize("cls,message", [
    (_Strided, "slices the widened axis with a step"),
    (_Together, "pieces are used together"),
])
def test_splits_that_cannot_hold_their_units_are_refused(cls: type[nn.Module],
                                                         message: str) -> None:
    with pytest.raises(UnsupportedMorphError, match=message):
        morphcli.widen(_randomised(cls()), "a", by=2, input_shapes=[SHAPE], check=NO_CHECK)


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name,layers", [
    ("cspresnet50", ["stages.0.conv_exp.conv", "stages.1.blocks.0.conv3.conv"]),
    ("rexnet_100", ["features.1.conv_pwl.conv", "features.2.conv_pwl.conv"]),
    ("ghostnet_050", ["conv_stem", "blocks.1.0.ghost2.primary_conv.0"]),
    # split attention: a view into paths x channels (the channels carry the units), softmax
    # over the paths; ResNeSt's radix-grouped conv and its reshapes through a transpose
    ("skresnet18", ["layer1.0.conv1.attn.fc_select", "layer2.0.conv1.paths.0.conv"]),
    ("resnest14d", ["layer1.0.conv2.conv", "layer1.0.conv2.fc2"]),
    # the residual stream chunked into heads, each head's values mixed by ``v @ attn``
    ("efficientvit_m0", ["stages.0.blocks.0.ffn1.m.pw2.conv",
                         "stages.0.blocks.0.mixer.m.attn.qkvs.0.conv"]),  # (_SplitQKV)
    ("mambaout_femto", ["stages.0.blocks.0.fc1"]),  # GatedConcat in a real model
    ("edgenext_xx_small", ["stages.1.blocks.1.pos_embd.token_projection"]),  # ChunksThenNorm
])
def test_timm_split_models_widen_exactly(name: str, layers: list[str]) -> None:
    from test_timm import _randomised as randomised_timm

    torch.manual_seed(0)
    model = randomised_timm(timm.create_model(name, pretrained=False))
    for layer in layers:
        wide, result = morphcli.widen(model, layer, factor=2, init="copy",
                                      input_shapes=[(1, 3, 32, 32)])
        assert result.check is not None and result.check.equivalent
        assert any(c.action == "rewired" for c in result.changes)
        # (fifty layers of float32 round-off: ~1e-6 of the output's scale)
        assert_same_function(model, wide, [(2, 3, 32, 32)], rtol=5e-6)
