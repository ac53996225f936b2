"""Budgets: the work a file can make morph do, sized from shapes before anything is allocated.

A tiny file can describe a huge computation: ``x.repeat(20000, 2000)``, a chain of a thousand
big matmuls, a constant of 25000 x 25000, a zip member that inflates to gigabytes, an input that
never ends. Shapes are worked out on torch's meta device (``graph.shapes``), which allocates
nothing, and every tensor a run would create is counted here, in graph order. A load or a check
that would go over a cap is refused with an InputError naming the cap and the environment
variable that raises it, before anything real is allocated or run.

Bytes are what a run holds at once: fx frees each value after its last use, so a tensor counts
from the node that makes it to its last reader (a view or an in-place result keeps the tensor it
shares alive). A check holds its inputs, the first model's outputs while the second runs, and the
float64 copies the comparison makes. FLOPs: matmul, linear and convolution by formula, every
other node by the elements it reads or writes.
"""

from __future__ import annotations

import heapq
import math
import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from morphcli.errors import InputError

if TYPE_CHECKING:
    import torch.fx as fx

    from morphcli.graph.inputs import InputSpec

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@dataclass(frozen=True)
class Cap:
    """One limit: its environment variable, its default and the unit it counts."""

    variable: str
    default: int
    unit: str  # "bytes", "FLOPs", "nodes", "elements"

    def limit(self) -> int:
        """The cap in force: ``$variable`` when set (``8G``, ``1e14``, ``500000``), else the
        default."""
        text = os.environ.get(self.variable, "").strip()
        if not text:
            return self.default
        value = _parse(text)
        if value is None or value < 1:
            raise InputError(f"{self.variable}={text!r} is not a positive number; "
                             f"e.g. {self.variable}={self.text(self.default * 2, plain=True)}")
        return value

    def text(self, amount: float, plain: bool = False) -> str:
        """``amount`` for a message, or ``plain``: a round value above it to set the cap to."""
        if plain:
            return _round_up(amount, self.unit)
        if self.unit == "bytes":
            return _bytes_text(amount)
        if self.unit == "FLOPs":
            return f"{amount:.3g} FLOPs"
        return f"{int(amount):,} {self.unit}"


MAX_BYTES = Cap("MORPH_MAX_BYTES", 4 << 30, "bytes")
MAX_FLOPS = Cap("MORPH_MAX_FLOPS", 10**13, "FLOPs")
MAX_NODES = Cap("MORPH_MAX_NODES", 100_000, "nodes")
MAX_READ_BYTES = Cap("MORPH_MAX_READ_BYTES", 2 << 30, "bytes")
MAX_INPUT_ELEMENTS = Cap("MORPH_MAX_INPUT_ELEMENTS", 1 << 28, "elements")
CAPS = (MAX_BYTES, MAX_FLOPS, MAX_NODES, MAX_READ_BYTES, MAX_INPUT_ELEMENTS)

# Bytes per output element the comparison holds at once: both outputs and their difference
# in float64, and its absolute value.
COMPARE_BYTES_PER_ELEMENT = 32
COST_META = "morphcli.cost"  # gm.meta: (bytes, FLOPs, batch) of one forward at the stored inputs


class BudgetError(InputError):
    """Doing what the file asks would go over a cap; the message names it and how to raise it."""


def require(cap: Cap, amount: float, what: str, hint: str = "") -> None:
    """Raise BudgetError when ``amount`` is over ``cap``: "<what> <amount>, more than ..."."""
    limit = cap.limit()
    if amount > limit:
        raise BudgetError(f"{what} {cap.text(amount)}, more than the {cap.text(limit)} cap "
                          f"({cap.variable}); {hint}set {cap.variable}="
                          f"{cap.text(amount, True)} to raise it")


