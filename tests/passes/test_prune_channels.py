"""prune-channels: exactness that cannot be faked, structure, options.

The exactness check zeroes the weights of chosen channels so they contribute nothing (the
producing filters and biases, and the affine of every BatchNorm/LayerNorm in the group),
prunes exactly those channels, and compares with the zeroed, unpruned model: a wrong
dependency group (a missed residual, concat offset, shuffle permutation, channel axis...)
changes the output. A LayerNorm over the channels normalizes over the kept ones once
pruned, so in the reference each such LayerNorm computes its statistics over the channels
that will be kept (:class:`KeptLayerNorm`). It runs on every zoo model, on ConvNeXt- and
MLP-mixer-style models and on random nets drawn by hypothesis.

The random-net test runs 40 examples by default; ``GRAPHOPT_HYPOTHESIS_PROFILE=full``
runs 200.
"""

from __future__ import annotations

import functools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from graphopt import zoo
from graphopt.capture import capture
from graphopt.cost import count_macs
from graphopt.errors import PipelineError
from graphopt.fx_util import set_module
from graphopt.passes._channel_groups import ChannelGroup, module_parts
from graphopt.passes.fuse_conv_bn_relu import fuse_conv_bn_relu
from graphopt.passes.prune_channels import analyze_program, prune_channels, prune_channels_by_index
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.plugins import PluginHost
from graphopt.program import Program
from tests.conftest import program_of, randomize_bn
from tests.fuzz.nets import LAYOUT_KINDS, ConvNeXtBlock, MixerBlock, draw_net

PROFILE = os.environ.get("GRAPHOPT_HYPOTHESIS_PROFILE", "ci")
EXAMPLES = {"ci": 40, "full": 200}.get(PROFILE, 40)


# --------------------------------------------------------------------------- helpers



def small_shape(name: str) -> tuple[int, ...]:
    return (1, 1, 8, 8) if name == "digits_cnn" else (1, 3, 64, 64)


@functools.lru_cache(maxsize=None)
def _zoo_captured(name: str) -> Program:
    return capture(f"zoo:{name}", input_shapes=[small_shape(name)])


def zoo_program(name: str, fused: bool = False) -> Program:
    """A fresh copy of a captured zoo model at a small input (captured once per session)."""
    program = _zoo_captured(name).clone()
    if fused:
        fuse_conv_bn_relu(program)
        program.recompile()
        program.propagate_shapes()
    return program


class KeptLayerNorm(nn.Module):
    """The reference for a LayerNorm(C) that loses channels: statistics over the kept ones only
    (what the pruned LayerNorm computes); the dropped ones (affine zeroed) come out as zero."""

    def __init__(self, norm: nn.Module, dropped: set[int], eps: float):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, eps
        self.keep = torch.tensor([c not in dropped for c in range(len(norm.weight))])

    def forward(self, x):
        k = self.keep
        out = torch.zeros_like(x)
        out[..., k] = F.layer_norm(x[..., k], (int(k.sum()),), self.weight[k], self.bias[k], self.eps)
        return out


def keep_layer_norms(gm: torch.fx.GraphModule, lost: dict[str, set[int]]) -> None:
    """Make each LayerNorm that loses channels a :class:`KeptLayerNorm`, whether the graph calls the
    module or ``F.layer_norm`` with its weight (a LayerNorm subclass's forward, traced)."""
    for name, channels in lost.items():
        norm = gm.get_submodule(name)
        set_module(gm, name, KeptLayerNorm(norm, channels, getattr(norm, "eps", 0.0)))
        for node in list(gm.graph.nodes):
            weight = node.kwargs.get("weight", node.args[2] if len(node.args) > 2 else None)
            if node.target is F.layer_norm and getattr(weight, "target", None) == f"{name}.weight":
                gm.get_submodule(name).eps = node.kwargs.get("eps", node.args[4] if len(node.args) > 4 else 1e-5)
                with gm.graph.inserting_before(node):
                    node.replace_all_uses_with(gm.graph.call_module(name, (node.args[0],)))
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def zero_units(program: Program, group: ChannelGroup, units: list[int], dropped: dict[str, set[int]]) -> None:
    """Make the units contribute exactly nothing: filters, biases and BatchNorm/LayerNorm affine = 0
    (``dropped`` collects the channels each LayerNorm would lose)."""
    gm = program.graph_module
    with torch.no_grad():
        for u in units:
            for layer, channels in group.outputs[u].items():
                core = module_parts(gm.get_submodule(layer))[0]
                core.weight[list(channels)] = 0
                if core.bias is not None:
                    core.bias[list(channels)] = 0
            for bn_name, channels in group.norms[u].items():
                bn = gm.get_submodule(bn_name)
                bn.weight[list(channels)] = 0
                bn.bias[list(channels)] = 0
                if not isinstance(bn, nn.modules.batchnorm._BatchNorm):  # a LayerNorm (or F.layer_norm's holder)
                    dropped.setdefault(bn_name, set()).update(channels)


