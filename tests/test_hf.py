"""Hugging Face directories (issue 13): tiny random models of every supported family, grown
through the CLI, reloaded with ``from_pretrained`` and compared here with plain transformers
calls, independently of morph's own check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
transformers.utils.logging.disable_progress_bar()
pytest.importorskip("huggingface_hub").utils.disable_progress_bars()

from helpers import assert_one_error_line, invoke, sha256  # noqa: E402

VOCAB = 128
RTOL = 1e-5
WORST: dict[str, float] = {}  # test id -> max relative logit difference measured here

_C = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
          bos_token_id=0, eos_token_id=None, pad_token_id=0)
_BERT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB, max_position_embeddings=64)

# name -> (config class, model class, config kwargs, first block, decoder?)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _C, "model.layers"),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_C, sliding_window=4),
                "model.layers"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(_C, use_sliding_window=True, sliding_window=4, max_window_layers=1),
              "model.layers"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_C, head_dim=8), "model.layers"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_C, head_dim=8), "model.layers"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_C, head_dim=8, sliding_window=4),
               "model.layers"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(_C, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]), "model.layers"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                  scale_attn_by_inverse_layer_idx=True, bos_token_id=0, eos_token_id=None),
             "transformer.h"),
    "bert_mlm": ("BertConfig", "BertForMaskedLM", _BERT, "bert.encoder.layer"),
    "bert": ("BertConfig", "BertModel", _BERT, "encoder.layer"),
}
DECODERS = [n for n in FAMILIES if not n.startswith("bert")]
WITH_HEAD = [n for n in FAMILIES if n != "bert"]


def _build(name: str, folder: Path, dtype: torch.dtype = torch.float32,
           shard: str | None = None) -> Path:
    """A tiny random model with every 1-D weight randomised (norms start at 1 or 0, biases at
    0: nothing may hide), saved with save_pretrained, plus two files to be copied verbatim."""
    cfg_name, cls_name, kwargs, _ = FAMILIES[name]
    torch.manual_seed(len(name))
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.3)
    folder.mkdir(parents=True)
    model.to(dtype).save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"vocab": {}}}\n')
    (folder / "special_tokens_map.json").write_bytes(b'{"pad_token": "<pad>"}')
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """name -> a fresh copy of that tiny model (built once per module)."""
    root = tmp_path_factory.mktemp("hf")
    built: dict[tuple, Path] = {}

    def get(name: str, dtype: torch.dtype = torch.float32, shard: str | None = None) -> Path:
        key = (name, dtype, shard)
        if key not in built:
            built[key] = _build(name, root / f"{name}-{len(built)}", dtype, shard)
        return built[key]

    return get


@pytest.fixture(scope="module", autouse=True)
def _report_worst() -> Any:
    yield
    if WORST:
        worst = max(WORST, key=WORST.__getitem__)
        print(f"\nhf: worst relative logit difference {WORST[worst]:.3g} ({worst}) over "
              f"{len(WORST)} comparisons; nonzero: "
              + ", ".join(f"{k} {v:.2g}" for k, v in sorted(WORST.items()) if v))


def _snapshot(folder: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _morph(*args: Any) -> tuple[Path, Path]:
    """Run ``morph ARGS`` (first argument the input directory), require success and an
    untouched input; return (input, output)."""
    src = Path(args[1])
    before = _snapshot(src)
    r = invoke(*args)
    assert r.code == 0, r.stderr
    assert _snapshot(src) == before, "the input directory changed"
    names = [str(a) for a in args]
    out = Path(names[names.index("-o") + 1]) if "-o" in names else src.with_name(
        f"{src.name}.{args[0]}")
    if "--json" in names:
        assert Path(json.loads(r.stdout)["output"]) == out
    assert out.is_dir()
    return src, out


def _load(folder: Path, cls_name: str) -> torch.nn.Module:
    cls = getattr(transformers, cls_name)
    model, info = cls.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return [out.logits] if "logits" in out else [out.last_hidden_state, out.pooler_output]


def assert_same_function(src: Path, out: Path, name: str, test_id: str) -> float:
    """Independently of morph: logits within RTOL of their scale, greedy tokens identical."""
    cls_name = FAMILIES[name][1]
    a, b = _load(src, cls_name), _load(out, cls_name)
    ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(123))
    worst = 0.0
    with torch.no_grad():
        for x, y in zip(_outputs(a, ids), _outputs(b, ids), strict=True):
            assert x.shape == y.shape
            rel = float((x - y).abs().max() / x.abs().max())
            assert rel <= RTOL, f"{test_id}: relative difference {rel:.3g}"
            worst = max(worst, rel)
        if name in DECODERS:
            kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
            prompt = ids[:, :6]
            mask = torch.ones_like(prompt)
            ta = a.generate(input_ids=prompt, attention_mask=mask, **kw)
            tb = b.generate(input_ids=prompt, attention_mask=mask, **kw)
            assert ta.shape[1] == 18 and torch.equal(ta, tb), f"{test_id}: greedy tokens differ"
    WORST[test_id] = worst
    return worst


def _copied_verbatim(src: Path, out: Path) -> None:
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert sha256(out / name) == sha256(src / name)
    assert not any(p.name.startswith(".") for p in out.parent.iterdir()), "a temp dir was left"


def _block(name: str, j: int) -> str:
    return f"{FAMILIES[name][3]}.{j}"


# ---------------------------------------------------------------- deepen


@pytest.mark.parametrize("name", list(FAMILIES))
def test_deepen_every_family(tiny: Callable[..., Path], name: str) -> None:
    src, out = _morph("deepen", tiny(name), "--after", _block(name, 0))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_layer" if name == "gpt2" else "num_hidden_layers"] == 3
    if "layer_types" in json.loads((src / "config.json").read_text()):
        old = json.loads((src / "config.json").read_text())["layer_types"]
        assert cfg["layer_types"] == [old[0], old[0], old[1]]
    plan = json.loads((out / "morph_plan.json").read_text())
    assert plan["morph"] == "deepen" and plan["after"] == [_block(name, 0)]
    _copied_verbatim(src, out)
    assert_same_function(src, out, name, f"deepen-{name}")


@pytest.mark.parametrize("name", ["qwen2", "gpt2", "bert_mlm"])
def test_deepen_repeated_after(tiny: Callable[..., Path], name: str, tmp_path: Path) -> None:
    dest = tmp_path / "grown"
    src, out = _morph("deepen", tiny(name), "--after", _block(name, 1), "--after",
                      _block(name, 0), "-o", dest, "--json")
    assert out == dest
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_layer" if name == "gpt2" else "num_hidden_layers"] == 4
    assert_same_function(src, out, name, f"deepen-twice-{name}")


def test_deepen_bf16_sharded(tiny: Callable[..., Path], tmp_path: Path) -> None:
    """bf16 stays bf16 (and bitwise: a copy with zeros needs no rounding), shards stay shards."""
    from safetensors import safe_open

    src = tiny("llama", torch.bfloat16, "20KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    n_in = len(set(index["weight_map"].values()))
    assert n_in >= 3
    src, out = _morph("deepen", src, "--after", "model.layers.1", "-o", tmp_path / "o")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= n_in and all((out / s).is_file() for s in shards)
    dtypes = set()
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert dtypes == {"BF16"}
    assert index["metadata"]["total_size"] == sum(
        (out / s).stat().st_size for s in shards) - sum(_header_bytes(out / s) for s in shards)
    assert_same_function(src, out, "llama", "deepen-bf16-sharded")


def _header_bytes(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_pytorch_model_bin_input(tiny: Callable[..., Path], tmp_path: Path) -> None:
    """pytorch_model.bin is read through the weights-only unpickler; output is safetensors."""
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    src.mkdir()
    base = tiny("llama")
    (src / "config.json").write_bytes((base / "config.json").read_bytes())
    torch.save(load_file(str(base / "model.safetensors")), src / "pytorch_model.bin")
    _, out = _morph("deepen", src, "--after", "model.layers.0")
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.bin").exists()
    assert_same_function(base, out, "llama", "deepen-bin")


# ---------------------------------------------------------------- widen


@pytest.mark.parametrize("name", list(FAMILIES))
def test_widen_mlp_every_family(tiny: Callable[..., Path], name: str, tmp_path: Path) -> None:
    src, out = _morph("widen", tiny(name), "intermediate_size", "--by", "16",
                      "-o", tmp_path / "w")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_inner" if name == "gpt2" else "intermediate_size"] == (
        4 * 32 + 16 if name == "gpt2" else 80)
    assert_same_function(src, out, name, f"widen-mlp-{name}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_mlm"])
def test_widen_mlp_copy(tiny: Callable[..., Path], name: str, tmp_path: Path) -> None:
    src, out = _morph("widen", tiny(name), "intermediate_size", "--factor", "2", "--init",
                      "copy", "-o", tmp_path / "w")
    assert_same_function(src, out, name, f"widen-mlp-copy-{name}")


def test_widen_mlp_bf16_sharded_to(tiny: Callable[..., Path], tmp_path: Path) -> None:
    src, out = _morph("widen", tiny("qwen3", torch.bfloat16, "20KB"), "intermediate_size",
                      "--to", "96", "-o", tmp_path / "w")
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 96
    assert (out / "model.safetensors.index.json").is_file()
    assert_same_function(src, out, "qwen3", "widen-mlp-bf16")


@pytest.mark.parametrize("name", WITH_HEAD)
def test_widen_hidden_hypercloning(tiny: Callable[..., Path], name: str,
                                   tmp_path: Path) -> None:
    src, out = _morph("widen", tiny(name), "hidden_size", "--factor", "2", "-o", tmp_path / "w")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["n_embd" if name == "gpt2" else "hidden_size"] == 64
    assert cfg["n_head" if name == "gpt2" else "num_attention_heads"] == 8
    if "head_dim" in cfg:
        assert cfg["head_dim"] == json.loads((src / "config.json").read_text())["head_dim"]
    assert_same_function(src, out, name, f"widen-hidden-{name}")


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_widen_hidden_by_three(tiny: Callable[..., Path], name: str, tmp_path: Path) -> None:
    src, out = _morph("widen", tiny(name), "hidden_size", "--factor", "3", "-o", tmp_path / "w")
    assert_same_function(src, out, name, f"widen-hidden-x3-{name}")


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3"])
def test_widen_heads(tiny: Callable[..., Path], name: str, tmp_path: Path) -> None:
    src, out = _morph("widen", tiny(name), "num_attention_heads", "--by", "4",
                      "-o", tmp_path / "w")
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (8, 4)
    assert_same_function(src, out, name, f"widen-heads-{name}")


# ---------------------------------------------------------------- inspect and check


def test_inspect_json(tiny: Callable[..., Path]) -> None:
    r = invoke("inspect", tiny("gemma3"), "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert (doc["family"], doc["class"], doc["dtype"]) == ("gemma3_text", "Gemma3ForCausalLM",
                                                           "float32")
    assert doc["blocks"] == ["model.layers.0", "model.layers.1"]
    assert doc["sizes"]["hidden_size"] == 32 and doc["sizes"]["head_dim"] == 8
    # 2 more heads would be 6, which LlamaConfig-style validation refuses for hidden 32
    assert any(m.endswith("num_attention_heads --by 4") for m in doc["morphs"]), doc["morphs"]
    r = invoke("inspect", tiny("gpt2"))
    assert r.code == 0 and "transformer.h.0 .. transformer.h.1" in r.stdout, r.stdout


def test_check_two_directories(tiny: Callable[..., Path], tmp_path: Path) -> None:
    src, out = _morph("deepen", tiny("mistral"), "--after", "model.layers.1",
                      "-o", tmp_path / "d")
    r = invoke("check", src, out, "--json")
    assert r.code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["equivalent"] and doc["greedy_equal"] is True and doc["max_abs"] < 1e-5
    # Perturb one norm weight of the grown model: check must now say no (exit 1).
    from safetensors.torch import load_file, save_file

    state = load_file(str(out / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] * 1.01
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    r = invoke("check", src, out)
    assert r.code == 1 and "NOT equivalent" in r.stderr, r.stderr


# ---------------------------------------------------------------- refusals


def _refused(args: list[Any], *needles: str, tmp_path: Path) -> None:
    src = Path(args[1])
    before = _snapshot(src)
    dest = tmp_path / "never"
    r = invoke(*args, "-o", dest)
    assert r.code == 2, (r.code, r.stderr)
    assert_one_error_line(r.stderr, "error:", *needles)
    assert not dest.exists() and _snapshot(src) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuse_one_block_mlp(tiny: Callable[..., Path], tmp_path: Path) -> None:
    _refused(["widen", tiny("llama"), "model.layers.1.mlp.gate_proj", "--by", "8"],
             "one block", "intermediate_size", tmp_path=tmp_path)


def test_refuse_missing_block(tiny: Callable[..., Path], tmp_path: Path) -> None:
    _refused(["deepen", tiny("llama"), "--after", "model.layers.9"],
             "no block 'model.layers.9'", "model.layers.0 .. model.layers.1", tmp_path=tmp_path)


def test_refuse_head_dim_growth(tiny: Callable[..., Path], tmp_path: Path) -> None:
    _refused(["widen", tiny("qwen3"), "head_dim", "--factor", "2"], "rotary",
             tmp_path=tmp_path)


def test_refuse_heads_without_explicit_head_dim(tiny: Callable[..., Path],
                                                tmp_path: Path) -> None:
    _refused(["widen", tiny("gpt2"), "num_attention_heads", "--by", "4"], "head_dim",
             tmp_path=tmp_path)


def test_refuse_hidden_non_integer_factor(tiny: Callable[..., Path], tmp_path: Path) -> None:
    _refused(["widen", tiny("llama"), "hidden_size", "--by", "16"], "integer factor",
             tmp_path=tmp_path)


def test_refuse_hidden_of_base_model(tiny: Callable[..., Path], tmp_path: Path) -> None:
    _refused(["widen", tiny("bert"), "hidden_size", "--factor", "2"], "BertModel",
             tmp_path=tmp_path)


@pytest.mark.parametrize("edit, needles", [
    ({"model_type": "mamba"}, ("'mamba'", "not a supported family", "llama, mistral")),
    ({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, ("auto_map", "never imports")),
    ({"architectures": ["LlamaForSequenceClassification"]}, ("not supported for llama",)),
])
def test_refuse_config(tiny: Callable[..., Path], tmp_path: Path, edit: dict[str, Any],
                       needles: tuple[str, ...]) -> None:
    src = tmp_path / "edited"
    src.mkdir()
    base = tiny("llama")
    for p in base.iterdir():
        (src / p.name).write_bytes(p.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, **edit}))
    (src / "evil.py").write_text(f"open({str(tmp_path / 'MARKER')!r}, 'w')\n")
    _refused(["deepen", src, "--after", "model.layers.0"], *needles, tmp_path=tmp_path)
    assert not (tmp_path / "MARKER").exists()


def test_refuse_existing_output(tiny: Callable[..., Path], tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    r = invoke("deepen", tiny("llama"), "--after", "model.layers.0", "-o", tmp_path / "taken")
    assert r.code == 2
    assert_one_error_line(r.stderr, "already exists")
    r = invoke("deepen", tiny("llama"), "--after", "model.layers.0", "-o", tiny("llama"))
    assert r.code == 2
    assert_one_error_line(r.stderr, "is the input directory")


def test_help_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys\nfrom morphcli.cli.app import app\n"
            "from typer.testing import CliRunner\n"
            "assert CliRunner().invoke(app, ['deepen', '--help']).exit_code == 0\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_check_catches_a_broken_recipe(tiny: Callable[..., Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is the product: a copy left unzeroed (mergekit's passthrough) is caught,
    exit 1 and nothing written; --force writes it anyway."""
    from morphcli.hf import morphs

    monkeypatch.setattr(morphs, "_deepen_copy", lambda *a, **k: None)
    dest = tmp_path / "bad"
    r = invoke("deepen", tiny("llama"), "--after", "model.layers.0", "-o", dest)
    assert r.code == 1
    assert_one_error_line(r.stderr, "not equivalent", "nothing was written")
    assert not dest.exists() and not list(tmp_path.iterdir())
    r = invoke("deepen", tiny("llama"), "--after", "model.layers.0", "-o", dest, "--force")
    assert r.code == 1 and (dest / "config.json").is_file(), r.stderr  # written, still exit 1
    assert "NOT equivalent" in r.stderr


