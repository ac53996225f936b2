"""Fuzz the loaders with mutated copies of every format morph writes, and of a whole pickled
nn.Sequential: the only outcomes allowed are a successful load or the tool's own error
(MorphError). Another exception, a hang (over PER_INPUT_SECONDS) or a memory blow-up fails.

Mutations are drawn by hypothesis (seeded, so a run is reproducible and a failure shrinks):
bytes flipped, truncated, inserted, overwritten and spliced in from other formats; inside zip
archives, one member mutated and the archive rebuilt with valid checksums; and the JSON
architecture description (or the safetensors header) edited value by value, so the mutations
reach the validation behind the container formats, not only their checksums.

The default run is sized for CI (~30 s of CPU); ``pytest -m slow`` runs ten times as many.
MORPH_FUZZ_EXAMPLES overrides the per-format count. The figures appear in the run's summary.
"""

from __future__ import annotations

import copy
import io
import json
import os
import resource
import struct
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import Hang, add_figures, deadline
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import morphcli
from morphcli.errors import MorphError
from morphcli.io.api import load, open_runner

PER_INPUT_SECONDS = 20
MAX_RSS_GROWTH = 1 << 30  # the loaders must not keep more than this for any input
ADDRESS_SPACE_HEADROOM = 8 << 30  # safety net: an allocation beyond it fails, not the machine

# target -> (file suffix, examples in the default run); .pt2 loads cost ~10x the others
TARGETS = {"pt": (".pt", 1000), "safetensors": (".safetensors", 1000), "pt2": (".pt2", 250),
           "onnx": (".onnx", 1000), "pickle": (".pt", 800)}
SLOW_FACTOR = 10
FIGURES = ("fuzz: {inputs} inputs tried (.pt {pt}, .safetensors {safetensors}, .pt2 {pt2}, "
           ".onnx {onnx}, pickled nn.Sequential {pickle}): {loaded} loaded, {refused} refused "
           "with the tool's error, {crashes} crashes, {hangs} hangs, {seconds:.0f} s")

INTERESTING_INTS = [0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 2**31 - 1, 2**31, 2**32 - 1,
                    2**40, 2**63 - 1, 2**64 - 1]
NASTY_JSON: list[Any] = [None, True, False, 0, -1, 1, 3, 2**31, 10**12, 2**64, 1e308, -0.5,
                         "", "x", "os.system", "builtins.eval", "__class__", "torch.save",
                         "fc", "call_function", "output", "float64", "nan", [], [0], [1, 2],
                         {}, {"node": "x"}, {"tuple": []}, {"float": "nan"}, {"dtype": "int8"},
                         {"device": "cuda"}, {"slice": [None, None, None]}, {"unknown": 1}]


class _Tiny(nn.Module):
    """A few of every kind of thing a description holds: layers with BatchNorm statistics, a
    graph parameter (get_attr), a residual add, a concat, a literal view and a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.branch = nn.Conv2d(4, 2, 1)
        self.scale = nn.Parameter(torch.full((1, 6, 1, 1), 0.5))
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = y + self.conv(x)
        y = torch.cat([y, self.branch(y)], 1) * self.scale
        return self.fc(torch.flatten(y.view(-1, 6, 4, 4), 1))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each target's original bytes, written by the tool itself (or torch.save for pickle)."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    torch.manual_seed(0)
    model = _Tiny().eval()
    out: dict[str, bytes] = {}
    for name, (suffix, _) in TARGETS.items():
        path = folder / f"seed_{name}{suffix}"
        if name == "pickle":
            torch.save(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval(), path)
        else:
            morphcli.save(model, path, input_shapes=[(1, 3, 4, 4)])
        out[name] = path.read_bytes()
    return out


# ---------------------------------------------------------------- mutations


def _position(draw: st.DrawFn, n: int) -> int:
    """Anywhere, but often near either end, where headers and zip directories live."""
    where = draw(st.sampled_from(["any", "head", "tail"]))
    if where == "head":
        return draw(st.integers(0, max(0, min(n, 512) - 1)))
    if where == "tail":
        return max(0, n - 1 - draw(st.integers(0, max(0, min(n, 512) - 1))))
    return draw(st.integers(0, max(0, n - 1)))


def _mutate_bytes(draw: st.DrawFn, data: bytes, others: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        pos = _position(draw, len(buf))
        op = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite", "int", "splice",
                                   "delete"]))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            buf[pos:pos + len(chunk)] = chunk
        elif op == "int":
            size = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(INTERESTING_INTS)) % (1 << (8 * size))
            buf[pos:pos + size] = value.to_bytes(size, "little")
        elif op == "splice":
            other = draw(st.sampled_from(others))
            start = draw(st.integers(0, len(other) - 1))
            buf[pos:pos + draw(st.integers(0, 64))] = other[start:start
                                                            + draw(st.integers(1, 256))]
        else:
            del buf[pos:pos + draw(st.integers(1, 64))]
    return bytes(buf)


def _rezip(data: bytes, edit: Callable[[str, bytes], bytes | None]) -> bytes:
    """The archive with each member passed through ``edit`` (None drops it), checksums valid."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = edit(info.filename, src.read(info))
            if content is not None:
                dst.writestr(info.filename, content)
    return out.getvalue()


