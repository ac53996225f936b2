"""swap: exact blends for every activation pair kind, call sites, functional ops, --approx, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TV_SHAPE
from helpers import assert_one_error_line, invoke, listing
from test_deepen import assert_same_function, graph_module, sample_model
from torch import nn
from torch.nn import functional as F

import morphcli
from morphcli.errors import InputError, UnsupportedMorphError
from morphcli.graph.layers import LayerNotFoundError, find_layer
from morphcli.modules import ACTIVATIONS, ActivationBlend, make_activation
from morphcli.morphs.swap import can_swap
from morphcli.rules import registry


@pytest.mark.parametrize("to", sorted(set(ACTIVATIONS) - {"relu"}))
def test_swap_relu_to_every_activation_is_exact(to: str) -> None:
    gm = sample_model("mlp")
    new, result = morphcli.swap(gm, "act1", to=to)
    assert result.exact and result.check.equivalent and result.check.max_abs == 0.0
    assert_same_function(gm, new, exact=True)  # measured here too, not only by morph's check
    module = new.act1
    if to in ("leaky_relu", "prelu"):  # the natural parametric form: PReLU with slope 0
        assert type(module) is nn.PReLU and module.weight.item() == 0.0
    else:
        assert isinstance(module, ActivationBlend) and module.new_activation == to
        assert module.t.item() == 0.0
    assert new.act2 is gm.act2 and type(gm.act1) is nn.ReLU


def test_swap_shared_relu_all_sites() -> None:
    gm = sample_model("cnn")
    new, result = morphcli.swap(gm, "relu", to="gelu")
    assert result.check.equivalent
    replaced = [c.name for c in result.changes if c.action == "replaced"]
    assert replaced == [f"relu@{i}" for i in range(1, 6)]
    assert isinstance(new.relu, ActivationBlend)
    assert sum(1 for n in new.graph.nodes if n.target == "relu") == 5
    assert_same_function(gm, new, exact=True)


def test_swap_one_site_of_shared_relu() -> None:
    gm = sample_model("cnn")
    new, result = morphcli.swap(gm, "relu@2", to="gelu")
    assert result.check.equivalent
    assert [c.name for c in result.changes if c.action == "replaced"] == ["relu@2"]
    targets = [n.target for n in new.graph.nodes if n.op == "call_module" and "relu" in n.target]
    assert targets == ["relu", "relu_swap", "relu", "relu", "relu"]
    assert_same_function(gm, new, exact=True)
    assert type(new.relu) is nn.ReLU and new.relu is gm.relu
    assert isinstance(new.relu_swap, ActivationBlend)


class Acts(nn.Module):
    """One of each activation module, with non-default arguments and PReLU slopes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.acts = nn.ModuleDict({
            "leaky": nn.LeakyReLU(0.2), "prelu": nn.PReLU(6, init=0.1), "elu": nn.ELU(0.5),
            "celu": nn.CELU(0.7), "gelu": nn.GELU("tanh"), "hardtanh": nn.Hardtanh(-2.0, 3.0),
            "softplus": nn.Softplus(2.0, 5.0), "relu6": nn.ReLU6(), "selu": nn.SELU(),
            "silu": nn.SiLU(), "mish": nn.Mish(), "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(),
            "hardswish": nn.Hardswish(), "hardsigmoid": nn.Hardsigmoid(),
            "softsign": nn.Softsign(), "tanhshrink": nn.Tanhshrink(),
            "logsigmoid": nn.LogSigmoid(), "relu": nn.ReLU(inplace=True),
        })
        with torch.no_grad():
            self.acts["prelu"].weight.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.stack([act(h * 1.0) for act in self.acts.values()])


@pytest.fixture(scope="module")
def acts_model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return graph_module(Acts(), (1, 6))


@pytest.mark.parametrize("name", list(Acts().acts))
def test_swap_carries_old_configuration(acts_model: torch.fx.GraphModule, name: str) -> None:
    to = "silu" if name != "silu" else "gelu"
    new, result = morphcli.swap(acts_model, f"acts.{name}", to=to)
    assert result.check.equivalent and result.check.max_abs == 0.0, result.check.summary()
    assert_same_function(acts_model, new, exact=True)
    module = new.get_submodule(f"acts.{name}")
    if name == "leaky":
        assert module.old.negative_slope == 0.2
    if name == "prelu":
        assert torch.equal(module.old.weight, acts_model.acts.prelu.weight)
    if name == "gelu":
        assert module.old.approximate == "tanh"
    if name == "relu":  # a blend reads its input twice: never in place
        assert not module.old.inplace