def assert_same(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> None:
    assert out.shape == ref.shape
    scale = max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(out, ref, rtol=rel, atol=rel * scale)


def out_channels(program: Program) -> dict[str, int]:
    """Output channels (features) of every conv/linear layer the graph calls."""
    counts = {}
    gm = program.graph_module
    for node in gm.graph.nodes:
        name = str(node.target)
        parts = module_parts(gm.get_submodule(name)) if node.op == "call_module" else None
        if parts is not None:
            core = parts[0]
            counts[name] = core.out_features if isinstance(core, nn.Linear) else core.out_channels
    return counts


def zero_and_prune(program: Program, pick) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Zero the units ``pick(group)`` chooses in every prunable group, prune them, run both."""
    analysis = analyze_program(program)
    blocked = [(g.name, g.blocked) for g in analysis.groups if g.blocked.startswith("blocked")]
    selection: dict[str, list[int]] = {}
    dropped: dict[str, dict[str, set[int]]] = {}  # group -> LayerNorm -> channels
    for group in analysis.groups:
        if group.blocked:
            continue
        units = pick(group)
        if not units:
            continue
        zero_units(program, group, units, dropped.setdefault(group.name, {}))
        first = group.producers[0]
        selection.setdefault(first, []).extend(c for u in units for c in group.outputs[u][first])
    g = torch.Generator().manual_seed(1)
    x = tuple(torch.randn(t.shape, generator=g) for t in program.example_inputs)
    before = out_channels(program)
    reference = program.clone()
    result = prune_channels_by_index(program, selection)
    out = program.run(*x)
    lost: dict[str, set[int]] = {}  # only groups really pruned (not left to keep a tensor non-empty)
    for group in result.data["groups"]:
        for name, channels in dropped.get(group["name"], {}).items() if group["status"] == "pruned" else ():
            lost.setdefault(name, set()).update(channels)
    keep_layer_norms(reference.graph_module, lost)
    ref = reference.run(*x)
    return out, ref, {"result": result, "blocked": blocked, "before": before, "analysis": analysis}


# --------------------------------------------------------------------------- zoo


@pytest.mark.parametrize(
    "name,fused",
    [(n, False) for n in zoo.names()] + [("resnet18", True), ("mobilenet_v2", True), ("shufflenet_v2", True)],
)
def test_zoo_pruning_zeroed_channels_is_exact(name, fused):
    program = zoo_program(name, fused)
    rng = random.Random(0)
    out, ref, info = zero_and_prune(program, lambda g: rng.sample(range(g.size), int(0.3 * g.size)))
    assert info["blocked"] == [], "every zoo pattern should be understood"
    result = info["result"]
    assert result.changed and result.data["channels_pruned"] > 0, result.detail
    assert result.data["macs_after"] < result.data["macs_before"]
    assert_same(out, ref)


FOUR = {"resnet50", "mobilenet_v2", "densenet", "shufflenet_v2"}


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_ratio_0_3(name):
    program = zoo_program(name, fused=True)
    reference = program.clone()
    result = prune_channels(program, ratio=0.3)
    x = torch.randn(small_shape(name), generator=torch.Generator().manual_seed(2))
    out, ref = program.run(x), reference.run(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    before, after = count_macs(reference.graph_module), count_macs(program.graph_module)
    assert result.data["macs_before"] == before and result.data["macs_after"] == after
    assert after < before
    if name in FOUR:
        assert after <= 0.75 * before, result.detail
    assert not [g for g in result.data["groups"] if g["status"] == "left"], result.detail
    assert "MACs" in result.detail and "pruned" in result.detail
    # the classifier's outputs and the input channels are untouched
    fc = [n for n, c in out_channels(reference).items() if c == zoo.get(name).num_classes]
    assert all(out_channels(program)[n] == zoo.get(name).num_classes for n in fc)


@pytest.mark.parametrize("name", ["mobilenet_v2", "shufflenet_v2", "resnet18"])
def test_round_to_is_respected(name):
    program = zoo_program(name, fused=True)
    before = out_channels(program)
    result = prune_channels(program, ratio=0.3, round_to=8)
    after = out_channels(program)
    changed = {n: c for n, c in after.items() if c != before[n]}
    assert changed, result.detail
    assert all(c % 8 == 0 for c in changed.values()), changed
    assert "round_to_not_met" not in result.data


def test_skip_and_per_layer_ratio():
    program = zoo_program("resnet18", fused=True)
    before = out_channels(program)
    result = prune_channels(program.clone(), ratio=0.5, skip=["layers.0.0.conv1"])
    assert any(g["status"] == "skipped" and g["name"] == "layers.0.0.conv1.0" for g in result.data["groups"])

    skipped = program.clone()
    prune_channels(skipped, ratio=0.5, skip=["layers.0.0.conv1"])
    assert out_channels(skipped)["layers.0.0.conv1.0"] == before["layers.0.0.conv1.0"]
    assert out_channels(skipped)["layers.0.1.conv1.0"] == before["layers.0.1.conv1.0"] // 2

    only = program.clone()
    prune_channels(only, ratio={"layers.0.0.conv1": 0.5})
    changed = {n for n, c in out_channels(only).items() if c != before[n]}
    assert changed == {"layers.0.0.conv1.0"}
    assert out_channels(only)["layers.0.0.conv1.0"] == 32

    rest = program.clone()
    prune_channels(rest, ratio={"*": 0.25, "layers.0.0.conv1": 0.0})
    assert out_channels(rest)["layers.0.0.conv1.0"] == 64
    assert out_channels(rest)["layers.1.0.conv1.0"] == 96


# --------------------------------------------------------------------------- small models


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))), 1))


def small_program() -> Program:
    torch.manual_seed(0)
    return program_of(randomize_bn(Small()), (2, 3, 8, 8))


@pytest.mark.parametrize("importance", ["l1", "l2", "bn-gamma"])
def test_lowest_importance_channels_go(importance):
    program = small_program()
    gm = program.graph_module
    weak = [1, 4, 7]
    with torch.no_grad():
        if importance == "bn-gamma":
            gm.bn1.weight[weak] = 1e-3 * torch.tensor([1.0, 2.0, 3.0])
        else:
            gm.conv1.weight[weak] = 0
            gm.conv1.bias[weak] = 0
            gm.bn1.weight[weak] = 0
            gm.bn1.bias[weak] = 0
    kept_weights = gm.conv1.weight[[i for i in range(10) if i not in weak]].clone()
    x = torch.randn(2, 3, 8, 8)
    ref = program.run(x)
    result = prune_channels(program, ratio={"conv1": 0.3}, importance=importance)
    assert gm.conv1.out_channels == 7 and gm.bn1.num_features == 7 and gm.conv2.in_channels == 7
    assert torch.equal(gm.conv1.weight, kept_weights)
    if importance != "bn-gamma":
        assert_same(program.run(x), ref)
    assert result.data["importance"] == importance


def test_min_channels_and_no_change_at_ratio_zero():
    program = small_program()
    prune_channels(program, ratio=0.9, min_channels=4)
    assert program.graph_module.conv1.out_channels == 4
    program = small_program()
    prune_channels(program, ratio=0.5, min_channels=12)  # wider than conv1: left whole
    assert program.graph_module.conv1.out_channels == 10
    program = small_program()
    result = prune_channels(program, ratio=0.0)
    assert not result.changed and program.graph_module.conv1.out_channels == 10


@pytest.mark.parametrize(
    "options,match",
    [
        ({"ratio": 1.0}, "'ratio' must be a number with 0 <= ratio < 1, got 1.0"),
        ({"ratio": -0.1}, "'ratio'"),
        ({"ratio": {"conv1": 1.5}}, "ratio for 'conv1'"),
        ({"ratio": {"conv": 0.5}}, "option 'ratio' names unknown module 'conv'; close names: 'conv1', 'conv2'"),
        ({"round_to": 0}, "'round-to' must be an integer >= 1, got 0"),
        ({"min_channels": 0}, "'min-channels' must be an integer >= 1"),
        ({"importance": "l3"}, "'importance' must be one of 'bn-gamma', 'l1', 'l2', got 'l3'"),
        ({"skip": ["conv3"]}, "option 'skip' names unknown module 'conv3'; close names: 'conv1', 'conv2'"),
    ],
)
def test_bad_options_raise_pipeline_error(options, match):
    program = small_program()
    with pytest.raises(PipelineError, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        prune_channels(program, **options)
    assert program.graph_module.conv1.out_channels == 10  # nothing was touched


def test_registered_through_the_plugin_host_and_pipeline_text():
    host = PluginHost()
    host.load("graphopt.passes.fuse_conv_bn_relu")
    host.load("graphopt.passes.prune_channels")
    spec = host.passes.get("prune-channels")
    assert spec.contract == "approximate"
    assert {o.text_name for o in spec.options.values()} == {"ratio", "importance", "round-to", "min-channels", "skip"}
    text = "fuse-conv-bn-relu,prune-channels{ratio={conv1:0.5,*:0.2},importance=l2,round-to=2,min-channels=2,skip=[fc]}"
    pipeline = parse_pipeline(text, host.passes)
    program = small_program()
    records = PassManager(pipeline).run(program)
    assert records[1].changed and records[1].data["channels_pruned"] > 0
    assert out_channels(program)["conv1"] == 6  # 10 * 0.5 -> 5, rounded to 6
    assert program.run(torch.randn(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(PipelineError, match="option 'ratio' expects"):
        parse_pipeline("prune-channels{ratio=lots}", host.passes)


class Opaque(nn.Module):
    """conv1's channels meet ops the analysis does not understand; conv3's do not."""

    def __init__(self, fixed_view: bool):
        super().__init__()
        self.fixed_view = fixed_view
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv4 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv1(x)
        y = y.view(1, 8, 64).view(1, 8, 8, 8) if self.fixed_view else torch.roll(y, 1, 1)
        return self.conv4(torch.relu(self.conv3(torch.relu(self.conv2(y)))))


@pytest.mark.parametrize("fixed_view", [False, True])
def test_unknown_op_blocks_its_group_and_is_named(fixed_view):
    program = program_of(Opaque(fixed_view), (1, 3, 8, 8))
    x = torch.randn(1, 3, 8, 8)
    result = prune_channels(program, ratio=0.5)
    left = {g["name"]: g["reason"] for g in result.data["groups"] if g["status"] == "left"}
    node = "view" if fixed_view else "roll"
    assert "conv1" in left and f"blocked by node '{node}'" in left["conv1"]
    assert f"left 1 groups: conv1 (blocked by node '{node}'" in result.detail
    gm = program.graph_module
    assert gm.conv1.out_channels == 8 and gm.conv3.out_channels == 4
    assert program.run(x).shape == (1, 4, 8, 8)


class Shared(nn.Module):
    """One conv module called twice, a graph-output feature map, and a slice + cat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 8, 3, padding=1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 6, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.shared(torch.relu(self.shared(x))))
        y = torch.cat([y[:, :3], y[:, 3:] * 2.0], 1)
        return self.head(y)


