"""A fast slice of the torchvision zoo matrix (scripts/coverage.py runs the whole of it).

Each listed model is loaded the way users have it (state_dict + --arch), and every morph is
tried on a seeded sample of the layers ``inspect`` says it applies to: accepted morphs must be
exact, refusals must be MorphErrors with a reason, and nothing may crash.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import zoo  # noqa: E402

LISTED = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "densenet121", "vgg11_bn", "convnext_tiny", "vit_b_16"]


@pytest.mark.parametrize("name", LISTED)
def test_zoo_slice(name: str) -> None:
    gm = zoo.build(name)
    accepted = 0
    for morph in zoo.MORPHS:
        cell = zoo.run_cell(gm, morph, zoo.candidates(gm, morph, limit=2, seed=1))
        assert cell.failed == [], cell.failed
        assert cell.tried > 0, f"{name}: no layer accepts {morph}"
        accepted += cell.exact + cell.approx
    assert accepted > 0


def test_zoo_whole_pickle_with_trust_and_exports(tmp_path: Path) -> None:
    gm = zoo.build("mobilenet_v3_small", trust_pickle=True)
    status = zoo.export_roundtrip(gm, tmp_path)
    assert status == {suffix: "ok" for suffix in zoo.EXPORT_FORMATS}
