"""Small real architectures, written here (no downloads), to exercise what breaks compilers.

Every model traces with ``torch.fx.symbolic_trace`` into a module-level graph: Conv2d,
BatchNorm2d, Linear, activations, pooling and Dropout are ``call_module`` nodes, while
residual adds, ``torch.cat``, ``chunk``, ``view``/``transpose`` and broadcast ``mul`` are
functional. Each BatchNorm (and LayerNorm) has non-trivial affine parameters and running statistics
(see ``_init``); all but ``densenet121``'s pre-activation ones follow a bias-free conv used once;
activations stay O(1) through the deep nets. Every model ends in ``AdaptiveAvgPool2d`` and
therefore also runs at small spatial sizes (e.g. 64x64); only ``digits_cnn`` is 8x8.

    >>> model = build("resnet18", seed=0)      # eval mode, deterministic for a seed
    >>> get("resnet18").input_shape
    (1, 3, 224, 224)
"""

from __future__ import annotations

__all__ = ["ZooEntry", "names", "get", "build"]

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: how to build it, its standard input shape and what it exercises."""

    name: str
    builder: Callable[[], nn.Module]  # builds with the current RNG
    input_shape: tuple[int, ...]  # standard input shape, batch 1
    num_classes: int
    doc: str  # one line: the patterns it has


# --------------------------------------------------------------------------- helpers


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv(bias=False) -> BatchNorm2d [-> activation module], 'same' padding."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _init(model: nn.Module, calibration_shape: tuple[int, ...] = (4, 3, 112, 112)) -> nn.Module:
    """Random init (current RNG) that keeps activations O(1) in eval mode.

    Kaiming (fan-in) convs, Linear with std 1/sqrt(fan-in), BatchNorm weight ~ U(0.5, 1.5)
    and bias ~ N(0, 0.1). Running statistics are then set from one train-mode pass over a
    random N(0, 1) batch (momentum 1), so they are non-trivial (means far from 0, variances
    far from 1) yet make eval-mode BatchNorm normalize: with purely random statistics the
    residual nets' activations grow by orders of magnitude.

    The BatchNorm ending a residual branch (``residual_bn()``) gets weight ~ U(0.1, 0.5), as
    residual branches of trained nets tend to (cf. torchvision's ``zero_init_residual``):
    with full-size branches the deep random nets are chaotic and amplify float32 rounding
    (ResNet-50: ~3e-5 of the output range vs float64; with small branches ~1e-6).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.normal_(m.bias, 0.0, 0.01)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 1.0 / math.sqrt(m.in_features))
                nn.init.normal_(m.bias, 0.0, 0.01)
            elif isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.1)
            bn.momentum = 1.0
        for m in model.modules():
            residual = m.residual_bn() if hasattr(m, "residual_bn") else None
            if residual is not None:
                residual.weight.uniform_(0.1, 0.5)
        model.train()(torch.randn(calibration_shape))
        for bn in bns:
            bn.momentum = 0.1
            bn.num_batches_tracked.zero_()
    return model.eval()


# --------------------------------------------------------------------------- ResNet / SE-ResNet


class SqueezeExcite(nn.Module):
    """Global avg pool -> 1x1 conv reduce -> ReLU -> 1x1 conv expand -> Sigmoid; returns the gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class BasicBlock(nn.Module):
    """3x3-3x3 residual block (optionally with squeeze-excite on the residual branch)."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 3, stride)
        self.conv2 = _conv_bn(width, cout, 3, act=None)
        self.se = SqueezeExcite(cout) if se else None
        self.downsample = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def residual_bn(self) -> nn.BatchNorm2d:
        return self.conv2[1]

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = out * self.se(out)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 residual block, stride on the 3x3 conv (torchvision v1.5)."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, se: bool = False) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = _conv_bn(cin, width, 1)
        self.conv2 = _conv_bn(width, width, 3, stride)
        self.conv3 = _conv_bn(width, cout, 1, act=None)
        self.se = SqueezeExcite(cout) if se else None
        self.downsample = _conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else None
        self.relu = nn.ReLU()

    def residual_bn(self) -> nn.BatchNorm2d:
        return self.conv3[1]

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.conv3(self.conv2(self.conv1(x)))
        if self.se is not None:
            out = out * self.se(out)
        return self.relu(torch.add(out, identity))


