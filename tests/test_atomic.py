"""Writes are atomic: a failed or interrupted write leaves no output, no temporary file, and
an existing output untouched."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
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
