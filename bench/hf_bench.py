"""Issue 13's bench: `morph deepen` of a Hugging Face directory (with its check) against the
floor (one process loading every tensor with safetensors and saving it again) and against
mergekit's passthrough merge (`mergekit-yaml`, when installed) inserting the same block.

    .venv/bin/python bench/hf_bench.py                 # TinyLlama's shape: 1.1 B params, bf16
    .venv/bin/python bench/hf_bench.py --shape tiny    # a 20 M-parameter smoke run

The model is a random Llama built here (never downloaded), saved in bf16 as 3 shards. Each
command runs in a fresh process; its wall time and peak RSS (os.wait4) are measured, best of
--repeat. Needs about 3x the model's size of disk (2.2 GB each for TinyLlama) and, for the
default shape, about 8 GB of memory (morph's check holds one float32 copy, shared by
both models, then from_pretrained's own while it reloads).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable
SHAPES = {
    "tinyllama": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=4, vocab_size=32000),
}
FLOOR = """
import sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for f in sorted(src.glob("*.safetensors")):
    save_file(load_file(str(f)), str(dst / f.name), metadata={"format": "pt"})
"""


def build(folder: Path, shape: str) -> int:
    """A random bf16 Llama in 3 shards; returns its parameter count."""
    code = f"""
import torch, transformers as T
T.utils.logging.disable_progress_bar()
torch.manual_seed(0)
m = T.LlamaForCausalLM(T.LlamaConfig(**{SHAPES[shape]!r}, max_position_embeddings=2048))
n = sum(p.numel() for p in m.parameters())
size = sum(p.numel() * 2 for p in m.parameters())
m.to(torch.bfloat16).save_pretrained({str(folder)!r}, max_shard_size=size * 10 // 28)
print(n)
"""
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def measure(cmd: list[str], cleanup: Path, repeat: int) -> tuple[float, float, int]:
    """Best wall seconds and peak RSS (GiB) of ``cmd`` over ``repeat`` fresh processes."""
    best_t, best_rss, rc = float("inf"), float("inf"), 0
    for _ in range(repeat):
        shutil.rmtree(cleanup, ignore_errors=True)
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - start
        rc = os.waitstatus_to_exitcode(status)
        if rc != 0:
            err = proc.stderr.read().decode() if proc.stderr else ""
            print(f"  {cmd[0]} failed ({rc}): {err.strip()[-300:]}")
            return elapsed, usage.ru_maxrss / 2**20, rc
        best_t, best_rss = min(best_t, elapsed), min(best_rss, usage.ru_maxrss / 2**20)
    return best_t, best_rss, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--after", type=int, default=10, help="block index to insert after")
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                    help="mergekit-yaml to compare with, e.g. one in its own venv: "
                    "python3 -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit, then "
                    "--mergekit /tmp/mk/bin/mergekit-yaml (default: mergekit-yaml on PATH)")
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="morph-hf-bench-") as tmp:
        root = Path(tmp)
        src = root / "model"
        n = build(src, args.shape)
        after = min(args.after, SHAPES[args.shape]["num_hidden_layers"] - 1)
        print(f"model: random Llama, {n / 1e9:.2f} B parameters, bf16, "
              f"{len(list(src.glob('*.safetensors')))} shards; insert after model.layers.{after}")
        rows = {}
        rows["floor"] = measure([PYTHON, "-c", FLOOR, str(src), str(root / "floor")],
                                root / "floor", args.repeat)
        deepen = [PYTHON, "-m", "morphcli", "deepen", str(src), "--after",
                  f"model.layers.{after}", "-o", str(root / "morph"), "-q"]
        rows["morph"] = measure(deepen, root / "morph", args.repeat)
        rows["no check"] = measure([*deepen, "--no-check"], root / "morph", args.repeat)
        merge = args.mergekit
        if merge:
            n_layers = SHAPES[args.shape]["num_hidden_layers"]
            yml = root / "passthrough.yml"
            slices = [{"sources": [{"model": str(src), "layer_range": r}]}
                      for r in ([0, after + 1], [after, n_layers])]
            yml.write_text(json.dumps({"merge_method": "passthrough", "dtype": "bfloat16",
                                       "slices": slices}))
            rows["mergekit"] = measure([merge, str(yml), str(root / "mk")], root / "mk",
                                       args.repeat)
        floor_t, floor_rss, _ = rows["floor"]
        for name, (t, rss, rc) in rows.items():
            status = "" if rc == 0 else f"  (failed, exit {rc})"
            print(f"{name:>9}: {t:6.1f} s ({t / floor_t:4.2f}x floor)  peak RSS {rss:5.2f} GiB "
                  f"({rss / floor_rss:4.2f}x floor){status}")
        if not merge:
            print(" mergekit: not installed (pip install mergekit, or --mergekit PATH), "
                  "not compared")
        f32_gb = 4 * n / 1e9  # the check's float32 model, shared by original and grown
        print(f"   (morph = deepen with its float32 check; 'no check' = --no-check. The "
              f"check holds one float32 copy, {f32_gb:.1f} GB = 2x the bf16 bytes, and runs "
              "both models: 2 batches of logits and 12 greedy steps each; the reloaded output "
              "is compared by its tensors' bytes; the floor holds one shard)")
        t, rss, _ = rows["morph"]
        goals = [("time <= 1.5x floor", t <= 1.5 * floor_t),
                 ("peak RSS <= 1.2x floor", rss <= 1.2 * floor_rss)]
        if merge:
            goals.append(("faster than mergekit", t < rows["mergekit"][0]))
        for goal, met in goals:
            print(f"goal {goal}: {'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
