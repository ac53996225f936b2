"""Input specifications: shapes and dtypes of a model's inputs, and random tensors for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

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
    def from_json(d: dict) -> InputSpec:
        return InputSpec(tuple(int(x) for x in d["shape"]), str(d["dtype"]), d.get("high"))


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


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` -> ``(1, 3, 32, 32)``; 'x' also separates ("1x3x32x32")."""
    parts = [p.strip() for p in text.replace("x", ",").split(",")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims) or any(d > 1_000_000 for d in dims):
        from morphcli.errors import InputError

        raise InputError(
            f"bad --input-shape {text!r}: expected positive integers separated by commas, "
            "e.g. 1,3,32,32"
        )
    return dims