def test_shared_module_slices_and_graph_output():
    program = program_of(Shared(), (1, 2, 8, 8))
    rng = random.Random(3)
    out, ref, info = zero_and_prune(program, lambda g: rng.sample(range(g.size), 3))
    assert_same(out, ref)
    gm = program.graph_module
    assert gm.shared.out_channels == 5 and gm.shared.in_channels == 5
    assert gm.stem.in_channels == 2 and gm.head.out_channels == 6  # input and output channels stay
    with pytest.raises(ValueError, match="protected"):
        prune_channels_by_index(program, {"head": [0]})


# --------------------------------------------------------------------------- random nets


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_random_nets_pruning_zeroed_channels_is_exact(data):
    model, shape = draw_net(data, kinds=LAYOUT_KINDS)
    program = program_of(model, shape)
    if data.draw(st.booleans(), label="fuse first"):
        fuse_conv_bn_relu(program)
        program.recompile()
        program.propagate_shapes()
    rng = random.Random(data.draw(st.integers(0, 2**16), label="seed"))
    fraction = data.draw(st.sampled_from([0.25, 0.5, 0.9]), label="fraction")
    picked: dict[str, list[int]] = {}

    def pick(group):
        units = rng.sample(range(group.size), min(group.size - 1, max(1, int(fraction * group.size))))
        picked[group.name] = units
        return units

    out, ref, info = zero_and_prune(program, pick)
    assert info["blocked"] == [], "every pattern in these nets should be understood"
    assert_same(out, ref)
    # every producing layer lost exactly the channels of its pruned units
    result, analysis, before = info["result"], info["analysis"], info["before"]
    status = {g["name"]: g["status"] for g in result.data["groups"]}
    expected = dict(before)
    for group in analysis.groups:
        if status[group.name] == "pruned":
            for u in picked.get(group.name, []):
                for layer, channels in group.outputs[u].items():
                    expected[layer] -= len(channels)
    assert out_channels(program) == expected


