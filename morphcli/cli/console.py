"""Where the CLI writes: results on stdout, human messages on stderr, errors as one line."""

from __future__ import annotations

import errno
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console

from morphcli.errors import (
    EXIT_INTERNAL,
    EXIT_STREAM,
    InputError,
    Interrupted,
    MorphError,
    MorphWarning,
    StreamError,
)

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


# The standard streams' state in this process: closed when it started, or lost (a write failed).
_closed: set[str] = set()
_lost: dict[str, str] = {}
_interrupt_reported: list[bool] = []


def guard_streams() -> None:
    """For the console script, before anything is printed: a closed stdin, stdout or stderr
    gets /dev/null on its file descriptor (so no file opened later takes fd 1 and receives
    output), and sys.stdout / sys.stderr become guards: a write to stdout that fails (closed,
    broken pipe, short) raises StreamError, exit 4; one to stderr is dropped and noted, and
    ``finish_streams`` turns a success into exit 4. Errors keep their own exit status."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is None or not _fd_open(fd):
            _closed.add(name)
            _reopen_devnull(fd)
    sys.stdout = _Guard("stdout", None if "stdout" in _closed else sys.stdout)
    sys.stderr = _Guard("stderr", None if "stderr" in _closed else sys.stderr)


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _reopen_devnull(fd: int) -> None:
    if _fd_open(fd):  # already taken by a file opened since start: leave it
        return
    null = os.open(os.devnull, os.O_RDWR)
    if null != fd:
        os.dup2(null, fd)
        os.close(null)


class _Guard:
    """sys.stdout or sys.stderr (text, or ``.buffer`` for bytes) that reports lost output."""

    def __init__(self, name: str, stream: Any) -> None:
        self._name, self._stream = name, stream

    def write(self, data: Any) -> int:
        if self._stream is None:
            return self._failed(OSError(errno.EBADF, "closed when morph started"), len(data))
        if self._name in _lost:  # failed once: do not keep trying (stdout: nor pretend)
            if self._name == "stdout":
                raise StreamError(f"cannot write to stdout: {_lost['stdout']}")
            return len(data)
        try:
            return int(self._stream.write(data) or 0)
        except (OSError, ValueError) as e:
            return self._failed(e, len(data))

    def flush(self) -> None:
        if self._stream is None or self._name in _lost:
            return
        try:
            self._stream.flush()
        except (OSError, ValueError) as e:
            self._failed(e, 0)

    def _failed(self, e: Exception, size: int) -> int:
        reason = _stream_reason(e)
        if self._name == "stdout":
            _lost.setdefault("stdout", reason)
            raise StreamError(f"cannot write to stdout: {reason}") from e
        _lost.setdefault(self._name, reason)
        return size

    @property
    def buffer(self) -> _Guard:
        inner = None if self._stream is None else self._stream.buffer
        return _Guard(self._name, inner)

    def isatty(self) -> bool:
        return self._stream is not None and bool(self._stream.isatty())

    def fileno(self) -> int:
        if self._stream is None:
            raise OSError(errno.EBADF, f"{self._name} is closed")
        return int(self._stream.fileno())

    def __getattr__(self, attr: str) -> Any:
        if self._stream is None:
            raise AttributeError(attr)
        return getattr(self._stream, attr)


def _stream_reason(e: Exception) -> str:
    if isinstance(e, OSError):
        from morphcli.io.atomic import os_reason

        return os_reason(e)
    return str(e) or type(e).__name__


def finish_streams(status: int) -> int:
    """Flush stdout and stderr at exit; the final status (4 where a success lost output)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except StreamError as e:
            say(f"error: {e}")
        except (OSError, ValueError, AttributeError):  # not guarded (no console script)
            _lost.setdefault("stderr", "flush failed")
    if _lost and status == 0:
        return EXIT_STREAM
    return status


def say(message: str) -> None:
    """One line on stderr that never raises (stderr itself may be closed or broken)."""
    try:
        err.print(message, markup=False, highlight=False)
    except Exception:
        _lost.setdefault("stderr", "write failed")


def require_stdin() -> None:
    """Reading a model from '-' needs a stdin; a closed one is an input error, not a bug."""
    if "stdin" in _closed or sys.stdin is None:
        raise InputError("stdin is closed, and MODEL '-' reads the model from it; pipe a model "
                         "in (morph ... -o - | morph ... -) or name a file")


def interrupted_message(e: KeyboardInterrupt, mark: int) -> str:
    """``interrupted: nothing was written``, naming the signal unless it was Ctrl-C, and the
    outputs (recorded after ``mark``) that were complete and in place before it came."""
    _interrupt_reported.append(True)
    by = f" by {e.name}" if isinstance(e, Interrupted) and e.name != "SIGINT" else ""
    atomic = sys.modules.get("morphcli.io.atomic")
    done = atomic.written[mark:] if atomic is not None else []
    if done:
        return f"interrupted{by}, after writing {', '.join(done)}"
    return f"interrupted{by}: nothing was written"


def interrupt_reported() -> bool:
    return bool(_interrupt_reported)


def _show_warning(fallback: Callable[..., None]) -> Callable[..., None]:
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, MorphWarning):
            err.print(f"warning: {message}", markup=False, highlight=False)
        else:
            fallback(message, category, *args, **kwargs)

    return show


@contextmanager
def _errors_handled(debug: bool) -> Iterator[None]:
    atomic = sys.modules.get("morphcli.io.atomic")
    mark = len(atomic.written) if atomic is not None else 0
    try:
        yield
    except typer.Exit:
        raise
    except MorphError as e:
        _fail(f"error: {e}", e.exit_code, debug)
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM / SIGHUP (errors.Interrupted)
        _fail(interrupted_message(e, mark), getattr(e, "exit_code", 130), debug)
    except BrokenPipeError as e:  # an output pipe not guarded (the console script guards)
        _fail(f"error: cannot write output: {_stream_reason(e)}", EXIT_STREAM, debug)
    except MemoryError:
        _fail("error: out of memory", EXIT_INTERNAL, debug)
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        first = (str(e).strip().splitlines() or [""])[0]
        _fail(f"internal error: {type(e).__name__}: {first} (run with --debug for the traceback)",
              EXIT_INTERNAL, debug)


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    if debug:
        try:
            traceback.print_exc()
        except Exception:
            _lost.setdefault("stderr", "write failed")
    say(message)
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