def _parse(text: str) -> int | None:
    t = text.lower().removesuffix("b").removesuffix("i")
    if t[-1:].isalpha() and t[-1:] not in _UNITS:
        return None
    scale = _UNITS.get(t[-1:], 1) if t[-1:].isalpha() else 1
    t = t[:-1] if t[-1:].isalpha() else t
    try:
        value = float(t) * scale
    except ValueError:
        return None
    return int(value) if math.isfinite(value) else None


def _round_up(amount: float, unit: str) -> str:
    if unit == "bytes":
        return f"{math.ceil(amount / (1 << 30))}G"
    if unit == "FLOPs":
        exponent = int(math.floor(math.log10(max(amount, 1))))
        return f"{math.ceil(amount / 10 ** exponent)}e{exponent}"
    return str(int(amount))


def _bytes_text(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


# ---------------------------------------------------------------- counting a graph


class Tally:
    """Bytes held at once and FLOPs of running one or more graphs in turn, counted node by node
    (``begin`` each graph, then ``add`` each node in order); refuses as soon as a cap is passed.

    >>> tally = Tally("the check", hint="pass --batch-size 1 or ")
    """

    def __init__(self, what: str, *, hint: str = "", passes: float = 1, scale: int = 1,
                 flops_at_end: bool = False) -> None:
        self.what, self.hint, self.passes = what, hint, passes
        self.flops_at_end = flops_at_end  # nothing runs while counting: refuse on the total
        self.scale = scale  # 2: the run is in float64, tensors counted at float32 double
        self.live = self.peak = self.held = self.flops = 0
        self.graphs = 0
        self.inputs_counted = False  # the inputs are the same tensors for every model run
        self.outputs: list[int] = []  # bytes of each run's outputs
        self._end: dict[Any, int] = {}
        self._index: dict[Any, int] = {}
        self._owner: dict[Any, Any] = {}  # node -> the node whose tensor it holds
        self._size: dict[Any, int] = {}  # buffer node -> bytes, while alive
        self._last: dict[Any, int] = {}  # buffer node -> index of its last reader
        self._heap: list[tuple[int, int, Any]] = []

    def begin(self, graph: fx.Graph) -> None:
        nodes = list(graph.nodes)
        require(MAX_NODES, len(nodes), f"{self.what}: the graph has", "")
        self.inputs_counted = self.inputs_counted or self.graphs > 0
        self.graphs += 1
        self._index = {n: i for i, n in enumerate(nodes)}
        self._end = {n: max((self._index[u] for u in n.users), default=i)
                     for i, n in enumerate(nodes)}
        self._owner, self._size, self._last, self._heap = {}, {}, {}, []

    def add(self, node: fx.Node, fresh: int, aliases: Iterable[fx.Node] = (),
            flops: int = 0) -> None:
        """``node`` makes ``fresh`` new bytes and shares the tensors of ``aliases``."""
        i = self._index[node]
        fresh *= self.scale
        if node.op == "placeholder":  # the check's inputs: shared by the models, held throughout
            if not self.inputs_counted:
                self.live += fresh
                self.held += fresh
        else:
            for a in aliases:
                buf = self._owner.get(a)
                if buf is not None and buf in self._size:
                    self._owner.setdefault(node, buf)
                    self._extend(buf, self._end[node])
            if fresh:
                self._owner[node] = node
                self._size[node] = fresh
                self.live += fresh
                self._extend(node, self._end[node])
        self.flops += flops
        if node.op == "output":
            self._hold(node)
        self._check()
        self._release(i)

    def add_block(self, run_bytes: int, kept_bytes: int, flops: int,
                  output_bytes: int | None = None) -> None:
        """A whole model run at once: ``run_bytes`` while it runs, ``kept_bytes`` still held
        after it (onnxruntime's arena keeps what a run took), of which ``output_bytes`` are
        outputs."""
        self.graphs += 1
        run_bytes, kept_bytes = run_bytes * self.scale, kept_bytes * self.scale
        self.live += run_bytes
        self.flops += flops
        self._check()
        self.live -= max(run_bytes - kept_bytes, 0)
        self.held += kept_bytes
        self.outputs.append(kept_bytes if output_bytes is None else output_bytes * self.scale)

    def add_bytes(self, n: int) -> None:
        self.live += n
        self._check()

    def _check(self) -> None:
        self.peak = max(self.peak, self.live)
        require(MAX_BYTES, self.live, f"{self.what} needs tensors of", self.hint)
        if not self.flops_at_end:
            require(MAX_FLOPS, self.flops * self.passes, f"{self.what} needs at least",
                    self.hint)

    def finish(self) -> None:
        """Refuse on the total FLOPs (with ``flops_at_end``)."""
        require(MAX_FLOPS, self.flops * self.passes, f"{self.what} needs", self.hint)

    def _extend(self, buf: Any, end: int) -> None:
        if end > self._last.get(buf, -1):
            self._last[buf] = end
            heapq.heappush(self._heap, (end, id(buf), buf))

    def _hold(self, output: fx.Node) -> None:
        """The outputs stay alive after the run (the comparison reads them)."""
        kept = 0
        for a in output.all_input_nodes:
            buf = self._owner.get(a)
            if buf is not None and buf in self._size:
                kept += self._size.pop(buf)
        self.held += kept
        self.outputs.append(kept)

    def _release(self, i: int) -> None:
        while self._heap and self._heap[0][0] <= i:
            end, _, buf = heapq.heappop(self._heap)
            if buf in self._size and self._last[buf] == end:
                self.live -= self._size.pop(buf)


def tensor_bytes(shape: Sequence[int], dtype: Any) -> int:
    import torch

    size = torch.empty((), dtype=dtype).element_size() if isinstance(dtype, torch.dtype) else 4
    return math.prod(shape) * size


_MATMULS = {"matmul", "mm", "bmm", "__matmul__", "linear", "mv", "dot", "inner"}
_ADD_MATMULS = {"addmm", "baddbmm", "addbmm", "addmv"}  # (bias, a, b): a's last dimension
_CONVS = {"conv1d", "conv2d", "conv3d"}
_CONV_TRANSPOSES = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}


