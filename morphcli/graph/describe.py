"""Architecture descriptions: a GraphModule as plain JSON data, and back, without pickled code.

A description lists the leaf layers (allowlisted type + constructor arguments), the tensors held
directly by the graph (``get_attr`` targets) and the graph's nodes. Tensors themselves travel
beside it (state_dict keys). Rebuilding validates every name against ``allowlist`` and every
tensor against the layer that holds it, so a tampered description fails with an InputError.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
from array import array
from collections.abc import Mapping
from itertools import accumulate
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from morphcli.errors import InputError
from morphcli.graph import allowlist, carried, names
from morphcli.graph.inputs import INPUTS_META, InputSpec

FORMAT = "morphcli.architecture"
VERSION = 1

_MAX_NODES = 1_000_000
# A description nests a few levels (a node's tuple of lists of values); json.loads recurses once
# per level and the interpreter gives up near 1000, so deeper documents are refused unparsed.
MAX_JSON_DEPTH = 64
MAX_JSON_BYTES = 256 * 2**20  # a million nodes take ~150 MiB

# Constructor arguments that are not plain attributes of the same name.
_ARG_READERS: dict[str, Any] = {
    "bias": lambda m: _bias_flag(m),
    "add_bias_kv": lambda m: getattr(m, "bias_k", None) is not None,
}
_SKIPPED_ARGS = {"self", "device", "dtype", "_weight", "_freeze"}


class DescribeError(InputError):
    """The model uses something a description cannot hold safely."""


def _bias_flag(m: nn.Module) -> Any:
    if hasattr(m, "in_proj_bias"):  # MultiheadAttention
        return m.in_proj_bias is not None
    b = getattr(m, "bias", None)
    return b if isinstance(b, bool) else b is not None


# ---------------------------------------------------------------- describing


def describe(gm: fx.GraphModule) -> dict[str, Any]:
    """The JSON-ready description of ``gm`` (without tensor data)."""
    modules: dict[str, Any] = {}
    attrs: dict[str, str] = {}
    nodes = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in modules:
            modules[node.target] = _describe_module(node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            attrs[node.target] = _attr_kind(gm, node.target)
        nodes.append(_describe_node(node))
    for path, m in carried.carried(gm).items():  # layers the graph does not use: kept as well
        modules.setdefault(path, _describe_module(path, m))
    specs = gm.meta.get(INPUTS_META)
    return {
        "format": FORMAT,
        "version": VERSION,
        "class_name": type(gm).__name__,
        "inputs": [s.to_json() for s in specs] if specs else None,
        "modules": modules,
        "attrs": attrs,
        "nodes": nodes,
    }


def state_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the description needs: the state_dict plus plain tensor constants."""
    tensors = dict(gm.state_dict())
    tensors.update(carried.carried_state(gm))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in tensors:
            value = _get_path(gm, node.target)
            if isinstance(value, torch.Tensor):
                tensors[node.target] = value
    return tensors


