"""``--arch MODULE:CALLABLE``: build the user's architecture for a bare state_dict.

Only the module the user named is imported; nothing named inside a checkpoint ever is.
"""

from __future__ import annotations

import importlib
import json
from typing import Any

from torch import nn

from morphcli.errors import InputError

MAX_KWARGS_CHARS = 1 << 20


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    if len(text) > MAX_KWARGS_CHARS:
        raise InputError(f"--arch-kwargs is {len(text):,} characters long; at most "
                         f"{MAX_KWARGS_CHARS:,}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--arch-kwargs is not valid JSON: {e.msg} at column {e.colno}") from e
    except RecursionError as e:  # nesting deeper than Python's recursion limit
        raise InputError("--arch-kwargs is nested too deeply to parse; keyword arguments of "
                         "an architecture are a flat JSON object") from e
    except ValueError as e:  # an integer of more than 4300 digits, say
        raise InputError(f"--arch-kwargs cannot be read: {e}") from e
    if not isinstance(value, dict):
        raise InputError("--arch-kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def build_arch(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """``build_arch("torchvision.models:resnet18", {"num_classes": 10})`` -> the model."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"bad --arch {spec!r}: expected MODULE:CALLABLE, "
                         "e.g. torchvision.models:resnet18")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise InputError(f"--arch: cannot import module {module_name!r}: {e}") from e
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise InputError(f"--arch: module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise InputError(f"--arch: {spec!r} is not callable")
    kwargs = dict(kwargs or {})
    try:
        model = factory(**kwargs)
    except Exception as e:  # RecursionError included
        raise InputError(f"--arch: calling {spec}(**{_short(kwargs)}) failed: "
                         f"{_short(e)}") from e
    if not isinstance(model, nn.Module):
        raise InputError(f"--arch: {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def _short(value: Any) -> str:
    """A bounded text of ``value`` (a deep or huge --arch-kwargs must not flood the line)."""
    try:
        text = str(value)
    except RecursionError:
        text = f"<{type(value).__name__} nested too deeply to show>"
    return text if len(text) <= 200 else text[:197] + "..."
