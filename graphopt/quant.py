"""Quantization data shared by ``insert-quant-stubs`` and every int8 backend.

One calibration serves every int8 lowering (see DESIGN.md): calibration runs the *fp32*
graph once and records, for every tensor a quantizer could ever be placed on, its range
and a histogram (:class:`Observer`). Everything after that is derived without running
the model again:

- :func:`place` marks the quantizable regions of an fp32 graph and returns the
  *simulated int8* graph: :class:`ActFakeQuant` modules (quantize-dequantize in fp32) on
  every quantized activation and :class:`QuantLayer` wrappers whose weights are
  fake-quantized per output channel (symmetric int8). Quantized ops whose inputs come
  from fp32 get a quantizer on that input (the entry stub); an fp32 consumer simply reads
  the fake-quantized value (what a dequantize at the region's exit produces).
- :func:`derive_qparams` turns the recorded histograms into scale/zero-point for one
  activation scheme: ``u8`` (asymmetric, ``quint8`` — fbgemm, ONNX Runtime on CPU) or
  ``s8`` (symmetric, ``qint8``, zero point 0 — TensorRT), with a range method
  (``minmax``, ``histogram`` = L2-optimal clipping, ``entropy`` = TensorRT's KL
  calibration). Switching scheme re-derives in place; it never re-runs calibration.
- :func:`strip` gives the fp32 graph back (quantizers removed, layers unwrapped), so a
  program can be re-placed with other layers kept in fp32 (:func:`keep_fp32_auto`).

Region rules (:func:`op_kind`): conv/linear (also fused ConvReLU/LinearReLU), add, mul,
cat and BatchNorm2d are *anchors* with their own output quantizer; a ReLU (and ReLU6 after
conv/linear) that is the anchor's only user is absorbed, the quantizer sits after it.
Max pooling, ReLU, flatten, view/reshape/permute, chunk/split, slicing and dropout keep
their input's quantization (*passthrough*); average pooling, mean and ReLU6/hardtanh
keep it but round again (*requant*, an :class:`ActFakeQuant` that inherits its input's
qparams). Everything else runs in fp32.

Verification splits the error in two: :func:`quantization_error` (simulated vs fp32)
and :func:`lowering_error` (backend vs simulated); :func:`check_lowering` holds the
latter to a number of output quantization steps.

Plain fake-quantization is one step away from a real kernel on a few elements per
million (float32 accumulation order, ties rounded with the zero point on one side or the
other), and in deep nets those flips compound. So a lowering may tell the simulation how
its kernels compute: :class:`KernelArithmetic` on a :class:`QuantLayer` (exact integer
accumulation, then fbgemm's or oneDNN's requantization), and on an
:class:`ActFakeQuant` ``pool_rounding`` (:class:`PoolRounding`), ``quantize_rounding``
(``"torch"``: as ``quantize_per_tensor``; ``"onnx"``: as ONNX ``QuantizeLinear``) and
``dequantize_fma`` (its value as quantized add reads it), and ``qlinear_add`` (ONNX
Runtime's QLinearAdd, from its operands' integers). cpu-int8 and ort-int8 set what their
kernels need, and their artifacts then match the simulation bit for bit.
:func:`derive_qparams` and :func:`clear_kernel_arithmetic` drop them.
"""

from __future__ import annotations

import copy
import difflib
import math
import operator
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import numpy as np
import torch
import torch.ao.nn.intrinsic as nni
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.errors import DataError, PipelineError
from graphopt.program import Program, delete_unused_submodules, flatten_outputs

__all__ = [
    "Scheme",
    "Method",
    "SCHEMES",
    "METHODS",
    "QParams",
    "Observer",
    "calibrate",
    "select_range",
    "activation_qparams",
    "weight_qparams",
    "ActFakeQuant",
    "WeightFakeQuant",
    "QuantLayer",
    "KernelArithmetic",
    "PoolRounding",
    "clear_kernel_arithmetic",
    "pool_window",
    "quantizer_of",
    "OpKind",
    "op_kind",
    "absorbable_activation",
    "anchor_inputs",
    "anchor_name",
    "QuantConfig",
    "Placement",
    "anchors",
    "resolve_names",
    "place",
    "strip",
    "derive_qparams",
    "rederive",
    "quantize_program",
    "summary",
    "output_scales",
    "quantization_error",
    "lowering_error",
    "LoweringCheck",
    "check_lowering",
    "LocalLoweringCheck",
    "check_lowering_local",
    "verify_int8",
    "Sensitivity",
    "keep_fp32_auto",
    "META_KEY",
    "CALIBRATION_KEY",
    "silence_quantized_deprecation",
]

Scheme = Literal["u8", "s8"]
Method = Literal["minmax", "histogram", "entropy"]
SCHEMES: tuple[str, ...] = ("u8", "s8")
METHODS: tuple[str, ...] = ("minmax", "histogram", "entropy")

#: ``program.meta`` key of the JSON-able summary (scheme, qparams per activation, layers).
META_KEY = "quant"
#: ``program.meta`` key of the calibration itself: ``{node name: Observer}`` (not JSON).
CALIBRATION_KEY = "quant_calibration"

