"""Turn an nn.Module into a shape-annotated fx GraphModule."""

from __future__ import annotations

import contextlib
import inspect
import io
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from morphcli.errors import InputError, TraceError
from morphcli.graph import carried, names
from morphcli.graph.inputs import INPUTS_META, InputSpec, example_inputs
from morphcli.graph.shapes import Snapshot, infer, refresh
from morphcli.rules import registry


class _Tracer(fx.Tracer):
    """torch.nn layers and morphcli's own modules stay single nodes named by their module path.

    Given example inputs, Python control flow on a traced value (``if H == ws:``, timm's
    MobileViT, TinyViT, EfficientViT, TF "same" padding) takes the branch those inputs take:
    the partial graph is run on them to decide it (``fixed`` records where)."""

    def __init__(self, example: list[object] | None = None) -> None:
        super().__init__()
        self.example = example  # one value per placeholder, in order
        self.fixed: list[str] = []  # the model lines whose branch was taken at these sizes
        self.decided: list[fx.Node] = []  # their conditions, removed after tracing if unused

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__module__.startswith("morphcli.") or registry.is_leaf(type(m)):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def to_bool(self, obj: fx.Proxy) -> bool:
        value = self._evaluate(obj.node) if _reads_sizes_only(obj.node) else None
        if value is None:
            return super().to_bool(obj)  # raises fx's TraceError: no example to decide on
        self.fixed.append(_caller_line())
        self.decided.append(obj.node)
        return bool(value)

    def _evaluate(self, node: fx.Node) -> object | None:
        """``node``'s value when the graph traced so far runs on the example inputs."""
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        if self.example is None or len(placeholders) != len(self.example):
            return None
        copy, values = fx.Graph(), {}  # type: ignore[var-annotated]
        copy.graph_copy(self.graph, values)
        copy.output(values[node])
        try:
            with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), _unpatched():
                return fx.GraphModule(self.root, copy)(*self.example)
        except Exception:
            return None


def _reads_sizes_only(node: fx.Node) -> bool:
    """Whether ``node`` is arithmetic on sizes read from tensors (``x.shape``, ``x.size()``),
    never on tensor values: a branch on values must not be fixed at one example."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_method" and n.target in ("size", "dim"):
            continue
        if n.op == "call_function" and n.target is getattr and len(n.args) > 1 and \
                n.args[1] in ("shape", "ndim"):
            continue
        module = getattr(n.target, "__module__", None)
        if n.op != "call_function" or module not in ("_operator", "math", "builtins"):
            return False
        todo.extend(n.all_input_nodes)
    return True


# nn.Module's own methods: tracing patches them to record calls, which running the partial
# graph on real tensors must not do.
_MODULE_CALL, _MODULE_GETATTR = nn.Module.__call__, nn.Module.__getattr__


@contextlib.contextmanager
def _unpatched() -> Iterator[None]:
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _MODULE_CALL, _MODULE_GETATTR  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched  # type: ignore[method-assign]


def trace(module: nn.Module, inputs: Sequence[InputSpec] | None = None, *,
          source: str | None = None, n_inputs: int | None = None,
          shapes: Sequence[tuple[int, ...]] | None = None) -> fx.GraphModule:
    """Trace ``module`` (in eval mode) into a GraphModule and attach ``inputs`` to it.
    ``source`` (the file) starts the message when a layer's name cannot be used.
    Arguments of ``forward`` with a plain default (``attn_mask=None``, ``is_causal=False``) are
    fixed at it and are no inputs, unless ``n_inputs`` (or ``inputs``) asks for that many.
    Branches on sizes are taken as ``inputs`` (or float inputs of ``shapes``) take them.

    >>> gm = trace(nn.Sequential(nn.Linear(4, 2)), [InputSpec((1, 4))])
    """
    check_names(module, source)
    if isinstance(module, fx.GraphModule):
        gm = module
    else:
        _substitute_layers(module)
        was_training = module.training
        module.eval()
        fixed = _fixed_defaults(module, len(inputs) if inputs is not None else n_inputs)
        given = inputs or ([InputSpec(tuple(x), _float_dtype(module)) for x in shapes]
                           if shapes else None)
        tracer = _Tracer(_example(module, given, fixed))
        try:
            graph = tracer.trace(module, concrete_args=fixed or None)
            for node in reversed(dict.fromkeys(tracer.decided)):
                _erase_unused(node)
            if tracer.fixed:
                _check_branches(module, graph, given or (), fixed, tracer.fixed)
        except TraceError:
            raise
        except Exception as e:  # fx raises many types; all mean "cannot follow this model"
            raise TraceError(f"cannot trace the model with torch.fx: {_first_line(e)}"
                             f"{_model_line(e)}") from e
        finally:
            module.train(was_training)
        _drop_fixed_placeholders(graph, fixed)
        _check_input_names(graph, source)
        name = type(module).__name__
        gm = fx.GraphModule(module, graph, class_name=name
                            if names.identifier_problem(name) is None else "Model")
        carried.attach(module, gm, _Tracer().is_leaf_module)
    gm.eval()
    if inputs is not None:
        gm.meta[INPUTS_META] = tuple(inputs)
        propagate_shapes(gm)
    return gm


def _example(module: nn.Module, inputs: Sequence[InputSpec] | None, fixed: dict[str, object],
             batch: int | None = None, seed: int = 0) -> list[object] | None:
    """A value for each placeholder fx makes for ``module.forward``: the example inputs in
    order, the fixed defaults at their values (None: no inputs to decide branches on)."""
    if not inputs:
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    tensors = list(example_inputs(inputs, batch_size=batch, seed=seed))
    out: list[object] = []
    for p in params:
        if p.name in fixed:
            out.append(fixed[p.name])
        elif tensors:
            out.append(tensors.pop(0))
        else:
            return None
    return out


def _check_branches(module: nn.Module, graph: fx.Graph, inputs: Sequence[InputSpec],
                    fixed: dict[str, object], lines: list[str]) -> None:
    """A graph traced with branches taken at the example sizes must compute what the model
    does at other batch sizes too (a branch on the batch size would not)."""
    gm = fx.GraphModule(module, graph)
    for batch in (1, 3):
        args = _example(module, inputs, fixed, batch, seed=batch)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            try:
                assert args is not None  # (the tracer had them)
                want, got = module(*args), gm(*args)
                same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in
                           zip(_tensors(want), _tensors(got), strict=True))
            except Exception:
                same = False
        if not same:
            raise TraceError(
                "cannot trace the model with torch.fx: it branches on its input's sizes, at "
                f"{lines[0]}, and the branch taken at the given --input-shape does not "
                f"compute the model at batch {batch}")


def _float_dtype(module: nn.Module) -> str:
    p = next((t for t in module.parameters() if t.is_floating_point()), None)
    return str(p.dtype).removeprefix("torch.") if p is not None else "float32"


def _tensors(out: object) -> list[torch.Tensor]:
    from morphcli.io.checkpoint import flatten_outputs

    return list(flatten_outputs(out))


def _caller_line() -> str:
    """The model's line (outside torch and morphcli) that is deciding a branch now."""
    import traceback

    return _model_frame(traceback.extract_stack()) or "a line of the model"


