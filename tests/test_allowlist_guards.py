"""The allowlist's exclusions are what stop a description from building its own callables.

Every other guard (names, tensor checks, budgets) lets this chain through: operator's
callable-builders reach ``os.system`` from any tensor in six nodes, and shape inference would
run it while the file is loaded. Without ``allowlist._OPERATOR_EXCLUDED`` a plain
``morph inspect`` runs the command; these tests fail then.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke

from morphcli.graph import allowlist
from morphcli.graph.describe import FORMAT, VERSION
from morphcli.io.torch_file import ARCHIVE_FORMAT


def _call(name: str, fn: str, *args: object) -> dict:
    return {"op": "call_function", "name": name, "target": fn,
            "args": {"tuple": list(args)}, "kwargs": {"dict": {}}}


def _chain(marker: Path) -> list[dict]:
    """x -> type(x).__reduce_ex__.__globals__["torch"].os.system("touch MARKER")."""
    node = lambda name: {"node": name}  # noqa: E731
    return [
        {"op": "placeholder", "name": "x", "target": "x"},
        _call("globals_of", "operator.attrgetter", "__class__.__reduce_ex__.__globals__"),
        _call("namespace", "operator.call", node("globals_of"), node("x")),
        _call("torch_module", "operator.getitem", node("namespace"), "torch"),
        _call("system_of", "operator.attrgetter", "os.system"),
        _call("system", "operator.call", node("system_of"), node("torch_module")),
        _call("run", "operator.call", node("system"), f"touch {marker}"),
        {"op": "output", "name": "output", "target": "output",
         "args": {"tuple": [node("x")]}, "kwargs": {"dict": {}}},
    ]


def _archive(path: Path, nodes: list[dict]) -> Path:
    desc = {"format": FORMAT, "version": VERSION, "class_name": "M",
            "inputs": [{"shape": [1, 4], "dtype": "float32", "high": None}],
            "modules": {}, "attrs": {}, "nodes": nodes}
    torch.save({"format": ARCHIVE_FORMAT, "architecture": json.dumps(desc), "tensors": {}}, path)
    return path


@pytest.mark.parametrize("command", ["inspect", "check", "export"])
def test_operator_callable_builders_are_refused(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "MARKER"
    evil = _archive(tmp_path / "evil.pt", _chain(marker))
    args = {"inspect": ("inspect", evil), "check": ("check", evil, evil),
            "export": ("export", evil, "-o", tmp_path / "out.pt")}[command]
    code, stdout, stderr = invoke(*args)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "operator.attrgetter", "not allowlisted")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_every_callable_builder_of_operator_is_excluded() -> None:
    """attrgetter, methodcaller, itemgetter build callables; call calls anything."""
    names = allowlist.functions()
    for name in ("attrgetter", "methodcaller", "itemgetter", "call"):
        assert f"operator.{name}" not in names
    assert "operator.getitem" in names and "operator.add" in names  # plain maths stays


def _factory_archive(tmp_path: Path, kwargs: dict) -> Path:
    """y = x + torch.zeros(1, 4, **kwargs)."""
    nodes = [
        {"op": "placeholder", "name": "x", "target": "x"},
        {"op": "call_function", "name": "z", "target": "torch.zeros",
         "args": {"tuple": [1, 4]}, "kwargs": {"dict": kwargs}},
        _call("y", "operator.add", {"node": "x"}, {"node": "z"}),
        {"op": "output", "name": "output", "target": "output",
         "args": {"tuple": [{"node": "y"}]}, "kwargs": {"dict": {}}},
    ]
    return _archive(tmp_path / "factory.pt", nodes)


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"device": {"device": "meta"}}, ("zeros on a fixed device 'meta'", "not allowlisted")),
    ({"pin_memory": True}, ("zeros with keyword 'pin_memory'", "not allowlisted")),
])
def test_a_factory_may_not_name_its_own_device_or_extra_keywords(
        tmp_path: Path, kwargs: dict, words: tuple[str, ...]) -> None:
    """A stored torch.zeros(device="cuda") would allocate on a real device while morphcli
    sizes the graph on meta; only ``x.device`` (a node) may be stored."""
    code, stdout, stderr = invoke("inspect", _factory_archive(tmp_path, kwargs))
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, *words)


def test_a_factory_with_its_plain_keywords_is_allowed(tmp_path: Path) -> None:
    """The refusal above is the guard's, not a general one: dtype is fine (and the tensor
    adds zeros, so the model is the identity)."""
    path = _factory_archive(tmp_path, {"dtype": {"dtype": "float32"}})
    code, stdout, stderr = invoke("inspect", path)
    assert code == 0, stderr
    assert "zeros" in stdout
