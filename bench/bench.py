"""How much a morph costs against what it cannot avoid: loading and saving the checkpoint.

Run from the repository root (about three minutes on 2 cores; needs about 5 GB of disk in the
temporary folder and 3 GB of memory):

    .venv/bin/python bench/bench.py

Every figure is a ratio of two measurements taken side by side in this run, each in a fresh
process (peak memory is per process), repeated and the best kept:

- start-up: ``morph --help`` against ``python -c "import torch"``;
- end to end: ``morph widen`` / ``morph deepen`` (check on) against the floor, a plain Python
  process that imports torch, loads the same checkpoint and saves it in the same format;
- peak memory (max RSS) of the same pairs;
- the check alone: its cost per sample against one forward pass of the model.

Models: the sample cnn, torchvision's resnet50 (weights=None, 100 MB) and an MLP of four
Linear(8192, 8192) layers (1 GB of float32, as .pt and as .safetensors), built in a temporary
folder. torch uses the
machine's default threads in every process (OMP_NUM_THREADS and MKL_NUM_THREADS are unset).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
_MORPH = Path(PYTHON).with_name("morph")
MORPH = [str(_MORPH)] if _MORPH.exists() else [PYTHON, "-m", "morphcli"]

GOAL_STARTUP = 0.15
GOAL_TIME = 1.3
GOAL_MEMORY = 1.3

FLOOR = {
    ".pt": """
import sys, torch
obj = torch.load(sys.argv[1], weights_only=True)
torch.save(obj, sys.argv[2])
""",
    ".safetensors": """
import sys, torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
with safe_open(sys.argv[1], "pt") as f:
    metadata = f.metadata()
save_file(load_file(sys.argv[1]), sys.argv[2], metadata=metadata)
""",
}

HELP_IMPORTS_TORCH = """
import sys
from morphcli.cli.app import app
sys.argv = ["morph", "--help"]
try:
    app()
except SystemExit:
    pass
print("torch" in sys.modules)
"""

# One child per model: a forward pass at the stored input size, then the check of a morph
# (the same code as `morph`, run after the morph) divided by its samples.
CHECK_ALONE = """
import json, sys, time
import torch
import morphcli
from morphcli.graph.inputs import INPUTS_META, example_inputs
from morphcli.morphs.runner import CheckOptions, check_morph

path, kind, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
gm = morphcli.load(path)
x = example_inputs(gm.meta[INPUTS_META], batch_size=None, seed=0)
with torch.no_grad():
    gm(*x)
    forward = []
    for _ in range(3):
        t = time.perf_counter(); gm(*x); forward.append(time.perf_counter() - t)
new, _ = getattr(morphcli, kind)(gm, check=CheckOptions(enabled=False), **args)
options = CheckOptions()
check_morph(gm, new, CheckOptions(samples=1, batch_size=1))  # warm-up
times = []
for _ in range(2):
    t = time.perf_counter(); report, note = check_morph(gm, new, options)
    times.append(time.perf_counter() - t)
print(json.dumps({"forward": min(forward), "check": min(times), "samples": report.samples,
                  "equivalent": report.equivalent, "note": note}))
"""


@dataclass(frozen=True)
class Case:
    name: str
    file: str  # in the work folder
    widen: list[str]
    deepen: list[str]
    repeats: int
    api_widen: dict
    api_deepen: dict


@dataclass
class Run:
    seconds: float
    max_rss_mb: float


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", help="work folder (default: a new temporary folder)")
    parser.add_argument("--quick", action="store_true", help="skip the 1 GB model")
    args = parser.parse_args()
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    work = Path(args.dir or tempfile.mkdtemp(prefix="morphcli-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str, str, str]] = []
    try:
        _header(env)
        cases = _build(work, env, quick=args.quick)
        rows += _startup(env)
        for case in cases:
            rows += _end_to_end(case, work, env)
            rows += _check_alone(case, work, env)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    _table(rows)
    met = [r for r in rows if r[5] == "yes"]
    goals = [r for r in rows if r[5] in ("yes", "NO")]
    took = time.perf_counter() - started
    print(f"\ngoals met: {len(met)} of {len(goals)}; bench took {took:.0f} s")
    return 0


# ---------------------------------------------------------------- measuring


def _measure(cmd: list[str], env: dict[str, str]) -> Run:
    """Wall time and peak memory of one fresh process (wait4 gives that child's own usage)."""
    os.sync()  # the previous run's gigabyte is written back now, not during this one
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err.decode()}")
    return Run(seconds, usage.ru_maxrss / 1024)


