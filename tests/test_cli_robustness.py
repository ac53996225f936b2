"""The CLI never lies with its exit code, and every bad value is one line (issue 11).

Signals mid-write, closed and broken streams, usage errors, out-of-range numbers, unwritable
output paths, and inputs that used to be reported as bugs (exit 3) or not at all.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke, listing, run_cli, sha256

import morphcli
from morphcli.errors import InputError

ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
MORPH = [sys.executable, "-m", "morphcli"]


def _run(args: list[str | Path], *, close: tuple[int, ...] = (), stdin: object = None,
         timeout: float = 300) -> tuple[int, str, str]:
    """``morph ARGS`` in a fresh interpreter with the file descriptors ``close`` closed."""
    def before() -> None:
        for fd in close:
            os.close(fd)

    proc = subprocess.run([*MORPH, *map(str, args)], stdin=stdin or subprocess.DEVNULL,
                          capture_output=True, env=ENV, timeout=timeout, preexec_fn=before)
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


# ---------------------------------------------------------------- signals during a write


def _big_state_dict(folder: Path, width: int = 2048) -> tuple[Path, list[str]]:
    """A Linear state_dict of ``width**2`` weights (16 MB at 2048) and the arguments that
    load it: its write takes long enough to be caught under way."""
    path = folder / "big.pt"
    torch.save({"weight": torch.randn(width, width), "bias": torch.randn(width)}, path)
    return path, ["--arch", "torch.nn:Linear", "--arch-kwargs",
                  f'{{"in_features": {width}, "out_features": {width}}}', "--input-shape",
                  f"1,{width}"]


def _signal_mid_write(src: Path, load: list[str], out: Path, signum: int) -> tuple[int, str, int]:
    """Export ``src`` to ``out``; send ``signum`` once the temporary file holds data. Returns
    (exit code, stderr, bytes the temporary file held when the signal was sent)."""
    proc = subprocess.Popen([*MORPH, "export", str(src), *load, "-o", str(out)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV)
    held = 0
    deadline = time.monotonic() + 240
    while proc.poll() is None and not held and time.monotonic() < deadline:
        for f in out.parent.iterdir():
            if ".tmp" in f.name:
                try:
                    held = f.stat().st_size
                except FileNotFoundError:
                    held = 0
                if held:
                    proc.send_signal(signum)
                    break
        time.sleep(0.001)
    _, stderr = proc.communicate(timeout=240)
    return proc.returncode, stderr.decode(), held


def _signal_cases(tries: int) -> list:
    cases = [("SIGTERM", ".pt"), ("SIGHUP", ".pt")]
    if tries > 1:
        cases.append(("SIGTERM", ".safetensors"))
    return [pytest.param(name, suffix, i, id=f"{name}-{suffix[1:]}-{i}") for name, suffix in
            cases for i in range(tries)]


def _check_signal_mid_write(tmp_path: Path, name: str, suffix: str) -> None:
    src, load = _big_state_dict(tmp_path)
    out = tmp_path / f"out{suffix}"
    before = listing(tmp_path)
    signum = getattr(signal, name)
    code, stderr, held = _signal_mid_write(src, load, out, signum)
    assert held > 0, f"the write ended before the signal could be sent: {stderr}"
    assert listing(tmp_path) == before  # no ".out.pt.*.tmp.pt" left, no output
    assert code == 128 + signum, stderr
    assert_one_error_line(stderr, f"interrupted by {name}: nothing was written")


@pytest.mark.parametrize("name,suffix,attempt", _signal_cases(1))
def test_signal_mid_write_leaves_no_temporary_file(tmp_path: Path, name: str, suffix: str,
                                                   attempt: int) -> None:
    """SIGTERM / SIGHUP while torch's C++ zip writer (or safetensors') is writing: the
    temporary file is removed, one line, exit 128+N (the old code died and left it)."""
    _check_signal_mid_write(tmp_path, name, suffix)


@pytest.mark.slow
@pytest.mark.parametrize("name,suffix,attempt", _signal_cases(5))
def test_signal_mid_write_repeated(tmp_path: Path, name: str, suffix: str, attempt: int) -> None:
    _check_signal_mid_write(tmp_path, name, suffix)


def test_interruption_is_held_while_torch_writes(tmp_path: Path) -> None:
    """An interruption delivered inside torch.save (as the signal handler does) is raised
    only after torch returns, and the write is abandoned: no crash, no file."""
    from morphcli.errors import Interrupted
    from morphcli.io import atomic

    out = tmp_path / "x.pt"
    calls = []

    class Stopping(dict):
        def __reduce__(self):  # runs while torch's writer is open: "the signal arrives"
            calls.append(1)
            atomic.deliver(Interrupted(signal.SIGTERM, "SIGTERM"))
            return dict, (dict(self),)

    with pytest.raises(Interrupted), atomic.atomic_path(out) as tmp:
        with tmp.open("wb") as f, atomic.latched(f) as safe:
            torch.save({"a": Stopping(), "t": torch.zeros(1000)}, safe)
    assert calls == [1]
    assert listing(tmp_path) == set()
    assert atomic._held == []


# ---------------------------------------------------------------- closed and broken streams


def test_closed_stdout_is_not_a_failed_check(samples: Path) -> None:
    """``morph check a a >&-`` used to exit 1 (not equivalent) with tracebacks: check writes
    nothing to stdout, so it succeeds; output that is lost (the version here) is exit 4."""
    model = samples / "mlp.pt"
    code, _, stderr = _run(["check", model, model], close=(1,))
    assert code == 0, stderr
    assert_one_error_line(stderr, "equivalent: max abs diff 0")
    code, _, stderr = _run(["--version"], close=(1,))
    assert code == 4, stderr
    assert_one_error_line(stderr, "error: cannot write to stdout", "closed")


def test_closed_stderr_keeps_the_error_code(samples: Path) -> None:
    """With ``2>&-`` every error used to become exit 1 (a traceback on the missing stderr)."""
    code, stdout, _ = _run(["check", samples / "mlp.pt", samples / "mlp.pt", "--samples", "0"],
                           close=(2,))
    assert (code, stdout) == (2, "")  # a usage error (typer's)
    code, _, _ = _run(["check", samples / "mlp.pt", samples / "mlp.pt", "--seed", "-1"],
                      close=(2,))
    assert code == 2  # an input error (morph's)
    # A success whose messages were lost says so: exit 4.
    code, _, _ = _run(["check", samples / "mlp.pt", samples / "mlp.pt"], close=(2,))
    assert code == 4


def test_closed_stdin_is_an_input_error(samples: Path) -> None:
    """``morph inspect - <&-`` used to exit 3 (AttributeError)."""
    for args in (["inspect", "-"], ["check", "-", samples / "mlp.pt"]):
        code, stdout, stderr = _run(args, close=(0,))
        assert (code, stdout) == (2, ""), stderr
        assert_one_error_line(stderr, "error: stdin is closed")


def test_broken_stdout_pipe_is_exit_4(samples: Path) -> None:
    """``morph export cnn.pt -o - | head -c 100`` used to exit 0: the short write was
    ignored. The 0.4 MB archive is larger than the pipe's buffer, so the loss is certain."""
    assert (samples / "cnn.pt").stat().st_size > 4 * 65536
    proc = subprocess.Popen([*MORPH, "export", samples / "cnn.pt", "-o", "-"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(100)
    proc.stdout.close()  # the reader leaves, as head does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 4, stderr
    assert head[:2] == b"PK"
    assert_one_error_line(stderr, "error: cannot write to stdout", "broken pipe")


def test_short_write_to_stdout_raises() -> None:
    """A stream that accepts part of the data without an error (a BufferedWriter whose
    reader left) is written to the end, and the next write's failure is the error."""
    from morphcli.errors import StreamError
    from morphcli.writing import _write_all

    class Pipe:
        def __init__(self) -> None:
            self.got = 0

        def write(self, data: memoryview) -> int:
            if self.got:
                raise BrokenPipeError(32, "Broken pipe")
            self.got = min(len(data), 65536)
            return self.got

    pipe = Pipe()
    with pytest.raises(BrokenPipeError):
        _write_all(pipe, b"x" * 200_000)  # type: ignore[arg-type]
    assert pipe.got == 65536
    assert issubclass(StreamError, morphcli.errors.MorphError)


# ---------------------------------------------------------------- usage errors: one line


@pytest.mark.parametrize("args,needle", [
    (["deepen", "M", "--after", "conv3", "--kernel", "0"], "'--kernel'"),
    (["check", "M", "M", "--rtol", "-1"], "'--rtol'"),
    (["check", "M", "M", "--atol", "nan"], "'--atol'"),
    (["check", "M", "M", "--batch-size", "0"], "'--batch-size'"),
    (["widen"], "missing argument 'model'"),
    (["no-such-command"], "no such command 'no-such-command'"),
    (["inspect", "M", "--no-such-option"], "no such option"),
])
def test_usage_errors_are_one_line(samples: Path, args: list[str], needle: str) -> None:
    """typer printed a boxed usage block of five lines; now one ``error:`` line, exit 2."""
    args = [str(samples / "mlp.pt") if a == "M" else a for a in args]
    code, stdout, stderr = run_cli(*args)
    assert (code, stdout) == (2, "")
    line = assert_one_error_line(stderr, "error: ", needle)
    assert line.startswith("error: ") and "--help" in line


def test_help_still_works() -> None:
    code, stdout, stderr = run_cli("--help")
    assert code == 0 and "Usage" in stdout and "4 stdout or stderr" in stdout, stderr
    code, stdout, _ = run_cli("widen", "--help")
    assert code == 0 and "--factor" in stdout
    code, stdout, _ = run_cli()  # no arguments: the help, exit 2 as before
    assert code == 2 and "Usage" in stdout


# ---------------------------------------------------------------- numbers, before any work

BAD_NUMBERS = [
    (["widen", "M", "fc1", "--factor", "nan"], "--factor nan"),
    (["widen", "M", "fc1", "--factor", "inf"], "--factor inf"),
    (["widen", "M", "fc1", "--factor", "1e308"], "--factor 1e+308"),
    (["widen", "M", "fc1", "--factor", "100000"], "--factor 100000"),
    (["widen", "M", "fc1", "--factor", "0.5"], "does not add a unit"),
    (["widen", "M", "fc1", "--by", "100000000"], "--by 100000000"),
    (["widen", "M", "fc1", "--to", str(10**20)], f"--to {10**20}"),
    (["widen", "M", "conv2", "--kernel", "99999"], "--kernel 99999"),
    (["widen", "M", "fc1", "--by", "2", "--noise", "inf"], "--noise inf"),
    (["deepen", "M", "--after", "conv3", "--kernel", "99999"], "--kernel 99999"),
    (["widen", "M", "fc1", "--by", "2", "--seed", str(10**23)], f"--seed {10**23}"),
    (["deepen", "M", "--after", "conv3", "--seed", "-1"], "--seed -1"),
    (["swap", "M", "relu", "--to", "gelu", "--samples", str(10**9)], "--samples"),
    (["check", "M", "M", "--atol", "inf"], "--atol inf"),
    (["check", "M", "M", "--rtol", "1e400"], "--rtol inf"),
    (["check", "M", "M", "--batch-size", "1000000"], "--batch-size 1000000"),
]


@pytest.mark.parametrize("args,needle", BAD_NUMBERS,
                         ids=[" ".join(a[2:] if a[0] != "check" else a[3:]) for a, _ in
                              BAD_NUMBERS])
def test_numbers_out_of_range_fail_before_any_work(tmp_path: Path, args: list[str],
                                                   needle: str) -> None:
    """Every numeric option is checked first: the model named here does not even exist, and
    the error is about the number (these used to be exit 3, or ran out of memory)."""
    args = [str(tmp_path / "missing.pt") if a == "M" else a for a in args]
    code, stdout, stderr = invoke(*args)
    assert (code, stdout) == (2, ""), stderr
    line = assert_one_error_line(stderr, "error: ", needle)
    assert "missing.pt" not in line
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("args,needle", [
    (["widen", "cnn.pt", "conv2", "--factor", "nan"], "--factor nan"),
    (["widen", "cnn.pt", "conv2", "--to", "16000000"], "more than the 1,073,741,824"),
    (["widen", "mlp.pt", "fc1", "--factor", "1000"], None),
])
def test_numbers_on_real_models(samples: Path, args: list[str], needle: str | None) -> None:
    """On a real model: the width a number gives is checked against the layer before any
    weight is allocated (conv2 at 16M channels would need 26 GiB)."""
    before = listing(samples)
    code, stdout, stderr = invoke(*[str(samples / a) if a.endswith(".pt") else a for a in args],
                                  "--dry-run", "-q")
    if needle is None:  # the largest factor still works where it fits
        assert code == 0, stderr
    else:
        assert (code, stdout) == (2, "")
        assert_one_error_line(stderr, "error: ", needle)
    assert listing(samples) == before


@pytest.mark.parametrize("call", [
    lambda m: morphcli.widen(m, "fc1", factor=float("nan"), check=False),
    lambda m: morphcli.widen(m, "fc1", by=10**9, check=False),
    lambda m: morphcli.widen(m, "fc1", by=2, seed=-1, check=False),
    lambda m: morphcli.deepen(m, after="fc1", kernel=99999),
    lambda m: morphcli.deepen(m, after="fc1", seed=2**64),
], ids=["factor-nan", "by-1e9", "widen-seed", "deepen-kernel", "deepen-seed"])
def test_python_api_gets_the_same_checks(samples: Path, call: Callable) -> None:
    with pytest.raises(InputError, match="out of range"):
        call(samples / "mlp.pt")


# ---------------------------------------------------------------- output paths


@pytest.mark.parametrize("folder", ["/sys", "/proc"])
@pytest.mark.parametrize("command", ["export", "widen"])
def test_pseudo_filesystem_output_is_refused_before_work(samples: Path, folder: str,
                                                         command: str) -> None:
    """``-o /sys/x.pt`` looks writable (root may write there) but create fails: exit 2 with
    one line before the morph, not an internal error after it."""
    if not Path(folder).is_dir():
        pytest.skip(f"no {folder} here")
    args = ["export", samples / "mlp.pt"] if command == "export" else [
        "widen", samples / "mlp.pt", "fc1", "--by", "2"]
    code, stdout, stderr = invoke(*args, "-o", f"{folder}/x.pt")
    assert (code, stdout) == (2, ""), stderr
    assert_one_error_line(stderr, f"cannot create a file in output directory '{folder}'")
    assert not Path(folder, "x.pt").exists()


def test_long_output_names(samples: Path) -> None:
    """A name near the 255-byte limit is written (its temporary name, longer than it, is cut
    and hashed to fit); a name over the limit is one error line."""
    name = "n" * 240 + ".safetensors"  # 252 bytes; ".NAME.XXXXXXXX.tmp.safetensors" is 279
    code, _, stderr = invoke("export", samples / "mlp.pt", "-o", samples / name)
    assert code == 0, stderr
    assert (samples / name).stat().st_size > 0
    assert not any(".tmp" in n for n in listing(samples))
    code, stdout, stderr = invoke("export", samples / "mlp.pt", "-o", samples / ("n" * 253 + ".pt"))
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "is 256 bytes long", "allows 255")


def test_stdin_redirected_from_the_output_is_refused(samples: Path) -> None:
    """``morph deepen - -o cnn.pt < cnn.pt`` replaced its own input."""
    src = samples / "cnn.pt"
    digest = sha256(src)
    for args in (["deepen", "-", "--after", "conv3", "-o", src], ["export", "-", "-o", src]):
        with src.open("rb") as stdin:
            code, stdout, stderr = _run(args, stdin=stdin)
        assert (code, stdout) == (2, ""), stderr
        assert_one_error_line(stderr, "is the file stdin reads the model from")
        assert sha256(src) == digest


# ---------------------------------------------------------------- inputs


def test_input_shape_dims_fail_at_parse_time() -> None:
    from morphcli.graph.inputs import parse_shape

    assert parse_shape("1,2,3,4,5,6,7,8") == (1, 2, 3, 4, 5, 6, 7, 8)
    with pytest.raises(InputError, match="9 dimensions; morph takes inputs of at most 8"):
        parse_shape("1,2,3,4,5,6,7,8,9")
    with pytest.raises(InputError, match="elements, more than"):
        parse_shape("100000,100000")


@pytest.mark.parametrize("kind", ["zeros", "tar"])
def test_non_checkpoint_pt_names_the_real_problem(tmp_path: Path, kind: str) -> None:
    """torch reads an all-zero file or any tar as its legacy format and advises
    weights_only=False, which "will likely succeed": it would not."""
    path = tmp_path / "model.pt"
    if kind == "zeros":
        path.write_bytes(bytes(4096))
    else:
        (tmp_path / "readme.txt").write_text("hello\n")
        with tarfile.open(path, "w") as tar:
            tar.add(tmp_path / "readme.txt", arcname="readme.txt")
    for extra in ((), ("--trust",)):
        code, stdout, stderr = invoke("inspect", path, *extra)
        assert (code, stdout) == (2, "")
        line = assert_one_error_line(stderr, "no zip or pickle header")
        assert "weights_only" not in line and "likely succeed" not in line


def test_deep_arch_kwargs_is_an_input_error(samples: Path) -> None:
    """A JSON nested past the recursion limit was a RecursionError (exit 3)."""
    deep = '{"a": ' * 100_000 + "1" + "}" * 100_000
    code, stdout, stderr = invoke("inspect", samples / "mlp.pt", "--arch", "torch.nn:Linear",
                                  "--arch-kwargs", deep)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "--arch-kwargs is nested too deeply")
    code, _, stderr = invoke("inspect", samples / "mlp.pt", "--arch", "torch.nn:Linear",
                             "--arch-kwargs", '{"in_features": ' + "9" * 5000 + "}")
    assert code == 2
    assert_one_error_line(stderr, "--arch-kwargs cannot be read")


@pytest.mark.parametrize("bad", [{"samples": 0}, {"batch_size": 10**6}, {"seed": -1},
                                 {"atol": float("nan")}, {"rtol": float("inf")}])
def test_the_python_api_checks_the_same_numbers(samples: Path, bad: dict) -> None:
    """morphcli.check and every morph's CheckOptions refuse what the CLI refuses."""
    from morphcli.morphs.runner import CheckOptions

    model = samples / "mlp.pt"
    with pytest.raises(InputError, match="out of range"):
        morphcli.check(model, model, **bad)
    with pytest.raises(InputError, match="out of range"):
        CheckOptions(**bad)
