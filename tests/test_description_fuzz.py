"""A structure-aware fuzzer for architecture descriptions (beside the byte-level one in
tests/test_fuzz.py): hypothesis draws whole descriptions that are valid JSON of the right shape,
with random layers, graph tensors, ops, targets, names, keyword-argument keys and values and
input shapes. Names come from a pool of plain ones and of hostile ones (keywords, names fx
reserves, unicode, code that creates a marker file when fx pastes it into ``forward``).

Each description is written as a ``.pt`` archive and loaded through ``morphcli.load``; as
``morph check FUZZED PARTNER`` runs it (stored without input shapes, so the model runs without
being traced first: the way the kwargs-key attack of issue 11 ran its code); and every eighth
through ``morph inspect`` (exit 0, or exit 2 with one ``error:`` line). The only outcomes
allowed: it loads (or is checked), or it raises InputError; and the marker never appears.
The default run takes a few seconds; ``pytest -m slow`` runs 4000 descriptions.
MORPH_DESCRIPTION_FUZZ_EXAMPLES overrides the count.
"""

from __future__ import annotations

import json
import os
import random
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import add_figures, assert_one_error_line, deadline, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import morphcli
from morphcli.errors import InputError

PER_INPUT_SECONDS = 20
DEFAULT_EXAMPLES, SLOW_EXAMPLES = 120, 4000
FIGURES = ("description fuzz: {inputs} descriptions: {loaded} loaded, {refused} "
           "refused with InputError ({cli} also through 'morph inspect'; check: {other_ok} "
           "ran, {other_refused} refused), {crashes} crashes, {seconds:.0f} s")
MARKER = "MARKER"  # relative: the test runs in its tmp_path

_RUN = "__import__('os').system('touch MARKER')"
PLAIN_NAMES = ["x", "y", "fc", "layer1", "a_b", "act", "out", "input", "h0", "_p"]
PATH_PARTS = [*PLAIN_NAMES, "0", "12", "block1-0", "match", "case"]
HOSTILE_NAMES = [
    "def", "class", "None", "lambda", "self", "torch", "device", "inf", "nan", "NoneType",
    "getattr", "slice", "graph", "code", "meta", "forward", "training", "_modules", "__class__",
    "__init__", "é", "ü_layer", "", " ", "a b", "a.b", "a..b", ".a", "1a", "-", "x\n", "x;y",
    f"x) if {_RUN} else (x", f'x") or {_RUN} or ("', f"input = x) or {_RUN} or (x", _RUN,
    f"x=0, **{{{_RUN!r}: 1}}", "\x00", "x\\", "'", '"',
]
FUNCTIONS = ["torch.relu", "torch.add", "torch.mul", "torch.cat", "torch.flatten", "torch.sum",
             "torch.tanh", "torch.reshape", "torch.nn.functional.gelu",
             "torch.nn.functional.softmax", "operator.add", "operator.mul", "operator.getitem",
             "builtins.getattr", "math.sqrt"]
HOSTILE_FUNCTIONS = ["builtins.eval", "builtins.exec", "os.system", "torch.save", "torch.load",
                     "operator.attrgetter", "builtins.__import__", _RUN]
METHODS = ["relu", "view", "sum", "mean", "size", "transpose", "reshape", "flatten", "add",
           "softmax", "contiguous"]
HOSTILE_METHODS = ["register_hook", "numpy", "__class__", "__reduce__", f"relu() or {_RUN} or x"]
KWARG_KEYS = ["dim", "alpha", "inplace", "keepdim", "input", "other", "start_dim"]
# Keys that fx, pasting 'KEY = value' into a call, would turn into code that runs: the call
# becomes 'f(a, input = self) if <command> else dict(input = value)'.
INJECTED_KEYS = [f"input = self) if {_RUN} else dict(input",
                 f"alpha = 1) if {_RUN} else dict(input",
                 f"dim = 0) if {_RUN} else dict(dim"] * 3 + ["def", "", "a b", "None"]


FOCUSES = ["node", "input", "path", "kwargs", "call", "args", "tensors", "class"]


