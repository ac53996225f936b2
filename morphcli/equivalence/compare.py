"""Run two models side by side on the same seeded inputs and measure how far they differ."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from morphcli.equivalence.report import INPUT_SCALES, CheckReport, OutputDiff
from morphcli.errors import InputError
from morphcli.graph.inputs import InputSpec, example_inputs
from morphcli.io.checkpoint import Runner

# A progress callback: (units done, units in all).
Progress = Callable[[int, int], None]


def compare(
    run_a: Runner,
    run_b: Runner,
    specs: Sequence[InputSpec],
    *,
    samples: int,
    batch_size: int,
    seed: int,
    atol: float,
    rtol: float,
    progress: Progress | None = None,
) -> CheckReport:
    """Worst case over all outputs and batches; NaN/Inf or a shape mismatch is never equivalent.

    ``progress(done, total)`` is called after each batch (for a progress bar)."""
    if samples < 1 or batch_size < 1:
        raise InputError("--samples and --batch-size must be at least 1")
    worst: dict[int, OutputDiff] = {}
    reason = None
    done, batch = 0, 0
    while done < samples and reason is None:
        n = min(batch_size, samples - done)
        inputs = example_inputs(specs, batch_size=n, seed=seed + batch,
                                scale=INPUT_SCALES[batch % len(INPUT_SCALES)])
        out_a = _run(run_a, inputs, "first")
        out_b = _run(run_b, inputs, "second")
        if len(out_a) != len(out_b):
            reason = f"the models return {len(out_a)} and {len(out_b)} outputs"
            break
        for i, (a, b) in enumerate(zip(out_a, out_b, strict=True)):
            diff = _diff(i, a, b)
            if diff.max_abs != diff.max_abs or diff.shape_a != diff.shape_b:
                reason = reason or _why(diff)
            prev = worst.get(i)
            if prev is None or _worse(diff, prev, atol, rtol):
                worst[i] = diff
        done += n
        batch += 1
        if progress is not None:
            progress(done, samples)
    diffs = [worst[i] for i in sorted(worst)]
    max_abs = max((d.max_abs for d in diffs), default=0.0, key=_nan_high)
    max_rel = max((d.max_rel for d in diffs), default=0.0, key=_nan_high)
    ok = reason is None and all(d.max_abs <= atol + rtol * d.scale for d in diffs)
    if reason is None and not ok:
        reason = "difference exceeds the tolerance"
    return CheckReport(ok, max_abs, max_rel, atol, rtol, done, batch_size, seed, diffs, reason)


def _run(run: Runner, inputs: tuple[torch.Tensor, ...], which: str) -> list[torch.Tensor]:
    try:
        return [t.detach() for t in run(inputs)]
    except InputError:
        raise
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"the {which} model fails on inputs of shape {shapes}: {first}") from e


def _diff(i: int, a: torch.Tensor, b: torch.Tensor) -> OutputDiff:
    shape_a, shape_b = list(a.shape), list(b.shape)
    if shape_a != shape_b:
        return OutputDiff(i, shape_a, shape_b, math.inf, math.inf, 0.0)
    a64, b64 = a.double(), b.double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return OutputDiff(i, shape_a, shape_b, math.nan, math.nan, math.nan)
    if a64.numel() == 0:
        return OutputDiff(i, shape_a, shape_b, 0.0, 0.0, 0.0)
    max_abs = float((a64 - b64).abs().max())
    scale = float(a64.abs().max())
    return OutputDiff(i, shape_a, shape_b, max_abs, max_abs / scale if scale else
                      (0.0 if max_abs == 0 else math.inf), scale)


def _worse(d: OutputDiff, prev: OutputDiff, atol: float, rtol: float) -> bool:
    if d.max_abs != d.max_abs or d.shape_a != d.shape_b:
        return True
    if prev.max_abs != prev.max_abs or prev.shape_a != prev.shape_b:
        return False
    return d.max_abs - (atol + rtol * d.scale) > prev.max_abs - (atol + rtol * prev.scale)


def _why(d: OutputDiff) -> str:
    if d.shape_a != d.shape_b:
        return (f"output {d.index} has shape {tuple(d.shape_a)} in one model, "
                f"{tuple(d.shape_b)} in the other")
    return f"output {d.index} contains NaN or Inf"


def _nan_high(x: float) -> float:
    return math.inf if x != x else x