def test_dry_run_prints_the_plan(tiny: Callable[..., Path], tmp_path: Path) -> None:
    r = invoke("widen", tiny("gemma"), "intermediate_size", "--to", "100", "--dry-run",
               "--json", "-o", tmp_path / "w")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout) == {"morph": "widen", "field": "intermediate_size", "from": 64,
                                    "to": 100, "init": "zero", "blocks": 2}
    assert not (tmp_path / "w").exists()
    r = invoke("deepen", tiny("gemma"), "--after", "model.layers.1", "--no-check",
               "-o", tmp_path / "n")
    assert r.code == 0 and "not checked" in r.stderr, r.stderr
    assert json.loads((tmp_path / "n" / "config.json").read_text())["num_hidden_layers"] == 3


def test_real_command_stderr_is_one_line(tiny: Callable[..., Path], tmp_path: Path) -> None:
    from helpers import run_cli

    r = run_cli("deepen", tiny("gpt2"), "--after", "transformer.h.1", "-o", tmp_path / "o")
    assert r.code == 0, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("wrote ") and "identical" in lines[0], lines


def _exported_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()(ids)
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0])


@pytest.mark.parametrize("name, suffix", [
    ("gpt2", ".pt2"),
    pytest.param("llama", ".pt2", marks=pytest.mark.slow),
    pytest.param("llama", ".onnx", marks=pytest.mark.slow),
    pytest.param("gemma3", ".onnx", marks=pytest.mark.slow),
    pytest.param("gpt2", ".onnx", marks=pytest.mark.slow),
    pytest.param("bert_mlm", ".onnx", marks=pytest.mark.slow),
])
def test_export(tiny: Callable[..., Path], tmp_path: Path, name: str, suffix: str) -> None:
    src = tiny(name)
    dest = tmp_path / f"model{suffix}"
    r = invoke("export", src, "-o", dest, "--json")
    assert r.code == 0, r.stderr
    assert json.loads(r.stdout)["max_rel_diff"] <= RTOL
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = _outputs(_load(src, FAMILIES[name][1]), ids)[0]
        got = _exported_logits(dest, ids)
    assert float((got - want).abs().max() / want.abs().max()) <= RTOL
    assert [p.name for p in tmp_path.iterdir()] == [dest.name]


