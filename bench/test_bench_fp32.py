"""cpu-fp32: original eager vs the compiled artifact, and the pass pipeline's own cost.

Run: python -m pytest bench/test_bench_fp32.py --benchmark-only --benchmark-group-by=group --benchmark-disable-gc

(``--benchmark-disable-gc``: a full garbage collection of thousands of freed graph nodes
otherwise lands inside some rounds and not others.)
"""

from __future__ import annotations

import pytest
import torch

from bench.chain import chain
from graphopt import zoo
from graphopt.capture import capture
from graphopt.compiler import compile as compile_model
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.plugins import default_host

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "densenet", "shufflenet_v2", "se_resnet", "inception", "digits_cnn"]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    torch.set_num_threads(torch.get_num_threads())


@pytest.mark.parametrize("variant", ["original", "compiled"])
@pytest.mark.parametrize("name", MODELS)
def test_latency(benchmark, name, variant):
    benchmark.group = f"latency {name}"
    shape = zoo.get(name).input_shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    if variant == "original":
        fn = zoo.build(name)
    else:
        fn = compile_model(f"zoo:{name}", target="cpu-fp32", verify_samples=2, measure=False).artifact.run
    with torch.inference_mode():
        benchmark.pedantic(fn, args=(x,), warmup_rounds=2, rounds=15, iterations=1)


def _time_pipeline(benchmark, program, rounds):
    """Time the passes alone (fresh clone per round, made outside the timer)."""
    pipe = parse_pipeline("fuse-conv-bn-relu,dce", default_host().passes)
    benchmark.pedantic(lambda p: PassManager(pipe).run(p), setup=lambda: ((program.clone(),), {}), rounds=rounds)


def test_pipeline_resnet50(benchmark):
    benchmark.group = "pipeline resnet50"
    program = capture("zoo:resnet50")
    _time_pipeline(benchmark, program, rounds=5)


@pytest.mark.parametrize("blocks", [500, 1000, 2000, 4000])
def test_pipeline_chain(benchmark, blocks):
    benchmark.group = "pipeline conv-bn-relu chain"
    benchmark.extra_info["nodes"] = 3 * blocks
    program = capture(chain(blocks), input_shapes=[(1, 4, 4, 4)])
    _time_pipeline(benchmark, program, rounds=5)