def _model_frame(frames: Any) -> str | None:
    """``path:line (source)`` of the innermost frame outside torch and morphcli, if any."""
    import os

    import morphcli

    skip = tuple(os.path.dirname(m.__file__ or "") + os.sep for m in (torch, morphcli))
    mine = [f for f in frames if not f.filename.startswith(skip) and
            not f.filename.startswith("<")]
    if not mine:
        return None
    f = mine[-1]
    path = f.filename.split(f"site-packages{os.sep}", 1)[-1]
    source = f" ({(f.line or '').strip()[:120]})" if f.line else ""
    return f"{path}:{f.lineno}{source}"


def _erase_unused(node: fx.Node) -> None:
    """Remove a decided condition and what only it used (size reads, comparisons)."""
    todo = [node]
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = list(n.all_input_nodes)
        n.graph.erase_node(n)
        todo.extend(inputs)


def check_names(module: nn.Module, source: str | None = None) -> None:
    """Raise InputError if a layer, parameter or buffer of ``module`` has a name torch.fx's
    generated code cannot hold (``a b``, ``é``, ``self``, ``def``), before any work is done on
    it: fx would write broken code (or, for ``self``, code that runs the wrong thing), and morph
    could not save and reload the result. Indices (``0``) and hyphens (``block1-0``) are fine.

    >>> check_names(nn.Sequential(nn.Linear(4, 2)))
    """
    where = f"{source}: " if source else ""
    for path, m in module.named_modules():
        prefix = f"{path}." if path else ""
        kinds = (("layer", m._modules), ("parameter", m._parameters), ("buffer", m._buffers))
        for kind, table in kinds:
            for name, value in table.items():
                problem = names.part_problem(name, top=not path) if isinstance(name, str) \
                    else f"is a {type(name).__name__}, not a string"
                if problem is None:
                    continue
                what = f" ({type(value).__name__})" if kind == "layer" else ""
                raise InputError(
                    f"{where}{kind} {prefix + str(name)!r}{what}: the name {name!r} {problem}, "
                    "so torch.fx cannot write code for it; rename it in the model (and in its "
                    "state_dict keys) and save the model again")


# Defaults fx can specialise on: a placeholder plus an assert that the value is unchanged.
_FIXABLE = (type(None), bool, int, float, str)
_ASSERTS = (operator.eq, torch._assert, getattr(fx._symbolic_trace, "_assert_is_none", None))


