"""Write a model in the format its suffix names, atomically, and verify what was written.

Verification happens before the file is moved into place. Our own formats (.pt, .safetensors)
are read back and compared with the model in memory: every tensor byte for byte, and the stored
architecture rebuilt and compared layer by layer (``morphcli.io.readback``); that proves more
than running the file on a few inputs, at the cost of one read of it. Exports, and any file not
shown identical that way, are run the way their users will run them (our loader,
``torch.export.load`` for .pt2, onnxruntime for .onnx) and compared numerically.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.fx as fx
from torch import nn

from morphcli.equivalence.compare import compare
from morphcli.equivalence.report import CheckReport
from morphcli.errors import InputError, NonFiniteWeightsWarning, NotEquivalentError, StreamError
from morphcli.graph import budget, dtypes
from morphcli.graph.inputs import INPUTS_META
from morphcli.io.api import STDIO, open_runner, to_graph_module
from morphcli.io.atomic import atomic_path, check_output_path, os_reason
from morphcli.io.checkpoint import Checkpoint, float64_runner, outputs_in_float64, torch_runner
from morphcli.io.formats import FORMATS, Format, output_format

# Verification: a batch size other than the export's (2) proves the batch stays dynamic.
VERIFY_SAMPLES = 6
VERIFY_BATCH = 3
# Tolerances (relative to output scale) for the written file against the model in memory:
# our own formats hold the same tensors, so they must match to round-off; ONNX Runtime
# reorders and fuses float32 arithmetic, so it gets the customary looser bound.
VERIFY_RTOL = {".onnx": 1e-4}
DEFAULT_VERIFY_RTOL = 1e-5
VERIFY_ATOL = 0.0  # relative only, as the check: tiny outputs must not pass by an absolute bound
# Formats verified by reading them back (morphcli.io.readback) rather than by running them.
_READ_BACK = (".pt", ".pth", ".safetensors")


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
    fmt = output_format(path)
    inputs = (Path(source),) if source is not None and source != STDIO else ()
    check_output_path(path, inputs)
    write = fmt.write
    assert write is not None  # output_format refuses read-only formats
    report = None
    with atomic_path(path) as tmp:
        write(gm, tmp)
        if verify:
            with _syncing(tmp):
                report = _verify(gm, fmt, tmp)
    return _result(str(path), fmt, report)


@contextlib.contextmanager
def _syncing(path: Path) -> Iterator[None]:
    """Flush ``path`` to disk in a thread while the body runs (reading it back, say): the
    fsync before the rename (0.4 s per GB here) then finds nothing left to write."""
    def sync() -> None:
        with contextlib.suppress(OSError):  # the fsync in atomic_path tries again, and reports
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    thread = threading.Thread(target=sync, name="morphcli-fsync", daemon=True)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _write_stdout(gm: fx.GraphModule, verify: bool, stream: BinaryIO) -> dict[str, Any]:
    from morphcli.io.torch_file import write_archive

    buf = io.BytesIO()
    write_archive(gm, buf)
    raw = buf.getvalue()
    report = None
    if verify:
        report = _verify(gm, FORMATS[".pt"], raw)
    try:
        _write_all(stream, raw)
        stream.flush()
    except OSError as e:  # a full disk or a closed pipe behind stdout
        raise StreamError(f"cannot write to stdout: {os_reason(e)}; the model written there "
                          "is incomplete") from e
    return _result(STDIO, FORMATS[".pt"], report)


def _write_all(stream: BinaryIO, data: bytes) -> None:
    """Write every byte: a buffered stream returns a short count, without an error, when the
    pipe's reader exits mid-write (``| head -c 100``); the next write then raises EPIPE."""
    view = memoryview(data)
    while view:
        n = stream.write(view)
        if not n:
            raise OSError(errno.EPIPE, os.strerror(errno.EPIPE))
        view = view[n:]


