"""Run the zoo matrix and write the coverage table (stdout, docs/coverage.md, README).

    python scripts/coverage.py                    # every model, 30 sampled layers per morph
    python scripts/coverage.py --models resnet18 --limit 5

A morph that is accepted but not exact counts as failed; the script exits 1 if any did.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(zoo.MODELS))
    parser.add_argument("--limit", type=int, default=30, help="layers sampled per morph")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    args = parser.parse_args()
    console = Console(stderr=True)
    rows = []
    exports: dict[str, dict[str, str]] = {}
    unlisted: dict[str, tuple[int, Counter]] = {}
    started = time.time()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        for name in args.models:
            task = progress.add_task(f"{name}: loading", total=None)
            gm = zoo.build(name)
            targets = {m: zoo.candidates(gm, m, args.limit) for m in zoo.MORPHS}
            total = sum(len(t) * (1 if m == "deepen" else len(zoo.MORPHS[m]))
                        for m, t in targets.items())
            progress.update(task, total=total, description=name)
            for morph, layers in targets.items():
                cell = zoo.run_cell(gm, morph, layers, lambda t=task: progress.advance(t))
                rows.append((name, morph, cell))
                for failure in cell.failed:
                    console.print(f"[red]FAILED[/] {name} {morph}: {failure}")
            unlisted[name] = zoo.widen_unlisted(gm)
            progress.update(task, description=f"{name}: exports")
            with tempfile.TemporaryDirectory() as tmp:
                exports[name] = zoo.export_roundtrip(gm, tmp)
    table = render(rows, exports, unlisted, args.limit, time.time() - started)
    print(table)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "coverage.md").write_text(table + "\n")
    if not args.no_readme:
        update_readme(table)
    bad_export = any(v != "ok" for e in exports.values() for v in e.values())
    return 1 if bad_export or any(cell.failed for _, _, cell in rows) else 0


def render(rows: list, exports: dict[str, dict[str, str]],
           unlisted: dict[str, tuple[int, Counter]], limit: int, seconds: float) -> str:
    lines = [
        f"Sampled up to {limit} layers per model and morph (seeded); {seconds / 60:.0f} min on "
        "2 CPU cores. `exact`: accepted and equivalent (worst max_rel shown); `approx`: "
        "`swap --approx`, measured and labelled; `failed` must be 0.",
        "",
        "| model | morph | tried | exact | approx | refused | failed | worst rel | refusals |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, morph, c in rows:
        reasons = "; ".join(f"{n}× {r}" for r, n in c.refused.most_common(3)) or "-"
        lines.append(f"| {name} | {morph} | {c.tried} | {c.exact} | {c.approx} | "
                     f"{sum(c.refused.values())} | {len(c.failed)} | {c.worst_rel:.1e} | "
                     f"{reasons} |")
    lines += ["", "Layers of a type widen has a rule for (Linear, Conv, ...) that `inspect` does "
              "not list for widen, because the coupling analysis refuses them (these are not in "
              "the table above):", "", "| model | such layers | not listed | reasons |",
              "| --- | ---: | ---: | --- |"]
    for name, (typed, refused) in unlisted.items():
        reasons = "; ".join(f"{n}× {r}" for r, n in refused.most_common(3)) or "-"
        lines.append(f"| {name} | {typed} | {sum(refused.values())} | {reasons} |")
    lines += ["", "One morphed result per model (deepen, then widen), written, read back and "
              "checked:", "", "| model | " + " | ".join(zoo.EXPORT_FORMATS) + " |",
              "| --- |" + " --- |" * len(zoo.EXPORT_FORMATS)]
    for name, status in exports.items():
        lines.append(f"| {name} | " + " | ".join(status[s] for s in zoo.EXPORT_FORMATS) + " |")
    return "\n".join(lines)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


if __name__ == "__main__":
    sys.exit(main())