def test_swap_leaky_relu_to_prelu_keeps_slope(acts_model: torch.fx.GraphModule) -> None:
    new, result = morphcli.swap(acts_model, "acts.leaky", to="prelu")
    assert result.check.max_abs == 0.0
    assert type(new.acts.leaky) is nn.PReLU
    assert new.acts.leaky.weight.item() == pytest.approx(0.2)


def test_every_registered_activation_rebuilds_itself() -> None:
    """Walk the registry: each rule's (name, kwargs) rebuilds a module computing the same."""
    x = torch.linspace(-8, 8, 401)
    for (kind, cls), rule in registry.entries().items():
        if kind != "activation":
            continue
        original = cls()
        name, kwargs = rule.spec(original)
        rebuilt = make_activation(name, kwargs)
        rebuilt.load_state_dict(original.state_dict())
        assert torch.equal(rebuilt(x), original(x)), cls


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        a = F.relu(h)
        b = torch.sigmoid(h)
        c = h.relu()
        d = F.leaky_relu(h, 0.3)
        e = F.gelu(h, approximate="tanh")
        f = F.elu(h, alpha=0.5)
        g = F.relu(h, inplace=False)
        k = F.leaky_relu(h)  # the default slope, which the rebuilt module must take
        return a + b + c + d + e + f + g + k + torch.exp(h) + F.softmax(h, dim=1)


@pytest.fixture(scope="module")
def functional_model() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return graph_module(Functional(), (1, 5))


@pytest.mark.parametrize("node,old", [
    ("relu", "relu"), ("sigmoid", "sigmoid"), ("relu_1", "relu"), ("leaky_relu", "leaky_relu"),
    ("gelu", "gelu"), ("elu", "elu"), ("relu_2", "relu"), ("leaky_relu_1", "leaky_relu"),
])
def test_swap_functional_sites(functional_model: torch.fx.GraphModule, node: str,
                               old: str) -> None:
    new, result = morphcli.swap(functional_model, node, to="mish")
    assert result.check.equivalent and result.check.max_abs == 0.0, result.check.summary()
    assert_same_function(functional_model, new, exact=True)
    module = new.get_submodule(f"{node}_swap")
    assert isinstance(module, ActivationBlend) and module.old_activation == old
    assert not any(n.name == node and n.op != "call_module" for n in new.graph.nodes)
    if node.startswith("leaky_relu"):
        assert module.old.negative_slope == {"leaky_relu": 0.3, "leaky_relu_1": 0.01}[node]
    if node == "gelu":
        assert module.old.approximate == "tanh"
    if node == "elu":
        assert module.old.alpha == 0.5


