"""Read ``.pt2`` archives (``torch.export.save``) without running code from the file.

``torch.export.load`` unpickles the archive's sample inputs (falling back to a full unpickle
when the weights-only one fails), weights and constants marked ``use_pickle``, and custom or
opaque objects; the program JSON it then deserializes is evaluated too (sympy's ``sympify``
runs ``eval`` on every symbolic expression, fx generates and executes Python code from node
names, pytree imports the modules a tree spec names). This reader:

- reads the zip with :mod:`zipfile` and builds every weight and constant from its raw bytes
  (dtype, sizes, strides and offset from the JSON configs; always on the CPU); anything stored
  as a pickle is refused (``--trust`` falls back to ``torch.export.load``);
- never reads the sample inputs (running a program does not need them);
- checks the program JSON before torch's deserializer
  (``torch._export.serde.serialize.ExportedProgramDeserializer``, which only calls
  ``torch.load`` on bytes; it gets dicts of tensors and no sample inputs here) sees it: every
  name is a plain dotted name, every symbolic expression uses only sympy's arithmetic
  constructors, tree specs name only tuples, lists and dicts, node metadata and guard code
  are dropped; after it, every operator of the graph must be an ATen/prims operator, an
  allowlisted higher-order operator or a symbolic-shape builtin.
"""

from __future__ import annotations

import io
import json
import keyword
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from morphcli.errors import InputError, UnsafeCheckpointError
from morphcli.graph.describe import parse_description

WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"
EXTRA_DIR = "extra/"
_TENSOR_CONSTANT_PREFIX = "tensor_"

# A weight or constant larger than this is not read (a config can claim any size).
MAX_TENSOR_BYTES = 1 << 36
# Deflated members may expand; torch.export.save stores them uncompressed.
_MAX_EXPANSION = 64
_MAX_EXPR_CHARS = 10_000

# Dotted names; '-' too, since torch allows it in module names (RegNet's 'block1-0') and fx
# writes such parts as getattr(self, "block1-0"). No quote, space or bracket: nothing to call.
_NAME = re.compile(r"[\w.-]*", re.ASCII)
_EXPR_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d{1,24}(?:\.\d*)?(?:[eE][-+]?\d{1,4})?)|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<str>'[\w.+\-]{0,64}')|(?P<op>\*\*|//|<=|>=|==|!=|[(),=+\-*/%<>&|~]))",
    re.ASCII,
)
# sympy constructors that srepr() writes for shape expressions, torch's own sympy functions
# (the deserializer's table) and the assumption keywords of Symbol/Float.
_EXPR_NAMES = frozenset("""
    Symbol Dummy Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling sign
    Eq Ne Lt Le Gt Ge StrictLessThan StrictGreaterThan LessThan GreaterThan Equality
    Unequality And Or Not Xor Piecewise ExprCondPair true false BooleanTrue BooleanFalse
    oo zoo nan Infinity NegativeInfinity NaN ComplexInfinity One Zero NegativeOne Half
    True False None
    FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt FloorToInt CeilDiv LShift
    RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv IsNonOverlappingAndDenseIndicator
    TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity
    integer positive negative nonnegative nonpositive real finite infinite zero nonzero
    commutative even odd rational extended_real precision evaluate
""".split())
# Bare symbol names (older torch wrote str(expr), not srepr): torch's prefixes and a number;
# no builtin or sympy function is named like that.
_SYMBOL = re.compile(r"(?:s|u|zf|zuf|ps|tmp|idx|i|x|y|z|q|c|d|h)\d+", re.ASCII)
_FLOAT_WORDS = frozenset({"Infinity", "-Infinity", "NaN"})
_TREE_TYPES = frozenset({"builtins.tuple", "builtins.list", "builtins.dict",
                         "collections.OrderedDict"})
_OP_NAMESPACES = frozenset({"aten", "prims"})
_DENIED_OPS = frozenset({"aten::from_file", "aten::save", "aten::_print"})  # files, stdout
_HIGHER_ORDER_OPS = frozenset({
    "cond", "while_loop", "map_impl", "scan", "associative_scan", "invoke_subgraph",
    "wrap_with_set_grad_enabled", "wrap_with_autocast", "auto_functionalized",
    "auto_functionalized_v2", "with_effects",
})