_EPS = float(torch.finfo(torch.float32).eps)
_WEIGHT_QMIN, _WEIGHT_QMAX = -128, 127  # int8 weights; scale = amax/127 so -128 is never used


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
# Quantization parameters


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine quantization: ``q = clamp(round(x / scale) + zero_point, qmin, qmax)``."""

    scale: float
    zero_point: int
    quant_min: int
    quant_max: int

    @property
    def dtype(self) -> torch.dtype:
        return torch.quint8 if self.quant_min >= 0 else torch.qint8

    @property
    def range(self) -> tuple[float, float]:
        """The representable interval ``[dequant(qmin), dequant(qmax)]``."""
        return ((self.quant_min - self.zero_point) * self.scale, (self.quant_max - self.zero_point) * self.scale)

    def to_json(self) -> dict[str, Any]:
        return {"scale": self.scale, "zero_point": self.zero_point, "dtype": str(self.dtype).replace("torch.", ""),
                "quant_min": self.quant_min, "quant_max": self.quant_max}


def activation_qparams(lo: float, hi: float, scheme: str, *, reduce_range: bool = False) -> QParams:
    """QParams covering ``[lo, hi]``: u8 asymmetric (zero exactly representable) or s8 symmetric."""
    if scheme == "u8":
        qmin, qmax = 0, (127 if reduce_range else 255)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        scale = max((hi - lo) / (qmax - qmin), _EPS)
        zp = int(min(max(qmin - round(lo / scale), qmin), qmax))
    elif scheme == "s8":
        qmin, qmax = (-64, 63) if reduce_range else (-128, 127)
        amax = max(-lo, hi, 0.0)
        scale = max(amax / qmax, _EPS)
        zp = 0
    else:
        raise ValueError(f"unknown activation scheme {scheme!r}; valid: 'u8', 's8'")
    return QParams(float(np.float32(scale)), zp, qmin, qmax)


def weight_qparams(weight: torch.Tensor, *, per_channel: bool = True, axis: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 scales (float32) and zero points (int32, all 0): per output channel or per tensor."""
    w = weight.detach().float()
    if per_channel:
        amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
    else:
        amax = w.abs().amax().reshape(1)
    scale = torch.clamp(amax / _WEIGHT_QMAX, min=_EPS)
    return scale, torch.zeros_like(scale, dtype=torch.int32)


# ---------------------------------------------------------------------------------------
# Observers: range + histogram of one tensor over the calibration set


class Observer:
    """Running min/max and a histogram over a range that grows with the data.

    When a batch falls outside the histogram's range, the range grows and the old counts
    are redistributed over the new bins through the cumulative distribution (mass is
    assumed uniform within a bin), so one pass over the data suffices.
    """

    def __init__(self, bins: int = 2048) -> None:
        self.bins = bins
        self.min = math.inf
        self.max = -math.inf
        self.lo = 0.0
        self.hi = 0.0
        self.hist = np.zeros(bins, dtype=np.float64)
        self.count = 0
        self.zeros = 0  # exact zeros (ReLU outputs): kept apart for entropy calibration
        self.ranges: dict[tuple[str, str], tuple[float, float]] = {}  # (method, scheme) -> range, memoized

    @property
    def empty(self) -> bool:
        return self.count == 0

    def edges(self) -> np.ndarray:
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        if not x.is_floating_point():
            return
        x = x.float()
        mn, mx = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(mn) and math.isfinite(mx)):
            raise DataError("calibration produced NaN or infinite activations; check the calibration data")
        if self.count == 0:
            lo, hi = mn, mx
            if hi - lo < 1e-8:
                lo, hi = lo - 1e-4 - abs(lo) * 1e-3, hi + 1e-4 + abs(hi) * 1e-3
            self.lo, self.hi = lo, hi
        elif mn < self.lo or mx > self.hi:
            lo, hi = min(mn, self.lo), max(mx, self.hi)
            margin = 0.2 * (hi - lo)  # grow with room to spare: fewer re-binnings
            if mn < self.lo:
                lo -= margin
            if mx > self.hi:
                hi += margin
            self._rebin(lo, hi)
        self.ranges.clear()
        self.min, self.max = min(self.min, mn), max(self.max, mx)
        counts = torch.histc(x, self.bins, self.lo, self.hi)
        self.hist += counts.double().numpy()
        self.count += x.numel()
        self.zeros += int((x == 0).sum())

    def _rebin(self, lo: float, hi: float) -> None:
        cdf = np.concatenate([[0.0], np.cumsum(self.hist)])
        new_edges = np.linspace(lo, hi, self.bins + 1)
        new_cdf = np.interp(new_edges, self.edges(), cdf, left=0.0, right=cdf[-1])
        self.hist = np.diff(new_cdf)
        self.lo, self.hi = lo, hi

    def merge(self, other: "Observer") -> None:
        if other.empty:
            return
        if self.empty:
            self.__dict__.update(copy.deepcopy(other.__dict__))
            return
        lo, hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.ranges.clear()
        if (lo, hi) != (self.lo, self.hi):
            self._rebin(lo, hi)
        cdf = np.concatenate([[0.0], np.cumsum(other.hist)])
        self.hist += np.diff(np.interp(self.edges(), other.edges(), cdf, left=0.0, right=cdf[-1]))
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.count += other.count
        self.zeros += other.zeros

    # The observer travels inside ActFakeQuant modules as buffers.
    def to_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        head = torch.tensor([self.min, self.max, self.lo, self.hi, float(self.count), float(self.zeros)], dtype=torch.float64)
        return head, torch.from_numpy(self.hist.copy())

    @classmethod
    def from_tensors(cls, head: torch.Tensor, hist: torch.Tensor) -> "Observer":
        obs = cls(int(hist.numel()))
        obs.min, obs.max, obs.lo, obs.hi, count, zeros = (float(v) for v in head.tolist())
        obs.count, obs.zeros = int(count), int(zeros)
        obs.hist = hist.double().numpy().copy()
        return obs

    def to_json(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "count": self.count}


