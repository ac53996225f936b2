"""The flow every morph command shares: load, morph, check, report, write."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from morphcli.cli.console import err, info, print_json, refuse_json_with_stdout_model
from morphcli.cli.loading import LoadOptions
from morphcli.errors import EXIT_NOT_EQUIVALENT

OutputOpt = Annotated[str | None, typer.Option(
    "--output", "-o", help="Output file; the suffix picks the format (.pt, .safetensors, .pt2, "
    ".onnx); '-' writes a .pt archive to stdout. Default: MODEL.MORPH.pt beside the input, "
    "never overwriting a file (stdout when MODEL is '-').", show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Write the result even if the check fails.",
                                     rich_help_panel="Checking")]
NoCheck = Annotated[bool, typer.Option("--no-check", help="Skip the equivalence check.",
                                       rich_help_panel="Checking")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
ShardSize = Annotated[str | None, typer.Option(
    "--shard-size", help="Hugging Face directories: the largest weight file to write, e.g. 5GB "
    "or 500MB (default: shard like the input).", show_default=False)]
FullSize = Annotated[bool, typer.Option(
    "--full-size", help="Check at the stored input size. By default an image-like input is "
    "shrunk (by a power of two) while every convolution and pooling weight still meets data, "
    "which makes the check much cheaper.", rich_help_panel="Checking")]


def run_morph_command(
    *,
    kind: str,
    model: str,
    morph: Any,
    options: Any,
    loading: LoadOptions,
    output: str | None,
    check: Any,
    force: bool,
    dry_run: bool,
    as_json: bool,
    quiet: bool,
    drop_optimizer_state: bool = False,
) -> None:
    """Shared body of ``deepen``, ``widen`` and ``swap`` (call inside ``handled``)."""
    from dataclasses import replace

    from morphcli.cli.progress import step
    from morphcli.morphs.runner import apply_morph
    from morphcli.writing import write_verified

    dest = output or default_output(model, kind)
    if not dry_run:
        refuse_json_with_stdout_model(dest, as_json, default=output is None)
    if not dry_run and dest != "-":  # every output check before any work
        from morphcli.io.atomic import check_output_path
        from morphcli.io.formats import output_format

        output_format(Path(dest))
        check_output_path(Path(dest), (Path(model),) if model != "-" else (),
                          stdin=model == "-")
    with step(f"loading {model}", quiet=quiet):
        gm = loading.load(model)
    if not dry_run:  # every output format stores a description: refuse before the work
        from morphcli.graph.describe import describe

        describe(gm)
    what = f"{kind} and check on {check.samples} samples" if check.enabled else kind
    with step(what, quiet=quiet, total=check.samples if check.enabled else None) as update:
        new, result = apply_morph(morph, gm, options, replace(check, progress=update))
    from morphcli.morphs.flow import follow_entries, may_write

    follow_entries(new, result, suffix=Path(dest).suffix,
                   drop_optimizer_state=drop_optimizer_state, source=model)
    doc: dict[str, Any] = {"plan": result.to_json(), "output": None}
    if dry_run:
        _report(result, quiet or as_json, plan_only=True)
        if as_json:
            print_json(doc)
        return
    _report(result, quiet or as_json)
    failed = not may_write(result, force=False)
    if not may_write(result, force):
        if as_json:
            print_json(doc)
        err.print(_not_equivalent_message(result), markup=False, highlight=False)
        raise typer.Exit(EXIT_NOT_EQUIVALENT)
    with step(f"writing and verifying {'stdout' if dest == '-' else dest}", quiet=quiet):
        written = write_verified(new, dest, source=model)
    doc["output"] = written["output"]
    doc["export_check"] = written["check"]
    if as_json:
        print_json(doc)
    elif dest != "-":
        info(f"wrote {written['output']}", quiet)
    if failed:
        raise typer.Exit(EXIT_NOT_EQUIVALENT)


def _not_equivalent_message(result: Any) -> str:
    diff = result.check.max_abs
    if diff != diff:  # NaN: no tolerance and no --force can make such a model pass
        return (f"error: the check cannot pass: {result.check.reason} (does the input model "
                "hold NaN or Inf weights?); nothing was written")
    wide = result.float64_check
    if result.exact and wide is not None and wide.equivalent:
        return (f"error: in float32 the morphed model differs from the original by up to "
                f"{diff:.3g} (max abs), beyond the tolerance, but in float64 the two agree "
                f"({wide.max_abs:.3g}): the morph is exact and this model amplifies float32 "
                "round-off (as a LayerNorm over a few nearly equal features does); nothing was "
                f"written (pass --atol {_round_up(diff)} to accept it, or --force)")
    if result.exact:
        return ("error: the morphed model is not equivalent to the original; nothing was "
                "written (widen --atol or pass --force to write it anyway)")
    # Approximate by request (--noise, --approx): failing the default tolerance is expected.
    return (f"error: this morph is approximate by request and changes the output by up to "
            f"{diff:.3g} (max abs), beyond the tolerance; nothing was written (pass --atol "
            f"{_round_up(diff)} to accept that difference, or --force to write it anyway)")


def _round_up(x: float) -> str:
    """A short tolerance just above ``x``: 0.0566 -> 0.06."""
    import math

    if not math.isfinite(x) or x <= 0:
        return "X"
    digits = -math.floor(math.log10(x))
    return f"{math.ceil(x * 10**digits) / 10**digits:g}"


def default_output(model: str, kind: str) -> str:
    """``cnn.pt`` -> ``cnn.deepen.pt``, or ``cnn.deepen.2.pt`` if that exists; stdin -> stdout."""
    if model == "-":
        return "-"
    src = Path(model)
    stem = src.name[: -len(src.suffix)] if src.suffix else src.name
    suffix = src.suffix if src.suffix in (".pt", ".pth", ".ckpt", ".safetensors", ".pt2") \
        else ".pt"
    candidate = src.with_name(f"{stem}.{kind}{suffix}")
    i = 2
    while candidate.exists():
        candidate = src.with_name(f"{stem}.{kind}.{i}{suffix}")
        i += 1
    return str(candidate)


def _report(result: Any, quiet: bool, plan_only: bool = False) -> None:
    if quiet:
        return
    from rich.table import Table

    table = Table(title=f"{result.morph} {result.target}" + (" (dry run)" if plan_only else ""))
    for col in ("change", "name", "old", "new", "note"):
        table.add_column(col, overflow="fold")
    for c in result.changes:
        table.add_row(c.action, c.name, _fmt(c.old), _fmt(c.new), c.note)
    err.print(table)
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False)
    if not result.exact:
        err.print("approximate morph: the function changes by the measured difference below",
                  markup=False)
    if result.check is not None:
        err.print(f"check: {result.check.summary()}", markup=False, highlight=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return "(" + ",".join(str(x) for x in v) + ")"
    return str(v)


def check_options(no_check: bool, samples: int, batch_size: int, seed: int, atol: float,
                  rtol: float, full_size: bool = False) -> Any:
    from morphcli.morphs.runner import CheckOptions

    check_numbers(samples, batch_size, seed, atol, rtol)
    return CheckOptions(not no_check, samples, batch_size, seed, atol, rtol, full_size)


def refuse_shard_size(shard_size: str | None) -> None:
    """--shard-size shapes a Hugging Face directory's weight files; a model file has one."""
    if shard_size is not None:
        from morphcli.errors import InputError

        raise InputError("--shard-size applies to Hugging Face directories only; a model file "
                         "is written whole")


def check_numbers(samples: int, batch_size: int, seed: int, atol: float, rtol: float) -> None:
    """The checking options every command shares, in range before any work."""
    from morphcli.morphs.limits import check_numbers as check

    check(samples, batch_size, seed, atol, rtol)
