"""On a GPU machine (``bench/gpu/run.sh`` runs these): every zoo model compiles and verifies on the four GPU
targets, CUDA graphs replay what eager computes, TensorRT engines are built, cached per GPU and checked
against the goldens, and the report shows per-layer precision. Skipped, with the reason, elsewhere."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.errors import VerificationError
from tests.backends.conftest import zoo_shape

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason=f"needs a CUDA GPU (torch {torch.__version__}: none available)"),
]


def _needs_tensorrt() -> None:
    pytest.importorskip("tensorrt", reason="needs TensorRT (pip install 'graphopt[tensorrt]')")


def _compile(name: str, target: str, out=None, **kw):
    return graphopt.compile(zoo.build(name), target=target, input_shapes=[zoo_shape(name, 64)], calib_samples=16,
                            verify_samples=4, measure=False, output=out, **kw)


@pytest.mark.parametrize("target", ["cuda-fp32", "cuda-fp16", "trt-fp16", "trt-int8"])
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_verifies_on_gpu_target(name, target, tmp_path):
    if target.startswith("trt-"):
        _needs_tensorrt()
    result = _compile(name, target, tmp_path / "out")
    v = result.report.verification
    assert v.passed and not v.violations
    assert v.metrics.cosine >= {"cuda-fp32": 0.9999, "cuda-fp16": 0.999, "trt-fp16": 0.999, "trt-int8": 0.98}[target]


def test_cuda_graph_replay_matches_eager():
    result = _compile("resnet18", "cuda-fp32")
    art = result.artifact
    x = torch.randn(zoo_shape("resnet18", 64), generator=torch.Generator().manual_seed(3))
    replayed = art.run(x)
    with torch.inference_mode():
        eager = art.module(x.cuda()).cpu()
    assert art.replay is not None and torch.allclose(replayed, eager, rtol=1e-5, atol=1e-5)
    y = torch.randn(2, *x.shape[1:])  # another shape runs eagerly
    assert art.run(y).shape[0] == 2


def test_cuda_fp16_artifact_round_trips_its_fp32_layers(tmp_path):
    result = _compile("resnet18", "cuda-fp16", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "artifact.json").read_text())
    assert manifest["fp32_layers"] == result.artifact.fp32_layers and manifest["cuda_graphs"] is True
    loaded = graphopt.load_artifact(tmp_path / "out")
    x = torch.randn(zoo_shape("resnet18", 64))
    assert torch.allclose(loaded.run(x), result.artifact.run(x), atol=1e-3)


def test_trt_int8_report_shows_int8_layers_and_caches_the_engine(tmp_path):
    _needs_tensorrt()
    from graphopt.backends._trt_engine import current_key, engine_path

    result = _compile("resnet18", "trt-int8", tmp_path / "out")
    info = result.report.to_json()["tensorrt"]
    assert info["engine"] == current_key() and info["layer_precisions"].get("int8", 0) >= 10  # resnet18: 20 convs + fc
    assert engine_path(tmp_path / "out", current_key()).is_file()


def test_deferred_artifact_builds_checks_and_caches_on_first_load(tmp_path):
    _needs_tensorrt()
    from graphopt.backends._trt_engine import current_key, engine_path

    _compile("resnet18", "trt-int8", tmp_path / "out", backend_options={"defer_engine": True})
    cached = engine_path(tmp_path / "out", current_key())
    assert cached.is_file()  # the compile loaded it back here: built, checked, cached
    shutil.copytree(tmp_path / "out", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "engines")
    art = graphopt.load_artifact(tmp_path / "copy")
    assert art.engine is not None and engine_path(tmp_path / "copy", current_key()).is_file()
    stamp = engine_path(tmp_path / "copy", current_key()).stat().st_mtime_ns
    graphopt.load_artifact(tmp_path / "copy")  # the second load reads the cache
    assert engine_path(tmp_path / "copy", current_key()).stat().st_mtime_ns == stamp


def test_engine_that_misses_the_goldens_is_not_cached(tmp_path):
    _needs_tensorrt()
    from graphopt.backends._trt_engine import ENGINE_DIR

    _compile("resnet18", "trt-fp16", tmp_path / "out", backend_options={"defer_engine": True})
    shutil.rmtree(tmp_path / "out" / ENGINE_DIR)
    gold = dict(np.load(tmp_path / "out" / "goldens.npz"))
    for k in [k for k in gold if k.startswith("output_")]:
        gold[k] = -gold[k]  # goldens the engine cannot match
    np.savez(tmp_path / "out" / "goldens.npz", **gold)
    with pytest.raises(VerificationError, match="no engine was cached"):
        graphopt.load_artifact(tmp_path / "out")
    assert not (tmp_path / "out" / ENGINE_DIR).exists() or not any((tmp_path / "out" / ENGINE_DIR).iterdir())
