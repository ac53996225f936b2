"""``morph inspect MODEL``: the layers in execution order, with shapes and applicable morphs."""

from __future__ import annotations

import typer

from morphcli.cli import options as o
from morphcli.cli.console import handled, out, print_json
from morphcli.cli.loading import LoadOptions


def inspect(
    model: o.ModelArg,
    arch: o.Arch = None,
    arch_kwargs: o.ArchKwargs = None,
    trust: o.Trust = False,
    key: o.Key = None,
    input_shape: o.InputShape = None,
    as_json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """List the layers of MODEL: type, input and output shapes, parameters, applicable morphs."""
    with handled(debug):
        from morphcli.hf import is_hf_dir

        if is_hf_dir(model):  # a Hugging Face directory: morphcli/hf handles it
            from morphcli.hf.cli import hf_inspect, refuse_options

            refuse_options({"--key": key is not None})
            return hf_inspect(model, as_json, trust)
        from morphcli.inspection import summarize

        gm = LoadOptions.of(arch, arch_kwargs, trust, input_shape, key).load(model)
        summary = summarize(gm)
        if as_json:
            print_json(summary)
            return
        _print_table(model, summary)


def _print_table(model: str, summary: dict) -> None:
    from rich.table import Table

    inputs = ", ".join(_shape(i["shape"]) for i in summary["inputs"])
    table = Table(title=f"{model}  inputs {inputs}")
    for col, justify in (("#", "right"), ("layer", "left"), ("type", "left"), ("input", "left"),
                         ("output", "left"), ("params", "right"), ("morphs", "left")):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for i, layer in enumerate(summary["layers"], 1):
        table.add_row(str(i), layer["name"], layer["type"],
                      " ".join(_shape(s) for s in layer["input_shapes"]),
                      " ".join(_shape(s) for s in layer["output_shapes"]),
                      f"{layer['params']:,}", ", ".join(layer["morphs"]) or "-")
    totals = summary["totals"]
    table.caption = (f"{totals['layers']} layers, {totals['params']:,} parameters "
                     f"({totals['trainable_params']:,} trainable), {totals['bytes']:,} bytes")
    if not out.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        out.width = max(out.width, 150)
    out.print(table)


def _shape(shape: list[int] | None) -> str:
    return "?" if shape is None else "x".join(str(d) for d in shape)


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
