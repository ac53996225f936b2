"""``morph deepen MODEL --after LAYER``: insert an identity layer after LAYER, checked."""

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

After = Annotated[list[str], typer.Option(
    "--after", help="The layer whose output the new layer reads (module path, path@N for one "
    "call site of a shared module, or an op's node name); for a Hugging Face directory a "
    "block (model.layers.3), repeatable.", show_default=False, metavar="LAYER")]
Init = Annotated[str, typer.Option(
    "--init", help="identity (Net2DeeperNet) or decompose (NetMorph: a random orthogonal "
    "mixing, with LAYER re-expressed; LAYER must be a Linear or Conv).")]
Kernel = Annotated[int, typer.Option("--kernel", help="Odd kernel size of a new convolution.",
                                     min=1)]
Norm = Annotated[bool, typer.Option(
    "--norm", help="Add a BatchNorm after the new layer (the identity in eval mode).")]
Activation = Annotated[str | None, typer.Option(
    "--activation", help="Add an activation after the new layer: plain where it provably changes "
    "nothing, else an identity-initialised blend.", show_default=False)]
Residual = Annotated[bool, typer.Option(
    "--residual", help="Insert x + f(x) with f's last layer zero-initialised.")]
Noise = Annotated[float, typer.Option(
    "--noise", help="Std of Gaussian noise on the new weights (symmetry breaking; approximate: "
    "the check then fails unless --atol allows it or --force).", min=0.0)]


def deepen(
    model: o.ModelArg,
    after: After,
    init: Init = "identity",
    kernel: Kernel = 3,
    norm: Norm = False,
    activation: Activation = None,
    residual: Residual = False,
    noise: Noise = 0.0,
    output: mc.OutputOpt = None,
    force: mc.Force = False,
    no_check: mc.NoCheck = False,
    full_size: mc.FullSize = False,
    dry_run: mc.DryRun = False,
    shard_size: mc.ShardSize = None,
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
    """Insert a layer after LAYER that computes the identity, so the function is unchanged."""
    with handled(debug):
        from morphcli.morphs import limits

        mc.check_numbers(samples, batch_size, seed, atol, rtol)  # before any work
        limits.check_int("--kernel", kernel, 1, limits.MAX_KERNEL)
        from morphcli.hf import is_hf_dir

        if is_hf_dir(model):  # a Hugging Face directory: morphcli/hf handles it
            from morphcli.hf.cli import HFCheckOptions, HFRun, hf_deepen, refuse_options

            refuse_options({"--init": init != "identity", "--kernel": kernel != 3, "--norm": norm,
                            "--activation": activation is not None, "--residual": residual,
                            "--noise": noise > 0, "--arch": arch is not None,
                            "--input-shape": bool(input_shape), "--full-size": full_size})
            return hf_deepen(model, after, HFRun(output, force, dry_run, as_json, quiet, trust,
                                   shard_size),
                             HFCheckOptions(samples, batch_size, seed, atol, rtol, no_check))
        mc.refuse_shard_size(shard_size)
        if len(after) > 1:
            from morphcli.errors import InputError

            raise InputError("--after is repeatable only for Hugging Face directories; "
                             "deepen one layer at a time")
        from morphcli.morphs.deepen import DeepenOptions, deepen_graph

        options = DeepenOptions(after[0], init, kernel, norm, activation, residual, noise, seed)
        mc.run_morph_command(
            kind="deepen", model=model, morph=deepen_graph, options=options,
            loading=LoadOptions.of(arch, arch_kwargs, trust, input_shape, key), output=output,
            check=mc.check_options(no_check, samples, batch_size, seed, atol, rtol,
                                   full_size),
            force=force, dry_run=dry_run, as_json=as_json, quiet=quiet,
            drop_optimizer_state=drop_optimizer_state)


def register(app: typer.Typer) -> None:
    app.command("deepen")(deepen)
