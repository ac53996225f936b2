"""Names that reach torch.fx's generated ``forward`` source, and deeply nested JSON.

fx pastes keyword-argument keys, input names and attribute paths into the code it writes and
runs, so each way a name comes in (a description in a ``.pt`` archive, ``.safetensors``
metadata or stdin; a pickled model; a module built by ``--arch``) is checked against one
strict grammar before fx sees it. Every refusal is one ``error:`` line and exit 2, and no
marker file appears. A JSON document nested too deep for json.loads is refused unparsed.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_equivalent, assert_one_error_line, invoke
from torch import nn

import morphcli
from morphcli.errors import InputError


def _touch(marker: Path) -> str:
    return f"__import__('os').system('touch {marker}')"


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([("fc1", nn.Linear(4, 8)), ("act", nn.ReLU()),
                                      ("fc2", nn.Linear(8, 2))])).eval()


@pytest.fixture
def mlp(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.pt"
    morphcli.save(_mlp(), path, input_shapes=[(1, 4)])
    return path


def _parts(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    archive = torch.load(path, weights_only=True)
    return json.loads(archive["architecture"]), dict(archive["tensors"])


def _write(desc: Any, tensors: dict[str, torch.Tensor], dest: Path) -> Path:
    """The description (a dict, or JSON text) as a morphcli archive or safetensors file."""
    text = desc if isinstance(desc, str) else json.dumps(desc)
    if dest.suffix == ".pt":
        torch.save({"format": "morphcli.archive", "architecture": text, "tensors": tensors},
                   dest)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest),
                  metadata={"morphcli.architecture": text})
    return dest


def _node(desc: dict, name: str) -> dict:
    return next(n for n in desc["nodes"] if n["name"] == name)


def _rename_layer(desc: dict, tensors: dict, old: str, new: str) -> None:
    desc["modules"][new] = desc["modules"].pop(old)
    _node(desc, old)["target"] = new
    for key in [k for k in tensors if k.startswith(f"{old}.")]:
        tensors[new + key[len(old):]] = tensors.pop(key)


# ---------------------------------------------------------------- the kwargs-key attack


def _inject_description(marker: Path) -> dict:
    """torch.relu(input = x) if <command> else torch.relu(input = x): no inputs stored (the
    other model of 'morph check' supplies them), no tensors."""
    key = f"input = x) if {_touch(marker)} else torch.relu(input"
    return {"format": "morphcli.architecture", "version": 1, "class_name": "M", "inputs": None,
            "modules": {}, "attrs": {}, "nodes": [
                {"op": "placeholder", "name": "x", "target": "x"},
                {"op": "call_function", "name": "r", "target": "torch.relu",
                 "args": {"tuple": []}, "kwargs": {"dict": {key: {"node": "x"}}}},
                {"op": "output", "name": "output", "args": {"tuple": [{"node": "r"}]}}]}


@pytest.mark.parametrize("way", [".pt", ".safetensors", "stdin"])
def test_kwargs_key_does_not_run_code(tmp_path: Path, mlp: Path, way: str) -> None:
    marker = tmp_path / "MARKER"
    suffix = ".pt" if way == "stdin" else way
    path = _write(_inject_description(marker), {}, tmp_path / f"inject{suffix}")
    if way == "stdin":
        code, stdout, stderr = invoke("check", "-", mlp, input=path.read_bytes())
    else:
        code, stdout, stderr = invoke("check", path, mlp)
    assert not marker.exists()
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "node 'r': bad keyword argument name", "not an ASCII identifier")


# ---------------------------------------------------------------- other names in a description


def _kwargs_on_method(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "act").update(op="call_method", target="relu", args={"tuple": [{"node": "fc1"}]},
                              kwargs={"dict": {f"x=0) or {_touch(marker)} or (": 1}})


def _kwargs_on_layer(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "fc2")["kwargs"] = {"dict": {"def": 1}}  # 'self.fc2(act, def = 1)'


def _node_name_keyword(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "act")["name"] = "lambda"
    _node(desc, "fc2")["args"] = {"tuple": [{"node": "lambda"}]}


def _input_self(desc: dict, tensors: dict, marker: Path) -> None:
    desc["nodes"][0]["target"] = "self"  # 'def forward(self, self)'


def _input_torch(desc: dict, tensors: dict, marker: Path) -> None:
    desc["nodes"][0]["target"] = "torch"  # shadows the 'torch' global of the generated code


def _input_late(desc: dict, tensors: dict, marker: Path) -> None:
    desc["nodes"].insert(2, {"op": "placeholder", "name": "y", "target": "y"})


def _method_target(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "act").update(op="call_method", target=f"relu() or {_touch(marker)} or x.relu",
                              args={"tuple": [{"node": "fc1"}]})


def _layer_keyword(desc: dict, tensors: dict, marker: Path) -> None:
    _rename_layer(desc, tensors, "fc2", "def")  # 'self.def(act)'


def _layer_self(desc: dict, tensors: dict, marker: Path) -> None:
    _rename_layer(desc, tensors, "fc2", "self")  # fx names the node 'self' too


def _layer_graph(desc: dict, tensors: dict, marker: Path) -> None:
    _rename_layer(desc, tensors, "fc2", "graph")  # would overwrite GraphModule.graph


def _layer_nested_keyword(desc: dict, tensors: dict, marker: Path) -> None:
    _rename_layer(desc, tensors, "fc2", "head.class")


def _layer_quote(desc: dict, tensors: dict, marker: Path) -> None:
    _rename_layer(desc, tensors, "fc2", f'x") or {_touch(marker)} or ("')  # in getattr(self, "..")


def _get_attr_past_tensor(desc: dict, tensors: dict, marker: Path) -> None:
    _node(desc, "act").update(op="get_attr", target="fc1.weight.T")  # an attribute of a tensor


def _get_attr_keyword(desc: dict, tensors: dict, marker: Path) -> None:
    desc["attrs"]["None"] = "buffer"
    tensors["None"] = torch.zeros(1)
    desc["nodes"].insert(1, {"op": "get_attr", "name": "c", "target": "None"})


NAME_CASES: dict[str, tuple[Callable[..., None], str]] = {
    "kwargs-key-method": (_kwargs_on_method, "node 'act': bad keyword argument name"),
    "kwargs-key-layer": (_kwargs_on_layer, "bad keyword argument name 'def': is a Python keyword"),
    "node-name-keyword": (_node_name_keyword, "bad or repeated node name 'lambda'"),
    "input-self": (_input_self, "bad input name 'self'"),
    "input-torch": (_input_torch, "bad input name 'torch'"),
    "input-after-other-nodes": (_input_late, "inputs (placeholders) must come first"),
    "method-target": (_method_target, "which is not allowlisted"),
    "layer-keyword": (_layer_keyword, "bad layer path 'def': is a Python keyword"),
    "layer-self": (_layer_self, "bad layer path 'self'"),
    "layer-graph": (_layer_graph, "bad layer path 'graph': is an attribute of every GraphModule"),
    "layer-nested-keyword": (_layer_nested_keyword, "part 'class' is a Python keyword"),
    "layer-quote": (_layer_quote, "has characters other than ASCII letters"),
    "get_attr-past-a-tensor": (_get_attr_past_tensor, "'fc1.weight.T', which is not described"),
    "get_attr-keyword": (_get_attr_keyword, "bad tensor path 'None': is a Python keyword"),
}


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("case", list(NAME_CASES))
def test_bad_name_in_description_is_refused(tmp_path: Path, mlp: Path, case: str,
                                            suffix: str) -> None:
    edit, message = NAME_CASES[case]
    marker = tmp_path / "MARKER"
    desc, tensors = _parts(mlp)
    edit(desc, tensors, marker)
    path = _write(desc, tensors, tmp_path / f"named{suffix}")
    code, stdout, stderr = invoke("inspect", path)
    assert not marker.exists()
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, str(path), message)
    with pytest.raises(InputError):
        morphcli.load(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["def", "fc1) or __import__('os')", "Modèle"])
def test_class_name_is_only_a_label(tmp_path: Path, mlp: Path, name: str) -> None:
    """fx uses it only as the class's __name__; a name that is no plain identifier becomes
    'Model' (older files may hold a unicode one), never code."""
    desc, tensors = _parts(mlp)
    desc["class_name"] = name
    gm = morphcli.load(_write(desc, tensors, tmp_path / "named.pt"))
    assert type(gm).__name__ == "Model"
    assert_equivalent(_mlp(), gm, [(3, 4)], atol=0)


def test_indices_hyphens_and_soft_keywords_are_fine(tmp_path: Path) -> None:
    """Layer paths fx writes with getattr ('features.0', RegNet's 'block1-0') and soft keywords
    (names to the parser) load, save and load again to the same function."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict([
        ("features", nn.Sequential(nn.Linear(4, 6), nn.ReLU())),
        ("block1-0", nn.Linear(6, 5)), ("match", nn.Tanh()), ("case", nn.Linear(5, 2))])).eval()
    for suffix in (".pt", ".safetensors"):
        path = tmp_path / f"model{suffix}"
        morphcli.save(model, path, input_shapes=[(1, 4)])
        gm = morphcli.load(path)
        assert 'getattr(self.features, "0")' in gm.code and 'getattr(self, "block1-0")' in gm.code
        assert_equivalent(model, gm, [(3, 4)], atol=0)