def calibrate(
    gm: GraphModule,
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    bins: int = 2048,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Observer]:
    """Run the fp32 graph on every sample; observe every floating-point tensor it computes.

    Returns ``{node name: Observer}``. Observing every node (not only where quantizers
    sit today) is what lets a later placement keep other layers in fp32 without running
    calibration again.
    """
    observers: dict[str, Observer] = {}

    class _Observe(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            if n.op != "output" and isinstance(out, torch.Tensor) and out.is_floating_point():
                observers.setdefault(n.name, Observer(bins)).update(out)
            return out

    if not samples:
        raise DataError("calibration needs at least one sample")
    interp = _Observe(gm)
    with torch.no_grad():
        for i, sample in enumerate(samples):
            interp.run(*sample)
            if progress is not None:
                progress(i + 1, len(samples))
    return observers


# ---------------------------------------------------------------------------------------
# Range selection


def _abs_histogram(obs: Observer) -> tuple[np.ndarray, np.ndarray]:
    """The histogram of |x| over [0, max|x|] with the same number of bins."""
    amax = max(abs(obs.lo), abs(obs.hi))
    edges = np.linspace(0.0, amax, obs.bins + 1)
    cdf = np.concatenate([[0.0], np.cumsum(obs.hist)])
    src = obs.edges()

    def f(t: np.ndarray) -> np.ndarray:
        return np.interp(t, src, cdf, left=0.0, right=cdf[-1])

    inside = f(edges) - f(-edges)
    return edges, np.diff(np.maximum.accumulate(np.maximum(inside, 0.0)))


_TAILS = np.concatenate([[0.0], np.logspace(-7, -1.5, 18)])


def _quantiles(edges: np.ndarray, hist: np.ndarray, probs: np.ndarray) -> np.ndarray:
    cdf = np.concatenate([[0.0], np.cumsum(hist)])
    total = cdf[-1]
    # Inverse CDF; strictly increasing xp is obtained by ignoring empty bins' flat steps.
    keep = np.concatenate([[True], np.diff(cdf) > 0])
    return np.interp(probs * total, cdf[keep], edges[keep])


def _l2_error(centers: np.ndarray, hist: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """Expected squared error of quantizing the histogram to ``levels`` steps over [lo, hi] (per candidate)."""
    step = (hi - lo) / (levels - 1)
    c = centers[None, :]
    clipped = np.clip(c, lo[:, None], hi[:, None])
    err = (c - clipped) ** 2 + (step**2 / 12.0)[:, None]
    return (err * hist[None, :]).sum(axis=1)


def _l2_range(obs: Observer, symmetric: bool, levels: int) -> tuple[float, float]:
    if symmetric:
        edges, hist = _abs_histogram(obs)
        centers = (edges[:-1] + edges[1:]) / 2
        amax_all = max(abs(obs.min), abs(obs.max))
        cands = np.minimum(_quantiles(edges, hist, 1.0 - _TAILS), amax_all)
        cands = np.maximum(cands, edges[1])
        # Symmetric: a value c is clipped at amax; error folded on |x|.
        err = _l2_error(centers, hist, np.zeros_like(cands), cands, levels // 2)
        a = float(cands[int(np.argmin(err))])
        return -a, a
    edges, hist = obs.edges(), obs.hist
    centers = (edges[:-1] + edges[1:]) / 2
    los = np.maximum(_quantiles(edges, hist, _TAILS), obs.min)
    his = np.minimum(_quantiles(edges, hist, 1.0 - _TAILS), obs.max)
    lo_grid, hi_grid = np.meshgrid(los, his, indexing="ij")
    lo_c, hi_c = lo_grid.ravel(), hi_grid.ravel()
    lo_q, hi_q = np.minimum(lo_c, 0.0), np.maximum(hi_c, 0.0)  # u8 keeps zero representable
    ok = hi_q - lo_q > 0
    if not ok.any():
        return obs.min, obs.max
    lo_q, hi_q, lo_c, hi_c = lo_q[ok], hi_q[ok], lo_c[ok], hi_c[ok]
    err = _l2_error(centers, hist, lo_q, hi_q, levels)
    i = int(np.argmin(err))
    return float(lo_c[i]), float(hi_c[i])


def _kl_threshold(edges: np.ndarray, hist: np.ndarray, levels: int) -> float:
    """TensorRT's entropy calibration: the clipping threshold minimizing KL(P || Q)."""
    n = len(hist)
    if hist.sum() <= 0 or n <= levels:
        return float(edges[-1])
    nz = np.nonzero(hist)[0]
    last = int(nz[-1]) + 1 if nz.size else n
    stride = max(1, (n - levels) // 256)
    best, best_i = math.inf, n
    total_tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = hist[i:].sum()
    for i in range(levels, n + 1, stride):
        if i > last + stride:
            break
        ref = hist[:i].copy()
        ref[-1] += total_tail[i]
        idx = np.minimum(np.arange(i) * levels // i, levels - 1)
        nonzero = hist[:i] > 0
        mass = np.bincount(idx, weights=hist[:i], minlength=levels)
        cnt = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[idx] / np.maximum(cnt[idx], 1.0), 0.0)
        p = ref / ref.sum()
        qs = q.sum()
        if qs <= 0:
            continue
        q = q / qs
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def _entropy_range(obs: Observer, symmetric: bool) -> tuple[float, float]:
    edges, hist = _abs_histogram(obs)
    # A spike of exact zeros (ReLU outputs) dominates KL and drives the threshold far too
    # low; zeros are exactly representable in every scheme, so they are left out.
    hist = hist.copy()
    hist[0] = max(0.0, hist[0] - obs.zeros)
    if not symmetric and obs.min >= 0:
        t = _kl_threshold(edges, hist, 256)
        return 0.0, min(t, obs.max)
    t = _kl_threshold(edges, hist, 128)
    if symmetric:
        return -t, t
    return max(obs.min, -t), min(obs.max, t)


def select_range(obs: Observer, method: str, scheme: str) -> tuple[float, float]:
    """The ``[lo, hi]`` to quantize for one observed tensor, by ``method`` for ``scheme``."""
    if obs.empty:
        raise ValueError("the observer saw no data")
    key = (method, scheme)
    if key not in obs.ranges:
        symmetric = scheme == "s8"
        if method == "minmax" or obs.max - obs.min <= 0:
            obs.ranges[key] = (obs.min, obs.max)
        elif method == "histogram":
            obs.ranges[key] = _l2_range(obs, symmetric, 256)
        elif method == "entropy":
            obs.ranges[key] = _entropy_range(obs, symmetric)
        else:
            raise ValueError(f"unknown range method {method!r}; valid: {', '.join(METHODS)}")
    return obs.ranges[key]


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


# ---------------------------------------------------------------------------------------
# Op classification (shared by the pass and the lowerings)


class OpKind(Enum):
    WEIGHTED = "weighted"  # conv/linear: own output qparams, int8 weights
    ANCHOR = "anchor"  # add, mul, cat, batchnorm: own output qparams
    PASSTHROUGH = "passthrough"  # keeps the input's qparams exactly (values stay on the grid)
    REQUANT = "requant"  # keeps the input's qparams, rounds again (average pooling, mean, relu6)
    SHAPE = "shape"  # reads only metadata (size, dim): works on quantized tensors as is
    FLOAT = "float"  # runs in fp32


_ADD = {operator.add, operator.iadd, torch.add}
_MUL = {operator.mul, operator.imul, torch.mul}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_RELU_FNS = {F.relu, torch.relu, torch.relu_}
_PASS_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.ReLU, nn.Flatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_PASS_FNS = {F.max_pool1d, F.max_pool2d, torch.flatten, operator.getitem, torch.chunk, torch.split, torch.transpose,
             torch.permute, torch.reshape, torch.squeeze, torch.unsqueeze, torch.narrow, F.relu, torch.relu, F.dropout}
_PASS_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze", "chunk",
                 "split", "relu", "narrow"}
_REQUANT_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.ReLU6, nn.Hardtanh)
_REQUANT_FNS = {F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, torch.mean, F.relu6, F.hardtanh}
_REQUANT_METHODS = {"mean"}
_SHAPE_METHODS = {"size", "dim"}


def _is_tensor_node(a: Any) -> bool:
    if not isinstance(a, Node):
        return False
    tm = a.meta.get("tensor_meta")
    if tm is None:  # shapes not propagated: trust the type fx recorded, if any
        t = a.meta.get("type")
        return t is None or (isinstance(t, type) and issubclass(t, torch.Tensor))
    return hasattr(tm, "dtype") and tm.dtype.is_floating_point


def _module(gm: GraphModule, node: Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def _is_relu(gm: GraphModule, n: Node) -> bool:
    m = _module(gm, n)
    if m is not None:
        return type(m) is nn.ReLU
    if n.op == "call_function":
        return n.target in _RELU_FNS and len(n.args) == 1
    return n.op == "call_method" and n.target in ("relu", "relu_") and len(n.args) == 1


def _is_relu6(gm: GraphModule, n: Node) -> bool:
    m = _module(gm, n)
    if m is not None:
        return type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0)
    if n.op == "call_function" and n.target is F.relu6:
        return True
    if n.op == "call_function" and n.target is F.hardtanh:
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
        return (lo, hi) == (0.0, 6.0)
    return False


def op_kind(gm: GraphModule, n: Node) -> OpKind:
    """How a node takes part in a quantized region (see the module docstring)."""
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        if isinstance(m, QuantLayer):
            return OpKind.WEIGHTED
        if type(m) in _WEIGHTED:
            base = _base(m)
            if isinstance(base, nn.Linear) or base.padding_mode == "zeros":
                return OpKind.WEIGHTED
            return OpKind.FLOAT
        if type(m) is nn.BatchNorm2d:
            ok = not m.training and m.track_running_stats and m.running_mean is not None
            return OpKind.ANCHOR if ok else OpKind.FLOAT
        if isinstance(m, _PASS_MODULES):
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)) and m.return_indices:
                return OpKind.FLOAT
            return OpKind.PASSTHROUGH
        if isinstance(m, _REQUANT_MODULES):
            return OpKind.REQUANT
        return OpKind.FLOAT
    if n.op == "call_function":
        t = n.target
        if t in _ADD or t in _MUL:
            if len(n.args) == 2 and not n.kwargs and all(_is_tensor_node(a) for a in n.args):
                return OpKind.ANCHOR
            return OpKind.FLOAT
        if t in _CAT:
            tensors = n.args[0] if n.args else n.kwargs.get("tensors")
            if isinstance(tensors, (list, tuple)) and tensors and all(_is_tensor_node(a) for a in tensors):
                return OpKind.ANCHOR
            return OpKind.FLOAT
        if t in (F.max_pool1d, F.max_pool2d) and (n.kwargs.get("return_indices") or (len(n.args) > 6 and n.args[6])):
            return OpKind.FLOAT
        if t is F.dropout and (n.kwargs.get("training") or (len(n.args) > 2 and n.args[2])):
            return OpKind.FLOAT
        if t in _PASS_FNS:
            return OpKind.PASSTHROUGH
        if t in _REQUANT_FNS:
            return OpKind.REQUANT
        if t is getattr and len(n.args) == 2 and n.args[1] in ("shape",):
            return OpKind.SHAPE
        return OpKind.FLOAT
    if n.op == "call_method":
        t = str(n.target)
        if t in ("add", "mul") and len(n.args) == 2 and not n.kwargs and all(_is_tensor_node(a) for a in n.args):
            return OpKind.ANCHOR
        if t in _PASS_METHODS:
            return OpKind.PASSTHROUGH
        if t in _REQUANT_METHODS:
            return OpKind.REQUANT
        if t in _SHAPE_METHODS:
            return OpKind.SHAPE
    return OpKind.FLOAT


