"""The model zoo: deterministic builds, sane outputs, fx-traceable module-level graphs, and
the patterns each architecture is in the zoo for."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
from torch import nn

from graphopt import zoo

EXPECTED = ["convnext", "densenet", "densenet121", "digits_cnn", "efficientnet_b0", "inception", "mobilenet_v2", "resnet18",
            "resnet50", "se_resnet", "shufflenet_v2", "squeezenet"]


def small_shape(name: str, batch: int = 2) -> tuple[int, ...]:
    """Batch 2 and at most 64x64: fast, and still valid for every model."""
    _, c, h, w = zoo.get(name).input_shape
    return (batch, c, min(h, 64), min(w, 64))


def _input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[nn.Module, torch.fx.GraphModule]]:
    """Each model built once (seed 0) and traced once, shared by the tests of this module."""
    return {}


def _model_and_graph(built, name: str) -> tuple[nn.Module, torch.fx.GraphModule]:
    if name not in built:
        model = zoo.build(name)
        built[name] = (model, torch.fx.symbolic_trace(model))
    return built[name]


def _modules(gm: torch.fx.GraphModule, kind: type[nn.Module]) -> list[nn.Module]:
    """Submodules of type ``kind`` that the graph calls (call_module nodes)."""
    mods = [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    return [m for m in mods if isinstance(m, kind)]


def _calls(gm: torch.fx.GraphModule, name: str) -> list[torch.fx.Node]:
    """call_function / call_method nodes whose target is named ``name`` (torch.add and operator.add are 'add')."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_method" and n.target == name:
            out.append(n)
        elif n.op == "call_function" and getattr(n.target, "__name__", None) == name:
            out.append(n)
    return out


def test_names_are_sorted_and_complete():
    assert zoo.names() == EXPECTED
    for name in zoo.names():
        entry = zoo.get(name)
        assert entry.name == name and entry.doc and "\n" not in entry.doc
        assert entry.input_shape[0] == 1 and len(entry.input_shape) == 4
    assert zoo.get("digits_cnn").input_shape == (1, 1, 8, 8)
    assert zoo.get("digits_cnn").num_classes == 10


def test_unknown_name_lists_the_choices():
    with pytest.raises(KeyError) as info:
        zoo.get("nope")
    message = info.value.args[0]
    assert message.startswith("unknown zoo model 'nope'; choose from: ")
    assert message.endswith(", ".join(EXPECTED))
    with pytest.raises(KeyError, match="resnet18"):
        zoo.build("nope")


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("digits_cnn", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", zoo.names())
def test_build_is_deterministic_per_seed(name, built):
    model, _ = _model_and_graph(built, name)
    first = model.state_dict()
    again = zoo.build(name, seed=0).state_dict()
    assert first.keys() == again.keys()
    for key in first:
        assert torch.equal(first[key], again[key]), key
    other = zoo.build(name, seed=1).state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


@pytest.mark.parametrize("name", zoo.names())
def test_output_shape_finite_and_traced_equal(name, built):
    model, gm = _model_and_graph(built, name)
    assert not model.training
    x = _input(small_shape(name))
    with torch.no_grad():
        eager = model(x)
        traced = gm(x)
    assert eager.shape == (2, zoo.get(name).num_classes)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
    # Outputs depend on the input (the two samples differ), so comparisons mean something.
    assert (eager[0] - eager[1]).abs().max() > 1e-3


@pytest.mark.parametrize("name", zoo.names())
def test_standard_input_gives_well_scaled_output(name, built):
    model, _ = _model_and_graph(built, name)
    with torch.no_grad():
        y = model(_input(zoo.get(name).input_shape))
    assert y.shape == (1, zoo.get(name).num_classes)
    assert torch.isfinite(y).all()
    assert 0.05 < y.std().item() < 20, y.std().item()


@pytest.mark.parametrize("name", zoo.names())
def test_float32_rounding_is_not_amplified(name, built):
    # Exact rewrites (BN folding) are checked at ~1e-5 of the output range: the random nets
    # must not be so chaotic that float32 rounding alone gets near that.
    model, _ = _model_and_graph(built, name)
    x = _input(small_shape(name), seed=1)
    with torch.no_grad():
        y32 = model(x).double()
        y64 = copy.deepcopy(model).double()(x.double())
    assert (y32 - y64).abs().max() / y64.abs().max() < 1e-5


#: models without BatchNorm (ConvNeXt: LayerNorm; SqueezeNet: biased convs) and the one whose
#: pre-activation BatchNorms read a torch.cat or a pool (DenseNet-121: unfoldable by design)
NO_BATCHNORM = {"convnext", "squeezenet"}
PREACT_BATCHNORM = {"densenet121"}


@pytest.mark.parametrize("name", [n for n in zoo.names() if n not in NO_BATCHNORM])
def test_graph_is_module_level_and_batchnorm_is_foldable(name, built):
    model, gm = _model_and_graph(built, name)
    convs, bns = _modules(gm, nn.Conv2d), _modules(gm, nn.BatchNorm2d)
    assert convs and bns and _modules(gm, nn.Linear)
    assert all(not bn.training for bn in bns)
    # Every BatchNorm directly follows a bias-free conv used once, with non-trivial statistics
    # (DenseNet-121: or reads a torch.cat / the transition's input, as torchvision's does).
    unfoldable = 0
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.BatchNorm2d):
            producer = node.args[0]
            if name in PREACT_BATCHNORM and producer.op != "call_module":
                unfoldable += 1
                assert producer.target is torch.cat, node.target
                continue
            conv = gm.get_submodule(producer.target)
            assert isinstance(conv, nn.Conv2d) and conv.bias is None, node.target
            assert len(producer.users) == 1, node.target
    assert unfoldable == (58 + 3 + 1 if name in PREACT_BATCHNORM else 0)  # 58 dense layers, 3 transitions, final norm
    means = torch.cat([bn.running_mean for bn in bns])
    variances = torch.cat([bn.running_var for bn in bns])
    weights = torch.cat([bn.weight.detach() for bn in bns])
    assert means.abs().max() > 0.1 and (variances - 1).abs().max() > 0.1 and (weights - 1).abs().max() > 0.1


