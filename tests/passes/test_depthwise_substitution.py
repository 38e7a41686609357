"""depthwise-substitution: exact at full rank, real savings when an error is allowed, options."""

from __future__ import annotations

import math

import pytest
import torch
import torch.ao.nn.intrinsic as nni
from torch import nn

from graphopt import zoo
from graphopt.cost import count_macs
from graphopt.errors import PipelineError
from graphopt.passes.depthwise_substitution import depthwise_substitution, factorize
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.plugins import PluginHost
from graphopt.program import Program
from tests.conftest import program_of
from tests.passes.test_prune_channels import assert_same, small_shape, zoo_program


def dense_convs(program: Program) -> dict[str, nn.Conv2d]:
    """Dense KxK convs the graph calls (inside fused modules too)."""
    gm = program.graph_module
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            conv = module[0] if isinstance(module, nn.Sequential) else module
            if isinstance(conv, nn.Conv2d) and conv.groups == 1 and math.prod(conv.kernel_size) > 1:
                found[str(node.target)] = conv
    return found


def reconstructed(program: Program, name: str) -> torch.Tensor:
    """The dense weight the depthwise + pointwise pair computes: W[o, i] = sum_k pw[o, i*r+k] dw[i*r+k]."""
    gm = program.graph_module
    dw = gm.get_submodule(f"{name}_dw")
    pw = gm.get_submodule(f"{name}_pw")
    pw = pw[0] if isinstance(pw, nn.Sequential) else pw
    cin, r = dw.groups, dw.out_channels // dw.groups
    d = dw.weight.detach().double().reshape(cin, r, -1)  # [Cin, r, K]
    p = pw.weight.detach().double().reshape(pw.out_channels, cin, r)  # [Cout, Cin, r]
    return torch.einsum("oir,irk->oik", p, d).reshape(pw.out_channels, cin, *dw.kernel_size)


@pytest.mark.parametrize(
    "name,fused",
    [(n, False) for n in zoo.names()] + [("resnet18", True), ("inception", True)],
)
def test_zoo_full_rank_substitution_is_exact(name, fused):
    program = zoo_program(name, fused)
    before = dense_convs(program)
    weights = {n: c.weight.detach().double().clone() for n, c in before.items()}
    kinds = {n: type(program.graph_module.get_submodule(n)) for n in before}
    x = torch.randn(small_shape(name), generator=torch.Generator().manual_seed(4))
    ref = program.run(x)
    result = depthwise_substitution(program, max_error=0.0, require_savings=False)
    out = program.run(x)
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err <= 1e-4, result.detail

    done = [e for e in result.data["layers"] if e["status"] == "substituted"]
    expected = [n for n, c in before.items() if min(c.in_channels, c.out_channels) >= 8]
    assert sorted(e["name"] for e in done) == sorted(expected)
    if name not in ("shufflenet_v2", "mobilenet_v2", "efficientnet_b0"):  # their only dense KxK conv is the 3-channel stem
        assert done, result.detail
    after = dense_convs(program)
    gm = program.graph_module
    calls = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for e in done:
        conv, n = before[e["name"]], e["name"]
        assert n not in after and n not in calls, "the dense conv is gone"
        assert calls[f"{n}_pw"].args[0] is calls[f"{n}_dw"], "pointwise right after depthwise"
        dw, pw = gm.get_submodule(f"{n}_dw"), gm.get_submodule(f"{n}_pw")
        r = e["r"]
        assert r == min(conv.out_channels, math.prod(conv.kernel_size)) and e["weight_error"] == 0.0
        assert (dw.in_channels, dw.out_channels, dw.groups) == (conv.in_channels, conv.in_channels * r, conv.in_channels)
        assert dw.kernel_size == conv.kernel_size and dw.stride == conv.stride and dw.padding == conv.padding
        assert dw.bias is None
        core = pw[0] if isinstance(pw, nn.Sequential) else pw
        assert (core.in_channels, core.out_channels, core.kernel_size, core.groups) == (conv.in_channels * r, conv.out_channels, (1, 1), 1)
        assert isinstance(pw, nni.ConvReLU2d) == (kinds[n] is nni.ConvReLU2d)  # a fused ReLU stays after pw
        torch.testing.assert_close(reconstructed(program, n), weights[n], rtol=1e-5, atol=1e-5 * float(weights[n].abs().max()))
    if fused:
        assert any(isinstance(gm.get_submodule(f"{e['name']}_pw"), nni.ConvReLU2d) for e in done)
    assert count_macs(gm) == result.data["macs_after"]