def _verify(gm: fx.GraphModule, fmt: Format, data: Path | bytes) -> CheckReport | str:
    """Our own formats are read back and compared (tensors byte for byte, layers and graph)
    without running them; anything else, or a file not shown identical that way, is run."""
    if fmt.suffix in _READ_BACK:
        from morphcli.io.readback import matches

        if matches(gm, data, fmt.suffix):
            return "identical to the model in memory: every tensor byte for byte, same layers " \
                   "and graph"
    return _run_check(gm, _runner_for(fmt, data), fmt.suffix)


def _runner_for(fmt: Format, data: Path | bytes) -> Any:
    if fmt.suffix == ".pt2":
        from morphcli.io.export_file import pt2_runner

        return pt2_runner(data)
    with warnings.catch_warnings():  # NaN weights were reported when the model was loaded
        warnings.simplefilter("ignore", NonFiniteWeightsWarning)
        if isinstance(data, bytes):
            runner, _, _ = open_runner(STDIO, stdin=io.BytesIO(data))
        else:
            runner, _, _ = open_runner(data)
    return runner


def _run_check(gm: fx.GraphModule, runner: Any, suffix: str) -> CheckReport:
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        raise InputError("the model has no input shape; pass --input-shape")
    # Run in the model's own dtype (its inputs too): a half-precision file gets a bound that
    # fits its precision, since the runtime may round in another order than torch.
    rtol = max(VERIFY_RTOL.get(suffix, DEFAULT_VERIFY_RTOL),
               dtypes.VERIFY_RTOL.get(dtypes.model_dtype(gm), 0.0))  # type: ignore[arg-type]
    report = compare(torch_runner(gm), runner, specs, samples=VERIFY_SAMPLES,
                     batch_size=VERIFY_BATCH, seed=0, atol=VERIFY_ATOL, rtol=rtol)
    report.dtype = dtypes.name(dtypes.model_dtype(gm))
    if not report.equivalent:
        within = _within_own_round_off(gm, runner, specs, rtol, report)
        if within is None:
            raise NotEquivalentError(f"the written {suffix} file does not reproduce the model "
                                     f"({report.summary()}); nothing was written")
        return within
    return report


def _within_own_round_off(gm: fx.GraphModule, runner: Any, specs: Any, rtol: float,
                          failed: CheckReport) -> CheckReport | None:
    """A runtime that rounds in another order than torch, on a model that amplifies round-off
    (MixNet's squeeze-excite sigmoids fed thousands at input scale 1e3), differs from torch
    by more than the tolerance. The file still reproduces the model if its outputs are no
    further from the model's float64 run than the model's own run is: the tolerance of each
    batch grows by max|model - model64|. None if not, or if the model cannot run in float64."""
    if dtypes.model_dtype(gm) == torch.float64:
        return None
    try:  # over a cap (graph.budget), or a layer without float64 kernels: the verdict stands
        budget.check_run([gm], specs, samples=VERIFY_SAMPLES, batch_size=VERIFY_BATCH,
                         scale=2)
        report = compare(float64_runner(copy.deepcopy(gm).double()),
                         outputs_in_float64(runner), specs, samples=VERIFY_SAMPLES,
                         batch_size=VERIFY_BATCH, seed=0, atol=VERIFY_ATOL, rtol=rtol,
                         references=(torch_runner(gm), None))
    except Exception:
        return None
    if not report.equivalent:
        return None
    dtype = dtypes.name(dtypes.model_dtype(gm))
    failed.equivalent, failed.reason = True, None
    failed.notes.append(
        f"the file differs from the model beyond the tolerance alone, but it is no further "
        f"from the model's float64 run (max abs {report.max_abs:.3g}) than the model's own "
        f"{dtype} run is ({max(d.round_off for d in report.outputs):.3g}): the model "
        "amplifies round-off")
    return failed


def _result(output: str, fmt: Format, report: CheckReport | str | None) -> dict[str, Any]:
    check = None
    if isinstance(report, str):  # read back and identical: nothing to measure, nothing differs
        check = {"equivalent": True, "max_abs": 0.0, "max_rel": 0.0, "method": "read back",
                 "reason": None, "summary": report}
    elif report is not None:
        check = {**report.to_json(), "method": "run", "summary": report.summary()}
    return {"output": output, "format": fmt.suffix, "check": check}
