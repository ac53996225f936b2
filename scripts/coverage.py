"""Run the zoo matrix and write the coverage table (stdout, docs/coverage.md, README).

    python scripts/coverage.py                    # torchvision, 30 sampled layers per morph
    python scripts/coverage.py --models resnet18 --limit 5
    python scripts/coverage.py --zoo timm --limit 3
    python scripts/coverage.py --zoo timm --count-only --refusals refusals.txt

A morph that is accepted but not exact counts as failed; the script exits 1 if any did.
``--count-only`` measures only how many Conv2d/Linear layers inspect lists for widen (and why
the rest are refused), which needs no morph run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch.fx as fx
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo  # noqa: E402

from morphcli.errors import MorphError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# README: the torchvision block keeps its original markers; timm has its own.
README_MARKERS = {"torchvision": ("<!-- coverage:begin -->", "<!-- coverage:end -->"),
                  "timm": ("<!-- coverage:timm:begin -->", "<!-- coverage:timm:end -->")}
DOCS_TITLES = {"torchvision": "torchvision", "timm": "timm (PyTorch Image Models)"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", choices=list(zoo.ZOOS), default="torchvision")
    parser.add_argument("--models", nargs="*", help="default: every model of the zoo")
    parser.add_argument("--limit", type=int, default=30, help="layers sampled per morph")
    parser.add_argument("--count-only", action="store_true",
                        help="only the widenable-layer count and refusal reasons (no morphs)")
    parser.add_argument("--refusals", type=Path, help="also write the widen count and refusal "
                        "histogram to this text file")
    parser.add_argument("--no-readme", action="store_true", help="do not update README.md")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/coverage.md")
    args = parser.parse_args()
    # The timm models fx cannot trace are tried too, to record the refusal each one gets.
    untraceable = list(zoo.TIMM_UNTRACEABLE) if args.zoo == "timm" else []
    names = args.models or [*zoo.ZOOS[args.zoo], *untraceable]
    console = Console(stderr=True)
    limit = None if args.count_only else args.limit
    # Tables are rewritten after each model: an interrupted run leaves the models it finished.
    run = _measure(names, args.zoo, limit, console,
                   lambda r: _publish(r, args, len(names), console, final=False))
    _publish(run, args, len(names), console, final=True)
    bad_export = any(v != "ok" for e in run.exports.values() for v in e.values())
    failed = any(cell.failed for _, _, cell in run.rows)
    return 1 if bad_export or failed or run.crashed else 0


def _publish(run: _Run, args: argparse.Namespace, n_models: int, console: Console,
             final: bool) -> None:
    widen_text = render_widenable(run.counts, {**run.broken, **run.crashed})
    done = len(run.counts) + len(run.broken) + len(run.crashed)
    if not final:
        widen_text = f"Partial run: {done} of {n_models} models so far.\n\n{widen_text}"
    if args.refusals:
        args.refusals.write_text(widen_text + "\n")
    if args.count_only:
        if final:
            print(widen_text)
        return
    table = render(run.rows, run.exports, run.unlisted, args.limit, time.time() - run.started)
    section = f"{widen_text}\n\n{table}" if args.zoo == "timm" else table
    if final:
        print(section)
    if not args.no_docs:
        update_docs(args.zoo, section)
    if not args.no_readme:
        readme = (f"{widen_text}\n\n{render_summary(run.rows)}" if args.zoo == "timm"
                  else table)
        update_readme(args.zoo, readme)


class _Run:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, zoo.Cell]] = []
        self.exports: dict[str, dict[str, str]] = {}
        self.unlisted: dict[str, tuple[int, Counter]] = {}
        self.counts: dict[str, zoo.Widenable] = {}
        self.broken: dict[str, str] = {}  # model -> the refusal that stopped loading it
        self.crashed: dict[str, str] = {}  # model -> an error that is no refusal (a bug)
        self.started = time.time()


def _measure(names: list[str], zoo_name: str, limit: int | None, console: Console,
             after_each: Callable[[_Run], None]) -> _Run:
    """Load each model; count its widenable layers; with a ``limit``, run the matrix too."""
    run = _Run()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        for name in names:
            task = progress.add_task(f"{name}: loading", total=None)
            try:
                gm = zoo.build(name, zoo=zoo_name)
            except MorphError as e:
                run.broken[name] = str(e)
                progress.update(task, description=f"{name}: refused")
                continue
            try:
                _one_model(run, name, gm, limit, progress, task, console)
            except Exception as e:  # a crash is a bug: recorded, and the run goes on
                run.crashed[name] = f"crash {type(e).__name__}: {e}"
                console.print(f"[red]CRASHED[/] {name}: {run.crashed[name]}")
            if limit is not None:
                after_each(run)
    return run


def _one_model(run: _Run, name: str, gm: fx.GraphModule, limit: int | None,
               progress: Progress, task: TaskID, console: Console) -> None:
    run.counts[name] = zoo.widenable(gm)
    if limit is None:
        progress.update(task, total=1, completed=1, description=name)
        return
    targets = {m: zoo.candidates(gm, m, limit) for m in zoo.MORPHS}
    total = sum(len(t) * (1 if m == "deepen" else len(zoo.MORPHS[m]))
                for m, t in targets.items())
    progress.update(task, total=total, description=name)
    for morph, layers in targets.items():
        cell = zoo.run_cell(gm, morph, layers, lambda t=task: progress.advance(t))
        run.rows.append((name, morph, cell))
        for failure in cell.failed:
            console.print(f"[red]FAILED[/] {name} {morph}: {failure}")
    run.unlisted[name] = zoo.widen_unlisted(gm)
    progress.update(task, description=f"{name}: exports")
    with tempfile.TemporaryDirectory() as tmp:
        run.exports[name] = zoo.export_roundtrip(gm, tmp)
    console.print(f"{name}: done, {time.time() - run.started:.0f} s into the run")


def render_widenable(counts: dict[str, zoo.Widenable], broken: dict[str, str]) -> str:
    """The headline: Conv2d/Linear layers of a widenable kind that inspect lists for widen,
    per model and over the zoo, with a histogram of the reasons for the rest."""
    listed = sum(w.listed for w in counts.values())
    total = sum(w.total for w in counts.values())
    causes: Counter = Counter()
    for w in counts.values():
        causes.update(w.refused)
    pct = 100.0 * listed / total if total else 100.0
    lines = [
        f"**{pct:.1f}% ({listed}/{total})** of the Conv2d and Linear layers of a widenable kind "
        f"in {len(counts)} models are listed for widen by `inspect` (depthwise convs, widened "
        "with their producer, and final classifiers, whose units are the model's output, are "
        "not counted).",
        "",
        "| model | widenable | of | % | depthwise | classifiers | main refusal |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, w in counts.items():
        main = "; ".join(f"{n}× {r}" for r, n in w.refused.most_common(1)) or "-"
        lines.append(f"| {name} | {w.listed} | {w.total} | {w.percent:.0f} | {w.depthwise} | "
                     f"{w.classifiers} | {main} |")
    lines += ["", "Refusal reasons over the zoo (layer and node names stripped):", "",
              "| layers | reason | models |", "| ---: | --- | --- |"]
    for why, n in causes.most_common():
        models = ", ".join(m for m, w in counts.items() if why in w.refused)
        lines.append(f"| {n} | {why} | {models} |")
    if broken:
        lines += ["", "Models that do not load (the refusal each gets):", ""]
        lines += [f"- {name}: {message}" for name, message in broken.items()]
    return "\n".join(lines)


def render_summary(rows: list) -> str:
    """One line per model: exact/tried for each morph (for the README)."""
    by_model: dict[str, dict[str, zoo.Cell]] = {}
    for name, morph, cell in rows:
        by_model.setdefault(name, {})[morph] = cell
    lines = ["| model | deepen exact/tried | widen exact/tried | swap exact+approx/tried | "
             "failed | worst rel |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, cells in by_model.items():
        d, w, s = (cells[m] for m in ("deepen", "widen", "swap"))
        failed = sum(len(c.failed) for c in cells.values())
        worst = max(c.worst_rel for c in cells.values())
        lines.append(f"| {name} | {d.exact}/{d.tried} | {w.exact}/{w.tried} | "
                     f"{s.exact}+{s.approx}/{s.tried} | {failed} | {worst:.1e} |")
    return "\n".join(lines)


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


def replace_between(text: str, begin: str, end: str, body: str) -> str | None:
    """``text`` with what lies between the markers replaced by ``body``; None if absent."""
    if begin not in text or end not in text:
        return None
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def update_docs(zoo_name: str, section: str) -> None:
    """docs/coverage.md holds one section per zoo; only this zoo's is rewritten."""
    path = ROOT / "docs" / "coverage.md"
    path.parent.mkdir(exist_ok=True)
    begin, end = f"<!-- {zoo_name}:begin -->", f"<!-- {zoo_name}:end -->"
    text = path.read_text() if path.exists() else "# Coverage\n"
    new = replace_between(text, begin, end, section)
    if new is None:
        new = f"{text.rstrip()}\n\n## {DOCS_TITLES[zoo_name]}\n\n{begin}\n{section}\n{end}\n"
    path.write_text(new)


def update_readme(zoo_name: str, body: str) -> None:
    readme = ROOT / "README.md"
    new = replace_between(readme.read_text(), *README_MARKERS[zoo_name], body)
    if new is not None:
        readme.write_text(new)


if __name__ == "__main__":
    sys.exit(main())
