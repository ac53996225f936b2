"""What makes a morph cheap, checked structurally (timings are bench/bench.py's job).

Shapes without a forward pass and after an edit only where it changed; the check at a reduced
input size only where that still exercises every weight (and still catches a wrong one); the
written file read back rather than run; unchanged parameters shared, changed ones copied once;
safetensors streamed; progress bars only on a terminal.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from conftest import _sample_build, sample_shape
from helpers import invoke
from torch import nn

import morphcli
from morphcli.equivalence.sizing import reduced
from morphcli.graph import shapes
from morphcli.graph.inputs import INPUTS_META, InputSpec, example_inputs
from morphcli.morphs.runner import CheckOptions, check_morph

NO_CHECK = CheckOptions(enabled=False)


def graph_module(model: nn.Module, *shapes_: tuple[int, ...]) -> torch.fx.GraphModule:
    from morphcli.io.api import to_graph_module
    from morphcli.io.checkpoint import Checkpoint

    return to_graph_module(Checkpoint("test", module=model.eval()), input_shapes=list(shapes_))


def sample_model(name: str) -> torch.fx.GraphModule:
    return graph_module(_sample_build().build(f"{name}.pt"), sample_shape(f"{name}.pt"))


def recorded(gm: torch.fx.GraphModule) -> dict[str, object]:
    return {n.name: shapes._shapes(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


def shape_prop(gm: torch.fx.GraphModule) -> dict[str, object]:
    """What torch's ShapeProp records, running the model."""
    from morphcli.graph.trace import _ShapeProp

    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    with torch.no_grad():
        _ShapeProp(gm).propagate(*example_inputs(gm.meta[INPUTS_META], batch_size=None, seed=0))
    return recorded(gm)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", ["cnn", "mlp", "resnet"])
def test_shapes_without_a_forward_pass_match_shapeprop(name: str) -> None:
    gm = sample_model(name)
    fast = recorded(gm)
    assert fast == shape_prop(gm)
    assert all(v is not None for k, v in fast.items() if k != "output") or name == "resnet"


@pytest.mark.parametrize("model_name", ["resnet18", "mobilenet_v2"])
def test_shapes_of_torchvision_models_match_shapeprop(request: pytest.FixtureRequest,
                                                      model_name: str) -> None:
    gm = graph_module(request.getfixturevalue(model_name), (1, 3, 64, 64))
    assert recorded(gm) == shape_prop(gm)


def test_a_rejected_input_shape_is_still_reported() -> None:
    with pytest.raises(morphcli.MorphError, match=r"rejects input shape 1,4,32,32 at conv1"):
        graph_module(_sample_build().build("cnn.pt"), (1, 4, 32, 32))


@pytest.mark.parametrize(("name", "morph", "kwargs"), [
    ("cnn", "widen", {"layer": "conv2", "factor": 2}),
    ("cnn", "deepen", {"after": "conv3", "norm": True, "activation": "relu", "residual": True}),
    ("cnn", "widen", {"layer": "fc1", "by": 3}),
    ("resnet", "widen", {"layer": "stem", "by": 4}),
    ("mlp", "deepen", {"after": "fc2", "init": "decompose"}),
    ("cnn", "swap", {"layer": "relu", "to": "gelu"}),
])
def test_shapes_after_a_morph_are_refreshed_where_it_changed(
        name: str, morph: str, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = sample_model(name)
    computed: list[str] = []
    real = shapes._Pass._result

    def counting(self, node, spec):  # type: ignore[no-untyped-def]
        computed.append(node.name)
        return real(self, node, spec)

    monkeypatch.setattr(shapes._Pass, "_result", counting)
    new, _ = getattr(morphcli, morph)(gm, check=NO_CHECK, **kwargs)
    monkeypatch.undo()
    assert 0 < len(computed) < len(new.graph.nodes)  # not every node again
    after = recorded(new)
    assert after == shape_prop(new)


# ---------------------------------------------------------------- check size


def test_check_size_is_reduced_where_every_weight_still_meets_data(
        resnet18: nn.Module) -> None:
    gm = graph_module(resnet18, (1, 3, 128, 128))
    # 32x32 would leave layer4's 3x3 convolutions a 1x1 map (only the centre tap used)
    assert [s.shape for s in reduced([gm], gm.meta[INPUTS_META]) or ()] == [(1, 3, 64, 64)]


def test_reduced_check_still_catches_a_wrong_outer_tap(resnet18: nn.Module) -> None:
    gm = graph_module(resnet18, (1, 3, 128, 128))
    new, result = morphcli.deepen(gm, after="layer4.1.conv1", check=NO_CHECK)
    report, note = check_morph(gm, new)
    assert report.equivalent and note is not None and "1,3,64,64" in note
    with torch.no_grad():  # a corner tap of the new conv: used at 64x64 on the 2x2 maps only
        new.get_submodule("layer4.1.conv1_deep").weight[0, 0, 0, 0] = 0.5
    report, _ = check_morph(gm, new)
    assert not report.equivalent


class _FixedCrop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)[:, :, 4:12, 4:12]  # absolute positions: not size-agnostic
        return self.fc(x.mean((2, 3)))


