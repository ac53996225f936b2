"""Bounds at the size of float32 round-off, for the morph parts whose mistakes are too small for
a 1e-5 check to see on one morph but add up over a few (an identity BatchNorm scaled by 1 instead
of sqrt(1 + eps) is 5e-6 off, and three stacked morphs drift past the tolerance)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import outputs_of

import morphcli

ROUND_OFF = 4 * torch.finfo(torch.float32).eps  # a few ulps: what x / s * s may lose


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


@pytest.mark.parametrize("after", ["conv3", "fc1"])
def test_the_inserted_batchnorm_is_the_identity_to_round_off(samples: Path, after: str) -> None:
    """The new BatchNorm alone, on the tensor it receives, in eval mode."""
    gm = morphcli.load(samples / "cnn.pt")
    new, _ = morphcli.deepen(gm, after=after, norm=True)
    bn = new.get_submodule(f"{after}_deep_bn").eval()
    x = torch.randn(4, bn.num_features, *([5, 5] if after == "conv3" else []))
    with torch.no_grad():
        assert _relative(x, bn(x)) <= ROUND_OFF


def test_three_stacked_norm_deepens_stay_at_round_off(samples: Path, tmp_path: Path) -> None:
    """Through the written file, compared with plain torch (not morph's check)."""
    gm = morphcli.load(samples / "cnn.pt")
    model = gm
    for _ in range(3):
        model, _ = morphcli.deepen(model, after="conv3", norm=True)
    path = tmp_path / "deep.pt"
    morphcli.save(model, path)
    x = torch.randn(4, 3, 32, 32)
    (want,), (got,) = outputs_of(gm, (x,)), outputs_of(morphcli.load(path), (x,))
    assert _relative(want, got) <= 1e-6
