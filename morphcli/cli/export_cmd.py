"""``morph export MODEL -o OUT``: convert between formats; the output suffix picks the format."""

from __future__ import annotations

import typer

from morphcli.cli import options as o
from morphcli.cli.console import handled, info, print_json, refuse_json_with_stdout_model
from morphcli.cli.loading import LoadOptions


def export(
    model: o.ModelArg,
    output: o.Output,
    arch: o.Arch = None,
    arch_kwargs: o.ArchKwargs = None,
    trust: o.Trust = False,
    key: o.Key = None,
    input_shape: o.InputShape = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    debug: o.Debug = False,
) -> None:
    """Write MODEL in another format, verified against the source before success is reported."""
    with handled(debug):
        from morphcli.hf import is_hf_dir

        if is_hf_dir(model):  # a Hugging Face directory: morphcli/hf handles it
            from morphcli.hf.cli import hf_export, refuse_options

            refuse_options({"--key": key is not None})
            return hf_export(model, output, as_json, quiet)
        refuse_json_with_stdout_model(output, as_json)
        if output != "-":  # before any work: a path that cannot be written, or is the input
            from pathlib import Path

            from morphcli.io.atomic import check_output_path

            check_output_path(Path(output), (Path(model),) if model != "-" else (),
                              stdin=model == "-")
            from morphcli.io.formats import output_format

            output_format(Path(output))
        from morphcli.cli.progress import step
        from morphcli.writing import write_verified

        loading = LoadOptions.of(arch, arch_kwargs, trust, input_shape, key)
        with step(f"loading {model}", quiet=quiet):
            gm = loading.load(model)
        with step(f"exporting and verifying {'stdout' if output == '-' else output}", quiet=quiet):
            result = write_verified(gm, output, source=model)
        if as_json:
            print_json(result)
        elif output != "-":
            info(f"wrote {result['output']} ({result['format']}); "
                 f"{result['check']['summary']}", quiet)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
