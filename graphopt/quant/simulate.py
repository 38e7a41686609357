"""The simulated-int8 modules: activation and weight fake-quantizers, quantized conv/linear layers."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.ao.nn.intrinsic as nni
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.quant.calibrate import _WEIGHT_QMAX, _WEIGHT_QMIN, Observer, QParams, weight_qparams

_SILENCED = False


def silence_quantized_deprecation() -> None:
    """Consume torch's one-time "quantized tensor creation is deprecated" warning quietly.

    torch 2.13 warns once per process (a C++ warn-once shared by ``quantize_per_tensor``,
    ``quantize_per_channel`` and friends). graphopt builds on those kernels on purpose
    (DESIGN.md), so the warning would only alarm users of every int8 artifact.
    """
    global _SILENCED
    if not _SILENCED:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)
        _SILENCED = True


# ---------------------------------------------------------------------------------------
# Simulated-int8 modules


class ActFakeQuant(nn.Module):
    """Quantize-dequantize one activation per tensor (fp32 in, fp32 on the int8 grid out).

    ``point`` names the fp32 node whose output this quantizes; ``inherit`` (for average
    pooling and friends) names the quantizer whose qparams this one copies. The observed
    statistics travel with the module (buffers), so qparams can be re-derived for another
    scheme from the graph alone.
    """

    def __init__(self, point: str, observer: Observer | None = None, inherit: str | None = None) -> None:
        super().__init__()
        self.point = point
        self.inherit = inherit
        self.enabled = True
        self.pool_rounding: PoolRounding | None = None  # set by a lowering (average pools)
        self.quantize_rounding = ""  # set by a lowering: "torch" (quantize_per_tensor) or "onnx" (QuantizeLinear)
        self.dequantize_fma = False  # set by a lowering: the value as quantized add reads it
        #: set by a lowering: this quantizer is the output of ONNX Runtime's QLinearAdd of the
        #: values of these two quantizers (their last integers, see :meth:`dequantize`), each
        #: through the data-movement ops between (``(op, extra args)``: max pool, flatten...)
        self.qlinear_add: tuple[ActFakeQuant, ActFakeQuant] | None = None
        self.qlinear_add_paths: tuple[tuple[tuple[Any, tuple[Any, ...]], ...], ...] = ((), ())
        self.stash = False  # set by a lowering: keep the last integers (a QLinearAdd downstream reads them)
        self._last_q: torch.Tensor | None = None
        self.quant_min, self.quant_max = 0, 255
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        head, hist = (observer or Observer(1)).to_tensors()
        self.register_buffer("obs_head", head)
        self.register_buffer("obs_hist", hist)
        self._ranges = observer.ranges if observer is not None else {}  # shared memo of derived ranges

    def observer(self) -> Observer:
        obs = Observer.from_tensors(self.obs_head, self.obs_hist)
        obs.ranges = self._ranges
        return obs

    @property
    def qparams(self) -> QParams:
        return QParams(float(self.scale), int(self.zero_point), self.quant_min, self.quant_max)

    def set_qparams(self, qp: QParams) -> None:
        self.scale.fill_(qp.scale)
        self.zero_point.fill_(qp.zero_point)
        self.quant_min, self.quant_max = qp.quant_min, qp.quant_max

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        plain = self.pool_rounding is None and not self.quantize_rounding and not self.dequantize_fma
        if plain and self.qlinear_add is None and not self.stash:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        scale, zp = self.scale.float(), int(self.zero_point)
        ints = self._qlinear_add_operands()
        if ints is not None and all(t.shape == x.shape for t in ints):
            q = self._qlinear_add(*ints)
        elif self.pool_rounding is not None:
            q = self._pool_round(x, self.pool_rounding)
        elif self.quantize_rounding == "torch":
            # torch.quantize_per_tensor: round(fma(x, 1/scale, zero_point)), one float32
            # rounding before the integer one (fake_quantize rounds x * (1/scale) first, and
            # ties then break differently). float64 holds the fused product exactly.
            inv = torch.tensor(1.0, dtype=torch.float32) / scale
            q = torch.round((x.double() * inv.double() + zp).float())
        elif self.quantize_rounding == "onnx":
            q = torch.round(x / scale) + zp  # ONNX Runtime's QuantizeLinear and QLinearConcat divide
        else:
            q = torch.round(x * (torch.tensor(1.0, dtype=torch.float32) / scale)) + zp  # as fake_quantize
        return self.dequantize(q.clamp(self.quant_min, self.quant_max))

    def _qlinear_add_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.qlinear_add is None or any(o._last_q is None for o in self.qlinear_add):
            return None
        ints = []
        for fq, path in zip(self.qlinear_add, self.qlinear_add_paths):
            t = fq._last_q
            for op, extra in path:  # max pool, flatten, view...: they move integers as they move values
                t = getattr(t, op)(*extra) if isinstance(op, str) else op(t, *extra)
            ints.append(t)
        return ints[0], ints[1]

    def _qlinear_add(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        # MLAS QLinearAdd: fma(ra, A, fma(rb, B, zp_c - fma(ra, zp_a, rb * zp_b))) with
        # ra = s_a/s_c, rb = s_b/s_c, float32 throughout (a float64 product of two float32
        # values is exact: one rounding per fused multiply-add), rounded half to even
        a, b = self.qlinear_add
        sc = self.scale.float()
        ra, rb = a.scale.float() / sc, b.scale.float() / sc
        fixed = (ra.double() * int(a.zero_point) + (rb * int(b.zero_point)).double()).float()
        adj = torch.tensor(float(int(self.zero_point)), dtype=torch.float32) - fixed
        inner = (rb.double() * qb.double() + adj.double()).float()
        return torch.round((ra.double() * qa.double() + inner.double()).float())

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The fp32 value this quantizer hands on for the integers ``q`` (a float tensor)."""
        if self.stash:
            self._last_q = q
        scale, zp = self.scale.float(), int(self.zero_point)
        if self.dequantize_fma:
            # as torch's quantized add (and cat's channels-last path) read their inputs:
            # fma(q, scale, -zp * scale)
            return (q.double() * scale.double() + float(scale * -zp)).float()
        return (q - zp) * scale

    def _pool_round(self, x: torch.Tensor, rounding: PoolRounding) -> torch.Tensor:
        # x is the fp32 average of ``size`` values on this grid: recover the integer sum
        # exactly (its float error is far below half a unit), then round as the kernel does.
        scale, zp = float(self.scale), int(self.zero_point)
        if rounding.kernel == "ort-average":
            return torch.round(x / self.scale.float() + zp)
        acc = torch.round(x.double() / scale * rounding.size)
        if rounding.kernel == "ort-global":
            s = self.scale.float()
            return torch.round(acc.float() * (s / (s * float(rounding.size)))) + zp
        mean = acc / rounding.size
        first = torch.tensor(rounding.zero_point_first).view((-1,) + (1,) * (x.dim() - 2))
        return torch.where(first, torch.round(mean + zp), torch.round(mean) + zp).float()

    def extra_repr(self) -> str:
        src = f", inherit={self.inherit}" if self.inherit else ""
        return f"point={self.point}, scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}, range=[{self.quant_min},{self.quant_max}]{src}"


