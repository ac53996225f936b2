"""``.safetensors``: the weights, with the architecture description in the file's metadata."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path
from typing import BinaryIO

import torch
import torch.fx as fx

from morphcli.errors import InputError
from morphcli.graph.describe import describe, parse_description, rebuild, state_tensors
from morphcli.io.checkpoint import Checkpoint

METADATA_KEY = "morphcli.architecture"


def read_safetensors(source: str, data: Path | bytes) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    try:
        if isinstance(data, bytes):
            tensors = load_bytes(data)
            metadata = _metadata_of_bytes(source, data)
        else:
            with safe_open(str(data), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{source}: cannot read as safetensors: {_reason(e)}") from e
    text = metadata.get(METADATA_KEY)
    if text is None:
        return Checkpoint(source, state_dict=tensors, kind="safetensors state_dict")
    desc = parse_description(text, source, "architecture metadata")
    return Checkpoint(source, graph_module=rebuild(desc, tensors, source),
                      kind="morphcli safetensors")


def write_safetensors(gm: fx.GraphModule, dest: Path) -> None:
    from safetensors.torch import save_file

    metadata = {METADATA_KEY: json.dumps(describe(gm), sort_keys=True)}
    tensors = state_tensors(gm)
    if _streamable(tensors):
        with dest.open("wb") as f:
            _stream(tensors, metadata, f)
        return
    tensors = _unshared(tensors)
    try:
        save_file(tensors, str(dest), metadata=metadata)
    except Exception as e:
        # safetensors reports a failed write (full disk) as SafetensorError("... (os error N)");
        # as an OSError, the atomic writer turns it into a clear "cannot write" error.
        found = re.search(r"\(os error (\d+)\)", str(e))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code)) from e


# The format's dtype names (safetensors.torch's table, for the dtypes torch always has), in
# the order the library lays tensors out (then by name): the same files, byte for byte.
_DTYPE_NAMES = {
    torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.int32: "I32",
    torch.bfloat16: "BF16", torch.float16: "F16", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_RANK = {dtype: i for i, dtype in enumerate(_DTYPE_NAMES)}


def _streamable(tensors: dict[str, torch.Tensor]) -> bool:
    return sys.byteorder == "little" and all(
        t.dtype in _DTYPE_NAMES and t.device.type == "cpu" for t in tensors.values())


def _stream(tensors: dict[str, torch.Tensor], metadata: dict[str, str], f: BinaryIO) -> None:
    """Write the safetensors format tensor by tensor from the model's own memory.

    The library's ``save_file`` refuses tensors that share memory (tied weights, views), so
    they had to be cloned first, a second copy of each; here every tensor is written from the
    model's own memory and only a non-contiguous one is copied, one at a time. The bytes are
    the library's (same header, order and alignment).
    """
    order = sorted(tensors, key=lambda k: (_RANK[tensors[k].dtype], k))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for k in order:
        t = tensors[k]
        size = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the format asks
    f.write(struct.pack("<Q", len(raw)) + raw)
    for k in order:
        t = tensors[k].detach().contiguous()
        if t.numel():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)


def to_bytes(gm: fx.GraphModule) -> bytes:
    from safetensors.torch import save

    return save(_unshared(state_tensors(gm)),
                metadata={METADATA_KEY: json.dumps(describe(gm), sort_keys=True)})


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory; give each its own contiguous copy."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():
            t = t.contiguous().clone()
        seen.add(ptr)
        out[k] = t
    return out


def _metadata_of_bytes(source: str, data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = parse_description(data[8 : 8 + n], source, "safetensors header")
    return header.get("__metadata__", {}) or {}


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
