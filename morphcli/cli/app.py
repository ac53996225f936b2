"""``morph``: the Typer application. Each subcommand lives in its own module."""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer

from morphcli import __version__
from morphcli.cli import check_cmd, deepen_cmd, export_cmd, inspect_cmd, swap_cmd, widen_cmd

app = typer.Typer(
    name="morph",
    help="Grow trained PyTorch networks with function-preserving morphs, and prove it.\n\n"
    "Exit codes: 0 success, 1 models not equivalent, 2 usage or input error, 3 internal error.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"morph {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Grow trained PyTorch networks with function-preserving morphs."""


for _module in (inspect_cmd, check_cmd, export_cmd, widen_cmd, deepen_cmd, swap_cmd):
    _module.register(app)


def main() -> None:
    """The console script: run the command, then exit without the interpreter's teardown."""
    try:
        app()
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


def _exit_now(code: object) -> NoReturn:
    """Finalising the interpreter after torch was imported takes 0.4 s (a third of a small
    command's time) and does nothing a finished command needs: files are closed by then, and
    the output streams are flushed here."""
    if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
        print(code, file=sys.stderr)
        code = 1
    status = 0 if code is None else code if isinstance(code, int) else 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: Python would say nothing of it either
        status = status or 1
    os._exit(status)