def test_bf16_divisions(tiny: Callable[..., Path], tmp_path: Path) -> None:
    """In bf16, dividing by 2 is exact (Net2Net copies with --factor 2 each divide by exactly
    2; HyperCloning x2), dividing by 3 is not: the check says so, exit 1, nothing written."""
    src = tiny("llama", torch.bfloat16)
    for i, args in enumerate((["intermediate_size", "--factor", "2", "--init", "copy"],
                              ["hidden_size", "--factor", "2"])):
        _, out = _morph("widen", src, *args, "-o", tmp_path / f"ok{i}")
        assert_same_function(src, out, "llama", f"bf16-{args[0]}-x2")
    r = invoke("widen", src, "hidden_size", "--factor", "3", "-o", tmp_path / "x3")
    assert r.code == 1
    assert_one_error_line(r.stderr, "not equivalent", "nothing was written")
    assert not (tmp_path / "x3").exists()


def test_file_options_are_refused_not_ignored(tiny: Callable[..., Path],
                                              tmp_path: Path) -> None:
    _refused(["deepen", tiny("llama"), "--after", "model.layers.0", "--kernel", "5"],
             "--kernel", "does not apply", tmp_path=tmp_path)
    _refused(["widen", tiny("llama"), "intermediate_size", "--by", "8", "--noise", "0.1"],
             "--noise", tmp_path=tmp_path)