def node_flops(node: fx.Node, module: Any, ins: Sequence[Sequence[int] | None],
               outs: Sequence[Sequence[int]]) -> int:
    """Estimated FLOPs of one node from the shapes of its positional tensor arguments (None
    for other arguments) and of its tensor results."""
    out = sum(math.prod(s) for s in outs)
    elementwise = max(out, sum(math.prod(s) for s in ins if s is not None))
    if module is not None:
        return elementwise + _module_flops(module, ins, outs)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    tensors = [s for s in ins if s is not None]
    if (name in _MATMULS and tensors) or (name in _ADD_MATMULS and len(tensors) > 1):
        first = tensors[1] if name in _ADD_MATMULS else tensors[0]
        return 2 * max(out, 1) * (first[-1] if first else 1)
    if name in _CONVS and len(tensors) >= 2:
        return 2 * out * math.prod(tensors[1][1:])
    if name in _CONV_TRANSPOSES and len(tensors) >= 2:
        return 2 * math.prod(tensors[0]) * math.prod(tensors[1][1:])
    if name == "scaled_dot_product_attention" and len(tensors) >= 3:
        q, k, v = tensors[:3]
        rows = math.prod(q[:-1]) if q else 1
        return 2 * rows * (k[-2] if len(k) > 1 else 1) * ((q[-1] if q else 1) + (v[-1] if v else 1))
    if name == "einsum":
        return 2 * max(elementwise, _einsum_flops(node, tensors))
    return elementwise