@dataclass
class Pt2Archive:
    """The parts of a ``.pt2`` read so far: tensors by name, extra files, the program JSON."""

    source: str
    weights: dict[str, torch.Tensor]
    constants: dict[str, torch.Tensor]
    extra: dict[str, str]
    program_json: bytes = field(repr=False)

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.weights, **self.constants}


def read_archive(source: str, data: Path | io.BytesIO) -> Pt2Archive:
    """Open a ``.pt2`` without unpickling anything.

    >>> archive = read_archive("m.pt2", Path("m.pt2"))  # doctest: +SKIP
    >>> sorted(archive.weights)[:1]  # doctest: +SKIP
    ['conv1.bias']
    """
    try:
        with zipfile.ZipFile(data) as z:
            return _Reader(source, z, _archive_size(data)).read()
    except InputError:
        raise
    except Exception as e:  # a damaged zip or config: one clear line, never a traceback
        raise InputError(f"{source}: cannot read as a torch.export program: {_reason(e)}") from e


def load_program(archive: Pt2Archive) -> torch.export.ExportedProgram:
    """Build the ExportedProgram from the checked program JSON and the archive's tensors."""
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    source = archive.source
    try:
        raw = json.loads(archive.program_json)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        _check_json(source, raw, PROGRAM)
    except InputError:
        raise
    except Exception as e:  # bad JSON, or nested deeper than Python recurses
        raise InputError(f"{source}: damaged program in {PROGRAM}: {_reason(e)}") from e
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, raw)
        program = ExportedProgramDeserializer().deserialize(
            serialized, dict(archive.weights), dict(archive.constants), None)
    except Exception as e:
        raise InputError(f"{source}: cannot read as a torch.export program: {_reason(e)}") from e
    program._guards_code = []  # input checks as Python source: never taken from the file
    _check_graph(source, program)
    _check_input_names(source, program)
    return program


def load_program_trusted(data: Path | io.BytesIO, extra: dict[str, str] | None = None
                         ) -> torch.export.ExportedProgram:
    """``--trust``: torch's own loader, which unpickles what the archive holds."""
    if isinstance(data, io.BytesIO):
        data.seek(0)
    return torch.export.load(data if isinstance(data, io.BytesIO) else str(data),
                             extra_files=extra)


# ---------------------------------------------------------------- the zip


def _archive_size(data: Path | io.BytesIO) -> int:
    return len(data.getbuffer()) if isinstance(data, io.BytesIO) else data.stat().st_size


