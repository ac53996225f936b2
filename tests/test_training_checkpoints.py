"""Nothing of the input is dropped (issue 12): state_dict metadata, layers the graph does not
use, and (further down) training checkpoints with their other entries.

Written files are compared here with plain torch: their tensors loaded (strict) into a fresh
torchvision model grown the same way and run beside the original.
"""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import torchvision_model
from helpers import assert_one_error_line, invoke
from torch import nn

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------- metadata, unused layers


def test_mnasnet_state_dict_keeps_its_versions(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = torchvision_model("mnasnet0_5")
    src = tmp_path / "mnasnet.pt"
    torch.save(original.state_dict(), src)  # holds _metadata: mnasnet needs version 2
    out = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "layers.6", "--by", "8", "--arch",
                             "torchvision.models:mnasnet0_5", "--input-shape", "1,3,64,64",
                             "-o", out)
    assert code == 0, stderr  # was exit 3: "version should be set to 1 or 2"
    written = load_file(out)
    import torchvision

    grown = torchvision.models.mnasnet0_5(weights=None)
    grown.layers[6] = nn.Conv2d(16, 16, 1, bias=False)
    grown.layers[7] = nn.BatchNorm2d(16)
    grown.layers[8][0].layers[0] = nn.Conv2d(16, 24, 1, bias=False)
    state = dict(written)
    state = type(original.state_dict())(state)
    state._metadata = original.state_dict()._metadata  # type: ignore[attr-defined]
    grown.load_state_dict(state, strict=True)
    assert _max_rel(_outputs(original, X64), _outputs(grown, X64)) <= 1e-5


def test_googlenet_aux_heads_are_carried(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import load_file

    original = torchvision_model("googlenet", aux_logits=True, init_weights=True)
    src = tmp_path / "googlenet.pt"
    torch.save(original.state_dict(), src)
    aux = {k: v for k, v in original.state_dict().items() if k.startswith("aux")}
    assert sum(v.numel() for k, v in aux.items() if "running" not in k
               and "num_batches" not in k) == 6_379_984
    out = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "conv1.conv", "--by", "8", "--arch",
                             "torchvision.models:googlenet", "--arch-kwargs",
                             '{"aux_logits": true, "init_weights": true}',
                             "--input-shape", "1,3,64,64", "-o", out)
    assert code == 0, stderr
    assert "8 layers under aux1, aux2 (6,379,984 parameters) are not used" in stderr
    written = load_file(out)
    assert written.keys() == original.state_dict().keys()
    # A fresh googlenet grown the same way takes every tensor (strict), aux heads included.
    grown = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    grown.conv1.conv = nn.Conv2d(3, 72, 7, stride=2, padding=3, bias=False)
    grown.conv1.bn = nn.BatchNorm2d(72, eps=0.001)
    grown.conv2.conv = nn.Conv2d(72, 64, 1, bias=False)
    grown.load_state_dict(written, strict=True)
    assert _max_rel(_outputs(original, X64), _outputs(grown, X64)) <= 1e-5
    feats = torch.randn(2, 512, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_outputs(original.aux1, feats), _outputs(grown.aux1, feats))
    # The morphed file in again: the carried heads survive a second morph.
    deep = tmp_path / "deep.pt"
    code, _, stderr = invoke("deepen", out, "--after", "conv1.conv", "-o", deep)
    assert code == 0, stderr
    assert "aux1, aux2" in stderr
    tensors = torch.load(deep, weights_only=True)["tensors"]
    for k, v in aux.items():
        assert torch.equal(tensors[k], v), k


def test_carried_layer_cannot_be_morphed(tmp_path: Path) -> None:
    original = torchvision_model("googlenet", aux_logits=True, init_weights=True)
    src = tmp_path / "googlenet.pt"
    torch.save(original.state_dict(), src)
    code, _, stderr = invoke("widen", src, "aux1.fc1", "--by", "8", "--arch",
                             "torchvision.models:googlenet", "--arch-kwargs",
                             '{"aux_logits": true, "init_weights": true}',
                             "--input-shape", "1,3,64,64", "-o", tmp_path / "x.pt")
    assert code == 2
    assert_one_error_line(stderr, "aux1.fc1", "not used by the traced graph")
    assert not (tmp_path / "x.pt").exists()