def _module_flops(m: Any, ins: Sequence[Sequence[int] | None], outs: Sequence[Sequence[int]]
                  ) -> int:
    from torch import nn

    out = sum(math.prod(s) for s in outs)
    if isinstance(m, nn.Linear):
        return 2 * out * m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        per = m.weight.numel() // max(m.weight.shape[0], 1)
        x = next((s for s in ins if s is not None), None)
        return 2 * (math.prod(x) if m.transposed and x else out) * per
    params = sum(p.numel() for p in m.parameters())
    if params and outs and outs[0]:  # attention, recurrent layers: two FLOPs per weight per row
        return 2 * params * (math.prod(outs[0]) // max(outs[0][-1], 1))
    return 0


def _einsum_flops(node: fx.Node, shapes: Sequence[Sequence[int]]) -> int:
    """The product of every index's size (each output element sums over the contracted ones)."""
    eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
    if eq is None or "..." in eq:
        return 0
    sizes: dict[str, int] = {}
    for term, shape in zip(eq.split("->")[0].split(","), shapes, strict=False):
        for letter, d in zip(term.strip(), shape, strict=False):
            sizes[letter] = d
    return math.prod(sizes.values())


# ---------------------------------------------------------------- a check


Sizer = Callable[[Tally, "Sequence[InputSpec]"], None]
_SIZERS: weakref.WeakKeyDictionary[Any, Sizer] = weakref.WeakKeyDictionary()


def sized(runner: Any, sizer: Sizer) -> Any:
    """Remember how to size a run of ``runner`` (a check sizes it before running it)."""
    _SIZERS[runner] = sizer
    return runner


def graph_sizer(gm: fx.GraphModule) -> Sizer:
    """Sizes a run of ``gm`` from its shapes at the inputs given (meta device, nothing run)."""

    def size(tally: Tally, specs: Sequence[InputSpec]) -> None:
        from morphcli.graph import shapes

        before = (tally.live, tally.held, tally.flops)
        try:
            shapes.at(gm, specs, tally=tally)
        except BudgetError:
            raise
        except Exception:  # shapes that need real values: scale the load's count
            tally.live, tally.held, tally.flops = before
            cost = gm.meta.get(COST_META)
            if cost is not None:
                ratio = max(1.0, (specs[0].shape[0] if specs and specs[0].shape else 1)
                            / max(cost[2], 1))
                tally.add_block(int(cost[0] * ratio), 0, int(cost[1] * ratio))

    return size


def check_run(models: Sequence[Any], specs: Sequence[InputSpec], *, samples: int,
              batch_size: int, scale: int = 1) -> Tally:
    """Refuse a check of ``models`` (GraphModules, or runners registered with ``sized``) on
    inputs ``specs`` that would go over a cap, before it allocates anything; ``scale`` 2: the
    models run in float64. Returns the count (``peak`` bytes, ``flops``).

    >>> check_run([gm, new], specs, samples=8, batch_size=4)
    """
    from morphcli.graph.inputs import InputSpec

    n = max(1, min(batch_size, samples))
    batched = [InputSpec((n, *s.shape[1:]) if s.shape else s.shape, s.dtype, s.high)
               for s in specs]
    hint = "pass a smaller --batch-size, --samples or --input-shape, or "
    elements = sum(math.prod(s.shape) for s in batched)
    require(MAX_INPUT_ELEMENTS, elements, f"the check's inputs at batch size {n} have", hint)
    tally = Tally(f"the check at batch size {n}", hint=hint, passes=samples / n,
                  scale=scale, flops_at_end=True)
    inputs = sum(tensor_bytes(s.shape, _dtype(s.dtype)) for s in batched) * scale
    tally.add_bytes(inputs)
    tally.held, tally.inputs_counted = inputs, True
    for model in models:
        sizer = _sizer_of(model)
        if sizer is not None:
            sizer(tally, batched)
    if tally.outputs:  # float32 outputs: 4 bytes an element
        tally.add_bytes(tally.outputs[0] * COMPARE_BYTES_PER_ELEMENT // 4)
    tally.finish()
    return tally


def _sizer_of(model: Any) -> Sizer | None:
    if hasattr(model, "graph") and hasattr(model, "meta"):
        return graph_sizer(model)
    try:
        return _SIZERS.get(model)
    except TypeError:  # not weakly referable: nothing registered
        return None


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name, torch.float32)
