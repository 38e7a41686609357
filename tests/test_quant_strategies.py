"""Rounding strategies come from outside the core: a made-up one, defined here, drives the simulation.

The core (:mod:`graphopt.quant.simulate`) only defines the protocols; backends install
their kernels' arithmetic through them. These tests install strategies no backend has
(floor rounding, round half away from zero, a truncating requantization) on a real
simulated program and check its outputs against arithmetic written out by hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from graphopt.program import Program
from graphopt.quant import (
    ActFakeQuant,
    LayerArithmetic,
    QuantConfig,
    QuantLayer,
    Rounding,
    clear_kernel_arithmetic,
    kernel_arithmetic_off,
    quantize_program,
)


class FloorRounding(Rounding):
    """Integers by floor(x / scale) (no kernel does this: a planted, visible rule)."""

    def __init__(self) -> None:
        self.calls = 0

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.floor(x / fq.scale.float()) + int(fq.zero_point)


class HalfAwayRounding(Rounding):
    """Round half away from zero (fake-quantization rounds half to even)."""

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        t = x.double() / float(fq.scale)
        return (torch.sign(t) * torch.floor(t.abs() + 0.5)).float() + int(fq.zero_point)


@dataclass(frozen=True)
class TruncatingArithmetic(LayerArithmetic):
    """Requantize in float64 and truncate toward zero."""

    def requantize(self, acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        real = acc * (self.input.scale * w_scale) + bias.double()
        return torch.trunc(real / self.output.scale).float() + self.output.zero_point


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x


def _simulated(model: nn.Module, shape: tuple[int, ...]) -> tuple[Program, list[ActFakeQuant]]:
    g = torch.Generator().manual_seed(0)
    program = Program(torch.fx.symbolic_trace(model), (torch.randn(shape, generator=g),))
    program.calibration = [(torch.randn(shape, generator=g) * 2,) for _ in range(4)]
    quantize_program(program, QuantConfig(activations="u8", observer="minmax"))
    fqs = [m for m in program.graph_module.modules() if isinstance(m, ActFakeQuant)]
    return program, fqs


def _by_hand(x: torch.Tensor, fq: ActFakeQuant, rule) -> torch.Tensor:
    s, zp = fq.scale.float(), int(fq.zero_point)
    q = (rule(x, s) + zp).clamp(fq.quant_min, fq.quant_max)
    return (q - zp) * s


def test_a_strategy_from_outside_the_core_drives_every_quantizer():
    program, fqs = _simulated(Doubler(), (4096,))
    assert len(fqs) == 2  # the add's input and its output
    fq_in, fq_out = (fqs if fqs[0].point == "x" else fqs[::-1])
    s, zp = float(fq_in.scale), int(fq_in.zero_point)
    k = torch.arange(0, 255, dtype=torch.float32) - zp  # every code of the input grid
    x = torch.cat([(k + 0.3) * s, (k + 0.7) * s])  # floor and round disagree on the second half
    plain = program.run(x)

    strategy = FloorRounding()
    for fq in fqs:
        fq.rounding = strategy
    floor = lambda t, scale: torch.floor(t / scale)  # noqa: E731
    expected = _by_hand(2 * _by_hand(x, fq_in, floor), fq_out, floor)
    got = program.run(x)
    assert strategy.calls == 2
    assert torch.equal(got, expected)
    assert int((got != plain).sum()) > 200

    with kernel_arithmetic_off(program.graph_module):  # plain inside the block (shape work), strategies back after
        assert torch.equal(program.run(x), plain)
    assert all(fq.rounding is strategy for fq in fqs)
    try:
        with kernel_arithmetic_off(program.graph_module):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert all(fq.rounding is strategy for fq in fqs) and torch.equal(program.run(x), expected)

    clear_kernel_arithmetic(program.graph_module)  # back to plain fake-quantization, bit for bit
    assert all(fq.rounding is None for fq in fqs)
    assert torch.equal(program.run(x), plain)


def test_half_away_from_zero_differs_from_plain_only_on_ties():
    program, fqs = _simulated(Doubler(), (4096,))
    fq_in = next(fq for fq in fqs if fq.point == "x")
    s, zp = float(fq_in.scale), int(fq_in.zero_point)
    ties = (torch.arange(-40, 40, dtype=torch.float32) + 0.5 - zp % 2) * s  # x / s lands on .5 (up to float error)
    g = torch.Generator().manual_seed(1)
    x = torch.cat([ties, torch.randn(4016, generator=g)])
    fq_in.rounding = HalfAwayRounding()
    got = fq_in(x)
    t = x.double() / s
    expected = (((torch.sign(t) * torch.floor(t.abs() + 0.5)).float() + zp).clamp(0, 255) - zp) * fq_in.scale.float()
    assert torch.equal(got, expected)
    fq_in.rounding = None
    plain = fq_in(x)
    differ = got != plain
    assert differ.any()
    on_tie = ((t - torch.floor(t)) - 0.5).abs() < 1e-3
    assert not (differ & ~on_tie).any()  # away from ties the two rules agree


def test_a_layer_arithmetic_from_outside_the_core_requantizes_a_conv():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1))
    program, fqs = _simulated(model, (1, 3, 8, 8))
    layer = program.graph_module.get_submodule("0")
    assert isinstance(layer, QuantLayer)
    fq_in, fq_out = (next(f for f in fqs if f.point == p) for p in ("input_1", "_0"))
    x = fq_in(torch.randn(1, 3, 8, 8, generator=g))
    plain = layer(x)
    layer.arithmetic = TruncatingArithmetic(fq_in.qparams, fq_out.qparams)
    got = layer(x)

    conv = layer.base
    xi = torch.round(x.double() / fq_in.qparams.scale)
    wq = layer.weight_fq.quantize(conv.weight)
    acc = torch.nn.functional.conv2d(xi, wq.int_repr().double(), None, 1, 1)
    w_scale = wq.q_per_channel_scales().view(1, -1, 1, 1)
    real = acc * (fq_in.qparams.scale * w_scale) + conv.bias.detach().double().view(1, -1, 1, 1)
    out = fq_out.qparams
    q = (torch.trunc(real / out.scale).float() + out.zero_point).clamp(0, 255)
    assert torch.equal(got, (q - out.zero_point) * torch.tensor(out.scale, dtype=torch.float32))
    assert not torch.equal(got, fq_out(plain))
