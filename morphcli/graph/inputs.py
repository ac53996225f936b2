"""Input specifications: shapes and dtypes of a model's inputs, and random tensors for them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from morphcli.errors import InputError
from morphcli.graph import budget

INPUTS_META = "morphcli.inputs"


@dataclass(frozen=True)
class InputSpec:
    """One model input. ``high`` bounds integer inputs (token ids) to ``[0, high)``."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None

    def text(self) -> str:
        return ",".join(str(d) for d in self.shape)

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "high": self.high}

    @staticmethod
    def from_json(d: Any) -> InputSpec:
        """Parse and validate a spec read from a file (a damaged one must not crash later)."""
        if not isinstance(d, dict):
            raise InputError(f"stored input spec {d!r:.80} is not a mapping")
        shape, dtype, high = d.get("shape"), d.get("dtype"), d.get("high")
        if not isinstance(shape, list) or not all(type(x) is int for x in shape):
            raise InputError(f"stored input shape {shape!r:.80} is not a list of integers")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise InputError(f"stored input dtype {dtype!r:.80} is not one morph can generate")
        if high is not None and (type(high) is not int or high < 1):
            raise InputError(f"stored input bound {high!r:.80} is not a positive integer")
        return InputSpec(checked_shape(tuple(shape), "stored input shape"), dtype, high)


def specs_to_text(specs: Sequence[InputSpec]) -> str:
    """The input specs as the JSON a file written by another program can carry beside it
    (``INPUTS_META``: .pt2 extra file, ONNX metadata), read back by ``specs_from_text``."""
    import json

    return json.dumps([s.to_json() for s in specs])


def specs_from_text(text: str | None) -> tuple[InputSpec, ...] | None:
    """The specs ``specs_to_text`` wrote, or None when absent or damaged (the file's graph
    then gives the inputs, as for any foreign file)."""
    import json

    if not text:
        return None
    try:
        specs = tuple(InputSpec.from_json(s) for s in json.loads(text))
    except (ValueError, TypeError, RecursionError, InputError):
        return None
    return specs or None


# Input shapes read from a file decide how much memory checking allocates, so a damaged or
# hostile file must not claim terabytes: a cap far above any real model's input (2^28 elements,
# MORPH_MAX_INPUT_ELEMENTS), which a check applies again to all its inputs at its batch size.
MAX_INPUT_DIMS = 8
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
           "uint8", "bool")


def checked_shape(shape: tuple[int, ...], what: str) -> tuple[int, ...]:
    """``shape`` if it is a sane input shape (positive, few dimensions, bounded size)."""
    if len(shape) > MAX_INPUT_DIMS or any(d < 1 for d in shape):
        raise InputError(f"{what} {shape} is not a valid input shape")
    n, limit = math.prod(shape), budget.MAX_INPUT_ELEMENTS.limit()
    if n > limit:
        raise budget.BudgetError(
            f"{what} {shape} has {n:,} elements, more than the {limit:,} morph allocates for "
            f"one input; set {budget.MAX_INPUT_ELEMENTS.variable}={n} to raise it")
    return shape


def example_inputs(
    specs: Sequence[InputSpec],
    *,
    batch_size: int | None,
    seed: int,
    scale: float = 1.0,
) -> tuple[torch.Tensor, ...]:
    """Seeded random tensors for ``specs``; ``batch_size`` replaces dimension 0 when given."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        shape = list(spec.shape)
        if batch_size is not None and shape:
            shape[0] = batch_size
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            out.append((torch.randn(shape, generator=gen) * scale).to(dtype))
        else:
            out.append(torch.randint(0, spec.high or 2, shape, generator=gen, dtype=dtype))
    return tuple(out)


def as_token_ids(specs: Sequence[InputSpec], vocab: int) -> tuple[InputSpec, ...]:
    """``specs`` with every integer input drawn in ``[0, vocab)`` (``--input-ids``): a file's
    graph records an input's dtype, not the range of ids its embedding accepts."""
    if not any(not getattr(torch, s.dtype).is_floating_point for s in specs):
        kinds = ", ".join(s.dtype for s in specs)
        raise InputError(f"--input-ids {vocab}: the model has no integer input (its inputs "
                         f"are {kinds}); drop --input-ids")
    return tuple(s if getattr(torch, s.dtype).is_floating_point else
                 InputSpec(s.shape, s.dtype, vocab) for s in specs)


def with_shapes(stored: Sequence[InputSpec] | None, shapes: Sequence[tuple[int, ...]],
                dtypes: Sequence[str] | None = None) -> tuple[InputSpec, ...]:
    """``--input-shape`` over what a file records: new sizes, the recorded dtype and id range
    kept (token ids stay integers); ``dtypes`` where only those are known; else float32."""
    if stored and len(stored) == len(shapes):
        return tuple(InputSpec(tuple(s), old.dtype, old.high)
                     for s, old in zip(shapes, stored, strict=True))
    if dtypes and len(dtypes) == len(shapes):
        return tuple(InputSpec(tuple(s), t) for s, t in zip(shapes, dtypes, strict=True))
    return tuple(InputSpec(tuple(s)) for s in shapes)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; 'x' also separates ("1x3x32x32")."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or any(d > 1_000_000 for d in dims):
        raise InputError(
            f"bad --input-shape {text!r}: expected positive integers separated by commas, "
            "e.g. 1,3,32,32"
        )
    if len(dims) > MAX_INPUT_DIMS:
        raise InputError(f"bad --input-shape {text!r}: {len(dims)} dimensions; morph takes "
                         f"inputs of at most {MAX_INPUT_DIMS}")
    return checked_shape(dims, f"--input-shape {text!r}")