class _FunctionalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(x, self.w, padding=1).mean((2, 3))


@pytest.mark.parametrize("model", [
    pytest.param(lambda: _sample_build().build("cnn.pt"), id="flatten-into-linear"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(24),
                                       nn.Flatten(), nn.Linear(4 * 24 * 24, 2)),
                 id="upsampling-pool"),  # at 16x16 every output would repeat inputs
    pytest.param(_FunctionalConv, id="functional-conv"),
    pytest.param(lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1)),
                 id="unpadded-conv"),  # sizes do not scale: 30 at 32, 14 at 16
])
def test_check_stays_at_full_size_where_a_smaller_input_would_not_do(model) -> None:  # type: ignore[no-untyped-def]
    gm = graph_module(model(), (1, 3, 32, 32))
    assert reduced([gm], gm.meta[INPUTS_META]) is None


def test_a_fixed_crop_is_shrunk_only_while_every_size_keeps_or_scales() -> None:
    gm = graph_module(_FixedCrop(), (1, 3, 32, 32))
    # 16x16: the crop keeps its 8x8; 8x8 would crop 4x4, neither 8 nor 8 / 4
    assert [s.shape for s in reduced([gm], gm.meta[INPUTS_META]) or ()] == [(1, 3, 16, 16)]


def test_non_image_inputs_are_never_shrunk() -> None:
    gm = sample_model("mlp")
    assert reduced([gm], gm.meta[INPUTS_META]) is None
    emb = graph_module(nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(4 * 16, 2)),
                       (1, 16))
    assert emb.meta[INPUTS_META] == (InputSpec((1, 16), "int64", 10),)
    assert reduced([emb], emb.meta[INPUTS_META]) is None
    seq = graph_module(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), (1, 4, 8))  # tokens x features
    assert reduced([seq], seq.meta[INPUTS_META]) is None


def test_full_size_option_keeps_the_stored_size(resnet18: nn.Module, samples: Path) -> None:
    gm = graph_module(resnet18, (1, 3, 128, 128))
    _, result = morphcli.widen(gm, "layer1.0.conv1", by=4,
                               check=CheckOptions(full_size=True))
    assert result.check is not None and result.check.equivalent
    assert not any("checked at input" in n for n in result.notes)
    code, stdout, stderr = invoke("widen", samples / "resnet.pt", "stem", "--by", "2",
                                  "--full-size", "--dry-run", "--json")
    assert code == 0, stderr
    assert not any("checked at input" in n for n in json.loads(stdout)["plan"]["notes"])


# ---------------------------------------------------------------- sharing and copying


