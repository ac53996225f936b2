"""The optimizer state follows the resize plan: after a zero-init widen or an identity deepen,
one more Adam or SGD-momentum step moves every original parameter of the grown model, on its
old coordinates, as it moves the original model (the gradients there are unchanged, and so is
the carried state), and the new coordinates start with zero state."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from torch import nn

import morphcli

X = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(1))
Y = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():  # nothing at its default: norms, statistics and biases random
        for bn in (net.bn1, net.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
            bn.running_mean.normal_(0, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    return net.eval()  # BatchNorm in eval mode: the grown model's function is the same


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(X), Y)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _trained(kind: str) -> tuple[_Net, torch.optim.Optimizer]:
    net = _net()
    opt: torch.optim.Optimizer
    if kind == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-3)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        _step(net, opt)
    return net, opt


def _old_part(grown: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The old coordinates: a zero-init widen keeps the old units first (ChannelMap.grow)."""
    return grown[tuple(slice(0, s) for s in old.shape)]


def _twin(net: _Net, opt: torch.optim.Optimizer) -> tuple[_Net, torch.optim.Optimizer]:
    """An independent copy of the original and its optimizer (the morphed model shares its
    unchanged parameters with the original, so stepping both would step those twice)."""
    twin = copy.deepcopy(net)
    twin_opt = type(opt)(twin.parameters(), **opt.defaults)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (it would share tensors)
    return twin, twin_opt


def _compare_one_step(net: _Net, opt: torch.optim.Optimizer, grown: nn.Module,
                      grown_opt: torch.optim.Optimizer) -> None:
    old_params = dict(net.named_parameters())
    new_params = dict(grown.named_parameters())
    # Before the step: old coordinates carry the original state, new ones have zero state.
    for name, p in old_params.items():
        q = new_params[name]
        for key, value in opt.state[p].items():
            carried = grown_opt.state[q][key]
            if value.dim() == 0:
                assert torch.equal(carried, value), (name, key)
                continue
            assert torch.equal(_old_part(carried, value), value), (name, key)
            fresh = carried.clone()
            fresh[tuple(slice(0, s) for s in value.shape)] = 0
            assert not fresh.any(), (name, key)
    before = {n: p.detach().clone() for n, p in old_params.items()}
    before_grown = {n: p.detach().clone() for n, p in new_params.items()}
    loss_a, loss_b = _step(net, opt), _step(grown, grown_opt)
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    for name, p in old_params.items():
        moved = p.detach() - before[name]
        moved_grown = _old_part(new_params[name].detach() - before_grown[name], p)
        scale = float(moved.abs().max())
        assert scale > 0, name
        diff = float((moved - moved_grown).abs().max())
        assert diff <= 1e-5 * scale, (name, diff, scale)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("morph", ["widen", "deepen"])
def test_one_more_step_moves_the_old_parameters_as_before(kind: str, morph: str) -> None:
    net, opt = _trained(kind)
    reference = _twin(net, opt)
    if morph == "widen":
        grown, grown_opt, result = morphcli.widen(net, "conv2", by=4, optimizer=opt,
                                                  input_shapes=[(1, 3, 12, 12)])
    else:
        grown, grown_opt, result = morphcli.deepen(net, after="conv2", optimizer=opt,
                                                   input_shapes=[(1, 3, 12, 12)])
    assert result.check is not None and result.check.equivalent
    assert type(grown_opt) is type(opt) and grown_opt.defaults == opt.defaults
    assert len(list(grown.parameters())) == sum(len(g["params"])
                                                for g in grown_opt.param_groups)
    if morph == "widen":
        assert grown.get_submodule("conv2").weight.shape[0] == 12
        assert [entry.path for entry in result.plan.layers] == ["conv2", "fc", "bn2"]
    else:
        assert result.plan.added == ["conv2_deep.weight", "conv2_deep.bias"]
    _compare_one_step(*reference, grown.eval(), grown_opt)
    for _ in range(3):  # and the run continues
        assert torch.isfinite(torch.tensor(_step(grown, grown_opt)))


def test_a_training_checkpoint_carries_its_state_through_the_cli(tmp_path: Path) -> None:
    net, opt = _trained("adam")
    src, out = tmp_path / "train.pt", tmp_path / "wide.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, src)
    code, _, stderr = run_cli("widen", src, "conv2", "--by", "4", "--arch",
                             "test_optimizer_state:_Net", "--input-shape", "1,3,12,12",
                             "-o", out, cwd=Path(__file__).parent)
    assert code == 0, stderr
    _resume_and_compare(net, opt, out)


def _resume_and_compare(net: _Net, opt: torch.optim.Optimizer, out: Path) -> None:
    """Resume from the written checkpoint as a user would, and take the step beside ``net``."""
    written = torch.load(out, weights_only=True)
    assert written["epoch"] == 3
    grown = morphcli.load(out)
    grown_opt = torch.optim.Adam(grown.parameters(), lr=1e-2, weight_decay=1e-3)
    grown_opt.load_state_dict(written["optimizer"])
    _compare_one_step(net, opt, grown.eval(), grown_opt)


def test_an_optimizer_over_other_parameters_is_refused() -> None:
    net, _ = _trained("sgd")
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(morphcli.MorphError, match="not the model's"):
        morphcli.widen(net, "conv2", by=4, optimizer=other, input_shapes=[(1, 3, 12, 12)])


def test_the_python_api_carries_a_training_checkpoints_optimizer_too(tmp_path: Path) -> None:
    """Morphing a loaded training checkpoint through the API and saving it writes the optimizer
    entry resized, as the CLI does (not the stale state of the smaller model)."""
    net, opt = _trained("adam")
    src, out = tmp_path / "train.pt", tmp_path / "wide.pt"
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, src)
    gm = morphcli.load(src, arch="test_optimizer_state:_Net", input_shapes=[(1, 3, 12, 12)])
    grown, result = morphcli.widen(gm, "conv2", by=4)
    assert any("follows the resize plan" in n for n in result.notes)
    morphcli.save(grown, out)
    _resume_and_compare(net, opt, out)
