"""Reading a file never runs code from it unless the user passes --trust."""

from __future__ import annotations

import builtins
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_equivalent, assert_one_error_line, invoke, listing, run_cli
from torch import nn

import morphcli
from morphcli.errors import InputError


class _Payload:
    """Unpickling this calls ``func(*args)``: the classic booby-trapped checkpoint."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args)


def _payload(kind: str, marker: Path) -> tuple[_Payload, tuple[str, ...]]:
    """The payload and the names the refusal may give for what it calls."""
    code = f"open({str(marker)!r}, 'w').close()"
    if kind == "os.system":
        return _Payload(os.system, f"touch {marker}"), ("posix.system", "os.system")
    if kind == "exec":
        return _Payload(builtins.exec, code), ("builtins.exec",)
    if kind == "eval":
        return _Payload(builtins.eval, code), ("builtins.eval",)
    if kind == "subprocess":
        return _Payload(subprocess.call, ["touch", str(marker)]), ("subprocess.call",)
    raise AssertionError(kind)


def _evil_checkpoint(folder: Path, kind: str, legacy: bool = False) -> tuple[Path, Path, tuple]:
    marker = folder / "MARKER"
    payload, names = _payload(kind, marker)
    path = folder / f"evil_{kind}.pt"
    state = {"state_dict": {"w": torch.ones(2)}, "hook": payload}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker, names


@pytest.mark.parametrize("command", ["inspect", "check", "export", "stdin"])
@pytest.mark.parametrize("kind", ["os.system", "exec", "eval", "subprocess"])
def test_booby_trapped_pickle_is_refused(samples: Path, kind: str, command: str) -> None:
    path, marker, names = _evil_checkpoint(samples, kind)
    out = samples / "out.pt"
    args: tuple[Any, ...] = {
        "inspect": ("inspect", path),
        "check": ("check", path, samples / "mlp.pt"),
        "export": ("export", path, "-o", out),
        "stdin": ("inspect", "-"),
    }[command]
    code, stdout, stderr = invoke(*args, input=path.read_bytes() if command == "stdin" else None)
    assert (code, stdout) == (2, "")
    line = assert_one_error_line(stderr, "--trust", "refused")
    assert any(name in line for name in names), line
    assert not marker.exists()
    assert not out.exists()


def test_booby_trapped_legacy_pickle_is_refused(tmp_path: Path) -> None:
    path, marker, names = _evil_checkpoint(tmp_path, "os.system", legacy=True)
    assert path.read_bytes()[:1] == b"\x80"  # the old, non-zip torch.save format
    code, _, stderr = invoke("inspect", path)
    assert code == 2
    line = assert_one_error_line(stderr, "--trust")
    assert any(name in line for name in names), line
    assert not marker.exists()


def test_booby_trapped_pickle_real_process(tmp_path: Path) -> None:
    path, marker, names = _evil_checkpoint(tmp_path, "os.system")
    before = listing(tmp_path)
    code, stdout, stderr = run_cli("inspect", path.name, cwd=tmp_path)
    assert (code, stdout) == (2, "")
    line = assert_one_error_line(stderr, "--trust", "posix.system")
    assert line.startswith(f"error: {path.name}: refused to load")
    assert not marker.exists()
    assert listing(tmp_path) == before


def test_pickled_graph_module_needs_trust(tmp_path: Path) -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    path = tmp_path / "gm.pt"
    torch.save(torch.fx.symbolic_trace(seq), path)

    code, _, stderr = invoke("inspect", path, "--input-shape", "1,4")
    assert code == 2
    assert_one_error_line(stderr, "torch.fx", "--trust")

    code, stdout, stderr = invoke("inspect", path, "--input-shape", "1,4", "--trust", "--json")
    assert code == 0, stderr
    doc = json.loads(stdout)
    assert [r["name"] for r in doc["layers"]] == ["0", "1", "2"]
    assert doc["outputs"] == [[1, 2]]

    # Exported once with --trust, the result is plain data that loads without it.
    out = tmp_path / "safe.pt"
    code, _, stderr = invoke("export", path, "--trust", "--input-shape", "1,4", "-o", out)
    assert code == 0, stderr
    assert assert_equivalent(seq, morphcli.load(out), [(3, 4)], atol=0.0) == 0.0


# ---------------------------------------------------------------- tampered descriptions


def _node(desc: dict, name: str) -> dict:
    return next(n for n in desc["nodes"] if n["name"] == name)


def _replace_node(desc: dict, name: str, **fields: Any) -> None:
    node = _node(desc, name)
    node.update(fields)


def _edit_layer_type(desc: dict, tensors: dict, marker: Path) -> None:
    desc["modules"]["fc1"] = {"type": "os.system", "args": {"command": f"touch {marker}"}}


def _edit_eval_call(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="call_function", target="builtins.eval",
                  args={"tuple": [f"open({str(marker)!r}, 'w').close()"]})


def _edit_torch_save_call(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="call_function", target="torch.save",
                  args={"tuple": [{"node": "x"}, str(marker)]})


def _edit_getattr_class(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="call_function", target="builtins.getattr",
                  args={"tuple": [{"node": "x"}, "__class__"]})


def _edit_get_attr_class(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="get_attr", target="fc1.__class__")


def _edit_method(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="call_method", target="register_hook",
                  args={"tuple": [{"node": "x"}, {"node": "x"}]})


def _edit_node_name(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "fc1")["name"] = "fc1; import os; os.system('touch MARKER')"


def _edit_huge_linear(desc: dict, tensors: dict, marker: Path) -> None:
    # 4 TB if it were allocated: layers are built on the meta device, then tensors checked
    desc["modules"]["fc1"]["args"].update(in_features=10**6, out_features=10**6)
    del tensors["fc1.weight"], tensors["fc1.bias"]


def _edit_tensor_shape(desc: dict, tensors: dict, marker: Path) -> None:
    tensors["fc1.weight"] = torch.zeros(3, 3)


def _edit_unknown_op(desc: dict, tensors: dict, marker: Path) -> None:
    _replace_node(desc, "fc1", op="exec", target=f"open({str(marker)!r}, 'w').close()")


def _edit_missing_tensor(desc: dict, tensors: dict, marker: Path) -> None:
    del tensors["fc2.bias"]


def _edit_extra_tensor(desc: dict, tensors: dict, marker: Path) -> None:
    tensors["payload"] = torch.zeros(4)


def _edit_huge_input(desc: dict, tensors: dict, marker: Path) -> None:
    # checking would allocate 4 TB of random inputs if the shape were believed
    desc["inputs"] = [{"shape": [1, 10**6, 10**6], "dtype": "float32", "high": None}]


def _edit_input_dtype(desc: dict, tensors: dict, marker: Path) -> None:
    desc["inputs"] = [{"shape": [1, 20], "dtype": "save", "high": None}]


TAMPERS = {
    "layer-type-os.system": (_edit_layer_type, "not an allowlisted layer type"),
    "call-builtins.eval": (_edit_eval_call, "'builtins.eval', which is not allowlisted"),
    "call-torch.save": (_edit_torch_save_call, "'torch.save', which is not allowlisted"),
    "getattr-__class__": (_edit_getattr_class, "attribute that is not allowlisted"),
    "get_attr-__class__": (_edit_get_attr_class, "'fc1.__class__', which is not described"),
    "method-register_hook": (_edit_method, "'register_hook', which is not allowlisted"),
    "node-name-semicolon": (_edit_node_name, "bad or repeated node name"),
    "huge-linear-no-tensors": (_edit_huge_linear, "missing: fc1.weight, fc1.bias"),
    "wrong-tensor-shape": (_edit_tensor_shape, "has shape (3, 3) but the layer needs (64, 20)"),
    "unknown-op": (_edit_unknown_op, "node 'fc1' has unknown op 'exec'"),
    "missing-tensor": (_edit_missing_tensor, "missing: fc2.bias"),
    "unexpected-tensor": (_edit_extra_tensor, "unexpected: payload"),
    "huge-input-shape": (_edit_huge_input, "more than the 268,435,456 morph allocates"),
    "input-dtype-not-a-dtype": (_edit_input_dtype, "dtype 'save' is not one morph can generate"),
}


def _tampered(src: Path, dest: Path, edit: Callable[..., None], marker: Path) -> Path:
    archive = torch.load(src, weights_only=True)
    desc = json.loads(archive["architecture"])
    tensors = dict(archive["tensors"])
    edit(desc, tensors, marker)
    text = json.dumps(desc)
    if dest.suffix == ".pt":
        torch.save({**archive, "architecture": text, "tensors": tensors}, dest)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest),
                  metadata={"morphcli.architecture": text})
    return dest


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", list(TAMPERS))
def test_tampered_description_is_rejected(samples: Path, case: str, suffix: str) -> None:
    edit, message = TAMPERS[case]
    marker = samples / "MARKER"
    path = _tampered(samples / "mlp.pt", samples / f"tampered{suffix}", edit, marker)
    before = listing(samples)

    code, stdout, stderr = invoke("inspect", path)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, message)
    with pytest.raises(InputError, match="allowlisted|not described|node name|missing|shape|"
                       "unknown op|unexpected|allocates|dtype"):
        morphcli.load(path)
    assert not marker.exists()
    assert listing(samples) == before


def test_untampered_control(samples: Path) -> None:
    """The tampering helper itself round-trips: only the edits make the files fail."""
    path = _tampered(samples / "mlp.pt", samples / "same.safetensors",
                     lambda desc, tensors, marker: None, samples / "MARKER")
    code, _, stderr = invoke("check", samples / "mlp.pt", path)
    assert code == 0, stderr


@pytest.mark.parametrize("content", ["random", "legacy-pickle-garbage"])
def test_unreadable_pickle_gets_no_advice_to_load_unsafely(tmp_path: Path, content: str) -> None:
    """torch's own message says re-running with weights_only=False 'will likely succeed';
    for a file that is simply not a checkpoint that advice is wrong and unsafe."""
    path = tmp_path / "model.pt"
    data = bytes(range(256)) * 16 if content == "random" else b"\x80\x02" + b"\xff" * 64
    path.write_bytes(data)
    code, _, stderr = invoke("inspect", path)
    assert code == 2
    line = assert_one_error_line(stderr, "cannot read as a PyTorch checkpoint",
                                 "the weights-only unpickler rejects it")
    assert "weights_only" not in line and "likely succeed" not in line


# ---------------------------------------------------------------- code that runs on unpickling


class _Trap:
    """A custom class whose own ``__reduce__`` re-creates it armed: unpickling touches MARKER."""

    def __init__(self, marker: str, armed: bool = False) -> None:
        self.marker = marker
        if armed:
            Path(marker).touch()

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Trap, (self.marker, True))


class _UserNet(nn.Module):
    """A user's own module class: not allowlisted, so a whole pickle of it needs --trust."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _evil_graph_module(marker: Path) -> _Payload:
    """A GraphModule pickle whose code block (exec'd by torch.fx when loaded) touches MARKER."""
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 2)))
    fn, (body, imports) = gm.__reduce__()
    return _Payload(fn, body, f"open({str(marker)!r}, 'w').close()\n{imports}")


