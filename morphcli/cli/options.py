"""Options shared by several commands, declared once."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[
    str,
    typer.Argument(
        help="Model file (.pt, .pth, .safetensors, .pt2; '-' reads stdin).", show_default=False
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(
        "--arch",
        help="MODULE:CALLABLE that builds the architecture for a state_dict file, "
        "e.g. torchvision.models:resnet18.",
        rich_help_panel="Loading",
    ),
]
ArchKwargs = Annotated[
    str | None,
    typer.Option(
        "--arch-kwargs",
        help="JSON keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.",
        rich_help_panel="Loading",
    ),
]
Key = Annotated[
    str | None,
    typer.Option(
        "--key",
        help="The entry of a training checkpoint that holds the model state, when several "
        "do (e.g. model and ema). The other entries (optimizer, epoch, ...) are written back.",
        rich_help_panel="Loading",
    ),
]
DropOptimizerState = Annotated[
    bool,
    typer.Option(
        "--drop-optimizer-state",
        help="In a training checkpoint, drop the optimizer state of the parameters the morph "
        "changes (it cannot follow a morph yet); param_groups and other entries are kept.",
        rich_help_panel="Loading",
    ),
]
Trust = Annotated[
    bool,
    typer.Option(
        "--trust",
        help="Allow a full unpickle of the checkpoint. This can run code from the file: "
        "use only for files you trust.",
        rich_help_panel="Loading",
    ),
]
InputShape = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Input shape, e.g. 1,3,32,32 (repeat for several inputs). Stored in "
        "every file morph writes.",
        rich_help_panel="Loading",
        show_default=False,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Debug = Annotated[
    bool, typer.Option("--debug", help="Show the traceback of an error.", rich_help_panel="Output")
]
Quiet = Annotated[
    bool, typer.Option("--quiet", "-q", help="Only errors on stderr.", rich_help_panel="Output")
]
Output = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        help="Output file; the suffix picks the format (.pt, .safetensors, .pt2, "
        ".onnx); '-' writes a .pt archive to stdout.",
        show_default=False,
    ),
]
InputIds = Annotated[
    int | None,
    typer.Option(
        "--input-ids",
        help="Integer inputs are token ids in [0, N), e.g. the vocabulary size (an .onnx or "
        ".pt2 that morph did not write records no range; otherwise ids are 0 or 1).",
        rich_help_panel="Checking",
        show_default=False,
    ),
]
Samples = Annotated[
    int,
    typer.Option(
        "--samples", help="Random input samples to compare.", rich_help_panel="Checking", min=1
    ),
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", help="Samples per forward pass.", rich_help_panel="Checking", min=1
    ),
]
Seed = Annotated[
    int,
    typer.Option(
        "--seed", help="Seed for random inputs (and for morphs).", rich_help_panel="Checking"
    ),
]
Atol = Annotated[
    float, typer.Option("--atol", help="Absolute tolerance.", rich_help_panel="Checking", min=0.0)
]
Rtol = Annotated[
    float,
    typer.Option(
        "--rtol",
        help="Tolerance relative to the output's scale (max |output|).",
        rich_help_panel="Checking",
        min=0.0,
    ),
]
