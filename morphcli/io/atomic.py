"""Atomic writes: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from morphcli.errors import InputError

# Outputs this process moved into place, newest last: an interrupted command says which.
written: list[str] = []
# Characters tempfile.mkstemp puts between the prefix and the suffix.
_RANDOM_CHARS = 8


def check_output_path(out: Path, inputs: tuple[Path, ...] = (), *, stdin: bool = False) -> None:
    """Fail early, before any work, when ``out`` cannot be written or would replace an input
    (``stdin``: an input is read from stdin, which may be redirected from ``out`` itself)."""
    try:
        _check_output_path(out, inputs, stdin)
    except OSError as e:  # a path too long to look up, say
        raise InputError(f"output path {str(out)[:80]!r}: {os_reason(e)}; choose another "
                         "-o") from e


def _check_output_path(out: Path, inputs: tuple[Path, ...], stdin: bool) -> None:
    parent = out.parent if str(out.parent) else Path(".")
    limit = _name_max(parent)
    size = len(os.fsencode(out.name))
    if size > limit:
        raise InputError(f"output name {out.name[:40]!r}... is {size} bytes long; the "
                         f"filesystem allows {limit}, choose a shorter -o")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InputError(f"output directory {str(parent)!r} {what}")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {str(parent)!r} is not writable")
    if out.is_dir():
        raise InputError(f"output path {str(out)!r} is a directory")
    for src in inputs:
        if src.exists() and out.exists() and os.path.samefile(src, out):
            raise InputError(
                f"output {str(out)!r} is the input file; morph never overwrites its input, "
                "choose another -o"
            )
        if src.resolve() == out.resolve():
            raise InputError(
                f"output {str(out)!r} is the input file; morph never overwrites its input, "
                "choose another -o"
            )
    if stdin and _is_stdin(out):
        raise InputError(f"output {str(out)!r} is the file stdin reads the model from; morph "
                         "never overwrites its input, choose another -o")
    _probe(parent, out)


def _is_stdin(path: Path) -> bool:
    """Is file descriptor 0 redirected from the regular file ``path`` (``< path``)?"""
    try:
        fd0, st = os.fstat(0), os.stat(path)
    except OSError:
        return False
    return stat.S_ISREG(fd0.st_mode) and (fd0.st_dev, fd0.st_ino) == (st.st_dev, st.st_ino)


def _probe(parent: Path, out: Path) -> None:
    """Create (and remove) the temporary file the write will use: directories that look
    writable but are not (/sys, /proc, read-only mounts) fail now."""
    prefix, suffix = _temp_affixes(out)
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
    except OSError as e:
        raise InputError(f"cannot create a file in output directory {str(parent)!r}: "
                         f"{os_reason(e)}; choose another -o") from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(name)


def _name_max(parent: Path) -> int:
    try:
        return int(os.pathconf(parent, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _temp_affixes(out: Path) -> tuple[str, str]:
    """mkstemp's prefix and suffix for ``out``: ``.NAME.`` and ``.tmpSUFFIX``. A NAME too long
    for the whole to fit the name limit is cut, and a hash of it added (unique per name)."""
    parent = out.parent if str(out.parent) else Path(".")
    suffix = f".tmp{out.suffix}"
    room = _name_max(parent) - len(os.fsencode(suffix)) - _RANDOM_CHARS - 2  # the two dots
    name = out.name
    if len(os.fsencode(name)) > room:
        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:8]
        name = _cut(name, room - len(digest) - 1) + "~" + digest
    return f".{name}.", suffix


def _cut(name: str, size: int) -> str:
    """The longest start of ``name`` whose encoding fits ``size`` bytes (no split character)."""
    while name and len(os.fsencode(name)) > size:
        name = name[:-1]
    return name


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, else it vanishes.

    The temporary name keeps ``out``'s suffix, since some writers pick their format from it.
    An interruption (see ``deliver``) never falls between creating the temporary file and
    owning its removal, nor between the rename and recording it.
    """
    parent = out.parent if str(out.parent) else Path(".")
    prefix, suffix = _temp_affixes(out)
    tmp: Path | None = None
    try:
        with _holding():
            fd, tmp_name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
            tmp = Path(tmp_name)
            os.close(fd)
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _mode_for(out))
        yield tmp
        _fsync(tmp)
        with _holding():
            os.replace(tmp, out)
            written.append(str(out))
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {os_reason(e)}") from e
    finally:
        # Runs on errors and on interruptions alike: no partial file is left behind.
        with _holding(), contextlib.suppress(FileNotFoundError):
            if tmp is not None:
                tmp.unlink()


