"""Differential fuzzing: random nets through every exact pass and every target available here.

- every pass registered with ``contract="exact"`` leaves the program's outputs unchanged
  (fp32, rtol/atol 1e-4) on random inputs;
- compiling a random net for a target either verifies or raises a clean
  :class:`~graphopt.errors.GraphoptError` with an exit code in 1..4: never another
  exception (an internal error, exit 5), never a silent mismatch; for fp32 targets the
  artifact is also compared with the original model here, independently of graphopt's
  own verification.

Runs ``FUZZ_NETS`` nets (100; ``GRAPHOPT_FUZZ=N`` for more) per pass and per target,
derandomized so CI sees the same nets every run (a ``GRAPHOPT_FUZZ`` run explores freshly).
Counterexamples found while writing this are kept as explicit ``@example``-style tests
at the bottom.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import graphopt
from graphopt.errors import GraphoptError
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.plugins import default_host
from graphopt.verify import Tolerance
from tests.conftest import program_of
from tests.fuzz.nets import KINDS, MORE_ACTS, draw_net

FUZZ_ENV = os.environ.get("GRAPHOPT_FUZZ")
FUZZ_NETS = int(FUZZ_ENV or 100)
FUZZ_KINDS = [*KINDS, "avgpool"]
CPU_TARGETS = ("cpu-fp32", "cpu-int8", "ort-fp32", "ort-int8")
FP32_BOUND = 1e-4
#: int8 targets fuzzed with --keep-fp32 too
KEEP_FP32_TARGETS = ("cpu-int8", "ort-int8")

_host = default_host()
EXACT_PASSES = sorted(spec.name for spec in _host.passes if spec.contract == "exact")
TARGETS = [t for t in CPU_TARGETS if _host.targets.get(t).backend.unavailable_reason() is None]

fuzz_settings = settings(
    max_examples=FUZZ_NETS, deadline=None, database=None, derandomize=FUZZ_ENV is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def tiny_net(data) -> tuple[nn.Module, tuple[int, ...]]:
    return draw_net(data, batch=1, acts=MORE_ACTS, max_layers=3, kinds=FUZZ_KINDS)


def outputs(fn, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = fn(x)
    return [t.float() for t in (out if isinstance(out, (tuple, list)) else (out,))]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor], what: str) -> None:
    assert len(got) == len(want), what
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=FP32_BOUND, atol=FP32_BOUND, msg=lambda m: f"{what}: {m}")


def check_exact_pass(name: str, model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> None:
    program = program_of(model, shape, seed=seed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    before = outputs(program.run, x)
    PassManager(parse_pipeline(name, _host.passes)).run(program)
    assert_close(outputs(program.run, x), before, f"exact pass '{name}' changed the outputs")


def check_target(target: str, model: nn.Module, shape: tuple[int, ...], seed: int = 0, keep_fp32: tuple[str, ...] = ()) -> str:
    """Compile ``model`` for ``target``; returns the outcome ('verified' or the error kind)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    want = outputs(model, x)
    try:
        result = graphopt.compile(model, target=target, example_inputs=(x,), measure=False, verify_samples=2,
                                  calib_samples=8, seed=seed, keep_fp32=keep_fp32,
                                  tolerance=Tolerance(min_cosine=0.5) if "int8" in target else None)
    except GraphoptError as exc:
        assert 1 <= exc.exit_code <= 4, f"{target}: {type(exc).__name__} with exit code {exc.exit_code}: {exc}"
        assert "\n" not in str(exc), f"{target}: a multi-line error: {exc}"
        return f"{type(exc).__name__} (exit {exc.exit_code})"
    if "fp32" in target:  # graphopt said it verified: check that independently
        assert_close(outputs(result.artifact.run, x), want, f"{target} artifact vs the original model")
    else:
        assert all(torch.isfinite(t).all() for t in outputs(result.artifact.run, x)), f"{target}: non-finite outputs"
    return "verified"


def draw_keep_fp32(data, model: nn.Module) -> tuple[str, ...]:
    """Sometimes keep a random subset of the weighted layers in fp32 (``--keep-fp32``)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not data.draw(st.booleans(), label="keep some fp32"):
        return ()
    return tuple(data.draw(st.lists(st.sampled_from(layers), min_size=1, max_size=2, unique=True), label="keep_fp32"))


@pytest.mark.parametrize("name", EXACT_PASSES)
@fuzz_settings
@given(data=st.data())
def test_exact_pass_keeps_random_nets_outputs(name, data):
    model, shape = tiny_net(data)
    check_exact_pass(name, model, shape, seed=data.draw(st.integers(0, 1000), label="seed"))


@pytest.mark.parametrize("target", TARGETS)
@fuzz_settings
@given(data=st.data())
def test_target_verifies_or_fails_cleanly(target, data):
    model, shape = tiny_net(data)
    keep = draw_keep_fp32(data, model) if target in KEEP_FP32_TARGETS else ()
    outcome = check_target(target, model, shape, seed=data.draw(st.integers(0, 1000), label="seed"), keep_fp32=keep)
    event(f"{target}: {outcome}")


def test_the_harness_sees_every_pass_and_target():
    assert {"fuse-conv-bn-relu", "dce"} <= set(EXACT_PASSES)
    assert set(TARGETS) >= {"cpu-fp32", "cpu-int8"}


# ---- counterexamples found by this harness, kept as explicit regression tests -------------


class _ShuffleNet(nn.Module):
    """Shrunk by hypothesis: conv-relu stem, one split-shuffle unit, global-average head."""

    def __init__(self) -> None:
        super().__init__()
        from tests.fuzz.nets import SplitShuffle, _unit

        torch.manual_seed(0)
        self.stem = _unit(1, 4, 3, 1, False, nn.ReLU)
        self.block = SplitShuffle(4, False, nn.ReLU)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)))


# found by the fuzzer: cpu-int8 took a conv kept in fp32 (no QuantLayer) between quantized values
# for a quantized layer and crashed reading `fused_relu` (internal error, exit 5)
def test_cpu_int8_keep_fp32_conv_between_quantized_values():
    assert check_target("cpu-int8", _ShuffleNet().eval(), (1, 1, 8, 8), keep_fp32=("block.branch.0.0",)) == "verified"


@pytest.mark.parametrize("target", [t for t in TARGETS if t != "cpu-int8"])
def test_keep_fp32_conv_between_quantized_values_elsewhere(target):
    assert check_target(target, _ShuffleNet().eval(), (1, 1, 8, 8), keep_fp32=("block.branch.0.0",) if "int8" in target else ())
