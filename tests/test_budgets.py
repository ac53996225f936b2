"""Tiny files that ask for huge work are refused, quickly and without the memory (graph.budget).

Each attack runs the real command in a fresh interpreter, watched: its peak memory is read from
the kernel (wait4), and a watchdog kills it past 1.5 GB or its time limit, so a regression fails
cleanly instead of taking the machine down.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from conftest import TV_SHAPE
from helpers import assert_one_error_line, invoke
from torch import nn

import morphcli
from morphcli.graph.describe import FORMAT, VERSION
from morphcli.graph.inputs import InputSpec
from morphcli.io.torch_file import ARCHIVE_FORMAT

MEMORY_LIMIT = 1 << 30  # what each attack may use in all, the interpreter and torch included
_KILL_AT = 3 << 29  # the watchdog's limit (1.5 GB): far past the limit, short of harm


class Watched(NamedTuple):
    code: int
    stderr: str
    seconds: float
    max_rss: int  # bytes
    killed: str | None


def watched(*args: str | os.PathLike[str], stdin: Path | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> Watched:
    """Run ``python -m morphcli ARGS`` with its peak memory measured and a watchdog on it."""
    full_env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    with open(stdin or os.devnull, "rb") as fin, open(os.devnull, "wb") as fout:
        err = io.BytesIO()
        proc = subprocess.Popen([sys.executable, "-m", "morphcli", *map(str, args)], stdin=fin,
                                stdout=fout, stderr=subprocess.PIPE, env=full_env)
        assert proc.stderr is not None
        pipe = proc.stderr
        reader = threading.Thread(target=lambda: err.write(pipe.read()))
        reader.start()
        killed: list[str] = []
        start = time.monotonic()

        peak = [0]

        def watch() -> None:
            while proc.returncode is None:
                rss, hwm = _memory(proc.pid)
                peak[0] = max(peak[0], hwm)
                if rss > _KILL_AT or time.monotonic() - start > timeout:
                    killed.append(f"{rss / 2**30:.1f} GB after {time.monotonic() - start:.0f} s")
                    proc.kill()
                    return
                time.sleep(0.02)

        watchdog = threading.Thread(target=watch, daemon=True)
        watchdog.start()
        # The kernel's ru_maxrss of a child starts at its parent's size when it forked (a
        # pytest worker can hold 1 GB), so the peak is the child's own VmHWM, read until it
        # exits (a zombie keeps no memory, so a last read after exit adds nothing).
        _, status, _ = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - start
        reader.join()
        watchdog.join()
    return Watched(proc.returncode, err.getvalue().decode("utf-8", "replace"), seconds,
                   peak[0], killed[0] if killed else None)


def _memory(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes: its resident memory now and at its peak."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key = line.split(maxsplit=1)[0] if line.strip() else ""
                if key in found:
                    found[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return found["VmRSS:"], found["VmHWM:"]


def assert_refused(run: Watched, *needles: str, seconds: float) -> None:
    """Exit 2, one error line naming ``needles``, within ``seconds`` and the memory limit."""
    assert run.killed is None, f"killed by the watchdog at {run.killed}: {run.stderr[-500:]}"
    assert run.code == 2, run.stderr[-2000:]
    assert_one_error_line(run.stderr, "error:", *needles)
    assert run.seconds < seconds, f"took {run.seconds:.1f} s"
    assert run.max_rss < MEMORY_LIMIT, f"used {run.max_rss / 2**20:.0f} MiB"


# ---------------------------------------------------------------- building the files


def _archive(path: Path, nodes: list[dict], shape: list[int]) -> Path:
    """A morphcli archive holding a description only (no tensors): what a file can claim."""
    desc = {"format": FORMAT, "version": VERSION, "class_name": "M",
            "inputs": [{"shape": shape, "dtype": "float32", "high": None}],
            "modules": {}, "attrs": {}, "nodes": nodes}
    torch.save({"format": ARCHIVE_FORMAT, "architecture": json.dumps(desc), "tensors": {}}, path)
    return path


def _node(op: str, name: str, target: str, *args: object) -> dict:
    return {"op": op, "name": name, "target": target, "args": {"tuple": list(args)},
            "kwargs": {"dict": {}}}


def _graph(calls: list[dict]) -> list[dict]:
    last = calls[-1]["name"] if calls else "x"
    return [{"op": "placeholder", "name": "x", "target": "x"}, *calls,
            {"op": "output", "name": "output", "args": {"tuple": [{"node": last}]},
             "kwargs": {"dict": {}}}]


def repeat_file(path: Path, times: tuple[int, int] = (20000, 2000)) -> Path:
    """x.repeat(20000, 2000) on a 1x24 input: 3.8 GB from a 1.8 KB file."""
    call = _node("call_method", "r", "repeat", {"node": "x"}, *times)
    return _archive(path, _graph([call]), [1, 24])


def matmul_chain(path: Path, n: int = 1000, d: int = 1024) -> Path:
    """x @ x a thousand times on 1 x d x d: 2e12 FLOPs a sample from a 150 KB file."""
    calls, prev = [], "x"
    for i in range(n):
        calls.append(_node("call_function", f"m{i}", "torch.matmul", {"node": prev},
                           {"node": prev}))
        prev = f"m{i}"
    return _archive(path, _graph(calls), [1, d, d])


def deflate_bomb(size: int) -> bytes:
    """A torch.save zip whose tensor member inflates to ``size`` zero bytes (about 1/1000 of
    that in the file): blocks of a megabyte of zeros, each deflated alone, repeated."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(4)}, buf)
    members = []
    with zipfile.ZipFile(buf) as src:
        for info in src.infolist():
            data = src.read(info)
            members.append((info.filename, 0, data, len(data), zlib.crc32(data)))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    packed = block * (size >> 20) + c.flush(zlib.Z_FINISH)
    members = [(n, 8, packed, size, 0) if n.endswith("/data/0") else (n, m, d, s, crc)
               for n, m, d, s, crc in members]
    return _zip(members)