def absorbable_activation(gm: GraphModule, n: Node) -> Node | None:
    """The ReLU (or ReLU6 after conv/linear) that is ``n``'s only user, if any."""
    if len(n.users) != 1:
        return None
    (u,) = n.users
    if not u.args or u.args[0] is not n:
        return None
    if _is_relu(gm, u):
        return u
    if op_kind(gm, n) is OpKind.WEIGHTED and _is_relu6(gm, u):
        return u
    return None


def anchor_inputs(gm: GraphModule, n: Node) -> list[Node]:
    """The tensor inputs an anchor reads quantized."""
    if op_kind(gm, n) is OpKind.WEIGHTED or n.op == "call_module":
        return [n.args[0]] if n.args and isinstance(n.args[0], Node) else []
    if n.op == "call_function" and n.target in _CAT:
        tensors = n.args[0] if n.args else n.kwargs["tensors"]
        return list(dict.fromkeys(tensors))
    return list(dict.fromkeys(a for a in n.args if isinstance(a, Node)))


def anchor_name(n: Node) -> str:
    """The name ``skip``/``keep_fp32`` use for an anchor: module path, or node name."""
    return str(n.target) if n.op == "call_module" else n.name


def anchors(gm: GraphModule) -> list[str]:
    """Names of every node that could be quantized as an anchor (module paths or node names)."""
    names = [anchor_name(n) for n in gm.graph.nodes if op_kind(gm, n) in (OpKind.WEIGHTED, OpKind.ANCHOR)]
    return list(dict.fromkeys(names))


