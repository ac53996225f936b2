"""The CLI side of Hugging Face directories: ``morph inspect|deepen|widen|check DIR``.

The command modules in morphcli/cli dispatch here when MODEL is a directory holding
config.json. Call inside ``console.handled``: errors are raised, printed there."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from morphcli.cli.console import err, info, out, print_json
from morphcli.errors import (
    EXIT_NOT_EQUIVALENT,
    InputError,
    NotEquivalentError,
    UnsupportedMorphError,
)


@dataclass(frozen=True)
class HFCheckOptions:
    """How the grown model is checked (the options of morph's check)."""

    samples: int = 8
    batch_size: int = 4
    seed: int = 0
    atol: float = 0.0
    rtol: float = 1e-5
    skip: bool = False


@dataclass(frozen=True)
class HFRun:
    """What every morph command shares: where to write and what to print."""

    output: str | None = None
    force: bool = False
    dry_run: bool = False
    as_json: bool = False
    quiet: bool = False
    trust: bool = False
    shard_size: str | None = None    # --shard-size, e.g. 5GB; None: shard like the input


# ---------------------------------------------------------------- inspect


def hf_inspect(model: str, as_json: bool, trust: bool = False) -> None:
    from morphcli.hf.directory import load_dir
    from morphcli.hf.inspect import summarize

    summary = summarize(load_dir(model, trust))
    if as_json:
        print_json(summary)
        return
    sizes = ", ".join(f"{k} {v}" for k, v in summary["sizes"].items() if v is not None)
    lines = [f"{model}: {summary['family']} ({summary['class']}), {summary['dtype']}, "
             f"{len(summary['shards'])} weight file(s), {summary['params']:,} parameters",
             f"  sizes: {sizes}",
             f"  blocks: {summary['blocks'][0]} .. {summary['blocks'][-1]} "
             f"({len(summary['blocks'])})",
             "  morphs:"]
    lines += [f"    morph {m}" for m in summary["morphs"]]
    out.print("\n".join(lines), markup=False, highlight=False)


# ---------------------------------------------------------------- deepen and widen


def refuse_options(given: dict[str, bool]) -> None:
    """Options of the file commands that mean nothing for a directory: refuse, never ignore."""
    names = [name for name, used in given.items() if used]
    if names:
        raise InputError(f"option {', '.join(names)} does not apply to a Hugging Face "
                         "directory; drop it (morph inspect DIR lists the morphs that apply)")


def hf_deepen(model: str, afters: list[str], run: HFRun, check: HFCheckOptions) -> None:
    from morphcli.hf.morphs import deepen

    _morph_command(model, "deepen", lambda d: deepen(d, afters), run, check)


def hf_widen(model: str, field: str, to: int | None, by: int | None, factor: float | None,
             init: str, run: HFRun, check: HFCheckOptions) -> None:
    from morphcli.hf import morphs

    if init not in ("zero", "copy"):
        raise InputError(f"--init {init!r}: choose zero or copy")

    def morph(d: Any) -> Any:
        if field == "intermediate_size" or field == d.family.field_of("inter"):
            width = morphs.new_width(morphs.mlp_width(d), to, by, factor, field)
            return morphs.widen_mlp(d, width, init, check.seed)
        if field in ("hidden_size", d.family.field_of("hidden")):
            return morphs.widen_hidden(d, _integer_factor(d, to, by, factor))
        if field in ("num_attention_heads", d.family.field_of("heads")):
            heads = morphs.new_width(int(d.cfg("heads")), to, by, factor, field)
            return morphs.widen_heads(d, heads, check.seed)
        raise _refuse_field(d, field)

    _morph_command(model, "widen", morph, run, check)


def _integer_factor(d: Any, to: int | None, by: int | None, factor: float | None) -> int:
    hidden = int(d.cfg("hidden"))
    from morphcli.hf.morphs import new_width

    width = new_width(hidden, to, by, factor, "hidden_size")
    if width % hidden:
        raise UnsupportedMorphError(
            f"widen hidden_size: {width} is not a whole multiple of {hidden}; HyperCloning "
            "grows the residual stream by an integer factor, e.g. --factor 2")
    return width // hidden


def _refuse_field(d: Any, field: str) -> Exception:
    from morphcli.hf.families import WIDEN_FIELDS

    if field.startswith(d.prefix + "."):
        return UnsupportedMorphError(
            f"{field}: one block's layer cannot be widened alone, since config.json holds one "
            f"width for every block; widen them all, e.g. morph widen {d.path} "
            "intermediate_size --by 64")
    if field == d.family.field_of("head_dim") and d.family.rotary:
        return UnsupportedMorphError(
            "widen head_dim: growing head_dim changes the rotary frequencies, so the function "
            "changes; add heads instead: widen num_attention_heads --by N")
    return InputError(f"widen {field!r}: a Hugging Face directory widens a config field, one of "
                      f"{', '.join(WIDEN_FIELDS)}")


def _morph_command(model: str, kind: str, morph: Any, run: HFRun,
                   check: HFCheckOptions) -> None:
    from morphcli.cli.progress import step
    from morphcli.hf.check import release_free_memory, verify_reload
    from morphcli.hf.directory import load_dir
    from morphcli.hf.morphs import meta_model
    from morphcli.hf.write import check_output_dir, parse_size, staged_dir, write_dir

    source = Path(model)
    shard_bytes = parse_size(run.shard_size) if run.shard_size is not None else None
    dest = Path(run.output) if run.output else source.with_name(source.name + f".{kind}")
    if run.output == "-":
        raise InputError("a Hugging Face directory is written to a directory: pass -o DIR")
    if not run.dry_run:
        check_output_dir(dest, source)
    with step(f"loading {model}", quiet=run.quiet):
        d = load_dir(source, run.trust)
    result = morph(d)
    meta_model(d, result.config)  # transformers must accept the new config before any work
    if run.dry_run:
        if run.as_json:
            print_json(result.plan)
        else:
            info(_plan_text(result.plan))
        return
    verdict, original, again = None, None, None
    # From here the locals alone hold the tensors, so each is freed once used: upcast for
    # the check, or written (unchecked: straight from the mapped input).
    stored, state, dtypes = d.state, result.state, None
    d.state = result.state = {}
    if check.skip:
        stored = {}
    else:
        dtypes = {k: t.dtype for k, t in state.items()}
        with step("checking logits and greedy tokens in float32", quiet=run.quiet):
            verdict, original, state = _check(d, result.config, stored, state, check)
        _require(verdict, run.force, "the grown model")
        if verdict.equivalent:  # its outputs are remembered: free its float32 tensors
            original.release()
    with staged_dir(dest) as tmp:
        with step(f"writing {dest}", quiet=run.quiet):
            files = write_dir(d, tmp, state, result.config, result.plan, shard_bytes, dtypes)
        if not check.skip:
            release_free_memory()  # the float32 tensors just written and freed
            with step("reloading with from_pretrained and comparing it with the checked "
                      "tensors", quiet=run.quiet):
                # the morph again, from the input read lazily again: what was checked, in
                # the stored dtypes (the morph is deterministic: seeded)
                expected = morph(load_dir(source, run.trust)).state
                again = verify_reload(d, tmp, result.config, expected)
            _require(again, run.force, "the written directory")
    _report(dest, files, result.plan, verdict, run)
    if any(v is not None and not v.equivalent for v in (verdict, again)):
        raise typer.Exit(EXIT_NOT_EQUIVALENT)  # written with --force: still not equivalent


def _check(d: Any, config: dict[str, Any], stored: dict[str, Any], grown: dict[str, Any],
           check: HFCheckOptions) -> tuple[Any, Any, Any]:
    """(verdict, the original as a Reference, the grown state in float32). The original is
    kept for the second check, of the reloaded output; the grown model is freed on return.
    ``stored`` and ``grown`` (the input's and the morph's tensors) are emptied: the output
    is written from the float32 tensors, cast back to the input's dtype (exact)."""
    from morphcli.hf.check import Reference, build, upcast_consuming

    f32_a, f32_b = upcast_consuming(stored, grown)  # shared where unchanged
    a = Reference(build(d, d.config, f32_a))
    b = build(d, config, f32_b)
    return _compare(d, a, b, check), a, f32_b


def _compare(d: Any, a: Any, b: Any, check: HFCheckOptions) -> Any:
    from morphcli.hf.check import compare_models

    vocab = int(d.config.get("vocab_size") or a.config.vocab_size)
    return compare_models(a, b, vocab, decoder=d.family.decoder, samples=check.samples,
                          batch_size=check.batch_size, seed=check.seed, atol=check.atol,
                          rtol=check.rtol)


def _require(verdict: Any, force: bool, what: str) -> None:
    if not verdict.equivalent and not force:
        raise NotEquivalentError(f"{what} is not equivalent, nothing was written: "
                                 f"{verdict.summary()} (--force writes it anyway)")


def _report(dest: Path, files: list[str], plan: dict[str, Any], verdict: Any,
            run: HFRun) -> None:
    summary = verdict.summary() if verdict is not None else "not checked (--no-check)"
    if run.as_json:
        print_json({"output": str(dest), "weights": files, "plan": plan,
                    "check": verdict.to_json() if verdict is not None else None})
    else:
        info(f"wrote {dest} ({len(files)} weight file(s)); {summary}", run.quiet)


def _plan_text(plan: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in plan.items())


# ---------------------------------------------------------------- check


def hf_check(a: str, b: str, check: HFCheckOptions, as_json: bool) -> bool:
    """Compare two directories of one family; returns whether they are equivalent."""
    from morphcli.hf import is_hf_dir
    from morphcli.hf.check import Reference, build
    from morphcli.hf.directory import load_dir

    if not (is_hf_dir(a) and is_hf_dir(b)):
        raise InputError("morph check compares two Hugging Face directories with each other, "
                         "not with a model file")
    da, db = load_dir(a), load_dir(b)
    if da.family.name != db.family.name or da.config.get("vocab_size") != db.config.get(
            "vocab_size"):
        raise InputError(f"{a} ({da.family.name}) and {b} ({db.family.name}) are not the same "
                         "family with the same vocabulary")
    verdict = _compare(da, Reference(build(da, da.config, da.state)),
                       build(db, db.config, db.state), check)
    if as_json:
        print_json(verdict.to_json())
    else:
        err.print(verdict.summary(), markup=False, highlight=False)
    return bool(verdict.equivalent)


def hf_export(model: str, output: str, as_json: bool, quiet: bool) -> None:
    """``morph export DIR -o model.onnx | model.pt2``: input_ids in, logits out."""
    from morphcli.cli.progress import step
    from morphcli.hf.directory import load_dir
    from morphcli.hf.export import export_dir
    from morphcli.io.atomic import check_output_path

    dest = Path(output)
    if output == "-":
        raise InputError("export of a Hugging Face directory writes a file: pass -o FILE")
    check_output_path(dest)
    d = load_dir(model)
    with step(f"exporting and verifying {dest}", quiet=quiet):
        result = export_dir(d, dest)
    if as_json:
        print_json(result)
    else:
        info(f"wrote {dest} ({result['format']}, {result['inputs']}); verified at a new shape: "
             f"max rel diff {result['max_rel_diff']:.3g}", quiet)