class _Draw:
    """Draws names and values. A description is clean (``focus`` None: plain names, calls that
    fit, meant to load) or hostile in one respect, so that one bad name is not always hidden
    behind another that is refused first."""

    def __init__(self, draw: st.DrawFn) -> None:
        # The hostile choices come from a seeded Random: hypothesis' own draws lean towards the
        # first and simplest values, and would seldom reach the later foci and names.
        self.draw, self.rng = draw, random.Random(draw(st.integers(0, 2**32 - 1)))
        self.focus: str | None = self.rng.choice([None] * 6 + FOCUSES + ["kwargs"])

    def hostile(self, kind: str, rate: float) -> bool:
        return kind == self.focus and self.rng.random() < rate

    def name(self, plain: list[str], kind: str, rate: float = 0.4) -> str:
        if self.hostile(kind, rate):
            return self.rng.choice(HOSTILE_NAMES) if self.rng.random() < 0.8 else self.draw(
                st.text(max_size=6))
        return self.draw(st.sampled_from(plain))

    def path(self) -> str:
        n = self.draw(st.integers(1, 2))
        return ".".join(self.name(PATH_PARTS, "path", 0.3) for _ in range(n))

    def pick(self, plain: list[str], hostile: list[str], kind: str, rate: float = 0.4) -> str:
        if self.hostile(kind, rate):
            return self.rng.choice(hostile)
        return self.draw(st.sampled_from(plain))

    def values(self, env: list[str], most: int) -> list[Any]:
        """Extra arguments: only where values are the focus (they would rarely fit the call)."""
        if self.focus != "args":
            return []
        return self.draw(st.lists(_values(env), max_size=most))


# ---------------------------------------------------------------- layers and their tensors


def _layer(d: _Draw, n: int) -> tuple[nn.Module, dict[str, Any]]:
    """A layer that keeps the feature size ``n`` (so some graphs run), and its description."""
    kind = d.draw(st.sampled_from(["Linear", "ReLU", "Tanh", "LayerNorm", "Identity", "Dropout",
                                   "BatchNorm1d", "Softmax"]))
    args: dict[str, Any] = {
        "Linear": {"in_features": n, "out_features": n, "bias": d.draw(st.booleans())},
        "ReLU": {"inplace": False}, "Tanh": {}, "Identity": {}, "Dropout": {"p": 0.5},
        "LayerNorm": {"normalized_shape": {"tuple": [n]}, "eps": 1e-5},
        "BatchNorm1d": {"num_features": n}, "Softmax": {"dim": -1},
    }[kind]
    module = getattr(nn, kind)(**{k: tuple(v["tuple"]) if isinstance(v, dict) else v
                                  for k, v in args.items()})
    if d.hostile("args", 0.3):  # a wrong or hostile argument
        args[d.draw(st.sampled_from(["in_features", "dim", "p", *HOSTILE_NAMES]))] = d.draw(
            _values([]))
    return module, {"type": f"{getattr(nn, kind).__module__}.{kind}", "args": args}


def _values(env: list[str]) -> st.SearchStrategy[Any]:
    """JSON values as descriptions encode them (node references when ``env`` has names)."""
    leaves: list[st.SearchStrategy[Any]] = [
        st.none(), st.booleans(), st.integers(-3, 8), st.floats(-2, 2, allow_nan=False),
        st.sampled_from(["x", "mean", _RUN, "float32"]),
        st.sampled_from([{"float": "nan"}, {"float": "inf"}, {"dtype": "float64"},
                         {"dtype": "save"}, {"device": "cpu"}, {"ellipsis": True},
                         {"slice": [None, 2, None]}, {"memory_format": "contiguous_format"},
                         {"unknown": 1}, {"node": "nowhere"}]),
    ]
    if env:
        leaves += [st.sampled_from(env).map(lambda n: {"node": n})] * 3
    leaf = st.one_of(*leaves)
    return st.recursive(leaf, lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(lambda xs: {"tuple": xs}),
        st.dictionaries(st.sampled_from(KWARG_KEYS + HOSTILE_NAMES[:6]), inner, max_size=2)
        .map(lambda d: {"dict": d})), max_leaves=6)


# ---------------------------------------------------------------- nodes

