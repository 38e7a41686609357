"""The simulation computes what torch's quantized CPU kernels compute, bit for bit.

Rounding differences between the simulation and a kernel are rare (one element in a
million: a tie, or a float32 product one ulp apart), so every test here runs about a
million outputs through the kernel and demands identical integers; each also checks that
the plain fake-quantization it replaces does *not* match on the same data, so a test
cannot pass by being too small to see a tie.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.nn.functional as F
from torch import nn

from graphopt.backends._cpu_int8_arith import (
    AvgPoolTies,
    TorchKernelRounding,
    _onednn_combines_scales,
    _pool_tie_rule,
    engine_scope,
    layer_arithmetic,
)
from graphopt.backends.cpu_int8 import _quantized_layer
from graphopt.quant import ActFakeQuant, QParams, QuantLayer, silence_quantized_deprecation
from tests.conftest import binary_qparams

ENGINES = [e for e in ("fbgemm", "onednn") if e in torch.backends.quantized.supported_engines]

LAYERS = {
    "conv3x3": lambda: nn.Conv2d(32, 64, 3, padding=1),
    "conv1x1": lambda: nn.Conv2d(64, 64, 1),
    "conv3x3-relu": lambda: nni.ConvReLU2d(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()),
    "grouped": lambda: nn.Conv2d(32, 64, 3, padding=1, groups=4),
    "depthwise": lambda: nn.Conv2d(64, 64, 3, padding=1, groups=64),
    "linear": lambda: nn.Linear(256, 512),
    "linear-3d": lambda: nn.Linear(256, 512),
}


def _input(name: str, layer: nn.Module, g: torch.Generator) -> torch.Tensor:
    base = layer[0] if isinstance(layer, nni._FusedModule) else layer
    if name == "linear-3d":  # channels last: a (batch, tokens, features) input
        return torch.randn(64, 32, base.in_features, generator=g)
    if isinstance(base, nn.Linear):
        return torch.randn(2048, base.in_features, generator=g)
    return torch.randn(4, base.in_channels, 48, 48, generator=g)


def _simulated_and_kernel(name: str, engine: str, seed: int = 0):
    """(kernel ints, simulated ints, plain fake-quant ints) for one layer on random data."""
    silence_quantized_deprecation()
    g = torch.Generator().manual_seed(seed)
    layer = LAYERS[name]()
    base = layer[0] if isinstance(layer, nni._FusedModule) else layer
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) * 0.1)
        base.bias.copy_(torch.randn(base.bias.shape, generator=g))
    q = QuantLayer(layer)
    qin, qout = QParams(0.021, 117, 0, 255), QParams(0.043, 93, 0, 255)
    x = _input(name, layer, g)
    xq = torch.quantize_per_tensor(x, qin.scale, qin.zero_point, torch.quint8)
    kernel_layer = _quantized_layer(q, q.fused_relu, qout, engine)
    kernel = kernel_layer.pack_engine
    with engine_scope(kernel), torch.inference_mode():
        y = kernel_layer(xq).int_repr().long()
    combined = False
    if kernel == "onednn":
        combined = bool(_onednn_combines_scales(q, q.fused_relu, tuple(x.shape), (qin.zero_point, qout.zero_point)))
    arith = layer_arithmetic(kernel, qin, qout)
    if combined:
        arith = dataclasses.replace(arith, combined_scales=True)
    with torch.inference_mode():
        sim = q.kernel_forward(xq.dequantize(), arith)
        plain = torch.fake_quantize_per_tensor_affine(q(xq.dequantize()), qout.scale, qout.zero_point, 0, 255)
    to_int = lambda t: (torch.round(t / qout.scale) + qout.zero_point).long()
    return kernel, y, to_int(sim), to_int(plain)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(LAYERS))
def test_conv_and_linear_match_the_kernel_exactly(name, engine):
    kernel, y, sim, plain = _simulated_and_kernel(name, engine)
    if name == "depthwise":
        assert kernel == "onednn"  # fbgemm's depthwise kernel saturates 16-bit pair sums
    assert y.numel() >= 500_000
    assert torch.equal(sim, y), f"{int((sim != y).sum())} of {y.numel()} differ ({kernel})"
    if name != "depthwise":  # 9-term float32 sums are nearly exact: plain fake-quant rarely misses there
        assert not torch.equal(plain, y), "plain fake-quantization matched: the data has no tie to tell them apart"


def test_onednn_scale_order_probe_decides():
    """oneDNN multiplies by s_in*s_w in some implementations and by s_in, then s_w, in
    others (which one depends on the shape, the thread count and the CPU; on this
    project's machine 3x3 convolutions combine); the probe must reach a verdict on common
    shapes, and the layer tests above check that the verdict reproduces the kernel."""
    if "onednn" not in ENGINES:
        pytest.skip("no oneDNN in this torch build")
    conv3 = QuantLayer(nn.Conv2d(32, 32, 3, padding=1))
    conv1 = QuantLayer(nn.Conv2d(64, 128, 1))
    assert _onednn_combines_scales(conv3, False, (1, 32, 16, 16), (0, 0)) in (True, False)
    assert _onednn_combines_scales(conv1, False, (1, 64, 8, 8), (0, 0)) in (True, False)
    assert _onednn_combines_scales(conv1, False, (1, 64, 8, 8), (5, 129)) in (True, False)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_average_pools_break_ties_like_the_kernel(adaptive, channels_last):
    """40 channels: torch's channels-last pool vectorizes some and loops over the rest,
    and the two paths put the zero point on different sides of the rounding."""
    silence_quantized_deprecation()
    g = torch.Generator().manual_seed(0)
    scale, zp, channels = 0.031, 135, 40  # an odd zero point: ties land on different integers
    xq = torch.quantize_per_tensor(torch.randn(8, channels, 16, 16, generator=g) * 0.5, scale, zp, torch.quint8)
    if channels_last:
        xq = xq.contiguous(memory_format=torch.channels_last)
    if adaptive:
        y, size, pool = F.adaptive_avg_pool2d(xq, 2), 64, lambda t: F.adaptive_avg_pool2d(t, 2)
    else:
        y, size, pool = F.avg_pool2d(xq, 2), 4, lambda t: F.avg_pool2d(t, 2)
    fq = ActFakeQuant("pool")
    fq.set_qparams(QParams(scale, zp, 0, 255))
    plain = fq(pool(xq.dequantize()))
    fq.rounding = TorchKernelRounding(pool=AvgPoolTies(size, _pool_tie_rule(adaptive, channels, channels_last)))
    sim = fq(pool(xq.dequantize()))
    to_int = lambda t: (torch.round(t / scale) + zp).long()
    k = y.int_repr().long()
    assert torch.equal(to_int(sim), k), f"{int((to_int(sim) != k).sum())} differ"
    assert not torch.equal(to_int(plain), k)


def test_entry_quantizer_rounds_like_quantize_per_tensor():
    g = torch.Generator().manual_seed(0)
    scale, zp = float(torch.tensor(0.0273, dtype=torch.float32)), 117
    k = torch.randint(-100, 100, (1 << 18,), generator=g).float()
    x = torch.cat([torch.randn(1 << 18, generator=g), (k + 0.5) * scale])  # exact ties included
    fq = ActFakeQuant("x")
    fq.set_qparams(QParams(scale, zp, 0, 255))
    plain = fq(x)
    fq.rounding = TorchKernelRounding(quantize_per_tensor=True)
    sim = fq(x)
    y = torch.quantize_per_tensor(x, scale, zp, torch.quint8).dequantize()
    assert torch.equal(sim, y)
    assert not torch.equal(plain, y)


@pytest.mark.parametrize("relu", [False, True])
def test_quantized_add_inputs_are_read_as_the_kernel_reads_them(relu):
    """quantized::add dequantizes with fma(q, s, -zp*s): every pair of input integers,
    with qparams where that decides ties (found in a ResNet-50 compile: 202 + 171)."""
    silence_quantized_deprecation()
    qa, qb = QParams(0.01445965375751257, 128, 0, 255), QParams(0.04356544464826584, 127, 0, 255)
    out = QParams(0.023799952119588852, 0, 0, 255)
    ia, ib = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    a = torch._make_per_tensor_quantized_tensor(ia.to(torch.uint8).contiguous(), qa.scale, qa.zero_point)
    b = torch._make_per_tensor_quantized_tensor(ib.to(torch.uint8).contiguous(), qb.scale, qb.zero_point)
    kernel = (torch.ops.quantized.add_relu if relu else torch.ops.quantized.add)(a, b, out.scale, out.zero_point)
    fqs = [ActFakeQuant(n) for n in "abo"]
    for fq, qp in zip(fqs, (qa, qb, out)):
        fq.set_qparams(qp)

    def simulate() -> torch.Tensor:
        s = fqs[0].dequantize(ia.float()) + fqs[1].dequantize(ib.float())
        return torch.round(fqs[2](s.relu() if relu else s) / out.scale).long() + out.zero_point

    plain = simulate()
    fqs[0].rounding, fqs[1].rounding = TorchKernelRounding(fused_read=True), TorchKernelRounding(fused_read=True)
    k = kernel.int_repr().long()
    assert torch.equal(simulate(), k), f"{int((simulate() != k).sum())} differ"
    assert not torch.equal(plain, k)


def test_quantized_mul_reads_inputs_plainly():
    """quantized::mul, unlike add, reads (q - zp) * s: the plain fake-quant value is exact
    there, and the fused form the add needs would be wrong (30 random qparam sets, every
    pair of input integers)."""
    silence_quantized_deprecation()
    plain_bad = fused_bad = 0
    ia, ib = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    for seed in range(30):
        (sa, za), (sb, zb), (so, zo) = binary_qparams(seed, ties=False)
        qps = (QParams(sa, za, 0, 255), QParams(sb, zb, 0, 255), QParams(3 * so, zo, 0, 255))
        a = torch._make_per_tensor_quantized_tensor(ia.to(torch.uint8).contiguous(), sa, za)
        b = torch._make_per_tensor_quantized_tensor(ib.to(torch.uint8).contiguous(), sb, zb)
        k = torch.ops.quantized.mul(a, b, 3 * so, zo).int_repr().long()
        fqs = [ActFakeQuant(n) for n in "abo"]
        for fq, qp in zip(fqs, qps):
            fq.set_qparams(qp)
        for fused in (False, True):
            fqs[0].rounding, fqs[1].rounding = (TorchKernelRounding(fused_read=True), TorchKernelRounding(fused_read=True)) \
                if fused else (None, None)
            y = fqs[2](fqs[0].dequantize(ia.float()) * fqs[1].dequantize(ib.float()))
            bad = int(((torch.round(y / (3 * so)) + zo).long() != k).sum())
            fused_bad, plain_bad = (fused_bad + bad, plain_bad) if fused else (fused_bad, plain_bad + bad)
    assert plain_bad == 0
    assert fused_bad > 0


@pytest.mark.parametrize("channels_last", [False, True])
def test_quantized_cat_requantizes_like_the_kernel(channels_last):
    """quantized::cat with inputs on other grids: its channels-last fast path reads them
    fused and rounds like add; the generic path dequantizes plainly and rounds like
    quantize_per_tensor. Every input integer, 100 qparam sets (half of them with ties)."""
    silence_quantized_deprecation()
    bad = plain_bad = 0
    for seed in range(100):
        (sa, za), (sb, zb), (so, zo) = binary_qparams(seed)
        q = (torch.arange(40 * 4) % 256).to(torch.uint8).view(1, 40, 2, 2)
        xs = [torch._make_per_tensor_quantized_tensor(t.contiguous(), s, z) for t, s, z in ((q, sa, za), (q.flip(1), sb, zb))]
        if channels_last:
            xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
        k = torch.ops.quantized.cat(xs, 1, so, zo).int_repr().long()
        fqs = [ActFakeQuant(n) for n in "abo"]
        for fq, (s, z) in zip(fqs, ((sa, za), (sb, zb), (so, zo))):
            fq.set_qparams(QParams(s, z, 0, 255))
        plain = (torch.round(fqs[2](torch.cat([x.dequantize() for x in xs], 1)) / so) + zo).long()
        if channels_last:
            fqs[0].rounding, fqs[1].rounding = TorchKernelRounding(fused_read=True), TorchKernelRounding(fused_read=True)
        else:
            fqs[2].rounding = TorchKernelRounding(quantize_per_tensor=True)
        y = fqs[2](torch.cat([fq.dequantize(x.int_repr().float()) for fq, x in zip(fqs, xs)], 1))
        bad += int(((torch.round(y / so) + zo).long() != k).sum())
        plain_bad += int((plain != k).sum())
    assert bad == 0
    assert plain_bad > 0
