"""cuda-fp32/fp16 and trt-fp16/int8 where no GPU is present: listed with the reason, exit 3 with one
line and nothing written, ``--defer-engine`` end to end on ONNX Runtime, the engine cache key,
and the fp16 layer choice of cuda-fp16 (device-independent, run here on the CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from graphopt.backends._trt_engine import cache_key, engine_path
from graphopt.backends.cuda import choose_fp32_layers, layers, prepare
from graphopt.capture.safe_pt2 import module_of
from graphopt.errors import UsageError
from graphopt.targets import BackendOption

GPU_TARGETS = ("cuda-fp32", "cuda-fp16", "trt-fp16", "trt-int8")
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="these check the behaviour where no CUDA GPU is present")


def graphopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@no_gpu
def test_targets_lists_the_four_gpu_targets_with_the_reason(tmp_path):
    res = graphopt("targets", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    for name in GPU_TARGETS:
        assert rows[name]["available"] is False
        assert "no CUDA GPU (torch " in rows[name]["why_not"]
    for name in ("trt-fp16", "trt-int8"):
        assert "--defer-engine" in rows[name]["why_not"]
        assert {o["flag"]: o["type"] for o in rows[name]["options"]}["--defer-engine"] == "flag"


@no_gpu
@pytest.mark.parametrize("target", GPU_TARGETS)
def test_compile_for_a_gpu_target_exits_3_with_one_line_and_writes_nothing(tmp_path, target):
    res = graphopt("compile", "zoo:digits_cnn", "--target", target, "-o", "out", cwd=tmp_path)
    assert res.returncode == 3
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"graphopt: backend unavailable: target '{target}' cannot run here: no CUDA GPU")
    if target.startswith("trt-"):
        assert "use --defer-engine" in lines[0]
    assert list(tmp_path.iterdir()) == []


@no_gpu
def test_defer_engine_does_not_apply_to_cuda_targets(tmp_path):
    res = graphopt("compile", "zoo:digits_cnn", "--target", "cuda-fp16", "--defer-engine", "-o", "out", cwd=tmp_path)
    assert res.returncode == 2 and "--defer-engine does not apply to target 'cuda-fp16'" in res.stderr
    assert "trt-fp16, trt-int8" in res.stderr and list(tmp_path.iterdir()) == []


@no_gpu
@pytest.mark.parametrize("target", ["trt-int8", "trt-fp16"])
def test_defer_engine_writes_a_verified_portable_artifact(tmp_path, target):
    pytest.importorskip("onnxconverter_common")
    res = graphopt("compile", "zoo:digits_cnn", "--target", target, "--defer-engine", "-o", "out", "--no-latency", "--json",
                   "--calib-samples", "8", "--verify-samples", "4", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["verification"]["passed"]
    assert report["tensorrt"]["runtime"].startswith("ONNX Runtime on the CPU (engine deferred")
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["artifact.json", "goldens.npz", "model.onnx", "report.json"]
    manifest = json.loads((out / "artifact.json").read_text())
    assert manifest["engine"] == "deferred" and manifest["backend_options"] == {"defer_engine": True}
    assert manifest["files"] == ["model.onnx", "goldens.npz", "engines"] and manifest["opset"] >= 19
    if target == "trt-int8":
        assert report["int8_verification"]["violations"] == [] and manifest["qdq"]["kept_pairs"] == len(manifest["points"])
    # the goldens are the original's outputs on the verification inputs; `verify OUT/` reads them by default
    from graphopt.verify import load_golden

    gold = load_golden(out / "goldens.npz")
    assert len(gold.inputs) == 4 and gold.inputs[0][0].shape == (1, 1, 8, 8)
    res = graphopt("verify", "out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "on ONNX Runtime on the CPU (engine deferred" in res.stdout and "goldens.npz (4 inputs)" in res.stdout
    # the same ONNX, loaded in Python, runs on ONNX Runtime op by op and reproduces the goldens within int8/fp16 tolerance
    import graphopt as go

    art = go.load_artifact(out)
    assert art.engine is None and art.optimize is False
    from graphopt.verify import compare, default_tolerance

    with torch.no_grad():
        metrics = compare(gold.outputs, [art.run(*x) for x in gold.inputs]).metrics
    assert not default_tolerance(art.precision).violations(metrics)


@no_gpu
def test_a_non_deferred_trt_artifact_does_not_load_without_a_gpu(tmp_path):
    """An artifact whose manifest records no --defer-engine was made on a GPU machine: loading it here is exit 3."""
    pytest.importorskip("onnxconverter_common")
    assert graphopt("compile", "zoo:digits_cnn", "--target", "trt-fp16", "--defer-engine", "-o", "out", "--no-latency",
                    "--verify-samples", "2", cwd=tmp_path).returncode == 0
    manifest_path = tmp_path / "out" / "artifact.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["backend_options"] = {"defer_engine": False}
    manifest_path.write_text(json.dumps(manifest))
    res = graphopt("verify", "out", cwd=tmp_path)
    assert res.returncode == 3 and "target 'trt-fp16' cannot run here: no CUDA GPU" in res.stderr
    # goldens are read without unpickling: a goldens.npz holding a pickled object is refused, its code never runs
    import numpy as np

    import graphopt as go
    from graphopt.errors import ArtifactError

    manifest["backend_options"] = {"defer_engine": True}
    manifest_path.write_text(json.dumps(manifest))
    marker = tmp_path / "ran"
    np.savez(tmp_path / "out" / "goldens.npz", meta=np.array([_Payload(marker)], dtype=object))
    with pytest.raises(ArtifactError, match="is not a graphopt golden file"):
        go.load_artifact(tmp_path / "out")
    assert not marker.exists()


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_verify_without_golden_needs_an_artifact_that_has_goldens(tmp_path):
    res = graphopt("compile", "zoo:digits_cnn", "-o", "cpu", "--no-latency", "--verify-samples", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = graphopt("verify", "cpu", cwd=tmp_path)
    assert res.returncode == 2 and "holds no goldens.npz: give --golden" in res.stderr


def test_engine_cache_key_names_gpu_capability_and_tensorrt_version(tmp_path):
    assert cache_key("NVIDIA H200", (9, 0), "10.13.3.9") == "nvidia-h200.sm90.trt10.13.3.9"
    assert cache_key("NVIDIA GeForce RTX 4090", (8, 9), "11.0.0") == "nvidia-geforce-rtx-4090.sm89.trt11.0.0"
    assert cache_key("A/B\\..", (7, 5), "10.0.1+cuda12") == "a-b.sm75.trt10.0.1-cuda12"  # no path separators survive
    gpus, capabilities, versions = ("NVIDIA A100-SXM4-80GB", "NVIDIA H100"), ((8, 0), (9, 0)), ("10.3", "11.0")
    keys = {cache_key(g, c, v) for g in gpus for c in capabilities for v in versions}
    assert len(keys) == 8  # any change of GPU, capability or version is another engine
    assert engine_path(tmp_path, "k") == tmp_path / "engines" / "k.engine"


def test_flag_backend_options_take_booleans_only():
    opt = BackendOption("defer_engine", "", type=bool)
    assert opt.is_flag and opt.type_text() == "flag" and opt.convert(True, "trt-int8") is True
    with pytest.raises(UsageError, match="a flag takes no value"):
        opt.convert("yes", "trt-int8")


# ---------------------------------------------------------------------------------------
# cuda-fp16's layer choice and mixed-precision preparation (device-independent; here on the CPU)


class _Sensitive(nn.Module):
    """``tiny``'s weights (~2e-8) underflow in fp16; the outputs are O(1) in fp32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.tiny, self.c = nn.Linear(16, 16), nn.Linear(16, 16, bias=False), nn.Linear(16, 4)
        with torch.no_grad():
            self.a.weight.mul_(1e3)
            self.tiny.weight.copy_(torch.randn(16, 16) * 2e-8)
            self.c.weight.mul_(1e4)

    def forward(self, x):
        return self.c(self.tiny(self.a(x)))


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_cuda_fp16_keeps_the_sensitive_layer_in_fp32():
    model = _Sensitive().eval()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    gm = module_of(torch.export.export(model, (x,)))
    assert layers(gm) == ["a", "tiny", "c"]
    with torch.no_grad():
        ref = model(x)
        all_fp16 = prepare(gm, "fp16", [], "cpu")
        assert _cos(all_fp16(x), ref) < 0.99  # the underflow is real
        keep = choose_fp32_layers(gm, [(x,)], 0.999, "cpu")
        assert keep == ["tiny"]
        mixed = prepare(gm, "fp16", keep, "cpu")
        out = mixed(x)
    assert out.dtype == torch.float32 and _cos(out, ref) > 0.9999
    assert mixed.get_parameter("tiny.weight").dtype == torch.float32 and mixed.get_parameter("a.weight").dtype == torch.float16


def test_cuda_fp16_preparation_of_a_zoo_model_needs_no_fp32_layer():
    from graphopt import zoo

    model = zoo.build("resnet18").eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = module_of(torch.export.export(model, (x,)))
    assert choose_fp32_layers(gm, [(x,)], 0.999, "cpu") == []
    prepared = prepare(gm, "fp16", [], "cpu")
    assert all(p.dtype == torch.float16 for p in prepared.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in prepared.parameters() if p.dim() == 4)
    with torch.no_grad():
        assert _cos(prepared(x), model(x)) > 0.999
    with pytest.raises(UsageError, match="not in the program"):
        prepare(gm, "fp16", ["nope"], "cpu")
