"""Where the CLI writes: results on stdout, human messages on stderr, errors as one line."""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from morphcli.errors import EXIT_INTERNAL, MorphError, MorphWarning

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


@contextmanager
def handled(debug: bool = False) -> Iterator[None]:
    """Turn every failure into one clear line on stderr and a documented exit code, and each
    warning the core raises (MorphWarning) into one ``warning: ...`` line."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", MorphWarning)  # each distinct message once
        warnings.showwarning = _show_warning(warnings.showwarning)
        with _errors_handled(debug):
            yield


def _show_warning(fallback: Callable[..., None]) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, MorphWarning):
            err.print(f"warning: {message}", markup=False, highlight=False)
        else:
            fallback(message, category, *args, **kwargs)

    return show


@contextmanager
def _errors_handled(debug: bool) -> Iterator[None]:
    try:
        yield
    except typer.Exit:
        raise
    except MorphError as e:
        _fail(f"error: {e}", e.exit_code, debug)
    except KeyboardInterrupt:
        _fail("interrupted: nothing was written", 130, debug)
    except MemoryError:
        _fail("error: out of memory", EXIT_INTERNAL, debug)
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        first = (str(e).strip().splitlines() or [""])[0]
        _fail(f"internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
              EXIT_INTERNAL, debug)


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        traceback.print_exc()
    err.print(message, markup=False, highlight=False)
    raise typer.Exit(code)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        err.print(message, markup=False, highlight=False)


def refuse_json_with_stdout_model(output: str | None, as_json: bool, default: bool = False) -> None:
    """The model and the JSON document cannot share stdout; say so before any work."""
    if as_json and output == "-":
        from morphcli.errors import InputError

        how = "reading MODEL from stdin, the model goes" if default else "-o - writes the model"
        raise InputError(f"{how} to stdout, where --json would print too; drop --json or "
                         "pass -o FILE")


def shapes_arg(values: list[str] | None) -> list[tuple[int, ...]] | None:
    from morphcli.graph.inputs import parse_shape

    return [parse_shape(v) for v in values] if values else None
