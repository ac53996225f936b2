"""The result of an equivalence check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Defaults suited to float32 round-off; the tolerance is relative to the output's scale:
# equivalent when max|a - b| <= atol + rtol * max|a| for every output of every batch.
# (A re-check after an exact morph failed adds both models' measured float32 round-off.)
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 0.0
DEFAULT_SAMPLES = 8
DEFAULT_BATCH_SIZE = 4
# Floating-point inputs are normal samples times these scales, cycled over batches (integer
# inputs, token ids, keep their range). They span six orders of magnitude so that a model that
# differs only on large inputs (a clamp, a saturation) or tiny ones (an epsilon, a bias) fails;
# unit scale first, then the extremes, so the default three batches already span them all.
INPUT_SCALES = (1.0, 1e-3, 1e3, 10.0)


@dataclass(frozen=True)
class OutputDiff:
    """One output tensor, figures from its worst batch. ``index`` counts tensors in
    ``flatten_outputs`` order; ``path`` locates the tensor in the output (``output[1]['x']``)."""

    index: int
    shape_a: list[int]
    shape_b: list[int]
    max_abs: float
    max_rel: float
    scale: float
    path: str = "output"
    dtype_a: str = ""
    dtype_b: str = ""
    input_scale: float = 1.0  # the scale of the inputs of that batch
    # Both models' own float32 round-off on that batch (each against its float64 run), added
    # to the tolerance; 0 when not measured (see ``compare``'s ``references``).
    round_off: float = 0.0


@dataclass
class CheckReport:
    """``equivalent`` is the verdict; the figures say by how much the models differ."""

    equivalent: bool
    max_abs: float
    max_rel: float
    atol: float
    rtol: float
    samples: int
    batch_size: int
    seed: int
    outputs: list[OutputDiff] = field(default_factory=list)
    reason: str | None = None
    batch_sizes: list[int] = field(default_factory=list)  # the batches run, in order
    input_scales: list[float] = field(default_factory=list)  # the input scale of each batch
    # False when a model's runtime gives only a flat list of tensors (ONNX): then only the
    # tensors were compared, not the containers, keys and plain values around them.
    structure_compared: bool = True
    notes: list[str] = field(default_factory=list)
    dtype: str = "float32"  # the dtype both models ran in (a bf16 model is checked in float32)

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def summary(self) -> str:
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        text = (f"{verdict}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g} "
                f"over {self.samples} samples (atol {self.atol:g}, rtol {self.rtol:g})")
        return "; ".join([text, *([self.reason] if self.reason else []), *self.notes])


def _finite(v: Any) -> Any:
    """JSON has no NaN or Infinity: write them as strings."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v
