"""Model files: .pt/.pth pickles (refused unless trusted), state dicts, TorchScript,
corrupt files, unknown formats."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from graphopt.capture import capture
from graphopt.errors import CaptureError
from tests.capture.fixtures_models import SmallCNN, build_small_cnn
from tests.capture.helpers import assert_same_outputs, assert_shapes_propagated, module_types, one_line


@pytest.fixture
def whole_model(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = build_small_cnn()  # training mode, like most saved checkpoints
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    return path, model


def test_pickled_module_is_refused_by_default(whole_model) -> None:
    path, _ = whole_model
    with pytest.raises(CaptureError) as err:
        capture(str(path))
    message = one_line(err)
    assert message.startswith(f"'{path}' holds a pickled nn.Module")
    assert "SmallCNN" in message
    assert "unpickling it runs code from the file, so graphopt refuses by default" in message
    assert "--trust-pickle" in message and ".pt2" in message


def test_pickled_module_with_trust(whole_model) -> None:
    path, model = whole_model
    program = capture(str(path), trust_pickle=True)
    assert program.meta["source_kind"] == "pickle"
    assert program.meta["training_mode_was"] is True
    assert program.meta["input_shapes"] == [[1, 3, 16, 16]]  # SmallCNN.example_input_shape
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= module_types(program)
    assert_shapes_propagated(program)
    assert_same_outputs(program, model.eval(), torch.randn(1, 3, 16, 16))


def test_pickled_module_without_a_shape(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    torch.save(model, tmp_path / "seq.pth")
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "seq.pth"), trust_pickle=True)
    assert "the input shape is unknown; pass --input-shape" in one_line(err)
    program = capture(str(tmp_path / "seq.pth"), trust_pickle=True, input_shapes=[(3, 4)])
    assert_same_outputs(program, model, torch.randn(3, 4))


def test_pickled_module_whose_class_is_gone(user_module, tmp_path, monkeypatch) -> None:
    name, _ = user_module(
        """
        from torch import nn

        class Vanishing(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(2, 2)

            def forward(self, x):
                return self.fc(x)
        """
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(name)
    torch.save(module.Vanishing(), tmp_path / "gone.pt")
    sys.modules.pop(name)
    os.remove(tmp_path / f"{name}.py")
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "gone.pt"), trust_pickle=True, input_shapes=[(1, 2)])
    message = one_line(err)
    assert f"whose class {name}.Vanishing cannot be imported" in message
    assert f"No module named '{name}'" in message


@pytest.mark.parametrize("wrap", [False, True])
def test_state_dict_file_explains_what_to_do(tmp_path, wrap) -> None:
    state = SmallCNN().state_dict()
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": state, "epoch": 3} if wrap else state, path)
    with pytest.raises(CaptureError) as err:
        capture(str(path))
    assert one_line(err) == (
        f"'{path}' holds only weights (a state_dict with {len(state)} tensors), not a model; build the model "
        f"with a factory and load them: graphopt compile pkg.module:build_model --weights {path} "
        "--input-shape 1x3x224x224"
    )


def test_other_objects_are_not_models(tmp_path) -> None:
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "t.pt"))
    assert "holds a Tensor, not a torch.nn.Module" in one_line(err)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("suffix", [".pt", ".pt2"])
def test_torchscript_without_input_shape_is_refused_with_advice(tmp_path, how, suffix) -> None:
    model = build_small_cnn().eval()
    path = tmp_path / f"scripted{suffix}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(1, 3, 16, 16))
        scripted.save(str(path))
    with pytest.raises(CaptureError) as err:
        capture(str(path))
    assert one_line(err) == (
        f"'{path}' is TorchScript, which does not record input shapes; pass --input-shape, e.g. --input-shape 1x3x224x224"
    )


def _corrupt(tmp_path: Path, suffix: str, kind: str) -> Path:
    path = tmp_path / f"{kind}{suffix}"
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 8)
    else:  # a real file cut in half
        full = tmp_path / f"full{suffix}"
        model = build_small_cnn().eval()
        if suffix == ".pt2":
            torch.export.save(torch.export.export(model, (torch.randn(1, 3, 16, 16),)), full)
        else:
            torch.save(model.state_dict(), full)
        data = full.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_pt_files(tmp_path, kind) -> None:
    path = _corrupt(tmp_path, ".pt", kind)
    with pytest.raises(CaptureError) as err:
        capture(str(path))
    assert one_line(err).startswith(f"'{path}' is not a readable PyTorch file: ")


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_corrupt_pt2_files(tmp_path, kind) -> None:
    path = _corrupt(tmp_path, ".pt2", kind)
    with pytest.raises(CaptureError) as err:
        capture(str(path))
    assert one_line(err).startswith(f"'{path}' is not a readable torch.export archive: ")


def test_missing_file(tmp_path) -> None:
    for name in ("model.pt2", "model.pth", "model.pt"):
        with pytest.raises(CaptureError) as err:
            capture(str(tmp_path / name))
        assert one_line(err) == f"'{tmp_path / name}' does not exist"


def test_unknown_formats(tmp_path) -> None:
    (tmp_path / "model.h5").write_bytes(b"\x89HDF")
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path / "model.h5"))
    assert one_line(err) == (
        f"'{tmp_path / 'model.h5'}': unknown model format '.h5'; graphopt reads .pt2 (torch.export), "
        ".pt/.pth (PyTorch, TorchScript), .onnx, pkg.module:callable, zoo:NAME"
    )
    with pytest.raises(CaptureError) as err:
        capture("model.onnx")
    assert one_line(err) == "'model.onnx' does not exist"
    with pytest.raises(CaptureError) as err:
        capture("resnet")
    assert one_line(err).startswith("'resnet': unknown model source; graphopt reads .pt2")
    with pytest.raises(CaptureError) as err:
        capture(str(tmp_path))
    assert "is a folder, not a model file" in one_line(err)


def test_weights_only_apply_to_built_models(whole_model) -> None:
    path, _ = whole_model
    with pytest.raises(CaptureError) as err:
        capture(str(path), weights=path)
    assert "--weights applies to pkg.module:callable and zoo:NAME sources" in one_line(err)