def resolve_names(gm: GraphModule, names: Iterable[str], option: str = "skip") -> set[str]:
    """Anchor names matched by ``names`` (exact, or a module prefix such as ``layer4``).

    Unknown names raise :class:`PipelineError` listing close valid names.
    """
    valid = anchors(gm)
    chosen: set[str] = set()
    for name in names:
        hit = [a for a in valid if a == name or a.startswith(name + ".")]
        if not hit:
            close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5) or valid[:5]
            raise PipelineError(
                f"insert-quant-stubs: {option} names '{name}', which is no quantizable layer; "
                f"close valid names: {', '.join(repr(c) for c in close)}"
                + (f" ({len(valid)} in all)" if len(valid) > len(close) else "")
            )
        chosen.update(hit)
    return chosen


# ---------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class QuantConfig:
    """What a placement needs besides the graph and the calibration."""

    scheme: str = "u8"
    method: str = "histogram"
    per_channel: bool = True
    reduce_range: bool = False
    skip: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"activations": self.scheme, "observer": self.method, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "skip": sorted(self.skip)}


@dataclass
class Placement:
    """The simulated graph and what was quantized."""

    graph_module: GraphModule
    quantized: list[str] = field(default_factory=list)  # anchors running int8
    kept_fp32: list[str] = field(default_factory=list)  # anchors left in fp32 (skip)


