"""``morph``: the Typer application. Each subcommand lives in its own module."""

from __future__ import annotations

from typing import Annotated

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
    app()
