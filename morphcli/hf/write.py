"""Writing a model directory atomically: a temporary sibling, renamed into place at the end."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from morphcli.errors import InputError
from morphcli.hf.directory import PLAN_FILE, SAFE_INDEX, SAFE_SINGLE, HFDir
from morphcli.io.atomic import os_reason

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``--shard-size``: bytes, as transformers spells them (5GB = 5e9 bytes, 5GiB = 5 * 2**30).

    >>> parse_size("500MB"), parse_size("2GiB")
    (500000000, 2147483648)
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()]) if m else 0
    if size < 1:
        raise InputError(f"--shard-size {text!r}: give a size such as 5GB, 500MB or 2GiB")
    return size


def check_output_dir(out: Path, source: Path) -> None:
    """Fail before any work when ``out`` exists, is the input, or cannot be created."""
    parent = out.parent if str(out.parent) else Path(".")
    if out.resolve() == source.resolve():
        raise InputError(f"output {str(out)!r} is the input directory; morph never overwrites "
                         "its input, choose another -o")
    if out.exists():
        raise InputError(f"output {str(out)!r} already exists; morph never overwrites it, "
                         "remove it or choose another -o")
    if not parent.is_dir():
        raise InputError(f"output directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {str(parent)!r} is not writable")


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling of ``out``; on success renamed to ``out``, else removed."""
    parent = out.parent if str(out.parent) else Path(".")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.rename(tmp, out)
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {os_reason(e)}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_dir(d: HFDir, folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
              plan: dict[str, Any], shard_bytes: int | None = None,
              dtypes: dict[str, torch.dtype] | None = None) -> list[str]:
    """Weights (safetensors, sharded like the input unless ``shard_bytes``), config.json, the
    plan, and every other file of the input copied verbatim. Returns the weight file names.

    ``dtypes`` (key -> dtype to store): ``state`` holds the check's float32 tensors, cast
    back one shard at a time (exact: they are upcasts), so no second copy of the model.
    ``state`` is emptied shard by shard as written, so written tensors can be freed."""
    skip = {*d.weight_files, "config.json", PLAN_FILE}
    for item in sorted(d.path.iterdir()):
        if item.name in skip:
            continue
        if item.is_dir():
            shutil.copytree(item, folder / item.name, symlinks=False)
        elif item.is_file():
            shutil.copy2(item, folder / item.name)
    limit = shard_bytes if shard_bytes is not None else d.max_shard_bytes if d.sharded else None
    files = _write_weights(folder, state, limit, dtypes or {})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    (folder / PLAN_FILE).write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    return files


def _write_weights(folder: Path, state: dict[str, torch.Tensor], limit: int | None,
                   dtypes: dict[str, torch.dtype]) -> list[str]:
    from safetensors.torch import save_file

    def nbytes(key: str) -> int:
        t = state[key]
        return t.numel() * (dtypes[key].itemsize if key in dtypes else t.element_size())

    groups = _shards(list(state), nbytes, limit)
    total = sum(map(nbytes, state))
    if len(groups) == 1 and limit is None:
        save_file(_own(groups[0], state, dtypes), str(folder / SAFE_SINGLE),
                  metadata={"format": "pt"})
        state.clear()
        return [SAFE_SINGLE]
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, keys in zip(names, groups, strict=True):
        save_file(_own(keys, state, dtypes), str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, name))
        for k in keys:  # written: its memory (mapped input or float32 copy) may go now
            del state[k]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [SAFE_INDEX, *names]


def _shards(keys: list[str], nbytes: Any, limit: int | None) -> list[list[str]]:
    """Keys in order, cut into groups of at most ``limit`` bytes (at least one key each)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        n = nbytes(key)
        if limit is not None and groups[-1] and size + n > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += n
    return groups


def _own(keys: list[str], state: dict[str, torch.Tensor],
         dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """One shard's tensors in their stored dtype. safetensors refuses tensors sharing memory:
    give each key its own contiguous tensor."""
    seen: set[int] = set()
    out = {}
    for k in keys:
        t = state[k].to(dtypes.get(k, state[k].dtype)).contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out