def _describe_module(path: str, m: nn.Module) -> dict[str, Any]:
    name = allowlist.module_type_name(m)
    if name not in allowlist.module_types():
        raise DescribeError(
            f"layer {path!r} is a {type(m).__qualname__} ({name}), which morphcli cannot store "
            "without pickled code; only torch.nn layers and morphcli's own are stored"
        )
    args: dict[str, Any] = {}
    for arg, p in inspect.signature(type(m).__init__).parameters.items():
        if arg in _SKIPPED_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if arg in _ARG_READERS:
            value = _ARG_READERS[arg](m)
        elif hasattr(m, arg):
            value = getattr(m, arg)
        elif p.default is not p.empty:
            continue
        else:
            raise DescribeError(
                f"layer {path!r} ({name}): cannot read constructor argument {arg!r}")
        if isinstance(value, (torch.Tensor, nn.Module)):
            continue  # tensors travel in the state_dict; submodules are rebuilt by the layer
        args[arg] = _encode(value, where=f"layer {path!r} argument {arg!r}")
    return {"type": name, "args": args}


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def check_layer(path: str, m: nn.Module) -> None:
    """Raise InputError unless ``m`` is the layer its own constructor arguments build: the same
    public attributes, and parameters and buffers of the same names and shapes.

    An unpickled layer holds whatever its file said (a damaged file can drop ``in_features``
    or disagree with its weight's shape), and tracing, rules and writers all read these.
    Layers of classes outside the allowlist (user code, loaded with --trust) are not checked.
    """
    type_name = allowlist.module_type_name(m)
    if (type_name not in allowlist.module_types()
            or isinstance(m, _CONTAINERS) or not _checkable(type_name)):
        return
    what = f"layer {path!r} ({type(m).__name__})"
    ref = _build_module(path, _describe_module(path, m))
    state = vars(m)
    missing = [k for k in vars(ref) if not k.startswith("_") and k not in state]
    if missing:
        raise InputError(f"{what} lacks {', '.join(missing)}")
    for table in ("_parameters", "_buffers"):
        mine, needed = state[table], vars(ref)[table]
        for k in sorted({*mine, *needed}):
            a, b = mine.get(k), needed.get(k)
            if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
                raise InputError(f"{what}: tensor {k!r} is {_shape_text(a)} but the layer's "
                                 f"settings need {_shape_text(b)}")


