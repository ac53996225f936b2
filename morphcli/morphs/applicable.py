"""Which morphs apply to a layer (temporary: filled in with the morphs)."""
from __future__ import annotations


def applicable_morphs(gm, layer) -> list[str]:
    return []
