"""nn.Module sources: traced copy in eval mode, the user's model untouched, input checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt.capture import capture
from graphopt.errors import CaptureError
from tests.capture.fixtures_models import OptionalArg, SmallCNN, TwoInputs, build_small_cnn
from tests.capture.helpers import assert_same_outputs, assert_shapes_propagated, module_types, one_line


def test_module_capture_is_module_level_and_exact() -> None:
    model = build_small_cnn().eval()
    program = capture(model, input_shapes=[(1, 3, 16, 16)])
    assert module_types(program) == {"Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Flatten", "Dropout", "Linear"}
    assert_shapes_propagated(program)
    assert program.graph.find_nodes(op="call_module", target="fc")[0].meta["tensor_meta"].shape == (1, 10)
    assert program.meta == {"source": "SmallCNN", "source_kind": "module", "input_shapes": [[1, 3, 16, 16]]}
    expected_input = torch.randn((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(program.example_inputs[0], expected_input, rtol=0, atol=0)
    assert_same_outputs(program, model, *program.example_inputs)
    assert_same_outputs(program, model, torch.randn(1, 3, 16, 16))


def test_user_model_is_never_modified() -> None:
    model = build_small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture(model, input_shapes=[(1, 3, 16, 16)])

    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert program.meta["training_mode_was"] is True
    assert not program.graph_module.training
    assert not any(m.training for m in program.graph_module.modules())

    user_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not user_ptrs & {t.data_ptr() for t in program.graph_module.state_dict().values()}
    with torch.no_grad():  # a pass rewriting weights in place touches only the copy
        for p in program.graph_module.parameters():
            p.mul_(2.0)
    torch.testing.assert_close(model.fc.weight, before["fc.weight"], rtol=0, atol=0)
    # the Program computes what the model computes in eval mode
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        for p in program.graph_module.parameters():
            p.div_(2.0)
    reference = build_small_cnn().eval()
    assert_same_outputs(program, reference, x)


def test_eval_mode_model_records_nothing() -> None:
    program = capture(build_small_cnn().eval(), input_shapes=[(1, 3, 16, 16)])
    assert "training_mode_was" not in program.meta


def test_example_inputs_fix_shapes_and_values() -> None:
    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 5)
    program = capture(model, example_inputs=(x, y))
    assert program.meta["input_shapes"] == [[2, 4], [2, 5]]
    assert [s.name for s in program.input_specs] == ["x", "y"]
    torch.testing.assert_close(program.example_inputs[0], x)
    assert program.example_inputs[0] is not x
    assert_same_outputs(program, model, x, y)


def test_example_attribute_gives_the_shape() -> None:
    program = capture(build_small_cnn())  # SmallCNN.example_input_shape
    assert program.meta["input_shapes"] == [[1, 3, 16, 16]]


def test_shapes_given_as_text_and_lists() -> None:
    program = capture(TwoInputs(), input_shapes=["3x4", [3, 5]])
    assert program.meta["input_shapes"] == [[3, 4], [3, 5]]


def test_forward_defaults_keep_their_value() -> None:
    model = OptionalArg().eval()
    program = capture(model, input_shapes=[(2, 4)])
    assert program.meta["input_shapes"] == [[2, 4]]
    assert_same_outputs(program, model, torch.randn(2, 4))
    both = capture(model, input_shapes=[(2, 4), (2, 2)])
    x, b = torch.randn(2, 4), torch.randn(2, 2)
    assert_same_outputs(both, model, x, b)


def test_no_shape_is_an_error() -> None:
    with pytest.raises(CaptureError) as err:
        capture(TwoInputs())
    message = one_line(err)
    assert "the TwoInputs module: the input shape is unknown" in message
    assert "input_shapes=" in message


def test_shapes_and_example_inputs_together_is_an_error() -> None:
    with pytest.raises(CaptureError, match="not both"):
        capture(SmallCNN(), input_shapes=[(1, 3, 16, 16)], example_inputs=(torch.randn(1, 3, 16, 16),))


@pytest.mark.parametrize("shapes", [[(1, 0, 4)], [(1, -3)], [("a", 2)], []])
def test_invalid_shapes_are_an_error(shapes: list) -> None:
    with pytest.raises(CaptureError) as err:
        capture(TwoInputs(), input_shapes=shapes)
    one_line(err)


def test_wrong_number_of_inputs() -> None:
    with pytest.raises(CaptureError) as err:
        capture(SmallCNN(), input_shapes=[(1, 3, 16, 16), (1, 3, 16, 16)])
    assert "takes 1 input (x) but 2 --input-shape were given" in one_line(err)
    with pytest.raises(CaptureError) as err:
        capture(TwoInputs(), input_shapes=[(1, 4)])
    assert "takes 2 inputs (x, y) but 1 --input-shape was given" in one_line(err)
    with pytest.raises(CaptureError) as err:
        capture(TwoInputs(), example_inputs=(torch.randn(1, 4),))
    assert "takes 2 inputs (x, y) but 1 example input was given" in one_line(err)


def test_shape_that_does_not_fit_names_the_node() -> None:
    with pytest.raises(CaptureError) as err:
        capture(SmallCNN(), input_shapes=[(16, 16)])
    message = one_line(err)
    assert message.startswith("input shape 16x16 does not fit the SmallCNN module: node 'conv' (Conv2d) failed: ")
    assert "Expected 3D (unbatched) or 4D (batched) input" in message

    with pytest.raises(CaptureError) as err:
        capture(SmallCNN(), input_shapes=[(1, 3, 32, 32)])
    message = one_line(err)
    assert "node 'fc' (Linear) failed: mat1 and mat2 shapes cannot be multiplied" in message


def test_zoo_shape_that_does_not_fit() -> None:
    with pytest.raises(CaptureError) as err:
        capture("zoo:digits_cnn", input_shapes=[(1, 3, 8, 8)])
    message = one_line(err)
    assert message.startswith("input shape 1x3x8x8 does not fit 'zoo:digits_cnn': node ")
    assert "(Conv2d) failed: " in message


class _Untraceable(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x
        return -x


def test_control_flow_error_points_at_the_if() -> None:
    import inspect

    source_lines, first = inspect.getsourcelines(_Untraceable.forward)
    line = first + next(i for i, s in enumerate(source_lines) if "if x.sum() > 0:" in s)
    with pytest.raises(CaptureError) as err:
        capture(_Untraceable(), input_shapes=[(1, 4)])
    message = one_line(err)
    assert f"test_module.py:{line} (`if x.sum() > 0:`)" in message
    assert message.startswith("cannot trace the _Untraceable module at ")
    assert "torch.where" in message and "torch.export" in message

