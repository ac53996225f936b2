"""``morph widen MODEL LAYER (--to N | --by N | --factor F)``: more units, same function."""

from __future__ import annotations

from typing import Annotated

import typer

from morphcli.cli import morph_common as mc
from morphcli.cli import options as o
from morphcli.cli.console import handled
from morphcli.cli.loading import LoadOptions
from morphcli.equivalence.report import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
)

Layer = Annotated[str, typer.Argument(help="The layer to widen (Linear, Conv, ConvTranspose, "
                                      "Embedding), as 'morph inspect' names it.",
                                      show_default=False)]


def widen(
    model: o.ModelArg,
    layer: Layer,
    to: Annotated[int | None, typer.Option("--to", help="New number of units.")] = None,
    by: Annotated[int | None, typer.Option("--by", help="Units to add.")] = None,
    factor: Annotated[float | None, typer.Option("--factor", help="Multiply the width.")] = None,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="zero: new units get random inputs and zero outgoing weights (Network "
            "Morphism); copy: new units copy existing ones and consumers divide (Net2WiderNet).",
        ),
    ] = "zero",
    noise: Annotated[
        float,
        typer.Option(
            "--noise",
            help="Symmetry-breaking noise (std) on the "
            "new units' weights only; makes the morph approximate.",
            min=0.0,
        ),
    ] = 0.0,
    kernel: Annotated[
        int | None,
        typer.Option(
            "--kernel",
            help="Also grow this convolution's kernel to K (zero-padded, padding adjusted).",
        ),
    ] = None,
    output: mc.OutputOpt = None,
    force: mc.Force = False,
    no_check: mc.NoCheck = False,
    full_size: mc.FullSize = False,
    dry_run: mc.DryRun = False,
    shard_size: mc.ShardSize = None,
    samples: o.Samples = DEFAULT_SAMPLES,
    batch_size: o.BatchSize = DEFAULT_BATCH_SIZE,
    seed: o.Seed = 0,
    atol: o.Atol = DEFAULT_ATOL,
    rtol: o.Rtol = DEFAULT_RTOL,
    arch: o.Arch = None,
    arch_kwargs: o.ArchKwargs = None,
    trust: o.Trust = False,
    key: o.Key = None,
    drop_optimizer_state: o.DropOptimizerState = False,
    input_shape: o.InputShape = None,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    debug: o.Debug = False,
) -> None:
    """Give LAYER more output units and update every layer they reach, keeping the function."""
    with handled(debug):
        from morphcli.morphs.limits import check_widen_numbers

        mc.check_numbers(samples, batch_size, seed, atol, rtol)  # before any work
        check_widen_numbers(to, by, factor, noise, kernel, seed)
        from morphcli.hf import is_hf_dir

        if is_hf_dir(model):  # a Hugging Face directory: LAYER is a config field
            from morphcli.hf.cli import HFCheckOptions, HFRun, hf_widen, refuse_options

            refuse_options({"--noise": noise > 0, "--kernel": kernel is not None,
                            "--arch": arch is not None, "--input-shape": bool(input_shape),
                            "--full-size": full_size})
            return hf_widen(model, layer, to, by, factor, init,
                            HFRun(output, force, dry_run, as_json, quiet, trust, shard_size),
                            HFCheckOptions(samples, batch_size, seed, atol, rtol, no_check))
        mc.refuse_shard_size(shard_size)
        from morphcli.morphs.widen import WidenOptions, widen_graph

        mc.run_morph_command(
            kind="widen", model=model, morph=widen_graph,
            options=WidenOptions(layer, to, by, factor, init, noise, kernel, seed),
            loading=LoadOptions.of(arch, arch_kwargs, trust, input_shape, key), output=output,
            check=mc.check_options(no_check, samples, batch_size, seed, atol, rtol,
                                   full_size),
            force=force, dry_run=dry_run, as_json=as_json, quiet=quiet,
            drop_optimizer_state=drop_optimizer_state)


def register(app: typer.Typer) -> None:
    app.command("widen")(widen)