UNARY = ["torch.relu", "torch.tanh", "torch.sigmoid", "torch.nn.functional.gelu", "torch.neg"]
BINARY = ["torch.add", "torch.mul", "operator.add", "operator.mul", "operator.sub"]


def _op_node(d: _Draw, name: str, env: list[str], layers: list[str],
             attrs: list[str]) -> dict[str, Any]:
    op = d.draw(st.sampled_from(["call_function"] * 3 + ["call_method"] * 2
                                + ["call_module"] * 3 + ["get_attr"]))
    if d.focus != "path" and not {"call_module": layers, "get_attr": attrs}.get(op, True):
        op = "call_function"  # only paths the description holds, unless paths are the focus
    last = {"node": env[-1]}
    node: dict[str, Any] = {"op": op, "name": name}
    if op == "get_attr":
        node["target"] = d.path() if d.hostile("path", 0.5) or not attrs else d.draw(
            st.sampled_from(attrs))
        return node
    if op == "call_module":
        node["target"] = d.path() if d.hostile("path", 0.5) or not layers else d.draw(
            st.sampled_from(layers))
        args: list[Any] = [last]
    elif op == "call_method":
        node["target"] = d.pick(["relu", "tanh", "neg", "contiguous", *METHODS], HOSTILE_METHODS,
                                "call")
        args = [last, *d.values(env, 2)]
    else:
        node["target"] = target = d.pick(UNARY + BINARY + FUNCTIONS, HOSTILE_FUNCTIONS, "call")
        args = [last, *d.values(env, 2)]
        if target in BINARY and len(args) == 1:
            args.append({"node": d.draw(st.sampled_from(env))})
    node["args"] = {"tuple": args}
    if d.focus == "kwargs" or (op != "call_module" and d.draw(st.integers(0, 2)) == 0):
        keys = [d.pick(KWARG_KEYS, INJECTED_KEYS, "kwargs", 0.6)
                for _ in range(d.draw(st.integers(1, 2)))]
        hostile = [k for k in keys if k not in KWARG_KEYS]
        keys = hostile[:1] or keys  # one bad key alone: two would be a syntax error first
        node["kwargs"] = {"dict": {k: d.draw(_values(env)) for k in keys}}
    return node


