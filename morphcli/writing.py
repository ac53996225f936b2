"""Write a model in the format its suffix names, atomically, and verify what was written.

Verification reads the written file back the way its users will run it (our loader for .pt and
.safetensors, ``torch.export.load`` for .pt2, onnxruntime for .onnx) and compares it with the
model in memory before the file is moved into place.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch.fx as fx
from torch import nn

from morphcli.equivalence.compare import compare
from morphcli.equivalence.report import CheckReport
from morphcli.errors import InputError, NotEquivalentError
from morphcli.graph.inputs import INPUTS_META
from morphcli.io.api import STDIO, open_runner, to_graph_module
from morphcli.io.atomic import atomic_path, check_output_path
from morphcli.io.checkpoint import Checkpoint, torch_runner
from morphcli.io.formats import FORMATS, Format, format_for

# Verification: a batch size other than the export's (2) proves the batch stays dynamic.
VERIFY_SAMPLES = 6
VERIFY_BATCH = 3
# Tolerances (relative to output scale) for the written file against the model in memory:
# our own formats hold the same tensors, so they must match to round-off; ONNX Runtime
# reorders and fuses float32 arithmetic, so it gets the customary looser bound.
VERIFY_RTOL = {".onnx": 1e-4}
DEFAULT_VERIFY_RTOL = 1e-5
VERIFY_ATOL = 1e-6


def save(
    model: nn.Module,
    dest: str | Path,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """Write ``model`` to ``dest`` (format from the suffix; ``"-"``: .pt archive on stdout).

    >>> morphcli.save(model, "model.onnx")  # exported, validated and checked with onnxruntime
    """
    gm = model if isinstance(model, fx.GraphModule) else to_graph_module(
        Checkpoint("model", module=model), input_shapes=input_shapes)
    return write_verified(gm, dest, verify=verify)


def write_verified(
    gm: fx.GraphModule,
    dest: str | Path,
    *,
    source: str | Path | None = None,
    verify: bool = True,
    stdout: BinaryIO | None = None,
) -> dict[str, Any]:
    """Write atomically; with ``verify``, fail (writing nothing) unless the file matches ``gm``."""
    if str(dest) == STDIO:
        return _write_stdout(gm, verify, stdout or sys.stdout.buffer)
    path = Path(dest)
    fmt = format_for(path)
    if fmt is None or fmt.write is None:
        raise InputError(f"cannot write {str(path)!r}: unknown output suffix "
                         f"{path.suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
    inputs = (Path(source),) if source not in (None, STDIO) else ()
    check_output_path(path, inputs)  # type: ignore[arg-type]
    report = None
    with atomic_path(path) as tmp:
        fmt.write(gm, tmp)
        if verify:
            report = _verify(gm, _runner_for(fmt, tmp), fmt.suffix)
    return _result(str(path), fmt, report)


def _write_stdout(gm: fx.GraphModule, verify: bool, stream: BinaryIO) -> dict[str, Any]:
    from morphcli.io.torch_file import write_archive

    buf = io.BytesIO()
    write_archive(gm, buf)
    report = None
    if verify:
        runner, _, _ = open_runner("-", stdin=io.BytesIO(buf.getvalue()))
        report = _verify(gm, runner, ".pt")
    stream.write(buf.getvalue())
    stream.flush()
    return _result(STDIO, FORMATS[".pt"], report)


def _runner_for(fmt: Format, tmp: Path) -> Any:
    if fmt.suffix == ".pt2":
        from morphcli.io.export_file import pt2_runner

        return pt2_runner(tmp)
    runner, _, _ = open_runner(tmp)
    return runner


def _verify(gm: fx.GraphModule, runner: Any, suffix: str) -> CheckReport:
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        raise InputError("the model has no input shape; pass --input-shape")
    report = compare(torch_runner(gm), runner, specs, samples=VERIFY_SAMPLES,
                     batch_size=VERIFY_BATCH, seed=0, atol=VERIFY_ATOL,
                     rtol=VERIFY_RTOL.get(suffix, DEFAULT_VERIFY_RTOL))
    if not report.equivalent:
        raise NotEquivalentError(f"the written {suffix} file does not reproduce the model "
                                 f"({report.summary()}); nothing was written")
    return report


def _result(output: str, fmt: Format, report: CheckReport | None) -> dict[str, Any]:
    check = None
    if report is not None:
        check = {**report.to_json(), "summary": report.summary()}
    return {"output": output, "format": fmt.suffix, "check": check}
