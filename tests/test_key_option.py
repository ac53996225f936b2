"""``--key`` on inspect, export and check (issue 12, item 4): the model entry of a training
checkpoint that holds several model states (``model`` and ``ema``). Without it such a file is
refused naming ``--key``; with it the named state is the one read; a wrong key is one line,
exit 2. ``check`` gives ``--key`` (and ``--arch``) to each side they fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke
from safetensors.torch import load_file

ARCH = ["--arch", "torch.nn:Linear", "--arch-kwargs", '{"in_features": 4, "out_features": 3}',
        "--input-shape", "1,4"]
X = torch.randn(5, 4, generator=torch.Generator().manual_seed(3))


def _linear(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


@pytest.fixture
def two(tmp_path: Path) -> tuple[Path, dict]:
    """A training checkpoint with two model states whose outputs differ."""
    model, ema = _linear(0), _linear(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(X).sum().backward()
    opt.step()
    ckpt = {"model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "epoch": 4}
    path = tmp_path / "two.pt"
    torch.save(ckpt, path)
    return path, ckpt


# ---------------------------------------------------------------- inspect


def test_inspect_needs_key_and_reads_the_named_entry(two: tuple[Path, dict]) -> None:
    path, _ = two
    before = path.read_bytes()
    code, _, stderr = invoke("inspect", path, *ARCH)
    assert code == 2
    assert_one_error_line(stderr, "model, ema", "--key")
    code, stdout, stderr = invoke("inspect", path, *ARCH, "--key", "ema", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["totals"]["params"] == 15  # 4*3 weights + 3 biases
    assert path.read_bytes() == before  # the input is never modified


# ---------------------------------------------------------------- export


def test_export_writes_the_named_state(two: tuple[Path, dict], tmp_path: Path) -> None:
    path, ckpt = two
    out = tmp_path / "ema.safetensors"
    code, _, stderr = invoke("export", path, *ARCH, "-o", out)
    assert code == 2 and not out.exists()
    assert_one_error_line(stderr, "model, ema", "--key")
    code, _, stderr = invoke("export", path, *ARCH, "--key", "ema", "-o", out)
    assert code == 0, stderr
    written = load_file(out)
    assert set(written) == {"weight", "bias"}
    assert all(torch.equal(written[k], ckpt["ema"][k]) for k in written)
    # A .pt output is the same kind of dict: both states, the optimizer, the epoch kept.
    back = tmp_path / "back.pt"
    code, _, stderr = invoke("export", path, *ARCH, "--key", "model", "-o", back)
    assert code == 0, stderr
    again = torch.load(back, weights_only=True)
    assert {"model", "ema", "optimizer", "epoch"} <= set(again)
    assert again["epoch"] == 4
    for entry in ("model", "ema"):
        assert all(torch.equal(v, ckpt[entry][k]) for k, v in again[entry].items())
    assert again["morphcli_architecture"]["key"] == "model"


# ---------------------------------------------------------------- check


def test_check_gives_key_to_both_sides(two: tuple[Path, dict], tmp_path: Path) -> None:
    path, ckpt = two
    code, _, stderr = invoke("check", path, path, *ARCH)
    assert code == 2
    assert_one_error_line(stderr, "model, ema", "--key")
    # Both sides read the same entry: identical.
    code, stdout, stderr = invoke("check", path, path, *ARCH, "--key", "ema", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["max_abs"] == 0.0
    # Against the exported ema weights (a file that describes itself: neither --arch nor
    # --key applies to it): the ema entry agrees, the model entry does not.
    ema = tmp_path / "ema.safetensors"
    assert invoke("export", path, *ARCH, "--key", "ema", "-o", ema).code == 0
    code, stdout, stderr = invoke("check", path, ema, *ARCH, "--key", "ema", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["max_abs"] == 0.0
    code, stdout, stderr = invoke("check", ema, path, *ARCH, "--key", "model", "--json")
    assert code == 1
    assert json.loads(stdout)["max_abs"] > 1e-2  # two different random Linear layers
    # B a checkpoint morph wrote (it stores its architecture and key "model"): --key ema
    # overrides the stored key on that side too, so both sides read ema.
    back = tmp_path / "back.pt"
    assert invoke("export", path, *ARCH, "--key", "model", "-o", back).code == 0
    code, stdout, stderr = invoke("check", back, ema, "--json")
    assert code == 1  # stored key: model
    code, stdout, stderr = invoke("check", back, ema, "--key", "ema", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["max_abs"] == 0.0


# ---------------------------------------------------------------- wrong keys


@pytest.mark.parametrize("command", ["inspect", "export", "check"])
def test_wrong_key_is_one_line_exit_2(command: str, two: tuple[Path, dict],
                                      tmp_path: Path) -> None:
    path, _ = two
    commands: dict[str, list[str | Path]] = {
        "inspect": [path], "export": [path, "-o", tmp_path / "x.pt"], "check": [path, path]}
    args = commands[command]
    code, _, stderr = invoke(command, *args, *ARCH, "--key", "nope")
    assert code == 2
    assert_one_error_line(stderr, "--key 'nope'", "no such entry", "model, ema")
    code, _, stderr = invoke(command, *args, *ARCH, "--key", "epoch")  # not a model state
    assert code == 2
    assert_one_error_line(stderr, "--key 'epoch'", "not a model state", "model, ema")
    assert not (tmp_path / "x.pt").exists()


def test_key_or_arch_that_fits_no_side_is_refused(two: tuple[Path, dict],
                                                 tmp_path: Path) -> None:
    path, _ = two
    ema = tmp_path / "ema.safetensors"
    assert invoke("export", path, *ARCH, "--key", "ema", "-o", ema).code == 0
    code, _, stderr = invoke("check", ema, ema, "--key", "ema")
    assert code == 2
    assert_one_error_line(stderr, "--key", "neither model is one")
    code, _, stderr = invoke("check", ema, ema, *ARCH)
    assert code == 2
    assert_one_error_line(stderr, "--arch", "neither model is one")
    code, _, stderr = invoke("inspect", ema, "--key", "ema")
    assert code == 2
    assert_one_error_line(stderr, "--key", "training checkpoint")
