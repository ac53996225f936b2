"""Tensor shapes for a graph's nodes without a forward pass of the whole model.

ShapeProp runs the model on an example input: a ResNet-50 at 224x224 costs most of a second,
nearly all of it in convolutions. Here convolutions and linear layers get their output shape by
formula (after checking their input as torch would), and every other node is run on torch's
meta device (tensors with shapes and no data), so a file describing a huge tensor costs nothing
to look at; a node that needs real values (``.item()``, ``nonzero``) is run on zeros instead.
The metadata is ShapeProp's (``node.meta["tensor_meta"]``), so the rest of morphcli cannot tell
the difference. On loading, every tensor is counted against the caps of ``graph.budget`` as it
is sized; a graph that needs real inputs is then run by a ShapeProp that sizes each node on the
meta device before running it. Anything this cannot do (or a model that rejects its input)
raises, and the caller runs ShapeProp to say where and why.

After an edit, only the nodes that changed, or read a tensor whose shape changed, are
recomputed (``refresh``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from morphcli.graph import budget
from morphcli.graph.inputs import InputSpec

# A node's identity for shape purposes: op, what it calls (the object, by id, for layers and
# graph tensors) and its arguments with input nodes named. The same signature on inputs of the
# same shapes gives an output of the same shape.
Signature = tuple
Snapshot = dict[str, tuple[Signature, Any]]


class ShapeError(Exception):
    """This pass cannot tell the shape; a real ShapeProp run decides (and explains)."""


def infer(gm: fx.GraphModule, specs: Sequence[InputSpec]) -> None:
    """Fill ``tensor_meta`` on every node of ``gm`` for inputs ``specs``; raises on failure,
    and BudgetError when one forward pass at ``specs`` would go over a cap (graph.budget)."""
    what = f"the model at input shape {' '.join(s.text() for s in specs)}"
    tally = budget.Tally(what, hint="pass a smaller --input-shape, or ", flops_at_end=True)
    try:
        _Pass(gm, specs, tally=tally).run(lambda node: True)
        tally.finish()
    except ShapeError:  # shapes that need real values: run it, each node sized first
        tally = budget.Tally(what, hint="pass a smaller --input-shape, or ")
        _guarded_shape_prop(gm, specs, tally)
    batch = specs[0].shape[0] if specs and specs[0].shape else 1
    gm.meta[budget.COST_META] = (tally.peak, tally.flops, batch)


def at(gm: fx.GraphModule, specs: Sequence[InputSpec],
       tally: budget.Tally | None = None) -> dict[fx.Node, Any]:
    """Each node's shape metadata for inputs ``specs``, leaving the graph's own untouched;
    ``tally`` counts what a run at ``specs`` would allocate and refuses over a cap."""
    store: dict[fx.Node, Any] = {}
    _Pass(gm, specs, store, tally=tally).run(lambda node: True)
    return store


def snapshot(gm: fx.GraphModule) -> Snapshot:
    """Each node's signature and shape metadata, to compare with after an edit."""
    return {n.name: (_signature(gm, n), n.meta.get("tensor_meta")) for n in gm.graph.nodes}


def refresh(gm: fx.GraphModule, specs: Sequence[InputSpec], before: Snapshot) -> None:
    """Recompute shapes after an edit of a graph recorded by ``snapshot``: a node keeps its
    metadata when its signature is unchanged and none of its inputs changed."""
    changed: set[fx.Node] = set()

    def stale(node: fx.Node) -> bool:
        old = before.get(node.name)
        return old is None or old[0] != _signature(gm, node) or any(
            i in changed for i in node.all_input_nodes)

    def recorded(node: fx.Node) -> None:
        old = before.get(node.name)
        meta = node.meta.get("tensor_meta")  # None for sizes and flags: assume those changed
        if old is None or meta is None or _shapes(meta) != _shapes(old[1]):
            changed.add(node)

    _Pass(gm, specs).run(stale, after=recorded)


# ---------------------------------------------------------------- the pass