def _shallow_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with a copied graph that shares the original's submodules and tensors."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            root[str(n.target)] = gm.get_submodule(str(n.target))
        elif n.op == "get_attr":
            root[str(n.target)] = _get_attr(gm, str(n.target))
    new = GraphModule(root, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.training = gm.training
    return new


def _get_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fq_name(gm: GraphModule, point: str) -> str:
    name = f"fq_{point}"
    i = 1
    while hasattr(gm, name):
        i += 1
        name = f"fq_{point}_{i}"
    return name


def place(
    gm: GraphModule,
    observers: dict[str, Observer],
    config: QuantConfig,
) -> Placement:
    """The simulated-int8 graph of the fp32 graph ``gm``: quantizers placed, qparams derived.

    Shares ``gm``'s float modules (never mutates them or ``gm``). ``config.skip`` holds
    resolved anchor names (:func:`resolve_names`) that stay in fp32.
    """
    sim = _shallow_copy(gm)
    graph = sim.graph
    qsrc: dict[Node, str] = {}  # node -> name of the ActFakeQuant whose grid its value is on
    input_fq: dict[Node, Node] = {}  # fp32 node -> its entry quantizer node
    placement = Placement(sim)

    def add_fq(after: Node, inherit: str | None = None) -> Node:
        if after.name not in observers and inherit is None:
            raise RuntimeError(f"no calibration statistics for '{after.name}'")
        mod = ActFakeQuant(after.name, None if inherit else observers[after.name], inherit)
        name = _fq_name(sim, after.name)
        sim.add_module(name, mod)
        with graph.inserting_after(after):
            fq = graph.call_module(name, (after,))
        return fq

    for n in list(graph.nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        kind = op_kind(sim, n)
        if kind in (OpKind.WEIGHTED, OpKind.ANCHOR):
            name = anchor_name(n)
            ins = anchor_inputs(sim, n)
            if name in config.skip or not ins:
                placement.kept_fp32.append(name)
                continue
            for a in ins:
                if a in qsrc:
                    continue
                if a not in input_fq:
                    input_fq[a] = add_fq(a)
                    qsrc[input_fq[a]] = str(input_fq[a].target)
                n.replace_input_with(a, input_fq[a])
            if kind is OpKind.WEIGHTED and not isinstance(sim.get_submodule(str(n.target)), QuantLayer):
                sim.add_submodule(str(n.target), QuantLayer(sim.get_submodule(str(n.target)), config.per_channel))
            end = absorbable_activation(sim, n) or n
            users = list(end.users)
            fq = add_fq(end)
            for u in users:
                u.replace_input_with(end, fq)
            qsrc[fq] = str(fq.target)
            placement.quantized.append(name)
        elif kind in (OpKind.PASSTHROUGH, OpKind.REQUANT) and n.args and isinstance(n.args[0], Node) and n.args[0] in qsrc:
            src = qsrc[n.args[0]]
            if kind is OpKind.PASSTHROUGH:
                qsrc[n] = src
            else:
                users = list(n.users)
                fq = add_fq(n, inherit=src)
                for u in users:
                    u.replace_input_with(n, fq)
                qsrc[fq] = str(fq.target)
    placement.quantized = list(dict.fromkeys(placement.quantized))
    placement.kept_fp32 = list(dict.fromkeys(k for k in placement.kept_fp32 if k not in placement.quantized))
    sim.recompile()
    derive_qparams(sim, config.scheme, config.method, reduce_range=config.reduce_range)
    return placement


def strip(gm: GraphModule) -> GraphModule:
    """The fp32 graph a simulated graph was placed on: quantizers removed, layers unwrapped."""
    out = _shallow_copy(gm)
    for n in list(out.graph.nodes):
        if n.op != "call_module":
            continue
        m = out.get_submodule(str(n.target))
        if isinstance(m, ActFakeQuant):
            n.replace_all_uses_with(n.args[0])
            out.graph.erase_node(n)
        elif isinstance(m, QuantLayer):
            out.add_submodule(str(n.target), m.layer)
    delete_unused_submodules(out)
    out.recompile()
    return out


def _act_quantizers(gm: GraphModule) -> list[tuple[str, ActFakeQuant]]:
    seen: dict[str, ActFakeQuant] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, ActFakeQuant):
                seen.setdefault(str(n.target), m)
    return list(seen.items())


def derive_qparams(gm: GraphModule, scheme: str, method: str, *, reduce_range: bool = False) -> None:
    """Set every activation quantizer's qparams from its recorded statistics (in place).

    Drops any kernel arithmetic a lowering set (:func:`clear_kernel_arithmetic`): it
    was tied to the old qparams.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown activation scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    clear_kernel_arithmetic(gm)
    fqs = _act_quantizers(gm)
    by_name = dict(fqs)
    for _, m in fqs:
        if m.inherit is None:
            obs = m.observer()
            lo, hi = select_range(obs, method, scheme)
            m.set_qparams(activation_qparams(lo, hi, scheme, reduce_range=reduce_range))
    for _, m in fqs:  # inherited qparams follow their (possibly inherited) source
        src, hops = m, 0
        while src.inherit is not None and hops < len(fqs):
            src, hops = by_name[src.inherit], hops + 1
        m.set_qparams(src.qparams)


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


def pool_window(gm: GraphModule, n: Node) -> int | None:
    """Elements averaged per output of the average pool ``n``, when the same for every output.

    None for anything else (or when the window varies: ceil mode, padding not counted,
    adaptive pooling that does not divide the input).
    """
    shape = getattr(n.args[0].meta.get("tensor_meta"), "shape", None) if n.args and isinstance(n.args[0], Node) else None
    m = _module(gm, n)
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) or n.target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d):
        dims = 1 if isinstance(m, nn.AdaptiveAvgPool1d) or n.target is F.adaptive_avg_pool1d else 2
        out = m.output_size if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size"))
        if shape is None or out is None:
            return None
        out = (out,) * dims if isinstance(out, int) else tuple(out)
        size = 1
        for i, o in zip(shape[-dims:], out):
            o = i if o is None else o
            if o <= 0 or i % o:
                return None
            size *= i // o
        return size
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
        if m.ceil_mode or getattr(m, "divisor_override", None) or (not m.count_include_pad and m.padding not in (0, (0,), (0, 0))):
            return None
        k = m.kernel_size
        return math.prod(k) if isinstance(k, (tuple, list)) else k ** (1 if isinstance(m, nn.AvgPool1d) else 2)
    return None


def rederive(program: Program, scheme: str, *, method: str | None = None, reduce_range: bool | None = None) -> None:
    """Switch a simulated program to another activation scheme from the same calibration.

    Only qparams change (in place), and ``program.meta['quant']`` is rewritten; no sample
    is run again.
    """
    info = program.meta.get(META_KEY)
    if info is None:
        raise ValueError("the program has not been through insert-quant-stubs")
    method = method or info["config"]["observer"]
    rr = info["config"]["reduce_range"] if reduce_range is None else reduce_range
    derive_qparams(program.graph_module, scheme, method, reduce_range=rr)
    config = QuantConfig(scheme, method, info["config"]["per_channel"], rr, frozenset(info["config"]["skip"]))
    program.meta[META_KEY] = summary(program.graph_module, config, info.get("kept_fp32", []), info.get("calibration_samples", 0))


# ---------------------------------------------------------------------------------------
# Whole-program entry point and summary


def quantize_program(
    program: Program,
    config: QuantConfig,
    *,
    observers: dict[str, Observer] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Calibrate ``program`` (fp32) on ``program.calibration`` and make it simulated int8, in place."""
    if observers is None:
        if not program.calibration:
            raise DataError("insert-quant-stubs needs calibration data: pass --calib-data (or fill program.calibration)")
        observers = calibrate(program.graph_module, program.calibration, progress=progress)
    placement = place(program.graph_module, observers, config)
    program.graph_module = placement.graph_module
    program.meta[CALIBRATION_KEY] = observers
    n_samples = len(program.calibration) if program.calibration else 0
    kept = [{"layer": k, "reason": "skip"} for k in placement.kept_fp32]
    program.meta[META_KEY] = summary(program.graph_module, config, kept, n_samples)
    return placement


def summary(gm: GraphModule, config: QuantConfig, kept_fp32: list[dict[str, Any]], calibration_samples: int) -> dict[str, Any]:
    """The JSON-able record of a simulated program's quantization."""
    acts: dict[str, Any] = {}
    for name, m in _act_quantizers(gm):
        entry = {"point": m.point, **m.qparams.to_json()}
        if m.inherit:
            entry["inherit"] = m.inherit
        else:
            obs = m.observer()
            entry["observed"] = [obs.min, obs.max]
        acts[name] = entry
    weights: dict[str, Any] = {}
    for name, m in gm.named_modules():
        if isinstance(m, QuantLayer):
            s = m.weight_fq.scale
            weights[name] = {"type": type(m.layer).__name__, "channels": int(s.numel()),
                             "scale_min": float(s.min()), "scale_max": float(s.max())}
    return {
        "config": config.to_json(),
        "calibration_samples": calibration_samples,
        "activations": acts,
        "weights": weights,
        "quantized_layers": sorted(weights),
        "kept_fp32": kept_fp32,
        "output_scales": output_scales(gm),
    }


def output_scales(gm: GraphModule) -> list[float | None]:
    """Per output tensor: the scale of the last quantizer before the final dequantize.

    ``None`` for an output computed in fp32 after its last quantizer (then no bound in
    quantization steps applies).
    """
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves: list[Node | None] = []

    def collect(a: Any) -> None:
        if isinstance(a, Node) or a is None:
            leaves.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                collect(x)
        elif isinstance(a, dict):
            for k in sorted(a):
                collect(a[k])

    collect(out_node.args[0])
    scales: list[float | None] = []
    for leaf in leaves:
        n, found = leaf, None
        while isinstance(n, Node):
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActFakeQuant):
                found = float(gm.get_submodule(str(n.target)).scale)
                break
            if op_kind(gm, n) is OpKind.PASSTHROUGH and n.args and isinstance(n.args[0], Node):
                n = n.args[0]
                continue
            break
        scales.append(found)
    return scales


