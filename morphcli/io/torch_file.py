"""``.pt`` / ``.pth``: morphcli archives, whole pickled models and state_dicts.

Everything goes through torch's weights-only unpickler with an allowlist of layer classes;
only ``trust=True`` falls back to a full unpickle, which can run code from the file.
"""

from __future__ import annotations

import collections
import functools
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.fx as fx
from torch import nn

from morphcli.errors import InputError, UnsafeCheckpointError
from morphcli.graph import allowlist
from morphcli.graph.describe import check_layer, describe, parse_description, rebuild, state_tensors
from morphcli.io.atomic import latched
from morphcli.io.checkpoint import Checkpoint

ARCHIVE_FORMAT = "morphcli.archive"


@functools.cache
def _safe_globals() -> list[Any]:
    """Classes a whole pickled model may name: torch.nn layers, morphcli's, and their parts."""
    extra: list[Any] = [torch.nn.Parameter, torch.Size, set, frozenset, torch.device]
    return [*allowlist.module_types().values(), *extra]


def read_torch(source: str, data: BinaryIO | Path, trust: bool) -> Checkpoint:
    """Read any torch.save file: our archive, a pickled nn.Module or a state_dict."""
    obj = _torch_load(source, data, trust)
    if isinstance(obj, dict) and obj.get("format") == ARCHIVE_FORMAT:
        return _from_archive(source, obj)
    if isinstance(obj, nn.Module):
        _check_module_state(source, obj)
    if isinstance(obj, fx.GraphModule):
        return Checkpoint(source, module=obj, kind="pickled GraphModule")
    if isinstance(obj, nn.Module):
        return Checkpoint(source, module=obj, kind="pickled model")
    from morphcli.io.training import recognise

    training = recognise(obj)
    if training is not None:
        return Checkpoint(source, training=training, kind="training checkpoint")
    state = _state_dict_in(obj)
    if state is not None:
        return Checkpoint(source, state_dict=state, kind="state_dict")
    raise InputError(
        f"{source}: holds a {type(obj).__name__}, not a model, a state_dict or a morphcli archive"
    )


def write_archive(gm: fx.GraphModule, dest: BinaryIO | Path) -> None:
    """A torch.save zip of plain data: the JSON description and the tensors (no pickled code);
    a training checkpoint's own dict when the model came from one (``io.training``)."""
    from morphcli.io import training

    payload: dict[str, Any] = {
        "format": ARCHIVE_FORMAT,
        "architecture": json.dumps(describe(gm), sort_keys=True),
        "tensors": state_tensors(gm),
    }
    if training.of(gm) is not None:  # written back as the same kind of dict, entries kept
        payload = training.payload(gm, describe(gm), state_tensors(gm))
    if isinstance(dest, Path):
        # Through a file object, the zip's root folder is always "archive", not the (temporary)
        # file's name, so the same model gives byte-identical files.
        with dest.open("wb") as f, latched(f) as safe:
            torch.save(payload, safe)
    else:
        torch.save(payload, dest)


def _from_archive(source: str, obj: dict) -> Checkpoint:
    text, tensors = obj.get("architecture"), obj.get("tensors")
    if not isinstance(text, str) or not isinstance(tensors, dict):
        raise InputError(f"{source}: damaged morphcli archive (architecture or tensors missing)")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise InputError(f"{source}: damaged morphcli archive (tensors malformed)")
    desc = parse_description(text, source, "morphcli archive (its architecture description)")
    gm = rebuild(desc, tensors, source)
    return Checkpoint(source, graph_module=gm, kind="morphcli archive")


def _check_module_state(source: str, model: nn.Module) -> None:
    """The unpickler restores each layer's attributes as the file lists them, so a damaged file
    can drop or retype those every torch module relies on; refuse it here, not deep in torch."""
    seen: set[int] = set()
    todo: list[tuple[str, Any]] = [("(root)", model)]
    while todo:
        path, m = todo.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        state = getattr(m, "__dict__", {})
        tables = [state.get(k) for k in ("_parameters", "_buffers", "_modules")]
        ok = isinstance(state.get("training"), bool) and all(isinstance(t, dict) for t in tables)
        if ok:
            params, buffers, children = tables
            ok = all(v is None or isinstance(v, torch.Tensor)
                     for v in [*params.values(), *buffers.values()])  # type: ignore[union-attr]
            ok = ok and all(isinstance(k, str) and (c is None or isinstance(c, nn.Module))
                            for k, c in children.items())  # type: ignore[union-attr]
        if not ok:
            raise InputError(f"{source}: damaged pickled model: layer {path!r} "
                             f"({type(m).__name__}) lacks the state every torch module has")
        try:
            check_layer(path, m)
        except InputError as e:
            raise InputError(f"{source}: damaged pickled model: {e}") from e
        todo += [(k if path == "(root)" else f"{path}.{k}", c)
                 for k, c in children.items() if c is not None]  # type: ignore[union-attr]