@functools.cache
def _checkable(type_name: str) -> bool:
    """Whether healthy layers of the allowlisted class ``type_name`` describe and rebuild,
    tried once on a small one (built on the meta device, 2 for every required argument).
    Classes a description cannot hold (LSTM, TransformerEncoderLayer) are not checked, rather
    than refused. (Keyed by name: mypy takes torch's classes for unhashable.)"""
    cls = allowlist.module_types()[type_name]
    required = [p for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.default is p.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    try:
        with torch.device("meta"):
            sample = cls(*[2] * len(required))
        _build_module("sample", _describe_module("sample", sample))
    except Exception:
        return False
    return cls is not nn.Module


def _shape_text(t: torch.Tensor | None) -> str:
    return "absent" if t is None else str(tuple(t.shape))


def _attr_kind(gm: fx.GraphModule, target: str) -> str:
    value = _get_path(gm, target)
    if isinstance(value, nn.Parameter):
        return "parameter"
    if isinstance(value, torch.Tensor):
        return "buffer"
    raise DescribeError(f"graph attribute {target!r} is a {type(value).__name__}, not a tensor")


def _describe_node(node: fx.Node) -> dict[str, Any]:
    where = f"node {node.name!r}"
    d: dict[str, Any] = {"op": node.op, "name": node.name}
    if node.op == "call_function":
        name = allowlist.function_names().get(id(node.target)) or allowlist.library_name(
            node.target)
        if name is None:
            fn = getattr(node.target, "__qualname__", repr(node.target))
            raise DescribeError(
                f"{where} calls {getattr(node.target, '__module__', '?')}.{fn}, which morphcli "
                "cannot store safely"
            )
        problem = allowlist.factory_problem(node.target, dict(node.kwargs))
        if problem:
            raise DescribeError(f"{where} calls {problem}, which morphcli cannot store safely")
        d["target"] = name
    elif node.op != "output":
        d["target"] = str(node.target)
    if node.op not in ("placeholder", "get_attr"):
        d["args"] = _encode(tuple(node.args), where)
        d["kwargs"] = _encode(dict(node.kwargs), where)
    return d


def _encode(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, tuple):
        return {"tuple": [_encode(x, where) for x in v]}
    if isinstance(v, list):
        return [_encode(x, where) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise DescribeError(f"{where}: dictionary keys must be strings")
        return {"dict": {k: _encode(x, where) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [_encode(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).removeprefix("torch.")}
    raise DescribeError(f"{where}: cannot store a value of type {type(v).__name__}")


# ---------------------------------------------------------------- reading JSON


def parse_description(text: str | bytes, source: str, what: str = "architecture description"
                      ) -> Any:
    """``json.loads`` for JSON from a file, bounded in size and nesting depth: every reader of a
    description or header goes through it, so a deeply nested document is an InputError, not
    a RecursionError. ``source`` and ``what`` start the message.

    >>> parse_description('{"format": "morphcli.architecture"}', "model.pt")
    {'format': 'morphcli.architecture'}
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise InputError(f"{source}: damaged {what} (a {type(text).__name__}, not text)")
    if not isinstance(text, str):  # json.loads would guess UTF-16 or -32 too; the scan is UTF-8
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{source}: damaged {what} (not UTF-8 text: {e.reason} at byte "
                             f"{e.start})") from e
    if len(text) > MAX_JSON_BYTES:
        raise InputError(f"{source}: {what} is {len(text):,} bytes, more than the "
                         f"{MAX_JSON_BYTES:,} morph reads; the file is damaged or not morph's")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise InputError(f"{source}: damaged {what}: it nests {depth} levels deep, more than "
                         f"the {MAX_JSON_DEPTH} morph reads")
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError, bad UTF-8, an integer of over 4300 digits
        raise InputError(f"{source}: damaged {what} (not JSON: {_first_line(e)})") from e


_ESCAPE = re.compile(rb"\\.", re.DOTALL)
_STRING = re.compile(rb'"[^"]*"')
_NOT_STRUCTURE = bytes(c for c in range(256) if c not in b'"[]{}')
_SIGNS = bytes.maketrans(b"[]{}", b"\x01\xff\x01\xff")  # +1 / -1 as signed bytes


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of brackets in ``text`` (str, or UTF-8 bytes) outside string
    literals, without parsing (C-speed byte operations, about a quarter of json.loads' time).
    For invalid JSON it is at least the depth json.loads reaches before it finds the error."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\" in raw:
        raw = _ESCAPE.sub(b"", raw)  # escapes first: \" does not end a string
    raw = _STRING.sub(b"", raw.translate(None, _NOT_STRUCTURE)).replace(b'"', b"")
    return max(accumulate(array("b", raw.translate(_SIGNS))), default=0)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:200]


def _one_line(e: BaseException) -> str:
    """An exception's message on one line: torch's messages quote names from the file as they
    are, newlines included, and the CLI prints exactly one line."""
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------- rebuilding


def rebuild(desc: Any, tensors: Mapping[str, torch.Tensor], source: str | None = None
            ) -> fx.GraphModule:
    """Build a runnable GraphModule from a description and its tensors, validating both.
    ``source`` (the file) starts every error message."""
    where = f"{source}: " if source else ""
    try:
        return _rebuild(desc, tensors)
    except InputError as e:
        if not where:
            raise
        raise InputError(f"{where}{e}") from e
    except Exception as e:  # a malformed description can fail anywhere; report it as bad input
        raise InputError(f"{where}invalid architecture description: {type(e).__name__}: "
                         f"{_one_line(e)}") from e


def _rebuild(desc: Any, tensors: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    if not isinstance(desc, dict) or desc.get("format") != FORMAT:
        raise InputError("not a morphcli architecture description")
    if desc.get("version") != VERSION:
        raise InputError(
            f"architecture description version {desc.get('version')!r} is not supported "
            f"(this morphcli reads version {VERSION})"
        )
    root = nn.Module()
    for path, spec in _mapping(desc, "modules").items():
        _set_path(root, _checked_path(path), _build_module(path, spec))
    for path, kind in _mapping(desc, "attrs").items():
        if path not in tensors:
            raise InputError(f"tensor {path!r} is missing from the file")
        t = tensors[path]
        value = nn.Parameter(t, requires_grad=t.is_floating_point()) if kind == "parameter" else t
        _set_path(root, _checked_path(path, "tensor path"), value, buffer=kind != "parameter")
    _load_tensors(root, tensors)
    graph = _build_graph(desc.get("nodes"), root)
    name = desc.get("class_name")  # only a label (the class's __name__): a bad one is replaced
    label = name if isinstance(name, str) and names.identifier_problem(name) is None else "Model"
    gm = fx.GraphModule(root, graph, class_name=label)
    gm.eval()
    called = {str(n.target) for n in graph.nodes if n.op == "call_module"}
    unused = {p: root.get_submodule(p) for p in desc["modules"] if p not in called}
    if unused:
        gm.meta[carried.CARRIED_META] = unused
    if desc.get("inputs"):
        gm.meta[INPUTS_META] = tuple(InputSpec.from_json(s) for s in desc["inputs"])
    return gm


def _mapping(desc: dict, key: str) -> dict:
    value = desc.get(key)
    if not isinstance(value, dict):
        raise InputError(f"architecture description: {key!r} must be a mapping")
    return value


def _checked_path(path: Any, what: str = "layer path") -> str:
    problem = names.path_problem(path)
    if problem:
        raise InputError(f"architecture description: bad {what} {path!r:.80}: {problem}")
    return path


def _build_module(path: str, spec: Any) -> nn.Module:
    if not isinstance(spec, dict):
        raise InputError(f"architecture description: layer {path!r} is malformed")
    type_name = spec.get("type")
    cls = allowlist.module_types().get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise InputError(
            f"layer {path!r} has type {spec.get('type')!r}, which is not an allowlisted layer type"
        )
    args = _decode({"dict": spec.get("args", {})}, {})
    if not isinstance(args, dict):
        raise InputError(f"layer {path!r}: arguments must be a mapping")
    for key in args:
        problem = names.identifier_problem(key)
        if problem:
            raise InputError(f"layer {path!r} ({spec['type']}): bad argument name {key!r:.80}: "
                             f"{problem}")
    try:
        # Built on the meta device: no memory or time is spent on sizes the file claims, and
        # the real tensors are assigned afterwards (checked against these shapes).
        with torch.device("meta"):
            return cls(**args)
    except Exception as e:
        raise InputError(f"layer {path!r} ({spec['type']}): bad arguments {args}: "
                         f"{_one_line(e)}") from e


def _load_tensors(root: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    expected = root.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise InputError(
            "tensors do not match the architecture: "
            + "; ".join(
                f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected))
                if keys
            )
        )
    for key, ref in expected.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise InputError(
                f"tensor {key!r} has shape {tuple(t.shape)} but the layer needs {tuple(ref.shape)}"
            )
    root.load_state_dict(dict(tensors), strict=True, assign=True)
    for name, t in [*root.named_parameters(), *root.named_buffers()]:
        if t.is_meta:
            raise InputError(f"tensor {name!r} is missing from the file")


def _build_graph(nodes: Any, root: nn.Module) -> fx.Graph:
    if not isinstance(nodes, list) or not nodes or len(nodes) > _MAX_NODES:
        raise InputError("architecture description: 'nodes' must be a non-empty list")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    functions = allowlist.functions()
    methods = allowlist.tensor_methods()
    outputs = placeholders = 0
    inputs: set[str] = set()
    for d in nodes:
        if not isinstance(d, dict):
            raise InputError("architecture description: malformed node")
        op, name, target = d.get("op"), d.get("name"), d.get("target")
        problem = "is used twice" if name in env else names.node_name_problem(name)
        if problem or not isinstance(name, str):  # (node_name_problem refuses non-strings)
            raise InputError(
                f"architecture description: bad or repeated node name {name!r:.80}: {problem}")
        args = _decode(d.get("args", {"tuple": []}), env)
        kwargs = _decode(d.get("kwargs", {"dict": {}}), env)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise InputError(f"node {name!r}: malformed arguments")
        _check_kwargs(name, kwargs)
        if op == "placeholder":
            if len(env) > placeholders:
                raise InputError(f"node {name!r}: inputs (placeholders) must come first")
            node = graph.placeholder(_checked_input(target, name, inputs))
            placeholders += 1
        elif op == "get_attr":
            _require_tensor(root, target, name)
            node = graph.get_attr(_checked_path(target, "tensor path"))
        elif op == "call_module":
            _require_module(root, target, name)
            node = graph.call_module(_checked_path(target), args, kwargs)
        elif op == "call_function":
            fn = (functions.get(target) if isinstance(target, str) else None
                  ) or allowlist.library_function(target)
            if fn is None:
                raise InputError(f"node {name!r} calls {target!r}, which is not allowlisted")
            if target == "builtins.getattr" and (
                len(args) != 2 or args[1] not in allowlist.SAFE_ATTRS
            ):
                raise InputError(f"node {name!r} reads an attribute that is not allowlisted")
            problem = allowlist.factory_problem(fn, kwargs)
            if problem:
                raise InputError(f"node {name!r} calls {problem}, which is not allowlisted")
            node = graph.call_function(fn, args, kwargs)
        elif op == "call_method":
            if target not in methods or names.identifier_problem(target):
                raise InputError(f"node {name!r} calls method {target!r}, which is not allowlisted")
            node = graph.call_method(target, args, kwargs)
        elif op == "output":
            if len(args) != 1:
                raise InputError("architecture description: output node takes one argument")
            node = graph.output(args[0])
            outputs += 1
        else:
            raise InputError(f"node {name!r} has unknown op {op!r}")
        env[name] = node
    if outputs != 1 or nodes[-1].get("op") != "output":
        raise InputError("architecture description: the graph must end in one output node")
    graph.lint()
    return graph


def _checked_input(target: Any, node: str, seen: set[str]) -> str:
    """A placeholder's target is pasted into ``def forward(self, ...)`` as it is."""
    problem = "is used twice" if target in seen else names.input_problem(target)
    if problem:
        raise InputError(f"node {node!r}: bad input name {target!r:.80}: {problem}")
    seen.add(target)
    return target


def _check_kwargs(node: str, kwargs: dict[str, Any]) -> None:
    """fx writes each key into the call as ``key = value``, unquoted."""
    for key in kwargs:
        problem = names.identifier_problem(key)
        if problem:
            raise InputError(f"node {node!r}: bad keyword argument name {key!r:.80}: {problem}")


def _require_module(root: nn.Module, path: Any, node: str) -> None:
    try:
        root.get_submodule(path)
    except (AttributeError, TypeError):
        raise InputError(f"node {node!r} calls layer {path!r:.80}, which is not described"
                         ) from None


def _require_tensor(root: nn.Module, path: Any, node: str) -> None:
    """``path`` must name a parameter or buffer the description registered: not an attribute
    reached through one (``fc.weight.T``, ``fc.__class__``)."""
    value = None
    if isinstance(path, str):
        parent, _, leaf = path.rpartition(".")
        try:
            owner = root.get_submodule(parent)
        except AttributeError:
            owner = None
        if owner is not None:
            value = owner._parameters.get(leaf, owner._buffers.get(leaf))
    if not isinstance(value, torch.Tensor):
        raise InputError(f"node {node!r} reads tensor {path!r:.80}, which is not described")


def _decode(v: Any, env: Mapping[str, fx.Node]) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_decode(x, env) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise InputError(f"architecture description: malformed value {v!r:.80}")
    (tag, x), = v.items()
    if tag == "node":
        if x not in env:
            raise InputError(f"architecture description: node {x!r} used before it is defined")
        return env[x]
    if tag == "tuple":
        return tuple(_decode(y, env) for y in _list(x))
    if tag == "dict":
        if not isinstance(x, dict):
            raise InputError("architecture description: malformed mapping")
        return {str(k): _decode(y, env) for k, y in x.items()}
    if tag == "slice":
        return slice(*(_decode(y, env) for y in _list(x, 3)))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "dtype" and isinstance(getattr(torch, str(x), None), torch.dtype):
        return getattr(torch, x)
    if tag == "device" and isinstance(x, str):
        return torch.device(x)
    if tag == "memory_format" and isinstance(getattr(torch, str(x), None), torch.memory_format):
        return getattr(torch, x)
    raise InputError(f"architecture description: unknown value tag {tag!r}")


def _list(x: Any, length: int | None = None) -> list:
    if not isinstance(x, list) or (length is not None and len(x) != length):
        raise InputError("architecture description: malformed list")
    return x


# ---------------------------------------------------------------- paths


def _get_path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: nn.Module, path: str, value: Any, buffer: bool = False) -> None:
    *parents, leaf = path.split(".")
    owner = root
    for part in parents:
        child = owner._modules.get(part)
        if child is None:
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Module):
        owner.add_module(leaf, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    elif buffer:
        owner.register_buffer(leaf, value)
