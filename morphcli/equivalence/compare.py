"""Run two models side by side on the same seeded inputs and measure how far they differ.

The whole output structure is compared, batch by batch: containers (tuple, list, dict) by kind
and length, dict keys exactly (in any order), plain values (int, float, bool, str, None)
exactly, tensors by dtype and shape, then by value in float64 relative to the output's scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphcli.equivalence.report import INPUT_SCALES, CheckReport, OutputDiff
from morphcli.errors import InputError
from morphcli.graph.inputs import InputSpec, example_inputs
from morphcli.io.checkpoint import FlatOutputs, Runner, flatten_outputs

# A progress callback: (units done, units in all).
Progress = Callable[[int, int], None]

ROOT = "output"  # the path of the whole output in messages: output[1]['logits']


@dataclass(frozen=True)
class _Leaf:
    """A pair of tensors to compare by value: the index-th tensor of both outputs."""

    index: int
    path: str
    a: torch.Tensor
    b: torch.Tensor


def batch_sizes(samples: int, batch_size: int) -> list[int]:
    """The batches a check runs: ``batch_size`` at a time, and the last sample alone, so that
    a model that treats a batch of one differently (squeezing, broadcasting) fails.

    >>> batch_sizes(8, 4)
    [4, 3, 1]
    """
    sizes, left = [], samples - 1
    while left > 0:
        sizes.append(min(batch_size, left))
        left -= sizes[-1]
    return [*sizes, 1]


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
    references: tuple[Runner | None, Runner | None] | None = None,
) -> CheckReport:
    """Worst case over all outputs and batches; a difference in the output structure, in a
    plain value, dtype or shape, or NaN/Inf is never equivalent.

    ``progress(done, total)`` is called after each batch (for a progress bar). ``references``
    runs both models in float64: each batch's tolerance then grows by both models' own float32
    round-off there, max|a - a64| + max|b - b64|, which bounds |a - b| whenever a64 = b64
    (the triangle inequality), so a difference a model's conditioning amplifies from round-off
    is told apart from one the morph made. A None reference credits that side nothing."""
    if samples < 1 or batch_size < 1:
        raise InputError("--samples and --batch-size must be at least 1")
    worst: dict[int, OutputDiff] = {}
    reason, mismatch, beyond = None, False, False
    flat: list[str] = []  # notes that a model's structure was not compared (ONNX)
    notes: list[str] = []
    sizes, scales, done = batch_sizes(samples, batch_size), [], 0
    for batch, n in enumerate(sizes):
        scale = INPUT_SCALES[batch % len(INPUT_SCALES)]
        inputs = example_inputs(specs, batch_size=n, seed=seed + batch, scale=scale)
        out_a, out_b = _run(run_a, inputs, "first"), _run(run_b, inputs, "second")
        if scale != 1.0 and not _finite(out_a) and not _finite(out_b):
            # Outside both models' numeric range (exp overflows at 1e3): the batch runs at
            # unit scale instead, where NaN or Inf counts against the models again.
            notes.append(f"at input scale {scale:g} neither model's outputs are finite (they "
                         f"overflow), so batch {batch + 1} ran at scale 1")
            scale = 1.0
            inputs = example_inputs(specs, batch_size=n, seed=seed + batch, scale=scale)
            out_a, out_b = _run(run_a, inputs, "first"), _run(run_b, inputs, "second")
        scales.append(scale)
        leaves, why = _pair(out_a, out_b)
        flat = flat or _flat_notes(out_a, out_b)
        done += n
        if why is not None:
            reason, mismatch = why, True
            break
        round_off = _round_off(out_a, out_b, references, inputs) if references else None
        for leaf in leaves:
            diff = _diff(leaf, scales[-1], round_off[leaf.index] if round_off else 0.0)
            beyond = beyond or diff.max_abs > atol + rtol * diff.scale + diff.round_off
            if _broken(diff):
                reason = reason or _why(diff)
            prev = worst.get(leaf.index)
            if prev is None or _worse(diff, prev, atol, rtol):
                worst[leaf.index] = diff
        if progress is not None:
            progress(done, samples)
        if reason is not None:
            break
    diffs = [worst[i] for i in sorted(worst)]
    if mismatch:  # no figure can say how far apart two different structures are
        max_abs = max_rel = math.inf
    else:
        max_abs = max((d.max_abs for d in diffs), default=0.0, key=_nan_high)
        max_rel = max((d.max_rel for d in diffs), default=0.0, key=_nan_high)
    ok = reason is None and not beyond
    if reason is None and not ok:
        reason = "difference exceeds the tolerance"
    return CheckReport(ok, max_abs, max_rel, atol, rtol, done, batch_size, seed, diffs, reason,
                       sizes[:len(scales)], scales, not flat, flat + notes)


def _finite(out: Any) -> bool:
    """Whether every tensor of an output is finite (integer tensors always are)."""
    tensors = out.tensors if isinstance(out, FlatOutputs) else flatten_outputs(out)
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _run(run: Runner, inputs: tuple[torch.Tensor, ...], which: str) -> Any:
    try:
        return run(inputs)
    except InputError:
        raise
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise InputError(f"the {which} model fails on inputs of shape {shapes}: {first}") from e


# ---------------------------------------------------------------- structure


def _pair(a: Any, b: Any) -> tuple[list[_Leaf], str | None]:
    """The tensors to compare by value, or the first difference in structure (None: none)."""
    if isinstance(a, FlatOutputs) or isinstance(b, FlatOutputs):
        return _pair_flat(a, b)
    found: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    why = _walk(a, b, ROOT, found)
    return [_Leaf(i, p, x, y) for i, (p, x, y) in enumerate(found)], why


def _walk(a: Any, b: Any, path: str, found: list[tuple[str, torch.Tensor, torch.Tensor]]
          ) -> str | None:
    """Depth first, in ``flatten_outputs`` order (model a's dict order); tensors go to
    ``found``, everything else is compared here."""
    kind_a, kind_b = _kind(a), _kind(b)
    if kind_a != kind_b:
        return f"{path} is {_show(a)} in one model, {_show(b)} in the other"
    if kind_a == "tensor":
        found.append((path, a, b))
        return None
    if kind_a in ("tuple", "list"):
        if len(a) != len(b):
            return f"{path} is a {kind_a} of {len(a)} in one model, of {len(b)} in the other"
        items = [(f"{path}[{i}]", x, y) for i, (x, y) in enumerate(zip(a, b, strict=True))]
    elif kind_a == "dict":
        if set(a) != set(b):
            return f"{path} has {_keys(a, b)}"
        items = [(f"{path}[{k!r}]", a[k], b[k]) for k in a]
    else:
        return _plain(a, b, path)
    for sub, x, y in items:
        why = _walk(x, y, sub, found)
        if why is not None:
            return why
    return None


def _kind(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return "tensor"
    if isinstance(v, tuple):
        return "tuple"
    if isinstance(v, list):
        return "list"
    if isinstance(v, Mapping):
        return "dict"
    return "value"


def _plain(a: Any, b: Any, path: str) -> str | None:
    """Plain values compare exactly, type included (1, 1.0 and True differ). A float that is
    not finite is never equivalent, as NaN or Inf in a tensor is not."""
    if type(a) is not type(b):
        return f"{path} is {_show(a)} in one model, {_show(b)} in the other"
    if isinstance(a, float) and not (math.isfinite(a) and math.isfinite(b)):
        return f"{path} is {a!r} in one model, {b!r} in the other (not finite)"
    try:
        same = bool(a == b)
    except Exception:  # a type whose == gives no single truth value (a numpy array)
        return f"{path} is {_show(a)}, which the check cannot compare"
    return None if same else f"{path} is {_show(a)} in one model, {_show(b)} in the other"


def _show(v: Any) -> str:
    kind = _kind(v)
    if kind == "tensor":
        return f"a tensor of shape {tuple(v.shape)}"
    if kind in ("tuple", "list", "dict"):
        return f"a {kind} of {len(v)}"
    if v is None or isinstance(v, (bool, int, float, str)):
        return f"{v!r:.60} ({type(v).__name__})"
    return f"a {type(v).__name__}"


def _keys(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> str:
    """Which keys only one of two dicts has: "keys 'x' only in the first model and ..."."""
    parts = []
    for which, x, y in (("first", a, b), ("second", b, a)):
        only = [repr(k) for k in x if k not in y]
        if only:
            more = f" and {len(only) - 4} more" if len(only) > 4 else ""
            parts.append(f"{', '.join(only[:4])}{more} only in the {which} model")
    return "keys " + " and ".join(parts)


def _pair_flat(a: Any, b: Any) -> tuple[list[_Leaf], str | None]:
    """At least one side has only a flat list of tensors: compare tensors in order."""
    side_a, side_b = _flat_side(a), _flat_side(b)
    if len(side_a) != len(side_b):
        return [], f"the models return {len(side_a)} and {len(side_b)} output tensors"
    structured = side_b if isinstance(a, FlatOutputs) else side_a
    return [_Leaf(i, structured[i][0], x, y)
            for i, ((_, x), (_, y)) in enumerate(zip(side_a, side_b, strict=True))], None


def _flat_side(v: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(v, FlatOutputs):
        return [(f"{ROOT}[{i}]", t) for i, t in enumerate(v.tensors)]
    return list(_tensor_paths(v, ROOT))


def _tensor_paths(v: Any, path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of an output with their paths, in ``flatten_outputs`` order."""
    if isinstance(v, torch.Tensor):
        yield path, v
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _tensor_paths(x, f"{path}[{i}]")
    elif isinstance(v, Mapping):
        for k, x in v.items():
            yield from _tensor_paths(x, f"{path}[{k!r}]")


def _flat_notes(a: Any, b: Any) -> list[str]:
    return [f"the {which} model runs in {v.runtime}, which returns a flat list of tensors: its "
            "output structure (containers, keys, plain values) was not compared, only its "
            "tensors in order" for which, v in (("first", a), ("second", b))
            if isinstance(v, FlatOutputs)]


# ---------------------------------------------------------------- values


def _round_off(out_a: Any, out_b: Any, references: tuple[Runner | None, Runner | None],
               inputs: tuple[torch.Tensor, ...]) -> list[float] | None:
    """Per tensor of the output, max|a - a64| + max|b - b64| (None: a float64 run gives
    another structure or shape, so no round-off is credited)."""
    own = []
    for out, run, which in zip((out_a, out_b), references, ("first", "second"), strict=True):
        if run is None:
            continue
        leaves, why = _pair(out, _run(run, inputs, which))
        if why is not None or any(x.a.shape != x.b.shape for x in leaves):
            return None
        own.append([float((x.a.double() - x.b.double()).abs().max())
                    if x.a.numel() and x.a.is_floating_point() else 0.0 for x in leaves])
    if any(len(o) != len(own[0]) for o in own):
        return None
    return [sum(errors) for errors in zip(*own, strict=True)]


def _diff(leaf: _Leaf, input_scale: float, round_off: float = 0.0) -> OutputDiff:
    a, b = leaf.a.detach(), leaf.b.detach()
    shape_a, shape_b = list(a.shape), list(b.shape)
    dtype_a, dtype_b = _dtype(a), _dtype(b)

    def result(max_abs: float, max_rel: float, scale: float) -> OutputDiff:
        return OutputDiff(leaf.index, shape_a, shape_b, max_abs, max_rel, scale, leaf.path,
                          dtype_a, dtype_b, input_scale, round_off)

    if shape_a != shape_b or dtype_a != dtype_b:
        return result(math.inf, math.inf, 0.0)
    a64, b64 = a.double(), b.double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return result(math.nan, math.nan, math.nan)
    if a64.numel() == 0:
        return result(0.0, 0.0, 0.0)
    max_abs = float((a64 - b64).abs().max())
    scale = float(a64.abs().max())
    return result(max_abs, max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf),
                  scale)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _broken(d: OutputDiff) -> bool:
    """NaN/Inf, or a different shape or dtype: no tolerance makes it equivalent."""
    return d.max_abs != d.max_abs or d.shape_a != d.shape_b or d.dtype_a != d.dtype_b


def _worse(d: OutputDiff, prev: OutputDiff, atol: float, rtol: float) -> bool:
    if _broken(d):
        return True
    if _broken(prev) or d.max_abs == 0:  # no difference is never the worse one
        return False
    return d.max_abs - (atol + rtol * d.scale) > prev.max_abs - (atol + rtol * prev.scale)


def _why(d: OutputDiff) -> str:
    label = _label(d)
    if d.shape_a != d.shape_b:
        return (f"{label} has shape {tuple(d.shape_a)} in one model, "
                f"{tuple(d.shape_b)} in the other")
    if d.dtype_a != d.dtype_b:
        return f"{label} has dtype {d.dtype_a} in one model, {d.dtype_b} in the other"
    return f"{label} contains NaN or Inf"


def _label(d: OutputDiff) -> str:
    """``output 0`` for a lone tensor or a flat tuple of them (as before paths), else the
    path itself: ``output[1]['logits']``."""
    return f"output {d.index}" if d.path in (ROOT, f"{ROOT}[{d.index}]") else d.path


def _nan_high(x: float) -> float:
    return math.inf if x != x else x