def _state_dict_in(obj: Any) -> dict[str, torch.Tensor] | None:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and _all_tensors(inner):
                return _with_metadata(inner)
        if obj and _all_tensors(obj):
            return _with_metadata(obj)
    return None


def _with_metadata(state: dict) -> dict[str, torch.Tensor]:
    """A copy of ``state`` that keeps its ``_metadata`` (the module versions torch's
    ``load_state_dict`` passes to each layer: mnasnet refuses to load without them)."""
    out: dict[str, torch.Tensor] = collections.OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if isinstance(metadata, dict):
        out._metadata = metadata  # type: ignore[attr-defined]
    return out


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _torch_load(source: str, data: BinaryIO | Path, trust: bool) -> Any:
    if trust:
        try:
            return torch.load(data, map_location="cpu", weights_only=False)
        except Exception as e:
            raise InputError(f"{source}: cannot read as a PyTorch checkpoint: {_reason(e)}") from e
    mmap = isinstance(data, Path) and _is_zip(data)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(data, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(data, e)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{source}: refused to load: the file needs code that is not allowlisted "
                f"({', '.join(unsafe)}); loading it could run that code. Pass --trust only if "
                "you trust where the file came from, or save a state_dict and use --arch"
            ) from e
        raise InputError(f"{source}: cannot read as a PyTorch checkpoint: {_reason(e)}") from e
    except Exception as e:
        raise InputError(f"{source}: cannot read as a PyTorch checkpoint: {_reason(e)}") from e


def _is_zip(path: Path) -> bool:
    """zipfile.is_zipfile, which raises (BadZipFile) on some damaged end records."""
    try:
        return zipfile.is_zipfile(path)
    except Exception:
        return False


_GLOBAL_IN_MESSAGE = re.compile(r"(?:GLOBAL|global) ([\w.]+)")


def _unsafe_globals(data: BinaryIO | Path, e: Exception) -> list[str]:
    """Names of the non-allowlisted globals the file refers to (all of them, where torch can)."""
    names: list[str] = []
    try:
        if isinstance(data, Path):
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(data))
        else:
            data.seek(0)
            names = torch.serialization.get_unsafe_globals_in_checkpoint(data)
    except Exception:
        names = []
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _safe_globals()
               if hasattr(g, "__qualname__")}
    names = [n for n in names if n not in allowed]
    if not names:
        names = _GLOBAL_IN_MESSAGE.findall(str(e))
    return sorted(dict.fromkeys(_python3_name(n) for n in names))


def _python3_name(name: str) -> str:
    """Protocol-2 pickles spell some globals the Python 2 way ("commands.call"); name what
    unpickling would really call ("subprocess.call")."""
    from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

    module, _, attr = name.rpartition(".")
    if (module, attr) in NAME_MAPPING:
        module, attr = NAME_MAPPING[(module, attr)]
    else:
        module = IMPORT_MAPPING.get(module, module)
    return f"{module}.{attr}"


def _reason(e: Exception) -> str:
    message = str(e).strip()
    # torch takes any file that reads as a tar archive (an all-zero file does too) for its
    # legacy .tar format, and advises weights_only=False; that would not help, so say what is.
    if "legacy .tar format" in message or "filename 'storages' not found" in message:
        return ("no zip or pickle header, so it is not one (the file reads as a tar "
                "archive, or is all zeros)")
    # torch's weights-only errors open with advice to retry with weights_only=False; the
    # actual reason follows "WeightsUnpickler error:" (e.g. "Unsupported operand 59").
    _, marker, rest = message.partition("WeightsUnpickler error:")
    if marker:
        detail = rest.strip().splitlines() or ["no detail"]
        message = f"the weights-only unpickler rejects it: {detail[0]}"
    text = message.splitlines()
    first = text[0] if text else type(e).__name__
    return first[:300]


def from_bytes(source: str, raw: bytes, trust: bool) -> Checkpoint:
    return read_torch(source, io.BytesIO(raw), trust)
