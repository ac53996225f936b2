"""What a reader found in a file, before it becomes a traced GraphModule."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from morphcli.errors import NonFiniteWeightsWarning
from morphcli.graph.inputs import InputSpec

# Something that runs a model we cannot rebuild as a graph (ONNX, foreign .pt2): inputs -> outputs.
Runner = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


@dataclass
class Checkpoint:
    """Exactly one of the four payload fields is set."""

    source: str
    graph_module: fx.GraphModule | None = None
    module: nn.Module | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    runner: Runner | None = None
    inputs: tuple[InputSpec, ...] | None = None
    kind: str = ""  # a word for messages: "morphcli archive", "pickled model", ...


def torch_runner(module: nn.Module) -> Runner:
    """A Runner for a torch module, run without gradients; outputs flattened in order."""

    def run(inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(flatten_outputs(module(*inputs)))

    return run


def flatten_outputs(out: Any) -> Iterator[torch.Tensor]:
    """Tensors of a model's output in a stable order (tuples in order, dicts by key)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from flatten_outputs(o)
    elif isinstance(out, dict):
        for k in sorted(out):
            yield from flatten_outputs(out[k])


def warn_if_not_finite(source: str, tensors: Iterable[tuple[str, Any]]) -> None:
    """Warn (NonFiniteWeightsWarning) when any floating-point tensor holds NaN or Inf.

    Such a model computes NaN or Inf, and every check of it fails; saying so at load time
    tells the user why before the check does.
    """
    bad = []
    for name, t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
            # A sum is finite when every element is (and rarely overflows when they are):
            # one pass without a mask as large as the tensor; count only when it is not.
            if t.numel() and bool(torch.isfinite(t.detach().sum())):
                continue
            count = int(t.numel() - torch.isfinite(t).sum())
            if count:
                bad.append(f"{name}: {count}")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        warnings.warn(f"{source}: the weights hold NaN or Inf ({', '.join(bad[:3])}{more}); "
                      "the model's outputs will not be finite and no check can pass",
                      NonFiniteWeightsWarning, stacklevel=2)
