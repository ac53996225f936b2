"""Bounds of the numeric options, checked before any work by the CLI and the Python API alike.

Far above any useful value, low enough that a typo or a hostile script cannot ask for more
memory than the machine has, or for numbers that overflow deep inside torch (exit 3 there).
"""

from __future__ import annotations

import math
import operator
from typing import Any

from morphcli.errors import InputError

MAX_UNITS = 1 << 24  # units (features, channels) of one layer after widening
MAX_FACTOR = 1024.0  # --factor: Net2Net grows 2x to 4x; more is a typo
MAX_KERNEL = 63  # --kernel: the largest kernels in use (RepLKNet, SLaK) are 31 to 51
MAX_NEW_ELEMENTS = 1 << 30  # weights one morph may create: 4 GiB in float32
MAX_SEED = (1 << 63) - 1
MAX_SAMPLES = 100_000
MAX_BATCH_SIZE = 4096


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an integer in ``[low, high]``, else an InputError naming the range.

    >>> check_int("--seed", 7, 0, MAX_SEED)
    7
    """
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or not low <= number <= high:
        raise InputError(f"{name} {_show(value)} is out of range: expected an integer at "
                         f"least {low:,} and at most {high:,}")
    return number


def check_float(name: str, value: Any, low: float, high: float, *,
                above_low: bool = False) -> float:
    """``value`` if it is a finite number in ``[low, high]`` (``(low, high]`` with
    ``above_low``), else an InputError naming the range (NaN and infinities never pass)."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    inside = (number > low if above_low else number >= low) and number <= high
    if not (math.isfinite(number) and inside):
        start = f"above {low:g}" if above_low else f"at least {low:g}"
        raise InputError(f"{name} {_show(value)} is out of range: expected a finite number "
                         f"{start} and at most {high:g}")
    return number


def check_seed(value: Any) -> int:
    return check_int("--seed", value, 0, MAX_SEED)


def check_numbers(samples: Any, batch_size: Any, seed: Any, atol: Any, rtol: Any) -> None:
    """The checking options (CLI, ``CheckOptions``, ``morphcli.check``): typer's own bounds
    let NaN tolerances, infinities and 2**70 seeds through, and the API has none."""
    check_int("--samples", samples, 1, MAX_SAMPLES)
    check_int("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    check_seed(seed)
    check_float("--atol", atol, 0.0, 1e300)
    check_float("--rtol", rtol, 0.0, 1e300)


def check_new_elements(what: str, count: int) -> None:
    """Refuse a morph that would create more than MAX_NEW_ELEMENTS weights, before it does."""
    if count > MAX_NEW_ELEMENTS:
        raise InputError(f"{what} would hold {count:,} weights ({count * 4 / 2**30:.1f} GiB in "
                         f"float32), more than the {MAX_NEW_ELEMENTS:,} one morph may create; "
                         "grow it less")


def check_widen_numbers(to: int | None, by: int | None, factor: float | None,
                        noise: float = 0.0, kernel: int | None = None, seed: int = 0) -> None:
    """The numeric widen options, before any work (the width they give is checked against
    the layer once it is known, in ``morphs.widen``)."""
    if to is not None:
        check_int("--to", to, 1, MAX_UNITS)
    if by is not None:
        check_int("--by", by, 1, MAX_UNITS - 1)
    if factor is not None:
        if isinstance(factor, (int, float)) and math.isfinite(factor) and factor <= 1:
            raise InputError(f"--factor {factor:g} does not add a unit: it must be above 1 "
                             f"(and at most {MAX_FACTOR:g})")
        check_float("--factor", factor, 1.0, MAX_FACTOR, above_low=True)
    check_float("--noise", noise, 0.0, 1e6)
    if kernel is not None:
        check_int("--kernel", kernel, 1, MAX_KERNEL)
    check_seed(seed)


def _show(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
