"""Shared fixtures: small deterministic models and Programs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.fx
from torch import nn

from graphopt.program import Program

# Tests run in parallel (pytest -n auto) on small shared machines: one intra-op thread per
# process, here and in the `graphopt` subprocesses the CLI tests start. Intra-op threads
# of several processes spinning against each other made convs 40x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRAPHOPT_THREADS", "1")  # the default of --threads: CPU artifacts run on one thread too


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def program_of(model: nn.Module, *shapes: tuple[int, ...], seed: int = 0) -> Program:
    """Trace ``model`` (eval mode) into a Program with seeded example inputs and shapes."""
    g = torch.Generator().manual_seed(seed)
    inputs = tuple(torch.randn(s, generator=g) for s in shapes)
    gm = torch.fx.symbolic_trace(model.eval())
    program = Program(gm, inputs, {"source": type(model).__name__})
    program.propagate_shapes()
    return program


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


@pytest.fixture(scope="session")
def host():
    """A plugin host with the installed entry points: every built-in pass and target."""
    from graphopt.plugins import PluginHost

    h = PluginHost()
    h.load_entry_points()
    return h


@pytest.fixture
def fresh_host():
    """A plugin host with only the installed entry points loaded (not the cached default)."""
    from graphopt.plugins import PluginHost

    host = PluginHost()
    host.load_entry_points()
    return host


def binary_qparams(seed: int, *, ties: bool = True) -> tuple[tuple[float, int], tuple[float, int], tuple[float, int]]:
    """(scale, zero point) of two inputs and an output of a binary int8 op, float32 scales.

    With ``ties``, odd seeds make the output scale twice the first input's, so half the
    integer pairs land exactly between two output steps.
    """
    g = torch.Generator().manual_seed(seed)
    sa, sb, so = (float(torch.tensor(float(v), dtype=torch.float32)) for v in torch.rand(3, generator=g) * 0.05 + 0.005)
    za, zb, zo = (int(v) for v in torch.randint(0, 256, (3,), generator=g))
    if ties and seed % 2:
        so = 2 * sa
    return (sa, za), (sb, zb), (so, zo)
