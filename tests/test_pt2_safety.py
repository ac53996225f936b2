""".pt2 files are read without unpickling anything and without evaluating their program JSON:
torch.export.load unpickles sample inputs (falling back to a full unpickle), ``use_pickle``
weights and opaque objects, sympy evaluates symbolic expressions, fx runs code built from
names, pytree imports modules. Every attack here runs its command (or creates its marker)
through torch.export.load; morph must never let it."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import assert_equivalent, assert_one_error_line, invoke, outputs_of

import morphcli
from morphcli.errors import InputError, UnsafeCheckpointError
from morphcli.io.api import open_runner

Members = dict[str, bytes]
SHAPES = {"mlp.pt": (1, 20), "cnn.pt": (1, 3, 32, 32), "resnet.pt": (1, 3, 16, 16)}


class _Payload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


def _rezip(src: Path, dst: Path, change: Callable[[Members], None]) -> Path:
    """Rewrite the archive's members (names without torch's top-level folder)."""
    with zipfile.ZipFile(src) as zin:
        prefix = zin.namelist()[0].split("/", 1)[0] + "/"
        members = {i.filename[len(prefix):]: zin.read(i) for i in zin.infolist()}
    change(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members.items():
            zout.writestr(prefix + name, data)
    return dst


def _edit_json(members: Members, name: str, edit: Callable[[Any], None]) -> None:
    obj = json.loads(members[name])
    edit(obj)
    members[name] = json.dumps(obj).encode()


@pytest.fixture(scope="session")
def own_pt2(tmp_path_factory: pytest.TempPathFactory, samples_module: Any) -> dict[str, Path]:
    """.pt2 files morph wrote (with its description inside), by sample name."""
    folder = tmp_path_factory.mktemp("own_pt2")
    out = {}
    for name in ("mlp.pt", "cnn.pt"):
        out[name] = folder / name.replace(".pt", ".pt2")
        morphcli.save(samples_module.build(name), out[name], input_shapes=[SHAPES[name]])
    return out


@pytest.fixture(scope="session")
def foreign_pt2(tmp_path_factory: pytest.TempPathFactory, samples_module: Any) -> Path:
    """A program plain torch exported (no morphcli description): morph only runs it."""
    path = tmp_path_factory.mktemp("foreign_pt2") / "foreign.pt2"
    program = torch.export.export(samples_module.build("mlp.pt").eval(), (torch.randn(2, 20),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    return path


# ---------------------------------------------------------------- attacks


def _sample_inputs(members: Members, marker: Path) -> None:
    members["data/sample_inputs/model.pt"] = pickle.dumps(_Payload(f"touch {marker}"))


def _use_pickle(members: Members, marker: Path) -> None:
    def edit(config: Any) -> None:
        entry = next(iter(config["config"].values()))
        entry["use_pickle"] = True
        members["data/weights/" + entry["path_name"]] = pickle.dumps(_Payload(f"touch {marker}"))

    _edit_json(members, "data/weights/model_weights_config.json", edit)


def _opaque_object(members: Members, marker: Path) -> None:
    members["data/constants/opaque_obj_0"] = pickle.dumps(_Payload(f"touch {marker}"))
    _edit_json(members, "data/constants/model_constants_config.json", lambda c: c["config"].update(
        evil={"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True,
              "tensor_meta": None}))


def _sympy_eval(members: Members, marker: Path) -> None:
    """sympy.sympify(expr_str) is eval()."""
    text = members["models/model.json"].decode()
    old = json.dumps("Symbol('s77', positive=True, integer=True)")
    assert old in text
    evil = f"Symbol('s77', integer=True) + 0*len([__import__('os').system('touch {marker}')])"
    members["models/model.json"] = text.replace(old, json.dumps(evil), 1).encode()


def _code_in_name(members: Members, marker: Path) -> None:
    """fx writes forward_arg_names into the code of ``forward``: a default argument runs when
    the code is executed (the name appears twice: a string swallows the second copy)."""
    name = f"x=__import__('os').system('touch {marker}')):\n    z = '''#"

    def edit(program: Any) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        signature["forward_arg_names"] = [name]

    _edit_json(members, "models/model.json", edit)


ATTACKS = {"sample_inputs": _sample_inputs, "use_pickle": _use_pickle,
           "opaque_object": _opaque_object, "sympy_eval": _sympy_eval,
           "code_in_name": _code_in_name}
# Each needs the file's program JSON (absent from the reads of a file morph wrote) or a tensor.
REFUSED = {"use_pickle": ("data/weights/weight_0", "pickle", "--trust"),
           "opaque_object": ("data/constants/opaque_obj_0", "pickle", "--trust"),
           "sympy_eval": ("symbolic expression", "'len'", "--trust"),
           "code_in_name": ("models/model.json", "not a plain name", "--trust")}


def _evil(src: Path, folder: Path, attack: str) -> tuple[Path, Path]:
    marker = folder / f"MARKER_{attack}"
    path = _rezip(src, folder / f"evil_{attack}.pt2", lambda m: ATTACKS[attack](m, marker))
    assert not marker.exists()
    return path, marker


def _run(command: str, path: Path, other: Path, out: Path) -> tuple[int, str, str]:
    args: tuple[Any, ...] = {
        "inspect": ("inspect", path),
        "check": ("check", path, other),
        "export": ("export", path, "-o", out),
        "stdin": ("inspect", "-"),
    }[command]
    return invoke(*args, input=path.read_bytes() if command == "stdin" else None)


@pytest.mark.parametrize("command", ["inspect", "check", "export", "stdin"])
@pytest.mark.parametrize("attack", ["sample_inputs", "use_pickle", "opaque_object"])
def test_pickles_in_own_pt2_never_run(own_pt2: dict[str, Path], samples: Path, attack: str,
                                      command: str) -> None:
    path, marker = _evil(own_pt2["mlp.pt"], samples, attack)
    out = samples / "out.pt"
    code, stdout, stderr = _run(command, path, samples / "mlp.pt", out)
    assert not marker.exists()
    if attack == "sample_inputs":  # not needed to run a program: never read
        assert code == 0, stderr
        assert out.exists() == (command == "export")
        return
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, path.name if command != "stdin" else "stdin", *REFUSED[attack])
    assert not out.exists()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_on_foreign_pt2_never_run(foreign_pt2: Path, samples: Path, attack: str) -> None:
    """A program without morph's description is deserialized (for check): the JSON's turn."""
    path, marker = _evil(foreign_pt2, samples, attack)
    code, stdout, stderr = invoke("check", path, samples / "mlp.pt", "--json")
    assert not marker.exists()
    if attack == "sample_inputs":
        assert code == 0, stderr
        assert json.loads(stdout)["max_abs"] == 0
        return
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, path.name, *REFUSED[attack])


def test_tree_spec_imports_nothing(foreign_pt2: Path, samples: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pytree imports the module an ``__enum__`` context names (importing runs its code)."""
    marker = samples / "MARKER_import"
    (samples / "pt2_evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(samples))
    enum = json.dumps([{"__enum__": True, "fqn": "pt2_evil_module:E", "name": "A"}])

    def edit(program: Any) -> None:
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["out_spec"])
        spec[1] = {"type": "builtins.dict", "context": enum,
                   "children_spec": [{"type": None, "context": None, "children_spec": []}]}
        signature["out_spec"] = json.dumps(spec)

    path = _rezip(foreign_pt2, samples / "evil_spec.pt2",
                  lambda m: _edit_json(m, "models/model.json", edit))
    code, _, stderr = invoke("check", path, samples / "mlp.pt")
    assert not marker.exists()
    assert code == 2
    assert_one_error_line(stderr, "out_spec", "tree spec context", "--trust")


