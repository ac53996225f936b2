"""The one suffix-dispatch table: which reader and writer serve each file format."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.fx as fx

from morphcli.io.checkpoint import Checkpoint

# A reader gets (name for messages, a path or the raw bytes of stdin, trust).
Reader = Callable[[str, "Path | bytes", bool], Checkpoint]
Writer = Callable[[fx.GraphModule, Path], None]


@dataclass(frozen=True)
class Format:
    suffix: str
    description: str
    read: Reader
    write: Writer | None


def _read_torch(source: str, data: Path | bytes, trust: bool) -> Checkpoint:
    from morphcli.io.torch_file import read_torch

    return read_torch(source, io.BytesIO(data) if isinstance(data, bytes) else data, trust)


def _write_archive(gm: fx.GraphModule, dest: Path) -> None:
    from morphcli.io.torch_file import write_archive

    write_archive(gm, dest)


def _read_safetensors(source: str, data: Path | bytes, trust: bool) -> Checkpoint:
    from morphcli.io.safetensors_file import read_safetensors

    return read_safetensors(source, data)


def _write_safetensors(gm: fx.GraphModule, dest: Path) -> None:
    from morphcli.io.safetensors_file import write_safetensors

    write_safetensors(gm, dest)


def _read_pt2(source: str, data: Path | bytes, trust: bool) -> Checkpoint:
    from morphcli.io.export_file import read_pt2

    return read_pt2(source, io.BytesIO(data) if isinstance(data, bytes) else data, trust)


def _write_pt2(gm: fx.GraphModule, dest: Path) -> None:
    from morphcli.io.export_file import write_pt2

    write_pt2(gm, dest)


def _read_onnx(source: str, data: Path | bytes, trust: bool) -> Checkpoint:
    from morphcli.io.export_file import read_onnx

    return read_onnx(source, data)


def _write_onnx(gm: fx.GraphModule, dest: Path) -> None:
    from morphcli.io.export_file import write_onnx

    write_onnx(gm, dest)


FORMATS: dict[str, Format] = {
    ".pt": Format(".pt", "morphcli archive (torch.load(weights_only=True) opens it)",
                  _read_torch, _write_archive),
    ".pth": Format(".pth", "same as .pt", _read_torch, _write_archive),
    ".ckpt": Format(".ckpt", "training checkpoint (PyTorch Lightning's too), written back as one",
                    _read_torch, _write_archive),
    ".safetensors": Format(".safetensors", "weights + architecture in the metadata",
                           _read_safetensors, _write_safetensors),
    ".pt2": Format(".pt2", "torch.export program with a dynamic batch", _read_pt2, _write_pt2),
    ".onnx": Format(".onnx", "ONNX (opset 18), verified with onnxruntime", _read_onnx, _write_onnx),
}


def format_for(path: Path | str) -> Format | None:
    return FORMATS.get(Path(path).suffix.lower())


def output_format(path: Path) -> Format:
    """The format ``path``'s suffix names for writing, or an InputError saying which exist."""
    fmt = format_for(path)
    if fmt is None or fmt.write is None:
        from morphcli.errors import InputError

        raise InputError(f"cannot write {str(path)!r}: unknown output suffix "
                         f"{path.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    return fmt
