"""The check compares the whole output structure (containers, keys, plain values, dtypes),
runs a batch of one, and spans input scales from 1e-3 to 1e3 (issue 11, point 5)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import invoke
from torch import nn

import morphcli
from morphcli.io.checkpoint import flatten_outputs

SHAPE = (1, 8)


class _Out(nn.Module):
    """A Linear layer whose output ``y`` is wrapped by ``wrap(x, y)``."""

    def __init__(self, wrap: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(8, 3)
        self.wrap = wrap

    def forward(self, x: torch.Tensor) -> Any:
        return self.wrap(x, self.fc(x))


def _save(tmp_path: Path, name: str, wrap: Callable[..., Any]) -> Path:
    path = tmp_path / f"{name}.pt"
    morphcli.save(_Out(wrap), path, input_shapes=[SHAPE])
    return path


# (first model, second model, the reason the check must give)
DIFFERENT = {
    "int leaf": (lambda x, y: (y, 2), lambda x, y: (y, 3),
                 "output[1] is 2 (int) in one model, 3 (int) in the other"),
    "int or float": (lambda x, y: (y, 2), lambda x, y: (y, 2.0),
                     "output[1] is 2 (int) in one model, 2.0 (float) in the other"),
    "none or string": (lambda x, y: [y, None], lambda x, y: [y, "none"],
                       "output[1] is None (NoneType) in one model, 'none' (str) in the other"),
    "renamed key": (lambda x, y: {"logits": y}, lambda x, y: {"scores": y},
                    "output has keys 'logits' only in the first model and 'scores' only in "
                    "the second model"),
    "tuple or dict": (lambda x, y: (y,), lambda x, y: {"logits": y},
                      "output is a tuple of 1 in one model, a dict of 1 in the other"),
    "tuple or list": (lambda x, y: (y, y), lambda x, y: [y, y],
                      "output is a tuple of 2 in one model, a list of 2 in the other"),
    "length": (lambda x, y: (y, y), lambda x, y: (y, y, y),
               "output is a tuple of 2 in one model, of 3 in the other"),
    "nested dtype": (lambda x, y: (y, {"logits": y}), lambda x, y: (y, {"logits": y.double()}),
                     "output[1]['logits'] has dtype float32 in one model, float64 in the other"),
    "nested shape": (lambda x, y: (y, {"logits": y}), lambda x, y: (y, {"logits": y[:, :2]}),
                     "output[1]['logits'] has shape (4, 3) in one model, (4, 2) in the other"),
    "tensor or int": (lambda x, y: (y, y), lambda x, y: (y, 1),
                      "output[1] is a tensor of shape (4, 3) in one model, 1 (int) in the "
                      "other"),
}


@pytest.mark.parametrize("case", list(DIFFERENT))
def test_structure_differences_are_not_equivalent(tmp_path: Path, case: str) -> None:
    wrap_a, wrap_b, reason = DIFFERENT[case]
    a, b = _save(tmp_path, "a", wrap_a), _save(tmp_path, "b", wrap_b)
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    assert report["equivalent"] is False and report["reason"] == reason
    assert report["max_abs"] == "inf"  # no figure measures different structures

    code, stdout, stderr = invoke("check", a, b)
    assert (code, stdout) == (1, "")
    assert stderr.startswith("NOT equivalent: max abs diff inf") and reason in stderr

    api = morphcli.check(_Out(wrap_a), _Out(wrap_b), input_shapes=[SHAPE])
    assert (api.equivalent, api.reason) == (False, reason)


EQUAL = {
    "dict": lambda x, y: {"logits": y, "scaled": 2 * y},
    "nested": lambda x, y: (y, (y + 1, [y * 3, {"deep": y - 1}])),
    "plain values": lambda x, y: (y, 2, 1.5, True, None, "label", {"n": 7}),
}


@pytest.mark.parametrize("case", list(EQUAL))
def test_equal_structures_pass(tmp_path: Path, case: str) -> None:
    a, b = _save(tmp_path, "a", EQUAL[case]), _save(tmp_path, "b", EQUAL[case])
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["equivalent"] is True and report["max_abs"] == 0.0
    assert report["structure_compared"] is True and report["notes"] == []
    tensors = sum(1 for _ in flatten_outputs(_Out(EQUAL[case])(
        torch.zeros(SHAPE))))
    assert [d["index"] for d in report["outputs"]] == list(range(tensors))
    assert morphcli.check(_Out(EQUAL[case]), b, input_shapes=[SHAPE]).equivalent


def test_dict_key_order_does_not_matter(tmp_path: Path) -> None:
    a = _save(tmp_path, "a", lambda x, y: {"a": y, "b": y + 1})
    b = _save(tmp_path, "b", lambda x, y: {"b": y + 1, "a": y})
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 0, stderr
    assert [d["path"] for d in json.loads(stdout)["outputs"]] == ["output['a']", "output['b']"]


def test_nested_value_difference_names_the_path(tmp_path: Path) -> None:
    a = _save(tmp_path, "a", lambda x, y: (y, {"logits": y}))
    b = _save(tmp_path, "b", lambda x, y: (y, {"logits": y * 1.01}))
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    first, second = report["outputs"]
    assert (first["path"], first["max_abs"]) == ("output[0]", 0.0)
    assert second["path"] == "output[1]['logits']"
    assert second["max_rel"] == pytest.approx(0.01, rel=1e-4)  # relative to the first model
    assert report["reason"] == "difference exceeds the tolerance"


def test_batch_sizes_and_scales_in_the_report(tmp_path: Path) -> None:
    a = _save(tmp_path, "a", lambda x, y: y)
    code, stdout, _ = invoke("check", a, a, "--json")
    assert code == 0
    report = json.loads(stdout)
    assert (report["samples"], report["batch_size"]) == (8, 4)
    assert report["batch_sizes"] == [4, 3, 1]
    assert report["input_scales"] == [1.0, 1e-3, 1e3]
    code, stdout, _ = invoke("check", a, a, "--json", "--samples", "10", "--batch-size", "3")
    report = json.loads(stdout)
    assert (report["samples"], report["batch_sizes"]) == (10, [3, 3, 3, 1])
    assert report["input_scales"] == [1.0, 1e-3, 1e3, 10.0]


def test_model_differing_only_at_batch_size_one_fails(tmp_path: Path) -> None:
    a = _save(tmp_path, "a", lambda x, y: y)
    b = _save(tmp_path, "b", lambda x, y: y + (x.size(0) == 1))  # +1 at batch size 1 only
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    assert report["outputs"][0]["shape_a"] == [1, 3]  # the worst batch: the batch of one
    assert report["outputs"][0]["max_abs"] == pytest.approx(1.0, abs=1e-6)
    # A batch of two agrees exactly: the difference is at batch size 1 only.
    x = torch.randn(2, *SHAPE[1:])
    assert torch.equal(morphcli.load(a)(x), morphcli.load(b)(x))


def test_squeezing_the_batch_of_one_fails(tmp_path: Path) -> None:
    a = _save(tmp_path, "a", lambda x, y: y)
    b = _save(tmp_path, "b", lambda x, y: y.squeeze(0))
    code, _, stderr = invoke("check", a, b)
    assert code == 1
    assert "output 0 has shape (1, 3) in one model, (3,) in the other" in stderr


def test_model_differing_only_for_large_inputs_fails(tmp_path: Path) -> None:
    """The same Linear layer, behind a clamp at +-60 in the second model: equal on inputs
    at scale 1 and 10 (|x| > 60 is a 6-sigma event there), not at scale 1e3."""
    a = _save(tmp_path, "a", lambda x, y: y)
    clamped = _Out(lambda x, y: y)
    clamped.wrap = lambda x, y: clamped.fc(torch.clamp(x, -60.0, 60.0))
    b = tmp_path / "b.pt"
    morphcli.save(clamped, b, input_shapes=[SHAPE])
    code, stdout, stderr = invoke("check", a, b, "--json")
    assert code == 1, stderr
    report = json.loads(stdout)
    worst = report["outputs"][0]
    assert worst["input_scale"] == 1e3 and worst["max_rel"] > 0.5
    x = torch.randn(4, 8) * 10
    assert float(x.abs().max()) < 60 and torch.equal(morphcli.load(a)(x), morphcli.load(b)(x))


def test_onnx_we_write_is_compared_with_its_structure(tmp_path: Path) -> None:
    """ONNX outputs are flat; the description stored in the file puts the structure back,
    whichever order the dict had (a reloaded .pt lists its keys sorted, the module not)."""
    wrap = lambda x, y: {"z": y, "a": (2 * y, y.sum(1))}  # noqa: E731
    pt, from_module = _save(tmp_path, "model", wrap), tmp_path / "module.onnx"
    from_file = tmp_path / "file.onnx"
    code, stdout, stderr = invoke("export", pt, "-o", from_file, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["check"]["structure_compared"] is True
    morphcli.save(_Out(wrap), from_module)

    for a, b in ((pt, from_file), (from_module, pt), (from_file, from_module)):
        code, stdout, stderr = invoke("check", a, b, "--json")
        assert code == 0, stderr
        report = json.loads(stdout)
        assert report["max_rel"] < 1e-5
        assert (report["structure_compared"], report["notes"]) == (True, [])
        assert sorted(d["path"] for d in report["outputs"]) == [
            "output['a'][0]", "output['a'][1]", "output['z']"]
    assert morphcli.check(_Out(wrap), from_file).equivalent

    renamed = _save(tmp_path, "renamed", lambda x, y: {"z": y, "b": (2 * y, y.sum(1))})
    code, stdout, _ = invoke("check", from_file, renamed, "--json")
    assert code == 1
    assert json.loads(stdout)["reason"] == (
        "output has keys 'a' only in the first model and 'b' only in the second model")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript ONNX exporter
def test_foreign_onnx_is_compared_flat(tmp_path: Path) -> None:
    """An ONNX file without our description: its tensors are compared in order, and the
    report says the structure was not. (Keys in sorted order: a reloaded .pt lists them so.)"""
    wrap = lambda x, y: (y, {"a": y.sum(1), "b": 2 * y})  # noqa: E731
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(_Out(wrap), (torch.randn(2, 8),), str(foreign), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    code, stdout, stderr = invoke("check", _save(tmp_path, "a", wrap), foreign, "--json",
                                  "--input-shape", "1,8")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["max_rel"] < 1e-5 and report["structure_compared"] is False
    assert [d["path"] for d in report["outputs"]] == [  # the .pt side's paths
        "output[0]", "output[1]['a']", "output[1]['b']"]
    assert report["notes"] == [
        "the second model runs in ONNX Runtime, which returns a flat list of tensors: its "
        "output structure (containers, keys, plain values) was not compared, only its tensors "
        "in order"]
    report = morphcli.check(foreign, _Out(wrap), input_shapes=[SHAPE])
    assert report.equivalent and not report.structure_compared
    assert report.notes[0].startswith("the first model runs in ONNX Runtime")
    assert report.summary().endswith("was not compared, only its tensors in order")

    fewer = _save(tmp_path, "fewer", lambda x, y: (y, {"a": y.sum(1)}))
    code, stdout, _ = invoke("check", foreign, fewer, "--json", "--input-shape", "1,8")
    assert code == 1
    assert json.loads(stdout)["reason"] == "the models return 3 and 2 output tensors"
    values = _save(tmp_path, "values", lambda x, y: (y, {"a": y.sum(1) + 1, "b": 2 * y}))
    code, stdout, _ = invoke("check", foreign, values, "--json", "--input-shape", "1,8")
    assert code == 1 and json.loads(stdout)["outputs"][1]["max_abs"] == pytest.approx(1.0)


def test_scales_both_models_overflow_at_run_at_unit_scale(tmp_path: Path) -> None:
    """exp() of outputs near 1e3 is Inf in float32: at that scale neither model is finite, so
    that batch runs at scale 1 (with a note); a model alone in overflowing still fails."""
    exp = _save(tmp_path, "exp", lambda x, y: torch.exp(y))
    code, stdout, stderr = invoke("check", exp, exp, "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["input_scales"] == [1.0, 1e-3, 1.0] and report["max_abs"] == 0.0
    assert report["notes"] == ["at input scale 1000 neither model's outputs are finite (they "
                               "overflow), so batch 3 ran at scale 1"]

    plain = _save(tmp_path, "plain", lambda x, y: y)
    nan_when_large = _save(tmp_path, "nan", lambda x, y: y + 0 * torch.exp(y))  # 0 * Inf
    for a, b in ((plain, nan_when_large), (nan_when_large, plain)):
        code, stdout, _ = invoke("check", a, b, "--json")
        report = json.loads(stdout)
        assert code == 1 and report["reason"] == "output 0 contains NaN or Inf"
        assert report["input_scales"] == [1.0, 1e-3, 1e3]


def test_stored_output_structure_that_does_not_fit_stays_flat() -> None:
    from morphcli.io.checkpoint import described_structure, unflatten_outputs

    t = torch.zeros(1)
    good = {"nodes": [{"op": "output", "args": {"tuple": [
        {"dict": {"b": {"node": "fc"}, "a": {"tuple": [{"node": "x"}, [{"node": "y"}]]}}}]}}]}
    assert unflatten_outputs(described_structure(good), [t, t + 1, t + 2]) == {
        "b": t, "a": (t + 1, [t + 2])}
    assert unflatten_outputs(described_structure(good), [t, t]) is None  # too few
    assert unflatten_outputs(described_structure(good), [t] * 4) is None  # too many
    for damaged in ({}, {"nodes": []}, {"nodes": [{"op": "output", "args": {"tuple": [3]}}]},
                    {"nodes": [{"op": "output", "args": {"tuple": [{"eval": "x"}]}}]}):
        assert described_structure(damaged) is None