def _fixed_defaults(module: nn.Module, n_inputs: int | None) -> dict[str, object]:
    """The arguments of ``module.forward`` to trace at their defaults: those with a plain
    default beyond the first ``n_inputs`` (timm's ViT: ``forward(x, attn_mask=None)``)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: trace as fx would
        return {}
    fixed: dict[str, object] = {}
    for i, p in enumerate(params):
        kinds = (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if p.kind not in kinds or p.default is p.empty or type(p.default) not in _FIXABLE:
            continue
        if n_inputs is not None and i < n_inputs and p.kind is p.POSITIONAL_OR_KEYWORD:
            continue
        fixed[p.name] = p.default
    return fixed


def _drop_fixed_placeholders(graph: fx.Graph, fixed: dict[str, object]) -> None:
    """Remove the placeholders fx made for ``fixed`` arguments, with the asserts that check
    them: the traced code already holds the defaults, and the asserts call fx internals that a
    stored description may not name."""
    if not fixed:
        return
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        base = str(node.target).rsplit("_", 1)[0]
        if base not in fixed or str(node.target) in fixed:
            continue
        chain = _users_closure(node)
        if any(n.op != "call_function" or n.target not in _ASSERTS for n in chain):
            continue  # something besides the asserts reads it: keep it (it has a default)
        for n in reversed(chain):
            graph.erase_node(n)
        graph.erase_node(node)


def _users_closure(node: fx.Node) -> list[fx.Node]:
    """Every node that depends on ``node``, in graph order."""
    seen: dict[fx.Node, None] = {}
    todo = list(node.users)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen[n] = None
            todo.extend(n.users)
    order = {n: i for i, n in enumerate(node.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _check_input_names(graph: fx.Graph, source: str | None) -> None:
    for node in graph.nodes:
        if node.op == "placeholder":
            problem = names.input_problem(str(node.target).lstrip("*"))
            if problem:
                where = f"{source}: " if source else ""
                raise InputError(f"{where}the model's input {node.target!r} {problem}; rename "
                                 "that argument of its forward()")


def _substitute_layers(module: nn.Module) -> None:
    """Swap foreign layers we re-implement (e.g. StochasticDepth) for morphcli's own."""
    from morphcli.modules import SUBSTITUTES

    _load_contrib(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            make = SUBSTITUTES.get(f"{type(child).__module__}.{type(child).__qualname__}")
            replacement = make(child) if make is not None else None
            if replacement is not None:
                replacement.train(child.training)
                setattr(parent, name, replacement)


# Libraries whose layers morphcli supports through the public rule API, by top-level package.
_CONTRIB = {"timm": "morphcli.contrib.timm"}


def _load_contrib(module: nn.Module) -> None:
    """Register a library's rules and substitutes when the model uses its layers (only then:
    importing timm costs a second)."""
    import importlib

    packages = {type(m).__module__.split(".", 1)[0] for m in module.modules()}
    for package in packages & _CONTRIB.keys():
        importlib.import_module(_CONTRIB[package])


def propagate_shapes(gm: fx.GraphModule) -> None:
    """Run ShapeProp on one example batch so every node carries ``tensor_meta``."""
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        return
    n_placeholders = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if n_placeholders != len(specs):
        raise InputError(
            f"the model takes {n_placeholders} input(s) but {len(specs)} input shape(s) were "
            "given; pass one --input-shape per input"
        )
    try:
        infer(gm, specs)  # without a forward pass of the whole model
        return
    except InputError:  # over a cap of graph.budget: running it would cost more still
        raise
    except Exception:
        pass  # ShapeProp below runs the model, and says where and why it fails
    prop = _ShapeProp(gm)
    with torch.no_grad():
        try:
            # ShapeProp prints the traceback of a failing node itself; the CLI prints one line.
            with contextlib.redirect_stderr(io.StringIO()):
                prop.propagate(*example_inputs(specs, batch_size=None, seed=0))
        except Exception as e:
            shapes = " ".join(s.text() for s in specs)
            where = f" at {prop.current}" if prop.current else ""
            raise InputError(
                f"the model rejects input shape {shapes}{where}: "
                f"{_first_line(e.__cause__ or e)}; pass the right --input-shape"
            ) from e


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it is running, to say where a model fails."""

    current: str | None = None

    def run_node(self, n: fx.Node) -> object:
        self.current = str(n.target) if n.op == "call_module" else n.name
        return super().run_node(n)


def _model_line(e: BaseException) -> str:
    """Where in the model's own code tracing stopped: the innermost frame outside torch and
    morphcli (``, at timm/models/mobilevit.py:250: if new_h != H or new_w != W:``)."""
    import traceback

    where = _model_frame(traceback.extract_tb(e.__traceback__))
    if where is None:
        return ""
    hint = ("; the model branches on a traced value there (e.g. a size): rewrite that line "
            "without Python control flow on tensors" if "control flow" in str(e) else "")
    return f", at {where}{hint}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ---------------------------------------------------------------- after an edit


def refresh_shapes(gm: fx.GraphModule, before: Snapshot) -> None:
    """Shapes after an edit of a graph recorded by ``snapshot`` before it: only the
    changed part is recomputed (see ``morphcli.graph.shapes``)."""
    specs = gm.meta.get(INPUTS_META)
    if not specs:
        return
    try:
        refresh(gm, specs, before)
    except Exception:
        propagate_shapes(gm)  # from scratch; says which node fails and how