# ---------------------------------------------------------------- models that are Python objects


def _named(name: str) -> nn.Module:
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(4, 4))
    model.add_module(name, nn.Linear(4, 2))
    return model.eval()


LAYER_NAMES = {"space": ("a b", "has characters other than ASCII"),
               "unicode": ("é", "has characters other than ASCII"),
               "self": ("self", "is the name torch.fx's generated code gives the model itself"),
               "keyword": ("def", "is a Python keyword"),
               "graph": ("graph", "is an attribute of every GraphModule"),
               # fx writes getattr(self, "<name>") for it: this one opens MARKER when it runs
               "quote": ('fc1") and open("MARKER", "w") or getattr(self, "fc1',
                         "has characters other than ASCII")}


@pytest.mark.parametrize("trust", [True, False])
@pytest.mark.parametrize("case", list(LAYER_NAMES))
def test_pickled_model_with_bad_layer_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           case: str, trust: bool) -> None:
    """A whole pickled nn.Sequential of torch layers loads even without --trust: its layer
    names alone must not become code. Refused before tracing, naming the layer."""
    name, why = LAYER_NAMES[case]
    monkeypatch.chdir(tmp_path)  # where 'touch MARKER' would write
    path = tmp_path / "named.pt"
    torch.save(_named(name), path)
    out = tmp_path / "out.pt"
    code, stdout, stderr = invoke("widen", path, "fc1", "--by", "2", "-o", out,
                                  *(["--trust"] if trust else []))
    assert not (tmp_path / "MARKER").exists()
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, f"{path}: layer {name!r} (Linear): the name", why)
    assert not out.exists()