class _Reader:
    def __init__(self, source: str, z: zipfile.ZipFile, size: int) -> None:
        self.source = source
        infos = z.infolist()
        if not infos:
            raise InputError(f"{source}: empty zip archive, not a torch.export program")
        # torch writes every record under one top-level folder (its name is free)
        prefix = infos[0].filename.split("/", 1)[0] + "/"
        self.members = {i.filename[len(prefix):]: i for i in infos
                        if i.filename.startswith(prefix)}
        self.zip = z
        self.size = size
        self.expanded = 0

    def read(self) -> Pt2Archive:
        self._check_format()
        weights = self._tensors(WEIGHTS_CONFIG, "data/weights/", constants=False)
        constants = self._tensors(CONSTANTS_CONFIG, "data/constants/", constants=True)
        extra = {name[len(EXTRA_DIR):]: self._bytes(name).decode("utf-8")
                 for name in self.members if name.startswith(EXTRA_DIR) and name != EXTRA_DIR}
        return Pt2Archive(self.source, weights, constants, extra, self._bytes(PROGRAM))

    def _check_format(self) -> None:
        source = self.source
        if "archive_version" not in self.members:
            if "serialized_exported_program.json" in {n.rsplit("/", 1)[-1]
                                                     for n in self.zip.namelist()}:
                raise UnsafeCheckpointError(
                    f"{source}: a .pt2 in torch's old format (before torch 2.6), whose "
                    "weights are pickled; loading it runs code from the file: pass --trust "
                    "if you trust its origin, or save it again with a current torch")
            raise InputError(f"{source}: not a torch.export program (no archive_version "
                             "record); save it with torch.export.save")
        version = self._bytes("archive_version").decode("utf-8", "replace").strip()
        if version != "0":
            raise InputError(f"{source}: .pt2 archive version {version[:20]!r} is not "
                             "supported (expected 0); save it again with this torch")
        for legacy in ("data/weights/model.pt", "data/constants/model.pt"):
            if legacy in self.members:
                raise self._pickled(legacy, "weights in torch's legacy pickled format")
        if PROGRAM not in self.members:
            models = sorted(n for n in self.members if n.startswith("models/"))
            what = f"only {', '.join(models)[:200]}" if models else "none"
            raise InputError(f"{source}: no program {PROGRAM} in the .pt2 ({what}); "
                             "morph reads the program torch.export.save writes as 'model'")

    def _bytes(self, name: str) -> bytes:
        info = self.members.get(name)
        if info is None:
            raise InputError(f"{self.source}: member {name!r} is missing from the .pt2")
        self._account(info)
        with self.zip.open(info) as f:
            return f.read()

    def _account(self, info: zipfile.ZipInfo) -> None:
        """Refuse members whose claimed sizes exceed what the file can hold (zip bombs)."""
        self.expanded += info.file_size
        if self.expanded > _MAX_EXPANSION * self.size + (64 << 20):
            raise InputError(f"{self.source}: the .pt2's members claim "
                             f"{self.expanded} bytes, far more than the file's {self.size}: "
                             "damaged or a zip bomb")

    def _tensors(self, config_name: str, folder: str, *, constants: bool
                 ) -> dict[str, torch.Tensor]:
        config = parse_description(self._bytes(config_name), self.source, config_name)
        entries = config.get("config") if isinstance(config, dict) else None
        if not isinstance(entries, dict):
            raise InputError(f"{self.source}: damaged {config_name}: no 'config' object")
        storages: dict[str, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for fqn, meta in entries.items():
            if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
                raise InputError(f"{self.source}: damaged {config_name}: entry {fqn!r}")
            path = meta["path_name"]
            member = folder + path
            if constants and not path.startswith(_TENSOR_CONSTANT_PREFIX):
                raise self._pickled(member, f"constant {fqn!r} is a custom or opaque object")
            if meta.get("use_pickle"):
                raise self._pickled(member, f"{fqn!r} is a tensor subclass stored as a pickle")
            out[fqn] = self._tensor(fqn, member, meta, storages)
        return out

    def _pickled(self, member: str, what: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.source}: member {member!r} of the .pt2 is a pickle ({what}); loading it "
            "would run code from the file. Pass --trust to load it with torch.export.load "
            "if you trust the file's origin")

    def _tensor(self, fqn: str, member: str, meta: dict[str, Any],
                storages: dict[str, torch.Tensor]) -> torch.Tensor:
        from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

        where = f"{self.source}: tensor {fqn!r} ({member})"
        tm = meta.get("tensor_meta")
        if not isinstance(tm, dict):
            raise InputError(f"{where}: no tensor_meta")
        dtype = _SERIALIZE_TO_TORCH_DTYPE.get(tm.get("dtype"))
        if dtype is None:
            raise InputError(f"{where}: unknown dtype code {tm.get('dtype')!r}")
        if tm.get("layout", 7) != 7:
            raise InputError(f"{where}: only strided (dense) tensors are supported")
        sizes = _ints(where, "sizes", tm.get("sizes"))
        strides = _ints(where, "strides", tm.get("strides"))
        offset = _ints(where, "storage_offset", [tm.get("storage_offset")])[0]
        if len(sizes) != len(strides):
            raise InputError(f"{where}: {len(sizes)} sizes but {len(strides)} strides")
        base = storages.get(member)
        if base is None:
            base = storages[member] = self._storage(where, member, dtype)
        if base.dtype != dtype:
            raise InputError(f"{where}: dtype {dtype} differs from another view of {member}")
        spans = ((n - 1) * s for n, s in zip(sizes, strides, strict=True))
        needed = 0 if 0 in sizes else offset + 1 + sum(spans)
        if needed > base.numel():
            raise InputError(f"{where}: sizes {list(sizes)}, strides {list(strides)} and offset "
                             f"{offset} need {needed} elements; the member holds {base.numel()}")
        tensor = torch.as_strided(base, sizes, strides, offset)
        if meta.get("is_param"):
            return torch.nn.Parameter(tensor, requires_grad=bool(tm.get("requires_grad")))
        return tensor

    def _storage(self, where: str, member: str, dtype: torch.dtype) -> torch.Tensor:
        info = self.members.get(member)
        if info is None:
            raise InputError(f"{where}: member {member!r} is missing from the .pt2")
        item = torch.empty((), dtype=dtype).element_size()
        if info.file_size % item or info.file_size > MAX_TENSOR_BYTES:
            raise InputError(f"{where}: {info.file_size} bytes is not a whole number of "
                             f"{dtype} elements (or too large)")
        self._account(info)
        raw = torch.empty(info.file_size, dtype=torch.uint8)
        with self.zip.open(info) as f:
            got = f.readinto(raw.numpy())  # type: ignore[attr-defined]
        if got != info.file_size:
            raise InputError(f"{where}: member is truncated ({got} of {info.file_size} bytes)")
        return raw.view(dtype) if info.file_size else torch.empty(0, dtype=dtype)