def test_gpt2_with_stored_causal_masks(tiny: Callable[..., Path], tmp_path: Path) -> None:
    """Older GPT-2 checkpoints store each block's causal mask (attn.bias), which transformers
    ignores on load: morph carries them along and its check must not fail on them."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "gpt2-old"
    src.mkdir()
    base = tiny("gpt2")
    (src / "config.json").write_bytes((base / "config.json").read_bytes())
    state = load_file(str(base / "model.safetensors"))
    mask = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
    state.update({f"transformer.h.{j}.attn.bias": mask.clone() for j in range(2)})
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    _, out = _morph("deepen", src, "--after", "transformer.h.0", "-o", tmp_path / "o")
    assert_same_function(base, out, "gpt2", "deepen-gpt2-masks")


# ---------------------------------------------------------------- scale: no copies


def _mapped_files() -> set[str]:
    """Files memory-mapped into this process (Linux)."""
    maps = Path("/proc/self/maps")
    return {line.split(maxsplit=5)[5].strip() for line in maps.read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as g:
            state.update({k: g.get_tensor(k) for k in g.keys()})  # noqa: SIM118
    return state


def test_unchanged_tensors_are_shared_and_written_byte_for_byte(
        tiny: Callable[..., Path], tmp_path: Path) -> None:
    """The input is memory-mapped, not read; the morph copies no unchanged tensor; the
    check's two float32 models share every unchanged tensor (one upcast each); the output
    holds the input's exact bytes where unchanged."""
    from morphcli.hf.check import build, upcast_consuming
    from morphcli.hf.directory import load_dir
    from morphcli.hf.morphs import deepen

    src = tiny("llama", torch.bfloat16, "20KB")
    d = load_dir(src)
    shards = {str((src / f).resolve()) for f in d.weight_files if f.endswith(".safetensors")}
    if Path("/proc/self/maps").is_file():
        assert shards <= _mapped_files(), "the shards are not memory-mapped"
    r = deepen(d, ["model.layers.0"])  # new block 1; old block 1 becomes block 2
    moved = {k: k.replace("layers.1.", "layers.2.") for k in d.state}
    assert all(r.state[moved[k]] is t for k, t in d.state.items()), "a tensor was copied"
    n_stored = len(d.state)
    f32_a, f32_b = upcast_consuming(d.state, r.state)
    assert not d.state and not r.state, "the stored tensors were kept"
    a, b = build(d, d.config, f32_a), build(d, r.config, f32_b)
    pa, pb = a.state_dict(keep_vars=True), b.state_dict(keep_vars=True)
    for k in moved:
        assert pa[k].dtype == torch.float32 and pa[k].data_ptr() == pb[moved[k]].data_ptr(), k
    ptrs_a = {t.data_ptr() for t in pa.values()}
    new = [k for k in pb if k.startswith("model.layers.1.")]
    assert len(new) == 9 and not any(pb[k].data_ptr() in ptrs_a for k in new)
    assert len({t.data_ptr() for t in [*f32_a.values(), *f32_b.values()]}) == n_stored + 9
    _, out = _morph("deepen", src, "--after", "model.layers.0", "-o", tmp_path / "o")
    before, after = _read_all(src), _read_all(out)
    assert len(after) == len(before) + 9
    for k, t in before.items():  # byte for byte: compare the raw 16-bit patterns
        assert after[moved[k]].dtype == torch.bfloat16
        assert torch.equal(after[moved[k]].view(torch.int16), t.view(torch.int16)), k


