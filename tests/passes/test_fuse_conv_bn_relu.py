"""fuse-conv-bn-relu: structure (what is folded, what is left and why) and numerics."""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.nn.functional as F
from torch import nn

from graphopt import zoo
from graphopt.capture import capture
from graphopt.passes.fuse_conv_bn_relu import fuse_conv_bn_relu
from graphopt.testing import assert_equivalent
from graphopt.verify import compare
from tests.conftest import program_of, randomize_bn

SMALL = {"digits_cnn": (2, 1, 8, 8)}


def _bns(program):
    return [m for m in program.graph_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("name", [n for n in zoo.names() if n not in ("convnext", "squeezenet", "densenet121")])
def test_every_zoo_model_folds_all_batchnorm_exactly(name):  # convnext/squeezenet have none; densenet121: test below
    shape = SMALL.get(name, (2, 3, 64, 64))
    program = capture(f"zoo:{name}", input_shapes=[shape])
    original = program.clone()
    assert _bns(program), "zoo models are meant to have BatchNorm"
    result = fuse_conv_bn_relu(program)
    program.recompile()
    assert result.changed and result.data["folded"] > 0
    assert _bns(program) == [], result.detail
    relus = [m for m in original.graph_module.modules() if type(m) is nn.ReLU]
    fused = [m for m in program.graph_module.modules() if isinstance(m, (nni.ConvReLU2d, nni.LinearReLU))]
    # Only ReLU is absorbed (ReLU6 has no fused kernel); MobileNetV2 uses ReLU6 only.
    assert bool(fused) == bool(relus), "conv-bn-relu chains should become fused modules"
    g = torch.Generator().manual_seed(1)
    inputs = [(torch.randn(shape, generator=g),) for _ in range(2)]
    comparison = assert_equivalent(original.run, program.run, inputs, max_rel_err=1e-5)
    assert comparison.metrics.max_rel_err <= 1e-5


def test_densenet121_folds_post_conv_batchnorm_and_keeps_preactivation_ones():
    program = capture("zoo:densenet121", input_shapes=[(1, 3, 48, 48)])
    original = program.clone()
    result = fuse_conv_bn_relu(program)
    program.recompile()
    assert result.data["folded"] == 58 + 1  # each dense layer's second BN, and the stem's
    assert len(_bns(program)) == 58 + 3 + 1  # pre-activation: after a torch.cat, no conv to fold into
    inputs = [(torch.randn(1, 3, 48, 48, generator=torch.Generator().manual_seed(1)),)]
    assert assert_equivalent(original.run, program.run, inputs, max_rel_err=1e-5).metrics.max_rel_err <= 1e-5


class ConvBn(nn.Module):
    def __init__(self, bias=True, dims=2, relu="module"):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        self.conv = conv(3, 8, 3, padding=1, bias=bias)
        self.bn = bn(8)
        self.relu = nn.ReLU()
        self.mode = relu

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.mode == "module":
            return self.relu(y)
        if self.mode == "function":
            return F.relu(y)
        if self.mode == "method":
            return y.relu()
        return y


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("relu", ["module", "function", "method", "none"])
def test_conv_variants(bias, dims, relu):
    model = randomize_bn(ConvBn(bias, dims, relu))
    shape = (2, 3, 10, 10) if dims == 2 else (2, 3, 16)
    program = program_of(model, shape)
    result = fuse_conv_bn_relu(program)
    program.recompile()
    assert result.data["folded"] == 1
    assert result.data["relu_absorbed"] == (0 if relu == "none" else 1)
    modules = [type(m) for m in program.graph_module.modules()]
    assert not any(issubclass(t, nn.modules.batchnorm._BatchNorm) for t in modules)
    if relu != "none":
        assert (nni.ConvReLU2d if dims == 2 else nni.ConvReLU1d) in modules
        assert not any(n.op in ("call_function", "call_method") for n in program.graph.nodes)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    assert_equivalent(model, program.run, x, max_rel_err=1e-5)


def test_linear_bn1d_relu():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5, bias=False), nn.BatchNorm1d(5), nn.ReLU()).eval())
    program = program_of(model, (4, 6))
    result = fuse_conv_bn_relu(program)
    program.recompile()
    assert result.data == {"folded": 1, "relu_absorbed": 1, "left": []}
    assert isinstance(program.graph_module.get_submodule("0"), nni.LinearReLU)
    assert_equivalent(model, program.run, torch.randn(4, 6), max_rel_err=1e-5)


def test_training_mode_batchnorm_is_left_and_reported():
    model = randomize_bn(ConvBn())
    program = program_of(model, (2, 3, 8, 8))
    program.graph_module.get_submodule("bn").train()
    result = fuse_conv_bn_relu(program)
    assert result.data["folded"] == 0
    assert "bn (in training mode)" in result.detail
    assert isinstance(program.graph_module.get_submodule("bn"), nn.BatchNorm2d)


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(x))


@pytest.mark.parametrize(
    "model, shape, phrase",
    [
        (TwoUsers(), (1, 3, 6, 6), "bn (the output of 'conv' has 2 users)"),
        (SharedConv(), (1, 4, 6, 6), "'conv' is called from 2 places"),
        (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), (1, 3, 6, 6), "its input is not a conv or linear layer"),
    ],
)
def test_unsafe_folds_are_left_alone(model, shape, phrase):
    model = randomize_bn(model).eval()
    program = program_of(model, shape)
    result = fuse_conv_bn_relu(program)
    program.recompile()
    assert result.data["folded"] == 0
    assert phrase in result.detail
    assert_equivalent(model, program.run, torch.randn(shape), max_rel_err=1e-5)


def test_users_model_is_not_modified():
    model = randomize_bn(ConvBn()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture(model, input_shapes=[(1, 3, 8, 8)])
    fuse_conv_bn_relu(program)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(model.bn, nn.BatchNorm2d)


def test_fold_is_more_accurate_than_float32_arithmetic():
    # Large running_var spread: the float64 fold keeps the error at float32 rounding level.
    model = ConvBn(relu="none").eval()
    with torch.no_grad():
        model.bn.running_var.copy_(torch.logspace(-4, 4, 8))
        model.bn.running_mean.uniform_(-3, 3)
    program = program_of(model, (1, 3, 8, 8))
    fuse_conv_bn_relu(program)
    program.recompile()
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert compare([model(x)], [program.run(x)]).metrics.max_rel_err < 1e-5
