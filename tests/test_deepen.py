"""deepen: exactness over options x sample models x layers, kernels, refusals, CLI, formats."""

from __future__ import annotations

import copy
import json
import operator
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
from conftest import TV_SHAPE, _sample_build, sample_shape
from helpers import assert_one_error_line, invoke, listing, sha256
from torch import nn
from torch.nn import functional as F

import morphcli
from morphcli.errors import InputError, NotEquivalentError, UnsupportedMorphError
from morphcli.graph.inputs import INPUTS_META, InputSpec
from morphcli.graph.layers import AmbiguousLayerError, LayerNotFoundError
from morphcli.modules import FeaturesLastBatchNorm, IdentityStartActivation
from morphcli.morphs.runner import CheckOptions

NO_CHECK = CheckOptions(enabled=False)


def graph_module(model: nn.Module, *shapes: tuple[int, ...]) -> torch.fx.GraphModule:
    from morphcli.io.api import to_graph_module
    from morphcli.io.checkpoint import Checkpoint

    return to_graph_module(Checkpoint("test", module=model.eval()), input_shapes=list(shapes))


def sample_model(name: str) -> torch.fx.GraphModule:
    return graph_module(_sample_build().build(f"{name}.pt"), sample_shape(f"{name}.pt"))


def assert_same_function(a: nn.Module, b: nn.Module, rel: float = 1e-6, *,
                         exact: bool = False) -> helpers.Sameness:
    """The same function, measured with plain torch (not morph's check) on two seeded batches
    of 4 at input scales 1 and 10: bit for bit with ``exact``, else within ``rel`` of the
    output's scale (float32 round-off; the tool's own check allows 1e-5)."""
    specs = a.meta[INPUTS_META]  # type: ignore[union-attr]
    batch = [InputSpec((4, *s.shape[1:]), s.dtype, s.high) for s in specs]
    return helpers.assert_same_function(a, b, batch, exact=exact, rtol=rel, seeds=(0, 1),
                                        scales=(1.0, 10.0))


# (model, layer, new layer type, layer is linear so decompose applies)
CASES = [
    ("cnn", "conv3", nn.Conv2d, True),
    ("cnn", "relu@3", nn.Conv2d, False),
    ("cnn", "pool@1", nn.Conv2d, False),
    ("cnn", "flatten", nn.Linear, False),
    ("cnn", "fc1", nn.Linear, True),
    ("cnn", "fc2", nn.Linear, True),  # the last layer: the new one produces the output
    ("mlp", "fc1", nn.Linear, True),
    ("mlp", "act2", nn.Linear, False),
    ("resnet", "stem", nn.Conv2d, True),
    ("resnet", "add", nn.Conv2d, False),
    ("resnet", "cat", nn.Conv2d, False),
    ("resnet", "branch_b", nn.Conv2d, True),
    ("resnet", "flatten", nn.Linear, False),
]
OPTIONS = [
    {},
    {"kernel": 5},
    {"kernel": 1, "norm": True},
    {"activation": "relu"},
    {"activation": "gelu", "norm": True},
    {"residual": True},
    {"residual": True, "norm": True, "activation": "sigmoid"},
    {"residual": True, "activation": "tanh"},
    {"init": "decompose"},
    {"init": "decompose", "norm": True, "activation": "silu"},
]


def _bit_exact(opts: dict) -> bool:
    """Options whose new layer is an exact identity in float32 (I and zeros; no BatchNorm,
    whose sqrt(1 + eps) / sqrt(1 + eps) rounds, no Q and Q^T)."""
    return opts.get("init") != "decompose" and not opts.get("norm")


