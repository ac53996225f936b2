"""``morph export DIR -o model.onnx | model.pt2``: the model's token-ids-to-logits function,
through torch.export (ONNX by the torch.export-based exporter; the legacy one fails on Llama),
verified by running the written file at a new shape."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from morphcli.errors import InputError
from morphcli.hf.directory import HFDir

EXPORT_SUFFIXES = (".pt2", ".onnx")


class TokenModel(torch.nn.Module):
    """input_ids -> logits (an LM) or the last hidden state (a base model), without a cache."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if "logits" in out else out.last_hidden_state


def export_dir(d: HFDir, dest: Path, rtol: float = 1e-5) -> dict[str, Any]:
    """Write ``dest`` atomically and return what was checked (max relative difference)."""
    from morphcli.graph.inputs import INPUTS_META, InputSpec, specs_to_text
    from morphcli.hf.check import build, quiet_transformers
    from morphcli.io.atomic import atomic_path

    if dest.suffix not in EXPORT_SUFFIXES:
        raise InputError(f"{dest}: a Hugging Face directory exports to .pt2 or .onnx")
    model = TokenModel(build(d, d.config, d.state)).eval()
    vocab = int(d.config["vocab_size"])
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    dims = ({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},)
    # recorded in the file, so that `morph check` draws its ids in [0, vocab) unasked
    recorded = specs_to_text([InputSpec(tuple(ids.shape), "int64", vocab)])
    with atomic_path(dest) as tmp, quiet_transformers(), _silenced():
        try:
            program = torch.export.export(model, (ids,), dynamic_shapes=dims)
            if dest.suffix == ".pt2":
                torch.export.save(program, str(tmp), extra_files={INPUTS_META: recorded})
            else:
                onnx = torch.onnx.export(program, (ids,), dynamo=True, verbose=False)
                if onnx is None:  # only the legacy exporter returns nothing
                    raise RuntimeError("the ONNX exporter returned no program")
                onnx.model.metadata_props[INPUTS_META] = recorded
                onnx.save(str(tmp))
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise InputError(f"{d.path}: torch.export cannot export {d.cls_name}: {first}") from e
        rel = _verify(model, tmp, vocab)
    if not rel <= rtol:
        raise InputError(f"{dest}: the written file differs from the model by {rel:.3g} "
                         f"(relative, tolerance {rtol:g}); nothing was kept")
    return {"output": str(dest), "format": dest.suffix[1:], "max_rel_diff": rel,
            "inputs": "input_ids int64 [batch, seq] in [0, vocab_size)"}


def _verify(model: torch.nn.Module, path: Path, vocab: int) -> float:
    """Run the written file at a shape other than the traced one; relative max difference."""
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        if path.suffix == ".pt2":
            got = torch.export.load(str(path)).module()(ids)
        else:
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            got = torch.from_numpy(session.run(None, {name: ids.numpy()})[0])
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max() / want.abs().max())


@contextlib.contextmanager
def _silenced() -> Any:
    """The ONNX exporter prints its progress on stdout; keep stdout for results."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