class _Pass:
    def __init__(self, gm: fx.GraphModule, specs: Sequence[InputSpec],
                 store: dict[fx.Node, Any] | None = None,
                 tally: budget.Tally | None = None) -> None:
        self.gm = gm
        self.specs = list(specs)
        self.store = store  # where metadata goes; None: node.meta["tensor_meta"]
        self.tally = tally
        self.values: dict[fx.Node, Any] = {}  # results that hold no tensor (sizes, flags)
        self.made: list[tuple[torch.Tensor, fx.Node]] = []  # this node's stand-ins
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # layer -> its tensors on meta

    def _get(self, node: fx.Node) -> Any:
        if self.store is not None:
            return self.store.get(node)
        return node.meta.get("tensor_meta")

    def run(self, todo: Callable[[fx.Node], bool],
            after: Callable[[fx.Node], None] | None = None) -> None:
        placeholders = iter(self.specs)
        if self.tally is not None:
            self.tally.begin(self.gm.graph)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            for node in self.gm.graph.nodes:
                spec = next(placeholders, None) if node.op == "placeholder" else None
                if not todo(node):
                    continue
                self.made = []
                result = self._result(node, spec)
                self._record(node, result)
                if self.tally is not None:
                    ins = [_shape_of(self._get(a)) if isinstance(a, fx.Node) else None
                           for a in node.args]
                    _account(self.tally, self.gm, node, result, self.made, ins)
                if after is not None:
                    after(node)

    def _result(self, node: fx.Node, spec: InputSpec | None) -> Any:
        if node.op == "placeholder":
            if spec is None:
                raise ShapeError("more inputs than input shapes")
            return torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device="meta")
        if node.op == "get_attr":
            return _fetch(self.gm, str(node.target))
        if node.op == "output":
            return self._args(node)[0][0]
        if node.op == "call_module":
            module = _fetch(self.gm, str(node.target))
            if type(module) in _FORMULAS and not node.kwargs and len(node.args) == 1:
                meta = self._meta_of(node.args[0])
                if meta is not None:
                    with contextlib.suppress(ShapeError):  # unusual input: run it instead
                        return _FORMULAS[type(module)](module, meta)
        args, kwargs = self._args(node)
        try:
            return _execute(self.gm, node, args, kwargs, self.states)
        except Exception:
            pass  # no meta kernel, or the node reads values: run it on zeros
        self.made = []
        args, kwargs = self._args(node, real=True)
        try:
            return _execute(self.gm, node, args, kwargs, None)
        except Exception as e:
            raise ShapeError(f"{node.name}: {e}") from e

    def _meta_of(self, arg: Any) -> TensorMetadata | None:
        if isinstance(arg, fx.Node):
            meta = self._get(arg)
            if isinstance(meta, TensorMetadata):
                return meta
        return None

    def _args(self, node: fx.Node, real: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The node's arguments, tensors as fresh stand-ins (in-place ops may change them): on
        the meta device, or ``real`` zeros."""
        return map_arg((node.args, node.kwargs),
                       lambda n: self._stand_in(n, real))

    def _stand_in(self, node: fx.Node, real: bool) -> Any:
        if node in self.values:
            return self.values[node]
        if node.op == "get_attr":
            value = _fetch(self.gm, str(node.target))
            if not real and isinstance(value, torch.Tensor):
                value = value.to("meta")
            self.made.append((value, node))
            return value
        meta = self._get(node)
        if meta is None:
            raise ShapeError(f"no value known for {node.name}")

        def make(x: Any) -> Any:
            t = _zeros(x) if real else _blank(x)
            if isinstance(t, torch.Tensor):
                self.made.append((t, node))
            return t

        return _map(meta, make)

    def _record(self, node: fx.Node, result: Any) -> None:
        found = False

        def meta(x: Any) -> Any:
            nonlocal found
            if isinstance(x, TensorMetadata):
                found = True
                return x
            if isinstance(x, torch.Tensor):
                found = True
                return _metadata(x.shape, x.dtype, x)
            return x

        recorded = _map(result, meta)
        if not found:
            self.values[node] = result
        if self.store is not None:
            if found:
                self.store[node] = recorded
            return
        if found:
            node.meta["tensor_meta"] = recorded
        else:
            node.meta.pop("tensor_meta", None)
        node.meta["type"] = torch.Tensor if isinstance(result, TensorMetadata) else type(result)


def _map(x: Any, fn: Callable[[Any], Any]) -> Any:
    """map_aggregate, but a TensorMetadata (a named tuple) is a leaf."""
    if isinstance(x, TensorMetadata) or not isinstance(x, (tuple, list, dict)):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    mapped = [_map(v, fn) for v in x]
    if isinstance(x, list):
        return mapped
    return type(x)(*mapped) if hasattr(x, "_fields") else tuple(mapped)


def _zeros(x: Any) -> Any:
    if isinstance(x, TensorMetadata):
        return torch.zeros(tuple(x.shape), dtype=x.dtype)
    return x


def _blank(x: Any) -> Any:
    if isinstance(x, TensorMetadata):
        return torch.empty(tuple(x.shape), dtype=x.dtype, device="meta")
    return x


def _execute(root: nn.Module, node: fx.Node, args: Any, kwargs: Any,
             states: dict[int, dict[str, torch.Tensor]] | None) -> Any:
    """Run one node: on the meta device with the layer's tensors as meta copies (``states``
    caches them), or, with ``states`` None, as it is on the arguments given."""
    on_meta = torch.device("meta") if states is not None else contextlib.nullcontext()
    with on_meta:
        if node.op == "call_module":
            module = _fetch(root, str(node.target))
            if states is None:
                return module(*args, **kwargs)
            state = states.get(id(module))
            if state is None:
                state = states[id(module)] = {
                    k: t.to("meta") for k, t in itertools.chain(module.named_parameters(),
                                                                module.named_buffers())}
            return torch.func.functional_call(module, state, tuple(args), dict(kwargs))
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        self_obj, *rest = args
        return getattr(self_obj, str(node.target))(*rest, **kwargs)


def _shape_of(meta: Any) -> tuple[int, ...] | None:
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _account(tally: budget.Tally, root: nn.Module, node: fx.Node, result: Any,
             made: Sequence[tuple[Any, fx.Node]], ins: Sequence[tuple[int, ...] | None]) -> None:
    """Count the bytes ``node`` allocates (results that are not views of, or the same tensor as,
    an argument ``made`` for it) and its FLOPs."""
    if node.op == "get_attr":
        tally.add(node, 0)
        return
    fresh, aliases, outs = 0, [], []

    def visit(x: Any) -> Any:
        nonlocal fresh
        if isinstance(x, TensorMetadata):
            outs.append(tuple(x.shape))
            fresh += budget.tensor_bytes(tuple(x.shape), x.dtype)
        elif isinstance(x, torch.Tensor):
            outs.append(tuple(x.shape))
            source = next((n for t, n in made if x is t or (
                x._base is not None and (x._base is t or x._base is t._base))), None)
            if source is not None:
                aliases.append(source)
            elif not x._is_view():
                fresh += x.numel() * x.element_size()
        return x

    _map(result, visit)
    module = _fetch(root, str(node.target)) if node.op == "call_module" else None
    work = budget.node_flops(node, module, ins, outs) if node.op.startswith("call_") else 0
    tally.add(node, fresh, aliases, work)


def _guarded_shape_prop(gm: fx.GraphModule, specs: Sequence[InputSpec],
                        tally: budget.Tally) -> None:
    """ShapeProp on seeded random inputs, each node sized on the meta device before it runs."""
    from morphcli.graph.inputs import example_inputs

    prop = _GuardedShapeProp(gm, tally)
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*example_inputs(specs, batch_size=None, seed=0))
    except Exception as e:
        if prop.refused:  # the message as it was raised, without what fx appends to it
            raise budget.BudgetError(prop.refused) from None
        raise ShapeError(str(e)) from e


class _GuardedShapeProp(ShapeProp):
    def __init__(self, gm: fx.GraphModule, tally: budget.Tally) -> None:
        super().__init__(gm)
        self.tally = tally
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.refused: str | None = None
        tally.begin(gm.graph)

    def run_node(self, n: fx.Node) -> Any:
        try:
            return self._sized_run(n)
        except budget.BudgetError as e:
            self.refused = self.refused or str(e)
            raise

    def _sized_run(self, n: fx.Node) -> Any:
        ins = [_shape_of(a.meta.get("tensor_meta")) if isinstance(a, fx.Node) else None
               for a in n.args]
        sized = False
        if n.op in ("call_module", "call_function", "call_method"):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            made: list[tuple[Any, fx.Node]] = []
            sources = {id(v): a for a in n.all_input_nodes
                       if isinstance(v := self.env.get(a), torch.Tensor)}

            def meta(x: Any) -> Any:
                if isinstance(x, torch.Tensor):
                    m = x.to("meta")
                    if id(x) in sources:
                        made.append((m, sources[id(x)]))
                    return m
                return x

            try:
                result = _execute(self.module, n, _map(args, meta), _map(kwargs, meta),
                                  self.states)
                _account(self.tally, self.module, n, result, made, ins)
                sized = True
            except budget.BudgetError:
                raise
            except Exception:
                pass  # the node needs real values: count what it made after running it
        real = super().run_node(n)
        if not sized:
            inputs = [self.env.get(a) for a in n.all_input_nodes]
            _account(self.tally, self.module, n, real,
                     [(t, a) for t, a in zip(inputs, n.all_input_nodes, strict=True)
                      if isinstance(t, torch.Tensor)], ins)
        return real


def _fetch(root: nn.Module, path: str) -> Any:
    return operator.attrgetter(path)(root)  # a dotted path: layer, parameter or buffer


def _signature(gm: fx.GraphModule, node: fx.Node) -> Signature:
    target: object = node.target
    if node.op in ("call_module", "get_attr"):
        try:
            target = id(_fetch(gm, str(node.target)))
        except AttributeError:
            target = None
    args = map_arg((node.args, node.kwargs), lambda n: ("node", n.name))
    return (node.op, target, repr(args))


def _shapes(meta: Any) -> Any:
    if isinstance(meta, TensorMetadata):
        return (tuple(meta.shape), meta.dtype)
    if isinstance(meta, (list, tuple)):
        return tuple(_shapes(m) for m in meta)
    return meta


# ---------------------------------------------------------------- formulas


def _metadata(shape: Sequence[int], dtype: torch.dtype,
              t: torch.Tensor | None = None) -> TensorMetadata:
    """ShapeProp's record of a tensor (of ``t``, or of a contiguous one), built directly:
    ShapeProp's own helper imports sympy, a third of a second, for fields nobody reads here."""
    if t is not None:
        fmt = torch.contiguous_format if t.is_contiguous() else None
        return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), fmt,
                              t.is_quantized, {})
    stride, step = [], 1
    for d in reversed(shape):
        stride.append(step)
        step *= max(d, 1)
    return TensorMetadata(torch.Size(shape), dtype, False, tuple(reversed(stride)),
                          torch.contiguous_format, False, {})