def _ints(where: str, what: str, values: Any) -> list[int]:
    """Sizes are ``[{"as_int": n}, ...]``; a symbolic one cannot describe stored bytes."""
    if not isinstance(values, list):
        raise InputError(f"{where}: damaged {what}")
    out = []
    for v in values:
        n = v.get("as_int") if isinstance(v, dict) else None
        if type(n) is not int or not 0 <= n < 1 << 62:
            raise InputError(f"{where}: {what} must be non-negative integers, not {v!r:.60}")
        out.append(n)
    return out


# ---------------------------------------------------------------- the program JSON


def _check_json(source: str, obj: Any, where: str) -> None:
    """Drop node metadata and guard code; refuse any string that would reach generated code
    or an evaluator unless it is a plain dotted name."""
    if isinstance(obj, dict):
        for key in list(obj):
            if not isinstance(key, str) or not _NAME.fullmatch(key):
                raise _bad(source, where, f"key {key!r:.80}")
            value = obj[key]
            if key == "metadata":
                obj[key] = {}  # stack traces, module paths: diagnostics only
            elif key == "guards_code":
                obj[key] = []  # Python source torch would exec when unlifting
            elif key == "expr_str":
                _check_expr(source, value, where)
            elif key in ("as_string", "as_strings", "torch_version"):
                continue  # operator arguments (fx writes them with repr()), a version label
            elif key in ("in_spec", "out_spec"):
                _check_treespec(source, value, f"{where} {key}")
            elif key in ("as_float", "as_floats"):
                _check_floats(source, value, where)
            else:
                _check_json(source, value, where)
    elif isinstance(obj, list):
        for item in obj:
            _check_json(source, item, where)
    elif isinstance(obj, str) and not _NAME.fullmatch(obj):
        raise _bad(source, where, f"name {obj!r:.80}")


_NOT_A_NAME = "is not a plain name (fx would write it into the Python code it runs)"
_NOT_ARITHMETIC = "is more than shape arithmetic (sympy evaluates it as Python code)"
_NOT_A_TREE = "is not made of tuples, lists and dicts (pytree would import what it names)"