def _case_id(case: tuple) -> str:
    return f"{case[0]}-{case[1]}"


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())
                         or "identity")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_deepen_is_exact(case: tuple, opts: dict) -> None:
    name, layer, new_type, linear = case
    gm = sample_model(name)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    if opts.get("init") == "decompose" and not linear:
        with pytest.raises(UnsupportedMorphError, match="must be linear"):
            morphcli.deepen(gm, layer, **opts)
        return
    new, result = morphcli.deepen(gm, layer, **opts)
    assert result.check is not None and result.check.equivalent, result.check.summary()
    assert result.exact
    assert_same_function(gm, new, exact=_bit_exact(opts))
    base = layer.split("@")[0]  # a module path, or the node name of an op
    deep = new.get_submodule(f"{base}_deep")
    assert type(deep) is new_type
    if opts.get("norm"):
        assert isinstance(new.get_submodule(f"{base}_deep_bn"), nn.modules.batchnorm._BatchNorm)
    if opts.get("activation"):
        assert new.get_submodule(f"{base}_deep_act") is not None
    if opts.get("residual"):
        assert any(n.target is operator.add and n.args[1].name.startswith(f"{base}_deep")
                   for n in new.graph.nodes)
    # the original is untouched: same graph size, same tensors
    assert len(gm.graph.nodes) < len(new.graph.nodes)
    assert gm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


def test_deepen_shapes_names_and_plan() -> None:
    gm = sample_model("cnn")
    new, result = morphcli.deepen(gm, "conv3", norm=True, activation="relu", check=NO_CHECK)
    assert new.conv3_deep.weight.shape == (32, 32, 3, 3)
    assert new.conv3_deep.padding == (1, 1) and new.conv3_deep.stride == (1, 1)
    assert isinstance(new.conv3_deep_bn, nn.BatchNorm2d)
    added = {c.name: c.new for c in result.changes if c.action == "added"}
    assert added["conv3_deep.weight"] == [32, 32, 3, 3]
    assert added["conv3_deep_bn.running_var"] == [32]
    rewired = [c for c in result.changes if c.action == "rewired"]
    assert [c.name for c in rewired] == ["bn3"]
    # the module graph order: conv3 -> conv3_deep -> bn -> act -> bn3
    order = [n.target for n in new.graph.nodes if n.op == "call_module"]
    i = order.index("conv3")
    assert order[i:i + 5] == ["conv3", "conv3_deep", "conv3_deep_bn", "conv3_deep_act", "bn3"]
    # deepening twice gives _deep_2
    again, _ = morphcli.deepen(new, "conv3", check=NO_CHECK)
    assert isinstance(again.get_submodule("conv3_deep_2"), nn.Conv2d)


def test_python_api_accepts_path_graph_and_module(samples: Path) -> None:
    path = samples / "mlp.pt"
    module = _sample_build().build("mlp.pt")
    for model, shapes in ((str(path), None), (path, None), (morphcli.load(path), None),
                          (module, [(1, 20)])):
        new, result = morphcli.deepen(model, after="fc2", input_shapes=shapes)
        assert isinstance(new, torch.fx.GraphModule) and result.check.equivalent
        assert result.target == "fc2" and isinstance(new.fc2_deep, nn.Linear)
    new, result = morphcli.swap(module, "act1", to="gelu", input_shapes=[(1, 20)])
    assert result.check.equivalent and result.morph == "swap"


def test_deepen_after_last_layer_produces_output() -> None:
    gm = sample_model("mlp")
    new, result = morphcli.deepen(gm, "fc3")
    assert result.check.equivalent
    out = next(n for n in new.graph.nodes if n.op == "output")
    assert out.args[0].target == "fc3_deep"
    assert any(c.action == "rewired" and c.name == "output" for c in result.changes)