def test_pruning_twice_reindexes_the_pruned_shuffle():
    program = zoo_program("shufflenet_v2", fused=True)
    first = prune_channels(program, ratio=0.3)
    assert any(n.target is torch.index_select for n in program.graph.nodes)
    rng = random.Random(5)
    out, ref, info = zero_and_prune(program, lambda g: rng.sample(range(g.size), int(0.2 * g.size)))
    assert info["blocked"] == []
    assert_same(out, ref)
    assert info["result"].data["macs_after"] < first.data["macs_after"]


# --------------------------------------------------------------------------- layout changes


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map through NHWC, as torchvision writes it: traced,
    it becomes permute -> ``F.layer_norm`` reading this module's weight and bias -> permute."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtStyle(nn.Module):
    """Patchify stem + LayerNorm, ConvNeXt blocks, a downsampling stage (LayerNorm + 2x2 stride-2
    conv), and a head: global average pool -> LayerNorm -> Linear."""

    def __init__(self, dims=(16, 32), depths=(2, 2), num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = [LayerNorm2d(dims[i - 1]), nn.Conv2d(dims[i - 1], d, 2, stride=2)] if i else []
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.norm(torch.flatten(self.pool(self.stages(self.stem(x))), 1)))


class MixerStyle(nn.Module):
    """Patch embedding, MLP-mixer blocks over [N, tokens, C], LayerNorm, mean over the tokens, Linear."""

    def __init__(self, c=16, patch=4, size=16, depth=2, num_classes=10):
        super().__init__()
        tokens = (size // patch) ** 2
        self.stem = nn.Conv2d(3, c, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, c, 2 * tokens, 4 * c) for _ in range(depth)])
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(dim=1))