# ---------------------------------------------------------------------------------------
# Verification support


def _run(fn: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]) -> list[Any]:
    with torch.inference_mode():
        return [fn(*s) for s in samples]


def quantization_error(reference: Callable[..., Any], simulated: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]):
    """Error of the simulated-int8 program against the fp32 original (``verify.Comparison``)."""
    from graphopt.verify import compare

    return compare(_run(reference, samples), _run(simulated, samples))


def lowering_error(simulated: Callable[..., Any], artifact: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]):
    """Error of a backend's artifact against the simulated-int8 program (``verify.Comparison``)."""
    from graphopt.verify import compare

    return compare(_run(simulated, samples), _run(artifact, samples))


@dataclass
class LoweringCheck:
    """Lowering error held to ``steps`` output quantization steps per output tensor."""

    ok: bool
    steps: float
    max_abs_err: list[float]
    bounds: list[float | None]
    violations: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": self.steps, "max_abs_err": self.max_abs_err, "bounds": self.bounds,
                "violations": self.violations}


def check_lowering(
    simulated: Program,
    artifact: Callable[..., Any],
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
    fallback_rel: float = 1e-2,
    outputs: tuple[list[Any], list[Any]] | None = None,
) -> LoweringCheck:
    """Max |artifact - simulated| per output must be <= ``steps`` x that output's scale.

    Outputs with no quantizer right before them (computed in fp32 after the last one)
    are held to ``fallback_rel`` of their range instead. ``outputs``: the simulated
    program's and the artifact's outputs on ``samples``, when already computed.
    """
    scales = output_scales(simulated.graph_module)
    sims, arts = outputs if outputs is not None else (_run(simulated.run, samples), _run(artifact, samples))
    errs: list[float] = []
    ranges: list[float] = []
    for s, a in zip(sims, arts):
        for k, (x, y) in enumerate(zip(flatten_outputs(s), flatten_outputs(a))):
            e = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            r = float(x.double().abs().max()) if x.numel() else 0.0
            if k < len(errs):
                errs[k], ranges[k] = max(errs[k], e), max(ranges[k], r)
            else:
                errs.append(e)
                ranges.append(r)
    bounds: list[float | None] = []
    violations = []
    for k, e in enumerate(errs):
        scale = scales[k] if k < len(scales) else None
        bound = steps * scale if scale is not None else fallback_rel * ranges[k]
        bounds.append(scale * steps if scale is not None else None)
        if not e <= bound + 1e-7:
            what = f"{steps:g} output steps ({bound:.4g})" if scale is not None else f"{fallback_rel:g} of the output range"
            violations.append(f"output {k}: lowering error {e:.4g} exceeds {what}")
    return LoweringCheck(not violations, steps, errs, bounds, violations)


@dataclass
class LocalLoweringCheck:
    """Per-quantizer lowering error with the backend's own values fed forward.

    Every quantized activation of the lowered graph is compared with the simulated op
    applied to the *lowered* inputs, so rounding flips cannot accumulate through depth:
    each entry is that one op's error, in its own output quantization steps.
    """

    ok: bool
    steps: float
    errors: dict[str, float]  # quantizer -> max error in steps
    violations: list[str]

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": self.steps, "worst": self.worst(), "compared": len(self.errors),
                "violations": self.violations}


def check_lowering_local(
    simulated: Program | GraphModule,
    lowered: GraphModule,
    points: dict[str, str],
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
) -> LocalLoweringCheck:
    """Hold every quantized op of an fx lowering to ``steps`` steps of its output scale.

    ``points`` maps a quantizer node of the simulated graph to the lowered node that
    computes the same quantized value (cpu-int8 records it). The lowered graph runs
    first; then the simulated graph runs with each quantizer's output replaced by the
    lowered value after comparing the two.
    """
    sim = simulated.graph_module if isinstance(simulated, Program) else simulated
    errors: dict[str, float] = {}

    for sample in samples:
        recorded: dict[str, Any] = {}

        class _Record(torch.fx.Interpreter):
            def run_node(self, n: Node) -> Any:
                out = super().run_node(n)
                recorded[n.name] = out
                return out

        class _Forced(torch.fx.Interpreter):
            def run_node(self, n: Node) -> Any:
                out = super().run_node(n)
                low = recorded.get(points.get(n.name, ""))
                if isinstance(low, torch.Tensor) and low.is_quantized and isinstance(out, torch.Tensor):
                    fq = sim.get_submodule(str(n.target))
                    low = fq.dequantize(low.int_repr().float())  # in the form the simulated op hands on
                    err = float((out - low).abs().max()) / fq.qparams.scale if out.numel() else 0.0
                    errors[n.name] = max(errors.get(n.name, 0.0), err)
                    return low
                return out

        with torch.inference_mode():
            _Record(lowered).run(*sample)
            _Forced(sim).run(*sample)
    violations = [f"{name}: {e:.2f} steps > {steps:g}" for name, e in errors.items() if not e <= steps + 1e-3]
    if not errors:
        violations.append("no quantized value of the lowering could be matched to the simulated program")
    return LocalLoweringCheck(not violations, steps, errors, violations)


