"""Bad input: exit 2, exactly one line on stderr, no traceback, nothing written or touched."""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke, run_cli, sha256

import morphcli

SUFFIXES = [".pt", ".safetensors", ".pt2", ".onnx"]
RESNET18 = "torchvision.models:resnet18"


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory: pytest.TempPathFactory, samples_module) -> dict[str, Path]:
    """mlp in every format, plus a resnet18 state_dict: sources for damaged copies."""
    folder = tmp_path_factory.mktemp("valid")
    model = samples_module.build("mlp.pt")
    files = {}
    for suffix in SUFFIXES:
        files[suffix] = folder / f"mlp{suffix}"
        morphcli.save(model, files[suffix], input_shapes=[(1, 20)])
    return files


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory: pytest.TempPathFactory, resnet18) -> Path:
    path = tmp_path_factory.mktemp("state") / "resnet18_state.pt"
    torch.save(resnet18.state_dict(), path)
    return path


def _copy(src: Path, dest: Path) -> Path:
    shutil.copyfile(src, dest)
    return dest


def _truncated(suffix: str) -> Callable[[Path, dict], tuple]:
    def setup(tmp: Path, files: dict) -> tuple:
        data = files[suffix].read_bytes()
        path = tmp / f"truncated{suffix}"
        path.write_bytes(data[: len(data) // 2])
        return ("inspect", path)

    return setup


def _random(suffix: str) -> Callable[[Path, dict], tuple]:
    def setup(tmp: Path, files: dict) -> tuple:
        path = tmp / f"random{suffix}"
        path.write_bytes(random.Random(suffix).randbytes(4096))
        return ("inspect", path)

    return setup


def _with_shape(shape: str) -> Callable[[Path, dict], tuple]:
    return lambda tmp, files: ("inspect", _copy(files["cnn"], tmp / "cnn.pt"), "--input-shape",
                               shape)


def _arch(spec: str, *extra: str) -> Callable[[Path, dict], tuple]:
    return lambda tmp, files: ("inspect", _copy(files["resnet18_state"], tmp / "state.pt"),
                               "--arch", spec, "--input-shape", "1,3,64,64", *extra)


def _export_to(name: str) -> Callable[[Path, dict], tuple]:
    def setup(tmp: Path, files: dict) -> tuple:
        src = _copy(files["cnn"], tmp / "cnn.pt")
        return ("export", src, "-o", tmp / name)

    return setup


def _morph(command: str, *args: str) -> Callable[[Path, dict], tuple]:
    """``morph COMMAND cnn.pt ARGS`` on a private copy of cnn.pt ("OUT" names a path in tmp)."""

    def setup(tmp: Path, files: dict) -> tuple:
        src = _copy(files["cnn"], tmp / "cnn.pt")
        return (command, src, *(tmp / a[4:] if a.startswith("OUT:") else a for a in args))

    return setup


def _symlink_to_input(tmp: Path, files: dict) -> tuple:
    src = _copy(files["cnn"], tmp / "cnn.pt")
    (tmp / "link.pt").symlink_to(src)
    return ("export", src, "-o", tmp / "link.pt")


# name -> (setup(tmp, files) -> CLI args, words the one error line must contain)
CASES: dict[str, tuple[Callable[[Path, dict], tuple], tuple[str, ...]]] = {
    "missing-file": (lambda tmp, files: ("inspect", tmp / "nope.pt"), ("no such file",)),
    "directory": (lambda tmp, files: ("inspect", tmp), ("is a directory",)),
    "empty-file": (lambda tmp, files: ("inspect", _touch(tmp / "empty.pt")), ("file is empty",)),
    **{f"truncated{s}": (_truncated(s), ("truncated" + s, "cannot read" if s != ".onnx"
                                         else "not a valid ONNX")) for s in SUFFIXES},
    **{f"random{s}": (_random(s), ("random" + s,)) for s in SUFFIXES},
    "pt-named-onnx": (lambda tmp, files: ("inspect", _copy(files[".pt"], tmp / "model.onnx")),
                      ("looks like a .pt file", "wrong suffix")),
    "safetensors-named-pt": (
        lambda tmp, files: ("inspect", _copy(files[".safetensors"], tmp / "model.pt")),
        ("looks like a .safetensors file", "wrong suffix")),
    "unknown-input-suffix": (lambda tmp, files: ("inspect", _copy(files[".pt"], tmp / "m.bin")),
                             ("unknown suffix '.bin'", "looks like .pt")),
    "onnx-cannot-be-morphed": (
        lambda tmp, files: ("export", _copy(files[".onnx"], tmp / "m.onnx"), "-o", tmp / "m.pt"),
        ("ONNX model", "morph check")),
    "state-dict-without-arch": (
        lambda tmp, files: ("inspect", _copy(files["resnet18_state"], tmp / "state.pt")),
        ("state_dict", "--arch")),
    "arch-no-module": (_arch("no_such_module_xyz:resnet18"), ("cannot import module",)),
    "arch-no-attribute": (_arch("torchvision.models:no_such_net"), ("has no attribute",)),
    "arch-not-callable": (_arch("math:pi"), ("not callable",)),
    "arch-no-colon": (_arch("torchvision.models.resnet18"), ("expected MODULE:CALLABLE",)),
    "arch-kwargs-not-json": (_arch(RESNET18, "--arch-kwargs", "{num_classes: 7}"),
                             ("--arch-kwargs is not valid JSON",)),
    "arch-bad-kwargs": (_arch(RESNET18, "--arch-kwargs", '{"no_such_kwarg": 1}'),
                        ("calling torchvision.models:resnet18", "no_such_kwarg")),
    "weights-do-not-fit-arch": (_arch("torchvision.models:resnet34"),
                                ("do not fit --arch torchvision.models:resnet34",
                                 "missing keys")),
    "input-shape-letters": (_with_shape("a,b"), ("bad --input-shape 'a,b'",)),
    "input-shape-zero": (_with_shape("0,3"), ("bad --input-shape '0,3'",)),
    "input-shape-empty": (_with_shape(""), ("bad --input-shape ''",)),
    "input-shape-rejected": (_with_shape("1,5,32,32"),
                             ("rejects input shape 1,5,32,32", "at conv1",
                              "expected input[1, 5, 32, 32] to have 3 channels")),
    "input-shape-count": (lambda tmp, files: ("inspect", _copy(files["cnn"], tmp / "cnn.pt"),
                                              "--input-shape", "1,3,32,32", "--input-shape",
                                              "1,3,32,32"), ("takes 1 input(s) but 2",)),
    "output-dir-missing": (_export_to("no_such_dir/out.pt"), ("does not exist",)),
    "output-is-input": (_export_to("cnn.pt"), ("is the input file",)),
    "output-is-input-dotted": (_export_to("./cnn.pt"), ("is the input file",)),
    "output-is-link-to-input": (_symlink_to_input, ("is the input file",)),
    "output-unknown-suffix": (_export_to("out.txt"), ("unknown output suffix '.txt'",)),
    "output-no-suffix": (_export_to("out"), ("unknown output suffix",)),
    "output-is-directory": (lambda tmp, files: ("export", _copy(files["cnn"], tmp / "cnn.pt"),
                                                "-o", _mkdir(tmp / "out.pt")),
                            ("is a directory",)),
    "output-dir-is-a-file": (_export_to("cnn.pt/out.pt"), ("'", "cnn.pt' is not a directory")),
    "onnx-named-pt": (lambda tmp, files: ("inspect", _copy(files[".onnx"], tmp / "model.pt")),
                      ("looks like a .onnx file", "wrong suffix")),
    "pt2-named-safetensors": (
        lambda tmp, files: ("inspect", _copy(files[".pt2"], tmp / "m.safetensors")),
        ("looks like a .pt file", "wrong suffix")),
    # the morph commands: the same checks, and their own
    "morph-missing-file": (lambda tmp, files: ("deepen", tmp / "nope.pt", "--after", "fc1"),
                           ("no such file",)),
    "morph-state-dict-without-arch": (
        lambda tmp, files: ("widen", _copy(files["resnet18_state"], tmp / "state.pt"),
                            "conv1", "--by", "2"), ("state_dict", "--arch")),
    "morph-onnx-input": (
        lambda tmp, files: ("deepen", _copy(files[".onnx"], tmp / "m.onnx"), "--after", "fc1"),
        ("ONNX model", "morph check")),
    "widen-unknown-layer": (_morph("widen", "conv9", "--by", "2"),
                            ("no layer named 'conv9'", "did you mean conv4")),
    "deepen-unknown-layer": (_morph("deepen", "--after", "fc9"), ("did you mean fc2",)),
    "swap-unknown-layer": (_morph("swap", "rellu", "--to", "gelu"), ("did you mean relu",)),
    "deepen-ambiguous-layer": (_morph("deepen", "--after", "relu"),
                               ("'relu' is called at 5 places", "relu@2 (feeds pool_1)")),
    "widen-ambiguous-layer": (_morph("widen", "pool", "--by", "2"), ("pool@1", "name one")),
    "widen-not-a-widenable-layer": (_morph("widen", "bn2", "--by", "2"),
                                    ("bn2 is a BatchNorm2d", "widen applies to Conv1d")),
    "widen-units-reach-output": (_morph("widen", "fc2", "--by", "2"),
                                 ("reach the model's output",)),
    "deepen-decompose-after-relu": (_morph("deepen", "--after", "relu@3", "--init", "decompose"),
                                    ("must be linear", "relu@3 is a ReLU", "--init identity")),
    "swap-not-an-activation": (_morph("swap", "conv2", "--to", "gelu"),
                               ("conv2 is a Conv2d, not an activation",)),
    "widen-to-smaller": (_morph("widen", "conv2", "--to", "8"),
                         ("--to 8 must be larger than the current width 32",)),
    "widen-by-zero": (_morph("widen", "conv2", "--by", "0"), ("at least 1",)),
    "morph-output-is-input": (_morph("deepen", "--after", "conv3", "-o", "OUT:cnn.pt"),
                              ("is the input file",)),
    "morph-output-dir-missing": (_morph("widen", "conv2", "--by", "2", "-o", "OUT:no/x.pt"),
                                 ("does not exist",)),
    "morph-output-dir-is-a-file": (_morph("swap", "relu", "--to", "gelu", "-o",
                                          "OUT:cnn.pt/x.pt"), ("is not a directory",)),
    "morph-output-unknown-suffix": (_morph("widen", "conv2", "--by", "2", "-o", "OUT:w.txt"),
                                    ("unknown output suffix '.txt'",)),
    "morph-output-is-directory": (
        lambda tmp, files: _morph("deepen", "--after", "conv3", "-o", "OUT:d.pt")(
            _mkdir(tmp / "d.pt").parent, files), ("is a directory",)),
    "morph-stdout-and-json": (_morph("widen", "conv2", "--by", "2", "-o", "-", "--json"),
                              ("-o - writes the model to stdout", "--json")),
    "morph-input-shape-malformed": (_morph("swap", "relu", "--to", "gelu", "--input-shape",
                                           "1,3,x"), ("bad --input-shape '1,3,x'",)),
    "morph-input-shape-rejected": (_morph("widen", "conv2", "--by", "2", "--input-shape",
                                          "1,5,32,32"), ("rejects input shape 1,5,32,32",)),
}


def _touch(path: Path) -> Path:
    path.touch()
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.fixture
def files(valid_files: dict[str, Path], resnet18_state: Path, sample_dir: Path) -> dict:
    return {**valid_files, "resnet18_state": resnet18_state, "cnn": sample_dir / "cnn.pt"}


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) if p.is_file() else "dir" for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(tmp_path: Path, files: dict, case: str,
                   capfd: pytest.CaptureFixture[str]) -> None:
    setup, needles = CASES[case]
    work = tmp_path / "work"
    work.mkdir()
    args = setup(work, files)
    before = _snapshot(work)
    sources = {k: sha256(v) for k, v in files.items()}

    code, stdout, stderr = invoke(*args)

    assert code == 2, stderr
    assert stdout == ""
    assert_one_error_line(stderr, "error: ", *needles)
    leaked = capfd.readouterr()  # nothing written around Python's streams (C++ logs, fd 1/2)
    assert leaked.out == "" and leaked.err == "", leaked
    assert _snapshot(work) == before  # inputs untouched, no output, no temporary file
    assert {k: sha256(v) for k, v in files.items()} == sources


@pytest.mark.parametrize("case", ["missing-file", "truncated.onnx", "input-shape-rejected",
                                  "weights-do-not-fit-arch", "output-is-input"])
def test_bad_input_real_process(tmp_path: Path, files: dict, case: str) -> None:
    setup, needles = CASES[case]
    args = setup(tmp_path, files)
    before = _snapshot(tmp_path)
    code, stdout, stderr = run_cli(*args)
    assert (code, stdout) == (2, "")
    assert_one_error_line(stderr, "error: ", *needles)
    assert _snapshot(tmp_path) == before


def test_usage_errors_from_typer_exit_2(samples: Path) -> None:
    """Options typer itself validates still give exit 2 (its own multi-line usage message)."""
    code, _, stderr = invoke("check", samples / "mlp.pt", samples / "mlp.pt", "--samples", "0")
    assert code == 2
    assert "--samples" in stderr
    code, _, _ = invoke("no-such-command")
    assert code == 2
