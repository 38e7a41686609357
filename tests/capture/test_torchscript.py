"""TorchScript files as sources: traced zoo models compile without --trust-pickle and verify
against the loaded ScriptModule; content sniffing; control flow and bad files exit 2.

``GRAPHOPT_TS_FULL=1`` compiles every zoo model (default: three representative ones).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.capture import capture
from graphopt.capture.torchscript import ScriptReference
from graphopt.compiler import load_artifact
from graphopt.plugins import default_host
from graphopt.verify import compare, default_tolerance
from tests.test_cli import assert_fails
from tests.test_cli import graphopt as run_cli

SIZE = 32
FULL = os.environ.get("GRAPHOPT_TS_FULL") == "1"
MODELS = zoo.names() if FULL else ["resnet18", "shufflenet_v2", "digits_cnn"]
#: every target available here (a new backend's targets join by registering); shufflenet_v2 is converted via ONNX
TARGETS = [t.name for t in default_host().targets if t.backend.unavailable_reason() is None]
EVERY_TARGET_MODELS = zoo.names() if FULL else ["resnet18", "shufflenet_v2"]


def shape_of(name: str) -> tuple[int, ...]:
    return zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, SIZE, SIZE)


def traced(name: str, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(zoo.build(name).eval(), torch.randn(shape_of(name))).save(str(path))
    return path


@pytest.mark.parametrize("name", MODELS)
def test_traced_zoo_model_compiles_on_cpu_int8_without_trust_pickle(tmp_path, name):
    path = traced(name, tmp_path / f"{name}.pt")
    result = graphopt.compile(str(path), target="cpu-int8", input_shapes=[shape_of(name)], verify_samples=2,
                              calib_samples=16, measure=False)
    assert result.program.meta["source_kind"] == "torchscript"
    assert result.report.extra["reference"].startswith("TorchScript")
    assert result.report.verification


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", EVERY_TARGET_MODELS)
def test_traced_zoo_model_compiles_on_every_target_and_matches_the_script_module(tmp_path, name, target):
    path = traced(name, tmp_path / f"{name}.pt")
    out = tmp_path / "out"
    result = graphopt.compile(str(path), target=target, input_shapes=[shape_of(name)], output=out, verify_samples=2,
                              calib_samples=16, measure=False)
    assert result.program.meta["source_kind"] == "torchscript"
    assert result.report.extra["reference"].startswith("TorchScript")
    assert result.report.verification
    # independently of the compile's own check: the saved artifact, loaded back, against the ScriptModule itself
    module = torch.jit.load(str(path)).eval()
    artifact = load_artifact(out)
    inputs = [torch.randn(shape_of(name), generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)]
    with torch.no_grad():
        comparison = compare([module(x) for x in inputs], [artifact.run(x) for x in inputs])
    tolerance = default_tolerance(result.artifact.precision)
    assert not tolerance.violations(comparison.metrics), (target, comparison.metrics)


def test_capture_is_module_level_and_the_reference_is_the_script_module(tmp_path):
    path = traced("resnet18", tmp_path / "model.pt")
    program = capture(str(path), input_shapes=[(1, 3, SIZE, SIZE)])
    assert isinstance(program.reference, ScriptReference)
    kinds = {type(m) for m in program.modules().values()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Linear} <= kinds
    x = program.example_inputs[0]
    torch.testing.assert_close(program.run(x), program.run_reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(program.run(x), zoo.build("resnet18").eval()(x), atol=1e-5, rtol=1e-5)


def test_a_torchscript_zip_named_pth_is_read_by_content(tmp_path):
    path = traced("digits_cnn", tmp_path / "weights.pth")
    program = capture(str(path), input_shapes=[shape_of("digits_cnn")])
    assert program.meta["source_kind"] == "torchscript"


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y * 2
        return y


def test_data_dependent_control_flow_exits_2_naming_the_method(tmp_path):
    path = tmp_path / "branchy.pt"
    torch.jit.script(_Branchy()).save(str(path))
    result = run_cli("compile", str(path), "--target", "cpu-fp32", "--input-shape", "1x3x8x8", "-o", str(tmp_path / "out"),
                     cwd=tmp_path)
    line = assert_fails(result, 2, "TorchScript method 'forward'", "`if y.sum() > 0:`", "torch.jit.trace")
    assert "test_torchscript.py" in line
    assert not (tmp_path / "out").exists()


def _torchscript_with_payload(tmp_path: Path, marker: Path) -> Path:
    """A real TorchScript zip whose constants.pkl asks the unpickler for os.system."""
    good = traced("digits_cnn", tmp_path / "good.pt")

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("constants.pkl"):
                data = pickle.dumps(Payload(), protocol=2)
            dst.writestr(item, data)
    return bad


def test_loading_torchscript_does_not_unpickle_arbitrary_objects(tmp_path):
    marker = tmp_path / "pwned"
    bad = _torchscript_with_payload(tmp_path, marker)
    result = run_cli("compile", str(bad), "--target", "cpu-fp32", "--input-shape", "1x1x8x8", "-o", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert_fails(result, 2, "is not a loadable TorchScript file")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_truncated_torchscript_exits_2(tmp_path):
    good = traced("digits_cnn", tmp_path / "good.pt")
    bad = tmp_path / "cut.pt"
    data = good.read_bytes()
    buf = io.BytesIO(data[: len(data) // 2])
    bad.write_bytes(buf.getvalue())
    result = run_cli("compile", str(bad), "--target", "cpu-fp32", "--input-shape", "1x1x8x8", "-o", str(tmp_path / "out"),
                     cwd=tmp_path)
    assert_fails(result, 2)
    assert not (tmp_path / "out").exists()
