"""``.pt2`` (torch.export programs) and ``.onnx``: portable exports with a dynamic batch.

Both embed the architecture description, so a ``.pt2`` the tool wrote can be morphed again;
``.onnx`` files are read back as runnable models (for ``check``), since ONNX export folds
layers together and the original tensors cannot be recovered from it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from morphcli.errors import InputError, UnsafeCheckpointError
from morphcli.graph.describe import describe, parse_description, rebuild
from morphcli.graph.inputs import (
    INPUTS_META,
    InputSpec,
    checked_shape,
    example_inputs,
    specs_from_text,
)
from morphcli.io.atomic import latched
from morphcli.io.checkpoint import Checkpoint, torch_runner, warn_if_not_finite

if TYPE_CHECKING:
    from morphcli.io.pt2_archive import Pt2Archive

PT2_EXTRA = "morphcli.architecture.json"
_PT2_WHAT = "architecture description in .pt2"
ONNX_METADATA = "morphcli.architecture"
ONNX_OPSET = 18


class ExportError(InputError):
    """torch.export or the ONNX exporter cannot handle the model."""


# ---------------------------------------------------------------- .pt2


def write_pt2(gm: fx.GraphModule, dest: Path) -> None:
    program = _export_program(gm)
    with dest.open("wb") as f, latched(f) as safe:
        torch.export.save(program, safe,
                          extra_files={PT2_EXTRA: json.dumps(describe(gm))})


def read_pt2(source: str, data: Path | io.BytesIO, trust: bool = False) -> Checkpoint:
    """Read a ``.pt2`` without unpickling anything (see ``pt2_archive``): a file morph wrote
    is rebuilt from its description and raw tensors, any other program is deserialized from
    its checked JSON. ``trust`` falls back to ``torch.export.load`` where that is refused."""
    from morphcli.io.pt2_archive import read_archive

    try:
        archive = read_archive(source, data)
    except UnsafeCheckpointError:
        if not trust:
            raise
        return _read_pt2_trusted(source, data)
    if PT2_EXTRA in archive.extra:
        desc = parse_description(archive.extra[PT2_EXTRA], source, _PT2_WHAT)
        needed = _needed_keys(desc, archive.tensors)
        return Checkpoint(source, graph_module=rebuild(desc, needed, source), kind="morphcli .pt2")
    program = _program(archive, data, trust)
    return _foreign_pt2(source, program, specs_from_text(archive.extra.get(INPUTS_META)))


def _program(archive: Pt2Archive, data: Path | io.BytesIO, trust: bool
             ) -> torch.export.ExportedProgram:
    from morphcli.io.pt2_archive import load_program, load_program_trusted

    try:
        with _quiet():
            return load_program(archive)
    except InputError as e:
        if not trust:
            raise
        try:
            with _quiet():
                return load_program_trusted(data)
        except Exception as e2:
            raise InputError(f"{archive.source}: cannot read as a torch.export program: "
                             f"{_reason(e2)}") from e


def _read_pt2_trusted(source: str, data: Path | io.BytesIO) -> Checkpoint:
    from morphcli.io.pt2_archive import load_program_trusted

    extra = {PT2_EXTRA: "", INPUTS_META: ""}
    try:
        with _quiet():
            program = load_program_trusted(data, extra)
    except Exception as e:
        raise InputError(f"{source}: cannot read as a torch.export program: {_reason(e)}") from e
    if extra[PT2_EXTRA]:
        desc = parse_description(extra[PT2_EXTRA], source, _PT2_WHAT)
        tensors = {**program.state_dict, **program.constants}
        needed = _needed_keys(desc, tensors)
        return Checkpoint(source, graph_module=rebuild(desc, needed, source), kind="morphcli .pt2")
    return _foreign_pt2(source, program, specs_from_text(extra[INPUTS_META]))


def _foreign_pt2(source: str, program: torch.export.ExportedProgram,
                 specs: tuple[InputSpec, ...] | None) -> Checkpoint:
    """A program morph did not trace (``morph export DIR`` of a Hugging Face model, or any
    other); ``specs``: the inputs it records beside the program (token ids' range), if any."""
    try:
        with _quiet():
            module = program.module()
    except Exception as e:
        raise InputError(f"{source}: cannot run the torch.export program: {_reason(e)}") from e
    return Checkpoint(source, runner=torch_runner(module), kind="torch.export program",
                      inputs=specs or _pt2_inputs(program))


def _needed_keys(desc: Any, tensors: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}


def _export_program(gm: fx.GraphModule) -> torch.export.ExportedProgram:
    specs = _specs(gm)
    args = example_inputs(specs, batch_size=2, seed=0)
    dynamic = tuple({0: torch.export.Dim.AUTO} if s.shape else None for s in specs)
    try:
        with _quiet():
            return torch.export.export(gm, args, dynamic_shapes=dynamic)
    except Exception as e:
        raise ExportError(f"torch.export cannot export the model: {_reason(e)}") from e


def _pt2_inputs(program: torch.export.ExportedProgram) -> tuple[InputSpec, ...] | None:
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is None:
                return None
            shape = tuple(int(d) if isinstance(d, int) else 1 for d in val.shape)
            try:
                checked_shape(shape, "input shape")
            except InputError:
                return None  # not a size to allocate blindly: the user passes --input-shape
            specs.append(InputSpec(shape, str(val.dtype).removeprefix("torch.")))
    return tuple(specs)


# ---------------------------------------------------------------- .onnx


def write_onnx(gm: fx.GraphModule, dest: Path) -> None:
    """Export (torch.export-based exporter, then the TorchScript one as a fallback), add the
    description as metadata, validate with onnx.checker and run it through onnxruntime."""
    import onnx

    specs = _specs(gm)
    args = example_inputs(specs, batch_size=2, seed=0)
    proto = _onnx_proto(gm, args, specs)
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA, json.dumps(describe(gm))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:
        hint = ""
        if "bfloat16" in str(e):
            hint = ("; ONNX lacks bfloat16 for this operator: write .pt, .safetensors or .pt2 "
                    "(which keep bfloat16), or convert the model to float16 or float32 first")
        raise ExportError(f"the exported ONNX model fails onnx.checker: {_reason(e)}{hint}") from e
    onnx.save_model(proto, str(dest))


def _onnx_proto(gm: fx.GraphModule, args: tuple[torch.Tensor, ...], specs: Sequence[InputSpec]):
    import onnx

    errors = []
    names = [f"input_{i}" for i in range(len(specs))]
    try:
        dynamic = tuple({0: torch.export.Dim("batch", min=1)} if s.shape else None for s in specs)
        with _quiet():
            program = torch.onnx.export(gm, args, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=names, opset_version=ONNX_OPSET,
                                        external_data=False, verbose=False)
        if program is None:  # only None when given a file to write, which it is not here
            raise ExportError("the exporter returned no program")
        return program.model_proto
    except Exception as e:
        errors.append(f"torch.export-based exporter: {_reason(e)}")
    try:
        buf = io.BytesIO()
        with _quiet():
            # (torch's stub says a path; the TorchScript exporter writes to any binary file)
            torch.onnx.export(gm, args, buf, dynamo=False,  # type: ignore[arg-type]
                              input_names=names,
                              dynamic_axes={n: {0: "batch"}
                                            for n, s in zip(names, specs, strict=True) if s.shape},
                              opset_version=ONNX_OPSET)
        return onnx.load_model_from_string(buf.getvalue())
    except Exception as e:
        errors.append(f"TorchScript exporter: {_reason(e)}")
    raise ExportError("cannot export to ONNX: " + "; ".join(errors))


def read_onnx(source: str, data: Path | bytes) -> Checkpoint:
    import onnx

    try:
        proto = (onnx.load_model_from_string(data) if isinstance(data, bytes)
                 else onnx.load(str(data)))
        onnx.checker.check_model(proto)
    except Exception as e:
        raise InputError(f"{source}: not a valid ONNX model: {_reason(e)}") from e
    warn_if_not_finite(source, _onnx_weights(proto))
    specs = _onnx_inputs(proto)
    from morphcli.io.onnx_budget import onnx_budget  # over a cap: refused before ORT builds it
    sized = onnx_budget(proto, source)
    try:
        runner = _onnx_runner(proto)
    except Exception as e:  # onnx.checker does not check every attribute value; ORT does
        raise InputError(f"{source}: onnxruntime cannot load the model: {_reason(e)}") from e
    return Checkpoint(source, runner=sized(runner), inputs=specs, kind="ONNX model",
                      input_dtypes=tuple(t for _, t in _onnx_graph_inputs(proto)))


def _onnx_weights(proto: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The floating-point initializers, as tensors (ones that cannot be read are skipped:
    running the model reports them)."""
    from onnx import TensorProto, numpy_helper

    for init in proto.graph.initializer:
        if init.data_type in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
            try:
                yield init.name, torch.from_numpy(numpy_helper.to_array(init).copy())
            except Exception:
                continue


def _onnx_inputs(proto: Any) -> tuple[InputSpec, ...] | None:
    props = {p.key: p.value for p in proto.metadata_props}
    recorded = specs_from_text(props.get(INPUTS_META))  # a foreign program's own inputs
    if recorded:
        return recorded
    stored = props.get(ONNX_METADATA)
    if stored:
        try:
            inputs = json.loads(stored).get("inputs")
            if inputs:
                return tuple(InputSpec.from_json(s) for s in inputs)
        except (ValueError, AttributeError, KeyError, TypeError, InputError):
            pass  # damaged metadata: fall back to the graph's own input shapes
    specs = []
    for dims, dtype in _onnx_graph_inputs(proto):
        if any(d <= 0 for d in dims[1:]):
            return None
        try:
            shape = checked_shape(tuple(max(d, 1) for d in dims), "ONNX input shape")
        except InputError:
            return None  # not a size to allocate blindly: the user passes --input-shape
        specs.append(InputSpec(shape, dtype, 2 if dtype == "int64" else None))
    return tuple(specs)


def _onnx_graph_inputs(proto: Any) -> list[tuple[list[int], str]]:
    """(sizes, 0 where symbolic; dtype) of each graph input that is not a weight."""
    from onnx import TensorProto

    initializers = {i.name for i in proto.graph.initializer}
    out = []
    for inp in proto.graph.input:
        if inp.name in initializers:
            continue
        t = inp.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in t.shape.dim]
        out.append((dims, "int64" if t.elem_type == TensorProto.INT64 else "float32"))
    return out


def _onnx_runner(proto: Any):
    """A Runner for an ONNX model. ONNX outputs are a flat list of tensors (the exporters
    flatten tuples and dicts and cannot export other values). Files we wrote carry the
    description of the model they came from, whose output structure is put back together;
    a foreign file's outputs stay flat (FlatOutputs), and the check says so."""
    import onnxruntime as ort

    from morphcli.io.checkpoint import FlatOutputs, described_structure, unflatten_outputs

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors reach the user as one line of ours, not ORT's log
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    stored = {p.key: p.value for p in proto.metadata_props}.get(ONNX_METADATA)
    try:
        template = described_structure(json.loads(stored)) if stored else None
    except (ValueError, RecursionError):  # damaged metadata: the outputs stay flat
        template = None

    def run(inputs: Sequence[torch.Tensor]) -> Any:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
        outs = tuple(torch.from_numpy(o) for o in session.run(None, feed))
        structured = unflatten_outputs(template, outs) if template is not None else None
        return FlatOutputs(outs, "ONNX Runtime") if structured is None else structured

    return run


# ---------------------------------------------------------------- helpers


def _specs(gm: fx.GraphModule) -> tuple[InputSpec, ...]:
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        raise InputError("the model has no input shape; pass --input-shape")
    return specs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Exporters print progress on stdout and warnings on stderr; keep stdout clean for pipes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = os.dup(1)
        try:
            sys.stdout.flush()
            os.dup2(2, 1)
            with contextlib.redirect_stdout(sys.stderr), _silence_stderr():
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


@contextlib.contextmanager
def _silence_stderr() -> Iterator[None]:
    import logging

    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            yield
    finally:
        logger.setLevel(level)


def _reason(e: Exception) -> str:
    text = [line for line in str(e).strip().splitlines() if line.strip()]
    return (text[0] if text else type(e).__name__)[:300]


def pt2_runner(data: Path | bytes) -> Any:
    """Run a .pt2 file as plain torch would (``torch.export.load(p).module()``), loaded through
    morph's own reader, which unpickles nothing: only the program is run, not the description."""
    from morphcli.io.checkpoint import torch_runner
    from morphcli.io.pt2_archive import load_program, read_archive

    source = "stdout" if isinstance(data, bytes) else str(data)
    archive = read_archive(source, io.BytesIO(data) if isinstance(data, bytes) else data)
    with _quiet():
        return torch_runner(load_program(archive).module())
