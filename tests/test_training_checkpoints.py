"""Nothing of the input is dropped (issue 12): state_dict metadata, layers the graph does not
use, and (further down) training checkpoints with their other entries.

Written files are compared here with plain torch: their tensors loaded (strict) into a fresh
torchvision model grown the same way and run beside the original.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from conftest import torchvision_model
from helpers import assert_one_error_line, invoke
from torch import nn

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max())


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


# ---------------------------------------------------------------- metadata, unused layers


def test_mnasnet_state_dict_keeps_its_versions(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = torchvision_model("mnasnet0_5")
    src = tmp_path / "mnasnet.pt"
    torch.save(original.state_dict(), src)  # holds _metadata: mnasnet needs version 2
    out = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "layers.6", "--by", "8", "--arch",
                             "torchvision.models:mnasnet0_5", "--input-shape", "1,3,64,64",
                             "-o", out)
    assert code == 0, stderr  # was exit 3: "version should be set to 1 or 2"
    written = load_file(out)
    import torchvision

    grown = torchvision.models.mnasnet0_5(weights=None)
    grown.layers[6] = nn.Conv2d(16, 16, 1, bias=False)
    grown.layers[7] = nn.BatchNorm2d(16)
    grown.layers[8][0].layers[0] = nn.Conv2d(16, 24, 1, bias=False)
    state = dict(written)
    state = type(original.state_dict())(state)
    state._metadata = original.state_dict()._metadata  # type: ignore[attr-defined]
    grown.load_state_dict(state, strict=True)
    assert _max_rel(_outputs(original, X64), _outputs(grown, X64)) <= 1e-5


def test_mnasnet_training_checkpoint_loads_into_torchvision(tmp_path: Path) -> None:
    """The model entry written back keeps _metadata: torchvision's own load_state_dict of
    mnasnet takes it as it is (without the versions it raises)."""
    import torchvision

    original = torchvision_model("mnasnet0_5")
    src = tmp_path / "train.pt"
    torch.save({"model": original.state_dict(), "epoch": 4}, src)
    out = tmp_path / "wide.pt"
    code, _, stderr = invoke("widen", src, "layers.6", "--by", "8", "--arch",
                             "torchvision.models:mnasnet0_5", "--input-shape", "1,3,64,64",
                             "-o", out)
    assert code == 0, stderr
    written = torch.load(out, weights_only=True)
    assert written["epoch"] == 4
    grown = torchvision.models.mnasnet0_5(weights=None)
    grown.layers[6] = nn.Conv2d(16, 16, 1, bias=False)
    grown.layers[7] = nn.BatchNorm2d(16)
    grown.layers[8][0].layers[0] = nn.Conv2d(16, 24, 1, bias=False)
    grown.load_state_dict(written["model"], strict=True)
    assert _max_rel(_outputs(original, X64), _outputs(grown, X64)) <= 1e-5


def test_googlenet_aux_heads_are_carried(tmp_path: Path) -> None:
    import torchvision
    from safetensors.torch import load_file

    original = torchvision_model("googlenet", aux_logits=True, init_weights=True)
    src = tmp_path / "googlenet.pt"
    torch.save(original.state_dict(), src)
    aux = {k: v for k, v in original.state_dict().items() if k.startswith("aux")}
    assert sum(v.numel() for k, v in aux.items() if "running" not in k
               and "num_batches" not in k) == 6_379_984
    out = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "conv1.conv", "--by", "8", "--arch",
                             "torchvision.models:googlenet", "--arch-kwargs",
                             '{"aux_logits": true, "init_weights": true}',
                             "--input-shape", "1,3,64,64", "-o", out)
    assert code == 0, stderr
    assert "8 layers under aux1, aux2 (6,379,984 parameters) are not used" in stderr
    written = load_file(out)
    assert written.keys() == original.state_dict().keys()
    # A fresh googlenet grown the same way takes every tensor (strict), aux heads included.
    grown = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    grown.conv1.conv = nn.Conv2d(3, 72, 7, stride=2, padding=3, bias=False)
    grown.conv1.bn = nn.BatchNorm2d(72, eps=0.001)
    grown.conv2.conv = nn.Conv2d(72, 64, 1, bias=False)
    grown.load_state_dict(written, strict=True)
    assert _max_rel(_outputs(original, X64), _outputs(grown, X64)) <= 1e-5
    feats = torch.randn(2, 512, 4, 4, generator=torch.Generator().manual_seed(2))
    assert torch.equal(_outputs(original.aux1, feats), _outputs(grown.aux1, feats))
    # The morphed file in again: the carried heads survive a second morph.
    deep = tmp_path / "deep.pt"
    code, _, stderr = invoke("deepen", out, "--after", "conv1.conv", "-o", deep)
    assert code == 0, stderr
    assert "aux1, aux2" in stderr
    tensors = torch.load(deep, weights_only=True)["tensors"]
    for k, v in aux.items():
        assert torch.equal(tensors[k], v), k


def test_carried_layer_cannot_be_morphed(tmp_path: Path) -> None:
    original = torchvision_model("googlenet", aux_logits=True, init_weights=True)
    src = tmp_path / "googlenet.pt"
    torch.save(original.state_dict(), src)
    code, _, stderr = invoke("widen", src, "aux1.fc1", "--by", "8", "--arch",
                             "torchvision.models:googlenet", "--arch-kwargs",
                             '{"aux_logits": true, "init_weights": true}',
                             "--input-shape", "1,3,64,64", "-o", tmp_path / "x.pt")
    assert code == 2
    assert_one_error_line(stderr, "aux1.fc1", "not used by the traced graph")
    assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------- training checkpoints

ARCH = ("--arch", "torchvision.models:resnet18", "--arch-kwargs", '{"num_classes": 10}',
        "--input-shape", "1,3,32,32")
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
WIDENED = ("layer1.0.conv1.weight", "layer1.0.bn1.weight", "layer1.0.bn1.bias",
           "layer1.0.conv2.weight")


def _trained(optimizer: str = "adam") -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    """A resnet18 after one training step, its optimizer (with state) and scheduler."""
    model = torchvision_model("resnet18", num_classes=10).train()
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3)
    model(X32).square().mean().backward()
    opt.step()
    sched.step()
    return model.eval(), opt, sched


def _param_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def _widened_resnet10() -> nn.Module:
    import torchvision

    m = torchvision.models.resnet18(weights=None, num_classes=10)
    m.layer1[0].conv1 = nn.Conv2d(64, 72, 3, padding=1, bias=False)
    m.layer1[0].bn1 = nn.BatchNorm2d(72)
    m.layer1[0].conv2 = nn.Conv2d(72, 64, 3, padding=1, bias=False)
    return m


def test_optimizer_state_follows_a_widen_and_is_refused_where_no_map_applies(
        tmp_path: Path) -> None:
    model, opt, sched = _trained("adam")
    src = tmp_path / "train.pt"
    user = {"note": "run 7", "best": 0.5, "history": [1.0, 0.7]}
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "epoch": 3, "step": 100, "user": user}
    torch.save(ckpt, src)
    out = tmp_path / "wide.pt"
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", out)
    assert code == 0, stderr
    written = torch.load(out, weights_only=True)
    assert set(written) == {*ckpt, "morphcli_architecture"}
    assert written["epoch"] == 3 and written["step"] == 100 and written["user"] == user
    assert written["scheduler"] == ckpt["scheduler"]
    # The optimizer: param_groups as they were; the 4 resized parameters' moments resized
    # (old units' state as it was, the 8 new units' state zero), every other one bit for bit.
    old, new = ckpt["optimizer"], written["optimizer"]
    assert new["param_groups"] == old["param_groups"]
    names = _param_names(model)
    resized = {names.index(n): n for n in WIDENED}
    assert set(new["state"]) == set(old["state"]) and len(resized) == 4
    for pid, state in new["state"].items():
        for k, v in state.items():
            was = old["state"][pid][k]
            if pid not in resized or v.dim() == 0:
                assert torch.equal(v, was), (pid, k)
                continue
            axis = 1 if resized[pid] == "layer1.0.conv2.weight" else 0
            assert v.shape[axis] == 72 and was.shape[axis] == 64, (pid, k)
            assert torch.equal(v.narrow(axis, 0, 64), was), (pid, k)
            assert not v.narrow(axis, 64, 8).any(), (pid, k)
    # The model entry loads (strict) into a fresh resnet18 grown the same way: same function.
    grown = _widened_resnet10()
    grown.load_state_dict(written["model"], strict=True)
    assert _max_rel(_outputs(model, X32), _outputs(grown, X32)) <= 1e-5
    # Training continues: an Adam over the grown model takes the state and steps.
    import morphcli

    again = morphcli.load(out)
    opt2 = torch.optim.Adam(again.parameters(), lr=1e-3)
    opt2.load_state_dict(written["optimizer"])
    again.train()(X32).square().mean().backward()
    opt2.step()
    assert all(torch.isfinite(p).all() for p in again.parameters())

    # A decomposing deepen gives layer1.0.conv1 new values that no channel map expresses:
    # its state cannot follow, refused naming it, then dropped on request.
    deep = tmp_path / "deep.pt"
    args = ("deepen", src, "--after", "layer1.0.conv1", "--init", "decompose", *ARCH, "-o", deep)
    code, _, stderr = invoke(*args)
    assert code == 2
    assert_one_error_line(stderr, "entry 'optimizer'", "exp_avg", "layer1.0.conv1.weight",
                          "--drop-optimizer-state")
    assert not deep.exists()
    code, _, stderr = invoke(*args, "--drop-optimizer-state")
    assert code == 0, stderr
    kept = torch.load(deep, weights_only=True)["optimizer"]
    assert len(kept["state"]) == len(old["state"]) - 1
    assert len([i for g in kept["param_groups"] for i in g["params"]]) == len(names) + 2

def test_deepen_keeps_every_optimizer_state_renumbered(tmp_path: Path) -> None:
    import morphcli

    model, opt, sched = _trained("sgd")
    src = tmp_path / "train.pt"
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 1}
    torch.save(ckpt, src)
    out = tmp_path / "deep.ckpt"
    code, _, stderr = invoke("deepen", src, "--after", "layer1.0.conv1", *ARCH, "-o", out)
    assert code == 0, stderr  # changes no parameter that has state: nothing to refuse
    written = torch.load(out, weights_only=True)
    assert written["epoch"] == 1 and set(written) == {*ckpt, "morphcli_architecture"}
    again = morphcli.load(out)
    assert len(written["optimizer"]["param_groups"][0]["params"]) == len(_param_names(again))
    opt2 = torch.optim.SGD(again.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(written["optimizer"])
    names, carried_over = _param_names(model), 0
    for name, p in again.named_parameters():
        state = opt2.state.get(p)
        if name.startswith("layer1.0.conv1_deep."):
            assert not state  # a new layer starts without momentum
            continue
        old = opt.state_dict()["state"][names.index(name)]["momentum_buffer"]
        assert torch.equal(state["momentum_buffer"], old), name
        carried_over += 1
    assert carried_over == len(names) == 62
    assert _max_rel(_outputs(model, X32), _outputs(again, X32)) <= 1e-5


def test_lightning_ckpt_keeps_its_prefix_and_entries(tmp_path: Path) -> None:
    model, opt, _ = _trained("sgd")
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["loss.weight"] = torch.ones(10)  # a buffer of the LightningModule outside the net
    ckpt = {"epoch": 2, "global_step": 50, "pytorch-lightning_version": "2.4.0",
            "state_dict": state, "loops": {"fit_loop": {"total": 3}}, "callbacks": {},
            "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
            "hparams_name": "kwargs", "hyper_parameters": {"lr": 0.1}}
    src = tmp_path / "epoch=2.ckpt"
    torch.save(ckpt, src)
    out = tmp_path / "swapped.ckpt"
    code, _, stderr = invoke("swap", src, "layer1.0.relu@1", "--to", "prelu", *ARCH, "-o", out)
    assert code == 0, stderr  # the .ckpt suffix is read, and written
    written = torch.load(out, weights_only=True)
    assert set(written) == {*ckpt, "morphcli_architecture"}
    for k in ckpt:
        if k not in ("state_dict", "optimizer_states"):
            assert written[k] == ckpt[k], k
    keys = set(written["state_dict"])
    assert keys - set(state) == {"model.layer1.0.relu_swap.weight"}  # the PReLU's slope
    assert set(state) <= keys and torch.equal(written["state_dict"]["loss.weight"],
                                              torch.ones(10))
    # Every original parameter keeps its momentum (the swap changes none of them).
    old = ckpt["optimizer_states"][0]
    new = written["optimizer_states"][0]
    assert len(new["state"]) == len(old["state"]) == 62
    assert len(new["param_groups"][0]["params"]) == 63  # the new slope joins the group


def test_key_names_the_model_entry(tmp_path: Path) -> None:
    model = torchvision_model("resnet18", num_classes=10)
    src = tmp_path / "two.pt"
    ckpt = {"model": model.state_dict(), "ema": copy.deepcopy(model).state_dict(), "epoch": 1}
    torch.save(ckpt, src)
    out = tmp_path / "wide.pt"
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", out)
    assert code == 2
    assert_one_error_line(stderr, "model, ema", "--key")
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", out,
                             "--key", "ema")
    assert code == 0, stderr
    written = torch.load(out, weights_only=True)
    assert written["ema"]["layer1.0.conv1.weight"].shape == (72, 64, 3, 3)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in written["model"].items())
    assert written["model"].keys() == ckpt["model"].keys()
    # A file that is no training checkpoint: --key is refused.
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    code, _, stderr = invoke("widen", plain, "layer1.0.conv1", "--by", "8", *ARCH,
                             "--key", "model", "-o", tmp_path / "x.pt")
    assert code == 2
    assert_one_error_line(stderr, "--key", "state_dict")
    # A model-only output says what it leaves out (and refuses nothing).
    st = tmp_path / "wide.safetensors"
    code, _, stderr = invoke("widen", src, "layer1.0.conv1", "--by", "8", *ARCH, "-o", st,
                             "--key", "model")
    assert code == 0, stderr
    assert "other entries (ema, epoch) are not written" in stderr