def _check_input(m: nn.Module, x: TensorMetadata, rank: int, channels: int, dim: int) -> None:
    weight = m.weight
    if len(x.shape) != rank or x.shape[dim] != channels or weight.dtype != x.dtype:
        raise ShapeError(f"{type(m).__name__} cannot take {tuple(x.shape)} {x.dtype}")


def _conv(m: nn.modules.conv._ConvNd, x: TensorMetadata) -> TensorMetadata:
    spatial = len(m.kernel_size)
    _check_input(m, x, spatial + 2, m.in_channels, 1)
    sizes = list(x.shape[2:])
    if isinstance(m.padding, str):
        if m.padding != "same":
            padding = [0] * spatial
        else:
            return _metadata([x.shape[0], m.out_channels, *sizes], x.dtype)
    else:
        padding = list(m.padding)
    out = []
    for n, k, s, p, d, extra in zip(sizes, m.kernel_size, m.stride, padding, m.dilation,
                                    m.output_padding, strict=True):
        if m.transposed:
            size = (n - 1) * s - 2 * p + d * (k - 1) + extra + 1
        else:
            size = math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1
        if size < 1:
            raise ShapeError("the input is smaller than the kernel")
        out.append(size)
    return _metadata([x.shape[0], m.out_channels, *out], x.dtype)