def _check_floats(source: str, value: Any, where: str) -> None:
    """Non-finite floats are written as the strings "Infinity", "-Infinity" and "NaN"."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str) and item not in _FLOAT_WORDS:
            raise _bad(source, where, f"float {item!r:.80}")
        if not isinstance(item, (str, int, float)) or isinstance(item, bool):
            raise _bad(source, where, f"float {item!r:.80}")


def _bad(source: str, where: str, what: str, why: str = _NOT_A_NAME) -> InputError:
    return InputError(f"{source}: {where} holds {what}, which {why}; refused. Pass --trust "
                      "to load the file with torch.export.load if you trust its origin")


def _check_expr(source: str, expr: Any, where: str) -> None:
    """sympy.sympify() evals the string: allow only its own constructors, literals and
    arithmetic (no attribute access, no builtins, no strings beyond symbol names)."""
    if not isinstance(expr, str) or len(expr) > _MAX_EXPR_CHARS:
        raise _bad(source, where, "a symbolic expression too long or not a string",
                   _NOT_ARITHMETIC)
    pos = 0
    while pos < len(expr.rstrip()):
        m = _EXPR_TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            raise _bad(source, where, f"symbolic expression {expr[:80]!r}", _NOT_ARITHMETIC)
        name = m.group("name")
        if name is not None and name not in _EXPR_NAMES and not _SYMBOL.fullmatch(name):
            raise _bad(source, where, f"symbolic expression {expr[:80]!r} (name {name!r})",
                       _NOT_ARITHMETIC)
        pos = m.end()


def _check_treespec(source: str, spec: Any, where: str) -> None:
    """pytree imports the modules an enum or defaultdict context names: allow leaves, tuples,
    lists and dicts with plain keys only."""
    try:
        protocol, node = json.loads(spec)
    except (TypeError, ValueError, RecursionError) as e:
        raise _bad(source, where, "a damaged tree spec", _NOT_A_TREE) from e
    if protocol != 1:
        raise _bad(source, where, f"a tree spec of protocol {protocol!r:.20}", _NOT_A_TREE)
    stack = [node]
    while stack:
        node = stack.pop()
        if not isinstance(node, dict) or not isinstance(node.get("children_spec"), list):
            raise _bad(source, where, "a damaged tree spec", _NOT_A_TREE)
        kind, context = node.get("type"), node.get("context")
        if kind is None:
            if context is not None or node["children_spec"]:
                raise _bad(source, where, "a damaged tree spec", _NOT_A_TREE)
            continue
        if kind not in _TREE_TYPES or not isinstance(context, str):
            raise _bad(source, where, f"tree spec type {kind!r:.80}", _NOT_A_TREE)
        try:
            keys = json.loads(context)
        except (ValueError, RecursionError) as e:
            raise _bad(source, where, "a damaged tree spec", _NOT_A_TREE) from e
        plain = keys is None or (isinstance(keys, list) and all(
            isinstance(k, (int, str)) and not isinstance(k, bool) for k in keys))
        if not plain:
            raise _bad(source, where, f"tree spec context {context!r:.80}", _NOT_A_TREE)
        stack.extend(node["children_spec"])


def _check_graph(source: str, program: torch.export.ExportedProgram) -> None:
    """Every node calls an ATen/prims operator, an allowlisted higher-order operator or a
    symbolic-shape builtin (deserialization resolves any ``torch.*`` name to a callable)."""
    from torch._export.serde.serialize import _SYM_OPS

    allowed_builtins = set(_SYM_OPS) | {__import__("operator").getitem}
    for module in program.graph_module.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            if node.op not in ("placeholder", "call_function", "get_attr", "output"):
                raise _refused(source, node, f"a {node.op!r} node")
            if node.op != "call_function":
                continue
            # operators passed as arguments (auto_functionalized, with_effects) count too
            targets = [node.target] + [a for a in _flat(node.args, node.kwargs)
                                       if callable(a) and not isinstance(a, torch.fx.Node)]
            for target in targets:
                if not _allowed(target, allowed_builtins):
                    raise _refused(source, node, f"operator {_op_name(target)!r}")


def _flat(args: Any, kwargs: Any) -> list[Any]:
    out: list[Any] = []
    stack = [args, kwargs]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        else:
            out.append(item)
    return out


def _allowed(target: Any, builtins: set[Any]) -> bool:
    if isinstance(target, torch._ops.OpOverload):
        return target.namespace in _OP_NAMESPACES and target.name() not in _DENIED_OPS
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name() in _HIGHER_ORDER_OPS
    try:
        return target in builtins
    except TypeError:  # unhashable
        return False


def _op_name(target: Any) -> str:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
        return str(target.name())
    return getattr(target, "__qualname__", None) or type(target).__name__


def _refused(source: str, node: torch.fx.Node, what: str) -> InputError:
    return InputError(f"{source}: the program's node {node.name!r} uses {what}, which morph "
                      "does not run from a file (allowed: ATen and prims operators, control "
                      "flow, shape arithmetic). Pass --trust if you trust the file's origin")


def _check_input_names(source: str, program: torch.export.ExportedProgram) -> None:
    """``module()`` writes keyword-argument names from the tree spec into Python source."""
    spec = program.call_spec.in_spec
    if spec is None:
        return
    for child in (spec.child(i) for i in range(spec.num_children)):
        if child.type is dict:
            for key in child.context:
                if not (isinstance(key, str) and key.isidentifier()
                        and not keyword.iskeyword(key)):
                    raise InputError(f"{source}: the program's input name {key!r:.80} is not "
                                     "a Python identifier. Pass --trust if you trust the file")


def _reason(e: Exception) -> str:
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return (text[0] if text else type(e).__name__)[:300]