def _mutate_member(draw: st.DrawFn, data: bytes, others: list[bytes]) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
    target = draw(st.sampled_from(names))
    drop = draw(st.integers(0, 9)) == 0
    return _rezip(data, lambda name, content: content if name != target else
                  None if drop else _mutate_bytes(draw, content, others))


def _json_paths(doc: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _json_paths(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _json_paths(v, (*path, i))


def _nasty(draw: st.DrawFn) -> Any:
    """A fresh copy of one NASTY_JSON value (later mutations must not edit the table)."""
    return copy.deepcopy(draw(st.sampled_from(NASTY_JSON)))


def _mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """Replace, delete, duplicate or rename values anywhere in a JSON document."""
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _json_paths(doc) if p]
        if not paths:
            return _nasty(draw)
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "splice", "delete", "duplicate",
                                   "rename"]))
        if op == "replace":
            parent[key] = _nasty(draw)
        elif op == "splice":  # a value from elsewhere in the document
            source = draw(st.sampled_from(paths))
            value = doc
            for k in source:
                value = value[k]
            parent[key] = json.loads(json.dumps(value))
        elif op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, json.loads(json.dumps(parent[key])))
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["x", "fc", "conv.weight", "__init__", key + "_"
                                         if isinstance(key, str) else "k"]))] = parent.pop(key)
    return doc


def _mutate_tensors(draw: st.DrawFn, tensors: dict[str, torch.Tensor]) -> None:
    key = draw(st.sampled_from(sorted(tensors)))
    op = draw(st.sampled_from(["reshape", "dtype", "delete", "extra", "nan", "empty"]))
    t = tensors[key]
    if op == "reshape":
        tensors[key] = t.reshape(-1)
    elif op == "dtype":
        tensors[key] = t.to(draw(st.sampled_from([torch.float16, torch.int64, torch.bool,
                                                  torch.float64])))
    elif op == "delete":
        del tensors[key]
    elif op == "extra":
        tensors[key + "_extra"] = t.clone()
    elif op == "nan":
        tensors[key] = torch.full_like(t, float("nan")) if t.is_floating_point() else t
    else:
        tensors[key] = torch.zeros(0)


