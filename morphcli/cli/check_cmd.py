"""``morph check A B``: are two models the same function? Exit 0 yes, 1 no."""

from __future__ import annotations

import typer

from morphcli.cli import options as o
from morphcli.cli.console import err, handled, print_json
from morphcli.equivalence.report import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
)
from morphcli.errors import EXIT_NOT_EQUIVALENT


def check(
    a: o.ModelArg,
    b: o.ModelArg,
    samples: o.Samples = DEFAULT_SAMPLES,
    batch_size: o.BatchSize = DEFAULT_BATCH_SIZE,
    seed: o.Seed = 0,
    atol: o.Atol = DEFAULT_ATOL,
    rtol: o.Rtol = DEFAULT_RTOL,
    input_shape: o.InputShape = None,
    input_ids: o.InputIds = None,
    arch: o.Arch = None,
    arch_kwargs: o.ArchKwargs = None,
    key: o.Key = None,
    trust: o.Trust = False,
    as_json: o.Json = False,
    debug: o.Debug = False,
) -> None:
    """Compare A and B on the same seeded random inputs (either may be .onnx or .pt2).

    --arch applies to each side that holds only weights, --key to each side that is a
    training checkpoint."""
    with handled(debug):
        from morphcli.cli.morph_common import check_numbers
        from morphcli.io.arch import parse_kwargs

        check_numbers(samples, batch_size, seed, atol, rtol)  # before any work
        kwargs = parse_kwargs(arch_kwargs)
        if a == "-" and b == "-":
            from morphcli.errors import InputError

            raise InputError("only one of A and B can be read from stdin")
        if "-" in (a, b):
            from morphcli.cli.console import require_stdin

            require_stdin()
        from morphcli.hf import is_hf_dir

        if is_hf_dir(a) or is_hf_dir(b):  # Hugging Face directories: morphcli/hf compares
            from morphcli.hf.cli import HFCheckOptions, hf_check, refuse_options

            refuse_options({"--arch": arch is not None, "--arch-kwargs": arch_kwargs is not None,
                            "--key": key is not None, "--input-shape": bool(input_shape),
                            "--input-ids": input_ids is not None})
            if hf_check(a, b, HFCheckOptions(samples, batch_size, seed, atol, rtol), as_json):
                return
            raise typer.Exit(EXIT_NOT_EQUIVALENT)
        from morphcli.cli.console import shapes_arg
        from morphcli.cli.progress import step
        from morphcli.equivalence.api import check as run_check

        with step(f"loading and checking on {samples} samples", quiet=False,
                  total=samples) as update:
            report = run_check(a, b, samples=samples, batch_size=batch_size, seed=seed,
                               atol=atol, rtol=rtol, input_shapes=shapes_arg(input_shape),
                               trust=trust, progress=update, arch=arch, arch_kwargs=kwargs,
                               key=key, input_ids=input_ids)
        if as_json:
            print_json(report.to_json())
        else:
            err.print(report.summary(), markup=False, highlight=False)
    if not report.equivalent:
        raise typer.Exit(EXIT_NOT_EQUIVALENT)


def register(app: typer.Typer) -> None:
    app.command("check")(check)
