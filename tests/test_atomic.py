"""Writes are atomic: a failed or interrupted write leaves no output, no temporary file, and
an existing output untouched."""

from __future__ import annotations

import dataclasses
import errno
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke, listing, sha256

import morphcli
from morphcli.errors import InputError, NotEquivalentError
from morphcli.io import formats
from morphcli.io.atomic import atomic_path

OLD = b"an older file that must survive a failed write\n"


def _failing_writer(exc: BaseException):
    """A .pt writer that writes half a real archive, then fails with ``exc``."""

    def write(gm, dest: Path) -> None:
        formats._write_archive(gm, dest)
        data = dest.read_bytes()
        dest.write_bytes(data[: len(data) // 2])
        raise exc

    return write


def _patch_writer(monkeypatch: pytest.MonkeyPatch, suffix: str, write) -> None:
    fmt = dataclasses.replace(formats.FORMATS[suffix], write=write)
    monkeypatch.setitem(formats.FORMATS, suffix, fmt)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("failure", ["interrupt", "enospc"])
def test_failed_write_leaves_nothing(samples: Path, monkeypatch: pytest.MonkeyPatch,
                                     failure: str, existing: bool) -> None:
    out = samples / "out.pt"
    if existing:
        out.write_bytes(OLD)
    before = listing(samples)
    src_hash = sha256(samples / "cnn.pt")
    exc: BaseException = (KeyboardInterrupt() if failure == "interrupt"
                          else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    _patch_writer(monkeypatch, ".pt", _failing_writer(exc))

    code, stdout, stderr = invoke("export", samples / "cnn.pt", "-o", out)

    if failure == "interrupt":
        assert code == 130
        assert_one_error_line(stderr, "interrupted", "nothing was written")
    else:
        assert code == 2
        assert_one_error_line(stderr, "error: cannot write", "out.pt", "no space left on device")
    assert stdout == ""
    assert listing(samples) == before  # no temporary ".out.pt.*.tmp.pt" left behind
    assert not any(".tmp" in name for name in listing(samples))
    if existing:
        assert out.read_bytes() == OLD
    else:
        assert not out.exists()
    assert sha256(samples / "cnn.pt") == src_hash


def test_failed_write_python_api(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = morphcli.load(samples / "mlp.pt")
    before = listing(samples)
    _patch_writer(monkeypatch, ".pt", _failing_writer(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        morphcli.save(model, samples / "x.pt")
    _patch_writer(monkeypatch, ".pt",
                  _failing_writer(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(InputError, match="no space left on device"):
        morphcli.save(model, samples / "x.pt")
    assert listing(samples) == before


def test_interrupt_during_verification(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The complete file exists only under its temporary name until it is verified."""
    import morphcli.writing as writing

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writing, "_verify", interrupted)
    before = listing(samples)
    code, _, stderr = invoke("export", samples / "mlp.pt", "-o", samples / "out.safetensors")
    assert code == 130
    assert_one_error_line(stderr, "interrupted")
    assert listing(samples) == before


def test_wrong_file_fails_verification(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that writes another model: the check fails (exit 1) and nothing is written."""
    real = formats._write_archive

    def write_perturbed(gm, dest: Path) -> None:
        with torch.no_grad():
            gm.fc3.bias[0] += 1.0
        try:
            real(gm, dest)
        finally:
            with torch.no_grad():
                gm.fc3.bias[0] -= 1.0

    _patch_writer(monkeypatch, ".pt", write_perturbed)
    out = samples / "out.pt"
    out.write_bytes(OLD)
    before = listing(samples)
    code, _, stderr = invoke("export", samples / "mlp.pt", "-o", out)
    assert code == 1
    assert_one_error_line(stderr, "does not reproduce the model", "nothing was written")
    assert listing(samples) == before
    assert out.read_bytes() == OLD

    model = morphcli.load(samples / "mlp.pt")
    with pytest.raises(NotEquivalentError, match=r"max abs diff 1,"):
        morphcli.save(model, samples / "again.pt")
    assert not (samples / "again.pt").exists()


def test_atomic_path_cleans_up_on_any_error(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.onnx.")
        assert tmp.suffix == ".onnx"  # writers that choose the format from the suffix see it
        tmp.write_bytes(b"partial")
        raise RuntimeError("boom")
    assert listing(tmp_path) == set()

    with atomic_path(out) as tmp:
        tmp.write_bytes(b"complete")
    assert listing(tmp_path) == {"out.onnx"}
    assert out.read_bytes() == b"complete"


def test_written_file_permissions(samples: Path) -> None:
    """A new file gets the umask's mode (not mkstemp's private 0600); a replaced one keeps its."""
    umask = os.umask(0)
    os.umask(umask)
    new = samples / "new.pt"
    assert invoke("export", samples / "mlp.pt", "-o", new).code == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask

    kept = samples / "kept.pt"
    kept.write_bytes(OLD)
    kept.chmod(0o640)
    assert invoke("export", samples / "mlp.pt", "-o", kept).code == 0
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    assert kept.read_bytes() != OLD


def test_same_model_gives_identical_bytes(samples: Path) -> None:
    a, b = samples / "a.pt", samples / "b.pt"
    assert invoke("export", samples / "cnn.pt", "-o", a).code == 0
    assert invoke("export", samples / "cnn.pt", "-o", b).code == 0
    assert sha256(a) == sha256(b)
    assert sha256(a) == sha256(samples / "cnn.pt")  # the sample was written the same way


MORPHS = {"deepen": ("--after", "conv3"), "widen": ("conv2", "--by", "4"),
          "swap": ("relu", "--to", "gelu")}


@pytest.mark.parametrize("failure", ["interrupt", "enospc"])
@pytest.mark.parametrize("command", list(MORPHS))
def test_morph_write_failure_leaves_nothing(samples: Path, monkeypatch: pytest.MonkeyPatch,
                                            command: str, failure: str) -> None:
    """Ctrl-C or a full disk halfway through writing a morph's result: no partial or temporary
    file, the input untouched (default output name beside it, and an explicit -o)."""
    exc: BaseException = (KeyboardInterrupt() if failure == "interrupt"
                          else OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    _patch_writer(monkeypatch, ".pt", _failing_writer(exc))
    before = listing(samples)
    src_hash = sha256(samples / "cnn.pt")
    for out in ((), ("-o", samples / "out.pt")):
        code, stdout, stderr = invoke(command, samples / "cnn.pt", *MORPHS[command], "-q", *out)
        if failure == "interrupt":
            assert code == 130
            assert_one_error_line(stderr, "interrupted: nothing was written")
        else:
            assert code == 2
            assert_one_error_line(stderr, "error: cannot write", "no space left on device")
        assert stdout == ""
        assert listing(samples) == before
        assert sha256(samples / "cnn.pt") == src_hash


def test_output_directory_not_writable(samples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any work. (The tests run as root, for whom every directory is writable,
    so os.access is made to say no, as it would for a user without write permission.)"""
    real = os.access
    locked = samples / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
        False if Path(p) == locked and mode & os.W_OK else real(p, mode, **kw)))
    before = listing(samples)
    for args in (("export", samples / "mlp.pt"), ("deepen", samples / "cnn.pt", "--after",
                                                  "conv3")):
        code, stdout, stderr = invoke(*args, "-o", locked / "out.pt")
        assert (code, stdout) == (2, "")
        assert_one_error_line(stderr, f"output directory '{locked}' is not writable")
    assert listing(samples) == before and listing(locked) == set()


def _limited_file_size(limit: int) -> None:
    """In the child process: writes past ``limit`` bytes fail with EFBIG, as on a full disk
    (SIGXFSZ ignored, so the write returns the error instead of killing the process)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2", ".onnx"])
def test_real_write_failure_in_every_writer(samples: Path, suffix: str) -> None:
    """Each format's writer (torch.save, safetensors, torch.export's C++ zip writer, onnx) hits
    a real failing write() in a real process: one error line, exit 2, nothing left behind."""
    out = samples / f"out{suffix}"
    before = listing(samples)
    env = {**os.environ, "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "morphcli", "export", samples / "mlp.pt",
                           "-o", out], capture_output=True, env=env, timeout=300,
                          preexec_fn=lambda: _limited_file_size(8192))
    stderr = proc.stderr.decode()
    assert proc.returncode == 2, stderr
    assert_one_error_line(stderr, f"error: cannot write '{out}': File too large")
    assert listing(samples) == before


def test_stdout_on_a_full_disk(samples: Path) -> None:
    """``-o -`` into a full device: one error line and exit 4 (output lost), not a traceback."""
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "morphcli", "export", samples / "mlp.pt",
                               "-o", "-"], stdout=full, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == 4  # a failed write to stdout (issue 11)
    assert_one_error_line(proc.stderr.decode(), "error: cannot write to stdout: no space left")


def test_the_file_is_on_disk_before_it_is_renamed_into_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary file is fsynced, complete, and only then renamed: a crash just after the
    rename must not leave an empty or partial output under the real name (the data would
    still sit in the page cache, the rename already on disk)."""
    from morphcli.io import atomic

    events: list[tuple[str, str, int]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src: os.PathLike[str] | str, dst: os.PathLike[str] | str) -> None:
        events.append(("replace", os.fspath(src), os.path.getsize(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "model.pt"
    atomic.write_atomic(out, lambda tmp: tmp.write_bytes(OLD))
    assert out.read_bytes() == OLD
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("replace") == 1, events
    _, renamed, size = events[kinds.index("replace")]
    synced = [e for e in events[:kinds.index("replace")] if e[0] == "fsync" and e[1] == renamed]
    assert synced, f"{renamed} renamed into place without an fsync first: {events}"
    assert synced[-1][2] == size == len(OLD)
    assert listing(tmp_path) == {"model.pt"}
