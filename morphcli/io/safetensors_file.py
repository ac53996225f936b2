"""``.safetensors``: the weights, with the architecture description in the file's metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.fx as fx

from morphcli.errors import InputError
from morphcli.graph.describe import describe, rebuild, state_tensors
from morphcli.io.checkpoint import Checkpoint

METADATA_KEY = "morphcli.architecture"


def read_safetensors(source: str, data: Path | bytes) -> Checkpoint:
    from safetensors import safe_open
    from safetensors.torch import load as load_bytes

    try:
        if isinstance(data, bytes):
            tensors = load_bytes(data)
            metadata = _metadata_of_bytes(data)
        else:
            with safe_open(str(data), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise InputError(f"{source}: cannot read as safetensors: {_reason(e)}") from e
    text = metadata.get(METADATA_KEY)
    if text is None:
        return Checkpoint(source, state_dict=tensors, kind="safetensors state_dict")
    try:
        desc = json.loads(text)
    except ValueError as e:
        raise InputError(f"{source}: damaged architecture metadata (not JSON)") from e
    return Checkpoint(source, graph_module=rebuild(desc, tensors), kind="morphcli safetensors")


def write_safetensors(gm: fx.GraphModule, dest: Path) -> None:
    from safetensors.torch import save_file

    save_file(_unshared(state_tensors(gm)), str(dest),
              metadata={METADATA_KEY: json.dumps(describe(gm), sort_keys=True)})


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


def _metadata_of_bytes(data: bytes) -> dict[str, str]:
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return header.get("__metadata__", {}) or {}


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