class WeightFakeQuant(nn.Module):
    """Symmetric int8 fake-quant of a weight, per output channel (axis 0) or per tensor."""

    def __init__(self, weight: torch.Tensor, per_channel: bool = True) -> None:
        super().__init__()
        scale, zp = weight_qparams(weight, per_channel=per_channel)
        self.per_channel = per_channel
        self.axis = 0
        self.quant_min, self.quant_max = _WEIGHT_QMIN, _WEIGHT_QMAX
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max)
        return torch.fake_quantize_per_tensor_affine(w, self.scale[0], self.zero_point[0], self.quant_min, self.quant_max)

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The real int8 weight (``torch.qint8``) the simulation stands for."""
        silence_quantized_deprecation()
        w = w.detach().float()
        if self.per_channel:
            return torch.quantize_per_channel(w, self.scale.double(), self.zero_point.long(), self.axis, torch.qint8)
        return torch.quantize_per_tensor(w, float(self.scale[0]), 0, torch.qint8)

    def extra_repr(self) -> str:
        return f"per_channel={self.per_channel}, channels={self.scale.numel()}"


_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear, nni.ConvReLU1d, nni.ConvReLU2d, nni.LinearReLU)


def _base(layer: nn.Module) -> nn.Module:
    return layer[0] if isinstance(layer, nni._FusedModule) else layer


@dataclass(frozen=True)
class KernelArithmetic:
    """Which int8 kernel family computes a conv/linear, and its input and output qparams.

    Set on a :class:`QuantLayer` by a lowering (cpu-int8's) so that the simulated
    program reproduces that backend's rounding exactly: with plain
    fake-quantization the simulation differs from the kernel by one step on a few
    elements per million (float32 accumulation order, rounding ties), and in deep nets
    those flips compound into many output steps. ``kernel`` is ``fbgemm`` or ``onednn``
    (measured bit-exact against torch's quantized conv/linear; see
    ``tests/test_quant_arithmetic.py``) or ``ort`` (ONNX Runtime's QLinearConv/QGemm).
    """

    kernel: Literal["fbgemm", "onednn", "ort"]
    input: QParams
    output: QParams
    #: oneDNN only: multiply the accumulator by ``s_in * s_w`` (some implementations)
    #: rather than by ``s_in`` and then ``s_w`` (others); the lowering measures which.
    combined_scales: bool = False


@dataclass(frozen=True)
class PoolRounding:
    """How a quantized average pool rounds: set by a lowering on its requantizer.

    The kernels sum integers and divide by the window (``size`` elements); an exact
    half is rounded to even, but some kernel paths add the zero point before rounding
    and others after it, so ties land on different integers. ``zero_point_first`` holds
    one flag per channel (torch's channels-last average pool vectorizes over channels
    and leaves the remainder to a scalar loop that rounds the other way); the lowering
    measures it on the kernel itself.
    """

    size: int
    zero_point_first: tuple[bool, ...]
    #: ``torch`` (above); ``ort-global``: ONNX Runtime's QLinearGlobalAveragePool,
    #: ``round(float(sum) * (s / (s * size))) + zp``; ``ort-average``: its
    #: QLinearAveragePool, ``round(mean / s + zp)`` on the float mean of the dequantized
    #: window (which the simulated pool computes identically).
    kernel: Literal["torch", "ort-global", "ort-average"] = "torch"


class QuantLayer(nn.Module):
    """A conv/linear layer (possibly fused with ReLU) computing with fake-quantized weights."""

    def __init__(self, layer: nn.Module, per_channel: bool = True) -> None:
        super().__init__()
        if not isinstance(layer, _WEIGHTED):
            raise TypeError(f"QuantLayer wraps conv/linear layers, not {type(layer).__name__}")
        self.layer = layer
        self.weight_fq = WeightFakeQuant(_base(layer).weight, per_channel)
        self.enabled = True
        self.arithmetic: KernelArithmetic | None = None  # set by a lowering: compute as its kernel does

    @property
    def base(self) -> nn.Module:
        return _base(self.layer)

    @property
    def fused_relu(self) -> bool:
        return isinstance(self.layer, nni._FusedModule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.arithmetic is not None:
            return self.kernel_forward(x, self.arithmetic)
        base = self.base
        w = self.weight_fq(base.weight) if self.enabled else base.weight
        y = F.linear(x, w, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, w, base.bias)
        return F.relu(y) if self.fused_relu else y

    def kernel_forward(self, x: torch.Tensor, arith: KernelArithmetic) -> torch.Tensor:
        """The layer as the int8 kernel computes it, bit for bit (see :class:`KernelArithmetic`).

        ``x`` must be on the input grid (the output of the input's quantizer). The integer
        products are accumulated exactly (float64 holds every int32 sum), then requantized
        with the kernel's own float arithmetic; the result is on the output grid.
        """
        base = self.base
        xi = torch.round(x.double() / arith.input.scale)  # q - zero_point, exactly
        wq = self.weight_fq.quantize(base.weight)
        wi = wq.int_repr().double()
        acc = F.linear(xi, wi) if isinstance(base, nn.Linear) else base._conv_forward(xi, wi, None)
        if isinstance(base, nn.Linear):  # output channels last
            shape = (1,) * (acc.dim() - 1) + (-1,)
        else:  # output channels at dim 1
            shape = (1, -1) + (1,) * (acc.dim() - 2)
        w_scale = (wq.q_per_channel_scales() if wq.qscheme() == torch.per_channel_affine
                   else torch.tensor([wq.q_scale()], dtype=torch.float64)).view(shape)
        bias = (base.bias.detach().float() if base.bias is not None else torch.zeros(w_scale.numel())).view(shape)
        out = arith.output
        if arith.kernel == "fbgemm":
            # fbgemm requantization (float bias): (float(acc) + bias / (s_in*s_w)) * (s_in*s_w / s_out),
            # every factor float32, rounded half to even; the zero point is added after rounding.
            act_times_w = torch.tensor(arith.input.scale, dtype=torch.float32) * w_scale.float()
            pre = (acc.float() + bias / act_times_w) * (act_times_w / torch.tensor(out.scale, dtype=torch.float32))
            q = torch.round(pre) + out.zero_point
        elif arith.kernel == "ort":
            # ONNX Runtime (QLinearConv/QGemm fused from QDQ): the fp32 bias becomes int32 at
            # steps of s_in*s_w (float32 division, half to even) added to the accumulator,
            # then scaled by float32 (s_in*s_w)/s_out, rounded half to even; zero point after.
            act_times_w = torch.tensor(arith.input.scale, dtype=torch.float32) * w_scale.float()
            bias_int = torch.round(bias / act_times_w)
            pre = (acc + bias_int.double()).float() * (act_times_w / torch.tensor(out.scale, dtype=torch.float32))
            q = torch.round(pre) + out.zero_point
        else:
            # oneDNN through ideep: torch hands over reciprocal scales (1/s_in, 1/s_out as
            # float32) and they are inverted again in float32; the source and weight scales
            # are applied one after the other, then the bias, then 1/dst_scale; the zero point
            # is added before rounding (so ties break differently from fbgemm).
            one = torch.tensor(1.0, dtype=torch.float32)
            src_scale = one / torch.tensor(1.0 / arith.input.scale, dtype=torch.float32)
            inv_dst_scale = one / (one / torch.tensor(1.0 / out.scale, dtype=torch.float32))
            scaled = acc.float() * (src_scale * w_scale.float()) if arith.combined_scales else (acc.float() * src_scale) * w_scale.float()
            pre = (scaled + bias) * inv_dst_scale
            q = torch.round(pre + torch.tensor(float(out.zero_point), dtype=torch.float32))
        lo, hi = (0, 255) if out.dtype == torch.quint8 else (-128, 127)  # the kernel saturates to its dtype
        q = q.clamp(out.zero_point if self.fused_relu else lo, hi)
        return (q - out.zero_point) * torch.tensor(out.scale, dtype=torch.float32)



def quantizer_of(gm: GraphModule, n: Node | None) -> ActFakeQuant | None:
    """The activation quantizer node ``n`` calls, if it calls one."""
    if isinstance(n, Node) and n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if isinstance(m, ActFakeQuant):
            return m
    return None


def clear_kernel_arithmetic(gm: GraphModule) -> None:
    """Back to plain fake-quantization: forget what a lowering set for its kernels."""
    for m in gm.modules():
        if isinstance(m, QuantLayer):
            m.arithmetic = None
        elif isinstance(m, ActFakeQuant):
            m.pool_rounding = None
            m.quantize_rounding = ""
            m.dequantize_fma = False
            m.qlinear_add = None
            m.qlinear_add_paths = ((), ())
            m.stash, m._last_q = False, None

