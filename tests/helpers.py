"""Shared test helpers: one equivalence assertion and two ways to run the ``morph`` command.

``assert_equivalent`` is the only place tests compare model outputs. ``run_cli`` runs the real
command in a fresh interpreter (real pipes, real exit status); ``invoke`` runs the same Typer
app in-process, which skips the ~2 s torch import and lets tests monkeypatch the core.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

# ---------------------------------------------------------------- equivalence


def make_inputs(inputs_or_specs: Any, *, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Tensors as given, or seeded random tensors for shapes / ``InputSpec``s / one shape."""
    from morphcli.graph.inputs import InputSpec, example_inputs

    if isinstance(inputs_or_specs, torch.Tensor):
        return (inputs_or_specs,)
    items = list(inputs_or_specs)
    if items and all(isinstance(d, int) for d in items):  # a single shape: (2, 3, 32, 32)
        items = [tuple(items)]
    if all(isinstance(x, torch.Tensor) for x in items):
        return tuple(items)
    specs = [x if isinstance(x, InputSpec) else InputSpec(tuple(x)) for x in items]
    return example_inputs(specs, batch_size=None, seed=seed)


def outputs_of(model: Callable[..., Any], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run a module (in eval mode, without gradients) or any callable; flatten its outputs."""
    from morphcli.io.checkpoint import flatten_outputs

    if isinstance(model, torch.nn.Module) and model.training:
        with contextlib.suppress(NotImplementedError):  # torch.export modules refuse eval()
            model.eval()
    with torch.no_grad():
        out = model(*inputs)
    return [torch.as_tensor(t).detach() for t in flatten_outputs(out)]


def assert_equivalent(
    a: Callable[..., Any],
    b: Callable[..., Any],
    inputs_or_specs: Any,
    atol: float = 1e-6,
    *,
    seed: int = 0,
) -> float:
    """Assert ``a`` and ``b`` give the same outputs (same shapes, all finite, max abs diff
    at most ``atol``) on the given tensors or on seeded random inputs of the given shapes.
    Returns the max abs diff so tests can assert more about it.

    >>> assert_equivalent(model, morphcli.load("model.pt"), [(2, 3, 32, 32)], atol=0)
    """
    inputs = make_inputs(inputs_or_specs, seed=seed)
    out_a, out_b = outputs_of(a, inputs), outputs_of(b, inputs)
    assert len(out_a) == len(out_b), f"{len(out_a)} outputs vs {len(out_b)}"
    worst = 0.0
    for i, (x, y) in enumerate(zip(out_a, out_b, strict=True)):
        assert x.shape == y.shape, f"output {i}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        assert torch.isfinite(x).all() and torch.isfinite(y).all(), f"output {i} is not finite"
        diff = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
        assert diff <= atol, f"output {i}: max abs diff {diff:.3g} > atol {atol:g}"
        worst = max(worst, diff)
    return worst


class Sameness(NamedTuple):
    """How far two models' outputs are apart: the worst over outputs and inputs."""

    max_abs: float
    max_rel: float  # max |a - b| over max |a|, per output tensor


def assert_same_function(
    a: Callable[..., Any],
    b: Callable[..., Any],
    inputs_or_specs: Any,
    *,
    exact: bool = False,
    rtol: float = 1e-6,
    seeds: Sequence[int] = (0,),
    scales: Sequence[float] = (1.0,),
) -> Sameness:
    """Assert ``b`` computes what ``a`` does, measured here with plain torch (not morph's own
    check): bit for bit with ``exact`` (``max_abs == 0``), else within ``rtol`` of each output's
    largest magnitude, the tool's own bound at most. Inputs are the given tensors, or seeded
    random inputs of the given shapes / InputSpecs for each seed, times each scale.

    >>> assert_same_function(model, morphcli.load("wide.pt"), [(4, 20)], exact=True)
    """
    worst_abs = worst_rel = 0.0
    for seed in seeds:
        for scale in scales:
            inputs = tuple(t * scale if t.is_floating_point() else t
                           for t in make_inputs(inputs_or_specs, seed=seed))
            out_a, out_b = outputs_of(a, inputs), outputs_of(b, inputs)
            assert len(out_a) == len(out_b), f"{len(out_a)} outputs vs {len(out_b)}"
            for i, (x, y) in enumerate(zip(out_a, out_b, strict=True)):
                where = f"output {i} (seed {seed}, input scale {scale:g})"
                assert x.shape == y.shape, f"{where}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
                assert x.dtype == y.dtype, f"{where}: dtype {x.dtype} vs {y.dtype}"
                assert torch.isfinite(x).all() and torch.isfinite(y).all(), f"{where}: not finite"
                if not x.numel():
                    continue
                x64, y64 = x.double(), y.double()
                max_abs = float((x64 - y64).abs().max())
                size = float(x64.abs().max())
                max_rel = max_abs / size if size else (0.0 if max_abs == 0 else math.inf)
                if exact:
                    assert max_abs == 0.0, f"{where}: not bit-exact, max abs diff {max_abs:.3g}"
                else:
                    assert max_rel <= rtol, (f"{where}: max rel diff {max_rel:.3g} > {rtol:g} "
                                             f"(max abs {max_abs:.3g})")
                worst_abs, worst_rel = max(worst_abs, max_abs), max(worst_rel, max_rel)
    return Sameness(worst_abs, worst_rel)


def onnx_callable(path: Path) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """Run an .onnx file in onnxruntime as plain users would, as a torch-in, torch-out call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = {n: t.numpy() for n, t in zip(names, inputs, strict=True)}
        outs = [torch.from_numpy(o) for o in session.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)

    return run


# ---------------------------------------------------------------- running the CLI


class CliResult(NamedTuple):
    code: int
    stdout: Any  # str, or bytes with binary=True
    stderr: str


def run_cli(*args: str | os.PathLike[str], input: bytes | None = None, binary: bool = False,
            cwd: Path | None = None, timeout: float = 300) -> CliResult:
    """Run ``python -m morphcli ARGS`` in a fresh interpreter: (exit code, stdout, stderr)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "morphcli", *map(str, args)], input=input,
                          capture_output=True, cwd=cwd, env=env, timeout=timeout)
    out = proc.stdout if binary else proc.stdout.decode("utf-8", "replace")
    return CliResult(proc.returncode, out, proc.stderr.decode("utf-8", "replace"))