@pytest.mark.parametrize("kernel", [1, 3, 5, 7])
@pytest.mark.parametrize("dims,shape", [(1, (1, 4, 9)), (2, (1, 4, 9, 7)), (3, (1, 4, 5, 6, 5))])
def test_identity_kernel_centre(dims: int, shape: tuple[int, ...], kernel: int) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    torch.manual_seed(0)
    gm = graph_module(nn.Sequential(conv(4, 4, 3, padding=1), nn.ReLU()), shape)
    new, result = morphcli.deepen(gm, "0", kernel=kernel)
    assert result.check.equivalent and result.check.max_abs == 0.0
    deep = new.get_submodule("0_deep")
    assert type(deep) is conv and deep.kernel_size == (kernel,) * dims
    w = deep.weight.detach()
    centre = (slice(None), slice(None), *([kernel // 2] * dims))
    assert torch.equal(w[centre], torch.eye(4))
    assert float(w.abs().sum()) == 4.0  # nothing off the centre tap
    x = torch.randn(2, *shape[1:])
    assert torch.equal(deep(x), x)


class Tokens(nn.Module):
    """Linear layers over (N, L, F) tokens: a 3-d tensor that is features, not a Conv1d map."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.act, self.head = nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.proj(x)))


class Signal(nn.Module):
    """A Conv1d over (N, C, L) and an op between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.conv2 = nn.Conv1d(3, 5, 3, padding=1), nn.Conv1d(5, 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("model,layer,expected", [
    (Tokens, "proj", nn.Linear), (Tokens, "act", nn.Linear), (Tokens, "head", nn.Linear),
    (Signal, "conv", nn.Conv1d), (Signal, "tanh", nn.Conv1d),
])
def test_deepen_follows_rank3_tensors(model: type, layer: str, expected: type) -> None:
    torch.manual_seed(0)
    shape = (1, 4, 6) if model is Tokens else (1, 3, 10)
    gm = graph_module(model(), shape)
    new, result = morphcli.deepen(gm, layer, activation="relu")
    assert result.check.equivalent
    assert type(new.get_submodule(f"{layer}_deep")) is expected
    if model is Signal and layer == "tanh":  # tanh's output [-1, 1] is not in ReLU's fixed set
        assert isinstance(new.get_submodule("tanh_deep_act"), IdentityStartActivation)


def test_deepen_norm_on_token_features_normalises_the_last_dim(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gm = graph_module(Tokens(), (2, 4, 6))
    new, result = morphcli.deepen(gm, "proj", norm=True)
    assert result.check.equivalent and result.exact
    bn = new.get_submodule("proj_deep_bn")
    assert isinstance(bn, FeaturesLastBatchNorm) and bn.num_features == 8
    assert_same_function(gm, new)
    # it normalises the features (last dim) with per-feature statistics in train mode
    probe = copy.deepcopy(bn).train()  # (train mode updates the running statistics)
    x = torch.randn(3, 5, 8) * 4 + 2
    y = probe(x)
    assert y.shape == x.shape
    assert torch.allclose(y.mean(dim=(0, 1)), probe.bias.detach(), atol=1e-5)
    # and widening the Linear it follows carries its statistics along
    wide, _ = morphcli.widen(new, "proj_deep", by=3, init="copy")
    assert wide.get_submodule("proj_deep_bn").num_features == 11
    assert_same_function(gm, wide)
    out = tmp_path / "tokens.pt"
    morphcli.save(wide, out)
    assert morphcli.check(wide, out).equivalent


def test_batchnorm_is_identity_in_eval_only() -> None:
    gm = sample_model("mlp")
    new, result = morphcli.deepen(gm, "fc1", norm=True)
    assert result.check.equivalent
    assert any("eval mode" in n for n in result.notes)
    bn = new.fc1_deep_bn
    assert not bn.training
    x = torch.randn(16, 64) * 3 + 1
    assert torch.allclose(bn(x), x, atol=1e-6)
    bn.train()
    assert not torch.allclose(bn(x), x, atol=1e-3)  # batch statistics: documented


# ---------------------------------------------------------------- decompose


def test_decompose_re_expresses_conv3() -> None:
    gm = sample_model("cnn")
    old_weight = gm.conv3.weight.detach().clone()
    new, result = morphcli.deepen(gm, "conv3", init="decompose", seed=5)
    assert result.check.equivalent and result.exact
    assert new.conv3 is not gm.conv3  # a new module object, the original untouched
    assert torch.equal(gm.conv3.weight, old_weight)
    assert not torch.allclose(new.conv3.weight, old_weight, atol=1e-3)
    # the successor: Q at the centre tap, orthogonal and dense across channels
    q = new.conv3_deep.weight.detach()[:, :, 1, 1].double()
    assert torch.allclose(q @ q.T, torch.eye(32, dtype=torch.float64), atol=1e-5)
    assert (q.abs() > 1e-4).float().mean() > 0.9
    assert new.conv3_deep.weight.abs().sum().item() == pytest.approx(q.abs().sum().item())
    replaced = {c.name for c in result.changes if c.action == "replaced"}
    assert replaced == {"conv3.weight", "conv3.bias"}
    # other layers are still shared with the original
    assert new.conv2 is gm.conv2 and new.bn3 is gm.bn3
    assert_same_function(gm, new)


def test_decompose_refuses_after_relu_and_bn() -> None:
    gm = sample_model("cnn")
    with pytest.raises(UnsupportedMorphError, match="relu@3 is a ReLU"):
        morphcli.deepen(gm, "relu@3", init="decompose")
    with pytest.raises(UnsupportedMorphError, match="bn3 is a BatchNorm2d"):
        morphcli.deepen(gm, "bn3", init="decompose")


def test_decompose_grouped_conv_is_block_diagonal() -> None:
    torch.manual_seed(0)
    gm = graph_module(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU()), (1, 4, 8, 8))
    new, result = morphcli.deepen(gm, "0", init="decompose")
    assert result.check.equivalent
    q = new.get_submodule("0_deep").weight[:, :, 1, 1]
    assert torch.count_nonzero(q[:3, 3:]) == 0 and torch.count_nonzero(q[3:, :3]) == 0
    assert new.get_submodule("0").groups == 2


def test_decompose_depthwise_conv_is_a_diagonal_scaling() -> None:
    gm = sample_model("resnet")
    new, result = morphcli.deepen(gm, "depthwise", init="decompose", seed=3)
    assert result.check.equivalent and result.exact
    conv = gm.get_submodule("depthwise")
    q = new.get_submodule("depthwise_deep").weight.detach()[:, :, 1, 1].double()
    scales = torch.diagonal(q)
    assert torch.count_nonzero(q - torch.diag(scales)) == 0
    assert scales.abs().min() >= 0.5 - 1e-6 and scales.abs().max() <= 2 + 1e-6
    assert (scales < 0).any() and (scales > 0).any()
    head = new.get_submodule("depthwise")
    assert head.groups == conv.groups == conv.out_channels  # still depthwise
    expected = conv.weight.detach().double() / scales.reshape(-1, 1, 1, 1)
    assert torch.allclose(head.weight.double(), expected, rtol=1e-6)
    assert any("diagonal" in n for n in result.notes)
    assert_same_function(gm, new)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.relu(self.conv(x)))


def test_decompose_one_site_of_a_shared_conv() -> None:
    torch.manual_seed(0)
    gm = graph_module(SharedConv(), (1, 4, 6, 6))
    with pytest.raises(AmbiguousLayerError, match="conv@2"):
        morphcli.deepen(gm, "conv", init="decompose")
    new, result = morphcli.deepen(gm, "conv@2", init="decompose")
    assert result.check.equivalent
    targets = [n.target for n in new.graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "conv_decomposed", "conv_deep"]
    assert new.conv is gm.conv  # the first site keeps the original


# ---------------------------------------------------------------- activation and residual


@pytest.mark.parametrize("layer,act,plain", [
    ("relu@3", "relu", nn.ReLU), ("relu@3", "leaky_relu", nn.LeakyReLU),
    ("relu@3", "prelu", nn.PReLU), ("relu@3", "elu", nn.ELU),
    ("relu@3", "relu6", None), ("relu@3", "gelu", None), ("conv3", "relu", None),
    ("bn3", "identity", nn.Identity),
])
def test_activation_plain_only_where_provable(layer: str, act: str, plain: type | None) -> None:
    gm = sample_model("cnn")
    new, result = morphcli.deepen(gm, layer, activation=act)
    assert result.check.equivalent and result.check.max_abs == 0.0
    base = layer.split("@")[0]
    module = new.get_submodule(f"{base}_deep_act")
    if plain is None:
        assert isinstance(module, IdentityStartActivation) and module.activation == act
        assert any("IdentityStartActivation" in n for n in result.notes)
    else:
        assert type(module) is plain
        assert any("plain" in n for n in result.notes)


class Bounded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sigmoid(self.fc(x)) * 1.0 + F.relu6(x))


def test_activation_plain_after_functional_bounded_ops() -> None:
    gm = graph_module(Bounded(), (1, 5))
    new, _ = morphcli.deepen(gm, "sigmoid", activation="relu6")
    assert type(new.sigmoid_deep_act) is nn.ReLU6
    new, _ = morphcli.deepen(gm, "relu6", activation="relu")
    assert type(new.relu6_deep_act) is nn.ReLU
    new, _ = morphcli.deepen(gm, "mul", activation="relu")  # sigmoid * 1.0: not proven
    assert isinstance(new.mul_deep_act, IdentityStartActivation)


def test_residual_block_is_zero() -> None:
    gm = sample_model("cnn")
    new, result = morphcli.deepen(gm, "conv3", residual=True, norm=True, activation="sigmoid")
    assert result.check.max_abs == 0.0
    assert torch.count_nonzero(new.conv3_deep_bn.weight) == 0
    assert isinstance(new.conv3_deep_act, IdentityStartActivation)  # sigmoid(0) = 0.5
    assert torch.equal(new.conv3_deep.weight[:, :, 1, 1], torch.eye(32))  # still identity inside
    new, _ = morphcli.deepen(gm, "conv3", residual=True, activation="relu")
    assert torch.count_nonzero(new.conv3_deep.weight) == 0 and type(new.conv3_deep_act) is nn.ReLU


# ---------------------------------------------------------------- noise


def test_noise_is_approximate_and_only_on_new_weights() -> None:
    gm = sample_model("cnn")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    new, result = morphcli.deepen(gm, "conv3", init="decompose", noise=0.01, seed=1)
    assert not result.exact
    assert result.check is not None and not result.check.equivalent and result.check.max_abs > 0
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    # the re-expressed conv3 carries no noise: with the noise removed, the pair is exact again
    clean, _ = morphcli.deepen(gm, "conv3", init="decompose", seed=1, check=NO_CHECK)
    assert torch.equal(new.conv3.weight, clean.conv3.weight)
    assert not torch.equal(new.conv3_deep.weight, clean.conv3_deep.weight)
    # noise is seeded
    again, _ = morphcli.deepen(gm, "conv3", init="decompose", noise=0.01, seed=1, check=NO_CHECK)
    assert torch.equal(again.conv3_deep.weight, new.conv3_deep.weight)


def test_noise_masked_by_zeroed_batchnorm_stays_exact() -> None:
    _, result = morphcli.deepen(sample_model("mlp"), "fc2", residual=True, norm=True, noise=0.1)
    assert result.exact and result.check.max_abs == 0.0


# ---------------------------------------------------------------- refusals


def test_refusals() -> None:
    gm = sample_model("cnn")
    with pytest.raises(UnsupportedMorphError, match="model's input"):
        morphcli.deepen(gm, "x")
    with pytest.raises(UnsupportedMorphError, match="output node"):
        morphcli.deepen(gm, "output")
    with pytest.raises(LayerNotFoundError, match="did you mean conv4"):
        morphcli.deepen(gm, "conv5")
    with pytest.raises(AmbiguousLayerError, match=r"relu@1 .*relu@5.*relu@1"):
        morphcli.deepen(gm, "relu")
    with pytest.raises(InputError, match="odd"):
        morphcli.deepen(gm, "conv3", kernel=4)
    with pytest.raises(InputError, match="--init"):
        morphcli.deepen(gm, "conv3", init="zero")
    with pytest.raises(InputError, match="--residual"):
        morphcli.deepen(gm, "conv3", init="decompose", residual=True)
    with pytest.raises(InputError, match="unknown --activation"):
        morphcli.deepen(gm, "conv3", activation="swish2")


class Odd(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.argmax(x, dim=1), x.sum(dim=1), x.size()


def test_refuses_tensors_it_cannot_follow() -> None:
    gm = graph_module(Odd(), (1, 5))
    with pytest.raises(UnsupportedMorphError, match="torch.int64"):
        morphcli.deepen(gm, "argmax")
    with pytest.raises(UnsupportedMorphError, match=r"shape \[1\]"):
        morphcli.deepen(gm, "sum_1")
    with pytest.raises(UnsupportedMorphError, match="not a single tensor"):
        morphcli.deepen(gm, "size")


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".pt2", ".onnx"])
def test_deepened_and_swapped_model_saves_in_every_format(suffix: str, tmp_path: Path) -> None:
    gm = sample_model("cnn")
    deep, _ = morphcli.deepen(gm, "conv3", norm=True, activation="gelu", check=NO_CHECK)
    both, result = morphcli.swap(deep, "relu", to="silu")
    assert result.check.equivalent
    assert isinstance(both.conv3_deep_act, IdentityStartActivation)
    dest = tmp_path / f"model{suffix}"
    morphcli.save(both, dest)  # verified against the model in memory before it is moved in place
    report = morphcli.check(gm, str(dest))
    assert report.equivalent, report.summary()
    if suffix in (".pt", ".safetensors"):
        loaded = morphcli.load(dest)
        assert type(loaded.get_submodule("relu")).__name__ == "ActivationBlend"
        assert_same_function(gm, loaded)


# ---------------------------------------------------------------- torchvision


@pytest.mark.parametrize("layer,opts", [
    ("layer1.0.conv1", {}), ("layer1.0.conv1", {"init": "decompose", "norm": True}),
    ("layer2.1.bn2", {"activation": "relu"}),
])
def test_resnet18(resnet18: nn.Module, layer: str, opts: dict) -> None:
    gm = graph_module(resnet18, TV_SHAPE)
    new, result = morphcli.deepen(gm, layer, **opts)
    assert result.check.equivalent, result.check.summary()
    assert isinstance(new.get_submodule(f"{layer}_deep"), nn.Conv2d)
    assert_same_function(gm, new)


# ---------------------------------------------------------------- command line


def test_cli_readme_example_writes_beside_input(samples: Path) -> None:
    code, out, err = invoke("deepen", samples / "cnn.pt", "--after", "conv3")
    assert code == 0, err
    written = samples / "cnn.deepen.pt"
    assert written.exists() and "wrote" in err and out == ""
    assert morphcli.check(str(samples / "cnn.pt"), str(written)).equivalent
    assert "conv3_deep" in dict(morphcli.load(written).named_modules())
    code, _, _ = invoke("deepen", samples / "cnn.pt", "--after", "conv3", "-q")
    assert code == 0 and (samples / "cnn.deepen.2.pt").exists()  # never overwrites


def test_cli_dry_run_json_writes_nothing(samples: Path) -> None:
    files = listing(samples)
    code, out, _ = invoke("deepen", samples / "cnn.pt", "--after", "conv3", "--norm",
                          "--dry-run", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["output"] is None
    names = {c["name"]: c for c in doc["plan"]["changes"]}
    assert names["conv3_deep.weight"]["new"] == [32, 32, 3, 3]
    assert "conv3_deep_bn" in names and doc["plan"]["check"]["equivalent"]
    assert listing(samples) == files


def test_cli_json_reports_output(samples: Path) -> None:
    code, out, _ = invoke("deepen", samples / "mlp.pt", "--after", "act1", "--activation",
                          "relu", "--json", "-o", samples / "m.safetensors")
    assert code == 0
    doc = json.loads(out)
    assert doc["output"] == str(samples / "m.safetensors") and doc["export_check"]["equivalent"]
    assert any("plain ReLU" in n for n in doc["plan"]["notes"])


def test_cli_seed_gives_identical_bytes(samples: Path) -> None:
    args = ("deepen", samples / "cnn.pt", "--after", "conv3", "--init", "decompose", "-q")
    for out in ("a.pt", "b.pt"):
        assert invoke(*args, "--seed", "7", "-o", samples / out).code == 0
    assert invoke(*args, "--seed", "8", "-o", samples / "c.pt").code == 0
    assert sha256(samples / "a.pt") == sha256(samples / "b.pt")
    assert sha256(samples / "a.pt") != sha256(samples / "c.pt")


def test_cli_noise_fails_without_force(samples: Path) -> None:
    files = listing(samples)
    args = ("deepen", samples / "cnn.pt", "--after", "conv3", "--noise", "0.01")
    code, _, err = invoke(*args, "-q")
    assert code == 1 and listing(samples) == files
    assert_one_error_line(err, "approximate by request", "--atol", "--force")
    code, out, _ = invoke(*args, "--force", "--json", "-o", samples / "noisy.pt")
    assert code == 1 and (samples / "noisy.pt").exists()
    doc = json.loads(out)
    assert doc["plan"]["exact"] is False and doc["plan"]["check"]["max_abs"] > 0
    atol = err.split("--atol ")[1].split()[0]
    code, _, _ = invoke(*args, "--atol", atol, "-q", "-o", samples / "ok.pt")
    assert code == 0 and (samples / "ok.pt").exists()


@pytest.mark.parametrize("args,needle", [
    (("--after", "conv9"), "did you mean"),
    (("--after", "relu"), "relu@2"),
    (("--after", "relu@3", "--init", "decompose"), "use --init identity"),
    (("--after", "conv3", "--kernel", "2"), "odd"),
])
def test_cli_errors_are_one_line(samples: Path, args: tuple, needle: str) -> None:
    code, _, err = invoke("deepen", samples / "cnn.pt", *args)
    assert code == 2
    assert_one_error_line(err, needle)


def test_cli_pipeline_through_stdout(samples: Path) -> None:
    code, data, err = invoke("widen", samples / "cnn.pt", "conv2", "--factor", "2", "-o", "-",
                             "-q", binary=True)
    assert code == 0, err
    code, _, err = invoke("deepen", "-", "--after", "conv3", "-o", samples / "b.pt", input=data)
    assert code == 0, err
    assert morphcli.check(str(samples / "cnn.pt"), str(samples / "b.pt")).equivalent


# ---------------------------------------------------------------- float32 round-off


def _tiny_layer_norm_model() -> torch.fx.GraphModule:
    """A LayerNorm over three features that differ by 1e-4 of their size: it divides by their
    spread, so float32 round-off in the layer before it grows 10^4-fold (eps is tiny, so this
    holds at every input scale the check uses). Widening layer 0 with zero init keeps every
    weight bit for bit but changes how layer 2 sums its inputs: a float32 difference of about
    1e-3 relative, while in float64 the two models agree to 1e-11 or better (seeds 0-5 alike)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3), nn.LayerNorm(3, eps=1e-12),
                          nn.Linear(3, 3))
    with torch.no_grad():
        mixer = model[2]
        mixer.weight.copy_(torch.randn(1, 8).repeat(3, 1) + 1e-4 * torch.randn(3, 8))
        mixer.bias.copy_(torch.randn(1).repeat(3) + 1e-4 * torch.randn(3))
    return graph_module(model, (2, 5))


def test_float32_failure_of_an_exact_morph_is_checked_in_float64(tmp_path: Path) -> None:
    """The model amplifies round-off 10^4-fold: the float32 difference (1e-3 relative) is
    beyond the tolerance, but the morph computed in float64 agrees with the original to
    1e-11, and the float32 difference is within both models' own float32 round-off (measured
    here independently), so the check passes and says why."""
    gm = _tiny_layer_norm_model()
    wide, result = morphcli.widen(gm, "0", factor=2)
    report = result.check
    assert report.equivalent and report.max_rel > 1e-5
    assert "within the two models' own float32 round-off" in report.notes[-1]
    f64 = result.float64_check
    assert f64 is not None and f64.equivalent and f64.max_rel < 1e-9
    assert result.to_json()["float64_check"]["equivalent"] is True
    # Batches of 2, as the check runs: CPU matmul kernels for other batch sizes may happen to
    # sum both models' rows alike, bit for bit.
    wide64 = morphcli.widen(copy.deepcopy(gm).double(), "0", factor=2, check=False)[0]
    gm64 = copy.deepcopy(gm).double()
    for seed in range(4):
        x = torch.randn(2, 5, generator=torch.Generator().manual_seed(seed)) * 1e3
        with torch.no_grad():
            a, b, a64, b64 = gm(x).double(), wide(x).double(), gm64(x.double()), \
                wide64(x.double())
        assert float((a64 - b64).abs().max()) < 1e-9 * float(a64.abs().max())
        own = float((a - a64).abs().max() + (b - b64).abs().max())
        assert 1e-5 * float(a.abs().max()) < float((a - b).abs().max()) <= own
    # a passing check, or an approximate morph, does not run the float64 one
    assert morphcli.deepen(gm, "2")[1].float64_check is None
    assert morphcli.widen(gm, "0", factor=2, noise=0.1)[1].float64_check is None

    path, out = tmp_path / "tiny.pt", tmp_path / "wide.pt"
    morphcli.save(gm, path)
    code, stdout, err = invoke("widen", path, "0", "--factor", "2", "-o", out, "--json")
    assert code == 0 and out.exists(), err
    assert "amplifies round-off" in json.loads(stdout)["plan"]["check"]["notes"][-1]


def test_onnx_less_accurate_than_the_model_itself_is_refused(tmp_path: Path) -> None:
    """The written-file check credits the model's own float32 round-off, not the runtime's:
    onnxruntime's LayerNorm over three nearly equal features is 7e-4 off the float64 run at
    unit scale where torch's float32 is not, so the file is refused and nothing is left."""
    out = tmp_path / "tiny.onnx"
    with pytest.raises(NotEquivalentError, match="does not reproduce the model"):
        morphcli.save(_tiny_layer_norm_model(), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_exact_morph_beyond_round_off_but_exact_in_float64_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the float32 difference is beyond both models' own round-off yet float64 agrees
    (here the round-off re-check is made to fail), nothing is written and the error gives
    the --atol that accepts the difference."""
    from morphcli.morphs import runner

    real = runner.compare

    def no_round_off(*args: Any, references: Any = None, **kwargs: Any) -> Any:
        report = real(*args, **kwargs)
        if references is not None:
            report.equivalent = False
        return report

    monkeypatch.setattr(runner, "compare", no_round_off)
    path, out = tmp_path / "tiny.pt", tmp_path / "wide.pt"
    morphcli.save(_tiny_layer_norm_model(), path)
    code, _, err = invoke("widen", path, "0", "--factor", "2", "-o", out, "--quiet")
    assert code == 1 and not out.exists()
    line = assert_one_error_line(err, "in float64 the two agree", "--atol")
    atol = line.split("--atol ")[1].split()[0]
    code, _, err = invoke("widen", path, "0", "--factor", "2", "-o", out, "--quiet",
                          "--atol", atol)
    assert code == 0 and out.exists(), err
