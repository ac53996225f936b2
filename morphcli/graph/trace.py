"""Turn an nn.Module into a shape-annotated fx GraphModule."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from morphcli.errors import InputError, TraceError
from morphcli.graph import carried, names
from morphcli.graph.inputs import INPUTS_META, InputSpec, example_inputs
from morphcli.graph.shapes import Snapshot, infer, refresh


class _Tracer(fx.Tracer):
    """torch.nn layers and morphcli's own modules stay single nodes named by their module path."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if type(m).__module__.startswith("morphcli."):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, inputs: Sequence[InputSpec] | None = None, *,
          source: str | None = None) -> fx.GraphModule:
    """Trace ``module`` (in eval mode) into a GraphModule and attach ``inputs`` to it.
    ``source`` (the file) starts the message when a layer's name cannot be used.

    >>> gm = trace(nn.Sequential(nn.Linear(4, 2)), [InputSpec((1, 4))])
    """
    check_names(module, source)
    if isinstance(module, fx.GraphModule):
        gm = module
    else:
        _substitute_layers(module)
        was_training = module.training
        module.eval()
        try:
            graph = _Tracer().trace(module)
        except Exception as e:  # fx raises many types; all mean "cannot follow this model"
            raise TraceError(f"cannot trace the model with torch.fx: {_first_line(e)}") from e
        finally:
            module.train(was_training)
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

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            make = SUBSTITUTES.get(f"{type(child).__module__}.{type(child).__qualname__}")
            if make is not None:
                replacement = make(child)
                replacement.train(child.training)
                setattr(parent, name, replacement)


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