def _zip(members: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip from (name, method, stored bytes, uncompressed size, crc) written field by field
    (zipfile cannot write a member it did not compress itself)."""
    out, central = io.BytesIO(), io.BytesIO()
    for name, method, data, size, crc in members:
        raw, offset = name.encode(), out.tell()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, len(data),
                              size, len(raw), 0) + raw + data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0,
                                  crc, len(data), size, len(raw), 0, 0, 0, 0, 0, offset) + raw)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                          len(central.getvalue()), start, 0))
    return out.getvalue()


def constant_of_shape(path: Path, n: int = 25000) -> Path:
    """A 191-byte ONNX model that makes an n x n constant (2.5 GB) and sums it into x."""
    import onnx
    from onnx import TensorProto, helper

    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [n, n])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["big"]),
             helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
             helper.make_node("Add", ["x", "s"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


# ---------------------------------------------------------------- the attacks


def test_a_repeat_is_sized_not_allocated(tmp_path: Path) -> None:
    f = repeat_file(tmp_path / "repeat.pt")
    assert f.stat().st_size < 4000
    assert_refused(watched("check", f, f), "MORPH_MAX_BYTES", "14.3 GiB", "--batch-size",
                   seconds=30)
    # Looking at it costs nothing now (it allocated 3.7 GB); ten times more is refused.
    run = watched("inspect", f)
    assert (run.code, run.killed) == (0, None), run.stderr[-2000:]
    assert run.max_rss < MEMORY_LIMIT
    assert_refused(watched("inspect", repeat_file(tmp_path / "r10.pt", (200000, 2000))),
                   "MORPH_MAX_BYTES", "at input shape 1,24", seconds=30)


def test_a_graph_that_needs_real_values_is_still_sized_before_it_runs(tmp_path: Path) -> None:
    """An assert that fails on zeros sends shape inference to a real run (ShapeProp): each
    node is sized on the meta device before it runs there too."""
    calls = [_node("call_function", "s", "torch.sum", {"node": "x"}),
             _node("call_function", "ne", "operator.ne", {"node": "s"}, 0),
             _node("call_function", "ok", "torch._assert", {"node": "ne"}, "zero input"),
             _node("call_method", "r", "repeat", {"node": "x"}, 200000, 2000)]
    f = _archive(tmp_path / "assert.pt", _graph(calls), [1, 24])
    assert_refused(watched("inspect", f), "MORPH_MAX_BYTES", "at input shape 1,24", seconds=30)


def test_a_chain_of_matmuls_is_refused_by_its_flops(tmp_path: Path) -> None:
    f = matmul_chain(tmp_path / "chain.pt")
    assert f.stat().st_size < 200_000
    assert_refused(watched("check", f, f, timeout=90), "MORPH_MAX_FLOPS", "3.44e+13 FLOPs",
                   seconds=40)


def test_the_input_cap_counts_the_check_batch(tmp_path: Path) -> None:
    f = _archive(tmp_path / "cap.pt", _graph([_node("call_function", "r", "torch.relu",
                                                    {"node": "x"})]), [1, 16384, 16384])
    run = watched("check", f, f)
    assert_refused(run, "MORPH_MAX_INPUT_ELEMENTS", "1,073,741,824 elements", "batch size 4",
                   seconds=30)


def test_a_deflate_bomb_on_stdin_is_refused_before_it_inflates(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt"
    bomb.write_bytes(deflate_bomb(3500 << 20))
    assert bomb.stat().st_size < 4_000_000
    assert_refused(watched("inspect", "-", stdin=bomb), "stdin", "3.4 GiB",
                   "MORPH_MAX_READ_BYTES", seconds=30)


def test_a_zip_member_is_inflated_within_the_budget(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Declared sizes first; then a member is inflated in chunks and counted."""
    from morphcli.graph import budget
    from morphcli.io import bounded

    data = deflate_bomb(64 << 20)
    monkeypatch.setenv("MORPH_MAX_READ_BYTES", str(32 << 20))
    with pytest.raises(budget.BudgetError, match=r"declare 64\.0 MiB.*MORPH_MAX_READ_BYTES"):
        bounded.check_zip("x", data)
    monkeypatch.setenv("MORPH_MAX_READ_BYTES", str(128 << 20))
    with pytest.raises(morphcli.MorphError, match="damaged zip member 'archive/data/0'"):
        bounded.check_zip("x", data)  # inflated to the end: its CRC is wrong


@pytest.mark.parametrize("how", ["path", "stdin"])
def test_dev_zero_is_not_read_until_memory_runs_out(how: str, tmp_path: Path) -> None:
    link = tmp_path / "zero.pt"  # a model's name for it: torch.load would read it forever
    link.symlink_to("/dev/zero")
    run = watched("inspect", link) if how == "path" else watched(
        "inspect", "-", stdin=Path("/dev/zero"))
    assert_refused(run, "device", seconds=30)


def test_endless_zeros_through_a_pipe_stop_at_the_first_bytes(tmp_path: Path) -> None:
    fifo = tmp_path / "zeros.pt"
    os.mkfifo(fifo)
    stop = threading.Event()

    def write() -> None:
        try:
            with open(fifo, "wb") as f:
                while not stop.is_set():
                    f.write(bytes(1 << 20))
        except (BrokenPipeError, OSError):
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert_refused(watched("inspect", fifo), "zeros.pt", seconds=30)
    finally:
        stop.set()


def test_a_fifo_is_read_once(tmp_path: Path, sample_dir: Path) -> None:
    """It used to be opened twice (head, then file): the second open waited for a writer."""
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    payload = (sample_dir / "cnn.pt").read_bytes()

    def write() -> None:
        with open(fifo, "wb") as f:
            f.write(payload)

    threading.Thread(target=write, daemon=True).start()
    run = watched("inspect", fifo, timeout=30)
    assert (run.code, run.killed) == (0, None), (run.killed, run.stderr[-2000:])


def test_an_onnx_constant_of_shape_is_sized_from_inferred_shapes(tmp_path: Path) -> None:
    f = constant_of_shape(tmp_path / "big.onnx")
    assert f.stat().st_size < 300
    assert_refused(watched("check", f, f), "MORPH_MAX_BYTES", "4.7 GiB", seconds=30)
    # Forty times that is refused when the file is read, before onnxruntime sees it.
    assert_refused(watched("inspect", constant_of_shape(tmp_path / "b.onnx", 160000)),
                   "b.onnx", "at batch size 1", "95.4 GiB",
                   seconds=30)


# ---------------------------------------------------------------- the caps themselves


def test_each_cap_is_raised_by_its_variable(tmp_path: Path, sample_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    f = sample_dir / "cnn.pt"
    monkeypatch.setenv("MORPH_MAX_NODES", "5")
    r = invoke("inspect", f)
    assert r.code == 2
    assert_one_error_line(r.stderr, "the graph has", "more than the 5 nodes cap",
                          "MORPH_MAX_NODES=")
    monkeypatch.setenv("MORPH_MAX_NODES", "lots")
    r = invoke("inspect", f)
    assert r.code == 2
    assert_one_error_line(r.stderr, "MORPH_MAX_NODES='lots' is not a positive number")
    monkeypatch.delenv("MORPH_MAX_NODES")
    monkeypatch.setenv("MORPH_MAX_FLOPS", "1e5")
    r = invoke("check", f, f)
    assert r.code == 2
    assert_one_error_line(r.stderr, "more than the 1e+05 FLOPs cap (MORPH_MAX_FLOPS)")
    monkeypatch.setenv("MORPH_MAX_FLOPS", "1e9")
    assert invoke("check", f, f).code == 0


def test_bytes_are_what_is_held_at_once() -> None:
    """fx frees each value after its last reader: a chain of 50 ReLUs holds two tensors at a
    time, not fifty; views share the tensor they look at."""
    from morphcli.graph import budget, shapes

    layers: list[nn.Module] = [nn.ReLU() for _ in range(50)]
    gm = morphcli.load(nn.Sequential(nn.Flatten(), *layers), input_shapes=[(1, 1 << 20)])
    tally = budget.Tally("t")
    shapes.at(gm, [InputSpec((1, 1 << 20))], tally=tally)
    assert tally.peak == 3 * 4 << 20  # the input, the ReLU being made and the one it reads
    assert tally.flops == 50 * (1 << 20) + (1 << 20)  # one per element per node


class _ViewKeepsItsBase(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(x)
        v = t.view(-1)  # shares t's tensor: t lives until v's last reader
        b = torch.relu(torch.relu(x))
        return v.sum() + b.sum()


def test_a_view_keeps_the_tensor_it_shares_alive() -> None:
    from morphcli.graph import budget, shapes

    gm = torch.fx.symbolic_trace(_ViewKeepsItsBase())
    tally = budget.Tally("t")
    shapes.at(gm, [InputSpec((1, 1 << 20))], tally=tally)
    assert tally.peak == 16 << 20  # x, t (through v) and both inner ReLUs, 4 MiB each


def test_matmul_and_conv_flops_by_formula() -> None:
    from morphcli.graph import budget, shapes

    gm = morphcli.load(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 30 * 30, 10)),
                       input_shapes=[(1, 3, 32, 32)])
    tally = budget.Tally("t")
    shapes.at(gm, [InputSpec((2, 3, 32, 32))], tally=tally)
    conv = 2 * (2 * 8 * 30 * 30) * (3 * 9)
    linear = 2 * (2 * 10) * (8 * 30 * 30)
    elementwise = 3 * (2 * 8 * 30 * 30)  # each layer also reads or writes its largest tensor
    assert tally.flops == conv + linear + elementwise


# ---------------------------------------------------------------- real models pass


def test_real_models_load_and_check_well_inside_the_caps(sample_dir: Path,
                                                         resnet18: nn.Module) -> None:
    from morphcli.graph import budget

    for name in ("cnn.pt", "mlp.pt", "resnet.pt"):
        assert invoke("check", sample_dir / name, sample_dir / name).code == 0
    gm = morphcli.load(resnet18, input_shapes=[TV_SHAPE])
    assert morphcli.check(gm, gm).equivalent
    tally = budget.check_run([gm, gm], gm.meta["morphcli.inputs"], samples=8, batch_size=4)
    assert tally.peak * 50 < budget.MAX_BYTES.limit()  # 4 x 3 x 64 x 64: about 30 MB
    assert tally.flops * 2 * 50 < budget.MAX_FLOPS.limit()
    # Both models, 4 samples, 2 FLOPs per multiply-add: 149 M multiply-adds a sample.
    assert math.isclose(tally.flops, 2 * 4 * 2 * 0.149e9, rel_tol=0.15)


@pytest.mark.parametrize(("cap", "code"), [(11_007, 2), (11_008, 0)])
def test_the_cap_on_new_weights_is_exact(samples: Path, monkeypatch: pytest.MonkeyPatch,
                                         cap: int, code: int) -> None:
    """Widening mlp.pt's fc1 to 128 units creates 11,008 weights (fc1 128x20 + 128, fc2
    64x128): refused one below the cap, done at it (the cap itself lowered, so the test
    costs nothing; a cap that is off by any factor fails it)."""
    from morphcli.morphs import limits

    monkeypatch.setattr(limits, "MAX_NEW_ELEMENTS", cap)
    out = samples / "wide.pt"
    got, stdout, stderr = invoke("widen", samples / "mlp.pt", "fc1", "--to", "128", "-o", out)
    assert got == code, stderr
    if code:
        assert_one_error_line(stderr, "would hold 11,008 weights", f"more than the {cap:,}")
        assert not out.exists()
    else:
        assert out.exists()