PATTERNS = {
    "resnet18": lambda gm: _calls(gm, "add") and _modules(gm, nn.MaxPool2d),
    "resnet50": lambda gm: len(_calls(gm, "add")) == 16,
    "densenet": lambda gm: max(len(n.args[0]) for n in _calls(gm, "cat")) >= 4 and _modules(gm, nn.AvgPool2d),
    "inception": lambda gm: [len(n.args[0]) for n in _calls(gm, "cat")] == [4, 4, 4, 4],
    "shufflenet_v2": lambda gm: _calls(gm, "chunk") and _calls(gm, "transpose") and _calls(gm, "view")
    and _calls(gm, "contiguous") and _calls(gm, "size"),
    "se_resnet": lambda gm: _calls(gm, "mul") and _modules(gm, nn.Sigmoid) and _calls(gm, "add"),
    "mobilenet_v2": lambda gm: _modules(gm, nn.ReLU6) and _modules(gm, nn.Dropout) and _calls(gm, "add")
    and any(c.groups == c.in_channels == c.out_channels > 1 for c in _modules(gm, nn.Conv2d)),
    "digits_cnn": lambda gm: _modules(gm, nn.Flatten) and _modules(gm, nn.MaxPool2d),
    "efficientnet_b0": lambda gm: _modules(gm, nn.SiLU) and len(_modules(gm, nn.Sigmoid)) == 16 and len(_calls(gm, "mul")) == 16
    and len(_calls(gm, "stochastic_depth")) == 9,
    "convnext": lambda gm: len(_calls(gm, "permute")) == 2 * 5 + 2 * 5 and _modules(gm, nn.LayerNorm) and _modules(gm, nn.GELU)
    and _calls(gm, "layer_norm") and len(_calls(gm, "stochastic_depth")) == 5
    and any(c.kernel_size == (7, 7) and c.groups == c.in_channels for c in _modules(gm, nn.Conv2d)),
    "squeezenet": lambda gm: [len(n.args[0]) for n in _calls(gm, "cat")] == [2] * 8 and not _modules(gm, nn.BatchNorm2d),
    "densenet121": lambda gm: len(_calls(gm, "cat")) == 58 + 4 and _modules(gm, nn.AvgPool2d),
}


@pytest.mark.parametrize("name", zoo.names())
def test_architecture_specific_patterns(name, built):
    _, gm = _model_and_graph(built, name)
    assert PATTERNS[name](gm), f"{name}: expected pattern missing from the traced graph"


def test_depthwise_and_residual_details(built):
    _, gm = _model_and_graph(built, "shufflenet_v2")
    depthwise = [c for c in _modules(gm, nn.Conv2d) if c.groups > 1]
    assert depthwise and all(c.groups == c.in_channels for c in depthwise)
    assert {c.stride for c in depthwise} == {(1, 1), (2, 2)}
    resnet50, _ = _model_and_graph(built, "resnet50")
    first = resnet50.layers[1][0]  # stage 2's first block: stride on the 3x3 (v1.5)
    assert first.conv1[0].stride == (1, 1) and first.conv2[0].stride == (2, 2)
    assert [m.out_channels for m in resnet50.modules() if isinstance(m, nn.Conv2d)][-1] == 2048


def test_parameter_counts_match_torchvision(built):
    names = ("resnet18", "resnet50", "mobilenet_v2", "shufflenet_v2")
    counts = {name: sum(p.numel() for p in _model_and_graph(built, name)[0].parameters()) for name in names}
    assert counts == {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872, "shufflenet_v2": 2_278_604}
    newer = {name: sum(p.numel() for p in _model_and_graph(built, name)[0].parameters())
             for name in ("efficientnet_b0", "densenet121", "squeezenet")}
    assert newer == {"efficientnet_b0": 5_288_548, "densenet121": 7_978_856, "squeezenet": 1_235_496}  # squeezenet1_1