@st.composite
def descriptions(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """One description, the tensors beside it and its feature size: half of them clean, the
    others hostile in one respect (names, inputs, paths, kwargs keys, call targets, values,
    tensors)."""
    d = _Draw(draw)
    n = draw(st.integers(1, 6))
    modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for _ in range(draw(st.integers(0, 3))):
        path = d.path()
        module, spec = _layer(d, n)
        modules[path] = spec
        tensors.update({f"{path}.{k}": v for k, v in module.state_dict().items()})
    attrs: dict[str, str] = {}
    if draw(st.integers(0, 3)) == 0:
        path = d.name(["scale", "w", "c0"], "path")
        attrs[path] = d.pick(["parameter", "buffer"], ["module", "tensor"], "tensors")
        tensors[path] = torch.rand(draw(st.sampled_from([(1,), (n,), (1, n), (2, 3)])))
    if tensors and d.hostile("tensors", 0.5):  # tensors that do not fit
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = draw(st.sampled_from([torch.zeros(0), tensors[key].reshape(-1)[:1]]))

    used: list[str] = []
    nodes = []
    for i in range(draw(st.integers(1, 2))):
        name = d.name([f"x{i}"], "node", 0.2)
        target = d.name([["x", "input"][i], ["y", "z"][i]], "input")
        nodes.append({"op": "placeholder", "name": name, "target": target})
        used.append(name)
    for i in range(draw(st.integers(0, 6))):
        name = d.name([f"n{i}", f"relu_{i}", f"add{i}"], "node", 0.2)
        nodes.append(_op_node(d, name, used, list(modules), list(attrs)))
        used.append(name)
    result: Any = {"node": used[-1]}
    if draw(st.integers(0, 5)) == 0:
        result = draw(st.sampled_from([{"tuple": [result, result]}, {"dict": {"out": result}},
                                       [result], "x"]))
    nodes.append({"op": "output", "name": "output", "args": {"tuple": [result]}})

    inputs = None
    if draw(st.integers(0, 5)):
        inputs = [{"shape": [draw(st.integers(1, 3)), n], "dtype": "float32", "high": None}
                  for _ in nodes if _["op"] == "placeholder"]
    desc: dict[str, Any] = {"format": "morphcli.architecture", "version": 1,
                            "class_name": d.name(["Net", "Model"], "class", 0.8),
                            "inputs": inputs,
                            "modules": modules, "attrs": attrs, "nodes": nodes}
    return desc, tensors, n


# ---------------------------------------------------------------- running


def _load_one(desc: dict, tensors: dict, n: int, folder: Path,
              counts: dict[str, float]) -> None:
    """Each description goes in through load (which traces shapes, often without running
    the model) and as 'morph check' runs it: without stored input shapes (the other model
    gives them), so the model runs untraced. Every eighth also through 'morph inspect'."""
    path, bare = folder / "fuzzed.pt", folder / "no_inputs.pt"
    for dest, inputs in ((path, desc["inputs"]), (bare, None)):
        torch.save({"format": "morphcli.archive", "tensors": tensors,
                    "architecture": json.dumps({**desc, "inputs": inputs})}, dest)
    placeholders = sum(node["op"] == "placeholder" for node in desc["nodes"])
    shapes = [(2, n)] * placeholders
    if isinstance(desc["inputs"], list) and len(desc["inputs"]) == placeholders:
        shapes = [tuple(spec["shape"]) for spec in desc["inputs"]]
    ways = [lambda: _check(bare, shapes), lambda: morphcli.load(path)]
    if zlib.crc32(json.dumps(desc).encode()) % 8 == 0:  # by content: a replay takes it too
        ways.append(lambda: _inspect(path))
        counts["cli"] += 1
    counts["inputs"] += 1
    for i, way in enumerate(ways):
        try:
            with deadline(PER_INPUT_SECONDS):
                way()
            counts["loaded" if i == 1 else "other_ok"] += 1
        except InputError:
            counts["refused" if i == 1 else "other_refused"] += 1
        except BaseException:
            counts["crashes"] += 1
            raise
        finally:
            assert not (folder / MARKER).exists(), "a name in the description ran code"


class _One(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Two(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x


def _check(path: Path, shapes: list[tuple[int, ...]]) -> None:
    """'morph check FUZZED PARTNER': the partner, a model that records its input shapes, gives
    them to a description that has none, which then runs untraced."""
    from morphcli.graph.inputs import InputSpec
    from morphcli.graph.trace import trace

    partner = trace([_One, _Two][len(shapes) - 1](), [InputSpec(s) for s in shapes])
    morphcli.check(path, partner, samples=2)


def _inspect(path: Path) -> None:
    code, _, stderr = invoke("inspect", path)
    assert code in (0, 2), (code, stderr)
    if code == 2:
        assert_one_error_line(stderr)


def _fuzz(examples: int, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(folder)  # where the hostile names' 'touch MARKER' would write
    counts: dict[str, float] = dict.fromkeys(
        ("inputs", "loaded", "refused", "cli", "other_ok", "other_refused", "crashes"), 0)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=descriptions())
    def run(case: tuple[dict, dict, int]) -> None:
        _load_one(*case, folder, counts)

    start = time.perf_counter()
    try:
        with torch.no_grad():
            run()
    finally:
        add_figures("description-fuzz", FIGURES, seconds=time.perf_counter() - start, **counts)
    assert counts["crashes"] == 0
    assert counts["loaded"] > 0 and counts["refused"] > 0  # the generator reaches both


@pytest.mark.filterwarnings("ignore")  # odd but valid graphs make torch warn; not our output
def test_description_fuzz(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = int(os.environ.get("MORPH_DESCRIPTION_FUZZ_EXAMPLES", DEFAULT_EXAMPLES))
    _fuzz(examples, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_description_fuzz_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = int(os.environ.get("MORPH_DESCRIPTION_FUZZ_EXAMPLES", SLOW_EXAMPLES))
    _fuzz(examples, tmp_path, monkeypatch)