class ResNet(nn.Module):
    """torchvision-style ResNet: 7x7/2 stem, max pool, four stages, global pool, Linear."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], widths: tuple[int, ...] = (64, 128, 256, 512),
                 num_classes: int = 1000, se: bool = False) -> None:
        super().__init__()
        self.stem = _conv_bn(3, widths[0], 7, 2)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1, se=se))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.maxpool(self.stem(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> 3x3 depthwise (ReLU6) -> 1x1 linear projection [+ input]."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.ReLU6)]
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), _conv_bn(hidden, cout, 1, act=None)]
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def residual_bn(self) -> nn.BatchNorm2d | None:
        return self.conv[-1][1] if self.use_residual else None

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width 1.0 (torchvision layout)."""

    # expansion t, channels c, repeats n, stride s
    CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.ReLU6)]
        cin = 32
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- DenseNet


class DenseBlock(nn.Module):
    """Each layer (1x1 bottleneck, 3x3 conv) sees the concatenation of all earlier outputs."""

    def __init__(self, cin: int, n_layers: int, growth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(_conv_bn(cin + i * growth, 4 * growth, 1), _conv_bn(4 * growth, growth, 3)) for i in range(n_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class DenseNet(nn.Module):
    """Compact DenseNet-BC: growth 32, three dense blocks of 4 layers, 1x1-conv + avg-pool transitions.

    Layers are Conv-BN-ReLU (not pre-activation BN-ReLU-Conv) so that every BatchNorm folds.
    """

    def __init__(self, growth: int = 32, blocks: tuple[int, ...] = (4, 4, 4), num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)]
        c = 64
        for i, n in enumerate(blocks):
            layers.append(DenseBlock(c, n, growth))
            c += n * growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution
                layers += [_conv_bn(c, c // 2, 1), nn.AvgPool2d(2, 2)]
                c //= 2
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channel groups: view -> transpose -> contiguous -> view, sizes from x.size()."""
    n, c, h, w = x.size()
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels, transform one half. Stride 2: two branches over the whole input."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        half = cout // 2
        self.branch1 = (
            nn.Sequential(_conv_bn(cin, cin, 3, stride, groups=cin, act=None), _conv_bn(cin, half, 1)) if stride > 1 else None
        )
        self.branch2 = nn.Sequential(
            _conv_bn(cin if stride > 1 else half, half, 1),
            _conv_bn(half, half, 3, stride, groups=half, act=None),
            _conv_bn(half, half, 1),
        )

    def residual_bn(self) -> nn.BatchNorm2d | None:
        """Stride 1 passes half the channels through unchanged, like a residual connection."""
        return self.branch2[-1][1] if self.branch1 is None else None

    def forward(self, x: Tensor) -> Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 x1.0: stages of (4, 8, 4) units, widths 24-116-232-464-1024."""

    def __init__(self, repeats: tuple[int, ...] = (4, 8, 4), widths: tuple[int, ...] = (24, 116, 232, 464, 1024),
                 num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, widths[0], 3, 2), nn.MaxPool2d(3, 2, 1)]
        cin = widths[0]
        for n, cout in zip(repeats, widths[1:-1]):
            layers += [ShuffleUnit(cin if i == 0 else cout, cout, 2 if i == 0 else 1) for i in range(n)]
            cin = cout
        layers.append(_conv_bn(cin, widths[-1], 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- Inception


class InceptionBlock(nn.Module):
    """Four branches concatenated: 1x1 | 1x1->3x3 | 1x1->5x5 (or ->3x3->3x3) | maxpool->1x1."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cpool: int, double3x3: bool = False) -> None:
        super().__init__()
        self.branch1 = _conv_bn(cin, c1, 1)
        self.branch3 = nn.Sequential(_conv_bn(cin, c3r, 1), _conv_bn(c3r, c3, 3))
        wide = [_conv_bn(c5r, c5, 3), _conv_bn(c5, c5, 3)] if double3x3 else [_conv_bn(c5r, c5, 5)]
        self.branch5 = nn.Sequential(_conv_bn(cin, c5r, 1), *wide)
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv_bn(cin, cpool, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class Inception(nn.Module):
    """GoogLeNet-style: stem, inception 3a/3b (5x5), max pool, 4a/4b (double 3x3), dropout + Linear."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1), _conv_bn(64, 64, 1), _conv_bn(64, 192, 3), nn.MaxPool2d(3, 2, 1)
        )
        self.inception3a = InceptionBlock(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = InceptionBlock(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, 2, 1)
        self.inception4a = InceptionBlock(480, 192, 96, 208, 16, 48, 64, double3x3=True)
        self.inception4b = InceptionBlock(512, 160, 112, 224, 24, 64, 64, double3x3=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.4)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inception3b(self.inception3a(self.stem(x)))
        x = self.inception4b(self.inception4a(self.maxpool3(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


# --------------------------------------------------------------------------- stochastic depth (torchvision's way)


def stochastic_depth(x: Tensor, p: float, mode: str, training: bool = True) -> Tensor:
    """Drop whole residual branches with probability ``p`` in training; the identity in eval mode.

    Written as ``torchvision.ops.stochastic_depth`` is, including ``torch.fx.wrap``: the
    capture therefore sees a leaf ``call_function`` (which it removes in eval mode).
    """
    if not training or p == 0.0:
        return x
    size = [x.shape[0]] + [1] * (x.ndim - 1) if mode == "row" else [1] * x.ndim
    noise = torch.empty(size, dtype=x.dtype, device=x.device).bernoulli_(1.0 - p)
    return x * noise.div_(1.0 - p)


torch.fx.wrap("stochastic_depth")


class StochasticDepth(nn.Module):
    def __init__(self, p: float, mode: str = "row") -> None:
        super().__init__()
        self.p, self.mode = p, mode

    def forward(self, x: Tensor) -> Tensor:
        return stochastic_depth(x, self.p, self.mode, self.training)


# --------------------------------------------------------------------------- EfficientNet


class MBConv(nn.Module):
    """1x1 expand (SiLU) -> kxk depthwise (SiLU) -> squeeze-excite (SiLU, sigmoid gate) -> 1x1 project [+ input]."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop: float) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, act=nn.SiLU)]
        layers += [_conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU)]
        self.conv = nn.Sequential(*layers)
        squeeze = max(1, cin // 4)
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(hidden, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, hidden, 1),
                                nn.Sigmoid())
        self.project = _conv_bn(hidden, cout, 1, act=None)
        self.use_residual = stride == 1 and cin == cout
        self.drop = StochasticDepth(drop)

    def residual_bn(self) -> nn.BatchNorm2d | None:
        return self.project[1] if self.use_residual else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        out = self.project(out * self.se(out))
        return x + self.drop(out) if self.use_residual else out


class EfficientNet(nn.Module):
    """EfficientNet-B0 (torchvision layout): MBConv stages, stochastic depth rising to 0.2, dropout + Linear."""

    # expansion, channels, repeats, stride, kernel
    CONFIG = [(1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5), (6, 192, 4, 2, 5),
              (6, 320, 1, 1, 3)]

    def __init__(self, num_classes: int = 1000, drop_path: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2, act=nn.SiLU)]
        total, cin, i = sum(n for _, _, n, _, _ in self.CONFIG), 32, 0
        for t, c, n, s, k in self.CONFIG:
            for j in range(n):
                layers.append(MBConv(cin, c, k, s if j == 0 else 1, t, drop_path * i / total))
                cin, i = c, i + 1
        layers.append(_conv_bn(cin, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --------------------------------------------------------------------------- ConvNeXt


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, through channels-last (permute, LayerNorm, permute back)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """dw 7x7 -> permute to NHWC -> LayerNorm -> Linear(4C) -> GELU -> Linear(C) -> permute back -> layer scale
    -> stochastic depth -> + input (torchvision's CNBlock)."""

    def __init__(self, dim: int, drop: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.layer_scale = nn.Parameter(torch.empty(dim, 1, 1).uniform_(0.1, 0.5))
        self.drop = StochasticDepth(drop)

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        out = self.fc2(self.act(self.fc1(out))).permute(0, 3, 1, 2)
        return x + self.drop(self.layer_scale * out)


class ConvNeXt(nn.Module):
    """Compact ConvNeXt: 4x4/4 patchify stem + LayerNorm2d, stages of CNBlocks, LayerNorm2d + 2x2/2 conv downsampling."""

    def __init__(self, depths: tuple[int, ...] = (1, 1, 2, 1), dims: tuple[int, ...] = (32, 64, 128, 256), num_classes: int = 1000,
                 drop_path: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6)]
        total, i = sum(depths), 0
        for s, (depth, dim) in enumerate(zip(depths, dims)):
            if s > 0:
                layers += [LayerNorm2d(dims[s - 1], eps=1e-6), nn.Conv2d(dims[s - 1], dim, 2, 2)]
            for _ in range(depth):
                layers.append(ConvNeXtBlock(dim, drop_path * i / total))
                i += 1
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.avgpool(self.features(x)))


# --------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    """1x1 squeeze (ReLU) -> concat of 1x1 and 3x3 expands (ReLU); convs with bias, no BatchNorm."""

    def __init__(self, cin: int, squeeze: int, expand: int) -> None:
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.expand1x1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.expand3x3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        x = self.squeeze(x)
        return torch.cat([self.expand1x1(x), self.expand3x3(x)], 1)


class SqueezeNet(nn.Module):
    """SqueezeNet 1.1: fire modules, ceil-mode max pools, dropout + 1x1-conv classifier (ReLU) + global pool."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(), pool(), Fire(64, 16, 64), Fire(128, 16, 64), pool(), Fire(128, 32, 128),
            Fire(256, 32, 128), pool(), Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# --------------------------------------------------------------------------- DenseNet-121 (pre-activation)


class PreActDenseLayer(nn.Module):
    """torchvision's _DenseLayer: BN-ReLU-conv1x1 (4k) - BN-ReLU-conv3x3 (k) over the concatenated inputs.

    The first BatchNorm reads a ``torch.cat`` and so cannot be folded into a conv.
    """

    def __init__(self, cin: int, growth: int) -> None:
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU()
        self.conv1 = nn.Conv2d(cin, 4 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(4 * growth), nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, features: list[Tensor]) -> Tensor:
        out = self.conv1(self.relu1(self.norm1(torch.cat(features, 1))))
        return self.conv2(self.relu2(self.norm2(out)))


class PreActDenseNet(nn.Module):
    """DenseNet-121 (torchvision layout): growth 32, blocks (6, 12, 24, 16), BN-ReLU-conv1x1-avgpool transitions,
    final BN-ReLU."""

    def __init__(self, growth: int = 32, blocks: tuple[int, ...] = (6, 12, 24, 16), num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1))
        self.blocks, self.transitions = nn.ModuleList(), nn.ModuleList()
        c = 64
        for i, n in enumerate(blocks):
            self.blocks.append(nn.ModuleList(PreActDenseLayer(c + j * growth, growth) for j in range(n)))
            c += n * growth
            if i < len(blocks) - 1:
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False),
                                                      nn.AvgPool2d(2, 2)))
                c //= 2
        self.norm, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            features = [x]
            for layer in block:
                features.append(layer(features))
            x = torch.cat(features, 1)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.fc(torch.flatten(self.avgpool(self.relu(self.norm(x))), 1))


# --------------------------------------------------------------------------- digits CNN


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers and a Linear, for scikit-learn's 8x8 digits."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(1, 16, 3), _conv_bn(16, 32, 3), nn.MaxPool2d(2), _conv_bn(32, 64, 3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- registry

_IMAGENET = (1, 3, 224, 224)
_SMALL = (4, 3, 64, 64)  # calibration batch of _init for the newer, deeper families (faster to build)
_ENTRIES = [
    ZooEntry("resnet18", lambda: _init(ResNet(BasicBlock, [2, 2, 2, 2])), _IMAGENET, 1000,
             "ResNet-18: BasicBlock residual adds, strided 1x1 downsample convs, max pool"),
    ZooEntry("resnet50", lambda: _init(ResNet(Bottleneck, [3, 4, 6, 3])), _IMAGENET, 1000,
             "ResNet-50 v1.5: Bottleneck residuals (torch.add), stride on the 3x3 conv"),
    ZooEntry("mobilenet_v2", lambda: _init(MobileNetV2()), _IMAGENET, 1000,
             "MobileNetV2 1.0: inverted residuals, depthwise convs, ReLU6, linear bottlenecks, dropout"),
    ZooEntry("densenet", lambda: _init(DenseNet()), _IMAGENET, 1000,
             "compact DenseNet-BC (growth 32, 3x4 layers): n-ary torch.cat, 1x1-conv + avg-pool transitions"),
    ZooEntry("shufflenet_v2", lambda: _init(ShuffleNetV2()), _IMAGENET, 1000,
             "ShuffleNetV2 x1.0: chunk split, channel shuffle (size/view/transpose/contiguous), depthwise"),
    ZooEntry("se_resnet", lambda: _init(ResNet(BasicBlock, [1, 1, 1, 1], (32, 64, 128, 256), se=True)), _IMAGENET, 1000,
             "small SE-ResNet: squeeze-excite (pool, 1x1 convs, Sigmoid) broadcast mul, residual adds"),
    ZooEntry("inception", lambda: _init(Inception()), _IMAGENET, 1000,
             "GoogLeNet-style: 4-branch blocks (1x1, 3x3, 5x5 / double 3x3, pool) joined by torch.cat"),
    ZooEntry("efficientnet_b0", lambda: _init(EfficientNet()), _IMAGENET, 1000,
             "EfficientNet-B0: MBConv with SiLU, squeeze-excite (sigmoid gate), stochastic depth (torch.fx.wrap leaf)"),
    ZooEntry("convnext", lambda: _init(ConvNeXt(), _SMALL), _IMAGENET, 1000,
             "compact ConvNeXt: dw 7x7, permute + channels-last LayerNorm + Linear MLP, GELU, layer scale, stochastic depth"),
    ZooEntry("squeezenet", lambda: _init(SqueezeNet(), _SMALL), _IMAGENET, 1000,
             "SqueezeNet 1.1: fire modules (cat of 1x1 and 3x3 expands), biased convs without BatchNorm, conv classifier"),
    ZooEntry("densenet121", lambda: _init(PreActDenseNet(), _SMALL), _IMAGENET, 1000,
             "DenseNet-121: pre-activation BN-ReLU-conv layers over torch.cat (unfoldable BatchNorm), transitions"),
    ZooEntry("digits_cnn", lambda: _init(DigitsCNN(), (8, 1, 8, 8)), (1, 1, 8, 8), 10,
             "small CNN for 8x8 digits: conv-BN-ReLU x3, max pool, nn.Flatten, Linear"),
]
_ZOO: dict[str, ZooEntry] = {e.name: e for e in _ENTRIES}


def names() -> list[str]:
    """The zoo's model names, sorted."""
    return sorted(_ZOO)


def get(name: str) -> ZooEntry:
    """The entry for ``name``; ``KeyError`` listing the choices for an unknown name."""
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown zoo model {name!r}; choose from: {', '.join(names())}") from None


def build(name: str, seed: int = 0) -> nn.Module:
    """Build ``name`` with weights drawn from ``torch.manual_seed(seed)``, in eval mode.

    The global RNG state is saved and restored, so building does not disturb callers.
    """
    entry = get(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.builder()
    return model.eval()
