"""``morph inspect``, stdin/stdout pipes, and a command line that starts without torch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_equivalent, assert_one_error_line, invoke, listing, run_cli

import morphcli

LAYER_KEYS = {"name", "type", "op", "input_shapes", "output_shapes", "params", "morphs"}


def test_inspect_json_cnn(samples: Path, samples_module) -> None:
    code, stdout, stderr = invoke("inspect", samples / "cnn.pt", "--json")
    assert code == 0, stderr
    assert stderr == ""
    doc = json.loads(stdout)
    assert set(doc) == {"schema", "inputs", "outputs", "layers", "totals"}
    assert doc["schema"] == "morphcli.inspect/1"
    assert doc["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32", "high": None}]
    assert doc["outputs"] == [[1, 10]]
    for row in doc["layers"]:
        assert set(row) == LAYER_KEYS
        assert isinstance(row["morphs"], list) and all(isinstance(m, str) for m in row["morphs"])
    by_name = {row["name"]: row for row in doc["layers"]}
    weighted = [r["name"] for r in doc["layers"] if r["type"] in ("Conv2d", "Linear")]
    assert weighted == ["conv1", "conv2", "conv3", "conv4", "fc1", "fc2"]

    conv1 = by_name["conv1"]
    assert (conv1["type"], conv1["op"]) == ("Conv2d", "call_module")
    assert conv1["input_shapes"] == [[1, 3, 32, 32]]
    assert conv1["output_shapes"] == [[1, 16, 32, 32]]
    assert conv1["params"] == 16 * 3 * 3 * 3 + 16
    assert by_name["conv3"]["output_shapes"] == [[1, 32, 8, 8]]
    assert by_name["fc1"]["input_shapes"] == [[1, 1024]]
    assert by_name["fc1"]["params"] == 1024 * 64 + 64
    assert by_name["fc2"]["output_shapes"] == [[1, 10]]

    # The shared ReLU and MaxPool modules are listed once per call site.
    assert [n for n in by_name if n.startswith("relu")] == [f"relu@{i}" for i in range(1, 6)]
    assert [n for n in by_name if n.startswith("pool")] == [f"pool@{i}" for i in range(1, 4)]
    assert by_name["relu@3"]["input_shapes"] == [[1, 32, 8, 8]]

    model = samples_module.build("cnn.pt")
    n_params = sum(p.numel() for p in model.parameters())
    totals = doc["totals"]
    assert totals["params"] == n_params == 99_370
    assert totals["params"] == sum(r["params"] for r in doc["layers"])
    assert totals["trainable_params"] == n_params
    assert totals["layers"] == len(doc["layers"]) == 19
    assert totals["bytes"] == sum(t.numel() * t.element_size()
                                  for t in [*model.parameters(), *model.buffers()])


def test_inspect_json_lists_ops_with_shapes(samples: Path) -> None:
    code, stdout, stderr = invoke("inspect", samples / "resnet.pt", "--json")
    assert code == 0, stderr
    rows = {r["name"]: r for r in json.loads(stdout)["layers"]}
    assert rows["add"]["op"] == "call_function"
    assert rows["add"]["input_shapes"] == [[1, 16, 16, 16], [1, 16, 16, 16]]
    assert rows["cat"]["input_shapes"] == [[1, 8, 16, 16], [1, 8, 16, 16]]
    assert rows["cat"]["output_shapes"] == [[1, 16, 16, 16]]
    assert rows["depthwise"]["params"] == 16 * 9 + 16
    assert [n for n in rows if n.startswith("relu")] == ["relu@1", "relu@2", "relu@3", "relu@4"]


def test_inspect_table(samples: Path) -> None:
    code, stdout, stderr = run_cli("inspect", samples / "cnn.pt")
    assert code == 0, stderr
    assert stderr == ""
    for name in ("conv1", "conv3", "fc2", "relu@5", "BatchNorm2d"):
        assert name in stdout
    assert "99,370" in stdout  # the parameter total


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["inspect", "--help"],
                                  ["check", "--help"], ["export", "--help"]])
def test_help_and_version_do_not_import_torch(args: list[str]) -> None:
    script = (
        "import sys\n"
        f"sys.argv = ['morph', *{args!r}]\n"
        # app, not main: main ends the process without returning (see cli.app._exit_now)
        "from morphcli.cli.app import app\n"
        "try:\n"
        "    app()\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('EXIT', code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"}, timeout=60)
    last = proc.stdout.strip().splitlines()[-1]
    assert last in ("EXIT 0 False", "EXIT None False"), proc.stdout + proc.stderr
    if args == ["--version"]:
        assert proc.stdout.startswith(f"morph {morphcli.__version__}")
    else:
        assert "Usage" in proc.stdout


def test_stdout_archive_and_stdin(samples: Path, samples_module) -> None:
    src = samples / "cnn.pt"
    before = listing(samples)
    code, raw, stderr = run_cli("export", src, "-o", "-", binary=True)
    assert code == 0, stderr
    assert stderr == ""
    assert raw[:2] == b"PK"
    archive = torch.load(io.BytesIO(raw), weights_only=True)  # stdout holds only the archive
    assert archive["format"] == "morphcli.archive"
    assert raw == src.read_bytes()  # the same bytes a file export gives
    assert listing(samples) == before  # no file was written

    code, stdout, stderr = run_cli("check", "-", src, "--json", input=raw)
    assert code == 0, stderr
    assert json.loads(stdout)["max_abs"] == 0.0

    out = samples / "from_stdin.safetensors"
    code, _, stderr = invoke("export", "-", "-o", out, input=raw)
    assert code == 0, stderr
    assert assert_equivalent(samples_module.build("cnn.pt"), morphcli.load(out),
                             [(2, 3, 32, 32)], atol=0.0) == 0.0


def test_stdout_pipe_between_processes(samples: Path) -> None:
    """``morph export A -o - | morph check - A`` through a real pipe."""
    env_cmd = [sys.executable, "-m", "morphcli"]
    producer = subprocess.Popen([*env_cmd, "export", samples / "mlp.pt", "-o", "-"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    consumer = subprocess.run([*env_cmd, "check", "-", samples / "mlp.pt"],
                              stdin=producer.stdout, capture_output=True, text=True, timeout=120)
    assert producer.wait(timeout=120) == 0
    assert consumer.returncode == 0, consumer.stderr
    assert consumer.stderr.startswith("equivalent: max abs diff 0,")


def test_stdin_errors(samples: Path) -> None:
    code, stdout, stderr = invoke("inspect", "-", input=b"")
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "stdin", "no data")

    raw = (samples / "mlp.pt").read_bytes()
    code, _, stderr = invoke("check", "-", "-", input=raw)
    assert code == 2
    assert_one_error_line(stderr, "only one of A and B")

    code, _, stderr = invoke("inspect", "-", input=b"hello, not a model\n")
    assert code == 2
    assert_one_error_line(stderr, "stdin")


def test_stdout_model_and_json_conflict(samples: Path) -> None:
    code, stdout, stderr = invoke("export", samples / "mlp.pt", "-o", "-", "--json", binary=True)
    assert (code, stdout) == (2, b"")
    assert_one_error_line(stderr, "-o -", "--json")


@pytest.mark.parametrize("command,args", [("deepen", ("--after", "fc1")),
                                          ("widen", ("fc1", "--by", "2")),
                                          ("swap", ("act1", "--to", "gelu"))])
def test_morph_stdout_model_and_json_conflict(samples: Path, command: str, args: tuple) -> None:
    """The archive and the JSON document cannot share stdout: refused before any work, with
    -o - and with the default output of a model read from stdin. --dry-run writes no model."""
    raw = (samples / "mlp.pt").read_bytes()
    before = listing(samples)
    code, stdout, stderr = invoke(command, samples / "mlp.pt", *args, "-o", "-", "--json",
                                  binary=True)
    assert (code, stdout) == (2, b"")
    assert_one_error_line(stderr, "-o - writes the model to stdout", "--json")
    code, stdout, stderr = invoke(command, "-", *args, "--json", input=raw, binary=True)
    assert (code, stdout) == (2, b"")
    assert_one_error_line(stderr, "reading MODEL from stdin, the model goes to stdout", "--json")
    assert listing(samples) == before

    code, stdout, stderr = invoke(command, "-", *args, "--json", "--dry-run", input=raw)
    assert code == 0, stderr
    assert json.loads(stdout)["output"] is None
