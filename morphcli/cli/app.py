"""``morph``: the Typer application. Each subcommand lives in its own module."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated, NoReturn

import typer

from morphcli import __version__
from morphcli.cli import check_cmd, deepen_cmd, export_cmd, inspect_cmd, swap_cmd, widen_cmd
from morphcli.cli.console import (
    finish_streams,
    guard_streams,
    interrupt_reported,
    interrupted_message,
    say,
)
from morphcli.errors import EXIT_USAGE, Interrupted, MorphError

app = typer.Typer(
    name="morph",
    help="Grow trained PyTorch networks with function-preserving morphs, and prove it.\n\n"
    "Exit codes: 0 success, 1 models not equivalent, 2 usage or input error, 3 internal error, "
    "4 stdout or stderr closed or broken, 128+N ended by signal N (130: Ctrl-C).",
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
    """The console script: run the command, then exit without the interpreter's teardown.

    Every outcome is one documented exit status: usage errors are one ``error:`` line (exit 2),
    SIGINT, SIGTERM and SIGHUP end the command cleanly (exit 128+N), and a closed or broken
    stdout or stderr is exit 4 (see ``console.guard_streams``)."""
    guard_streams()
    try:
        _handle_signals()
        code = _run()
        _block_signals()  # the command is over: a signal now must not raise past this block
    except KeyboardInterrupt as e:  # outside a command's own handling (while parsing, say)
        code = _interrupted(e)
    except SystemExit as e:
        code = e.code
    _exit_now(code)


def _run() -> object:
    try:
        from typer._click.exceptions import ClickException  # typer >= 0.17 vendors click
    except ImportError:  # pragma: no cover - older typer
        from click.exceptions import ClickException  # type: ignore[assignment]
    try:
        result = app(standalone_mode=False)
    except ClickException as e:
        # NoArgsIsHelpError: the help was printed already (exit 2, as click does).
        if type(e).__name__ != "NoArgsIsHelpError":
            _usage_error(e)
        return EXIT_USAGE
    except typer.Abort:  # click's answer to EOF at a prompt (morph never prompts) or Ctrl-C
        say("interrupted: nothing was written")
        return 130
    except MorphError as e:  # a closed or broken stream while printing help, say
        say(f"error: {e}")
        return e.exit_code
    # Exit(N) comes back as N; a command that returns (None) succeeded.
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _usage_error(e: Exception) -> None:
    """Click's usage message (a boxed usage block and hint) as one ``error:`` line."""
    text = str(e.format_message())  # type: ignore[attr-defined]
    message = " ".join(text.split()).rstrip(".") or type(e).__name__
    ctx = getattr(e, "ctx", None)
    where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    say(f"error: {message[:1].lower()}{message[1:]}{where}")


def _handle_signals() -> None:
    """SIGTERM and SIGHUP (``timeout``, ``kill``, a closed terminal) end the command as Ctrl-C
    does: raised as ``Interrupted`` (a KeyboardInterrupt), so the temporary file of a write
    is removed. Signals ignored at start (``nohup``) stay ignored."""
    for name in _SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _on_signal)


_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")
_stopping: list[int] = []


def _block_signals() -> None:
    if hasattr(signal, "pthread_sigmask"):
        signums = {getattr(signal, n) for n in _SIGNALS if hasattr(signal, n)}
        signal.pthread_sigmask(signal.SIG_BLOCK, signums)


def _on_signal(signum: int, frame: object) -> None:
    if _stopping:  # already stopping: let the first one's cleanup run to its end
        return
    _stopping.append(signum)
    exc = Interrupted(signum, signal.Signals(signum).name)
    atomic = sys.modules.get("morphcli.io.atomic")
    if atomic is None:
        raise exc
    atomic.deliver(exc)  # raised now, or when torch's C++ writer (or a rename) is done


def _interrupted(e: KeyboardInterrupt) -> int:
    say(interrupted_message(e, 0))
    return getattr(e, "exit_code", 130)


def _exit_now(code: object) -> NoReturn:
    """Finalising the interpreter after torch was imported takes 0.4 s (a third of a small
    command's time) and does nothing a finished command needs: files are closed by then, and
    the output streams are flushed here. Output that could not be written (a closed or broken
    stdout or stderr) makes a successful command exit 4; an error keeps its own status."""
    _block_signals()
    if isinstance(code, str):  # sys.exit("message"): printed, exit status 1
        say(code)
        code = 1
    status = 0 if code is None else code if isinstance(code, int) else 1
    if _stopping and status == 130:  # click's Exit(130) for a signal outside a command body
        status = 128 + _stopping[0]
        if not interrupt_reported():
            name = signal.Signals(_stopping[0]).name
            say(interrupted_message(Interrupted(_stopping[0], name), 0))
    status = finish_streams(status)
    os._exit(status)
