"""dce: dead nodes, modules and parameters go; impure and in-place calls stay."""

from __future__ import annotations

import operator

import torch
from torch import nn

from graphopt.passes.dce import dce, is_impure
from graphopt.testing import assert_equivalent
from tests.conftest import program_of


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))
        self.register_buffer("offset", torch.zeros(4))

    def forward(self, x):
        dead = self.unused(x) * self.scale  # never used
        _ = dead.sum()
        return self.used(x) + self.offset


def test_removes_dead_nodes_modules_and_parameters():
    model = Dead().eval()
    program = program_of(model, (2, 4))
    before = program.node_count()
    result = dce(program)
    program.recompile()
    assert result.changed
    assert result.data["nodes"] == before - program.node_count() == 4  # unused, scale, mul, sum
    modules = dict(program.graph_module.named_modules())
    assert "unused" not in modules and "used" in modules
    names = dict(program.graph_module.named_parameters())
    assert "scale" not in names and "used.weight" in names
    assert "offset" in dict(program.graph_module.named_buffers())
    assert_equivalent(model, program.run, torch.randn(2, 4))
    assert dce(program).changed is False  # idempotent


class InPlace(nn.Module):
    def forward(self, x):
        y = x.clone()
        y.add_(1.0)  # result unused, but it writes to y
        torch.relu_(y)  # likewise
        z = y * 2
        z += 1  # operator.iadd on z: result rebinding only, but still in-place
        torch._assert(z.sum() > -1e9, "sane")
        return y, z


def test_keeps_in_place_and_impure_calls():
    model = InPlace()
    program = program_of(model, (3, 4))
    kinds = {str(n.target) for n in program.graph.nodes}
    assert "add_" in kinds and any("relu_" in k for k in kinds)
    dce(program)
    program.recompile()
    after = {str(n.target) for n in program.graph.nodes}
    assert "add_" in after and any("relu_" in k for k in after) and any("_assert" in k for k in after)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert_equivalent(model, program.run, x)


def test_is_impure_classification():
    program = program_of(nn.Sequential(nn.ReLU(inplace=True), nn.ReLU()), (1, 4))
    gm = program.graph_module
    nodes = {n.name: n for n in gm.graph.nodes}
    assert is_impure(gm, nodes["_0"]) and not is_impure(gm, nodes["_1"])
    g = torch.fx.Graph()
    a = g.placeholder("a")
    assert is_impure(gm, g.call_function(operator.iadd, (a, 1)))
    assert is_impure(gm, g.call_function(torch.ops.aten.add_.Tensor, (a, a)))
    assert not is_impure(gm, g.call_function(torch.ops.aten.add.Tensor, (a, a)))
    assert is_impure(gm, g.call_function(torch.nn.functional.relu, (a,), {"inplace": True}))
