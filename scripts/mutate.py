"""Mutation run: break the code on purpose, one line at a time, and check the suite notices.

    python scripts/mutate.py                # all: a table, the score, exit 1 on a survivor
    python scripts/mutate.py --list         # the mutants, what each breaks, their tests
    python scripts/mutate.py --only NAME .. # just these (to iterate on one mutant)

Each mutant is an exact source snippet in a file under ``morphcli/``, its replacement, a one-line
description and the test files that must kill it. For each, ``morphcli/``, ``tests/``,
``sample_models/``, ``scripts/``, ``README.md`` and ``pyproject.toml`` are copied to a temporary
directory, the snippet is replaced there (a snippet found zero or several times is an ERROR of
the run, so a mutant gone stale after a refactor is noticed, not counted as killed), and the
named tests run against that copy: killed means they fail. The repository is never modified.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("morphcli", "tests", "sample_models", "scripts", "README.md", "pyproject.toml")
TIMEOUT_S = 900  # one mutant's tests; a hang counts as an ERROR, not as killed


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # under the repository root
    old: str  # exact snippet, found exactly once
    new: str
    what: str
    tests: tuple[str, ...]  # test files (or node ids) that must fail


MUTANTS: tuple[Mutant, ...] = (
    # ------------------------------------------------------------ deepen
    Mutant("optimizer-new-units-random-state", "morphcli/rules/linear_layers.py",
           "is_bias=is_bias or self.state)", "is_bias=is_bias)",
           "optimizer state of a zero-init widen's new output units filled like their weights "
           "(random) instead of zero", ("tests/test_optimizer_state.py",)),
    Mutant("optimizer-new-channels-copied-state", "morphcli/morphs/plan.py",
           "t.index_fill_(0, fresh, 0)", "pass",
           "per-channel state of new units (BatchNorm) copied from their source instead of zero",
           ("tests/test_optimizer_state.py",)),
    Mutant("optimizer-state-reset", "morphcli/io/training.py",
           "out[f\"{layer.path}.{n}\"][kind] = value",
           "out[f\"{layer.path}.{n}\"][kind] = value * 0",
           "resized parameters' optimizer state reset to zero instead of carried",
           ("tests/test_optimizer_state.py",)),
    Mutant("deepen-bn-eps", "morphcli/morphs/deepen.py",
           "weight.fill_(math.sqrt(1.0 + bn.eps))", "weight.fill_(1.0)",
           "deepen's identity BatchNorm with weight 1 instead of sqrt(1 + eps)",
           ("tests/test_exact_bounds.py",)),
    Mutant("deepen-identity-linear-sign", "morphcli/rules/successors.py",
           "layer.weight.fill_diagonal_(1)", "layer.weight.fill_diagonal_(-1)",
           "identity Linear successor with weight -I (sign flip)",
           ("tests/test_deepen.py",)),
    Mutant("deepen-identity-conv-off-centre", "morphcli/rules/successors.py",
           "index = (slice(None), slice(None)) + tuple(k // 2 for k in weight.shape[2:])",
           "index = (slice(None), slice(None)) + tuple(0 for k in weight.shape[2:])",
           "identity conv successor with I at a corner tap, not the centre (shifts the map)",
           ("tests/test_deepen.py",)),
    Mutant("deepen-decompose-no-transpose", "morphcli/rules/successors.py",
           "head = _re_expressed(layer, q.T)", "head = _re_expressed(layer, q)",
           "Linear decomposition re-expressed with Q instead of Q^T",
           ("tests/test_deepen.py",)),
    Mutant("deepen-decompose-conv-sign", "morphcli/rules/successors.py",
           "inverse, what = q.T, ", "inverse, what = -q.T, ",
           "conv decomposition re-expressed with -Q^T (sign flip)",
           ("tests/test_deepen.py",)),
    Mutant("deepen-depthwise-no-division", "morphcli/rules/successors.py",
           "torch.diag(1.0 / torch.diagonal(q))", "torch.diag(torch.diagonal(q))",
           "depthwise decomposition inverts its scaling without dividing",
           ("tests/test_deepen.py",)),
    Mutant("deepen-identity-start-blend", "morphcli/modules.py",
           "return x + (1 - self.a) * (self.act(x) - x)",
           "return x + self.a * (self.act(x) - x)",
           "IdentityStartActivation starts as the activation, not the identity",
           ("tests/test_deepen.py",)),
    # ------------------------------------------------------------ widen
    Mutant("widen-copy-divisor", "morphcli/rules/channel_map.py",
           "out.div_(cmap.counts().index_select(0, cmap.src).to(out.dtype).reshape(shape))",
           "out.mul_(1)",
           "Net2WiderNet's outgoing weights not divided by the copy count",
           ("tests/test_widen.py",)),
    Mutant("widen-zero-init-skipped", "morphcli/rules/channel_map.py",
           "out.index_fill_(axis, new_idx, 0)", "out.mul_(1)",
           "zero-init widen leaves the new units' outgoing weights as copies",
           ("tests/test_widen.py",)),
    Mutant("widen-new-units-off-by-one", "morphcli/rules/channel_map.py",
           "new = torch.arange(new_width) >= old", "new = torch.arange(new_width) > old",
           "the first new unit is taken for an original one (not zeroed)",
           ("tests/test_widen.py",)),
    Mutant("widen-concat-offset", "morphcli/rules/channel_map.py",
           "torch.cat([self.src, other.src + self.old_width])",
           "torch.cat([self.src, other.src + self.width])",
           "concat shifts the second map by the new width instead of the old",
           ("tests/test_widen.py",)),
    Mutant("widen-norm-does-not-follow", "morphcli/rules/channel_map.py",
           "return t.detach().index_select(axis, cmap.src)\n",
           "return t.detach().index_select(axis, cmap.src.flip(0))\n",
           "BatchNorm parameters and statistics follow a reversed map",
           ("tests/test_widen.py",)),
    # ------------------------------------------------------------ swap
    Mutant("swap-blend-starts-new", "morphcli/modules.py",
           "return a + self.t * (self.new(x) - a)", "return a + (1 - self.t) * (self.new(x) - a)",
           "an exact swap's blend starts at the new activation, not the old",
           ("tests/test_swap.py",)),
    Mutant("swap-functional-default-slope", "morphcli/rules/activations.py",
           '{"negative_slope": 0.01}),', '{"negative_slope": 0.02}),',
           "a functional leaky_relu is rebuilt with the wrong default slope",
           ("tests/test_swap.py",)),
    Mutant("activation-fixed-set-relu6", "morphcli/rules/activations.py",
           '"relu6": (0.0, 6.0),\n    "hardtanh"', '"relu6": (0.0, _INF),\n    "hardtanh"',
           "ReLU6 taken to leave every non-negative value unchanged (plain ReLU6 after ReLU)",
           ("tests/test_deepen.py",)),
    # ------------------------------------------------------------ check
    Mutant("check-worst-raw", "morphcli/equivalence/compare.py",
           "return d.max_abs - (atol + rtol * d.scale) > prev.max_abs - (atol + rtol * prev.scale)",
           "return d.max_abs > prev.max_abs",
           "the check keeps the batch with the largest raw difference, not the one furthest "
           "beyond its tolerance", ("tests/test_check.py",)),
    Mutant("check-default-rtol-loose", "morphcli/equivalence/report.py",
           "DEFAULT_RTOL = 1e-5", "DEFAULT_RTOL = 1e-3",
           "the default tolerance loosened 100x", ("tests/test_check.py",)),
    Mutant("check-tolerance-10x", "morphcli/equivalence/compare.py",
           "diff.max_abs > atol + rtol * diff.scale + diff.round_off",
           "diff.max_abs > atol + 10 * rtol * diff.scale + diff.round_off",
           "the check's bound loosened 10x whatever the options say", ("tests/test_check.py",)),
    Mutant("check-no-lone-sample", "morphcli/equivalence/compare.py",
           "return [*sizes, 1]", "return sizes or [1]",
           "the check no longer runs the last sample alone (batch-of-one bugs pass)",
           ("tests/test_check.py",)),
    Mutant("check-nan-ignored", "morphcli/equivalence/compare.py",
           "if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):",
           "if False:",
           "NaN/Inf outputs measured as numbers instead of refused", ("tests/test_check.py",)),
    # ------------------------------------------------------------ allowlist / limits
    Mutant("allowlist-operator-exclusion", "morphcli/graph/allowlist.py",
           '_OPERATOR_EXCLUDED = {"attrgetter", "methodcaller", "itemgetter", "call"}',
           "_OPERATOR_EXCLUDED: set[str] = set()",
           "operator's callable builders (attrgetter, call) allowed in descriptions",
           ("tests/test_allowlist_guards.py",)),
    Mutant("allowlist-factory-device", "morphcli/graph/allowlist.py",
           "if device is not None and not isinstance(device, torch.fx.Node):",
           "if False:",
           "a stored factory may allocate on a fixed device", ("tests/test_allowlist_guards.py",)),
    Mutant("allowlist-attrs-unchecked", "morphcli/graph/describe.py",
           "args[1] not in allowlist.SAFE_ATTRS", "args[1] == '\\0'",
           "getattr in a description may read any attribute (climbs to globals)",
           ("tests/test_allowlist_guards.py", "tests/test_security.py")),
    Mutant("limits-new-elements", "morphcli/morphs/limits.py",
           "if count > MAX_NEW_ELEMENTS:", "if count > MAX_NEW_ELEMENTS * 1024:",
           "the cap on weights one morph may create raised 1024x", ("tests/test_budgets.py",)),
    Mutant("limits-rtol-unchecked", "morphcli/morphs/limits.py",
           'check_float("--rtol", rtol, 0.0, 1e300)', "None",
           "a NaN or negative --rtol accepted", ("tests/test_cli_robustness.py",
                                                   "tests/test_bad_inputs.py")),
    # ------------------------------------------------------------ atomic writes
    Mutant("atomic-no-fsync", "morphcli/io/atomic.py",
           "        _fsync(tmp)\n", "        pass\n",
           "the temporary file is renamed into place without fsync", ("tests/test_atomic.py",)),
    Mutant("atomic-no-rename", "morphcli/io/atomic.py",
           "os.replace(tmp, out)", "pass",
           "the finished temporary file is never renamed into place", ("tests/test_atomic.py",)),
    Mutant("atomic-private-mode", "morphcli/io/atomic.py",
           "os.chmod(tmp, _mode_for(out))", "pass",
           "outputs keep mkstemp's private 0600 mode", ("tests/test_atomic.py",)),
    # ------------------------------------------------------------ loaders
    Mutant("torch-load-not-weights-only", "morphcli/io/torch_file.py",
           'return torch.load(data, map_location="cpu", weights_only=True, mmap=mmap)',
           'return torch.load(data, map_location="cpu", weights_only=False, mmap=mmap)',
           "untrusted .pt files unpickled in full (runs code from the file)",
           ("tests/test_security.py",)),
    Mutant("torch-module-state-unchecked", "morphcli/io/torch_file.py",
           "        if not ok:\n            raise InputError(f\"{source}: damaged pickled model",
           "        if False:\n            raise InputError(f\"{source}: damaged pickled model",
           "a pickled model whose layers lack torch's module state is accepted",
           ("tests/test_security.py", "tests/test_bad_inputs.py")),
    Mutant("safetensors-metadata-dropped", "morphcli/io/safetensors_file.py",
           "metadata = f.metadata() or {}", "metadata = {}",
           "a .safetensors file's architecture metadata ignored (read as a bare state_dict)",
           ("tests/test_io_roundtrip.py",)),
    Mutant("safetensors-header-error-raw", "morphcli/io/safetensors_file.py",
           'raise InputError(f"{source}: cannot read as safetensors: {_reason(e)}") from e',
           "raise",
           "a damaged safetensors header escapes as the library's exception (a traceback)",
           ("tests/test_bad_inputs.py", "tests/test_cli_robustness.py")),
    Mutant("safetensors-metadata-unbounded", "morphcli/io/safetensors_file.py",
           'desc = parse_description(text, source, "architecture metadata")',
           "desc = __import__('json').loads(text)",
           "a safetensors file's architecture metadata parsed without size and depth limits",
           ("tests/test_names_safety.py",)),
    Mutant("pt2-pickled-tensor-allowed", "morphcli/io/pt2_archive.py",
           'if meta.get("use_pickle"):', "if False:",
           "a .pt2 tensor stored as a pickle is read instead of refused",
           ("tests/test_pt2_safety.py",)),
    Mutant("pt2-strides-unbounded", "morphcli/io/pt2_archive.py",
           "if needed > base.numel():", "if False:",
           "a .pt2 view reaching past its storage is built (reads out of bounds)",
           ("tests/test_pt2_safety.py",)),
    Mutant("pt2-zip-bomb", "morphcli/io/pt2_archive.py",
           "if self.expanded > _MAX_EXPANSION * self.size + (64 << 20):", "if False:",
           "a .pt2 whose members claim far more bytes than the file holds is read",
           ("tests/test_pt2_safety.py",)),
)


def apply(root: Path, m: Mutant) -> None:
    """Replace ``m.old`` with ``m.new`` in the copy at ``root``; ValueError if stale."""
    path = root / m.path
    text = path.read_text()
    found = text.count(m.old)
    if found != 1:
        raise ValueError(f"{m.path}: snippet found {found} times (must be once): {m.old[:60]!r}")
    path.write_text(text.replace(m.old, m.new))


def run_one(m: Mutant, python: str, workers: int) -> tuple[str, float, str]:
    """``(KILLED | SURVIVED | ERROR, seconds, detail)`` for one mutant."""
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp)
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, root / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif src.exists():
                shutil.copy2(src, root / name)
        try:
            apply(root, m)
        except (OSError, ValueError) as e:
            return "ERROR", time.monotonic() - start, str(e)
        missing = [t for t in m.tests if not (root / t.split("::")[0]).exists()]
        if missing:
            return "ERROR", time.monotonic() - start, f"no test file {missing[0]}"
        cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests]
        if workers > 1:
            cmd += ["-n", str(workers)]
        env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return "ERROR", time.monotonic() - start, f"tests ran past {TIMEOUT_S} s"
    lines = (proc.stdout.strip().splitlines() or [""])
    summary = lines[-1][:100]
    if proc.returncode == 0:
        return "SURVIVED", time.monotonic() - start, summary
    if proc.returncode == 1:  # tests failed: what a mutant should cause
        return "KILLED", time.monotonic() - start, summary
    # 2-5: interrupted, internal error, usage error, no tests: the run itself is broken
    return "ERROR", time.monotonic() - start, f"pytest exit {proc.returncode}: {summary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("-n", "--workers", type=int, default=1,
                        help="pytest-xdist workers per mutant (default 1)")
    args = parser.parse_args(argv)
    names = {m.name for m in MUTANTS}
    assert len(names) == len(MUTANTS), "mutant names must be unique"
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:34} {m.path:34} {m.what}  [{', '.join(m.tests)}]")
        print(f"{len(MUTANTS)} mutants")
        return 0
    unknown = sorted(set(args.only or ()) - names)
    if unknown:
        print(f"error: unknown mutant {unknown[0]!r}; see --list", file=sys.stderr)
        return 2
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    results = []
    for m in chosen:
        status, seconds, detail = run_one(m, sys.executable, args.workers)
        results.append((m, status))
        print(f"{status:8} {seconds:6.1f}s  {m.name:34} {detail}", flush=True)
    killed = sum(s == "KILLED" for _, s in results)
    survivors = [m.name for m, s in results if s == "SURVIVED"]
    errors = [m.name for m, s in results if s == "ERROR"]
    print(f"score: {killed}/{len(results)} killed"
          + (f"; survived: {', '.join(survivors)}" if survivors else "")
          + (f"; errors: {', '.join(errors)}" if errors else ""))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