@pytest.mark.parametrize(("fn", "kwargs"), [
    (F.leaky_relu, {"negative_slope": 0.01}), (F.elu, {"alpha": 1.0}), (F.celu, {"alpha": 1.0}),
    (F.hardtanh, {"min_val": -1.0, "max_val": 1.0}), (F.softplus, {"beta": 1.0, "threshold": 20.0}),
    (F.gelu, {"approximate": "none"}),
])
def test_a_functional_site_without_its_arguments_takes_torchs_defaults(fn, kwargs) -> None:
    """fx records every argument of a traced call, but a stored graph may leave them out
    (``F.leaky_relu(h)``): the rebuilt module must then take torch's own defaults, compared
    here bit for bit on inputs that reach every branch (-3 to 3, and past the thresholds)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(fn, (x,)))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    site = next(n.name for n in graph.nodes if n.op == "call_function")
    new, result = morphcli.swap(gm, site, to="mish", input_shapes=[(1, 64)])
    module = new.get_submodule(f"{site}_swap")
    assert isinstance(module, ActivationBlend)
    assert {k: getattr(module.old, k) for k in kwargs} == kwargs
    probe = torch.cat([torch.linspace(-3, 3, 61), torch.tensor([-30.0, 25.0, 0.0])])[None]
    with torch.no_grad():
        assert torch.equal(new(probe), fn(probe))
    assert result.check.equivalent and result.check.max_abs == 0.0


@pytest.mark.parametrize("node", ["exp", "softmax"])
def test_swap_refuses_unknown_functions(functional_model: torch.fx.GraphModule,
                                        node: str) -> None:
    with pytest.raises(UnsupportedMorphError, match="cannot rebuild"):
        morphcli.swap(functional_model, node, to="relu")


def test_can_swap_marks_activation_sites(functional_model: torch.fx.GraphModule) -> None:
    from morphcli.graph.layers import layers

    swappable = {la.name for la in layers(functional_model) if can_swap(la)}
    assert swappable == {"relu", "sigmoid", "relu_1", "leaky_relu", "gelu", "elu", "relu_2",
                         "leaky_relu_1"}


def test_swap_approx_is_plain_and_approximate() -> None:
    gm = sample_model("cnn")
    new, result = morphcli.swap(gm, "relu", to="tanh", approx=True)
    assert not result.exact and type(new.relu) is nn.Tanh
    assert not result.check.equivalent and result.check.max_abs > 0
    # measured independently: far from round-off, as the check says (tanh saturates at 1)
    apart = assert_same_function(gm, new, rel=math.inf)
    assert apart.max_rel > 1e-2 and result.check.max_rel > 1e-2


def test_swap_errors() -> None:
    gm = sample_model("cnn")
    with pytest.raises(InputError, match="choose from .*gelu"):
        morphcli.swap(gm, "relu", to="swish9")
    with pytest.raises(InputError, match="already a relu"):
        morphcli.swap(gm, "relu", to="relu")
    with pytest.raises(UnsupportedMorphError, match="conv1 is a Conv2d.*ReLU"):
        morphcli.swap(gm, "conv1", to="gelu")
    with pytest.raises(LayerNotFoundError, match="did you mean relu"):
        morphcli.swap(gm, "rleu", to="gelu")
    with pytest.raises(LayerNotFoundError):
        morphcli.swap(gm, "relu@7", to="gelu")


def test_resnet18_shared_relu(resnet18: nn.Module) -> None:
    gm = graph_module(resnet18, TV_SHAPE)
    assert len(find_layer(gm, "layer1.0.relu")) == 2
    new, result = morphcli.swap(gm, "layer1.0.relu", to="gelu")
    assert result.check.equivalent and result.check.max_abs == 0.0
    assert [c.name for c in result.changes if c.action == "replaced"] == [
        "layer1.0.relu@1", "layer1.0.relu@2"]
    assert isinstance(new.get_submodule("layer1.0.relu"), ActivationBlend)
    assert gm.get_submodule("layer1.0.relu").inplace  # the original keeps its in-place ReLU


# ---------------------------------------------------------------- command line


def test_cli_swap_writes_and_reports(samples: Path) -> None:
    code, out, err = invoke("swap", samples / "cnn.pt", "relu@2", "--to", "gelu", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["output"] == str(samples / "cnn.swap.pt")
    assert [c["name"] for c in doc["plan"]["changes"] if c["action"] == "replaced"] == ["relu@2"]
    loaded = morphcli.load(samples / "cnn.swap.pt")
    assert isinstance(loaded.relu_swap, ActivationBlend)
    assert morphcli.check(str(samples / "cnn.pt"), loaded).equivalent


def test_cli_approx_exits_1_and_writes_nothing(samples: Path) -> None:
    files = listing(samples)
    code, _, err = invoke("swap", samples / "mlp.pt", "act1", "--to", "gelu", "--approx", "-q")
    assert code == 1 and listing(samples) == files
    assert_one_error_line(err, "approximate by request", "--atol", "nothing was written")
    code, _, _ = invoke("swap", samples / "mlp.pt", "act1", "--to", "gelu", "--approx",
                        "--force", "-q", "-o", samples / "approx.pt")
    assert code == 1 and (samples / "approx.pt").exists()
    code, _, _ = invoke("swap", samples / "mlp.pt", "act1", "--to", "gelu", "--approx",
                        "--atol", "10", "-q", "-o", samples / "loose.pt")
    assert code == 0 and (samples / "loose.pt").exists()


@pytest.mark.parametrize("args,needle", [
    (("relu", "--to", "nope"), "choose from"),
    (("relu", "--to", "relu"), "already a relu"),
    (("conv2", "--to", "gelu"), "not an activation"),
    (("rellu", "--to", "gelu"), "did you mean relu"),
])
def test_cli_swap_errors_are_one_line(samples: Path, args: tuple, needle: str) -> None:
    files = listing(samples)
    code, _, err = invoke("swap", samples / "cnn.pt", *args)
    assert code == 2
    assert_one_error_line(err, needle)
    assert listing(samples) == files