def test_resnet18_with_max_error_saves_macs():
    program = zoo_program("resnet18", fused=True)
    original = program.clone()
    result = depthwise_substitution(program, max_error=0.3)
    data = result.data
    done = [e for e in data["layers"] if e["status"] == "substituted"]
    assert done, result.detail
    assert count_macs(program.graph_module) == data["macs_after"] < data["macs_before"] == count_macs(original.graph_module)
    assert all(e["macs_after"] < e["macs_before"] for e in done)
    before = {n: c.weight.detach().double() for n, c in dense_convs(original).items()}
    for e in done:
        assert e["weight_error"] <= 0.3
        r, w = e["r"], before[e["name"]]
        actual = float((reconstructed(program, e["name"]) - w).norm() / w.norm())
        assert actual == pytest.approx(e["weight_error"], abs=1e-5)  # the reported error is the real one
        if r > 1:  # r is the smallest rank meeting the bound
            _, _, _, errors = factorize(w)
            assert float(errors[r - 1]) > 0.3
    assert f"substituted {len(done)} of" in result.detail and "MACs -" in result.detail
    x = torch.randn(1, 3, 64, 64)
    assert program.run(x).shape == original.run(x).shape


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow = nn.Conv2d(6, 4, 3, padding=1)  # Cout=4: saving MACs needs r <= 2 of 4
        self.wide = nn.Conv2d(4, 32, 3, padding=1, bias=False)
        self.point = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.point(torch.relu(self.wide(torch.relu(self.narrow(x)))))


def test_layer_skipped_when_no_rank_saves_macs():
    program = program_of(Tiny(), (1, 6, 8, 8))
    result = depthwise_substitution(program, max_error=0.0, min_channels=1)
    layers = {e["name"]: e for e in result.data["layers"]}
    assert set(layers) == {"narrow", "wide"}  # the 1x1 conv is not a candidate
    assert layers["narrow"]["status"] == "skipped" and "no r saves MACs" in layers["narrow"]["reason"]
    assert layers["narrow"]["macs_after"] >= layers["narrow"]["macs_before"]
    assert layers["wide"]["status"] == "skipped"  # r = 9 of 9 costs more than the dense conv
    assert not result.changed and isinstance(program.graph_module.narrow, nn.Conv2d)

    program = program_of(Tiny(), (1, 6, 8, 8))
    result = depthwise_substitution(program, min_channels=8)
    assert {e["reason"] for e in result.data["layers"]} == {"fewer than 8 channels"}
    program = program_of(Tiny(), (1, 6, 8, 8))
    result = depthwise_substitution(program, max_error=0.0, require_savings=False, min_channels=1, skip=["wide"])
    assert [e["name"] for e in result.data["layers"] if e["status"] == "substituted"] == ["narrow"]
    assert isinstance(program.graph_module.wide, nn.Conv2d)


@pytest.mark.parametrize(
    "options,match",
    [
        ({"max_error": 1.0}, "option 'max-error' must be a number with 0 <= max-error < 1, got 1.0"),
        ({"max_error": -0.5}, "option 'max-error'"),
        ({"min_channels": 0}, "option 'min-channels' must be an integer >= 1, got 0"),
        ({"skip": ["wid"]}, "option 'skip' names unknown module 'wid'; close names: 'wide'"),
    ],
)
def test_bad_options_raise_pipeline_error(options, match):
    program = program_of(Tiny(), (1, 6, 8, 8))
    with pytest.raises(PipelineError, match=match):
        depthwise_substitution(program, **options)


def test_registered_through_the_plugin_host_and_pipeline_text():
    host = PluginHost()
    host.load("graphopt.passes.depthwise_substitution")
    spec = host.passes.get("depthwise-substitution")
    assert spec.contract == "approximate"
    assert {o.text_name for o in spec.options.values()} == {"max-error", "require-savings", "min-channels", "skip"}
    pipeline = parse_pipeline("depthwise-substitution{max-error=0,require-savings=false,min-channels=1}", host.passes)
    program = program_of(Tiny(), (1, 6, 8, 8))
    x = torch.randn(1, 6, 8, 8)
    ref = program.run(x)
    (record,) = PassManager(pipeline).run(program)
    assert record.changed and "substituted 2 of 2 convs" in record.detail
    assert_same(program.run(x), ref, rel=1e-4)
    with pytest.raises(PipelineError, match="option 'require-savings' expects bool"):
        parse_pipeline("depthwise-substitution{require-savings=maybe}", host.passes)
