"""Apply a morph and prove it: the original model is run beside the morphed one."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import torch.fx as fx
from torch import nn
from torch.optim import Optimizer

from morphcli.equivalence.compare import Progress, compare
from morphcli.equivalence.report import (
    DEFAULT_ATOL,
    DEFAULT_BATCH_SIZE,
    DEFAULT_RTOL,
    DEFAULT_SAMPLES,
    CheckReport,
)
from morphcli.equivalence.sizing import reduced
from morphcli.errors import InputError
from morphcli.graph import budget, carried, dtypes
from morphcli.graph.inputs import INPUTS_META, InputSpec
from morphcli.io.checkpoint import Runner, float64_runner, torch_runner
from morphcli.morphs import limits
from morphcli.morphs.result import MorphResult

# A morph proper: (model, options) -> (new model sharing unchanged layers, result record).
MorphFn = Callable[[fx.GraphModule, Any], "tuple[fx.GraphModule, MorphResult]"]


@dataclass(frozen=True)
class CheckOptions:
    enabled: bool = True
    samples: int = DEFAULT_SAMPLES
    batch_size: int = DEFAULT_BATCH_SIZE
    seed: int = 0
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    full_size: bool = False  # never check at a reduced input size (equivalence.sizing)
    progress: Progress | None = None  # called with (samples done, samples in all)

    def __post_init__(self) -> None:
        limits.check_numbers(self.samples, self.batch_size, self.seed, self.atol, self.rtol)


def apply_morph(
    morph: MorphFn, gm: fx.GraphModule, options: Any, check: CheckOptions = CheckOptions()
) -> tuple[fx.GraphModule, MorphResult]:
    """Run ``morph`` on ``gm`` (left unchanged) and, unless disabled, check the result against
    it. The verdict is in ``result.check``; deciding what to do about it is the caller's."""
    new, result = morph(gm, options)
    result.plan.complete(gm.state_dict(), new.state_dict())
    kept = carried.note(new)
    if kept:
        result.notes.append(kept)
    if check.enabled:
        result.check, note = check_morph(gm, new, check)
        if note:
            result.notes.append(note)
        if result.exact and not result.check.equivalent and math.isfinite(result.check.max_abs):
            result.float64_check, within = check_in_float64(
                gm, new, check, lambda wide: morph(wide, options)[0])
            if within is not None:
                result.check = within
    return new, result


def check_morph(gm: fx.GraphModule, new: fx.GraphModule,
                check: CheckOptions = CheckOptions()) -> tuple[CheckReport, str | None]:
    """Run ``gm`` and ``new`` side by side on seeded random inputs; also returns a note when the
    check ran at a reduced input size (see ``equivalence.sizing``)."""
    specs, small = _check_inputs(gm, new, check)
    note = None
    if small is not None:
        note = (f"checked at input {' '.join(s.text() for s in small)} instead of "
                f"{' '.join(s.text() for s in specs)}: at that size every convolution and "
                "pooling window still meets data with every weight (--full-size: check at the "
                "stored size)")
    budget.check_run([gm, new], small or specs, samples=check.samples,
                     batch_size=check.batch_size)  # refused over a cap before anything runs
    run_a, run_b, in_dtype = _check_runners(gm, new)
    report = compare(run_a, run_b, small or specs,
                     samples=check.samples, batch_size=check.batch_size, seed=check.seed,
                     atol=check.atol, rtol=check.rtol, progress=check.progress)
    report.dtype = dtypes.name(in_dtype)
    own = dtypes.model_dtype(gm)
    if dtypes.needs_upcast(own):
        report.notes.append(f"checked in {report.dtype}: the {dtypes.name(own)} weights and "
                            f"inputs upcast exactly; the output is written in {dtypes.name(own)}")
    return report, note


def _check_runners(gm: fx.GraphModule, new: fx.GraphModule) -> tuple[Runner, Runner, Any]:
    """Runners for the check and the dtype they run in: a half-precision model is checked
    through float32 copies of both models (its inputs upcast alike), any other as it is."""
    own = dtypes.model_dtype(gm)
    if not dtypes.needs_upcast(own):
        return torch_runner(gm), torch_runner(new), dtypes.check_dtype(own)
    wide = dtypes.check_dtype(own)
    a, b = torch_runner(dtypes.upcast(gm, wide)), torch_runner(dtypes.upcast(new, wide))
    return (lambda xs: a(dtypes.cast_inputs(xs, wide)),
            lambda xs: b(dtypes.cast_inputs(xs, wide)), wide)


