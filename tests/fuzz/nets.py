"""Random conv nets for property tests: hypothesis draws them from the op families capture
supports (plain, grouped and depthwise conv, BatchNorm with random eval statistics,
activations, max/avg pooling, residual add, concat, dense concat, channel split + shuffle,
slicing, squeeze-excite, linear/conv heads) at tiny sizes. Shared by the prune-channels
exactness test and the differential fuzz harness (tests/fuzz/test_differential.py).
``LAYOUT_KINDS`` adds channels-last blocks (ConvNeXt: permute, LayerNorm, Linear MLP, layer
scale; MLP-mixer: token-mixing Linear over the pixels, channel-mixing Linear) for the passes
that follow channels through layout changes.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn

from tests.conftest import randomize_bn


def _unit(cin: int, cout: int, k: int, groups: int, bn: bool, act: type[nn.Module] | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int, hidden: int, out: int, bn: bool, act):
        super().__init__()
        self.body = nn.Sequential(_unit(c, hidden, 3, 1, bn, act), _unit(hidden, out, 3, 1, bn, None))
        self.short = _unit(c, out, 1, 1, bn, None) if out != c else None
        self.act = act()

    def forward(self, x):
        return self.act(self.body(x) + (x if self.short is None else self.short(x)))


class Concat(nn.Module):
    def __init__(self, c: int, a: int, b: int, dense: bool, bn: bool, act):
        super().__init__()
        self.dense = dense
        self.a = None if dense else _unit(c, a, 1, 1, bn, act)
        self.b = _unit(c, b, 3, 1, bn, act)

    def forward(self, x):
        return torch.cat([x if self.dense else self.a(x), self.b(x)], 1)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, hidden: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(self.pool(x)))))


class SplitShuffle(nn.Module):
    def __init__(self, c: int, bn: bool, act):
        super().__init__()
        self.branch = nn.Sequential(_unit(c // 2, c // 2, 1, 1, bn, act), _unit(c // 2, c // 2, 3, c // 2, bn, None))

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), dim=1)
        n, c, h, w = out.size()
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


class SliceCat(nn.Module):
    def __init__(self, c: int, a: int, bn: bool, act):
        super().__init__()
        self.a = a
        self.f = _unit(c - a, c - a, 3, 1, bn, act)

    def forward(self, x):
        return torch.cat([x[:, : self.a], self.f(x[:, self.a :])], 1)


def _random_affine(norm: nn.LayerNorm) -> nn.LayerNorm:
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
        norm.bias.normal_(0.0, 0.1)
    return norm


class ConvNeXtBlock(nn.Module):
    """dwconv 7x7 -> permute to NHWC -> LayerNorm(C) -> Linear(C, 4C) -> GELU -> Linear(4C, C)
    -> * layer scale gamma (C,) -> permute back -> + x."""

    def __init__(self, c: int, expand: int = 4, kernel: int = 7):
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, kernel, padding=kernel // 2, groups=c)
        self.norm = _random_affine(nn.LayerNorm(c))
        self.pwconv1 = nn.Linear(c, expand * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(expand * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class MixerBlock(nn.Module):
    """An MLP-mixer block on [N, tokens, C]: token mixing (a Linear over the tokens, on the
    transposed tensor) then channel mixing (a Linear over C), each after a LayerNorm(C)."""

    def __init__(self, tokens: int, c: int, token_hidden: int, channel_hidden: int, token_bias: bool = True):
        super().__init__()
        self.norm1 = _random_affine(nn.LayerNorm(c))
        self.token1 = nn.Linear(tokens, token_hidden, bias=token_bias)
        self.token2 = nn.Linear(token_hidden, tokens, bias=token_bias)
        self.norm2 = _random_affine(nn.LayerNorm(c))
        self.channel1, self.channel2 = nn.Linear(c, channel_hidden), nn.Linear(channel_hidden, c)
        self.act = nn.GELU()

    def forward(self, x):
        x = x + self.token2(self.act(self.token1(self.norm1(x).transpose(1, 2)))).transpose(1, 2)
        return x + self.channel2(self.act(self.channel1(self.norm2(x))))


class PixelMixer(nn.Module):
    """A feature map's pixels as tokens: NCHW -> [N, HW, C] -> mixer block -> back to NCHW.

    The token mixing has no bias here: token mixing runs per channel, so with a bias a zeroed
    channel's row would become non-zero and reach the next layer, which the zero-channel
    exactness oracle cannot tell from a pruning error (the prune tests' mixer model keeps the
    bias: there a LayerNorm with the channel's affine zeroed follows every block)."""

    def __init__(self, c: int, size: int, hidden: int):
        super().__init__()
        self.size = size
        self.block = MixerBlock(size * size, c, hidden, 2 * c, token_bias=False)

    def forward(self, x):
        t = self.block(x.flatten(2).transpose(1, 2))
        return t.transpose(1, 2).reshape(x.shape[0], -1, self.size, self.size)


class FlattenHead(nn.Module):
    def __init__(self, features: int, hidden: int | None, bn: bool):
        super().__init__()
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Linear(features, hidden)] + ([nn.BatchNorm1d(hidden)] if bn else []) + [nn.ReLU()]
        layers.append(nn.Linear(hidden or features, 5))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x):
        return self.mlp(torch.flatten(x, 1))


