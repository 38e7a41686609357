"""Every zoo model compiles and verifies on cpu-fp32, cpu-int8 and ort-int8 (random calibration data,
default tolerances), plus regression tests for the internal errors the new families exposed."""

from __future__ import annotations

import pytest
import torch
import torch.ao.nn.quantized as nnq

import graphopt
from graphopt import zoo
from graphopt.compiler import load_artifact
from graphopt.errors import VerificationError
from tests.backends.conftest import zoo_shape

TARGETS = ("cpu-fp32", "cpu-int8", "ort-int8")


#: Random-weight nets whose *quantization* error (simulated int8 vs fp32, before any lowering)
#: misses the default int8 cosine bound of 0.98 with random calibration batches at 48x48:
#: DenseNet-121 cosine ~0.955 (SQNR ~10.5 dB) on both int8 targets; the lowering error is within
#: its bound. (EfficientNet-B0 was at 0.96 when its BatchNorm statistics came from 64x64 inputs;
#: from 112x112 ones it reaches 0.993.) Strict: the day it passes, this list must shrink.
#: ShuffleNetV2 on cpu-int8: 0.9799 with 16 batches (0.974 with 32, 0.966 at 64x64; ort-int8 passes).
INT8_QUALITY_OPEN = {"densenet121": ("cpu-int8", "ort-int8"), "shufflenet_v2": ("cpu-int8",)}


def _cases():
    for name in zoo.names():
        for target in TARGETS:
            marks = [pytest.mark.xfail(strict=True, raises=VerificationError,
                                       reason="int8 quantization error of this random-weight net: see INT8_QUALITY_OPEN")
                     ] if target in INT8_QUALITY_OPEN.get(name, ()) else []
            yield pytest.param(name, target, marks=marks, id=f"{name}-{target}")


@pytest.mark.slow
@pytest.mark.parametrize("name, target", list(_cases()))
def test_zoo_model_verifies_on_target(name, target):
    result = graphopt.compile(zoo.build(name), target=target, input_shapes=[zoo_shape(name)], calib_samples=16,
                              verify_samples=4, measure=False)  # raises (exit 1/5) on any failure
    # 16 calibration batches: with 4, MobileNetV2's and ShuffleNetV2's ranges are noise (cosine 0.975-0.979)
    v = result.report.verification
    assert v.passed and not v.violations
    assert v.metrics.cosine >= (0.9999 if target == "cpu-fp32" else 0.98)


def test_densenet121_cpu_int8_lowers_unfoldable_batchnorm(lowered_zoo, host, tmp_path):
    """Was exit 5: 'cannot assign float as buffer scale' lowering a pre-activation BatchNorm to a quantized one."""
    _, program, artifact, samples = lowered_zoo("densenet121", "cpu-int8")
    bns = [m for m in artifact.graph_module.modules() if isinstance(m, nnq.BatchNorm2d)]
    assert len(bns) >= 58  # 6+12+24+16 dense layers' first BN, plus the transitions' and the final one
    assert all(isinstance(m.scale, torch.Tensor) and m.scale.item() > 0 for m in bns)
    artifact.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a", host=host)
    assert [float(m.scale) for m in loaded.graph_module.modules() if isinstance(m, nnq.BatchNorm2d)] == [float(m.scale) for m in bns]
    assert torch.equal(loaded.run(*samples[0]), artifact.run(*samples[0]))


def test_squeezenet_ort_int8_exports_typed_requant(lowered_zoo):
    """Was exit 5: onnx-graphsurgeon refused the untyped Q/DQ pair inserted after the classifier's data movement."""
    import onnx

    _, program, artifact, samples = lowered_zoo("squeezenet", "ort-int8")
    model = onnx.load_from_string(artifact.model_bytes)
    requant = [n for n in model.graph.node if "_requant_" in n.name]
    assert requant
    out = program.run(*samples[0])
    assert torch.nn.functional.cosine_similarity(artifact.run(*samples[0]).flatten(), out.flatten(), dim=0) > 0.999