def test_real_process_refuses_use_pickle(own_pt2: dict[str, Path], tmp_path: Path) -> None:
    from helpers import run_cli

    path, marker = _evil(own_pt2["mlp.pt"], tmp_path, "use_pickle")
    code, stdout, stderr = run_cli("inspect", path.name, cwd=tmp_path)
    assert not marker.exists()
    assert (code, stdout) == (2, "")
    line = assert_one_error_line(stderr, "data/weights/weight_0", "--trust")
    assert line.startswith(f"error: {path.name}: member ")


def test_trust_falls_back_to_torch(own_pt2: dict[str, Path], tmp_path: Path) -> None:
    """A tensor stored with use_pickle (a plain one here) loads with --trust only."""
    def pickled_weight(members: Members) -> None:
        def edit(config: Any) -> None:
            entry = config["config"]["fc1.weight"]
            raw = members["data/weights/" + entry["path_name"]]
            buf = io.BytesIO()
            weight = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(64, 20)
            torch.save(torch.nn.Parameter(weight), buf)
            entry["use_pickle"] = True
            entry["path_name"] = "weight_pickled"
            members["data/weights/weight_pickled"] = buf.getvalue()

        _edit_json(members, "data/weights/model_weights_config.json", edit)

    path = _rezip(own_pt2["mlp.pt"], tmp_path / "pickled.pt2", pickled_weight)
    with pytest.raises(UnsafeCheckpointError, match="weight_pickled.*--trust"):
        morphcli.load(path)
    model = morphcli.load(path, trust=True)
    assert_equivalent(morphcli.load(own_pt2["mlp.pt"]), model, [(3, 20)], atol=0)