CODE_ON_LOAD = {
    "custom-__reduce__": (lambda m: {"state_dict": {"w": torch.ones(2)}, "x": _Trap(str(m))},
                          "test_security._Trap"),
    "graph-module-code": (_evil_graph_module, "torch.fx.graph_module.reduce_graph_module"),
    "user-module-class": (lambda m: _UserNet(), "test_security._UserNet"),
}


@pytest.mark.parametrize("case", list(CODE_ON_LOAD))
def test_code_run_by_unpickling_is_refused(tmp_path: Path, case: str) -> None:
    make, wanted = CODE_ON_LOAD[case]
    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    torch.save(make(marker), path)
    assert not marker.exists()

    code, stdout, stderr = invoke("inspect", path, "--input-shape", "1,4")
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "refused to load", wanted, "--trust")
    with pytest.raises(InputError, match="refused"):
        morphcli.load(path)
    assert not marker.exists()
    assert listing(tmp_path) == {"model.pt"}

    if case != "user-module-class":  # control: a full unpickle really does run the payload
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_checkpoint_never_makes_morph_import_a_module(samples: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A description naming a module (that exists, and would run code on import) as a layer
    type is refused without importing it: only --arch imports, and only what the user names."""
    (samples / "evil_layers_xyz.py").write_text(
        f"open({str(samples / 'MARKER')!r}, 'w').close()\nclass Net: pass\n")
    monkeypatch.syspath_prepend(str(samples))
    path = _tampered(samples / "mlp.pt", samples / "named.pt",
                     lambda desc, tensors, marker: desc["modules"]["fc1"].update(
                         type="evil_layers_xyz.Net"), samples / "MARKER")
    code, _, stderr = invoke("inspect", path)
    assert code == 2
    assert_one_error_line(stderr, "'evil_layers_xyz.Net', which is not an allowlisted layer type")
    assert not (samples / "MARKER").exists()
    import sys

    assert "evil_layers_xyz" not in sys.modules


# ---------------------------------------------------------------- ONNX


def test_onnx_goes_through_the_checker_before_onnxruntime(samples: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that parses but breaks the ONNX spec never reaches onnxruntime."""
    import onnx
    import onnxruntime

    sessions: list[object] = []
    real = onnxruntime.InferenceSession

    def recording(*args: Any, **kwargs: Any) -> Any:
        sessions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    good = samples / "mlp.onnx"
    assert invoke("export", samples / "mlp.pt", "-o", good).code == 0
    sessions.clear()

    proto = onnx.load(str(good))
    proto.graph.node[0].input[0] = "no_such_tensor"  # uses a value nothing defines
    bad = samples / "bad.onnx"
    onnx.save(proto, str(bad))
    code, _, stderr = invoke("check", bad, samples / "mlp.pt")
    assert code == 2
    assert_one_error_line(stderr, "bad.onnx: not a valid ONNX model", "no_such_tensor")
    assert sessions == []

    code, _, stderr = invoke("check", good, samples / "mlp.pt")  # control: the real one runs
    assert code == 0, stderr
    assert len(sessions) == 1


def _drop_in_features(seq: nn.Sequential) -> None:
    del seq[0].in_features


def _wrong_in_features(seq: nn.Sequential) -> None:
    seq[2].in_features = 9


def _no_parameters_table(seq: nn.Sequential) -> None:
    del seq[1]._parameters


DAMAGED_PICKLES = {
    "missing-attribute": (_drop_in_features, "layer '0' (torch.nn.modules.linear.Linear): "
                          "cannot read constructor argument 'in_features'"),
    "settings-disagree-with-weight": (_wrong_in_features, "layer '2' (Linear): tensor 'weight' "
                                      "is (2, 8) but the layer's settings need (2, 9)"),
    "no-module-state": (_no_parameters_table, "layer '1' (ReLU) lacks the state every torch "
                        "module has"),
}


@pytest.mark.parametrize("case", list(DAMAGED_PICKLES))
def test_damaged_whole_pickle_is_refused(tmp_path: Path, case: str) -> None:
    """The weights-only unpickler restores a layer's attributes as the file lists them (found
    by the fuzz test): a layer that is not what its own settings build is refused at load."""
    damage, message = DAMAGED_PICKLES[case]
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    damage(seq)
    path = tmp_path / "seq.pt"
    torch.save(seq, path)
    code, stdout, stderr = invoke("inspect", path)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, f"error: {path}: damaged pickled model: {message}")
