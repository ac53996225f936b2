"""The public rule API: a rule for a user's own layer type, registered from outside the package."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import morphcli
from morphcli.errors import UnsupportedMorphError
from morphcli.morphs import runner
from morphcli.rules.channel_map import ChannelMap, follow
from morphcli.rules.linear_layers import LinearRule


class ChannelGain(nn.Module):
    """A user's layer: one learnt gain per channel, applied through einsum (which the coupling
    walk cannot follow when traced through)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,c->nchw", x, self.gain)


class _Net(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(nn.Conv2d(3, 6, 3, padding=1), ChannelGain(6), nn.ReLU(),
                         nn.Conv2d(6, 4, 3))


class ChannelGainRule:
    """What the README's example registers: the gains follow the channel map."""

    @staticmethod
    def channel_dim(m: nn.Module, rank: int) -> int:
        return 1

    @staticmethod
    def applies(m: nn.Module) -> bool:
        return True

    @staticmethod
    def why_not(m: nn.Module) -> str | None:
        return None

    @staticmethod
    def resize(m: ChannelGain, cmap: ChannelMap, ctx: object) -> nn.Module:
        new = ChannelGain(cmap.width)
        new.gain = nn.Parameter(follow(m.gain, 0, cmap))
        return new


def test_a_registered_rule_makes_a_users_layer_widenable() -> None:
    torch.manual_seed(0)
    model = _Net().eval()
    with pytest.raises(UnsupportedMorphError, match="einsum"):
        morphcli.widen(model, "0", by=5, input_shapes=[(1, 3, 8, 8)])

    morphcli.register_rule("channelwise", ChannelGain)(ChannelGainRule)
    wide, result = morphcli.widen(model, "0", by=5, init="copy", input_shapes=[(1, 3, 8, 8)])
    assert [n.op for n in wide.graph.nodes].count("call_module") == 4  # the gain is one layer
    assert wide.get_submodule("1").gain.shape == (11,)
    assert wide.get_submodule("3").weight.shape == (4, 11, 3, 3)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert float((model(x) - wide(x)).abs().max()) < 1e-6
    assert result.check.equivalent


def test_register_rule_refuses_an_incomplete_rule() -> None:
    class Half:
        @staticmethod
        def channel_dim(m: nn.Module, rank: int) -> int:
            return 1

    with pytest.raises(TypeError, match="applies, why_not, resize"):
        morphcli.register_rule("channelwise", ChannelGain)(Half)
    with pytest.raises(ValueError, match="unknown rule kind"):
        morphcli.register_rule("widen", ChannelGain)
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        morphcli.register_rule("passthrough", int)


def test_register_substitute_replaces_a_layer_before_tracing() -> None:
    class Affine(nn.Module):  # stands for a library's layer that torch.nn computes too
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 3))
            self.bias = nn.Parameter(torch.randn(6))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.weight, self.bias)

    def plain(m: Affine) -> nn.Linear:
        new = nn.Linear(3, 6)
        new.weight, new.bias = m.weight, m.bias
        return new

    morphcli.register_substitute(Affine, plain)
    model = nn.Sequential(Affine(), nn.Tanh(), nn.Linear(6, 2)).eval()
    x = torch.randn(5, 3)
    with torch.no_grad():
        before = model(x)
    wide, _ = morphcli.widen(model, "0", by=2, input_shapes=[(1, 3)])
    assert type(wide.get_submodule("0")) is nn.Linear
    assert wide.get_submodule("0").weight.shape == (8, 3)
    with torch.no_grad():
        assert float((before - wide(x)).abs().max()) < 1e-6


class Unstorable(nn.Linear):
    """A foreign layer type: widenable by the rule registered below, but not storable."""


def test_a_model_that_cannot_be_written_is_refused_before_the_morph(tmp_path: Path) -> None:
    from tests.helpers import assert_one_error_line, invoke

    morphcli.register_rule("widen_out", Unstorable)(LinearRule)
    model = nn.Sequential(Unstorable(4, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    src, out = tmp_path / "m.pt", tmp_path / "wide.pt"
    torch.save(model, src)
    seen: list[str] = []
    real = runner.apply_morph
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "apply_morph", lambda *a, **k: seen.append("morph") or real(*a, **k))
        r = invoke("widen", src, "0", "--by", "2", "--trust", "--input-shape", "1,4", "-o", out)
    assert (r.code, seen, out.exists()) == (2, [], False)
    assert_one_error_line(r.stderr, "layer '0' is a", "Unstorable", "cannot store")
