"""Budgets for ONNX files: what a run would hold and compute, sized from inferred shapes before
onnxruntime builds a session (a 191-byte ``ConstantOfShape [25000, 25000]`` asks for 2.5 GB)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from morphcli.graph.budget import MAX_BYTES, MAX_FLOPS, MAX_NODES, Sizer, Tally, require, sized

if TYPE_CHECKING:
    from morphcli.graph.inputs import InputSpec


def onnx_budget(proto: Any, source: str) -> Callable[[Any], Any]:
    """Refuse an ONNX model over a cap at batch size 1 (call it before onnxruntime builds a
    session); returns what registers its runner so that a check sizes it at its batch size.

    >>> runner = onnx_budget(proto, "model.onnx")(make_runner(proto))
    """
    sizer = onnx_sizer(proto, source)
    return lambda runner: sized(runner, sizer)


def onnx_sizer(proto: Any, source: str) -> Sizer:
    """Refuse an ONNX model whose tensors at batch 1 go over the cap (before onnxruntime builds
    it), and size its runs at any batch: shapes by ``onnx.shape_inference`` with data
    propagation (so ``ConstantOfShape`` of a constant shape has its size); every value and
    initializer counted, the graph inputs' first symbolic dimension as the batch, other
    unknown dimensions as 1."""
    require(MAX_NODES, len(proto.graph.node), f"{source}: the ONNX graph has")
    values, outputs, flops = _onnx_values(proto)

    def at(batch: int) -> tuple[int, int, int]:
        total = sum(size * batch ** k for size, k in values)
        kept = sum(size * batch ** k for size, k in outputs)
        return total, kept, sum(f * batch ** k for f, k in flops)

    total, _, work = at(1)
    what = f"{source}: the ONNX model at batch size 1 needs"
    require(MAX_BYTES, total, what)
    require(MAX_FLOPS, work, what)

    def size(tally: Tally, specs: Sequence[InputSpec]) -> None:
        batch = specs[0].shape[0] if specs and specs[0].shape else 1
        run, kept, f = at(batch)
        tally.add_block(run, run, f, output_bytes=kept)

    return size


def _onnx_values(proto: Any) -> tuple[list[tuple[int, int]], list[tuple[int, int]],
                                      list[tuple[int, int]]]:
    """(bytes, power of the batch) of every value and of the outputs; FLOPs of each node."""
    import onnx
    from onnx import shape_inference

    graph = proto.graph
    init_names = {i.name for i in graph.initializer}
    batch_names = {inp.type.tensor_type.shape.dim[0].dim_param for inp in graph.input
                   if inp.name not in init_names and inp.type.tensor_type.shape.dim
                   and inp.type.tensor_type.shape.dim[0].dim_param}
    try:
        inferred = shape_inference.infer_shapes(_skeleton(proto), data_prop=True)
    except Exception:
        inferred = proto  # inference fails on odd graphs: count what the file declares
    shapes: dict[str, _OnnxValue] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") else
                    (-1 if d.dim_param in batch_names else 1) for d in t.shape.dim]
            shapes[vi.name] = _OnnxValue(dims, _onnx_itemsize(t.elem_type))
    for init in graph.initializer:
        shapes[init.name] = _OnnxValue(list(init.dims), _onnx_itemsize(init.data_type))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                shapes[node.output[0]] = _OnnxValue(list(attr.t.dims),
                                                    _onnx_itemsize(attr.t.data_type))
    values = [(v.elements * v.itemsize, v.power) for v in shapes.values()]
    outputs = [(shapes[o.name].elements * shapes[o.name].itemsize, shapes[o.name].power)
               for o in graph.output if o.name in shapes]
    return values, outputs, [_onnx_flops(node, shapes) for node in graph.node]


@dataclass
class _OnnxValue:
    dims: list[int]  # -1: the batch
    itemsize: int

    @property
    def elements(self) -> int:
        return math.prod(max(d, 0) for d in self.dims if d != -1)

    @property
    def power(self) -> int:
        return sum(1 for d in self.dims if d == -1)


def _skeleton(proto: Any) -> Any:
    """A copy of ``proto`` without its weights' bytes: shape inference needs only their dims."""
    import onnx

    skeleton = onnx.ModelProto(ir_version=proto.ir_version)
    skeleton.opset_import.extend(proto.opset_import)
    skeleton.functions.extend(proto.functions)
    graph, source = skeleton.graph, proto.graph
    for field in ("node", "input", "output", "value_info"):
        getattr(graph, field).extend(getattr(source, field))
    for init in source.initializer:
        copy = graph.initializer.add()
        if math.prod(init.dims) <= 64:  # small ones may be shapes that data propagation reads
            copy.CopyFrom(init)
            continue
        copy.name, copy.data_type = init.name, init.data_type
        copy.dims.extend(init.dims)
        copy.data_location = onnx.TensorProto.EXTERNAL
        entry = copy.external_data.add()
        entry.key, entry.value = "location", "absent"
    return skeleton


def _onnx_itemsize(elem_type: int) -> int:
    try:
        import numpy as np
        from onnx import helper

        return int(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).itemsize)
    except Exception:
        return 4


def _onnx_flops(node: Any, shapes: dict[str, _OnnxValue]) -> tuple[int, int]:
    """(FLOPs at batch 1, power of the batch) of one ONNX node: MatMul, Gemm and Conv by
    formula, other nodes by their output elements."""
    out = [shapes[o] for o in node.output if o in shapes]
    elements = sum(v.elements for v in out)
    power = max((v.power for v in out), default=0)
    a, w = (shapes.get(node.input[i]) if len(node.input) > i else None for i in (0, 1))
    fan_in = 1
    if node.op_type in ("MatMul", "Gemm") and a is not None and a.dims:
        trans = any(at.name == "transA" and at.i for at in node.attribute)
        fan_in = max(a.dims[0 if trans and len(a.dims) == 2 else -1], 1)
    elif node.op_type in ("Conv", "ConvTranspose") and w is not None and len(w.dims) > 1:
        fan_in = math.prod(max(d, 1) for d in w.dims[1:])
    return (2 * elements * fan_in if fan_in > 1 else elements, power)
