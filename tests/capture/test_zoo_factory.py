"""zoo:NAME and pkg.module:callable sources, and --weights."""

from __future__ import annotations

import sys

import pytest
import torch

from graphopt import zoo
from graphopt.capture import capture
from graphopt.errors import CaptureError
from tests.capture.fixtures_models import build_small_cnn, build_without_shape
from tests.capture.helpers import assert_same_outputs, assert_shapes_propagated, line_of, module_types, one_line

FIX = "tests.capture.fixtures_models"


# --------------------------------------------------------------------------- zoo


def test_zoo_model_at_its_own_shape() -> None:
    program = capture("zoo:digits_cnn")
    assert program.meta == {"source": "zoo:digits_cnn", "source_kind": "zoo", "input_shapes": [list(zoo.get("digits_cnn").input_shape)]}
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= module_types(program)
    assert_shapes_propagated(program)
    assert_same_outputs(program, zoo.build("digits_cnn"), *program.example_inputs)


def test_zoo_model_at_a_smaller_shape() -> None:
    program = capture("zoo:resnet18", input_shapes=[(1, 3, 64, 64)])
    assert program.meta["input_shapes"] == [[1, 3, 64, 64]]
    assert_same_outputs(program, zoo.build("resnet18"), torch.randn(1, 3, 64, 64))


def test_unknown_zoo_name_lists_the_zoo() -> None:
    with pytest.raises(CaptureError) as err:
        capture("zoo:resnet9000")
    message = one_line(err)
    assert "unknown zoo model 'resnet9000'" in message
    for name in zoo.names():
        assert repr(name) in message


def test_zoo_with_weights(tmp_path) -> None:
    trained = zoo.build("digits_cnn", seed=3)
    torch.save(trained.state_dict(), tmp_path / "digits.pt")
    program = capture("zoo:digits_cnn", weights=tmp_path / "digits.pt")
    assert_same_outputs(program, trained, torch.randn(1, 1, 8, 8))


# --------------------------------------------------------------------------- factories


def test_factory_uses_the_models_example_shape() -> None:
    program = capture(f"{FIX}:build_small_cnn")
    assert program.meta == {"source": f"{FIX}:build_small_cnn", "source_kind": "factory", "input_shapes": [[1, 3, 16, 16]]}
    assert "Conv2d" in module_types(program)
    assert_shapes_propagated(program)
    assert_same_outputs(program, build_small_cnn().eval(), torch.randn(1, 3, 16, 16))


def test_factory_shape_override_and_module_instance() -> None:
    program = capture(f"{FIX}:build_without_shape", input_shapes=[(2, 4), (2, 5)])
    assert_same_outputs(program, build_without_shape().eval(), torch.randn(2, 4), torch.randn(2, 5))
    from tests.capture import fixtures_models

    program = capture(f"{FIX}:SMALL")  # a model object, not a factory: copied, not modified
    assert fixtures_models.SMALL.training
    assert program.meta["input_shapes"] == [[1, 3, 16, 16]]


def test_factory_without_a_shape() -> None:
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_without_shape")
    assert one_line(err) == (
        f"'{FIX}:build_without_shape': the input shape is unknown; pass --input-shape, e.g. --input-shape 1x3x224x224"
    )


def test_factory_returning_something_else() -> None:
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_not_a_module")
    assert one_line(err) == f"{FIX}:build_not_a_module returned int, expected a torch.nn.Module"


def test_factory_module_missing() -> None:
    with pytest.raises(CaptureError) as err:
        capture("no_such_pkg.models:build")
    message = one_line(err)
    assert "'no_such_pkg.models:build': no module named 'no_such_pkg'" in message


def test_factory_attribute_missing() -> None:
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_everything")
    message = one_line(err)
    assert "has no attribute 'build_everything'" in message
    assert "'build_small_cnn'" in message  # what is there


def test_factory_exception_names_the_line() -> None:
    from tests.capture import fixtures_models

    line = line_of(__import__("pathlib").Path(fixtures_models.__file__), 'raise ValueError("no weights')
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_raises")
    message = one_line(err)
    assert message.startswith(f"'{FIX}:build_raises' raised ValueError at ")
    assert f"fixtures_models.py:{line}" in message
    assert "no weights for this configuration" in message


def test_factory_in_the_working_directory(user_module) -> None:
    name, _ = user_module(
        """
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
            model.example_input_shape = (1, 3, 8, 8)
            return model
        """
    )
    path_before = list(sys.path)
    program = capture(f"{name}:build")
    assert sys.path == path_before  # the working directory was added only while importing
    assert module_types(program) == {"Conv2d", "BatchNorm2d", "ReLU", "Flatten", "Linear"}
    reference = sys.modules[name].build().eval()
    assert_same_outputs(program, reference, torch.randn(1, 3, 8, 8))


