"""Public load/save: any supported file in, a traced GraphModule out, and back again."""

from __future__ import annotations

import io
import os
import stat
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.fx as fx
from torch import nn

from morphcli.errors import InputError
from morphcli.graph import budget, dtypes
from morphcli.graph.infer_inputs import resolve_inputs
from morphcli.graph.inputs import INPUTS_META, InputSpec, with_shapes
from morphcli.graph.trace import propagate_shapes, trace
from morphcli.io import bounded
from morphcli.io.checkpoint import Checkpoint, Runner, torch_runner, warn_if_not_finite
from morphcli.io.formats import FORMATS, format_for
from morphcli.io.sniff import sniff

STDIO = "-"
_HEAD = 64 * 1024


def load(
    source: str | Path | nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust: bool = False,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    stdin: BinaryIO | None = None,
    key: str | None = None,
) -> fx.GraphModule:
    """Load a model from any supported file (or ``"-"`` for stdin) as a traced GraphModule.

    >>> model = load("sample_models/cnn.pt")
    >>> model = load("weights.safetensors", arch="torchvision.models:resnet18",
    ...              input_shapes=[(1, 3, 224, 224)])
    """
    ckpt = read_checkpoint(source, trust=trust, stdin=stdin)
    if ckpt.runner is not None:
        raise InputError(
            f"{ckpt.source} is a {ckpt.kind}: it can be compared with 'morph check', but its "
            "layers cannot be recovered for morphing or conversion; use the .pt, .safetensors "
            "or .pt2 file it was exported from"
        )
    return to_graph_module(ckpt, arch=arch, arch_kwargs=arch_kwargs, input_shapes=input_shapes,
                           key=key)


def open_runner(
    source: str | Path | nn.Module,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust: bool = False,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    stdin: BinaryIO | None = None,
    key: str | None = None,
) -> tuple[Runner, tuple[InputSpec, ...] | None, str]:
    """Any readable model as something to run: (runner, its input specs, a label)."""
    if isinstance(source, fx.GraphModule):
        return _sized_runner(source), source.meta.get(INPUTS_META), "model"
    if isinstance(source, nn.Module):
        ckpt = Checkpoint("model", module=source)
    else:
        ckpt = read_checkpoint(source, trust=trust, stdin=stdin)
    return runner_of(ckpt, arch=arch, arch_kwargs=arch_kwargs, input_shapes=input_shapes,
                     key=key)


def runner_of(
    ckpt: Checkpoint,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    key: str | None = None,
) -> tuple[Runner, tuple[InputSpec, ...] | None, str]:
    """What ``open_runner`` returns, for a checkpoint already read (from a file)."""
    if ckpt.runner is not None:
        specs = ckpt.inputs
        if input_shapes:
            specs = with_shapes(specs, input_shapes, ckpt.input_dtypes)
        return ckpt.runner, specs, ckpt.source
    gm = to_graph_module(ckpt, arch=arch, arch_kwargs=arch_kwargs, input_shapes=input_shapes,
                         require_inputs=False, key=key)
    return _sized_runner(gm), gm.meta.get(INPUTS_META), ckpt.source