def layout_program(name: str) -> Program:
    torch.manual_seed(0)
    model = ConvNeXtStyle() if name == "convnext" else MixerStyle()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.1)
    return program_of(model, (2, 3, 32, 32) if name == "convnext" else (2, 3, 16, 16))


@pytest.mark.parametrize("name", ["convnext", "mixer"])
def test_layout_models_pruning_zeroed_channels_is_exact(name):
    program = layout_program(name)
    rng = random.Random(4)
    out, ref, info = zero_and_prune(program, lambda g: rng.sample(range(g.size), int(0.3 * g.size)))
    assert info["blocked"] == [], "permute/LayerNorm/channels-last Linear/layer scale should be followed"
    result = info["result"]
    assert result.data["macs_after"] < 0.75 * result.data["macs_before"], result.detail
    assert_same(out, ref)


def test_convnext_ratio_0_3_cuts_a_quarter_of_the_macs_and_lowers(host):
    program = layout_program("convnext")
    reference = program.clone()
    result = prune_channels(program, ratio=0.3)
    before, after = count_macs(reference.graph_module), count_macs(program.graph_module)
    assert after <= 0.75 * before, result.detail
    assert not [g for g in result.data["groups"] if g["status"] in ("left", "protected") and g["name"] != "head"], result.detail
    gm = program.graph_module
    for stage, c in ((0, 16), (1, 32)):  # every tensor of a stage's residual stream shrank alike
        kept = gm.get_submodule(f"stages.{stage}.0.dwconv").out_channels if stage == 0 else gm.get_submodule("stages.1.1").out_channels
        assert kept == c - round(0.3 * c)
        for b in [0, 1] if stage == 0 else [2, 3]:
            block = gm.get_submodule(f"stages.{stage}.{b}")
            assert block.dwconv.in_channels == block.dwconv.out_channels == block.dwconv.groups == kept
            assert block.norm.normalized_shape == (kept,) and block.norm.weight.shape == (kept,) == block.norm.bias.shape
            assert block.pwconv1.in_features == kept and block.pwconv2.out_features == kept
            assert block.pwconv1.out_features == block.pwconv2.in_features == 4 * c - round(0.3 * 4 * c)
            assert block.gamma.shape == (kept,)
    module = gm.get_submodule
    assert module("stem.1").weight.shape == module("stages.1.0").bias.shape == (11,)  # LayerNorm2d: F.layer_norm
    assert [n.args[1] for n in gm.graph.nodes if n.target is F.layer_norm] == [(11,), (11,)]
    assert module("stages.1.1").in_channels == 11 and gm.norm.normalized_shape == (22,) and gm.head.in_features == 22
    assert gm.head.out_features == 10
    # the pruned model runs and its cpu-fp32 lowering computes what it computes
    spec = host.targets.get("cpu-fp32")
    artifact = spec.backend.lower(program, spec)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    expected = program.run(x)
    assert expected.shape == (2, 10) and torch.isfinite(expected).all()
    torch.testing.assert_close(artifact.run(x), expected, rtol=1e-5, atol=1e-5)