def test_factory_with_an_import_error_inside(user_module) -> None:
    name, path = user_module("import torch\nimport definitely_not_installed\n\ndef build():\n    pass\n")
    with pytest.raises(CaptureError) as err:
        capture(f"{name}:build")
    message = one_line(err)
    assert f"importing '{name}' failed at {path.name}:2" in message
    assert "No module named 'definitely_not_installed'" in message


def test_factory_with_a_syntax_error(user_module) -> None:
    name, path = user_module("def build(:\n    pass\n")
    with pytest.raises(CaptureError) as err:
        capture(f"{name}:build")
    message = one_line(err)
    assert "SyntaxError" in message and f"{path.name}:1" in message


def test_factory_named_by_file() -> None:
    with pytest.raises(CaptureError) as err:
        capture("models.py:build")
    assert "name the module, not the file: 'models:build'" in one_line(err)


def test_untraceable_factory_model(user_module) -> None:
    name, path = user_module(
        """
        import torch
        from torch import nn

        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)

            def forward(self, x):
                y = self.fc(x)
                if x.sum() > 0:
                    return y
                return -y

        def build():
            return Gated()
        """
    )
    line = line_of(path, "if x.sum() > 0:")
    with pytest.raises(CaptureError) as err:
        capture(f"{name}:build", input_shapes=[(1, 4)])
    assert one_line(err) == (
        f"cannot trace '{name}:build' at {path.name}:{line} (`if x.sum() > 0:`): data-dependent control flow "
        "can't be captured by torch.fx; rewrite it with torch.where, move it out of forward, or export with "
        "torch.export and compile the .pt2"
    )


def test_other_tracing_errors_keep_the_first_line(user_module) -> None:
    name, path = user_module(
        """
        from torch import nn

        class Counting(nn.Module):
            def forward(self, x):
                n = len(x)
                return x * n

        def build():
            return Counting()
        """
    )
    line = line_of(path, "n = len(x)")
    with pytest.raises(CaptureError) as err:
        capture(f"{name}:build", input_shapes=[(2, 4)])
    message = one_line(err)
    assert message.startswith(f"cannot trace '{name}:build' at {path.name}:{line} (`n = len(x)`): RuntimeError: ")
    assert "'len' is not supported" in message


# --------------------------------------------------------------------------- --weights


def _trained_small_cnn() -> torch.nn.Module:
    model = build_small_cnn()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.bn.running_mean.add_(0.3)
    return model.eval()


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_weights_are_loaded_into_the_factory_model(tmp_path, wrap) -> None:
    trained = _trained_small_cnn()
    state = trained.state_dict()
    torch.save(state if wrap is None else {wrap: state, "epoch": 7}, tmp_path / "w.pth")
    program = capture(f"{FIX}:build_small_cnn", weights=str(tmp_path / "w.pth"))
    assert_same_outputs(program, trained, torch.randn(1, 3, 16, 16))


def test_mismatched_weights_list_the_keys(tmp_path) -> None:
    state = build_small_cnn().state_dict()
    del state["fc.weight"], state["bn.running_var"]
    state["head.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_small_cnn", weights=tmp_path / "w.pt")
    message = one_line(err)
    assert f"--weights '{tmp_path / 'w.pt'}' does not fit '{FIX}:build_small_cnn'" in message
    assert "missing keys: 'bn.running_var', 'fc.weight'" in message
    assert "unexpected keys: 'head.weight'" in message


def test_weights_with_the_wrong_shape(tmp_path) -> None:
    state = build_small_cnn().state_dict()
    state["fc.weight"] = torch.zeros(5, 512)
    torch.save(state, tmp_path / "w.pt")
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_small_cnn", weights=tmp_path / "w.pt")
    assert "'fc.weight' is 5x512 in the file but 10x512 in the model" in one_line(err)


def test_weights_file_problems(tmp_path) -> None:
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_small_cnn", weights=tmp_path / "missing.pt")
    assert "does not exist" in one_line(err)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_small_cnn", weights=tmp_path / "list.pt")
    assert "holds a list, not a state_dict" in one_line(err)
    torch.save(build_small_cnn(), tmp_path / "whole.pt")
    with pytest.raises(CaptureError) as err:
        capture(f"{FIX}:build_small_cnn", weights=tmp_path / "whole.pt")
    assert "holds pickled Python objects, not just a state_dict" in one_line(err)


def test_iterating_over_a_tensor_is_not_called_control_flow(user_module) -> None:
    name, path = user_module(
        """
        from torch import nn

        class Rows(nn.Module):
            def forward(self, x):
                return sum(row for row in x)

        def build():
            return Rows()
        """
    )
    with pytest.raises(CaptureError) as err:
        capture(f"{name}:build", input_shapes=[(2, 4)])
    message = one_line(err)
    assert f"{path.name}:{line_of(path, 'for row in x')}" in message
    assert "TraceError: Proxy object cannot be iterated;" in message
