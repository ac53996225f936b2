"""What a morph did: the record every morph returns beside the new model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from morphcli.equivalence.report import CheckReport
from morphcli.morphs.plan import ResizePlan


@dataclass(frozen=True)
class Change:
    """One tensor or layer the morph added, resized or replaced."""

    action: str  # "added", "resized", "replaced", "rewired"
    name: str  # a layer path, a tensor key (``conv1.weight``) or a graph node
    old: list[int] | str | None = None  # old shape (tensors) or type (layers)
    new: list[int] | str | None = None
    note: str = ""


@dataclass
class MorphResult:
    morph: str
    target: str
    changes: list[Change] = field(default_factory=list)
    exact: bool = True  # False when the morph is approximate by request (noise, --approx)
    notes: list[str] = field(default_factory=list)
    check: CheckReport | None = None
    # When an exact morph fails the check: the same check in float64 (runner.check_in_float64);
    # if they agree there and the float32 difference is within both models' own round-off,
    # ``check`` becomes that re-check (it passes, and its note says so).
    float64_check: CheckReport | None = None
    plan: ResizePlan = field(default_factory=ResizePlan)  # what happened to each tensor

    def to_json(self) -> dict[str, Any]:
        return {
            "morph": self.morph,
            "target": self.target,
            "exact": self.exact,
            "changes": [asdict(c) for c in self.changes],
            "notes": list(self.notes),
            "resize_plan": self.plan.to_json(),
            "check": self.check.to_json() if self.check else None,
            "float64_check": self.float64_check.to_json() if self.float64_check else None,
        }
