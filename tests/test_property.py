"""Property test: random architectures, random sequences of morphs, zero equivalence failures.

Architectures are MLPs and CNNs with BatchNorm, residual adds, concatenations, depthwise convs
and a flatten into Linear. Every morph the tool accepts must keep max abs difference within
float32 round-off (relative to the output's scale); a refusal must be a MorphError.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import morphcli
from helpers import assert_equivalent
from morphcli.errors import MorphError
from morphcli.graph.inputs import INPUTS_META
from morphcli.graph.layers import layers
from morphcli.io.api import to_graph_module
from morphcli.io.checkpoint import Checkpoint
from morphcli.morphs.applicable import applicable_morphs
from morphcli.morphs.runner import CheckOptions

EXAMPLES = int(os.environ.get("MORPH_PROPERTY_EXAMPLES", "200"))
NO_CHECK = CheckOptions(enabled=False)
ACTIVATIONS = ["gelu", "silu", "tanh", "leaky_relu", "elu", "sigmoid"]

REFUSALS: dict[str, int] = {}
STATS = {"examples": 0, "morphs": 0, "accepted": 0, "refused": 0}


class _Builder:
    """Builds a GraphModule node by node from hypothesis draws."""

    def __init__(self) -> None:
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.n = 0

    def layer(self, module: nn.Module, x: fx.Node) -> fx.Node:
        self.n += 1
        name = f"l{self.n}"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
        self.root.add_module(name, module)
        return self.graph.call_module(name, (x,))

    def op(self, fn: object, *args: object) -> fx.Node:
        return self.graph.call_function(fn, args)  # type: ignore[arg-type]


@st.composite
def architectures(draw: st.DrawFn) -> fx.GraphModule:
    torch.manual_seed(draw(st.integers(0, 2**16)))
    b = _Builder()
    x = b.graph.placeholder("x")
    conv = draw(st.booleans())
    width = draw(st.integers(2, 6))
    if conv:
        shape: tuple[int, ...] = (2, 3, 8, 8)
        x = b.layer(nn.Conv2d(3, width, 3, padding=1), x)
        size = 8
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["conv", "res", "cat", "dw", "pool", "bn"]))
            if kind == "conv":
                new = draw(st.integers(2, 6))
                x = b.layer(nn.ReLU(), b.layer(nn.Conv2d(width, new, 3, padding=1), x))
                width = new
            elif kind == "res":
                y = b.layer(nn.BatchNorm2d(width), b.layer(nn.Conv2d(width, width, 3, padding=1), x))
                x = b.layer(nn.ReLU(), b.op(torch.add, x, y))
            elif kind == "cat":
                w1, w2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
                a = b.layer(nn.Conv2d(width, w1, 1), x)
                c = b.layer(nn.Conv2d(width, w2, 3, padding=1), x)
                x = b.op(torch.cat, [a, c], 1)
                width = w1 + w2
            elif kind == "dw":
                x = b.layer(nn.Conv2d(width, width, 3, padding=1, groups=width), x)
            elif kind == "pool" and size > 2:
                x = b.layer(nn.MaxPool2d(2), x)
                size //= 2
            else:
                x = b.layer(nn.BatchNorm2d(width), x)
        x = b.op(torch.flatten, x, 1)
        features = width * size * size
    else:
        shape = (2, 5)
        features = 5
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["linear", "res", "cat"]))
        if kind == "linear":
            new = draw(st.integers(2, 8))
            x = b.layer(nn.ReLU(), b.layer(nn.Linear(features, new), x))
            features = new
        elif kind == "res":
            x = b.op(torch.add, x, b.layer(nn.Linear(features, features), x))
        else:
            w1, w2 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
            x = b.op(torch.cat, [b.layer(nn.Linear(features, w1), x),
                                 b.layer(nn.Linear(features, w2), x)], 1)
            features = w1 + w2
    b.graph.output(b.layer(nn.Linear(features, 3), x))
    gm = fx.GraphModule(b.root, b.graph)
    return to_graph_module(Checkpoint("generated", graph_module=gm), input_shapes=[shape])


def _random_morph(draw: st.DrawFn, gm: fx.GraphModule) -> tuple[fx.GraphModule, bool]:
    """Apply one random morph to a random layer it applies to; (model, accepted)."""
    candidates = [(la, m) for la in layers(gm) for m in applicable_morphs(gm, la)]
    if not candidates:
        return gm, False
    layer, morph = draw(st.sampled_from(candidates))
    seed = draw(st.integers(0, 1000))
    try:
        if morph == "widen":
            new, _ = morphcli.widen(gm, layer.name, by=draw(st.integers(1, 4)),
                                    init=draw(st.sampled_from(["zero", "copy"])), seed=seed,
                                    check=NO_CHECK)
        elif morph == "deepen":
            new, _ = morphcli.deepen(
                gm, after=layer.name, init=draw(st.sampled_from(["identity", "decompose"])),
                norm=draw(st.booleans()), residual=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "relu", "gelu"])), seed=seed,
                check=NO_CHECK)
        else:
            new, _ = morphcli.swap(gm, layer.name, to=draw(st.sampled_from(ACTIVATIONS)),
                                   check=NO_CHECK)
    except MorphError as e:
        REFUSALS[f"{morph}: {str(e)[:110]}"] = REFUSALS.get(f"{morph}: {str(e)[:110]}", 0) + 1
        return gm, False
    return new, True


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_morph_sequences_stay_exact(data: st.DataObject) -> None:
    original = data.draw(architectures())
    model = original
    STATS["examples"] += 1
    for _ in range(data.draw(st.integers(1, 4))):
        model, accepted = _random_morph(data.draw, model)
        STATS["morphs"] += 1
        STATS["accepted" if accepted else "refused"] += 1
    spec = original.meta[INPUTS_META][0]
    with torch.no_grad():
        x = torch.randn((4, *spec.shape[1:]), generator=torch.Generator().manual_seed(1))
        scale = float(original(x).abs().max())
    assert_equivalent(original, model, [x], atol=1e-5 * max(1.0, scale))


@pytest.fixture(scope="module", autouse=True)
def _report_figures():
    yield
    print(f"\nproperty test: {STATS['examples']} architectures, {STATS['morphs']} morphs tried, "
          f"{STATS['accepted']} accepted and exact, {STATS['refused']} refused")
    for reason, count in sorted(REFUSALS.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {count:4d}  {reason}")
