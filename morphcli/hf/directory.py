"""Reading a Hugging Face model directory: config, family, weights, blocks."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from morphcli.errors import InputError, UnsafeCheckpointError
from morphcli.hf.families import Family, family_for

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PLAN_FILE = "morph_plan.json"


@dataclass
class HFDir:
    """One model directory, read: ``state`` holds the tensors as stored (input dtype)."""

    path: Path
    config: dict[str, Any]
    family: Family
    cls_name: str
    state: dict[str, Any]
    weight_files: list[str]          # files holding weights (index included): not copied
    sharded: bool
    max_shard_bytes: int
    prefix: str                      # block prefix, e.g. "model.layers"
    n_blocks: int
    dtype: str = "float32"

    def cfg(self, role: str, default: Any = None) -> Any:
        return self.config.get(self.family.field_of(role), default)

    @property
    def has_head(self) -> bool:
        """An LM head (logits out) rather than a base model (hidden states out)."""
        return self.cls_name == self.family.classes[0]

    def block(self, name: str) -> int:
        """The index of block ``name`` (``model.layers.3``), or an error listing the blocks."""
        m = re.fullmatch(re.escape(self.prefix) + r"\.(\d+)", name.strip())
        if m is None or int(m.group(1)) >= self.n_blocks:
            raise InputError(f"{self.path}: no block {name!r}; the blocks are "
                             f"{self.prefix}.0 .. {self.prefix}.{self.n_blocks - 1}")
        return int(m.group(1))


def load_dir(path: str | Path, trust: bool = False) -> HFDir:
    """Read ``path`` (config.json + safetensors or pytorch_model.bin), never running its code.

    >>> d = load_dir("tiny-llama"); d.family.name, d.prefix, d.n_blocks
    ('llama', 'model.layers', 2)
    """
    root = Path(path)
    config = _read_config(root)
    if "auto_map" in config:
        raise UnsafeCheckpointError(
            f"{root}/config.json names custom model code (auto_map: "
            f"{', '.join(map(str, config['auto_map']))}); morph runs only transformers' own "
            "classes and never imports a model's code, with or without --trust")
    family = family_for(config.get("model_type"), f"{root}/config.json")
    cls_name = _class_name(root, config, family)
    state, files, sharded, biggest = _read_weights(root)
    prefix, n_blocks = _blocks(root, family, state)
    d = HFDir(root, config, family, cls_name, state, files, sharded, biggest, prefix, n_blocks)
    d.dtype = _dtype_of(state)
    return d


def _read_config(root: Path) -> dict[str, Any]:
    try:
        config = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{root}/config.json cannot be read: {e}") from e
    if not isinstance(config, dict):
        raise InputError(f"{root}/config.json is not a JSON object")
    return config


def _class_name(root: Path, config: dict[str, Any], family: Family) -> str:
    archs = config.get("architectures") or [family.classes[0]]
    name = archs[0] if isinstance(archs, list) and archs else archs
    if name not in family.classes:
        raise InputError(f"{root}/config.json: architecture {name!r} is not supported for "
                         f"{family.name}; supported: {', '.join(family.classes)}")
    return str(name)


def _read_weights(root: Path) -> tuple[dict[str, Any], list[str], bool, int]:
    """(tensors, weight file names, sharded?, largest shard in bytes)."""
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        if (root / index_name).is_file():
            shards = _index_shards(root, index_name)
            state: dict[str, Any] = {}
            for shard in shards:
                state.update(_read_file(root / shard))
            biggest = max((root / s).stat().st_size for s in shards)
            return state, [index_name, *shards], True, biggest
        if (root / single).is_file():
            return _read_file(root / single), [single], False, (root / single).stat().st_size
    raise InputError(f"{root}: no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or "
                     f"{BIN_INDEX}) beside config.json")


def _index_shards(root: Path, index_name: str) -> list[str]:
    try:
        index = json.loads((root / index_name).read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{root}/{index_name} is not a valid index (weight_map): {e}") from e
    for shard in shards:
        p = root / shard
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or not p.is_file():
            raise InputError(f"{root}/{index_name} names shard {shard!r}, which is not a file "
                             "in the directory")
    return shards


def _read_file(path: Path) -> dict[str, Any]:
    import torch

    try:
        if path.suffix == ".safetensors":
            return _read_lazily(path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # the weights-only unpickler refuses code: say so, in one line
        what = "needs code that is not allowlisted" if "weights_only" in str(e) else "is damaged"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        cls = UnsafeCheckpointError if "weights_only" in str(e) else InputError
        raise cls(f"{path} {what} and was not loaded: {first}") from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def _read_lazily(path: Path) -> dict[str, Any]:
    """One shard's tensors, each backed by its own memory map of the file (safetensors'
    mmap backend): nothing is read until a tensor's bytes are used, a tensor that is never
    changed is never copied, and one that dies is unmapped at once (one map per file would
    stay resident until its last tensor dies), so the check can upcast tensor by tensor."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        keys = list(f.keys())  # noqa: SIM118 (not a dict)
    out = {}
    for k in keys:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out[k] = f.get_tensor(k)
    return out


def _blocks(root: Path, family: Family, state: dict[str, Any]) -> tuple[str, int]:
    for prefix in family.blocks:
        pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
        found = {int(m.group(1)) for k in state if (m := pat.match(k))}
        if found:
            n = max(found) + 1
            if found != set(range(n)):
                raise InputError(f"{root}: blocks {prefix}.N are not numbered 0..{n - 1}")
            return prefix, n
    raise InputError(f"{root}: no block weights under {' or '.join(family.blocks)} for "
                     f"{family.name}")


def _dtype_of(state: dict[str, Any]) -> str:
    """The floating dtype most of the weights are stored in (what the output keeps)."""
    counts: dict[str, int] = {}
    for t in state.values():
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + t.numel()
    return max(counts, key=lambda k: counts[k]) if counts else "float32"
