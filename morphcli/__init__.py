"""morphcli: function-preserving morphs for trained PyTorch networks.

>>> import morphcli
>>> model = morphcli.load("sample_models/cnn.pt")
>>> report = morphcli.check(model, model)
>>> report.equivalent
True

Heavy modules (torch) are imported only when one of the functions below is first used, so the
command line starts fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load": "morphcli.io.api",
    "save": "morphcli.writing",
    "check": "morphcli.equivalence.api",
    "CheckReport": "morphcli.equivalence.report",
    "MorphError": "morphcli.errors",
    "deepen": "morphcli.morphs.deepen",
    "widen": "morphcli.morphs.widen",
    "swap": "morphcli.morphs.swap",
    "MorphResult": "morphcli.morphs.result",
    "register_rule": "morphcli.rules.registry",
    "register_substitute": "morphcli.rules.registry",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'morphcli' has no attribute {name!r}")
