""".pt2 files: torch.export archives raised back to module-level graphs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from graphopt import zoo
from graphopt.capture import capture
from graphopt.errors import CaptureError
from tests.capture.fixtures_models import SharedConv, TwoInputs, build_conv1d, build_small_cnn
from tests.capture.helpers import assert_same_outputs, assert_shapes_propagated, module_types, one_line

aten = torch.ops.aten
RAISED = {
    aten.conv1d.default, aten.conv2d.default, aten.convolution.default, aten.batch_norm.default,
    aten._native_batch_norm_legit_no_training.default, aten.linear.default, aten.addmm.default,
    aten.relu.default, aten.hardtanh.default, aten.sigmoid.default, aten.max_pool2d.default,
    aten.max_pool2d_with_indices.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
}


def _save(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, decompose: bool = False, **kw) -> torch.export.ExportedProgram:
    ep = torch.export.export(model.eval(), inputs, **kw)
    if decompose:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch-internal pytree deprecation
            ep = ep.run_decompositions()
    torch.export.save(ep, path)
    return ep


def _left_over(program) -> set:
    return {n.target for n in program.graph.nodes if n.op == "call_function"} & RAISED


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_zoo_models_round_trip(tmp_path, name) -> None:
    x = torch.randn(1, 3, 64, 64)
    ep = _save(zoo.build(name), (x,), tmp_path / f"{name}.pt2")
    program = capture(str(tmp_path / f"{name}.pt2"))

    assert program.meta == {
        "source": str(tmp_path / f"{name}.pt2"), "source_kind": "export",
        "file": str(tmp_path / f"{name}.pt2"), "input_shapes": [[1, 3, 64, 64]],
    }
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= module_types(program)
    assert _left_over(program) == set()
    assert not [n for n in program.graph.nodes if n.op == "get_attr"]
    assert_shapes_propagated(program)
    reference = ep.module()
    assert_same_outputs(program, reference, *program.example_inputs)
    assert_same_outputs(program, reference, torch.randn(1, 3, 64, 64))
    # modules keep the model's own names, and only weights the graph uses remain
    original = dict(zoo.build(name).named_modules())
    for node in program.graph.find_nodes(op="call_module"):
        if isinstance(program.modules()[node.target], (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
            assert type(original[node.target]) is type(program.modules()[node.target])
    assert set(program.graph_module.state_dict()) <= set(zoo.build(name).state_dict())


def test_conv1d_linear_model(tmp_path) -> None:
    model = build_conv1d().eval()
    ep = _save(model, (torch.randn(1, 4, 32),), tmp_path / "c1.pt2")
    program = capture(str(tmp_path / "c1.pt2"))
    assert module_types(program) == {"Conv1d", "BatchNorm1d", "ReLU6", "Linear", "Sigmoid"}
    mods = program.modules()
    assert (mods["conv"].stride, mods["conv"].padding) == ((2,), (2,))
    assert (mods["conv2"].groups, mods["conv2"].dilation) == (3, (2,))
    assert mods["head"].bias is None
    assert _left_over(program) == set()
    assert_shapes_propagated(program)
    assert_same_outputs(program, ep.module(), torch.randn(1, 4, 32))
    assert_same_outputs(program, model, torch.randn(1, 4, 32))


def test_decomposed_core_aten_graph(tmp_path) -> None:
    """convolution, _native_batch_norm_legit_no_training, addmm(permute(w)), max_pool2d_with_indices."""
    model = build_small_cnn().eval()
    ep = _save(model, (torch.randn(1, 3, 16, 16),), tmp_path / "core.pt2", decompose=True)
    targets = {n.target for n in ep.graph.nodes}
    assert {aten.convolution.default, aten._native_batch_norm_legit_no_training.default, aten.addmm.default} <= targets
    program = capture(str(tmp_path / "core.pt2"))
    assert {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Linear"} <= module_types(program)
    assert _left_over(program) == set()
    assert not [n for n in program.graph.nodes if n.target in (aten.permute.default, aten.t.default)]
    assert_same_outputs(program, model, torch.randn(1, 3, 16, 16))


def test_shared_module_and_functional_ops(tmp_path) -> None:
    model = SharedConv().eval()
    ep = _save(model, (torch.randn(1, 4, 8, 8),), tmp_path / "shared.pt2")
    program = capture(str(tmp_path / "shared.pt2"))
    convs = [n.target for n in program.graph.find_nodes(op="call_module") if isinstance(program.modules()[n.target], nn.Conv2d)]
    assert convs == ["conv", "conv"]  # one module called twice, as symbolic_trace would have it
    assert {"ReLU", "ReLU6", "Hardtanh", "AvgPool2d", "Sigmoid", "AdaptiveAvgPool2d", "BatchNorm2d"} <= module_types(program)
    hardtanh = next(m for m in program.modules().values() if type(m) is nn.Hardtanh)
    assert (hardtanh.min_val, hardtanh.max_val) == (-1.0, 1.0)
    assert _left_over(program) == set()
    assert_same_outputs(program, ep.module(), torch.randn(1, 4, 8, 8))


def test_two_inputs_tuple_output_and_shape_override(tmp_path) -> None:
    model = TwoInputs().eval()
    ep = _save(model, (torch.randn(2, 4), torch.randn(2, 5)), tmp_path / "two.pt2")
    program = capture(str(tmp_path / "two.pt2"))
    assert program.meta["input_shapes"] == [[2, 4], [2, 5]]
    out = program.run(*program.example_inputs)
    assert isinstance(out, tuple) and len(out) == 2
    assert_same_outputs(program, ep.module(), *program.example_inputs)
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "two.pt2"), input_shapes=[(2, 4)])
    assert "takes 2 inputs (x, y) but 1 --input-shape was given" in one_line(err)


def test_dynamic_batch_and_overrides(tmp_path) -> None:
    model = build_small_cnn().eval()
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = _save(model, (torch.randn(2, 3, 16, 16),), tmp_path / "dyn.pt2", dynamic_shapes=({0: batch},))
    program = capture(str(tmp_path / "dyn.pt2"))
    assert program.meta["input_shapes"] == [[2, 3, 16, 16]]
    bigger = capture(str(tmp_path / "dyn.pt2"), input_shapes=[(5, 3, 16, 16)])
    assert bigger.meta["input_shapes"] == [[5, 3, 16, 16]]
    assert_same_outputs(bigger, ep.module(), torch.randn(5, 3, 16, 16))
    examples = (torch.randn(3, 3, 16, 16),)
    given = capture(str(tmp_path / "dyn.pt2"), example_inputs=examples)
    torch.testing.assert_close(given.example_inputs[0], examples[0])
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "dyn.pt2"), input_shapes=[(1, 3, 16)])
    message = one_line(err)
    assert message.startswith(f"input shape 1x3x16 does not fit '{tmp_path / 'dyn.pt2'}': node 'conv' (Conv2d) failed: ")


def test_export_archive_with_a_pt_name(tmp_path) -> None:
    model = build_small_cnn().eval()
    _save(model, (torch.randn(1, 3, 16, 16),), tmp_path / "exported.pt")
    program = capture(str(tmp_path / "exported.pt"))
    assert program.meta["source_kind"] == "export"
    assert_same_outputs(program, model, torch.randn(1, 3, 16, 16))


def test_training_mode_export_is_compiled_for_inference(tmp_path) -> None:
    model = build_small_cnn().train()
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 16, 16),)), tmp_path / "train.pt2")
    program = capture(str(tmp_path / "train.pt2"))
    assert program.meta["training_mode_was"] is True
    assert {"BatchNorm2d", "Dropout"} <= module_types(program)
    assert not [n for n in program.graph.nodes if n.op == "get_attr"]
    assert program.modules()["bn"].num_batches_tracked.item() == 0
    assert_same_outputs(program, model.eval(), torch.randn(2, 3, 16, 16))


class _Plumbing(nn.Module):
    """LayerNorm, residual add, SE-style mul, sub/div, cat, view, permute, transpose, mean, flatten: the calls a trace spells in Python."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.LayerNorm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x)) + x
        y = y * torch.sigmoid(y.mean((2, 3), keepdim=True))
        y = torch.cat([(y - 1.0) / 2.0, y.permute(0, 1, 3, 2).transpose(2, 3)], 1)
        return torch.flatten(y.view(1, 8, -1).add(x.reshape(1, 4, -1).repeat(1, 2, 1), alpha=2), 1)


