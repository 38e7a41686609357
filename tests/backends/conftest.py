"""Shared by the backend tests: zoo models lowered at a small input size, cached per test module."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.fx

from graphopt import zoo
from graphopt.capture.leaves import resolve_leaf_functions
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.program import Program


def zoo_shape(name: str, size: int = 48) -> tuple[int, ...]:
    """The digits CNN at its own 8x8; every other zoo model at ``size`` x ``size`` (small, for speed)."""
    return zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, size, size)


def compile_zoo(host, name: str, target: str, *, pipeline: str | None = None, size: int = 48, seed: int = 0,
                calibration: tuple[int, int] = (4, 1), backend_options: dict[str, Any] | None = None,
                threads: int | None = None):
    """(fp32 model, optimized program, artifact, two evaluation samples): a zoo model through the
    target's pipeline (or ``pipeline``) and lowered in memory; ``calibration`` = (batches, batch size)."""
    model = zoo.build(name)
    shape = zoo_shape(name, size)
    g = torch.Generator().manual_seed(seed)
    gm, example = torch.fx.symbolic_trace(model), (torch.randn(shape, generator=g),)
    resolve_leaf_functions(gm, example, name)  # as capture does: stochastic depth is removed
    program = Program(gm, example)
    program.propagate_shapes()
    batches, batch = calibration
    program.calibration = [(torch.randn((batch, *shape[1:]), generator=g),) for _ in range(batches)]
    if backend_options:
        program.meta["backend_options"] = dict(backend_options)
    if threads is not None:
        program.meta["threads"] = threads
    spec = host.targets.get(target)
    PassManager(parse_pipeline(pipeline or spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    samples = [(torch.randn(shape, generator=g),) for _ in range(2)]
    return model, program, artifact, samples


@pytest.fixture(scope="module")
def lowered_zoo(host):
    """:func:`compile_zoo`, each (name, target, options) lowered once per test module."""
    cache: dict[tuple, tuple] = {}

    def get(name: str, target: str, **options: Any):
        key = (name, target, repr(sorted(options.items())))
        if key not in cache:
            cache[key] = compile_zoo(host, name, target, **options)
        return cache[key]

    return get