def _best(runs: list[Run]) -> Run:
    """Fastest time; median peak memory (it hardly varies)."""
    return Run(min(r.seconds for r in runs), statistics.median(r.max_rss_mb for r in runs))


def _startup(env: dict[str, str]) -> list[tuple[str, ...]]:
    helps, imports = [], []
    for _ in range(5):
        imports.append(_measure([PYTHON, "-c", "import torch"], env))
        helps.append(_measure([*MORPH, "--help"], env))
    h, i = _best(helps), _best(imports)
    out = subprocess.run([PYTHON, "-c", HELP_IMPORTS_TORCH], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    imports_torch = out[-1] == "True"
    ratio = h.seconds / i.seconds
    return [("start-up", "-", "morph --help vs import torch",
             f"{h.seconds:.2f} s vs {i.seconds:.2f} s", f"{ratio:.2f}  (goal < {GOAL_STARTUP})",
             _met(ratio < GOAL_STARTUP)),
            ("start-up", "-", "morph --help imports torch", "yes" if imports_torch else "no",
             "(goal: no)", _met(not imports_torch))]


def _end_to_end(case: Case, work: Path, env: dict[str, str]) -> list[tuple[str, ...]]:
    src = work / case.file
    out = work / f"out{src.suffix}"
    commands = {
        "floor": [PYTHON, "-c", FLOOR[src.suffix], str(src), str(out)],
        "widen": [*MORPH, "widen", str(src), *case.widen, "-o", str(out), "-q"],
        "deepen": [*MORPH, "deepen", str(src), *case.deepen, "-o", str(out), "-q"],
    }
    runs: dict[str, list[Run]] = {k: [] for k in commands}
    for _ in range(case.repeats):  # interleaved, so that a busy moment hits all alike
        for key, cmd in commands.items():
            runs[key].append(_measure(cmd, env))
            out.unlink(missing_ok=True)
    floor = _best(runs["floor"])
    rows = []
    for key in ("widen", "deepen"):
        r = _best(runs[key])
        t, m = r.seconds / floor.seconds, r.max_rss_mb / floor.max_rss_mb
        label = f"morph {key} {' '.join(getattr(case, key))}"
        rows.append(("end to end", case.name, label, f"{r.seconds:.2f} s vs {floor.seconds:.2f} s",
                     f"{t:.2f}x  (goal <= {GOAL_TIME})", _met(t <= GOAL_TIME)))
        rows.append(("peak memory", case.name, label,
                     f"{r.max_rss_mb:.0f} MB vs {floor.max_rss_mb:.0f} MB",
                     f"{m:.2f}x  (goal <= {GOAL_MEMORY})", _met(m <= GOAL_MEMORY)))
    return rows


def _check_alone(case: Case, work: Path, env: dict[str, str]) -> list[tuple[str, ...]]:
    import json

    rows = []
    if not case.api_widen:  # the same model in another format: its check costs the same
        return rows
    for kind, api_args in (("widen", case.api_widen), ("deepen", case.api_deepen)):
        proc = subprocess.run([PYTHON, "-c", CHECK_ALONE, str(work / case.file), kind,
                               json.dumps(api_args)], env=env, cwd=REPO, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise SystemExit(f"check-alone child failed:\n{proc.stderr}")
        d = json.loads(proc.stdout.strip().splitlines()[-1])
        per_sample = d["check"] / d["samples"]
        size = d["note"].split(" instead")[0].removeprefix("checked at input ") if d["note"] \
            else "stored size"
        rows.append(("check alone", case.name, f"{kind}: per sample vs 1 forward ({size})",
                     f"{per_sample * 1000:.1f} ms vs {d['forward'] * 1000:.1f} ms",
                     f"{per_sample / d['forward']:.2f}x", "-" if d["equivalent"] else "NOT EQUIV"))
    return rows


def _met(ok: bool) -> str:
    return "yes" if ok else "NO"


# ---------------------------------------------------------------- models


def _build(work: Path, env: dict[str, str], quick: bool) -> list[Case]:
    t = time.perf_counter()
    shutil.copy(REPO / "sample_models" / "cnn.pt", work / "cnn.pt")
    subprocess.run([PYTHON, "-c", _BUILD, str(work), "quick" if quick else "all"], env=env,
                   cwd=REPO, check=True)
    print(f"built the checkpoints in {time.perf_counter() - t:.0f} s\n")
    cases = [
        Case("cnn (0.4 MB)", "cnn.pt", ["conv2", "--by", "8"], ["--after", "conv3"], 3,
             {"layer": "conv2", "by": 8}, {"after": "conv3"}),
        Case("resnet50 (100 MB)", "resnet50.pt", ["layer3.0.conv1", "--by", "32"],
             ["--after", "layer3.0.conv2"], 3,
             {"layer": "layer3.0.conv1", "by": 32}, {"after": "layer3.0.conv2"}),
    ]
    if not quick:
        # Writing a gigabyte here takes 0.3 to 3 s from one run to the next: more repeats.
        cases.append(Case("mlp (1 GB)", "mlp.pt", ["fc2", "--by", "64"], ["--after", "fc2"], 4,
                          {"layer": "fc2", "by": 64}, {"after": "fc2"}))
        cases.append(Case("mlp (1 GB) .safetensors", "mlp.safetensors", ["fc2", "--by", "64"],
                          ["--after", "fc2"], 3, {}, {}))
    return cases


_BUILD = """
import sys
from collections import OrderedDict
from pathlib import Path
import torch, torchvision
from torch import nn
import morphcli

work, which = Path(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
morphcli.save(torchvision.models.resnet50(weights=None).eval(), work / "resnet50.pt",
              input_shapes=[(1, 3, 224, 224)])
if which == "all":
    width = 8192  # four Linear(8192, 8192): 4 x 256 MB of float32
    layers = {}
    for i in range(1, 5):
        layer = nn.Linear(width, width)
        with torch.no_grad():  # faster than the default init; the values do not matter here
            layer.weight.normal_(0, width ** -0.5)
            layer.bias.zero_()
        layers[f"fc{i}"] = layer
        if i < 4:
            layers[f"act{i}"] = nn.ReLU()
    mlp = morphcli.load(morphcli.save(nn.Sequential(OrderedDict(layers)).eval(),
                                      work / "mlp.pt", input_shapes=[(1, width)])["output"])
    morphcli.save(mlp, work / "mlp.safetensors")
"""


# ---------------------------------------------------------------- printing


def _header(env: dict[str, str]) -> None:
    import importlib.metadata as md

    print("morphcli bench:", " ".join([Path(PYTHON).name, "bench/bench.py", *sys.argv[1:]]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
          f"{platform.python_version()}, torch {md.version('torch')}; torch threads: default")


def _table(rows: list[tuple[str, ...]]) -> None:
    head = ("figure", "model", "what", "measured", "ratio", "goal met")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*head))
    print(line.format(*("-" * w for w in widths)))
    for r in rows:
        print(line.format(*r))


if __name__ == "__main__":
    sys.exit(main())
