"""Dtypes are kept (issue 12): a bf16 / fp16 / fp64 model comes out in its own dtype.

The check runs in float32 (float64 for float64 models) and says so; the written file is
compared here with plain torch, independently of morph's own check: its tensors loaded into a
fresh torchvision resnet18 grown the same way, run beside the original.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import torchvision_model
from helpers import assert_one_error_line, invoke
from torch import nn

ARCH = ("--arch", "torchvision.models:resnet18", "--input-shape", "1,3,32,32")
X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return torchvision_model("resnet18")


def _state_file(model: nn.Module, dtype: torch.dtype, tmp_path: Path) -> tuple[Path, nn.Module]:
    """The model's state_dict saved in ``dtype``, and the model holding exactly those values."""
    import copy

    m = copy.deepcopy(model).to(dtype).eval()
    path = tmp_path / f"r18.{str(dtype)[6:]}.pt"
    torch.save(m.state_dict(), path)
    return path, m


def _widened_resnet(state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh torchvision resnet18 whose layer1.0.conv1 has 72 units (as `widen --by 8`),
    holding ``state`` in the state's own dtypes."""
    import torchvision

    m = torchvision.models.resnet18(weights=None)
    block = m.layer1[0]
    block.conv1 = nn.Conv2d(64, 72, 3, padding=1, bias=False)
    block.bn1 = nn.BatchNorm2d(72)
    block.conv2 = nn.Conv2d(72, 64, 3, padding=1, bias=False)
    m.load_state_dict(state, assign=True)
    return m.eval()


def _floating_dtypes(tensors: dict[str, torch.Tensor]) -> set[torch.dtype]:
    return {t.dtype for t in tensors.values() if t.is_floating_point()}


def _run(model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    with torch.no_grad():
        return model(X.to(dtype)).double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_state_dict_keeps_its_dtype(resnet: nn.Module, dtype: torch.dtype,
                                    tmp_path: Path) -> None:
    import copy

    from safetensors.torch import load_file

    src, original = _state_file(resnet, dtype, tmp_path)
    out = tmp_path / "wide.safetensors"
    code, stdout, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH,
                                  "-o", out, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    check_dtype = "float64" if dtype == torch.float64 else "float32"
    assert doc["plan"]["check"]["dtype"] == check_dtype
    if dtype == torch.float64:  # float64 convolutions sum 72 channels in another order than
        # 64 on some CPUs (the 8 new zero columns change the blocking): round-off, not bits
        assert doc["plan"]["check"]["max_rel"] <= 1e-13
    else:  # zero-init widen, checked in float32: bit-exact
        assert doc["plan"]["check"]["max_abs"] == 0.0
    if dtype != torch.float64:
        assert f"checked in float32: the {str(dtype)[6:]} weights" in doc["plan"]["check"][
            "notes"][0]
    assert doc["export_check"]["method"] == "read back"
    written = load_file(out)
    assert _floating_dtypes(written) == {dtype}
    assert written["layer1.0.conv1.weight"].shape == (72, 64, 3, 3)
    data = sum(t.numel() * t.element_size() for t in written.values())
    assert data <= out.stat().st_size < data + 200_000  # the file did not double (issue 12)
    assert data < 11.8e6 * dtype.itemsize
    # Independently of morph: upcast both to the check dtype, run, compare.
    wide = check_dtype == "float64" and torch.float64 or torch.float32
    grown = _widened_resnet(written)
    a = _run(copy.deepcopy(original).to(wide), wide)
    b = _run(copy.deepcopy(grown).to(wide), wide)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    # And in the file's own dtype, both models as they are: a bound that fits that dtype.
    a, b = _run(original, dtype), _run(grown, dtype)
    bound = {torch.bfloat16: 5e-2, torch.float16: 5e-3, torch.float64: 1e-12}[dtype]
    assert float((a - b).abs().max()) <= bound * float(a.abs().max())


def test_bf16_archive_and_pickled_model_stay_bf16(resnet: nn.Module, tmp_path: Path) -> None:
    src, original = _state_file(resnet, torch.bfloat16, tmp_path)
    archive = tmp_path / "wide.pt"
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", archive)
    assert code == 0, stderr
    assert "the output is written in bfloat16" in stderr
    tensors = torch.load(archive, weights_only=True)["tensors"]
    assert _floating_dtypes(tensors) == {torch.bfloat16}
    # Our archive in, deepened: still bf16, and the new layer is bf16 too.
    deep = tmp_path / "deep.pt"
    code, _, stderr = invoke("deepen", archive, "--after", "layer1.0.conv1", "-o", deep)
    assert code == 0, stderr
    tensors = torch.load(deep, weights_only=True)["tensors"]
    assert _floating_dtypes(tensors) == {torch.bfloat16}
    assert len(tensors) > len(torch.load(archive, weights_only=True)["tensors"])
    # A whole pickled bf16 model (needs --trust: torchvision classes are not allowlisted).
    pickled = tmp_path / "model.pt"
    torch.save(original, pickled)
    out = tmp_path / "swapped.pt"
    code, _, stderr = invoke("swap", pickled, "relu", "--to", "prelu", "--trust",
                             "--input-shape", "1,3,32,32", "-o", out)
    assert code == 0, stderr
    tensors = torch.load(out, weights_only=True)["tensors"]
    assert _floating_dtypes(tensors) == {torch.bfloat16}


def test_fp16_pt2_is_verified_in_float16(resnet: nn.Module, tmp_path: Path) -> None:
    src, original = _state_file(resnet, torch.float16, tmp_path)
    out = tmp_path / "wide.pt2"
    code, stdout, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH,
                                  "-o", out, "--json")
    assert code == 0, stderr
    check = json.loads(stdout)["export_check"]
    assert check["method"] == "run" and check["dtype"] == "float16" and check["equivalent"]
    program = torch.export.load(str(out))
    weights = [t for t in program.state_dict.values() if t.is_floating_point()]
    assert weights and {t.dtype for t in weights} == {torch.float16}
    a = _run(original.float(), torch.float32)
    with torch.no_grad():
        b = program.module()(X.half()).double()
    assert float((a - b).abs().max()) <= 1e-2 * float(a.abs().max())


def test_bf16_onnx_refused_with_a_way_out(resnet: nn.Module, tmp_path: Path) -> None:
    src, _ = _state_file(resnet, torch.bfloat16, tmp_path)
    out = tmp_path / "wide.onnx"
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", out,
                             "-q")
    assert code == 2
    assert_one_error_line(stderr, "bfloat16", ".safetensors or .pt2")
    assert not out.exists()
