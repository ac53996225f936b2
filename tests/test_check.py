"""``morph check`` and ``morphcli.check``: exit 0 only for the same function, and by how much."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import assert_equivalent, assert_one_error_line, invoke, run_cli
from torch import nn

import morphcli


@pytest.fixture
def perturbed(samples: Path) -> Path:
    """cnn.pt with 1e-2 added to one element of conv3.weight."""
    gm = morphcli.load(samples / "cnn.pt")
    with torch.no_grad():
        gm.conv3.weight[0, 0, 0, 0] += 1e-2
    out = samples / "perturbed.pt"
    morphcli.save(gm, out)
    return out


def test_identical_models(samples: Path) -> None:
    code, stdout, stderr = invoke("check", samples / "cnn.pt", samples / "cnn.pt", "--json")
    assert code == 0
    assert stderr == ""
    report = json.loads(stdout)
    assert report["equivalent"] is True
    assert report["max_abs"] == 0.0 and report["max_rel"] == 0.0
    assert (report["samples"], report["batch_size"], report["seed"]) == (8, 4, 0)
    assert report["outputs"][0]["shape_a"] == [4, 10] == report["outputs"][0]["shape_b"]
    assert report["reason"] is None


def test_identical_models_human_output(samples: Path) -> None:
    code, stdout, stderr = run_cli("check", samples / "mlp.pt", samples / "mlp.pt")
    assert code == 0
    assert stdout == ""  # the verdict is a message, on stderr; stdout stays clean for pipes
    assert stderr.startswith("equivalent: max abs diff 0, max rel diff 0 over 8 samples")


def test_perturbed_weight_is_not_equivalent(samples: Path, perturbed: Path) -> None:
    code, stdout, stderr = invoke("check", samples / "cnn.pt", perturbed, "--json")
    assert code == 1
    assert stderr == ""  # --json: the report alone, on stdout
    report = json.loads(stdout)
    assert report["equivalent"] is False
    assert 1e-4 < report["max_abs"] < 1.0
    assert report["reason"] == "difference exceeds the tolerance"

    code, stdout, stderr = invoke("check", samples / "cnn.pt", perturbed)
    assert (code, stdout) == (1, "")
    assert stderr.startswith("NOT equivalent: max abs diff")

    # The same figure through the Python API, and a tolerance above it passes.
    api = morphcli.check(samples / "cnn.pt", perturbed)
    assert not api.equivalent
    assert api.max_abs == pytest.approx(report["max_abs"], rel=1e-12)
    code, _, _ = invoke("check", samples / "cnn.pt", perturbed, "--atol", "1")
    assert code == 0
    with pytest.raises(AssertionError):
        assert_equivalent(morphcli.load(samples / "cnn.pt"), morphcli.load(perturbed),
                          [(4, 3, 32, 32)], atol=1e-4)


def test_different_output_shapes(samples: Path, samples_module) -> None:
    other = samples_module.build("mlp.pt")
    other.fc3 = nn.Linear(64, 6)
    path = samples / "mlp6.pt"
    morphcli.save(other, path, input_shapes=[(1, 20)])

    code, stdout, stderr = invoke("check", samples / "mlp.pt", path)
    assert (code, stdout) == (1, "")
    line = assert_one_error_line(stderr, "NOT equivalent")
    assert "output 0 has shape (4, 5) in one model, (4, 6) in the other" in line

    code, stdout, _ = invoke("check", samples / "mlp.pt", path, "--json")
    report = json.loads(stdout)
    assert code == 1
    assert (report["outputs"][0]["shape_a"], report["outputs"][0]["shape_b"]) == ([4, 5], [4, 6])
    assert report["max_abs"] == "inf"  # JSON has no Infinity: written as a string


def test_nan_weights_are_never_equivalent(samples: Path) -> None:
    gm = morphcli.load(samples / "mlp.pt")
    with torch.no_grad():
        gm.fc1.bias[0] = math.nan
    path = samples / "nan.pt"
    morphcli.save(gm, path, verify=False)  # verification would refuse it: NaN equals nothing

    for a, b in ((samples / "mlp.pt", path), (path, path)):
        code, stdout, stderr = invoke("check", a, b, "--json")
        assert code == 1, stdout
        assert_one_error_line(stderr, "warning: ", "the weights hold NaN or Inf")  # said once
        report = json.loads(stdout)
        assert report["equivalent"] is False
        assert report["max_abs"] == "nan"
        assert "NaN or Inf" in report["reason"]


def test_onnx_against_pt_and_options(samples: Path) -> None:
    onnx = samples / "mlp.onnx"
    code, _, stderr = invoke("export", samples / "mlp.pt", "-o", onnx)
    assert code == 0, stderr
    code, stdout, stderr = invoke("check", onnx, samples / "mlp.pt", "--json", "--samples", "5",
                                  "--batch-size", "2", "--seed", "7")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert (report["samples"], report["batch_size"], report["seed"]) == (5, 2, 7)
    # 5 samples in batches of 2, 2, 1: the worst batch is reported
    assert report["outputs"][0]["shape_a"] in ([2, 5], [1, 5])
    assert report["max_abs"] < 1e-5


def test_python_api_after_subpackage_import(samples: Path, samples_module) -> None:
    """``morphcli.check`` stays the function after the equivalence modules are imported."""
    import morphcli.equivalence.compare  # noqa: F401  (binds the subpackage on morphcli)

    model = samples_module.build("resnet.pt")
    for _ in range(2):
        report = morphcli.check(model, samples / "resnet.pt")
        assert report.equivalent and report.max_abs == 0.0
    assert morphcli.equivalence.api.check is not None  # the subpackage is still reachable


def test_model_without_input_shape(tmp_path: Path) -> None:
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    path = tmp_path / "seq.pt"
    torch.save(seq, path)
    code, _, stderr = invoke("check", path, path)
    assert code == 2
    assert_one_error_line(stderr, "--input-shape")
    code, stdout, _ = invoke("check", path, path, "--input-shape", "1,3,6,6", "--json")
    assert code == 0
    assert json.loads(stdout)["outputs"][0]["shape_a"] == [4, 64]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript ONNX exporter
def test_foreign_exports_can_be_checked(samples: Path, samples_module) -> None:
    """Programs exported by plain torch (no morphcli metadata) run in ``check`` but cannot be
    loaded as graphs."""
    model = samples_module.build("mlp.pt")
    example = (torch.randn(2, 20),)
    pt2 = samples / "foreign.pt2"
    program = torch.export.export(model, example, dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(pt2))
    onnx = samples / "foreign.onnx"
    torch.onnx.export(model, example, str(onnx), dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}})

    for path in (pt2, onnx):
        code, stdout, stderr = invoke("check", path, samples / "mlp.pt", "--json")
        assert code == 0, stderr
        assert json.loads(stdout)["max_abs"] <= 1e-6

    code, _, stderr = invoke("inspect", pt2)
    assert code == 2
    assert_one_error_line(stderr, "torch.export program", "cannot be recovered")


class _Reshaping(nn.Module):
    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.fc, self.rows, self.cols = nn.Linear(4, 4), rows, cols

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)).view(self.rows, self.cols)


def test_a_model_failing_in_its_graph_is_one_error_line(tmp_path: Path) -> None:
    """A failing GraphModule prints its generated code's traceback on stderr; the user sees
    only the one line naming the model and the reason."""
    good, bad = tmp_path / "good.pt", tmp_path / "bad.pt"
    morphcli.save(_Reshaping(-1, 4), good, input_shapes=[(3, 4)])
    morphcli.save(_Reshaping(3, -1), bad, input_shapes=[(3, 4)])  # fails at any other batch
    for args in ((good, bad), (bad, good)):
        code, stdout, stderr = run_cli("check", *args)
        assert (code, stdout) == (2, "")
        assert_one_error_line(stderr, "model fails on inputs", "is invalid for input of size")


def test_the_worst_batch_is_the_one_furthest_beyond_its_tolerance() -> None:
    """A bias moved by 4e-5 of its size is a change the relative tolerance catches on small
    inputs (outputs near the bias) and not on large ones (outputs near 1e3), where a 1e-6
    change of the weights makes the raw difference largest. Keeping the batch of the largest
    raw difference would call the two models equivalent."""
    torch.manual_seed(0)
    a = nn.Linear(4, 3)
    with torch.no_grad():
        a.bias.fill_(1.0)
    b = nn.Linear(4, 3)
    with torch.no_grad():
        b.weight.copy_(a.weight * (1 + 1e-6))
        b.bias.copy_(a.bias + 4e-5)
    report = morphcli.check(a, b, input_shapes=[(1, 4)])
    assert not report.equivalent, report.summary()
    worst = report.outputs[0]
    assert worst.input_scale == 1e-3
    assert 3e-5 < worst.max_rel < 5e-5
    assert 3e-5 < worst.max_abs < 5e-5


class _InfAt(nn.Module):
    """The identity, except that one output element is +inf: an overflow in one model only."""

    def __init__(self) -> None:
        super().__init__()
        # finite weights (no warning at load): exp overflows to inf, and exp(-1e4) is 0.0
        self.register_buffer("shift", torch.tensor([1e3, -1e4, -1e4, -1e4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.shift.exp()


@pytest.mark.parametrize("rtol", [1e-5, 1e300])
def test_an_infinite_output_in_one_model_is_never_equivalent(rtol: float) -> None:
    """Inf against a finite value is no difference of some size: the report says NaN or Inf
    and gives no figure, whatever the tolerance (not a 'difference exceeds the tolerance')."""
    report = morphcli.check(nn.Identity(), _InfAt(), input_shapes=[(1, 4)], rtol=rtol)
    assert not report.equivalent
    assert report.reason == "output 0 contains NaN or Inf", report.reason
    assert math.isnan(report.max_abs) and math.isnan(report.outputs[0].max_abs)
