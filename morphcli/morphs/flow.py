"""What follows every morph, from the CLI and the Python API alike: a training checkpoint's
other entries carried over through the resize plan, and whether the result may be written."""

from __future__ import annotations

import torch.fx as fx

from morphcli.io import training
from morphcli.morphs.result import MorphResult


def follow_entries(new: fx.GraphModule, result: MorphResult, *, suffix: str = ".pt",
                   drop_optimizer_state: bool = False, source: str = "the model") -> None:
    """Carry the training checkpoint ``new`` came from (if any) over the morph: its optimizer
    state through ``result.plan`` (refused, as InputError, where the plan cannot map it and
    ``drop_optimizer_state`` is not set), every other entry kept. An output ``suffix`` that
    holds the model only (.safetensors, .pt2, .onnx) gets a note naming the entries left out."""
    if suffix.lower() in training.KEEPS_ENTRIES:
        result.notes += training.follow_morph(new, result.plan,
                                              drop_optimizer_state=drop_optimizer_state,
                                              source=source)
    elif training.of(new) is not None:
        result.notes.append(training.unkept_note(new, suffix))


def may_write(result: MorphResult, force: bool) -> bool:
    """A result is written when its check passed (or did not run), or when forced."""
    return result.check is None or result.check.equivalent or force
