"""A deep synthetic chain of conv-bn-relu blocks, for compile-time scaling."""

from __future__ import annotations

import torch
from torch import nn


class Chain(nn.Module):
    def __init__(self, blocks: int, channels: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(blocks):
            layers += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def chain(blocks: int) -> nn.Module:
    torch.manual_seed(0)
    model = Chain(blocks).eval()
    # Keep activations O(1) through thousands of layers.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.dirac_(m.weight)
                m.weight.add_(0.01 * torch.randn_like(m.weight))
    return model
