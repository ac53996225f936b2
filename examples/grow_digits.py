"""Grow a network in the middle of training, on real data (scikit-learn's bundled digits).

A small CNN is trained with Adam; a third of the way in, ``conv2`` is widened x2; two thirds of
the way in, an identity layer is inserted after ``conv2``. Both morphs go through morphcli's
Python API with the optimizer carried over, and training continues. Beside it, the grown
architecture is trained from scratch for the same total number of steps, on the same batches,
with the same optimizer settings. Test accuracy is printed right before and right after each
morph (equal: the morphs keep the function) and plotted against the training step.

    pip install -e '.[examples]' && python examples/grow_digits.py

Options: ``--steps N`` (total training steps, default 600), ``--quick`` (60 steps),
``--plot PATH`` (default docs/grow_digits.png).
"""

from __future__ import annotations

import argparse
import copy
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

import morphcli

INPUT = [(1, 1, 8, 8)]
BATCH = 32
LR = 3e-3
DIGITS = 4  # accuracies are printed, and compared across a morph, to this many digits


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.act2(self.conv2(self.act1(self.conv1(x)))))))


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Run:
    name: str
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)

    def record(self, step: int, acc: float) -> None:
        self.steps.append(step)
        self.accuracy.append(acc)


def load_data() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()  # bundled with scikit-learn: no download
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(x, digits.target, test_size=0.25,
                                              random_state=0, stratify=digits.target)
    return Data(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(),
                torch.from_numpy(x_te), torch.from_numpy(y_te).long())


def batches(data: Data, steps: int, seed: int) -> list[torch.Tensor]:
    """The same index batches for both runs: shuffled epochs, drawn from one seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    n = len(data.y_train)
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen)
        out += [perm[i:i + BATCH] for i in range(0, n - BATCH + 1, BATCH)]
    return out[:steps]


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def accuracy(model: nn.Module, data: Data) -> float:
    return float((logits(model, data.x_test).argmax(1) == data.y_test).float().mean())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, data: Data,
               idx: torch.Tensor) -> None:
    model.train()
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
    loss.backward()
    opt.step()


def grow(kind: str, model: nn.Module, opt: torch.optim.Optimizer, **kwargs):
    """morphcli.widen / morphcli.deepen with the optimizer carried over."""
    morph = getattr(morphcli, kind)
    return morph(model, optimizer=opt, input_shapes=INPUT, **kwargs)


def morph_point(kind: str, label: str, model: nn.Module, opt: torch.optim.Optimizer,
                data: Data, step: int, **kwargs):
    before = accuracy(model, data)
    old_logits = logits(model, data.x_test)
    print(f"step {step:4d}  before {label}: test accuracy {before:.{DIGITS}f}")
    new, new_opt, result = grow(kind, model, opt, **kwargs)
    after = accuracy(new, data)
    diff = float((logits(new, data.x_test) - old_logits).abs().max())
    print(f"step {step:4d}  after  {label}: test accuracy {after:.{DIGITS}f}  "
          f"(max abs logit difference on the test set {diff:.3g}; morphcli's check "
          f"{result.check.max_abs:.3g}, equivalent={result.check.equivalent})")
    assert f"{before:.{DIGITS}f}" == f"{after:.{DIGITS}f}", (before, after)
    assert result.check.equivalent
    return new, new_opt


def from_scratch(grown: nn.Module, seed: int) -> nn.Module:
    """The grown architecture with fresh default initialisation."""
    torch.manual_seed(seed)
    model = copy.deepcopy(grown)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.reset_parameters()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="total training steps")
    parser.add_argument("--quick", action="store_true", help="60 steps (a smoke test)")
    parser.add_argument("--plot", type=Path, default=Path("docs/grow_digits.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = 60 if args.quick else args.steps
    if steps < 6:
        parser.error("--steps must be at least 6")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(1)  # the same numbers on every machine, and fastest at this size

    data = load_data()
    order = batches(data, steps, args.seed)
    widen_at, deepen_at = steps // 3, 2 * steps // 3
    every = max(1, steps // 60)

    # Grown run: small, widened, deepened.
    model: nn.Module = SmallCNN()
    opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    grown = Run("grown (small, widen conv2 x2, deepen after conv2)")
    grown.record(0, accuracy(model, data))
    for step, idx in enumerate(order, 1):
        if step - 1 == widen_at:
            model, opt = morph_point("widen", "widen conv2 x2", model, opt, data, step - 1,
                                     layer="conv2", factor=2)
        if step - 1 == deepen_at:
            model, opt = morph_point("deepen", "deepen after conv2", model, opt, data,
                                     step - 1, after="conv2")
        train_step(model, opt, data, idx)
        if step % every == 0 or step == steps:
            grown.record(step, accuracy(model, data))

    # Scratch run: the grown architecture, same steps, batches and optimizer settings.
    big = from_scratch(model, args.seed)
    big_opt = torch.optim.Adam(big.parameters(), lr=LR)
    scratch = Run("grown architecture from scratch")
    scratch.record(0, accuracy(big, data))
    for step, idx in enumerate(order, 1):
        train_step(big, big_opt, data, idx)
        if step % every == 0 or step == steps:
            scratch.record(step, accuracy(big, data))

    params = (sum(p.numel() for p in SmallCNN().parameters()),
              sum(p.numel() for p in model.parameters()))
    print(f"parameters: small {params[0]:,}, grown {params[1]:,}")
    print(f"final test accuracy after {steps} steps: grown {grown.accuracy[-1]:.{DIGITS}f}, "
          f"from scratch {scratch.accuracy[-1]:.{DIGITS}f}")
    plot(args.plot, [grown, scratch], {"widen conv2 x2": widen_at,
                                       "deepen after conv2": deepen_at})
    print(f"wrote {args.plot}")


def plot(path: Path, runs: list[Run], morphs: dict[str, int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run in runs:
        ax.plot(run.steps, run.accuracy, label=run.name)
    for i, (label, step) in enumerate(morphs.items()):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1)
        ax.annotate(label, (step, 0.45 - 0.08 * i), xytext=(4, 0), textcoords="offset points",
                    fontsize=8, color="dimgrey")
    ax.set_xlabel("training step (batch of 32)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("digits (scikit-learn): grown during training vs trained from scratch")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed metadata: the same run writes the same bytes.
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)


if __name__ == "__main__":
    main()
