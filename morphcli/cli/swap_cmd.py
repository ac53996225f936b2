"""``morph swap MODEL LAYER --to ACT``: replace an activation, exactly unless --approx."""

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

LayerArg = Annotated[str, typer.Argument(
    help="The activation: module path (all its call sites), path@N (one site) or the node name "
    "of a functional call (F.relu, torch.sigmoid, x.relu()).", show_default=False)]
To = Annotated[str, typer.Option(
    "--to", help="The new activation (relu, gelu, silu, leaky_relu, prelu, tanh, ...).",
    show_default=False)]
Approx = Annotated[bool, typer.Option(
    "--approx", help="Replace outright instead of blending from the old activation; the "
    "function changes, so the check fails unless --atol allows it or --force.")]


def swap(
    model: o.ModelArg,
    layer: LayerArg,
    to: To,
    approx: Approx = False,
    output: mc.OutputOpt = None,
    force: mc.Force = False,
    no_check: mc.NoCheck = False,
    full_size: mc.FullSize = False,
    dry_run: mc.DryRun = False,
    arch: o.Arch = None,
    arch_kwargs: o.ArchKwargs = None,
    trust: o.Trust = False,
    key: o.Key = None,
    drop_optimizer_state: o.DropOptimizerState = False,
    input_shape: o.InputShape = None,
    seed: o.Seed = 0,
    samples: o.Samples = DEFAULT_SAMPLES,
    batch_size: o.BatchSize = DEFAULT_BATCH_SIZE,
    atol: o.Atol = DEFAULT_ATOL,
    rtol: o.Rtol = DEFAULT_RTOL,
    as_json: o.Json = False,
    quiet: o.Quiet = False,
    debug: o.Debug = False,
) -> None:
    """Swap the activation LAYER to --to: a learnable blend that starts as the old one."""
    with handled(debug):
        mc.check_numbers(samples, batch_size, seed, atol, rtol)  # before any work
        from morphcli.morphs.swap import SwapOptions, swap_graph

        mc.run_morph_command(
            kind="swap", model=model, morph=swap_graph, options=SwapOptions(layer, to, approx),
            loading=LoadOptions.of(arch, arch_kwargs, trust, input_shape, key), output=output,
            check=mc.check_options(no_check, samples, batch_size, seed, atol, rtol,
                                   full_size),
            force=force, dry_run=dry_run, as_json=as_json, quiet=quiet,
            drop_optimizer_state=drop_optimizer_state)


def register(app: typer.Typer) -> None:
    app.command("swap")(swap)
