"""The simulated-int8 modules: activation and weight fake-quantizers, quantized conv/linear layers."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

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
# Kernel arithmetic: the protocols a lowering implements (the core names no backend)


class Rounding:
    """How one activation quantizer's kernel rounds, installed by a lowering on :attr:`ActFakeQuant.rounding`.

    Two steps, each overridable: :meth:`integers` (the integers the kernel computes for
    the fp32 input ``x``, zero point included, as a float tensor; the quantizer then
    saturates them to ``[quant_min, quant_max]``) and :meth:`value` (the fp32 value the
    consumers read for those integers). The base class is fake-quantization written
    out: ``round(x * (1/scale)) + zero_point`` (half to even) and ``(q - zero_point) * scale``.
    Concrete strategies live in the backend whose kernels they describe; state that
    spans quantizers (an op that reads another quantizer's last integers) lives in them.
    """

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x * (torch.tensor(1.0, dtype=torch.float32) / fq.scale.float())) + int(fq.zero_point)

    def value(self, fq: ActFakeQuant, q: torch.Tensor) -> torch.Tensor:
        return (q - int(fq.zero_point)) * fq.scale.float()


@dataclass(frozen=True)
class LayerArithmetic(ABC):
    """How an int8 conv/linear kernel requantizes, installed by a lowering on :attr:`QuantLayer.arithmetic`.

    ``input`` and ``output`` are the qparams the kernel reads and writes. The layer
    accumulates the integer products exactly (:meth:`QuantLayer.kernel_forward`); the
    strategy turns that accumulator into output integers with the kernel's own float
    arithmetic. Concrete strategies live in the backend whose kernels they describe.
    """

    input: QParams
    output: QParams

    @abstractmethod
    def requantize(self, acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Output integers (zero point included, before saturation) for the exact accumulator.

        ``acc``: float64 sums of (input integer - zero point) x int8 weight, no bias;
        ``w_scale``: float64 weight scales shaped to broadcast over the output channels;
        ``bias``: float32, the same shape.
        """


# ---------------------------------------------------------------------------------------
# Simulated-int8 modules


class ActFakeQuant(nn.Module):
    """Quantize-dequantize one activation per tensor (fp32 in, fp32 on the int8 grid out).

    ``point`` names the fp32 node whose output this quantizes; ``inherit`` (for average
    pooling and friends) names the quantizer whose qparams this one copies. The observed
    statistics travel with the module (buffers), so qparams can be re-derived for another
    scheme from the graph alone. ``rounding`` (None: plain fake-quantization) is set by a
    lowering to round as its kernels do (:class:`Rounding`).
    """

    def __init__(self, point: str, observer: Observer | None = None, inherit: str | None = None) -> None:
        super().__init__()
        self.point = point
        self.inherit = inherit
        self.rounding: Rounding | None = None
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
        if self.rounding is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return self.rounding.value(self, self.rounding.integers(self, x).clamp(self.quant_min, self.quant_max))

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        """The fp32 value this quantizer hands on for the integers ``q`` (a float tensor)."""
        return (self.rounding or _PLAIN).value(self, q)

    def extra_repr(self) -> str:
        src = f", inherit={self.inherit}" if self.inherit else ""
        return (f"point={self.point}, scale={float(self.scale):.6g}, zero_point={int(self.zero_point)}, "
                f"range=[{self.quant_min},{self.quant_max}]{src}")


_PLAIN = Rounding()


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
            return torch.fake_quantize_per_channel_affine(w, self.scale, self.zero_point, self.axis,
                                                          self.quant_min, self.quant_max)
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


class QuantLayer(nn.Module):
    """A conv/linear layer (possibly fused with ReLU) computing with fake-quantized weights.

    ``arithmetic`` (None: plain fake-quantized weights in fp32) is set by a lowering to
    compute as its int8 kernel does (:class:`LayerArithmetic`).
    """

    def __init__(self, layer: nn.Module, per_channel: bool = True) -> None:
        super().__init__()
        if not isinstance(layer, _WEIGHTED):
            raise TypeError(f"QuantLayer wraps conv/linear layers, not {type(layer).__name__}")
        self.layer = layer
        self.weight_fq = WeightFakeQuant(_base(layer).weight, per_channel)
        self.arithmetic: LayerArithmetic | None = None

    @property
    def base(self) -> nn.Module:
        return _base(self.layer)

    @property
    def fused_relu(self) -> bool:
        return isinstance(self.layer, nni._FusedModule)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic is not None:
            return self.kernel_forward(x, self.arithmetic)
        base = self.base
        w = self.weight_fq(base.weight)
        y = F.linear(x, w, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(x, w, base.bias)
        return F.relu(y) if self.fused_relu else y

    def kernel_forward(self, x: torch.Tensor, arith: LayerArithmetic) -> torch.Tensor:
        """The layer as an int8 kernel computes it, bit for bit (see :class:`LayerArithmetic`).

        ``x`` must be on the input grid (the output of the input's quantizer). The integer
        products are accumulated exactly (float64 holds every int32 sum), then ``arith``
        requantizes them; the result is on the output grid.
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
        q = arith.requantize(acc, w_scale, bias)
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
    """Back to plain fake-quantization: every strategy a lowering installed is set to None."""
    for m in gm.modules():
        if isinstance(m, QuantLayer):
            m.arithmetic = None
        elif isinstance(m, ActFakeQuant):
            m.rounding = None


@contextmanager
def kernel_arithmetic_off(gm: GraphModule) -> Iterator[None]:
    """Plain fake-quantization inside the block, the lowering's strategies back after it.

    For work that needs the graph's shapes, not its bits: the exact kernel arithmetic
    accumulates in float64 (:meth:`QuantLayer.kernel_forward`), which is slow (ResNet-50
    at 224x224, shape propagation after lowering: 2.63 s exact, 0.67 s fake-quantized, on a
    busy 2-core machine).
    """
    saved = [(m, "arithmetic" if isinstance(m, QuantLayer) else "rounding") for m in gm.modules()
             if isinstance(m, (QuantLayer, ActFakeQuant))]
    values = [getattr(m, attr) for m, attr in saved]
    clear_kernel_arithmetic(gm)
    try:
        yield
    finally:
        for (m, attr), value in zip(saved, values):
            setattr(m, attr, value)
