"""torchvision Swin (issue 12): its fx-wrapped library functions (``_get_relative_position_bias``,
``shifted_window_attention``, ``_patch_merging_pad``) are stored by reference under the
allowlist, so swin morphs exactly and is written in all four formats. The written files are
compared here with plain torch and onnxruntime, independently of morph's own check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import torchvision_model
from helpers import invoke, onnx_callable
from torch import nn

SMALL = ("--arch", "torchvision.models.swin_transformer:SwinTransformer", "--arch-kwargs",
         json.dumps({"patch_size": [4, 4], "embed_dim": 16, "depths": [2, 2],
                     "num_heads": [2, 2], "window_size": [4, 4], "num_classes": 10}),
         "--input-shape", "1,3,32,32")  # checked at full size: window attention is opaque
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def _small_swin() -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                        window_size=[4, 4], num_classes=10)
    for p in m.parameters():  # a trained-looking relative position bias table, not zeros
        if p.dim() == 2 and p.shape[1] == 2:
            p.data.normal_()
    return m.eval()


def _grown(m: nn.Module, hidden: int) -> nn.Module:
    """``m`` with block features.1.0's MLP widened to ``hidden`` (as `widen --to hidden`)."""
    import copy

    g = copy.deepcopy(m)
    mlp = g.features[1][0].mlp
    mlp[0] = nn.Linear(mlp[0].in_features, hidden)
    mlp[3] = nn.Linear(hidden, mlp[3].out_features)
    return g


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2", ".onnx"])
def test_small_swin_morphs_into_every_format(suffix: str, tmp_path: Path) -> None:
    model = _small_swin()
    src = tmp_path / "swin.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / f"wide{suffix}"
    code, stdout, stderr = invoke("widen", src, "features.1.0.mlp.0", "--by", "8", *SMALL,
                                  "-o", out, "--json")
    assert code == 0, stderr  # was: '_get_relative_position_bias' ... cannot store safely
    doc = json.loads(stdout)
    assert doc["plan"]["check"]["max_abs"] == 0.0 and doc["export_check"]["equivalent"]
    assert not any("checked at input" in n for n in doc["plan"]["notes"])  # not shrunk
    with torch.no_grad():
        expected = model(X)
        if suffix == ".onnx":
            got = onnx_callable(out)(X)
            bound = 1e-4
        elif suffix == ".pt2":
            got = torch.export.load(str(out)).module()(X)
            bound = 1e-5
        else:
            if suffix == ".pt":
                tensors = torch.load(out, weights_only=True)["tensors"]
            else:
                from safetensors.torch import load_file

                tensors = load_file(out)
            grown = _grown(model, 72)
            grown.load_state_dict(tensors, strict=True)
            got = grown(X)
            bound = 1e-5
    assert _rel(expected, got) <= bound


@pytest.mark.slow
def test_swin_t_morphs_exactly(tmp_path: Path) -> None:
    model = torchvision_model("swin_t")
    src = tmp_path / "swin_t.pt"
    torch.save(model.state_dict(), src)
    out = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "features.1.0.mlp.0", "--by", "8", "--arch",
                             "torchvision.models:swin_t", "--input-shape", "1,3,64,64",
                             "-o", out)
    assert code == 0, stderr
    from safetensors.torch import load_file

    grown = _grown(model, 392)
    grown.load_state_dict(load_file(out), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _rel(model(x), grown.eval()(x)) <= 1e-5
