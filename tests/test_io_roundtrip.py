"""Every format, written and read back, computes the same function; plain tools can open it."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import TV_SHAPE, torchvision_model
from helpers import assert_equivalent, invoke, onnx_callable, outputs_of
from torch import nn

import morphcli

SAMPLE_NAMES = ["cnn.pt", "mlp.pt", "resnet.pt"]
SUFFIXES = [".pt", ".safetensors", ".pt2", ".onnx"]
# Our own formats hold the very same tensors: bit-identical outputs. ONNX Runtime fuses and
# reorders float32 arithmetic, so it gets a small absolute bound (outputs here are O(1)).
# safetensors hands out its tensors at the file's offsets (8-byte aligned, not 64), and at batch
# size 1 the CPU kernels then take another path: the same bytes, float32 round-off apart.
ATOL = {".onnx": 2e-5, ".safetensors": 1e-6}
PLAIN_BATCH = 5  # exports trace with batch 2 and verify with 3: 5 proves the batch is dynamic


def _batched(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    return (batch, *shape[1:])


def _check_plain(original: nn.Module, out: Path, shape: tuple[int, ...]) -> None:
    """Open ``out`` the way someone without morphcli would, and compare with ``original``."""
    suffix = out.suffix
    if suffix == ".pt":
        obj = torch.load(out, weights_only=True)
        assert obj["format"] == "morphcli.archive"
        assert json.loads(obj["architecture"])["format"] == "morphcli.architecture"
        expected = original.state_dict()
        assert set(obj["tensors"]) == set(expected)
        for key, tensor in expected.items():
            assert torch.equal(obj["tensors"][key], tensor), key
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as f:
            assert "morphcli.architecture" in (f.metadata() or {})
            expected = original.state_dict()
            assert set(f.keys()) == set(expected)
            for key, tensor in expected.items():
                assert torch.equal(f.get_tensor(key), tensor), key
    elif suffix == ".pt2":
        program = torch.export.load(str(out)).module()
        assert_equivalent(original, program, [_batched(shape, PLAIN_BATCH)], atol=1e-6)
        out5 = outputs_of(program, [torch.randn(_batched(shape, PLAIN_BATCH))])
        assert out5[0].shape[0] == PLAIN_BATCH
    elif suffix == ".onnx":
        run = onnx_callable(out)
        assert_equivalent(original, run, [_batched(shape, PLAIN_BATCH)], atol=ATOL[".onnx"])
        assert outputs_of(run, [torch.randn(_batched(shape, PLAIN_BATCH))])[0].shape[0] == 5
    else:  # pragma: no cover
        raise AssertionError(suffix)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_sample_round_trip_through_cli(samples: Path, samples_module, name: str,
                                       suffix: str) -> None:
    src = samples / name
    out = samples / f"exported{suffix}"
    code, stdout, stderr = invoke("export", src, "-o", out, "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert doc["output"] == str(out) and doc["format"] == suffix
    assert doc["check"]["equivalent"] is True
    assert doc["check"]["max_abs"] <= ATOL.get(suffix, 0.0)

    code, stdout, stderr = invoke("check", src, out, "--json")
    assert code == 0, stdout + stderr
    report = json.loads(stdout)
    assert report["equivalent"] is True and report["samples"] == 8
    assert report["max_abs"] <= ATOL.get(suffix, 0.0)

    original = samples_module.build(name)
    shape = samples_module.SAMPLES[name][1]
    if suffix != ".onnx":  # everything but ONNX comes back as a morphable graph
        loaded = morphcli.load(out)
        assert [s.shape for s in loaded.meta["morphcli.inputs"]] == [shape]
        assert assert_equivalent(original, loaded, [_batched(shape, 3)], atol=0.0) == 0.0
    _check_plain(original, out, shape)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2"])
def test_torchvision_round_trip(request: pytest.FixtureRequest, tmp_path: Path,
                                model_name: str, suffix: str) -> None:
    model = request.getfixturevalue(model_name)
    out = tmp_path / f"{model_name}{suffix}"
    result = morphcli.save(model, out, input_shapes=[TV_SHAPE])
    assert result["check"]["equivalent"] is True
    assert result["check"]["max_abs"] <= ATOL.get(suffix, 0.0)

    report = morphcli.check(model, out, input_shapes=[TV_SHAPE])
    assert report.equivalent, report.summary()
    assert report.max_abs <= ATOL.get(suffix, 0.0)
    assert report.outputs[0].shape_a in ([4, 1000], [3, 1000], [1, 1000])  # worst of 4, 3, 1
    if suffix != ".onnx":
        loaded = morphcli.load(out)
        assert assert_equivalent(model, loaded, [_batched(TV_SHAPE, 2)], atol=0.0) == 0.0
    _check_plain(model, out, TV_SHAPE)


@pytest.mark.parametrize("container", ["pt", "pt-wrapped", "safetensors"])
def test_state_dict_with_arch(tmp_path: Path, container: str) -> None:
    model = torchvision_model("resnet18", num_classes=7)
    state = model.state_dict()
    if container == "safetensors":  # a plain safetensors file, without our metadata
        from safetensors.torch import save_file

        weights = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    else:
        weights = tmp_path / "weights.pt"
        torch.save({"state_dict": state, "epoch": 3} if container == "pt-wrapped" else state,
                   weights)
    out = tmp_path / "model.pt"
    arch = ("--arch", "torchvision.models:resnet18", "--arch-kwargs", '{"num_classes": 7}',
            "--input-shape", "1,3,64,64")

    code, stdout, stderr = invoke("inspect", weights, *arch, "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["outputs"] == [[1, 7]]
    assert summary["inputs"][0]["shape"] == [1, 3, 64, 64]
    assert summary["totals"]["params"] == sum(p.numel() for p in model.parameters())

    code, _, stderr = invoke("export", weights, *arch, "-o", out)
    assert code == 0, stderr
    loaded = morphcli.load(out)  # no --arch needed any more: the archive describes itself
    assert loaded.meta["morphcli.inputs"][0].shape == (1, 3, 64, 64)
    assert assert_equivalent(model, loaded, [(2, 3, 64, 64)], atol=0.0) == 0.0
    assert outputs_of(loaded, [torch.randn(2, 3, 64, 64)])[0].shape == (2, 7)


def test_pickled_sequential_loads_without_trust(tmp_path: Path) -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    pickled = tmp_path / "seq.pt"
    torch.save(seq, pickled)  # a whole pickled model: only torch.nn classes inside
    out = tmp_path / "seq.safetensors"
    code, _, stderr = invoke("export", pickled, "--input-shape", "1,3,8,8", "-o", out)
    assert code == 0, stderr
    assert "--trust" not in stderr
    loaded = morphcli.load(out)
    assert assert_equivalent(seq, loaded, [(3, 3, 8, 8)], atol=0.0) == 0.0

    code, stdout, stderr = invoke("check", pickled, out, "--input-shape", "1,3,8,8", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["max_abs"] == 0.0


def test_equivalence_helper_detects_a_difference(samples_module) -> None:
    """The helper every test relies on must be able to fail."""
    a, b = samples_module.build("mlp.pt"), samples_module.build("mlp.pt")
    assert assert_equivalent(a, b, [(4, 20)], atol=0.0) == 0.0
    with torch.no_grad():
        b.fc3.bias[0] += 1e-3
    with pytest.raises(AssertionError, match="max abs diff"):
        assert_equivalent(a, b, [(4, 20)], atol=1e-4)
    with pytest.raises(AssertionError, match="shape"):
        assert_equivalent(a, nn.Sequential(nn.Linear(20, 6)), [(4, 20)], atol=1.0)


def test_module_names_with_hyphens_round_trip(tmp_path: Path) -> None:
    """torch allows any name without a dot (torchvision's RegNet uses 'block1-0')."""
    model = nn.Sequential(OrderedDict([("block1-0", nn.Linear(4, 3)), ("act", nn.ReLU())])).eval()
    for suffix in (".pt", ".safetensors", ".pt2"):
        path = tmp_path / f"hyphen{suffix}"
        morphcli.save(model, path, input_shapes=[(2, 4)])
        assert_equivalent(model, morphcli.load(path), [(2, 4)], atol=0)