def verify_int8(
    reference: Callable[..., Any],
    simulated: Program,
    artifact: Any,
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
    reference_outputs: list[Any] | None = None,
    artifact_outputs: list[Any] | None = None,
) -> dict[str, Any]:
    """Both halves of an int8 compile's error, for the report.

    ``quantization_error`` (simulated vs fp32: reported, held to the target's tolerance
    by the caller's usual check of artifact vs original) and ``lowering_error`` (artifact
    vs simulated). ``lowering_check`` holds the lowering to ``steps`` output steps end to
    end; where the artifact is an fx lowering that records its points (cpu-int8),
    ``lowering_local`` holds every quantized op to ``steps`` of its own steps, fed the
    lowering's own inputs. ``violations`` lists what failed the gate: the per-op check,
    plus the end-to-end one where the simulation reproduces the backend's arithmetic
    (``artifact.exact_simulation``: cpu-int8). Without that, one-step rounding ties
    compound through a deep net into several output steps, so only the per-op bound is
    a fair gate (ort-int8). ``reference_outputs``/``artifact_outputs``: those programs'
    outputs on ``samples``, when the caller has them already.
    """
    from graphopt.verify import compare

    # each program runs once (the kernel-exact simulation costs float64 convolutions)
    refs = list(reference_outputs) if reference_outputs is not None else _run(reference, samples)
    arts = list(artifact_outputs) if artifact_outputs is not None else _run(artifact.run, samples)
    sims = _run(simulated.run, samples)
    quant, low = compare(refs, sims), compare(sims, arts)
    end_to_end = check_lowering(simulated, artifact.run, samples, steps=steps, outputs=(sims, arts))
    exact = bool(getattr(artifact, "exact_simulation", False))
    result: dict[str, Any] = {
        "quantization_error": quant.metrics.to_json(),
        "lowering_error": low.metrics.to_json(),
        "lowering_check": end_to_end.to_json(),
        "exact_simulation": exact,
        "violations": [],
    }
    gm, points = getattr(artifact, "graph_module", None), getattr(artifact, "points", None)
    violations: list[str] = []
    if isinstance(gm, GraphModule) and points:
        local = check_lowering_local(simulated, gm, points, samples[:2], steps=steps)
        result["lowering_local"] = local.to_json()
        violations += local.violations
        if exact:
            violations += end_to_end.violations
    else:
        violations += end_to_end.violations
    result["violations"] = [f"lowering: {v}" for v in violations]
    return result


# ---------------------------------------------------------------------------------------
# Mixed precision


@dataclass
class Sensitivity:
    layer: str
    sensitivity: float  # 1 - cosine of the output when only this layer is quantized


def _as_tolerance(tolerance: Any):
    from graphopt.verify import Tolerance

    if isinstance(tolerance, Tolerance):
        return tolerance
    return Tolerance(min_cosine=float(tolerance))


def keep_fp32_auto(
    program: Program,
    reference_fn: Callable[..., Any],
    samples: Sequence[Sequence[torch.Tensor]],
    tolerance: Any = 0.99,
) -> list[tuple[str, float]]:
    """Keep the most sensitive layers of a simulated program in fp32 until it meets ``tolerance``.

    ``tolerance`` is a :class:`graphopt.verify.Tolerance` (min cosine / min top-1 are used)
    or a float minimum cosine. A layer's sensitivity is ``1 - cosine`` of the output
    against ``reference_fn`` when only that layer is quantized. The worst layers are kept
    in fp32 (the fewest that meet the tolerance, found by a doubling then binary search
    over the sensitivity order). Rewrites ``program`` in place (no new calibration) and
    returns ``[(layer, sensitivity)]`` for the layers kept; ``program.meta['quant']``
    records them with their reason.
    """
    from graphopt.verify import compare

    info = program.meta.get(META_KEY)
    observers = program.meta.get(CALIBRATION_KEY)
    if info is None or observers is None:
        raise ValueError("keep_fp32_auto needs a program that went through insert-quant-stubs")
    tol = _as_tolerance(tolerance)
    cfg = info["config"]
    base_skip = frozenset(cfg["skip"])
    float_gm = strip(program.graph_module)
    refs = _run(reference_fn, samples)
    candidates = [a for a in anchors(float_gm) if a not in base_skip]

    def simulate(skip: frozenset[str]) -> tuple[Placement, Any]:
        config = QuantConfig(cfg["activations"], cfg["observer"], cfg["per_channel"], cfg["reduce_range"], skip)
        p = place(float_gm, observers, config)
        return p, compare(refs, _run(p.graph_module, samples)).metrics

    full, metrics = simulate(base_skip)
    before = metrics
    if not tol.violations(metrics):
        kept: list[Sensitivity] = []
        chosen = full
    else:
        all_names = frozenset(candidates)
        sens = []
        for name in candidates:
            _, m = simulate(base_skip | (all_names - {name}))
            sens.append(Sensitivity(name, max(0.0, 1.0 - m.cosine)))
        sens.sort(key=lambda s: -s.sensitivity)
        cache: dict[int, tuple[Placement, Any]] = {0: (full, metrics)}

        def trial(k: int) -> bool:
            if k not in cache:
                cache[k] = simulate(base_skip | {s.layer for s in sens[:k]})
            return not tol.violations(cache[k][1])

        lo, hi = 0, 1
        while hi < len(sens) and not trial(hi):
            lo, hi = hi, min(2 * hi, len(sens))
        if not trial(hi):
            hi = len(sens)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid):
                hi = mid
            else:
                lo = mid
        trial(hi)
        kept = sens[:hi]
        chosen, metrics = cache[hi]
    program.graph_module = chosen.graph_module
    config = QuantConfig(cfg["activations"], cfg["observer"], cfg["per_channel"], cfg["reduce_range"],
                         base_skip | {s.layer for s in kept})
    reasons = [r for r in info.get("kept_fp32", []) if r.get("reason") == "skip"]
    reasons += [{"layer": s.layer, "reason": "auto", "sensitivity": s.sensitivity} for s in kept]
    program.meta[META_KEY] = summary(program.graph_module, config, reasons, info.get("calibration_samples", 0))
    program.meta[META_KEY]["keep_fp32_auto"] = {
        "tolerance": tol.to_json(),
        "before": before.to_json(),
        "after": metrics.to_json(),
        "kept": [[s.layer, s.sensitivity] for s in kept],
        "met": not tol.violations(metrics),
    }
    return [(s.layer, s.sensitivity) for s in kept]