def check_in_float64(gm: fx.GraphModule, new: fx.GraphModule, check: CheckOptions = CheckOptions(),
                     remorph: Callable[[fx.GraphModule], fx.GraphModule] | None = None
                     ) -> tuple[CheckReport | None, CheckReport | None]:
    """The same check in float64 (None if a model cannot run so): the original and its morph
    computed in float64 by ``remorph`` (else ``new`` cast, whose new weights keep their
    float32 rounding, such as w/3), on float64 inputs. When they agree there, the float32 check
    runs again with both models' own float32 round-off added to the tolerance (None unless it
    passes). An exact morph that fails in float32 but passes both is exact maths on a model
    that amplifies float32 round-off (a LayerNorm over a few nearly equal features divides it
    by their spread; a sigmoid gate fed thousands at input scale 1e3). Runs only after a failed
    check: it copies both models."""
    specs, small = _check_inputs(gm, new, check)
    try:  # over a cap (graph.budget), the float32 verdict stands alone too
        budget.check_run([gm, new], small or specs, samples=check.samples,
                         batch_size=check.batch_size, scale=2)
        wide_gm = copy.deepcopy(gm).double()
        wide_new = remorph(wide_gm) if remorph else copy.deepcopy(new).double()
        a, b = float64_runner(wide_gm), float64_runner(wide_new)
        wide = compare(a, b, small or specs, samples=check.samples,
                       batch_size=check.batch_size, seed=check.seed, atol=check.atol,
                       rtol=check.rtol)
    except Exception:  # a layer without float64 kernels: the float32 verdict stands alone
        return None, None
    wide.dtype = "float64"
    if not wide.equivalent:
        return wide, None
    run_a, run_b, in_dtype = _check_runners(gm, new)
    within = compare(run_a, run_b, small or specs, samples=check.samples,
                     batch_size=check.batch_size, seed=check.seed, atol=check.atol,
                     rtol=check.rtol, references=(a, b))
    if not within.equivalent:
        return wide, None
    within.dtype = dtypes.name(in_dtype)
    worst = max(within.outputs, key=lambda d: d.max_rel)
    within.notes.append(
        f"in {within.dtype} the models differ by up to {within.max_abs:.3g} (max abs, "
        f"{within.max_rel:.3g} of the output's scale, at input scale {worst.input_scale:g}), "
        f"beyond the tolerance alone but within the two models' own {within.dtype} round-off "
        f"on the same inputs ({worst.round_off:.3g}, each against its float64 run); in float64 "
        f"they agree to {wide.max_abs:.3g}: the morph is exact and this model amplifies "
        "round-off")
    return wide, within


def _check_inputs(gm: fx.GraphModule, new: fx.GraphModule,
                  check: CheckOptions) -> tuple[Sequence[InputSpec], Sequence[InputSpec] | None]:
    """The stored input specs, and the reduced ones the check runs at (None: full size)."""
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        raise InputError("the model has no input shape to check with; pass --input-shape")
    return specs, None if check.full_size else reduced((gm, new), specs)


def as_graph_module(model: nn.Module | str | Path,
                    input_shapes: Sequence[tuple[int, ...]] | None = None) -> fx.GraphModule:
    """The Python API accepts a path, a traced model or any nn.Module (traced here)."""
    from morphcli.io.api import load, to_graph_module
    from morphcli.io.checkpoint import Checkpoint

    if isinstance(model, (str, Path)):
        return load(model, input_shapes=input_shapes)
    if isinstance(model, fx.GraphModule) and model.meta.get(INPUTS_META) and not input_shapes:
        return model
    return to_graph_module(Checkpoint("model", module=model) if not isinstance(
        model, fx.GraphModule) else Checkpoint("model", graph_module=model),
        input_shapes=input_shapes)


# What the Python API's morphs return: with an optimizer given, it comes back carried over.
Grown: TypeAlias = (
    "tuple[fx.GraphModule, MorphResult] | tuple[fx.GraphModule, Optimizer, MorphResult]")


def run_api(morph: MorphFn, model: Any, gm: fx.GraphModule, options: Any, check: CheckOptions,
            optimizer: Optimizer | None) -> Any:
    """The Python API's morph: ``(new model, result)``, or with ``optimizer`` given
    ``(new model, its optimizer carried over, result)``."""
    from morphcli.morphs.flow import follow_entries

    new, result = apply_morph(morph, gm, options, check)
    follow_entries(new, result)  # a training checkpoint's optimizer entry, as the CLI does
    if optimizer is None:
        return new, result
    return new, carry_optimizer(optimizer, model, gm, new, result), result


def carry_optimizer(optimizer: Optimizer, model: Any, gm: fx.GraphModule,
                    new: fx.GraphModule, result: MorphResult) -> Optimizer:
    """An optimizer of ``optimizer``'s class and settings over ``new``'s parameters, its state
    carried through ``result.plan`` (``io.training.follow_optimizer``); ``optimizer`` was built
    over the parameters of ``model`` (or of ``gm``, the traced model the morph read)."""
    from morphcli.io.training import follow_optimizer, renumbered_names

    source = model if isinstance(model, nn.Module) else gm
    names = {id(p): n for n, p in source.named_parameters()}
    old_order = [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]
    if None in old_order:
        raise InputError("the optimizer holds parameters that are not the model's; pass the "
                         "optimizer built over this model's parameters")
    known = [n for n in old_order if n is not None]
    new_params = dict(new.named_parameters())
    new_order = list(new_params)
    state, notes = follow_optimizer(optimizer.state_dict(), gm.state_dict(), new, known,
                                    new_order, result.plan, where="the optimizer",
                                    source="optimizer=")
    result.notes += notes
    ids = dict(enumerate(renumbered_names(known, new_order, gm.state_dict())))
    groups = [{"params": [new_params[ids[i]] for i in g["params"]]}
              for g in state["param_groups"]]
    try:
        carried = type(optimizer)(groups, **optimizer.defaults)
        carried.load_state_dict(state)  # the groups' settings and the per-parameter state
    except (TypeError, ValueError, KeyError) as e:
        raise InputError(f"cannot rebuild a {type(optimizer).__name__} over the morphed "
                         f"model's parameters: {e}") from e
    return carried
