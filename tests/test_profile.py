"""graphopt.profile: every node timed, MACs/params from graphopt.cost that add up, JSON, table."""

from __future__ import annotations

import functools
import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

from graphopt.capture import capture
from graphopt.cost import count_macs, count_params
from graphopt.errors import DataError, UsageError
from graphopt.passes.insert_quant_stubs import insert_quant_stubs
from graphopt.profile import NodeProfile, Profile, profile_program
from graphopt.program import Program
from tests.conftest import program_of


@functools.lru_cache(maxsize=None)
def zoo_program(name: str) -> Program:
    return capture(f"zoo:{name}", input_shapes=[(1, 3, 64, 64)])


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_profile_adds_up(name):
    program = zoo_program(name)
    gm = program.graph_module
    profile = profile_program(program, program.example_inputs, runs=3, warmup=1)
    names = {n.name for n in profile.nodes}
    convs = [n.name for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Conv2d)]
    assert convs and set(convs) <= names
    assert len(profile.nodes) == sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    assert profile.total_macs == sum(n.macs for n in profile.nodes) == count_macs(gm) > 0
    assert profile.total_params == sum(n.params for n in profile.nodes) == count_params(gm)
    assert profile.total_params == sum(p.numel() for p in gm.parameters())
    assert sum(n.share for n in profile.nodes) == pytest.approx(1.0)
    assert [n.ms for n in profile.nodes] == sorted((n.ms for n in profile.nodes), reverse=True)
    assert profile.runs == 3 and profile.total_ms > 0
    # the nodes account for the run: only the interpreter's bookkeeping is left
    assert profile.total_ms == pytest.approx(profile.nodes_ms + profile.overhead_ms)
    assert 0 <= profile.overhead_ms < 0.25 * profile.total_ms  # measured: ~2%
    assert profile.run_ms >= 0.8 * profile.nodes_ms  # machine noise only makes whole runs slower
    conv = next(n for n in profile.nodes if n.name == convs[0])
    assert conv.op == "call_module" and conv.target == "Conv2d" and conv.macs > 0 and conv.params > 0
    node = next(n for n in gm.graph.nodes if n.name == convs[0])
    assert conv.output_shape == tuple(node.meta["tensor_meta"].shape)
    # JSON round trip
    data = json.loads(json.dumps(profile.to_json()))
    assert data["total_macs"] == profile.total_macs and len(data["nodes"]) == len(profile.nodes)
    assert Profile.from_json(data) == profile


def test_render_top_and_totals():
    program = zoo_program("resnet18")
    profile = profile_program(program, runs=1, warmup=0)
    out = io.StringIO()
    profile.render(Console(file=out, width=200), top=5)
    text = out.getvalue()
    slowest = profile.nodes[0].name
    assert slowest in text and f"... {len(profile.nodes) - 5} more nodes" in text
    assert f"{profile.total_macs:,}" in text and f"{profile.total_params:,}" in text
    assert f" {profile.nodes[4].name} " in text and f" {profile.nodes[6].name} " not in text


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.shared(self.shared(torch.relu(self.conv(x))))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([a, b], 1) + 1.0
        return self.fc(torch.flatten(y.mean((2, 3), keepdim=True), 1))


def test_other_sample_shape_shared_modules_and_names():
    program = program_of(Small(), (1, 3, 8, 8))
    gm = program.graph_module
    example_macs = count_macs(gm)
    profile = profile_program(program, (torch.randn(2, 3, 16, 16),), runs=2, warmup=0)
    # the program's own shapes are left alone
    assert tuple(gm.graph.find_nodes(op="call_module", target="conv")[0].meta["tensor_meta"].shape) == (1, 4, 8, 8)
    assert count_macs(gm) == example_macs
    # MACs at the sample's shapes: the convs 2 images of 16x16 (8x), the Linear 2 rows (2x its 1*4*2)
    assert profile.total_macs == 8 * (example_macs - 8) + 2 * 8
    by_name = {n.name: n for n in profile.nodes}
    assert by_name["conv"].output_shape == (2, 4, 16, 16)
    assert by_name["shared"].params == 20 and by_name["shared_1"].params == 0  # counted once
    assert by_name["shared_1"].macs == by_name["shared"].macs > 0
    assert profile.total_params == sum(n.params for n in profile.nodes) == count_params(gm)
    assert by_name["chunk"].output_shape == ((2, 2, 16, 16), (2, 2, 16, 16))
    assert by_name["chunk"].target == ".chunk" and by_name["cat"].target == "torch.cat"
    assert by_name["add"].target == "operator.add" and by_name["flatten"].target == "torch.flatten"
    json.dumps(profile.to_json())
    assert Profile.from_json(json.loads(json.dumps(profile.to_json()))) == profile


def test_quantized_program_counts_the_wrapped_layers():
    program = program_of(Small(), (1, 3, 8, 8))
    program.calibration = [(torch.randn(2, 3, 8, 8),)]
    fp32_macs, fp32_params = count_macs(program.graph_module), count_params(program.graph_module)
    insert_quant_stubs(program)
    program.recompile()
    program.propagate_shapes()
    profile = profile_program(program, runs=1, warmup=0)
    assert any(n.target == "QuantLayer" for n in profile.nodes)
    assert profile.total_macs == count_macs(program.graph_module) == fp32_macs
    assert profile.total_params == fp32_params


def test_refusals():
    program = program_of(Small(), (1, 3, 8, 8))
    with pytest.raises(UsageError, match="runs must be an integer >= 1"):
        profile_program(program, runs=0)
    with pytest.raises(UsageError, match="warmup must be an integer >= 0"):
        profile_program(program, warmup=-1)
    with pytest.raises(DataError, match=r"cannot run the sample \(1x5x8x8\)"):
        profile_program(program, (torch.randn(1, 5, 8, 8),))
    assert isinstance(profile_program(program, torch.randn(1, 3, 8, 8), runs=1).nodes[0], NodeProfile)