def test_aten_arithmetic_and_plumbing_become_the_calls_a_trace_gives(tmp_path) -> None:
    import operator

    model = _Plumbing().eval()
    x = torch.randn(1, 4, 6, 6)
    _save(model, (x,), tmp_path / "plumbing.pt2")
    program = capture(str(tmp_path / "plumbing.pt2"))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    for plain in (operator.add, operator.mul, operator.sub, operator.truediv, torch.cat, torch.reshape, torch.permute,
                  torch.transpose, torch.mean, torch.flatten):
        assert plain in targets, plain
    assert aten.add.Tensor in targets  # the add with alpha=2 has no operator spelling: it stays ATen
    assert not {aten.mul.Tensor, aten.cat.default, aten.view.default, aten.mean.dim, aten.layer_norm.default} & set(targets)
    assert {"Conv2d", "LayerNorm"} <= module_types(program)
    assert_same_outputs(program, model, torch.randn(1, 4, 6, 6))


def test_a_residual_pt2_saves_on_cpu_int8_with_its_adds_quantized(tmp_path) -> None:
    """aten.add.Tensor left in the graph was neither quantized nor savable by cpu-int8 (not on its loader's allow-list)."""
    import graphopt

    _save(zoo.build("resnet18"), (torch.randn(1, 3, 32, 32),), tmp_path / "r18.pt2")
    result = graphopt.compile(str(tmp_path / "r18.pt2"), target="cpu-int8", output=tmp_path / "out", verify_samples=2,
                              calib_samples=8, measure=False)
    assert result.report.verification
    lowered = {n.target for n in result.artifact.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.quantized.add_relu in lowered or torch.ops.quantized.add in lowered
    assert (tmp_path / "out" / "artifact.json").is_file()