def write_atomic(out: Path, write: Callable[[Path], None]) -> None:
    with atomic_path(out) as tmp:
        write(tmp)


def _mode_for(out: Path) -> int:
    """The replaced file's permissions, or the umask's default for a new file."""
    try:
        return stat.S_IMODE(out.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_reason(e: OSError) -> str:
    """The reason an OS error gives, in words ("no space left on device")."""
    if e.errno == errno.ENOSPC:
        return "no space left on device"
    if e.errno == errno.EPIPE:
        return "broken pipe (its reader has exited)"
    if e.errno == errno.EBADF:
        return "the stream is closed"
    return e.strerror or str(e)


# Interruptions (signals) that arrived while an exception must not be raised (torch's C++ zip
# writer is running, or a file is being created or renamed): raised when that section ends.
_held: list[BaseException] = []
_hold_depth = 0


def deliver(exc: BaseException) -> None:
    """Raise ``exc``, an interruption, from a signal handler: now, or, inside a section that
    must not be cut (``latched``, the create and rename steps of ``atomic_path``), when that
    section ends. The console script's SIGINT, SIGTERM and SIGHUP handlers call this."""
    if _hold_depth:
        _held.append(exc)
        return
    _held.clear()
    raise exc


@contextlib.contextmanager
def _holding() -> Iterator[None]:
    global _hold_depth
    _hold_depth += 1
    try:
        yield
    finally:
        _hold_depth -= 1
        if not _hold_depth and _held:
            exc = _held[0]
            _held.clear()
            raise exc


@contextlib.contextmanager
def latched(f: BinaryIO) -> Iterator[BinaryIO]:
    """Wrap ``f`` for torch's zip writer (torch.save, torch.export.save): a failed write is
    raised as itself (OSError, KeyboardInterrupt) once torch is done, not lost or fatal. A
    signal delivered meanwhile (``deliver``) drops the remaining writes and is raised then."""
    latch = _LatchedWriter(f)
    with _holding():
        try:
            yield latch  # type: ignore[misc]
        except BaseException:
            if latch.error is not None:  # the write failed first: that is the cause to report
                raise latch.error from None
            raise
        if latch.error is not None:
            raise latch.error


class _LatchedWriter(io.RawIOBase):
    """A file for torch's C++ zip writer, which aborts the whole process (std::terminate) when
    a write fails (full disk, Ctrl-C) and it later finalises the archive, or masks the failure
    with its own RuntimeError. The first failure is kept and later writes are dropped, as are
    all writes once an interruption is held."""

    def __init__(self, f: Any) -> None:
        super().__init__()
        self.f = f
        self.error: BaseException | None = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return bool(self.f.seekable())

    def seek(self, offset: int, whence: int = 0) -> int:
        return int(self.f.seek(offset, whence))

    def tell(self) -> int:
        return int(self.f.tell())

    def write(self, data: Any) -> int:
        if self.error is None and not _held:
            try:
                self.f.write(data)
            except BaseException as e:  # OSError, KeyboardInterrupt: raised after torch returns
                self.error = e
        return len(data)

    def flush(self) -> None:
        if self.error is None and not _held:
            try:
                self.f.flush()
            except BaseException as e:
                self.error = e
