"""Does pruning buy latency in proportion to the MACs it removes? ResNet-50, cpu-fp32.

Run: python -m pytest bench/test_bench_prune.py --benchmark-only --benchmark-group-by=group
Each row's ``extra_info`` holds the model's MACs, so medians and MAC ratios come from one run.
"""

from __future__ import annotations

import functools

import pytest
import torch

from graphopt import zoo
from graphopt.compiler import compile as compile_model

PIPELINES = {
    "fused": "fuse-conv-bn-relu,dce",
    "pruned-0.3": "fuse-conv-bn-relu,prune-channels{ratio=0.3},dce",
    "pruned-0.3-r8": "fuse-conv-bn-relu,prune-channels{ratio=0.3,round-to=8},dce",
}


@functools.lru_cache(maxsize=None)
def _compiled(name: str, pipeline: str, batch: int):
    shape = (batch, *zoo.get(name).input_shape[1:])
    result = compile_model(f"zoo:{name}", target="cpu-fp32", input_shapes=[shape], pipeline=pipeline,
                           verify_samples=1, measure=False)
    return result.artifact, result.report.macs["compiled"]


@pytest.mark.parametrize("variant", list(PIPELINES))
@pytest.mark.parametrize("batch", [1, 8])
def test_pruned_resnet50_latency(benchmark, batch, variant):
    benchmark.group = f"resnet50 cpu-fp32 batch {batch}"
    artifact, macs = _compiled("resnet50", PIPELINES[variant], batch)
    benchmark.extra_info["macs"] = macs
    x = torch.randn((batch, *zoo.get("resnet50").input_shape[1:]), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        benchmark.pedantic(artifact.run, args=(x,), warmup_rounds=2, rounds=10 if batch == 1 else 5, iterations=1)
