"""The check of the written directory: from_pretrained in the stored dtype, then every reloaded
tensor compared bit for bit with the morph's output (no third model run). It must fail on one
changed bit, a tensor missing from the reloaded model, and a config that reloads differently."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from morphcli.hf.check import verify_reload  # noqa: E402
from morphcli.hf.directory import load_dir  # noqa: E402


def _saved(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=97)
    folder = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_reload_equal(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    d = load_dir(folder)
    verdict = verify_reload(d, folder, d.config, dict(load_dir(folder).state))
    assert verdict.equivalent and verdict.mismatched == []
    assert verdict.tensors == len(d.state) and verdict.tensors > 10


def test_reload_one_bit_differs(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    d = load_dir(folder)
    expected = {k: v.clone() for k, v in load_dir(folder).state.items()}
    key = "model.layers.1.mlp.down_proj.weight"
    flat = expected[key].view(torch.int16).view(-1)
    flat[5] ^= 1  # the lowest mantissa bit of one bf16 weight
    verdict = verify_reload(d, folder, d.config, expected)
    assert not verdict.equivalent and verdict.mismatched == [key]
    assert key in verdict.summary()


def test_reload_missing_tensor_and_config(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    d = load_dir(folder)
    expected = dict(load_dir(folder).state)
    expected["model.layers.2.mlp.down_proj.weight"] = torch.zeros(32, 64, dtype=torch.bfloat16)
    config = {**d.config, "rms_norm_eps": 1e-3}
    verdict = verify_reload(d, folder, config, expected)
    assert verdict.mismatched == ["config.rms_norm_eps",
                                  "model.layers.2.mlp.down_proj.weight (not in the reloaded "
                                  "model)"]