def test_mixer_prunes_channel_mixing_only():
    program = layout_program("mixer")
    before = count_macs(program.graph_module)
    result = prune_channels(program, ratio=0.3)
    gm = program.graph_module
    assert count_macs(gm) <= 0.75 * before, result.detail
    for block in (gm.get_submodule(f"blocks.{i}") for i in range(2)):
        assert (block.token1.in_features, block.token1.out_features, block.token2.out_features) == (16, 32, 16)
        assert block.norm1.normalized_shape == block.norm2.normalized_shape == (11,)
        assert block.channel1.in_features == block.channel2.out_features == 11
        assert block.channel1.out_features == block.channel2.in_features == 64 - round(0.3 * 64)
    assert gm.stem.out_channels == 11 and gm.head.in_features == 11 and gm.head.out_features == 10
    assert program.run(torch.randn(2, 3, 16, 16)).shape == (2, 10)


class MergedChannels(nn.Module):
    """conv2's channels, once channels-last, are merged with the width by a reshape: not followed."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8, 4)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x))).permute(0, 2, 3, 1)
        return self.fc(y.reshape(1, 8, 64)).mean(dim=1)


def test_reshape_merging_channels_with_another_axis_blocks_and_is_named():
    program = program_of(MergedChannels(), (1, 3, 8, 8))
    result = prune_channels(program, ratio=0.5)
    left = {g["name"]: g["reason"] for g in result.data["groups"] if g["status"] == "left"}
    assert left == {"conv2": "blocked by node 'reshape' (view/reshape that splits the channels or merges them with a preceding axis)"}
    gm = program.graph_module
    assert gm.conv1.out_channels == 4 and gm.conv2.out_channels == 8 and gm.fc.in_features == 64
    assert program.run(torch.randn(1, 3, 8, 8)).shape == (1, 4)