def _linear(m: nn.Linear, x: TensorMetadata) -> TensorMetadata:
    _check_input(m, x, len(x.shape), m.in_features, -1)
    if len(x.shape) < 1:
        raise ShapeError("a Linear needs at least one dimension")
    return _metadata([*x.shape[:-1], m.out_features], x.dtype)


def _batch_norm(m: nn.modules.batchnorm._BatchNorm, x: TensorMetadata) -> TensorMetadata:
    ranks = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}[type(m)]
    own = [t.dtype for t in (m.weight, m.running_mean) if t is not None]
    if len(x.shape) not in ranks or x.shape[1] != m.num_features or \
            not x.dtype.is_floating_point or any(d != x.dtype for d in own):
        raise ShapeError(f"{type(m).__name__} cannot take {tuple(x.shape)} {x.dtype}")
    return _metadata(x.shape, x.dtype)


def _same_shape(m: nn.Module, x: TensorMetadata) -> TensorMetadata:
    if not x.dtype.is_floating_point:
        raise ShapeError(f"{type(m).__name__} on {x.dtype}")
    return _metadata(x.shape, x.dtype)


def _max_pool(m: nn.MaxPool2d, x: TensorMetadata) -> TensorMetadata:
    if m.return_indices or len(x.shape) != 4 or not x.dtype.is_floating_point:
        raise ShapeError("pooling with indices, unbatched or not floating point")
    k, s, p, d = (_pair(v) for v in (m.kernel_size, m.stride or m.kernel_size, m.padding,
                                     m.dilation))
    sizes = [_pooled(x.shape[2 + i], k[i], s[i], p[i], d[i], m.ceil_mode) for i in range(2)]
    return _metadata([*x.shape[:2], *sizes], x.dtype)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pooled(n: int, k: int, s: int, p: int, d: int, ceil: bool) -> int:
    """torch's pooling_output_shape."""
    if 2 * p > k:
        raise ShapeError("padding larger than half the kernel")
    span = n + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = span // s + 1
    if ceil and (out - 1) * s >= n + p:
        out -= 1
    if out < 1:
        raise ShapeError("the input is smaller than the pooling window")
    return out


def _adaptive_avg_pool(m: nn.AdaptiveAvgPool2d, x: TensorMetadata) -> TensorMetadata:
    if len(x.shape) != 4 or not x.dtype.is_floating_point:
        raise ShapeError("unbatched or not floating point")
    target = _pair(m.output_size)
    sizes = [x.shape[2 + i] if t is None else t for i, t in enumerate(target)]
    return _metadata([*x.shape[:2], *sizes], x.dtype)


# Layers with a cost (convolutions and linear layers do nearly all of a forward's work) or that
# are everywhere; every other node is run on zeros.
_FORMULAS: dict[type, Callable[[Any, TensorMetadata], TensorMetadata]] = {
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.ConvTranspose1d: _conv, nn.ConvTranspose2d: _conv, nn.ConvTranspose3d: _conv,
    nn.Linear: _linear,
    nn.BatchNorm1d: _batch_norm, nn.BatchNorm2d: _batch_norm, nn.BatchNorm3d: _batch_norm,
    nn.MaxPool2d: _max_pool, nn.AdaptiveAvgPool2d: _adaptive_avg_pool,
    **{cls: _same_shape for cls in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU,
                                    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ELU,
                                    nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Identity,
                                    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)},
}
