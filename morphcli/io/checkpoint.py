"""What a reader found in a file, before it becomes a traced GraphModule."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from morphcli.errors import NonFiniteWeightsWarning
from morphcli.graph.inputs import InputSpec

# Something that runs a model: inputs -> what the model returns (tensors, possibly nested in
# tuples, lists and dicts beside plain values), or FlatOutputs where the runtime gives only a
# flat list of tensors (ONNX Runtime). The check compares the whole structure.
Runner = Callable[[Sequence[torch.Tensor]], Any]


@dataclass(frozen=True)
class FlatOutputs:
    """The output tensors of a runtime that has no output structure (ONNX Runtime), in the
    order of ``flatten_outputs``: they are compared with the other model's tensors so ordered."""

    tensors: tuple[torch.Tensor, ...]
    runtime: str  # for messages: "ONNX Runtime"


@dataclass
class Checkpoint:
    """Exactly one of the five payload fields is set."""

    source: str
    graph_module: fx.GraphModule | None = None
    module: nn.Module | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    runner: Runner | None = None
    inputs: tuple[InputSpec, ...] | None = None
    # A runner's input dtypes where ``inputs`` is None (sizes not fixed in the file): what
    # --input-shape's sizes are drawn in (token ids stay integers).
    input_dtypes: tuple[str, ...] | None = None
    kind: str = ""  # a word for messages: "morphcli archive", "pickled model", ...
    # A training checkpoint (io.training.TrainingCheckpoint): the model state is one entry.
    training: Any = None


def torch_runner(module: nn.Module) -> Runner:
    """A Runner for a torch module, run without gradients; returns the module's own output
    structure (``flatten_outputs`` gives its tensors)."""

    def run(inputs: Sequence[torch.Tensor]) -> Any:
        # A failing GraphModule prints its generated code's traceback on stderr before raising;
        # the error itself reaches the user as one line, so that print is kept from them.
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return module(*inputs)

    return run


def float64_runner(module: nn.Module) -> Runner:
    """A Runner for ``module`` already cast to float64: floating inputs are cast too."""
    run = torch_runner(module)
    return lambda inputs: run([t.double() if t.is_floating_point() else t for t in inputs])


def outputs_in_float64(run: Runner) -> Runner:
    """``run`` with its floating output tensors cast to float64 (to compare with a float64
    run of the same model)."""
    from torch.utils._pytree import tree_map

    return lambda inputs: tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and
                                   t.is_floating_point() else t, run(inputs))


def flatten_outputs(out: Any) -> Iterator[torch.Tensor]:
    """Tensors of a model's output, in the order torch's exporters (pytree) flatten it, which
    is the order of a .onnx file's outputs: sequences in order, dicts in insertion order.
    Anything that is not a tensor is skipped."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (list, tuple)):
        for o in out:
            yield from flatten_outputs(o)
    elif isinstance(out, Mapping):
        for o in out.values():
            yield from flatten_outputs(o)


# A tensor's place in an output structure built by ``described_structure``.
_SLOT = object()


def described_structure(desc: Any) -> Any:
    """The output structure that an architecture description (``graph.describe``) records,
    with a placeholder for each node's tensor; None when the description is malformed or the
    output holds a constant. ONNX files carry the description of the model they were exported
    from, and so the structure their flat outputs came from (``unflatten_outputs``).
    """
    try:
        output = desc["nodes"][-1]
        if output.get("op") != "output":
            return None
        (encoded,) = output["args"]["tuple"]
        return _template(encoded)
    except Exception:  # damaged or foreign metadata: the outputs stay flat
        return None


def _template(v: Any) -> Any:
    if isinstance(v, list):
        return [_template(x) for x in v]
    (tag, x), = v.items()
    if tag == "node" and isinstance(x, str):
        return _SLOT
    if tag == "tuple" and isinstance(x, list):
        return tuple(_template(y) for y in x)
    if tag == "dict" and isinstance(x, dict):
        return {str(k): _template(y) for k, y in x.items()}
    raise ValueError(f"no tensor structure: {tag}")  # a constant: exporters cannot give it


def unflatten_outputs(template: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """Put ``tensors`` (in ``flatten_outputs`` order) into ``template``'s places; None when
    their count does not match."""
    it = iter(tensors)
    try:
        out = _fill(template, it)
    except StopIteration:
        return None
    return out if next(it, None) is None else None


def _fill(template: Any, it: Iterator[torch.Tensor]) -> Any:
    if template is _SLOT:
        return next(it)
    if isinstance(template, list):
        return [_fill(t, it) for t in template]
    if isinstance(template, tuple):
        return tuple([_fill(t, it) for t in template])  # a generator would eat StopIteration
    return {k: _fill(t, it) for k, t in template.items()}


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
