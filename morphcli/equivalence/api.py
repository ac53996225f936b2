"""``morphcli.check``: compare two models (objects or files) numerically."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
from morphcli.graph.inputs import InputSpec, as_token_ids
from morphcli.io.api import needs_arch, open_runner, read_checkpoint, runner_of
from morphcli.io.checkpoint import Runner


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
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    key: str | None = None,
    input_ids: int | None = None,
) -> CheckReport:
    """Run ``a`` and ``b`` in eval mode on the same seeded random inputs and compare outputs.

    ``arch`` builds the network of a side that holds only weights (a state_dict), ``key``
    names the model entry of a side that is a training checkpoint; each applies to every side
    it fits and is refused when it fits neither. ``input_ids`` draws every integer input in
    ``[0, input_ids)`` (token ids; a foreign .onnx or .pt2 records no range).

    >>> report = check("model.pt", "model.onnx")
    >>> report.equivalent, report.max_abs
    """
    from morphcli.morphs.limits import check_numbers

    check_numbers(samples, batch_size, seed, atol, rtol)  # before anything is loaded
    if input_ids is not None and input_ids < 1:
        raise InputError(f"--input-ids {input_ids}: the number of token ids must be at least 1")
    (run_a, specs_a), (run_b, specs_b) = _runners(
        a, b, input_shapes=input_shapes, trust=trust, arch=arch, arch_kwargs=arch_kwargs,
        key=key)
    specs = specs_a or specs_b
    if not specs:
        raise InputError("neither model records its input shape; pass --input-shape")
    if input_ids is not None:
        specs = as_token_ids(specs, input_ids)
    for m in (a, b):
        if isinstance(m, nn.Module):
            m.eval()
    # Sized from shapes first: refused over a cap (graph.budget) before anything is allocated.
    budget.check_run([run_a, run_b], specs, samples=samples, batch_size=batch_size)
    return compare(run_a, run_b, specs, samples=samples, batch_size=batch_size, seed=seed,
                   atol=atol, rtol=rtol, progress=progress)


def _runners(
    a: str | Path | nn.Module,
    b: str | Path | nn.Module,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    trust: bool,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    key: str | None,
) -> list[tuple[Runner, tuple[InputSpec, ...] | None]]:
    """Both sides as runners, ``arch`` and ``key`` given to the sides they fit."""
    if arch is None and key is None:  # nothing to fit: each side as it is
        return [open_runner(m, input_shapes=input_shapes, trust=trust)[:2] for m in (a, b)]
    ckpts = [None if isinstance(m, nn.Module) else read_checkpoint(m, trust=trust)
             for m in (a, b)]
    wants_arch = [c is not None and needs_arch(c) for c in ckpts]
    wants_key = [c is not None and c.training is not None for c in ckpts]
    if arch is not None and not any(wants_arch):
        raise InputError("--arch builds the network of a file that holds only weights (a "
                         "state_dict); neither model is one (each describes its architecture)")
    if key is not None and not any(wants_key):
        raise InputError("--key names the model entry of a training checkpoint (a dict with "
                         "optimizer, epoch, ...); neither model is one")
    runners = []
    for m, ckpt, with_arch, with_key in zip((a, b), ckpts, wants_arch, wants_key, strict=True):
        if ckpt is None:
            runners.append(open_runner(m, input_shapes=input_shapes)[:2])
            continue
        runners.append(runner_of(ckpt, arch=arch if with_arch else None,
                                 arch_kwargs=arch_kwargs if with_arch else None,
                                 input_shapes=input_shapes,
                                 key=key if with_key else None)[:2])
    return runners
