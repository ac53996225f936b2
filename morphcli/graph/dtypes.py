"""A model's own floating-point dtype, and the dtype its check runs in.

A model is written back in its own dtype (bf16 in, bf16 out). Half-precision models are
checked in float32: both models are copied and upcast (exactly), and their inputs, drawn in the
model's dtype, are upcast the same way, so the check compares the two models' maths, not two
runs of bf16 round-off. float64 models run, and are checked, in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from morphcli.graph.inputs import InputSpec

HALF = (torch.float16, torch.bfloat16)
# A written file run in its own dtype (.pt2, .onnx) against the model in memory: the same
# weights, but the runtime may round in another order; a few units of the dtype's epsilon.
VERIFY_RTOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


def model_dtype(module: nn.Module) -> torch.dtype | None:
    """The one floating-point dtype of the module's parameters and buffers (None: none, or
    several)."""
    found = {t.dtype for t in [*module.parameters(), *module.buffers()]
             if t.is_floating_point()}
    return found.pop() if len(found) == 1 else None


def name(dtype: torch.dtype | None) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (None: float32, the default)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def check_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """float64 for float64 models, float32 for every other (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def needs_upcast(dtype: torch.dtype | None) -> bool:
    return dtype in HALF


def upcast(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (the original is left as it is); layers the graph
    does not use (graph.carried) are shared, not copied: they never run."""
    from morphcli.graph.carried import carried

    memo: dict[int, Any] = {id(m): m for m in carried(module).values()}
    return copy.deepcopy(module, memo).to(dtype)


def cast_inputs(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    return [t.to(dtype) if t.is_floating_point() else t for t in inputs]


def specs_in(specs: Sequence[InputSpec], dtype: torch.dtype | None) -> tuple[InputSpec, ...]:
    """Default (float32) floating inputs in the model's own dtype: a bf16 model takes bf16."""
    if dtype is None or dtype == torch.float32:
        return tuple(specs)
    return tuple(InputSpec(s.shape, name(dtype), s.high) if s.dtype == "float32" else s
                 for s in specs)