def needs_arch(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint holds only weights, so that ``--arch`` must build the network:
    a state_dict, or a training checkpoint without the architecture morph stores in one."""
    if ckpt.state_dict is not None:
        return True
    if ckpt.training is None:
        return False
    from morphcli.io.training import stored_architecture

    return stored_architecture(ckpt.training.entries) is None


def _sized_runner(gm: fx.GraphModule) -> Runner:
    """A runner a check can size from the graph before running it (graph.budget)."""
    return budget.sized(torch_runner(gm), budget.graph_sizer(gm))


# ---------------------------------------------------------------- reading


def read_checkpoint(
    source: str | Path | nn.Module, *, trust: bool = False, stdin: BinaryIO | None = None
) -> Checkpoint:
    """Read a file (or stdin) into a Checkpoint without tracing it."""
    if isinstance(source, fx.GraphModule):
        return Checkpoint("model", graph_module=source, kind="model")
    if isinstance(source, nn.Module):
        return Checkpoint("model", module=source, kind="model")
    if str(source) == STDIO:
        return _read_stdin(stdin or sys.stdin.buffer, trust)
    path = Path(source)
    name = str(path)
    if not path.exists():
        raise InputError(f"{name}: no such file")
    if path.is_dir():
        raise InputError(f"{name}: is a directory, not a model file")
    mode = path.stat().st_mode
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise InputError(f"{name}: is a device, not a model file; pass a model file")
    raw = None
    try:
        with path.open("rb") as f:
            if stat.S_ISREG(mode):
                head = f.read(_HEAD)
            else:  # a FIFO or socket can be read once: all of it, bounded, parsed from bytes
                raw = bounded.read_bounded(f, name, accept=lambda h: _model_head(h) or (
                    format_for(path) is FORMATS[".onnx"]))
                head = raw[:_HEAD]
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror}") from e
    if not head:
        raise InputError(f"{name}: file is empty")
    fmt = format_for(path)
    actual = sniff(head)
    if fmt is None:
        hint = f" (its content looks like {actual})" if actual else ""
        raise InputError(
            f"{name}: unknown suffix {path.suffix or '(none)'!r}{hint}; "
            f"supported: {', '.join(FORMATS)}"
        )
    if fmt.suffix in (".pt", ".pth") and _is_pt2(path if raw is None else io.BytesIO(raw)):
        fmt = FORMATS[".pt2"]
    bounded.check_zip(name, path if raw is None else raw)
    try:
        return fmt.read(name, path if raw is None else raw, trust)
    except InputError as e:
        also_pt = actual == ".pt" and fmt.suffix in (".pt2", ".pth", ".ckpt")
        if actual and actual != fmt.suffix and not also_pt:
            raise InputError(f"{e} (the content looks like a {actual} file: wrong suffix?)") from e
        raise


def _read_stdin(stream: BinaryIO, trust: bool) -> Checkpoint:
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        mode = 0  # not a file descriptor (a test's BytesIO)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise InputError("stdin: is a device or terminal, not a model; pipe a model file in, "
                         "e.g. morph inspect - < model.pt")
    raw = bounded.read_bounded(stream, "stdin", accept=_model_head)
    if not raw:
        raise InputError("stdin: no data (expected a model, e.g. from 'morph ... -o -')")
    suffix = sniff(raw[:_HEAD])
    if suffix == ".pt" and raw.startswith(b"PK") and _is_pt2(io.BytesIO(raw)):
        suffix = ".pt2"
    if suffix is None:
        raise InputError("stdin: not a model file this tool reads (expected a .pt archive)")
    bounded.check_zip("stdin", raw)
    return FORMATS[suffix].read("stdin", raw, trust)


def _model_head(head: bytes) -> bool:
    """Whether the first bytes read could start a model file (else stop reading at once)."""
    return sniff(head) is not None


def _is_pt2(data: Path | io.BytesIO) -> bool:
    """torch.export programs are zips too; torch.save zips always hold a data.pkl.
    False for anything that is not a readable zip (zipfile.is_zipfile itself can raise)."""
    try:
        with zipfile.ZipFile(data) as z:
            names = z.namelist()
    except Exception:  # a damaged zip (bad offsets, undecodable names) is no .pt2; the torch
        return False   # reader then reports the damage as an InputError
    return not any(n.endswith("/data.pkl") or n == "data.pkl" for n in names)


# ---------------------------------------------------------------- tracing


def to_graph_module(
    ckpt: Checkpoint,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    require_inputs: bool = True,
    key: str | None = None,
) -> fx.GraphModule:
    """Trace what the checkpoint holds and attach input specs (given, stored or inferred);
    ``key`` names the entry of a training checkpoint that holds the model state."""
    if key is not None and ckpt.training is None:
        raise InputError(f"{ckpt.source}: --key names the model entry of a training checkpoint "
                         f"(a dict with optimizer, epoch, ...); this file is a {ckpt.kind}")
    n_inputs = len(input_shapes) if input_shapes else None  # defaulted arguments given shapes
    if ckpt.graph_module is not None:
        gm = ckpt.graph_module.eval()
        if arch:
            raise InputError(f"{ckpt.source}: --arch is only for state_dict files; this file "
                             "already describes its architecture")
    elif ckpt.module is not None:
        gm = trace(ckpt.module, source=ckpt.source, n_inputs=n_inputs, shapes=input_shapes)
    elif ckpt.training is not None:
        gm = _from_training(ckpt, arch, arch_kwargs, key, input_shapes)
    elif ckpt.state_dict is not None:
        if not arch:
            raise InputError(
                f"{ckpt.source}: holds only weights (a state_dict); pass --arch MODULE:CALLABLE "
                "naming the architecture, e.g. --arch torchvision.models:resnet18"
            )
        from morphcli.io.arch import build_arch

        module = build_arch(arch, arch_kwargs)
        _load_state_dict(module, ckpt.state_dict, ckpt.source, arch)
        gm = trace(module, source=ckpt.source, n_inputs=n_inputs, shapes=input_shapes)
    else:  # pragma: no cover - read_checkpoint always fills one field
        raise InputError(f"{ckpt.source}: nothing to load")
    warn_if_not_finite(ckpt.source, [*gm.named_parameters(), *gm.named_buffers()])
    if input_shapes or not gm.meta.get(INPUTS_META):
        try:
            gm.meta[INPUTS_META] = dtypes.specs_in(resolve_inputs(gm, gm.graph, input_shapes),
                                                   dtypes.model_dtype(gm))
        except InputError:
            if require_inputs:
                raise
            return gm
    propagate_shapes(gm)
    return gm


def _from_training(ckpt: Checkpoint, arch: str | None, arch_kwargs: dict[str, Any] | None,
                   key: str | None,
                   input_shapes: Sequence[tuple[int, ...]] | None) -> fx.GraphModule:
    """The model of a training checkpoint: rebuilt from the architecture morph stored in it,
    or built with --arch; the checkpoint's other entries ride along in ``gm.meta``."""
    from morphcli.io import training as tr

    t = ckpt.training
    stored = None if arch else tr.stored_architecture(t.entries)
    if stored is not None:
        from morphcli.graph.describe import parse_description, rebuild

        text, stored_key, prefix = stored
        state = tr.select(t, key or stored_key, ckpt.source)
        t.prefix = prefix
        t.others = {k: v for k, v in state.items() if not k.startswith(prefix)}
        inner = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        desc = parse_description(text, ckpt.source, "training checkpoint (its architecture)")
        gm = rebuild(desc, inner, ckpt.source)
        tr.attach(gm, t, [n for n, _ in gm.named_parameters()])
        return gm
    state = tr.select(t, key, ckpt.source)
    if not arch:
        raise InputError(
            f"{ckpt.source}: a training checkpoint whose entry {t.key!r} holds only weights; "
            "pass --arch MODULE:CALLABLE naming the architecture, e.g. "
            "--arch torchvision.models:resnet18")
    from morphcli.io.arch import build_arch

    module = build_arch(arch, arch_kwargs)
    state = tr.split_prefix(t, state, set(module.state_dict()))
    _load_state_dict(module, state, f"{ckpt.source} (entry {t.key!r})", arch)
    order = [n for n, _ in module.named_parameters()]  # what the optimizer's ids count
    gm = trace(module, source=ckpt.source, n_inputs=len(input_shapes) if input_shapes else None,
               shapes=input_shapes)
    tr.attach(gm, t, order)
    return gm


def _load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                     arch: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                 for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if keys]
        raise InputError(f"{source}: weights do not fit --arch {arch}: " + "; ".join(parts))
    # assign: the module takes the file's tensors as they are, in their own dtype (copying
    # into the architecture's float32 parameters would upcast a bf16 checkpoint for good).
    module.load_state_dict(state, strict=True, assign=True)
