"""Hugging Face model directories (``config.json`` + safetensors shards): inspect, deepen and
widen them exactly, checked with transformers itself. transformers is imported lazily, only on
this path (the ``hf`` extra); nothing here imports torch at import time."""

from __future__ import annotations

from pathlib import Path


def is_hf_dir(path: str | Path | None) -> bool:
    """A directory holding ``config.json``: what ``morph`` treats as a Hugging Face model.

    >>> is_hf_dir("sample_models/mlp.pt")
    False
    """
    if path is None or str(path) == "-":
        return False
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()
