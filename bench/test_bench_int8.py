"""int8 latency: every graphopt target against eager fp32 and the references to beat.

Run: python -m pytest bench/test_bench_int8.py --benchmark-only --benchmark-group-by=group

Rows per model (ResNet-18, MobileNetV2, ResNet-50) and batch (1, 8): eager fp32,
cpu-fp32, cpu-int8 (x86 and fbgemm engines), ort-fp32, ort-int8, and, in the same run,
the references: torch.ao's deprecated FX int8 flow (x86 and fbgemm) and ONNX Runtime's
own ``quantize_static`` (QDQ, U8S8, per channel) on our ort-fp32 model. The builders
live in ``bench/measure_cpu_int8.py`` and ``bench/measure_ort.py``.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bench import measure_cpu_int8, measure_ort
from graphopt import zoo
from graphopt.compiler import compile as compile_model

MODELS = ["resnet18", "mobilenet_v2", "resnet50"]
VARIANTS = [
    "eager-fp32", "cpu-fp32", "cpu-int8-x86", "cpu-int8-fbgemm", "ao-fx-x86", "ao-fx-fbgemm",
    "ort-fp32", "ort-int8", "ort-quantize-static",
]
CALIBRATION_SAMPLES = 4
_TMP = Path(tempfile.mkdtemp(prefix="graphopt-bench-int8-"))


def _shape(name: str, batch: int) -> tuple[int, ...]:
    return (batch, *zoo.get(name).input_shape[1:])


@functools.lru_cache(maxsize=None)
def _calibration(name: str, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(_shape(name, batch), generator=g) for _ in range(CALIBRATION_SAMPLES)]


def _with_engine(fn: Callable[..., object], engine: str) -> Callable[..., object]:
    def run(x: torch.Tensor) -> object:
        torch.backends.quantized.engine = engine
        return fn(x)

    return run


@functools.lru_cache(maxsize=None)
def _ort(name: str, batch: int) -> dict[str, Callable[..., object]]:
    host = measure_ort._host()
    calib = _calibration(name, batch)
    directory = _TMP / f"{name}-b{batch}"
    directory.mkdir(parents=True, exist_ok=True)
    fp32, fp32_file = measure_ort.build(host, name, "ort-fp32", calib, directory)
    int8, _ = measure_ort.build(host, name, "ort-int8", calib, directory)
    reference, _ = measure_ort.build_reference(fp32_file, calib, directory)
    return {"ort-fp32": fp32.run, "ort-int8": int8.run, "ort-quantize-static": reference}


@functools.lru_cache(maxsize=None)
def _build(name: str, variant: str, batch: int) -> Callable[..., object]:
    calib = _calibration(name, batch)
    if variant == "eager-fp32":
        return zoo.build(name)
    if variant == "cpu-fp32":
        return compile_model(f"zoo:{name}", target="cpu-fp32", input_shapes=[_shape(name, batch)], verify_samples=1,
                             measure=False).artifact.run
    if variant.startswith("cpu-int8-"):
        engine = variant.rsplit("-", 1)[1]
        return measure_cpu_int8.build_int8(name, 0, engine, calib).run
    if variant.startswith("ao-fx-"):
        engine = variant.rsplit("-", 1)[1]
        return _with_engine(measure_cpu_int8.build_reference(name, engine, calib), engine)
    return _ort(name, batch)[variant]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", MODELS)
def test_int8_latency(benchmark, name, batch, variant):
    benchmark.group = f"{name} batch {batch}"
    fn = _build(name, variant, batch)
    x = torch.randn(_shape(name, batch), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(x,), warmup_rounds=3, rounds=15 if batch == 1 else 6, iterations=1)