@pytest.mark.parametrize("case", ["space", "keyword"])
def test_arch_with_bad_layer_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  case: str) -> None:
    name, why = LAYER_NAMES[case]
    module = f"badnames_arch_{case}_xyz"  # one per case: an imported module stays imported
    (tmp_path / f"{module}.py").write_text(
        "from torch import nn\n\ndef build():\n    m = nn.Sequential()\n"
        f"    m.add_module('fc1', nn.Linear(4, 4))\n    m.add_module({name!r}, nn.Linear(4, 2))\n"
        "    return m\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    weights = tmp_path / "weights.pt"
    torch.save(_named(name).state_dict(), weights)
    code, _, stderr = invoke("inspect", weights, "--arch", f"{module}:build",
                             "--input-shape", "1,4")
    assert code == 2
    assert_one_error_line(stderr, f"layer {name!r} (Linear)", why)


def test_bad_name_of_a_parameter_is_refused() -> None:
    model = _named("fc2")
    model._parameters["scale factor"] = nn.Parameter(torch.ones(1))  # a tampered pickle can
    with pytest.raises(InputError, match="parameter 'scale factor': the name"):
        morphcli.load(model)


# ---------------------------------------------------------------- deeply nested JSON

DEEP = "[" * 50_000 + "]" * 50_000


def _deep_safetensors_header() -> bytes:
    header = b'{"a":' * 30_000 + b"1" + b"}" * 30_000
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("way", ["pt", "safetensors", "pt-stdin", "safetensors-stdin"])
def test_deep_description_is_refused(tmp_path: Path, way: str) -> None:
    suffix = "." + way.removesuffix("-stdin")
    path = _write(DEEP, {}, tmp_path / f"deep{suffix}")
    if way.endswith("stdin"):
        code, _, stderr = invoke("inspect", "-", input=path.read_bytes())
    else:
        code, _, stderr = invoke("inspect", path)
    assert code == 2
    assert_one_error_line(stderr, "nests 50000 levels deep, more than the 64 morph reads")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", "stdin"])
def test_deep_safetensors_header_is_refused(tmp_path: Path, suffix: str) -> None:
    """The header as a file (the safetensors library refuses it), as a '.pt' with the wrong
    content (the format sniffer parses the first 64 KiB) and on stdin (sniffed as well)."""
    data = _deep_safetensors_header()
    if suffix == "stdin":
        code, _, stderr = invoke("inspect", "-", input=data)
    else:
        path = tmp_path / f"deep{suffix}"
        path.write_bytes(data)
        code, _, stderr = invoke("inspect", path)
    assert code == 2
    assert_one_error_line(stderr)


def test_deep_pt2_description_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "model.pt2"
    morphcli.save(_mlp(), good, input_shapes=[(1, 4)])
    bad = tmp_path / "deep.pt2"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            content = src.read(info)
            dst.writestr(info.filename, DEEP.encode()
                         if info.filename.endswith("extra/morphcli.architecture.json") else content)
    code, _, stderr = invoke("inspect", bad)
    assert code == 2
    assert_one_error_line(stderr, "levels deep")


def test_parse_description_bounds() -> None:
    from morphcli.graph.describe import MAX_JSON_DEPTH, describe, json_depth, parse_description

    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(deepest) == MAX_JSON_DEPTH
    assert parse_description(deepest, "f") == json.loads(deepest)
    with pytest.raises(InputError, match="f: damaged x: it nests 65 levels deep"):
        parse_description("[" + deepest + "]", "f", "x")
    # brackets inside strings, after escaped quotes, in unclosed strings and unbalanced
    assert json_depth(json.dumps({"a": "[[[[\\\"[[", "b": ["]]]"]})) == 2
    assert json_depth('"' + "[" * 100) == 100
    assert json_depth(b"[" * 1000) == 1000
    with pytest.raises(InputError, match="not UTF-8 text"):
        parse_description(b"\xff{", "f")
    # UTF-16 JSON (json.loads would take it) where '\\"' hides a bracket from a byte scan
    with pytest.raises(InputError, match="not UTF-8 text"):
        parse_description(json.dumps(["\\\"", "[" * 100]).encode("utf-16"), "f")
    with pytest.raises(InputError, match="not JSON"):
        parse_description("[1,]", "f")
    with pytest.raises(InputError, match="not JSON"):
        parse_description("[" + "9" * 5000 + "]", "f")  # over Python's int digit limit
    # the real thing: a description of a 3-layer model nests 6 levels
    desc = describe(morphcli.load(_mlp(), input_shapes=[(1, 4)]))
    assert json_depth(json.dumps(desc)) == 6


def test_sniff_survives_deep_json() -> None:
    from morphcli.io.sniff import sniff

    data = _deep_safetensors_header()
    assert sniff(data[:64 * 1024]) == ".safetensors"  # the header runs past what was read
    whole = io.BytesIO(data).read()
    assert sniff(whole) is None  # complete, but no JSON morph parses