def _mutate_description(draw: st.DrawFn, name: str, data: bytes) -> bytes:
    """A well-formed container around a tampered description (or tampered tensors)."""
    if name == "pt":
        archive = torch.load(io.BytesIO(data), weights_only=True)
        if draw(st.booleans()):
            archive["architecture"] = json.dumps(
                _mutate_json(draw, json.loads(archive["architecture"])))
        else:
            _mutate_tensors(draw, archive["tensors"])
        out = io.BytesIO()
        torch.save(archive, out)
        return out.getvalue()
    if name == "safetensors":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        if draw(st.booleans()):  # the architecture in the metadata
            meta = header["__metadata__"]
            meta["morphcli.architecture"] = json.dumps(
                _mutate_json(draw, json.loads(meta["morphcli.architecture"])))
        else:  # the header itself: dtypes, shapes, data offsets
            header = _mutate_json(draw, header)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    if name == "onnx":
        import onnx

        proto = onnx.load_model_from_string(data)
        for prop in proto.metadata_props:
            prop.value = json.dumps(_mutate_json(draw, json.loads(prop.value)))
        return proto.SerializeToString()
    # .pt2: the description travels as an extra file in the zip
    return _rezip(data, lambda member, content: json.dumps(
        _mutate_json(draw, json.loads(content))).encode()
        if member.endswith("extra/morphcli.architecture.json") else content)


def _mutated(draw: st.DrawFn, name: str, seeds: dict[str, bytes]) -> bytes:
    data = seeds[name]
    others = [v for k, v in seeds.items() if k != name]
    kinds = ["bytes"]
    if name in ("pt", "pt2", "pickle"):
        kinds += ["member", "member"]
    if name != "pickle":
        kinds += ["description", "description"]
    kind = draw(st.sampled_from(kinds))
    if kind == "member":
        return _mutate_member(draw, data, others)
    if kind == "description":
        return _mutate_description(draw, name, data)
    return _mutate_bytes(draw, data, others)


# ---------------------------------------------------------------- guards


@contextmanager
def _address_space_cap(headroom: int) -> Iterator[None]:
    """Cap this process's address space a few GiB above its current size while fuzzing, so a
    loader that tries to allocate what a header claims fails instead of taking the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    cap = current + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------- the fuzz tests


def _fuzz_one(name: str, data: bytes, folder: Path, via_stdin: bool,
              counts: dict[str, float]) -> None:
    suffix = TARGETS[name][0]
    path = folder / f"input{suffix}"
    path.write_bytes(data)
    counts["inputs"] += 1
    counts[name] += 1
    rss = _max_rss()
    try:
        with deadline(PER_INPUT_SECONDS):
            if name == "onnx":
                open_runner(path)
            elif via_stdin:
                load("-", stdin=io.BytesIO(data))
            else:
                load(path)
        counts["loaded"] += 1
    except MorphError:
        counts["refused"] += 1
    except Hang:
        counts["hangs"] += 1
        raise
    except BaseException:
        counts["crashes"] += 1
        raise
    grown = _max_rss() - rss
    assert grown < MAX_RSS_GROWTH, f"loading grew the process by {grown / 2**20:.0f} MiB"


def _fuzz(name: str, examples: int, seeds: dict[str, bytes], tmp_path: Path) -> None:
    counts: dict[str, float] = {k: 0 for k in ("inputs", "loaded", "refused", "crashes", "hangs",
                                               *TARGETS)}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.large_base_example,
                                     HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        mutated = _mutated(data.draw, name, seeds)
        _fuzz_one(name, mutated, tmp_path, data.draw(st.integers(0, 4)) == 0, counts)

    start = time.perf_counter()
    try:
        with _address_space_cap(ADDRESS_SPACE_HEADROOM), torch.no_grad():
            run()
    finally:
        add_figures("fuzz", FIGURES, seconds=time.perf_counter() - start, **counts)
    assert counts["crashes"] == counts["hangs"] == 0
    assert counts["loaded"] > 0 and counts["refused"] > 0  # the mutations reach both outcomes


@pytest.mark.filterwarnings("ignore")  # damaged files make torch and onnx warn; not our output
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_loader(name: str, seeds: dict[str, bytes], tmp_path: Path) -> None:
    examples = int(os.environ.get("MORPH_FUZZ_EXAMPLES", TARGETS[name][1]))
    _fuzz(name, examples, seeds, tmp_path)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(TARGETS))
def test_fuzz_loader_long(name: str, seeds: dict[str, bytes], tmp_path: Path) -> None:
    examples = int(os.environ.get("MORPH_FUZZ_EXAMPLES", TARGETS[name][1] * SLOW_FACTOR))
    _fuzz(name, examples, seeds, tmp_path)