def invoke(*args: str | os.PathLike[str], input: bytes | None = None,
           binary: bool = False) -> CliResult:
    """Run the ``morph`` Typer app in-process (CliRunner): (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from morphcli.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # an escaped exception is a bug: show it, do not hide it
    out = result.stdout_bytes if binary else result.stdout
    return CliResult(result.exit_code, out, result.stderr)


def assert_one_error_line(stderr: str, *needles: str) -> str:
    """stderr holds exactly one non-empty line, no traceback, and it mentions every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


# ---------------------------------------------------------------- time limits


class Hang(BaseException):
    """Raised by ``deadline``; a BaseException so no ``except Exception`` in a loader eats it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``Hang`` in the body once ``seconds`` have passed (SIGALRM; main thread only)."""
    def ring(signum: int, frame: object) -> None:
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- files


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def listing(folder: Path) -> set[str]:
    """Every name in ``folder``, hidden ones (temporary files) included."""
    return {p.name for p in Path(folder).iterdir()}


# ---------------------------------------------------------------- figures for the run summary

# group -> (template, counts). Tests add to it; tests/conftest.py sums the groups over xdist
# workers and prints each template, filled in, at the end of the run (a human reads the CI log).
FIGURES: dict[str, tuple[str, dict[str, float]]] = {}


def add_figures(group: str, template: str, **counts: float) -> None:
    """Add ``counts`` to the summary line ``group``, e.g.
    ``add_figures("fuzz", "fuzz: {inputs} inputs tried, {crashes} crashes", inputs=1)``."""
    _, totals = FIGURES.setdefault(group, (template, {}))
    for key, value in counts.items():
        totals[key] = totals.get(key, 0) + value
