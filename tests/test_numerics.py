"""Numerical honesty of the check: float64 comparison, the worst case over every output and
sample, tolerances relative to the output's scale, two input distributions, and NaN or Inf
(in weights or outputs) never passing as equivalent."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke, listing, sha256
from torch import nn

import morphcli
from morphcli.equivalence.compare import compare
from morphcli.errors import NonFiniteWeightsWarning
from morphcli.graph.inputs import InputSpec


def _constant(*outputs: torch.Tensor) -> Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]:
    """A runner that returns ``outputs`` whatever the inputs."""
    return lambda inputs: list(outputs)


def _compare(run_a, run_b, **kw):  # noqa: ANN001, ANN202
    options = {"samples": 4, "batch_size": 4, "seed": 0, "atol": 0.0, "rtol": 1e-5, **kw}
    return compare(run_a, run_b, [InputSpec((1, 2))], **options)


def test_outputs_are_compared_in_float64() -> None:
    """A float64 model's outputs differing by 1e-12 (invisible in float32) are measured."""
    a = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    report = _compare(_constant(a), _constant(a + 1e-12), rtol=1e-14)
    assert not report.equivalent
    assert report.max_abs == pytest.approx(1e-12, rel=1e-3)
    assert float((a.float() - (a + 1e-12).float()).abs().max()) == 0.0  # float32 sees nothing
    assert _compare(_constant(a), _constant(a + 1e-12)).equivalent  # within the default rtol


@pytest.mark.parametrize("a,b", [
    (math.inf, math.inf), (math.nan, math.nan), (math.nan, 1.0), (1.0, -math.inf)])
def test_nan_or_inf_in_either_output_is_never_equivalent(a: float, b: float) -> None:
    report = _compare(_constant(torch.tensor([a, 0.0])), _constant(torch.tensor([b, 0.0])),
                      atol=1e30, rtol=1e30)
    assert not report.equivalent
    assert math.isnan(report.max_abs)
    assert report.reason == "output 0 contains NaN or Inf"


# ---------------------------------------------------------------- through the command line


class _TwoOutputs(nn.Module):
    """Output 0 exact; output 1 clamped to +-5 when ``clamp``: the same function only on
    inputs whose scaled sum stays within +-5 (unit-normal inputs, not larger ones)."""

    def __init__(self, clamp: bool) -> None:
        super().__init__()
        self.clamp = clamp
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = x.sum(1, keepdim=True) / math.sqrt(8.0)  # unit variance for unit-normal x
        return self.fc(x), torch.clamp(s, -5.0, 5.0) if self.clamp else s


def test_worst_case_over_outputs_and_a_second_input_distribution(tmp_path: Path) -> None:
    """An approximation that is exact on unit-normal inputs is caught by the larger-scale
    batch, and the report names the output and the figure of the worst batch."""
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    morphcli.save(_TwoOutputs(False), a, input_shapes=[(1, 8)])
    morphcli.save(_TwoOutputs(True), b, input_shapes=[(1, 8)])

    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    first, second = report["outputs"]
    assert first["max_abs"] == 0.0
    assert second["max_abs"] > 1.0 and second["scale"] > 5.0  # from the x10 batch
    assert report["max_abs"] == second["max_abs"]
    assert report["reason"] == "difference exceeds the tolerance"

    # One unit-normal batch only: the narrow input range hides the difference.
    code, stdout, _ = invoke("check", a, b, "--json", "--samples", "4", "--batch-size", "4")
    assert code == 0 and json.loads(stdout)["max_abs"] == 0.0