# ---------------------------------------------------------------- the invariant


@contextlib.contextmanager
def _no_unpickling() -> Iterator[list[str]]:
    """Every unpickler torch.export.load may reach fails (and is recorded) while inside."""
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            raise AssertionError(f"{name} called while reading a .pt2")
        return fail

    with pytest.MonkeyPatch.context() as mp:
        for owner, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"),
                            (torch, "load"), (torch._C, "_pickle_load_obj")):
            mp.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
        yield calls


def test_no_unpickling_at_all(own_pt2: dict[str, Path], foreign_pt2: Path,
                              tmp_path: Path) -> None:
    """Load, inspect, check and re-export our own and foreign .pt2 files with every unpickler
    patched to fail; outputs match torch.export.load(path).module()'s exactly."""
    again = tmp_path / "again.pt2"
    inputs = {name: torch.randn(3, *shape[1:]) for name, shape in SHAPES.items()}
    inputs["foreign"] = inputs["mlp.pt"]
    with _no_unpickling() as calls:
        with pytest.raises(AssertionError):  # the patch bites: torch's loader unpickles
            torch.export.load(str(foreign_pt2))
        assert calls
        calls.clear()
        ours = {name: outputs_of(morphcli.load(path), [inputs[name]])
                for name, path in own_pt2.items()}
        runner, specs, _ = open_runner(foreign_pt2)
        assert specs is not None and specs[0].shape == (1, 20)  # the dynamic batch: 1
        ours["foreign"] = outputs_of(lambda x: runner([x]), [inputs["foreign"]])
        for path in own_pt2.values():
            code, stdout, stderr = invoke("inspect", path)
            assert code == 0 and "fc" in stdout, stderr
        # .pt2 against .pt2 only: a .pt would be read with torch.load (weights_only)
        code, stdout, stderr = invoke("check", foreign_pt2, own_pt2["mlp.pt"], "--json")
        assert code == 0 and json.loads(stdout)["max_abs"] == 0, stderr
        code, _, stderr = invoke("export", own_pt2["cnn.pt"], "-o", again)  # verified by a run
        assert code == 0, stderr
        ours["again"] = outputs_of(morphcli.load(again), [inputs["cnn.pt"]])
        assert calls == []
    inputs["again"] = inputs["cnn.pt"]
    files = {**own_pt2, "foreign": foreign_pt2, "again": again}
    for name, path in files.items():
        theirs = outputs_of(torch.export.load(str(path)).module(), [inputs[name]])
        assert len(theirs) == len(ours[name]) == 1
        diff = float((theirs[0] - ours[name][0]).abs().max())
        assert diff <= 1e-6, (name, diff)  # float32 round-off at most (graph vs program)


