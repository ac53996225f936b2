"""Progress bars for the steps that can take seconds (loading, checking, writing), on stderr.

Shown only when stderr is a terminal and not ``--quiet``; they vanish when the step ends, so
what stays on screen (and what a pipe or a log gets) is the same as without them. The core never
draws anything: it takes an optional ``progress(done, total)`` callback.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from morphcli.cli.console import err

# (units done, units in all)
Update = Callable[[int, int], None]


def _ignore(done: int, total: int) -> None:
    pass


def shown(quiet: bool) -> bool:
    return not quiet and err.is_terminal


@contextmanager
def step(description: str, *, quiet: bool, total: int | None = None) -> Iterator[Update]:
    """A transient bar (``total`` known) or spinner for one step; yields its update callback.

    >>> with step("checking", quiet=False, total=8) as update:
    ...     update(4, 8)
    """
    if not shown(quiet):
        yield _ignore
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [SpinnerColumn(), TextColumn("{task.description}")]
    if total is not None:
        columns += [BarColumn(), MofNCompleteColumn()]
    with Progress(*columns, TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, of: int) -> None:
            bar.update(task, completed=done, total=of)

        yield update
