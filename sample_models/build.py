"""Rebuild the sample checkpoints byte for byte: ``python sample_models/build.py``.

Each model is seeded, gets non-trivial BatchNorm statistics (so morphs that must respect them
are tested for real), and is written as a morphcli archive (.pt).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import morphcli

HERE = Path(__file__).resolve().parent


class CNN(nn.Module):
    """conv1..conv4 with BatchNorm and one shared ReLU module, pooling, flatten, fc1, fc2.
    Input (1, 3, 32, 32)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv4, self.bn4 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.pool(self.relu(self.bn4(self.conv4(x))))
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class MLP(nn.Module):
    """fc1..fc3 with ReLU. Input (1, 20)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 64)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(64, 64)
        self.act2 = nn.ReLU()
        self.fc3 = nn.Linear(64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class SmallResNet(nn.Module):
    """A residual add, a channel concat and a depthwise conv. Input (1, 3, 16, 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        self.block_conv1 = nn.Conv2d(16, 16, 3, padding=1)
        self.block_bn1 = nn.BatchNorm2d(16)
        self.block_conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.block_bn2 = nn.BatchNorm2d(16)
        self.branch_a = nn.Conv2d(16, 8, 1)
        self.branch_b = nn.Conv2d(16, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pointwise = nn.Conv2d(16, 32, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        y = self.relu(self.block_bn1(self.block_conv1(x)))
        x = self.relu(x + self.block_bn2(self.block_conv2(y)))
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        x = self.relu(self.pointwise(self.depthwise(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


SAMPLES = {
    "cnn.pt": (CNN, (1, 3, 32, 32)),
    "mlp.pt": (MLP, (1, 20)),
    "resnet.pt": (SmallResNet, (1, 3, 16, 16)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    cls, _ = SAMPLES[name]
    torch.manual_seed(seed)
    model = cls()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # trained-looking statistics, not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def main() -> None:
    for name, (_, shape) in SAMPLES.items():
        morphcli.save(build(name), HERE / name, input_shapes=[shape])
        print(f"wrote {HERE / name} (input {','.join(map(str, shape))})")


if __name__ == "__main__":
    main()
