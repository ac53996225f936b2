"""A fast slice of the torchvision zoo matrix (scripts/coverage.py runs the whole of it).

Each listed model is loaded the way users have it (state_dict + --arch), and every morph is
tried on a seeded sample of the layers ``inspect`` says it applies to: accepted morphs must be
exact, refusals must be MorphErrors with a reason, and nothing may crash. Every exact morph is
also compared with the original here, with plain torch on the check's own input shapes, so
that morph's check is not the only thing looking at the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from helpers import assert_same_function

import morphcli
from morphcli.graph.inputs import INPUTS_META, InputSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import zoo  # noqa: E402

LISTED = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
          "densenet121", "vgg11_bn", "convnext_tiny", "vit_b_16"]


def _compared(morph: str, gm, counts: dict[str, int]):
    """``morphcli.<morph>`` that also compares each exact result with ``gm`` (bound: 1e-5 of
    each output's scale, the tool's own; these models are 50 to 150 layers deep)."""
    real = getattr(morphcli, morph)
    specs = [InputSpec((2, *s.shape[1:]), s.dtype, s.high) for s in gm.meta[INPUTS_META]]

    def run(*args, **kwargs):
        new, result = real(*args, **kwargs)
        if result.exact and result.check is not None and result.check.equivalent:
            assert_same_function(gm, new, specs, rtol=1e-5, seeds=(5,))
            counts["compared"] += 1
        return new, result

    return run


@pytest.mark.parametrize("name", LISTED)
def test_zoo_slice(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gm = zoo.build(name)
    accepted = exact = 0
    counts = {"compared": 0}
    for morph in zoo.MORPHS:
        monkeypatch.setattr(morphcli, morph, _compared(morph, gm, counts))
    for morph in zoo.MORPHS:
        cell = zoo.run_cell(gm, morph, zoo.candidates(gm, morph, limit=2, seed=1))
        assert cell.failed == [], cell.failed
        assert cell.tried > 0, f"{name}: no layer accepts {morph}"
        accepted += cell.exact + cell.approx
        exact += cell.exact
    assert accepted > 0
    assert counts["compared"] == exact > 0  # every exact morph measured here too


def test_zoo_whole_pickle_with_trust_and_exports(tmp_path: Path) -> None:
    gm = zoo.build("mobilenet_v3_small", trust_pickle=True)
    status = zoo.export_roundtrip(gm, tmp_path)
    assert status == {suffix: "ok" for suffix in zoo.EXPORT_FORMATS}