KINDS = ["conv", "grouped", "depthwise", "residual", "concat", "dense", "se", "shuffle", "slice", "pool"]
LAYOUT_KINDS = [*KINDS, "convnext", "mixer"]
#: activations every pass handles; the differential fuzz adds ones that stay fp32 islands in int8
ACTS = [nn.ReLU, nn.ReLU6, nn.Hardswish]
MORE_ACTS = [*ACTS, nn.Sigmoid, nn.SiLU, nn.LeakyReLU, nn.Tanh]


def draw_net(data, *, batch: int = 2, acts: list[type[nn.Module]] = ACTS, max_layers: int = 5,
             kinds: list[str] = KINDS) -> tuple[nn.Module, tuple[int, ...]]:
    """A random conv net (eval mode, BatchNorm with random running statistics) and its input shape."""
    draw = data.draw
    cin, size = draw(st.sampled_from([1, 3])), draw(st.sampled_from([8, 12, 16]))
    shape = (batch, cin, size, size)
    bn = draw(st.booleans())
    act = draw(st.sampled_from(acts))
    width = st.sampled_from([4, 6, 8])
    c = draw(width)
    layers: list[nn.Module] = [_unit(cin, c, 3, 1, bn, act)]
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=max_layers)):
        if kind == "grouped" and c % 2 == 0:
            out = draw(width)
            layers.append(_unit(c, out, 3, 2, bn, act))
            c = out
        elif kind == "depthwise":
            m = draw(st.sampled_from([1, 2]))
            layers.append(_unit(c, c * m, 3, c, bn, act))
            c *= m
        elif kind == "residual":
            out = draw(st.sampled_from([c, draw(width)]))
            layers.append(Residual(c, draw(width), out, bn, act))
            c = out
        elif kind in ("concat", "dense"):
            a, b = draw(width), draw(width)
            layers.append(Concat(c, a, b, kind == "dense", bn, act))
            c = (c if kind == "dense" else a) + b
        elif kind == "se":
            layers.append(SqueezeExcite(c, draw(st.sampled_from([2, 4]))))
        elif kind == "shuffle" and c % 2 == 0:
            layers.append(SplitShuffle(c, bn, act))
        elif kind == "slice" and c >= 3:
            layers.append(SliceCat(c, draw(st.integers(1, c - 2)), bn, act))
        elif kind == "convnext":
            layers.append(ConvNeXtBlock(c, draw(st.sampled_from([2, 4])), draw(st.sampled_from([3, 7]))))
        elif kind == "mixer":
            layers.append(PixelMixer(c, size, draw(st.sampled_from([4, 8]))))
        elif kind in ("pool", "avgpool") and size >= 8:
            layers.append(nn.MaxPool2d(2) if kind == "pool" else nn.AvgPool2d(2))
            size //= 2
        else:
            out = draw(width)
            layers.append(_unit(c, out, draw(st.sampled_from([1, 3])), 1, bn, act))
            c = out
    head = draw(st.sampled_from(["gap", "flatten", "mlp", "conv"]))
    if head == "gap":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5)]
    elif head in ("flatten", "mlp"):
        layers.append(FlattenHead(c * size * size, draw(st.sampled_from([6, 8])) if head == "mlp" else None, bn))
    else:
        layers.append(nn.Conv2d(c, 5, 1))
    model = nn.Sequential(*layers)
    randomize_bn(model, seed=draw(st.integers(0, 100)))
    return model.eval(), shape
