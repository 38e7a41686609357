"""Tiny models and factories the capture tests load through ``pkg.module:callable``
sources (``tests.capture.fixtures_models:build_small_cnn``) and pickles."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


class SmallCNN(nn.Module):
    """conv-bn-relu, pool, flatten, dropout, linear; expects 1x3x16x16."""

    example_input_shape = (1, 3, 16, 16)

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.flatten(self.pool(self.relu(self.bn(self.conv(x)))))))


class Conv1dNet(nn.Module):
    """conv1d-bn1d-relu6, adaptive pooling via mean, linear; expects 1x4x32."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 6, 5, stride=2, padding=2)
        self.bn = nn.BatchNorm1d(6)
        self.act = nn.ReLU6()
        self.conv2 = nn.Conv1d(6, 6, 3, groups=3, dilation=2)
        self.fc = nn.Linear(6, 3)
        self.head = nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.bn(self.conv(x))))
        return self.head(torch.sigmoid(self.fc(y.mean(-1))))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x) + self.b(y), F.relu(self.b(y))


class OptionalArg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = self.fc(x)
        return out if bias is None else out + bias


class SharedConv(nn.Module):
    """One conv called twice (shared weights), functional activations and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.conv(x)))
        y = F.hardtanh(self.conv(y), 0.0, 6.0)
        y = F.hardtanh(y, -1.0, 1.0)
        y = F.avg_pool2d(y, 2)
        return F.adaptive_avg_pool2d(torch.sigmoid(y), 1).flatten(1)


def _seeded(cls: type[nn.Module]) -> nn.Module:
    """``cls()`` with weights from seed 0, leaving the global RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _randomize_bn(cls())


def build_small_cnn() -> nn.Module:
    return _seeded(SmallCNN)


def build_conv1d() -> nn.Module:
    return _seeded(Conv1dNet)


def build_without_shape() -> nn.Module:
    return _seeded(TwoInputs)


def build_not_a_module() -> int:
    return 42


def build_raises() -> nn.Module:
    raise ValueError("no weights for this configuration")


#: a module-level model instance (a source may name it instead of a factory)
SMALL = build_small_cnn()
