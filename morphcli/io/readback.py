"""Read back a written .pt archive or .safetensors file and compare it with the model in memory.

Cheaper than running the file, and as strong for these formats: a loaded file is exactly
``rebuild(description, tensors)``, so when every tensor matches byte for byte and the stored
description rebuilds into the same layers and the same graph code, the file computes what the
model does. Tensor data is read in chunks (never all at once, never mapped), so verifying a
1 GB file costs a read of it, not another gigabyte of memory.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from morphcli.graph.describe import describe, rebuild, state_tensors
from morphcli.graph.inputs import INPUTS_META

_CHUNK = 16 << 20

# A stored tensor: its layout (a meta tensor) and where its storage's bytes start in the file.
Stored = tuple[torch.Tensor, int]
ReadInto = Callable[[bytearray, int, int], int]


def matches(gm: fx.GraphModule, data: Path | bytes, suffix: str) -> bool:
    """True when the file at ``data`` (or its bytes) holds exactly ``gm``.

    False means "not shown identical", not "different": the caller then runs the file.

    >>> matches(model, Path("model.pt"), ".pt")
    True
    """
    try:
        text, stored = (_safetensors_layout if suffix == ".safetensors" else _archive_layout)(data)
    except Exception:
        return False  # unreadable here: running it says why, in the loader's words
    if text != json.dumps(describe(gm), sort_keys=True):
        return False
    tensors = state_tensors(gm)
    if tensors.keys() != stored.keys():
        return False
    buf = bytearray(_CHUNK)
    with _reader(data) as read_into:
        if not all(_same_tensor(t, *stored[k], read_into, buf) for k, t in tensors.items()):
            return False
    try:
        twin = rebuild(json.loads(text), tensors)  # the file's layers, over gm's (equal) tensors
    except Exception:
        return False
    return _same_structure(gm, twin)


# ---------------------------------------------------------------- layouts


def _archive_layout(data: Path | bytes) -> tuple[str, dict[str, Stored]]:
    """The description and tensors of a morphcli archive, with no tensor data read: loaded on
    the meta device, each storage knows its offset in the file."""
    from morphcli.io.torch_file import ARCHIVE_FORMAT

    source = io.BytesIO(data) if isinstance(data, bytes) else data
    obj = torch.load(source, map_location="meta", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != ARCHIVE_FORMAT:
        raise ValueError("not a morphcli archive")
    text, tensors = obj["architecture"], obj["tensors"]
    return text, {k: (t, t.untyped_storage()._checkpoint_offset) for k, t in tensors.items()}


def _safetensors_layout(data: Path | bytes) -> tuple[str, dict[str, Stored]]:
    """The description and tensors of a safetensors file, from its header alone."""
    from morphcli.io.safetensors_file import METADATA_KEY

    head = data[:8] if isinstance(data, bytes) else _read_head(data, 8)
    (n,) = struct.unpack("<Q", head)
    raw = data[8:8 + n] if isinstance(data, bytes) else _read_head(data, 8 + n)[8:]
    header = json.loads(raw)
    text = (header.pop("__metadata__", None) or {})[METADATA_KEY]
    stored = {}
    for key, entry in header.items():
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, _ = entry["data_offsets"]
        stored[key] = (torch.empty(entry["shape"], dtype=dtype, device="meta"), 8 + n + begin)
    return text, stored


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _read_head(path: Path, n: int) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


# ---------------------------------------------------------------- tensors


class _reader:
    """``read_into(buffer, offset, size)`` over a file (plain reads: nothing stays resident, as
    pages of a mapping would) or over bytes in memory."""

    def __init__(self, data: Path | bytes) -> None:
        self.data = data
        self.fd: int | None = None

    def __enter__(self) -> ReadInto:
        data = self.data
        if isinstance(data, bytes):
            def from_bytes(buf: bytearray, offset: int, size: int) -> int:
                part = data[offset:offset + size]
                buf[:len(part)] = part
                return len(part)
            return from_bytes
        self.fd = fd = os.open(data, os.O_RDONLY)

        def from_file(buf: bytearray, offset: int, size: int) -> int:
            return os.preadv(fd, [memoryview(buf)[:size]], offset)
        return from_file

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)


def _same_tensor(t: torch.Tensor, layout: torch.Tensor, start: int, read_into: ReadInto,
                 buf: bytearray) -> bool:
    if (t.dtype != layout.dtype or t.shape != layout.shape or t.is_meta
            or not layout.is_contiguous()):
        return False
    start += int(layout.storage_offset()) * layout.element_size()
    expected = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    for offset, size in _chunks(expected.numel()):
        if read_into(buf, start + offset, size) != size:
            return False
        got = torch.frombuffer(buf, dtype=torch.uint8, count=size)
        if not torch.equal(_wide(got), _wide(expected[offset:offset + size])):
            return False
    return True


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Bytes viewed as the widest integers that fit: torch.equal is 3x faster on int64."""
    for dtype in (torch.int64, torch.int32):
        try:
            return t.view(dtype)
        except RuntimeError:
            continue
    return t


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for offset in range(0, n, _CHUNK):
        yield offset, min(_CHUNK, n - offset)


# ---------------------------------------------------------------- structure


def _same_structure(gm: fx.GraphModule, twin: fx.GraphModule) -> bool:
    """Same graph, same inputs, and layer for layer the same type, settings and tensor
    names; tensor values are not compared here (``twin`` holds ``gm``'s own)."""
    if _nodes(gm) != _nodes(twin) or gm.meta.get(INPUTS_META) != twin.meta.get(INPUTS_META):
        return False
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    try:
        return all(_same_module(gm.get_submodule(t), twin.get_submodule(t)) for t in targets)
    except Exception:  # attributes that cannot be compared (tensors held as plain attributes)
        return False


def _nodes(gm: fx.GraphModule) -> list[tuple[Any, ...]]:
    """The graph as data (type annotations aside, which change nothing the graph computes)."""
    return [(n.op, n.name, n.target, fx.node.map_arg((n.args, n.kwargs), lambda a: a.name))
            for n in gm.graph.nodes]


def _same_module(a: nn.Module, b: nn.Module) -> bool:
    if type(a) is not type(b) or _settings(a) != _settings(b):
        return False
    if _tensor_table(a._parameters) != _tensor_table(b._parameters):
        return False
    if _tensor_table(a._buffers) != _tensor_table(b._buffers):
        return False
    if a._modules.keys() != b._modules.keys():
        return False
    return all(x is None and y is None or x is not None and y is not None and _same_module(x, y)
               for x, y in zip(a._modules.values(), b._modules.values(), strict=True))


def _settings(m: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in vars(m).items() if k not in ("_parameters", "_buffers", "_modules")}


def _tensor_table(table: dict[str, Any]) -> list[Any]:
    return [(k, None) if t is None else (k, tuple(t.shape), t.dtype, t.requires_grad,
                                         type(t) is nn.Parameter)
            for k, t in table.items()]
