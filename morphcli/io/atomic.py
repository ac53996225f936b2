"""Atomic writes: a temporary file beside the target, renamed into place only when complete."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from morphcli.errors import InputError


def check_output_path(out: Path, inputs: tuple[Path, ...] = ()) -> None:
    """Fail early, before any work, when ``out`` cannot be written or would replace an input."""
    parent = out.parent if str(out.parent) else Path(".")
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


@contextlib.contextmanager
def atomic_path(out: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it replaces ``out``, else it vanishes.

    The temporary name keeps ``out``'s suffix, since some writers pick their format from it.
    """
    parent = out.parent if str(out.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=f".tmp{out.suffix}", dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        os.chmod(tmp, _mode_for(out))
        yield tmp
        _fsync(tmp)
        os.replace(tmp, out)
    except OSError as e:
        raise InputError(f"cannot write {str(out)!r}: {os_reason(e)}") from e
    finally:
        # Runs on errors and on KeyboardInterrupt alike: no partial file is left behind.
        with contextlib.suppress(FileNotFoundError):
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
    return e.strerror or str(e)


@contextlib.contextmanager
def latched(f: BinaryIO) -> Iterator[BinaryIO]:
    """Wrap ``f`` for torch's zip writer (torch.save, torch.export.save): a failed write is
    raised as itself (OSError, KeyboardInterrupt) once torch is done, not lost or fatal."""
    latch = _LatchedWriter(f)
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
    with its own RuntimeError. The first failure is kept and later writes are dropped."""

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

    def write(self, data: Any) -> int:  # type: ignore[override]
        if self.error is None:
            try:
                self.f.write(data)
            except BaseException as e:  # OSError, KeyboardInterrupt: raised after torch returns
                self.error = e
        return len(data)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.f.flush()
            except BaseException as e:
                self.error = e
