"""How torch's quantized CPU kernels compute: cpu-int8's arithmetic strategies and the probes that measure them.

The simulated program reproduces the kernels bit for bit once the lowering installs these
(see :mod:`graphopt.quant`, :class:`~graphopt.quant.Rounding` and
:class:`~graphopt.quant.LayerArithmetic`): fbgemm's and oneDNN's requantization of
conv/linear, ``quantize_per_tensor``'s rounding, the quantized average pools' tie rule,
and the fused read of quantized add. What depends on the machine (oneDNN's scale order
per shape, the pools' vector width) is measured on the kernels themselves; each claim is
checked in ``tests/test_quant_arithmetic.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.errors import BackendUnavailableError, choices
from graphopt.quant import (
    ActFakeQuant,
    LayerArithmetic,
    OpKind,
    QuantLayer,
    Rounding,
    op_kind,
    quantizer_of,
    silence_quantized_deprecation,
)

ENGINES = ("x86", "fbgemm", "onednn")


@contextmanager
def engine_scope(engine: str) -> Iterator[None]:
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        available = choices(e for e in supported if e in ENGINES)
        raise BackendUnavailableError(f"quantized engine '{engine}' is not available in this torch build; available: {available}")
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = before



def _empty_quantized_layer(base: nn.Module, relu: bool) -> nn.Module:
    if isinstance(base, nn.Linear):
        cls = nniq.LinearReLU if relu else nnq.Linear
        return cls(base.in_features, base.out_features, True)
    if isinstance(base, nn.Conv1d):
        cls = nniq.ConvReLU1d if relu else nnq.Conv1d
    else:
        cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    return cls(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding, base.dilation,
               base.groups, True, base.padding_mode)


# ---------------------------------------------------------------------------------------
# Strategies


@dataclass(frozen=True)
class FbgemmArithmetic(LayerArithmetic):
    """fbgemm's requantization (float bias): ``(float(acc) + bias / (s_in*s_w)) * (s_in*s_w / s_out)``.

    Every factor float32, rounded half to even; the zero point is added after rounding.
    """

    def requantize(self, acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        act_times_w = torch.tensor(self.input.scale, dtype=torch.float32) * w_scale.float()
        pre = (acc.float() + bias / act_times_w) * (act_times_w / torch.tensor(self.output.scale, dtype=torch.float32))
        return torch.round(pre) + self.output.zero_point


@dataclass(frozen=True)
class OnednnArithmetic(LayerArithmetic):
    """oneDNN through ideep: torch hands over reciprocal scales (1/s_in, 1/s_out as float32)
    and they are inverted again in float32; the source and weight scales are applied one
    after the other (or, ``combined_scales``, as one product: some implementations do, the
    lowering measures which), then the bias, then 1/dst_scale; the zero point is added
    before rounding (so ties break differently from fbgemm)."""

    combined_scales: bool = False

    def requantize(self, acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        one = torch.tensor(1.0, dtype=torch.float32)
        src_scale = one / torch.tensor(1.0 / self.input.scale, dtype=torch.float32)
        inv_dst_scale = one / (one / torch.tensor(1.0 / self.output.scale, dtype=torch.float32))
        if self.combined_scales:
            scaled = acc.float() * (src_scale * w_scale.float())
        else:
            scaled = (acc.float() * src_scale) * w_scale.float()
        pre = (scaled + bias) * inv_dst_scale
        return torch.round(pre + torch.tensor(float(self.output.zero_point), dtype=torch.float32))


def layer_arithmetic(pack_engine: str, input: Any, output: Any) -> LayerArithmetic:
    """The strategy of the kernel family a layer is packed for (``fbgemm`` or ``onednn``)."""
    return OnednnArithmetic(input, output) if pack_engine == "onednn" else FbgemmArithmetic(input, output)


@dataclass(frozen=True)
class AvgPoolTies:
    """How a quantized average pool of ``size`` elements rounds its integer mean.

    An exact half is rounded to even, but some kernel paths add the zero point before
    rounding and others after it, so ties land on different integers. One flag per
    channel (torch's channels-last average pool vectorizes over channels and leaves the
    remainder to a scalar loop that rounds the other way), measured by :func:`_pool_tie_rule`.
    """

    size: int
    zero_point_first: tuple[bool, ...]


@dataclass(eq=False)
class TorchKernelRounding(Rounding):
    """How torch's quantized CPU ops round one quantizer's value.

    ``quantize_per_tensor``: the value is quantized by ``torch.quantize_per_tensor``,
    ``round(fma(x, 1/scale, zero_point))`` (one float32 rounding before the integer one;
    fake-quantization rounds ``x * (1/scale)`` first, and ties then break differently).
    ``pool``: it requantizes an average pool (:class:`AvgPoolTies`). ``fused_read``:
    quantized add (and cat's channels-last path) reads it as ``fma(q, scale, -zp * scale)``.
    """

    quantize_per_tensor: bool = False
    pool: AvgPoolTies | None = None
    fused_read: bool = False

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        scale, zp = fq.scale.float(), int(fq.zero_point)
        if self.pool is not None:
            # x is the fp32 average of ``size`` values on this grid: recover the integer sum
            # exactly (its float error is far below half a unit), then round as the kernel does.
            acc = torch.round(x.double() / float(fq.scale) * self.pool.size)
            mean = acc / self.pool.size
            first = torch.tensor(self.pool.zero_point_first).view((-1,) + (1,) * (x.dim() - 2))
            return torch.where(first, torch.round(mean + zp), torch.round(mean) + zp).float()
        if self.quantize_per_tensor:
            inv = torch.tensor(1.0, dtype=torch.float32) / scale  # float64 holds the fused product exactly
            return torch.round((x.double() * inv.double() + zp).float())
        return super().integers(fq, x)

    def value(self, fq: ActFakeQuant, q: torch.Tensor) -> torch.Tensor:
        if self.fused_read:
            scale, zp = fq.scale.float(), int(fq.zero_point)
            return (q.double() * scale.double() + float(scale * -zp)).float()
        return super().value(fq, q)


def kernel_rounding(fq: ActFakeQuant) -> TorchKernelRounding:
    """``fq``'s cpu-int8 rounding strategy, installed on first use."""
    if not isinstance(fq.rounding, TorchKernelRounding):
        fq.rounding = TorchKernelRounding()
    return fq.rounding


def pool_ties(fq: ActFakeQuant | None) -> AvgPoolTies | None:
    r = fq.rounding if fq is not None else None
    return r.pool if isinstance(r, TorchKernelRounding) else None


# ---------------------------------------------------------------------------------------
# Probes: what only the kernels can tell


def _onednn_combines_scales(q: QuantLayer, relu: bool, shape: tuple[int, ...], zero_points: tuple[int, int]) -> bool | None:
    """Does oneDNN's kernel for this layer multiply by ``s_in * s_w`` or by ``s_in``, then ``s_w``?

    oneDNN picks an implementation per shape (its 1x1 and 3x3 convolutions differ here),
    and the two orders round differently in float32 on about one element in a million:
    enough to compound through a deep net. Measured on the kernel: a layer of the same
    geometry, input shape and zero points gets weights, scales and biases chosen so that
    the two orders land on different integers at one position per output channel; the
    kernel's answers there say which order it uses. None if the probe cannot tell.
    """
    got, separate, combined = [], [], []
    for seed in range(96):  # small layers (an SE block's 1x1 convs) yield a point or two per trial
        trial = _scale_order_trial(q, relu, shape, zero_points, seed)
        if trial is not None:
            for acc_list, t in zip((got, separate, combined), trial):
                acc_list.append(t)
        if sum(len(t) for t in got) >= 8:
            break
    if sum(len(t) for t in got) < 4:
        return None
    k, sep, comb = torch.cat(got), torch.cat(separate), torch.cat(combined)
    # A clear majority decides: oneDNN's inner product follows the combined order on
    # real data (0 of 12.5M outputs differ) but a few probe points near its limits
    # land the other way.
    if float((k == comb).double().mean()) >= 0.8:
        return True
    if float((k == sep).double().mean()) >= 0.8:
        return False
    return None


def _channels_first(t: torch.Tensor, linear: bool) -> torch.Tensor:
    """(channels, everything else): a linear layer's channels are its last dim, a conv's dim 1."""
    return t.reshape(-1, t.shape[-1]).T if linear else t.transpose(0, 1).reshape(t.shape[1], -1)


def _scale_order_trial(q: QuantLayer, relu: bool, shape: tuple[int, ...], zero_points: tuple[int, int],
                       seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """One probe of :func:`_onednn_combines_scales`: (kernel, separate, combined) where they differ."""
    base = q.base
    zp_in, zp_out = zero_points
    # outputs must land inside [0, 255] after the zero point: positive sums when the
    # zero point leaves room above it, negative ones otherwise (not with a fused ReLU)
    positive = zp_out <= 127
    if relu and not positive:
        return None
    g = torch.Generator().manual_seed(seed)
    xu = torch.randint(0, 256, shape, generator=g)
    wi = torch.randint(-20, 21, tuple(base.weight.shape), generator=g)
    xi, wd = (xu - zp_in).double(), wi.double()
    acc = F.linear(xi, wd) if isinstance(base, nn.Linear) else base._conv_forward(xi, wd, None)
    linear = isinstance(base, nn.Linear)
    channels = acc.shape[-1] if linear else acc.shape[1]
    flat = _channels_first(acc, linear)
    a_ext, where = flat.max(dim=1) if positive else flat.min(dim=1)
    room = (250 - zp_out) if positive else (zp_out - 1)
    one = torch.tensor(1.0, dtype=torch.float32)
    s_in, s_out = 0.02, 0.02 * 0.0015 * float(a_ext.abs().clamp(min=1).median()) / (room / 2)
    w_scale = (torch.rand(channels, generator=g) * 0.001 + 0.001).float()
    src = one / torch.tensor(1.0 / s_in, dtype=torch.float32)
    inv_dst = one / (one / torch.tensor(1.0 / s_out, dtype=torch.float32))
    a = a_ext.float()
    p_separate, p_combined = (a * src) * w_scale, a * (src * w_scale)
    zpf = torch.tensor(float(zp_out), dtype=torch.float32)
    v = p_separate * inv_dst + zpf
    ok = (a_ext * (1 if positive else -1) > 0) & (p_separate != p_combined) & (v > 1) & (v < 250)
    # a bias that puts a rounding boundary between the two orders' results
    b0 = (torch.floor(v) + 0.5 - zpf) / inv_dst - (p_separate + p_combined) / 2
    ulp = torch.nextafter(b0.abs() + 1e-6, torch.tensor(float("inf"))) - (b0.abs() + 1e-6)
    bias = torch.zeros(channels, dtype=torch.float32)
    found = torch.zeros(channels, dtype=torch.bool)
    for k in range(-64, 65):
        b = b0 + k * ulp
        apart = torch.round((p_separate + b) * inv_dst + zpf) != torch.round((p_combined + b) * inv_dst + zpf)
        take = ok & apart & ~found
        bias[take], found[take] = b[take], True
    if not bool(found.any()):
        return None
    silence_quantized_deprecation()
    probe = _empty_quantized_layer(base, relu)
    zero_points = torch.zeros(channels, dtype=torch.long)
    weight = torch._make_per_channel_quantized_tensor(wi.to(torch.int8), w_scale.double(), zero_points, 0)
    with engine_scope("onednn"):
        probe.set_weight_bias(weight, bias)
        probe.scale, probe.zero_point = s_out, zp_out
        x = torch._make_per_tensor_quantized_tensor(xu.to(torch.uint8), s_in, zp_in)
        with torch.inference_mode():
            y = probe(x).int_repr().double()
    kernel = _channels_first(y, linear).gather(1, where[:, None])[:, 0][found]
    separate = torch.round((p_separate + bias) * inv_dst + zpf)[found].double()
    combined = torch.round((p_combined + bias) * inv_dst + zpf)[found].double()
    return kernel, separate, combined


_TIE_RULES: dict[tuple[str, int, bool], tuple[bool, ...]] = {}


def _pool_tie_rule(adaptive: bool, channels: int, channels_last: bool) -> tuple[bool, ...]:
    """Per channel: does torch's quantized average pool add the zero point before rounding?

    Measured on the kernel (the answer depends on its vector width, so on the machine):
    a 2x2 window whose integer sum is 2 averages to exactly 0.5; with an odd zero point
    ``round(0.5 + zp)`` and ``round(0.5) + zp`` differ.
    """
    key = ("adaptive" if adaptive else "avg", channels, channels_last)
    if key not in _TIE_RULES:
        zp = 1
        q = torch.full((1, channels, 2, 2), zp, dtype=torch.uint8)
        q[:, :, 0, :] += 1  # sum of (q - zp) over the window: 2
        x = torch._make_per_tensor_quantized_tensor(q, 1.0, zp)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = F.adaptive_avg_pool2d(x, 1) if adaptive else F.avg_pool2d(x, 2)
        _TIE_RULES[key] = tuple(bool(v) for v in (y.int_repr().flatten() == zp + 1).tolist())  # round(1.5) = 2
    return _TIE_RULES[key]


def _measure_kernels(lowering: Any, gm: GraphModule, inputs: tuple[torch.Tensor, ...]) -> None:
    """Finish the simulation's kernel arithmetic with what only the kernels can tell.

    Average pools break ties by the memory format of their input (conv kernels return
    channels-last tensors) and oneDNN applies scales in an order that depends on its
    implementation for the shape: properties of the graph and the shapes, not of the
    data, so one run on the example inputs (recording each input) and a probe per
    layer find them.
    """
    watch = set(lowering.pools) | set(lowering.onednn_layers)
    if not watch and not lowering.requant_cats:
        return
    seen: dict[str, torch.Tensor] = {}
    cat_layout: dict[str, bool] = {}  # True: the channels-last fast path

    class _Record(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            if n.name in watch and n.args and isinstance(n.args[0], Node):
                x = self.env.get(n.args[0])
                if isinstance(x, torch.Tensor) and x.is_quantized:
                    seen[n.name] = x
            if n.name in lowering.requant_cats:  # torch's fast path: 4-d channels-last inputs joined on channels
                xs = [self.env.get(a) for a in n.args[0]]
                cat_layout[n.name] = n.args[1] % 4 == 1 and all(
                    x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) for x in xs)
            return super().run_node(n)

    with torch.inference_mode():
        _Record(gm).run(*inputs)
    for name, (fq, size) in lowering.pools.items():
        x = seen.get(name)
        if x is None or x.dim() != 4:
            continue
        node = next(n for n in gm.graph.nodes if n.name == name)
        m = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        adaptive = isinstance(m, nn.AdaptiveAvgPool2d) or node.target is F.adaptive_avg_pool2d
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        kernel_rounding(fq).pool = AvgPoolTies(size, _pool_tie_rule(adaptive, x.shape[1], channels_last))
    # quantized::cat requantizes like quantized::add on its channels-last fast path (reads
    # the inputs fused, rounds x * (1/s), then adds the zero point) and otherwise like
    # dequantize + quantize_per_tensor (reads them plainly, rounds fma(x, 1/s, zp)):
    # measured, see tests/test_quant_arithmetic.py
    for name, fq in lowering.requant_cats.items():
        if name not in cat_layout:
            lowering.unmodelled.append(name)
        elif cat_layout[name]:
            lowering.fused_dequantize.add(name)
        else:
            kernel_rounding(fq).quantize_per_tensor = True
    cache: dict[tuple[Any, ...], bool | None] = {}
    for name, (q, relu) in lowering.onednn_layers.items():
        x = seen.get(name)
        if x is None or q.arithmetic is None:
            continue
        zps = (int(x.q_zero_point()), q.arithmetic.output.zero_point)
        key = (repr(q.base), tuple(x.shape), relu, zps)
        if key not in cache:
            cache[key] = _onednn_combines_scales(q, relu, tuple(x.shape), zps)
        if cache[key] is None:
            lowering.unmodelled.append(name)  # the probe could not tell the order: no exactness claimed
        else:
            q.arithmetic = dataclasses.replace(q.arithmetic, combined_scales=cache[key])  # an OnednnArithmetic


_ADD_KERNELS = {torch.ops.quantized.add, torch.ops.quantized.add_relu}


def _mark_fused_inputs(sim: GraphModule, lowered: GraphModule, fused_ops: set[str]) -> list[str]:
    """Quantizers read by quantized add (and channels-last cat) hand on the value it reads.

    ``quantized::add`` reads its inputs as ``fma(q, scale, -zp * scale)``, one float32
    ulp away from ``(q - zp) * scale`` at times, which decides a tie in the sum now and
    then (``quantized::mul`` and fp32 readers see the plain product). A quantizer gets
    the fused form where every other reader does not care (conv/linear and average pools
    recover the integers; a passthrough keeps them). Returns the ops whose inputs are
    also read in the plain form: their ties are not modelled.
    """
    fused_ops = fused_ops | {n.name for n in lowered.graph.nodes if n.op == "call_function" and n.target in _ADD_KERNELS}
    conflicts: list[str] = []
    for n in sim.graph.nodes:
        fq = quantizer_of(sim, n)
        if fq is None:
            continue
        readers: list[Node] = []
        frontier = list(n.users)
        while frontier:
            u = frontier.pop()
            if op_kind(sim, u) is OpKind.PASSTHROUGH:  # relu, max pool, flatten...: same integers, same form
                frontier.extend(u.users)
            else:
                readers.append(u)
        fused = [u.name for u in readers if u.name in fused_ops]
        plain = [u for u in readers if u.name not in fused_ops and not _reads_integers(sim, u)]
        if fused and not plain:
            kernel_rounding(fq).fused_read = True
        if fused and plain:
            conflicts += fused
    return sorted(set(conflicts))


def _reads_integers(sim: GraphModule, n: Node) -> bool:
    """Does ``n`` (in the simulated graph) recover the integers of its quantized input?"""
    if n.op == "call_module":
        m = sim.get_submodule(str(n.target))
        if isinstance(m, QuantLayer):
            return m.arithmetic is not None
        if isinstance(m, ActFakeQuant):
            r = m.rounding
            return r is None or (not r.quantize_per_tensor and r.pool is None)  # same qparams: rounds back
    if op_kind(sim, n) is OpKind.REQUANT and len(n.users) == 1:
        return pool_ties(quantizer_of(sim, next(iter(n.users)))) is not None
    return False