def test_shard_size(tiny: Callable[..., Path], tmp_path: Path) -> None:
    """write_dir cuts shards at --shard-size bytes; the sizes parse as transformers' do."""
    from morphcli.errors import InputError
    from morphcli.hf.directory import load_dir
    from morphcli.hf.write import parse_size, write_dir

    assert (parse_size("5GB"), parse_size("500MB"), parse_size("2GiB")) == (
        5 * 10**9, 5 * 10**8, 2 * 2**30)
    for bad in ("0", "5XB", "-1GB", "big"):
        with pytest.raises(InputError, match="--shard-size"):
            parse_size(bad)
    d = load_dir(tiny("llama", torch.bfloat16, "20KB"))
    limit = parse_size("10KB")
    biggest = max(t.numel() * t.element_size() for t in d.state.values())
    total = sum(t.numel() * t.element_size() for t in d.state.values())
    state = dict(d.state)
    files = write_dir(d, tmp_path, state, d.config, {}, limit)
    assert not state, "write_dir keeps what it wrote"
    sizes = [(tmp_path / f).stat().st_size - _header_bytes(tmp_path / f) for f in files[1:]]
    assert len(files) - 1 > len(d.weight_files) - 1
    assert all(s <= max(limit, biggest) for s in sizes) and sum(sizes) == total
    assert _read_all(tmp_path).keys() == d.state.keys()


def test_shard_size_option(tiny: Callable[..., Path], tmp_path: Path, samples: Path) -> None:
    """--shard-size cuts the written directory's shards; a model file refuses it."""
    src = tiny("llama", torch.bfloat16)
    out = tmp_path / "grown"
    code, _, err = invoke("deepen", src, "--after", "model.layers.0", "--shard-size", "20KB",
                          "-o", out, "--quiet")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert len(shards) > len(list(src.glob("*.safetensors")))
    assert set(index["weight_map"]) == set(_read_all(out))
    _load(out, "LlamaForCausalLM")  # every key found across the shards, none missing
    code, _, err = invoke("deepen", samples / "cnn.pt", "--after", "conv3", "--shard-size", "1GB",
                          "-o", tmp_path / "x.pt")
    assert code == 2
    assert_one_error_line(err, "--shard-size applies to Hugging Face directories only")