class _Scaled(nn.Module):
    def __init__(self, scale: float, bias_shift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(20, 5)
        with torch.no_grad():
            self.fc.weight *= scale
            self.fc.bias *= scale
            self.fc.bias += bias_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _pair(tmp_path: Path, scale: float, shift: float) -> tuple[Path, Path]:
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    morphcli.save(_Scaled(scale), a, input_shapes=[(1, 20)])
    morphcli.save(_Scaled(scale, shift), b, input_shapes=[(1, 20)])
    return a, b


def test_large_activations_are_not_failed_by_round_off(tmp_path: Path) -> None:
    """Outputs around 1e6: a bias shifted by 0.05 is below float32 resolution there (the
    difference measured is round-off, rel ~1e-8), which an absolute tolerance would fail."""
    a, b = _pair(tmp_path, 1e6, 0.05)
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert 0.01 < report["max_abs"] < 1.0 and report["max_rel"] < 1e-6  # a few float32 ulps


def test_tiny_outputs_are_not_passed_by_an_absolute_tolerance(tmp_path: Path) -> None:
    """Outputs around 1e-9 that differ by 10%: far below any absolute tolerance like 1e-6,
    but not the same function, and the default (relative) check says so."""
    a, b = _pair(tmp_path, 1e-9, 1e-10)
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    assert report["max_abs"] < 1e-9 and report["max_rel"] > 1e-3
    assert report["atol"] == 0.0  # purely relative by default
    code, _, _ = invoke("check", a, b, "--atol", "1e-6")  # an absolute bound, if asked for
    assert code == 0


# ---------------------------------------------------------------- NaN or Inf in weights


@pytest.fixture
def broken(samples: Path) -> dict[str, Path]:
    """mlp.pt with a NaN bias, and with an infinite weight."""
    out = {}
    for kind, value in (("nan", math.nan), ("inf", math.inf)):
        gm = morphcli.load(samples / "mlp.pt")
        with torch.no_grad():
            if kind == "nan":
                gm.fc1.bias[0] = value
            else:
                gm.fc2.weight[3, 7] = value
        out[kind] = samples / f"{kind}.pt"
        morphcli.save(gm, out[kind], verify=False)  # verification would refuse it
    return out


WARNING = "the weights hold NaN or Inf"


def test_non_finite_weights_warn_on_load(broken: dict[str, Path], samples: Path) -> None:
    with pytest.warns(NonFiniteWeightsWarning, match=r"nan.pt: .*\(fc1.bias: 1\)"):
        morphcli.load(broken["nan"])
    with pytest.warns(NonFiniteWeightsWarning, match=r"\(fc2.weight: 1\)"):
        morphcli.load(broken["inf"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        morphcli.load(samples / "mlp.pt")  # a sound model: no warning

    code, stdout, stderr = invoke("inspect", broken["nan"], "--json")
    assert code == 0 and json.loads(stdout)["layers"]
    assert_one_error_line(stderr, f"warning: {broken['nan']}: {WARNING} (fc1.bias: 1)")


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_weights_are_never_equivalent(broken: dict[str, Path], samples: Path,
                                                 kind: str) -> None:
    """Not to the sound model, and not even to the same file."""
    for other in (samples / "mlp.pt", broken[kind]):
        code, stdout, stderr = invoke("check", broken[kind], other)
        assert (code, stdout) == (1, "")
        lines = stderr.splitlines()
        assert lines[0] == f"warning: {broken[kind]}: {WARNING} " + (
            "(fc1.bias: 1); the model's outputs will not be finite and no check can pass"
            if kind == "nan" else "(fc2.weight: 1); the model's outputs will not be finite "
            "and no check can pass")
        assert lines[1].startswith("NOT equivalent: max abs diff nan")
        assert "contains NaN or Inf" in lines[1] and len(lines) == 2


def test_morph_of_non_finite_model_writes_nothing(broken: dict[str, Path],
                                                  samples: Path) -> None:
    before = listing(samples)
    source = sha256(broken["nan"])
    code, stdout, stderr = invoke("deepen", broken["nan"], "--after", "fc1", "-q")
    assert (code, stdout) == (1, "")
    warning, error = stderr.splitlines()
    assert warning.startswith("warning: ") and WARNING in warning
    assert error == ("error: the check cannot pass: output 0 contains NaN or Inf (does the "
                     "input model hold NaN or Inf weights?); nothing was written")
    assert listing(samples) == before and sha256(broken["nan"]) == source
