"""``morphcli.check``: compare two models (objects or files) numerically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from morphcli.equivalence.compare import Progress, compare
from morphcli.equivalence.report import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    CheckReport,
)
from morphcli.errors import InputError
from morphcli.graph import budget
from morphcli.io.api import open_runner


def check(
    a: str | Path | nn.Module,
    b: str | Path | nn.Module,
    *,
    samples: int = DEFAULT_SAMPLES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    trust: bool = False,
    progress: Progress | None = None,
) -> CheckReport:
    """Run ``a`` and ``b`` in eval mode on the same seeded random inputs and compare outputs.

    >>> report = check("model.pt", "model.onnx")
    >>> report.equivalent, report.max_abs
    """
    from morphcli.morphs.limits import check_numbers

    check_numbers(samples, batch_size, seed, atol, rtol)  # before anything is loaded
    run_a, specs_a, _ = open_runner(a, input_shapes=input_shapes, trust=trust)
    run_b, specs_b, _ = open_runner(b, input_shapes=input_shapes, trust=trust)
    specs = specs_a or specs_b
    if not specs:
        raise InputError("neither model records its input shape; pass --input-shape")
    for m in (a, b):
        if isinstance(m, nn.Module):
            m.eval()
    # Sized from shapes first: refused over a cap (graph.budget) before anything is allocated.
    budget.check_run([run_a, run_b], specs, samples=samples, batch_size=batch_size)
    return compare(run_a, run_b, specs, samples=samples, batch_size=batch_size, seed=seed,
                   atol=atol, rtol=rtol, progress=progress)