@pytest.mark.slow  # ~6 s: export of a real network
def test_foreign_resnet18_without_unpickling(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pt2"
    program = torch.export.export(model, (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, str(path))
    x = torch.randn(3, 3, 32, 32)
    with _no_unpickling() as calls:
        runner, _, _ = open_runner(path)
        ours = outputs_of(lambda t: runner([t]), [x])
        assert calls == []
    theirs = outputs_of(torch.export.load(str(path)).module(), [x])
    assert ours[0].shape == theirs[0].shape == (3, 10)
    assert float((ours[0] - theirs[0]).abs().max()) == 0


# ---------------------------------------------------------------- damaged archives


def test_tensor_larger_than_its_member_is_refused(own_pt2: dict[str, Path],
                                                 tmp_path: Path) -> None:
    def grow(config: Any) -> None:
        config["config"]["fc1.weight"]["tensor_meta"]["sizes"][0] = {"as_int": 10**6}

    path = _rezip(own_pt2["mlp.pt"], tmp_path / "big.pt2", lambda m: _edit_json(
        m, "data/weights/model_weights_config.json", grow))
    with pytest.raises(InputError, match="fc1.weight.*need .* elements; the member holds"):
        morphcli.load(path)


def test_members_claiming_far_more_than_the_file_holds_are_refused(
        own_pt2: dict[str, Path], tmp_path: Path) -> None:
    """A zip bomb: one weight's member is 96 MiB of zeros, deflated to a few hundred KiB.
    The reader refuses it from the sizes the zip claims, before inflating anything."""
    src = own_pt2["mlp.pt"]
    with zipfile.ZipFile(src) as zin:
        infos = zin.infolist()
        members = [(i.filename, zin.read(i)) for i in infos]
    config = json.loads(dict(members)[
        infos[0].filename.split("/", 1)[0] + "/data/weights/model_weights_config.json"])
    target = "data/weights/" + config["config"]["fc1.weight"]["path_name"]
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zout:
        for name, data in members:
            zout.writestr(name, bytes(96 << 20) if name.endswith("/" + target) else data)
    assert bomb.stat().st_size < 1 << 20
    code, stdout, stderr = invoke("inspect", bomb)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "claim", "damaged or a zip bomb")


def test_operator_allowlist() -> None:
    from morphcli.io.pt2_archive import _allowed

    builtins = {__import__("operator").getitem}
    assert _allowed(torch.ops.aten.relu.default, builtins)
    assert not _allowed(torch.ops.aten.from_file.default, builtins)
    assert not _allowed(os.system, builtins)
    assert not _allowed(torch.ops.higher_order.call_torchbind, builtins)


@pytest.mark.parametrize("expr", ["Symbol('s77', positive=True, integer=True)", "s0 + 2*s1",
                                  "Max(Integer(1), Symbol('s0'))", "Eq(Mod(s0, 2), 0)",
                                  "Float('1.5', precision=53)"])
def test_shape_arithmetic_passes(expr: str) -> None:
    from morphcli.io.pt2_archive import _check_expr

    _check_expr("m.pt2", expr, "models/model.json")


@pytest.mark.parametrize("expr", ["chr(95)", "s0.func", "eval('1')", "__import__('os')",
                                  "s0[0]", "lambda: 0", "Symbol('a\\'b')", "atan2(s0, 1)"])
def test_anything_else_in_an_expression_is_refused(expr: str) -> None:
    from morphcli.io.pt2_archive import _check_expr

    with pytest.raises(InputError, match="symbolic expression.*--trust"):
        _check_expr("m.pt2", expr, "models/model.json")


def test_non_finite_floats_and_strings_load(tmp_path: Path) -> None:
    """-inf masks (written as the string "-Infinity") and string arguments are plain data."""
    class Masked(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x.masked_fill(x > 1, float("-inf")).softmax(-1)
            return torch.nn.functional.gelu(torch.einsum("bi,bj->bij", y, x), approximate="tanh")

    path = tmp_path / "masked.pt2"
    torch.export.save(torch.export.export(Masked(), (torch.randn(2, 3),)), str(path))
    runner, _, _ = open_runner(path)
    x = torch.randn(2, 3) * 2
    ours = outputs_of(lambda t: runner([t]), [x])
    assert torch.equal(ours[0], torch.export.load(str(path)).module()(x))
