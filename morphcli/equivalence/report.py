"""The result of an equivalence check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Defaults suited to float32 round-off; the tolerance is relative to the output's scale:
# equivalent when max|a - b| <= atol + rtol * max|a| for every output of every batch.
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 0.0
DEFAULT_SAMPLES = 8
DEFAULT_BATCH_SIZE = 4
# Input distributions, cycled over batches: unit normal, then a larger scale.
INPUT_SCALES = (1.0, 10.0)


@dataclass(frozen=True)
class OutputDiff:
    index: int
    shape_a: list[int]
    shape_b: list[int]
    max_abs: float
    max_rel: float
    scale: float


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

    def to_json(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def summary(self) -> str:
        verdict = "equivalent" if self.equivalent else "NOT equivalent"
        text = (f"{verdict}: max abs diff {self.max_abs:.3g}, max rel diff {self.max_rel:.3g} "
                f"over {self.samples} samples (atol {self.atol:g}, rtol {self.rtol:g})")
        return f"{text}; {self.reason}" if self.reason else text


def _finite(v: Any) -> Any:
    """JSON has no NaN or Infinity: write them as strings."""
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return str(v)
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v