def _tensors(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


@pytest.mark.parametrize(("morph", "kwargs"), [("widen", {"layer": "conv2", "by": 8}),
                                               ("deepen", {"after": "conv3"})])
def test_unchanged_tensors_are_shared_and_changed_ones_copied(morph: str, kwargs: dict) -> None:
    gm = sample_model("cnn")
    new, result = getattr(morphcli, morph)(gm, check=NO_CHECK, **kwargs)
    changed = {c.name for c in result.changes}
    old = _tensors(gm)
    for name, t in _tensors(new).items():
        if name in changed:
            if name in old:  # a new tensor, sharing no memory with the original's
                assert t.untyped_storage().data_ptr() != old[name].untyped_storage().data_ptr()
        else:
            assert t is old[name], name
    assert all(torch.equal(t, _tensors(sample_model("cnn"))[k]) for k, t in old.items())


# ---------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_own_formats_are_verified_by_reading_back(tmp_path: Path, suffix: str) -> None:
    gm = sample_model("resnet")
    result = morphcli.save(gm, tmp_path / f"m{suffix}")
    assert result["check"]["method"] == "read back" and result["check"]["max_abs"] == 0.0
    assert morphcli.check(gm, tmp_path / f"m{suffix}").max_abs == 0.0


def test_stdout_archive_is_verified_by_reading_back() -> None:
    from morphcli.writing import write_verified

    sink = io.BytesIO()
    result = write_verified(sample_model("mlp"), "-", stdout=sink)
    assert result["check"]["method"] == "read back" and sink.getvalue().startswith(b"PK")


def test_layer_state_the_description_misses_is_run_instead(tmp_path: Path) -> None:
    """An attribute no description holds: the file cannot be shown identical, so it is run."""
    gm = sample_model("mlp")
    gm.get_submodule("fc1").note = "set after construction"
    result = morphcli.save(gm, tmp_path / "m.pt")
    assert result["check"]["method"] == "run" and result["check"]["equivalent"]


def test_readback_tells_files_apart(tmp_path: Path) -> None:
    from morphcli.io.readback import matches

    a, b = sample_model("cnn"), sample_model("cnn")
    with torch.no_grad():
        b.fc2.bias[0] += 1e-7  # one bit of one tensor
    morphcli.save(a, tmp_path / "a.pt")
    morphcli.save(a, tmp_path / "a.safetensors")
    assert matches(a, tmp_path / "a.pt", ".pt")
    assert matches(a, (tmp_path / "a.pt").read_bytes(), ".pt")
    assert matches(a, tmp_path / "a.safetensors", ".safetensors")
    assert not matches(b, tmp_path / "a.pt", ".pt")
    assert not matches(b, tmp_path / "a.safetensors", ".safetensors")
    assert not matches(a, tmp_path / "a.safetensors", ".pt")  # unreadable as the other format


def test_streamed_safetensors_are_the_library_bytes() -> None:
    from safetensors.torch import load, save

    from morphcli.io.safetensors_file import _stream

    tensors = {"w": torch.randn(3, 4), "idx": torch.arange(5), "h": torch.randn(5).half(),
               "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 3),
               "t": torch.randn(4, 3).t(), "d": torch.randn(2, dtype=torch.float64)}
    sink = io.BytesIO()
    _stream(tensors, {"k": "v"}, sink)
    assert sink.getvalue() == save({k: v.contiguous() for k, v in tensors.items()},
                                   metadata={"k": "v"})
    assert all(torch.equal(load(sink.getvalue())[k], t) for k, t in tensors.items())


def test_streamed_safetensors_keep_shared_tensors(tmp_path: Path) -> None:
    """The library refuses tensors that share memory; the streamed writer writes each."""
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = lin.weight  # tied weights
    gm = graph_module(model, (1, 4))
    morphcli.save(gm, tmp_path / "tied.safetensors")
    assert morphcli.check(gm, tmp_path / "tied.safetensors").max_abs == 0.0


def test_non_finite_scan_counts_only_when_the_sum_is_not_finite() -> None:
    import warnings

    from morphcli.io.checkpoint import warn_if_not_finite

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_not_finite("x", [("big", torch.full((4,), 3e38))])  # the sum overflows
        assert not caught
        warn_if_not_finite("x", [("nan", torch.tensor([1.0, float("nan")]))])
    assert len(caught) == 1 and "nan: 1" in str(caught[0].message)


# ---------------------------------------------------------------- progress


def test_progress_only_on_a_terminal_and_not_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from morphcli.cli import progress

    screen = io.StringIO()
    monkeypatch.setattr(progress, "err", Console(file=screen, force_terminal=True, width=80))
    with progress.step("checking", quiet=True, total=8) as update:
        update(8, 8)
    assert screen.getvalue() == ""
    with progress.step("checking", quiet=False, total=8) as update:
        update(4, 8)
    assert "checking" in screen.getvalue()

    monkeypatch.setattr(progress, "err", Console(file=io.StringIO(), force_terminal=False))
    assert not progress.shown(quiet=False)


def test_no_progress_in_captured_output(samples: Path) -> None:
    code, stdout, stderr = invoke("deepen", samples / "cnn.pt", "--after", "conv3", "-o",
                                  samples / "d.pt")
    assert code == 0
    assert "loading" not in stderr and "writing and verifying" not in stderr
