"""Integer inputs of .pt2 and .onnx files are token ids: `morph check` draws them in the range
the file records (`morph export DIR` records [0, vocab)), or in `--input-ids N`'s; a foreign
file records only the dtype. Two models that differ only in an embedding row above 1 are the
proof: drawn in [0, 2) they look equal, drawn over the vocabulary they are not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, invoke
from torch import nn

VOCAB = 50


class Tagger(nn.Module):
    """token ids -> scores, the smallest model whose inputs are ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids))


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    a = Tagger().eval()
    b = Tagger().eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.embed.weight[2:] += 1.0  # only ids >= 2 reach the difference
    return a, b


def _export(model: nn.Module, dest: Path) -> Path:
    """A foreign file: written by torch itself, no morphcli metadata."""
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    if dest.suffix == ".pt2":
        dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
        torch.export.save(torch.export.export(model, (ids,), dynamic_shapes=dims), str(dest))
    else:
        torch.onnx.export(model, (ids,), str(dest), dynamo=True, verbose=False,
                          dynamic_shapes=({0: "batch", 1: "seq"},))
    return dest


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("ids")
    a, b = _pair()
    return {s: (_export(a, root / f"a{s}"), _export(b, root / f"b{s}")) for s in (".pt2",
                                                                                 ".onnx")}


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_input_ids_draws_over_the_vocabulary(files: dict[str, tuple[Path, Path]],
                                             suffix: str) -> None:
    a, b = files[suffix]
    shape = ["--input-shape", "2,6"] if suffix == ".onnx" else []  # its sizes are symbolic
    blind = invoke("check", a, b, *shape, "--json")  # ids 0, 1 only: no changed row is read
    assert blind.code == 0, blind.stderr
    assert json.loads(blind.stdout)["max_abs"] == 0.0
    r = invoke("check", a, b, *shape, "--input-ids", VOCAB, "--json")
    assert r.code == 1, r.stderr
    assert json.loads(r.stdout)["max_abs"] > 0.1
    same = invoke("check", a, a, "--input-ids", VOCAB, "--input-shape", "3,11", "--json")
    assert same.code == 0, same.stderr  # a new shape keeps the recorded dtype: ids, not floats
    assert json.loads(same.stdout)["max_abs"] == 0.0


def test_input_ids_refusals(files: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    a, _ = files[".pt2"]
    r = invoke("check", a, a, "--input-ids", "0")
    assert r.code == 2
    assert_one_error_line(r.stderr, "--input-ids 0", "at least 1")
    torch.manual_seed(0)
    dense = nn.Linear(4, 2).eval()
    x = torch.randn(2, 4)
    path = tmp_path / "dense.pt2"
    torch.export.save(torch.export.export(dense, (x,)), str(path))
    r = invoke("check", path, path, "--input-ids", "9")
    assert r.code == 2
    assert_one_error_line(r.stderr, "no integer input", "float32")


def test_hf_export_records_the_vocabulary(tmp_path: Path) -> None:
    """`morph export DIR` writes the id range into the file: check needs no option."""
    transformers = pytest.importorskip("transformers")
    models = []
    for i in range(2):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=VOCAB,
                                      n_positions=32, bos_token_id=0, eos_token_id=None)
        model = transformers.GPT2LMHeadModel(cfg).eval()
        if i:
            with torch.no_grad():
                model.transformer.wte.weight[2:] += torch.randn(VOCAB - 2, 16)
        model.save_pretrained(tmp_path / f"m{i}")
        out = tmp_path / f"m{i}.pt2"
        r = invoke("export", tmp_path / f"m{i}", "-o", out)
        assert r.code == 0, r.stderr
        models.append(out)
    shutil.rmtree(tmp_path / "m0")
    r = invoke("check", *models, "--json")
    assert r.code == 1, r.stderr
    assert json.loads(r.stdout)["max_rel"] > 0.1
