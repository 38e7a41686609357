"""ONNX nodes -> module-level fx: one converter per op type.

Conv, BatchNormalization, LayerNormalization, Gemm/MatMul with a constant weight, activations
and pools become ``call_module`` nodes holding ``nn.Conv2d`` / ``nn.BatchNorm2d`` / ``nn.LayerNorm`` / ``nn.Linear`` / ``nn.ReLU``
... with their parameters, as ``torch.fx.symbolic_trace`` gives for a torch model; arithmetic
and tensor plumbing become the ``call_function`` nodes a trace gives (``operator.add``,
``torch.cat``, ``torch.reshape``, ``torch.permute`` ...). Constants other than weights are
buffers read with ``get_attr``; a one-element constant operand is a Python number.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from graphopt.capture.onnx_file.load import Prepared
from graphopt.errors import CaptureError

__all__ = ["SUPPORTED_OPS", "build_graph_module"]

Value = Any  # an fx Node, or a Python number for a scalar constant


class Builder:
    """Holds the fx graph under construction, the root module and the ONNX name -> value map."""

    def __init__(self, prepared: Prepared, label: str) -> None:
        self.p = prepared
        self.label = label
        self.graph = torch.fx.Graph()
        self.root = nn.Module()
        self.env: dict[str, Value] = {}
        self.names: set[str] = set()
        self.node: onnx.NodeProto | None = None

    # ----------------------------------------------------------------- values
    def const(self, name: str) -> np.ndarray | None:
        return self.p.consts.get(name) if name else None

    def need_const(self, k: int, what: str) -> np.ndarray:
        inputs = self.node.input
        value = self.const(inputs[k]) if k < len(inputs) else None
        if value is None:
            raise self.unsupported(f"its {what} (input {k}) is not a constant")
        return value

    def opt_const(self, k: int) -> np.ndarray | None:
        inputs = self.node.input
        return self.const(inputs[k]) if k < len(inputs) and inputs[k] else None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.p.shapes:
            raise self.unsupported(f"the shape of '{name}' is not static")
        return self.p.shapes[name]

    def value(self, name: str) -> Value:
        if name in self.env:
            return self.env[name]
        array = self.const(name)
        if array is None:
            raise CaptureError(f"{self.label}: tensor '{name}' has no producer")
        if array.size == 1 and array.ndim == 0:
            return array.item()
        node = self.tensor(name, array)
        self.env[name] = node
        return node

    def tensor(self, name: str, array: np.ndarray) -> torch.fx.Node:
        """A buffer holding ``array``, read with ``get_attr``."""
        attr = self.unique("const_" + name)
        self.root.register_buffer(attr, torch.from_numpy(np.array(array)))
        return self.graph.get_attr(attr)

    def x(self, k: int = 0) -> Value:
        return self.value(self.node.input[k])

    # ----------------------------------------------------------------- nodes
    def unique(self, base: str) -> str:
        name = re.sub(r"\W+", "_", base).strip("_").lower() or "node"
        if name[0].isdigit():
            name = "n" + name
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    def module(self, mod: nn.Module, *args: Value) -> torch.fx.Node:
        node_name = self.node.name or self.node.op_type
        name = self.unique(node_name)
        self.root.add_module(name, mod)
        return self.graph.call_module(name, args)

    def fn(self, target: Callable[..., Any], *args: Value, **kwargs: Any) -> torch.fx.Node:
        return self.graph.call_function(target, args, kwargs)

    def attrs(self) -> dict[str, Any]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in self.node.attribute}

    def unsupported(self, why: str) -> CaptureError:
        n = self.node
        return CaptureError(f"{self.label}: node '{n.name}' ({n.op_type}) is not supported: {why}")


# --------------------------------------------------------------------------- helpers


def _decode(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


def _rank_cls(b: Builder, classes: dict[int, type[nn.Module]], rank: int) -> type[nn.Module]:
    if rank not in classes:
        raise b.unsupported(f"{rank}-d spatial input (supported: {sorted(classes)}-d)")
    return classes[rank]


def _pads(b: Builder, a: dict[str, Any], spatial_in: tuple[int, ...], kernel: list[int], strides: list[int],
          dilations: list[int]) -> tuple[list[int], list[int]]:
    """Begin and end paddings per spatial dim, auto_pad resolved."""
    n = len(kernel)
    auto = _decode(a.get("auto_pad", "NOTSET"))
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - begins[-1])
        return begins, ends
    pads = list(a.get("pads", [0] * 2 * n)) if auto != "VALID" else [0] * 2 * n
    return pads[:n], pads[n:]


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX per-dim begins/ends -> F.pad's (last dim first) list."""
    out: list[int] = []
    for bgn, end in zip(reversed(begins), reversed(ends)):
        out += [int(bgn), int(end)]
    return out


def _padded(b: Builder, x: Value, begins: list[int], ends: list[int], fill: float) -> tuple[Value, list[int]]:
    """``x`` padded explicitly when the padding is asymmetric; else x and the symmetric padding."""
    if begins == ends:
        return x, begins
    return b.fn(F.pad, x, _torch_pad(begins, ends), value=fill), [0] * len(begins)


def _filled(mod: nn.Module, **arrays: np.ndarray | None) -> nn.Module:
    """``mod`` (built on the meta device: no random initialization) holding the file's arrays as its parameters/buffers."""
    for name, array in arrays.items():
        if array is None:
            continue
        tensor = torch.from_numpy(np.array(array, dtype=np.float32))
        if name in mod._parameters:
            setattr(mod, name, nn.Parameter(tensor))
        else:
            setattr(mod, name, tensor)
    if hasattr(mod, "num_batches_tracked"):
        mod.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    return mod


def _spatial(a: dict[str, Any], key: str, n: int, default: int = 1) -> list[int]:
    return [int(v) for v in a.get(key, [default] * n)]


# --------------------------------------------------------------------------- converters

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
_AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_GAP = {3: nn.AdaptiveAvgPool1d, 4: nn.AdaptiveAvgPool2d, 5: nn.AdaptiveAvgPool3d}
_GMP = {3: nn.AdaptiveMaxPool1d, 4: nn.AdaptiveMaxPool2d, 5: nn.AdaptiveMaxPool3d}


def conv(b: Builder) -> list[Value]:
    a = b.attrs()
    w = b.need_const(1, "weight")
    bias = b.opt_const(2)
    n = w.ndim - 2
    kernel = list(w.shape[2:])
    strides, dilations = _spatial(a, "strides", n), _spatial(a, "dilations", n)
    in_shape = b.shape(b.node.input[0])
    begins, ends = _pads(b, a, in_shape[2:], kernel, strides, dilations)
    x, padding = _padded(b, b.x(0), begins, ends, 0.0)
    groups = int(a.get("group", 1))
    cls = _rank_cls(b, _CONV, n)
    mod = _filled(cls(w.shape[1] * groups, w.shape[0], kernel, stride=strides, padding=padding, dilation=dilations,
                      groups=groups, bias=bias is not None, device="meta"), weight=w, bias=bias)
    return [b.module(mod, x)]


def batchnorm(b: Builder) -> list[Value]:
    a = b.attrs()
    if a.get("training_mode", 0):
        raise b.unsupported("training_mode=1 (export the model in eval mode)")
    scale, shift, mean, var = (b.need_const(k, what) for k, what in ((1, "scale"), (2, "bias"), (3, "mean"), (4, "var")))
    rank = len(b.shape(b.node.input[0]))
    mod = _rank_cls(b, _BN, rank)(scale.shape[0], eps=float(a.get("epsilon", 1e-5)), device="meta")
    _filled(mod, weight=scale, bias=shift, running_mean=mean, running_var=var)
    mod.eval()
    return [b.module(mod, b.x(0))]


def layer_norm(b: Builder) -> list[Value]:
    """LayerNormalization (opset 17) over the trailing dims from ``axis`` -> ``nn.LayerNorm`` with the file's scale and bias."""
    a = b.attrs()
    if len([o for o in b.node.output if o]) > 1:
        raise b.unsupported("the Mean / InvStdDev outputs")
    shape = b.shape(b.node.input[0])
    normalized = tuple(shape[int(a.get("axis", -1)) % len(shape):])
    scale, shift = b.need_const(1, "scale"), b.opt_const(2)
    if len(b.node.input) > 2 and b.node.input[2] and shift is None:
        raise b.unsupported("its bias (input 2) is not a constant")
    mod = nn.LayerNorm(normalized, eps=float(a.get("epsilon", 1e-5)), bias=shift is not None, device="meta")
    full = {k: None if v is None else np.broadcast_to(v, normalized) for k, v in (("weight", scale), ("bias", shift))}
    return [b.module(_filled(mod, **full), b.x(0))]


def _linear(b: Builder, x: Value, weight: np.ndarray, bias: np.ndarray | None) -> torch.fx.Node:
    mod = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    full_bias = None if bias is None else np.broadcast_to(bias, (weight.shape[0],))
    return b.module(_filled(mod, weight=weight, bias=full_bias), x)


def gemm(b: Builder) -> list[Value]:
    a = b.attrs()
    if a.get("transA", 0):
        raise b.unsupported("transA=1")
    w = b.need_const(1, "weight B")
    w = (w if a.get("transB", 0) else w.T) * float(a.get("alpha", 1.0))
    c = b.opt_const(2)
    if len(b.node.input) > 2 and b.node.input[2] and c is None:
        raise b.unsupported("its bias C is not a constant")
    if c is not None and c.size not in (1, w.shape[0]):
        raise b.unsupported(f"bias of shape {c.shape} (expected one value per output)")
    bias = None if c is None else c.reshape(-1) * float(a.get("beta", 1.0))
    return [_linear(b, b.x(0), w.astype(np.float32), None if bias is None else bias.astype(np.float32))]


def matmul(b: Builder) -> list[Value]:
    w = b.opt_const(1)
    if w is not None and w.ndim == 2 and b.opt_const(0) is None:
        return [_linear(b, b.x(0), w.T.astype(np.float32), None)]
    return [b.fn(torch.matmul, b.x(0), b.x(1))]


def pool(b: Builder) -> list[Value]:
    a = b.attrs()
    is_max = b.node.op_type == "MaxPool"
    if is_max and len([o for o in b.node.output if o]) > 1:
        raise b.unsupported("the Indices output")
    kernel = [int(k) for k in a["kernel_shape"]]
    n = len(kernel)
    strides, dilations = _spatial(a, "strides", n), _spatial(a, "dilations", n)
    begins, ends = _pads(b, a, b.shape(b.node.input[0])[2:], kernel, strides, dilations)
    ceil = bool(a.get("ceil_mode", 0))
    if is_max:
        x, padding = _padded(b, b.x(0), begins, ends, float("-inf"))
        mod = _rank_cls(b, _MAXPOOL, n)(kernel, strides, padding, dilations, ceil_mode=ceil)
        return [b.module(mod, x)]
    include = bool(a.get("count_include_pad", 0))
    if begins != ends and not include:
        raise b.unsupported("asymmetric pads with count_include_pad=0")
    if any(d != 1 for d in dilations):
        raise b.unsupported("dilated AveragePool")
    x, padding = _padded(b, b.x(0), begins, ends, 0.0)
    mod = _rank_cls(b, _AVGPOOL, n)(kernel, strides, padding, ceil_mode=ceil, count_include_pad=include)
    return [b.module(mod, x)]


def global_pool(b: Builder) -> list[Value]:
    rank = len(b.shape(b.node.input[0]))
    table = _GAP if b.node.op_type == "GlobalAveragePool" else _GMP
    return [b.module(_rank_cls(b, table, rank)(1), b.x(0))]


def _axes(b: Builder, attr_until: int, rank: int, k: int = 1) -> list[int] | None:
    """Axes from the ``axes`` attribute (opset < attr_until) or input ``k``, normalized; None when absent."""
    raw = b.attrs().get("axes") if b.p.opset < attr_until else b.opt_const(k)
    if raw is None and b.p.opset >= attr_until and k < len(b.node.input) and b.node.input[k]:
        raise b.unsupported(f"its axes (input {k}) are not constant")
    return None if raw is None else [int(v) % rank for v in np.asarray(raw).reshape(-1)]


_REDUCE = {"ReduceMean": (torch.mean, 18), "ReduceSum": (torch.sum, 13), "ReduceMax": (torch.amax, 18)}


def reduce(b: Builder) -> list[Value]:
    target, since = _REDUCE[b.node.op_type]
    rank = len(b.shape(b.node.input[0]))
    a = b.attrs()
    axes = _axes(b, since, rank) or list(range(rank))
    keep = bool(a.get("keepdims", 1))
    if b.node.op_type == "ReduceMean" and keep and rank == 4 and sorted(axes) == [2, 3]:
        return [b.module(nn.AdaptiveAvgPool2d(1), b.x(0))]
    return [b.fn(target, b.x(0), axes, keepdim=keep)]


def _clip_bounds(b: Builder) -> tuple[float | None, float | None]:
    if b.p.opset < 11:
        a = b.attrs()
        return a.get("min"), a.get("max")
    lo, hi = b.opt_const(1), b.opt_const(2)
    for k, v in ((1, lo), (2, hi)):
        if v is None and len(b.node.input) > k and b.node.input[k]:
            raise b.unsupported(f"its bound (input {k}) is not a constant")
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def clip(b: Builder) -> list[Value]:
    lo, hi = _clip_bounds(b)
    if lo == 0 and hi == 6:
        return [b.module(nn.ReLU6(), b.x(0))]
    if lo == 0 and hi is None:
        return [b.module(nn.ReLU(), b.x(0))]
    if lo is not None and hi is not None:
        return [b.module(nn.Hardtanh(lo, hi), b.x(0))]
    return [b.fn(torch.clamp, b.x(0), lo, hi)]


def hard_sigmoid(b: Builder) -> list[Value]:
    a = b.attrs()
    alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return [b.module(nn.Hardsigmoid(), b.x(0))]
    return [b.fn(torch.clamp, b.fn(operator.add, b.fn(operator.mul, b.x(0), alpha), beta), 0.0, 1.0)]


def _simple_module(make: Callable[[dict[str, Any]], nn.Module]) -> Callable[[Builder], list[Value]]:
    return lambda b: [b.module(make(b.attrs()), b.x(0))]


def softmax(b: Builder) -> list[Value]:
    shape = b.shape(b.node.input[0])
    rank = len(shape)
    axis = int(b.attrs().get("axis", -1 if b.p.opset >= 13 else 1)) % rank
    cls = nn.LogSoftmax if b.node.op_type == "LogSoftmax" else nn.Softmax
    if b.p.opset >= 13 or axis == rank - 1:
        return [b.module(cls(dim=axis if b.p.opset >= 13 else -1), b.x(0))]
    flat = b.fn(torch.flatten, b.x(0), axis)
    return [b.fn(torch.reshape, b.module(cls(dim=-1), flat), list(shape))]


def flatten(b: Builder) -> list[Value]:
    shape = b.shape(b.node.input[0])
    axis = int(b.attrs().get("axis", 1)) % (len(shape) + 1)
    if axis == 1:
        return [b.fn(torch.flatten, b.x(0), 1)]
    return [b.fn(torch.reshape, b.x(0), [math.prod(shape[:axis]), -1])]


def reshape(b: Builder) -> list[Value]:
    target = [int(v) for v in b.need_const(1, "shape")]
    if not b.attrs().get("allowzero", 0):
        src = b.shape(b.node.input[0])
        target = [src[i] if v == 0 else v for i, v in enumerate(target)]
    return [b.fn(torch.reshape, b.x(0), target)]


def transpose(b: Builder) -> list[Value]:
    rank = len(b.shape(b.node.input[0]))
    perm = [int(p) for p in b.attrs().get("perm", list(reversed(range(rank))))]
    return [b.fn(torch.permute, b.x(0), perm)]


def concat(b: Builder) -> list[Value]:
    return [b.fn(torch.cat, [b.value(n) for n in b.node.input if n], int(b.attrs()["axis"]))]


def split(b: Builder) -> list[Value]:
    shape = b.shape(b.node.input[0])
    a = b.attrs()
    axis = int(a.get("axis", 0)) % len(shape)
    sizes = a.get("split") if b.p.opset < 13 else b.opt_const(1)
    outs = list(b.node.output)
    if sizes is None:
        parts = int(a.get("num_outputs", len(outs)))
        step = math.ceil(shape[axis] / parts)
        sizes = [min(step, shape[axis] - i * step) for i in range(parts)]
    parts_node = b.fn(torch.split, b.x(0), [int(s) for s in np.asarray(sizes).reshape(-1)], axis)
    return [b.fn(operator.getitem, parts_node, i) for i in range(len(outs))]


def slice_(b: Builder) -> list[Value]:
    rank = len(b.shape(b.node.input[0]))
    if b.p.opset < 10:
        a = b.attrs()
        starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
    else:
        starts, ends = b.need_const(1, "starts"), b.need_const(2, "ends")
        axes, steps = b.opt_const(3), b.opt_const(4)
    axes = list(range(len(starts))) if axes is None else [int(v) % rank for v in axes]
    steps = [1] * len(starts) if steps is None else [int(s) for s in steps]
    if any(s <= 0 for s in steps):
        raise b.unsupported("negative or zero steps")
    index: list[Any] = [slice(None)] * (max(axes) + 1)
    for ax, s, e, st in zip(axes, starts, ends, steps):
        index[ax] = slice(int(s), int(e), None if st == 1 else st)
    return [b.fn(operator.getitem, b.x(0), tuple(index))]


def gather(b: Builder) -> list[Value]:
    """Constant indices (negative ones counted from the end): select, index_select, or index_select + reshape for
    indices of rank > 1 (the dynamo exporter's ``as_strided``)."""
    shape = b.shape(b.node.input[0])
    axis = int(b.attrs().get("axis", 0)) % len(shape)
    idx = b.need_const(1, "indices").astype(np.int64)
    idx = np.where(idx < 0, idx + shape[axis], idx)
    if idx.ndim == 0:
        return [b.fn(torch.select, b.x(0), axis, int(idx))]
    picked = b.fn(torch.index_select, b.x(0), axis, b.tensor(b.node.input[1], idx.reshape(-1)))
    if idx.ndim == 1:
        return [picked]
    return [b.fn(torch.reshape, picked, [*shape[:axis], *idx.shape, *shape[axis + 1:]])]


def squeeze(b: Builder) -> list[Value]:
    shape = b.shape(b.node.input[0])
    axes = _axes(b, 13, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    return [b.fn(torch.squeeze, b.x(0), tuple(axes))]


def unsqueeze(b: Builder) -> list[Value]:
    out_rank = len(b.shape(b.node.output[0]))
    axes = _axes(b, 13, out_rank)
    if axes is None:
        raise b.unsupported("no axes")
    x = b.x(0)
    for ax in sorted(axes):
        x = b.fn(torch.unsqueeze, x, ax)
    return [x]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def pad(b: Builder) -> list[Value]:
    a = b.attrs()
    rank = len(b.shape(b.node.input[0]))
    mode = _decode(a.get("mode", "constant"))
    if mode not in _PAD_MODES:
        raise b.unsupported(f"mode '{mode}' (supported: {', '.join(_PAD_MODES)})")
    if b.p.opset < 11:
        pads, fill, axes = list(a["pads"]), float(a.get("value", 0.0)), None
    else:
        pads = [int(v) for v in b.need_const(1, "pads")]
        cv = b.opt_const(2)
        fill = 0.0 if cv is None or cv.size == 0 else float(cv.reshape(-1)[0])
        axes = _axes(b, 0, rank, 3)
    axes = axes if axes is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, ax in enumerate(axes):
        begins[ax], ends[ax] = pads[i], pads[i + len(axes)]
    first = next((i for i in range(rank) if begins[i] or ends[i]), rank)
    if first == rank:
        return [b.x(0)]
    if mode != "constant":  # torch pads the spatial dims (all of them) in reflect/replicate mode
        if first < 2:
            raise b.unsupported(f"mode '{mode}' padding the batch or channel dim")
        first = 2
    kwargs = {"value": fill} if mode == "constant" else {}
    return [b.fn(F.pad, b.x(0), _torch_pad(begins[first:], ends[first:]), mode=_PAD_MODES[mode], **kwargs)]


def resize(b: Builder) -> list[Value]:
    a = b.attrs()
    mode = _decode(a.get("mode", "nearest"))
    out_shape = b.shape(b.node.output[0])
    in_shape = b.shape(b.node.input[0])
    if b.p.opset < 11:
        coord = "asymmetric"
    else:
        coord = _decode(a.get("coordinate_transformation_mode", "half_pixel"))
    size = list(out_shape[2:])
    integral = all(o % i == 0 for o, i in zip(out_shape[2:], in_shape[2:]))
    if list(out_shape[:2]) != list(in_shape[:2]):
        raise b.unsupported("resizing the batch or channel dims")
    if mode == "nearest":
        nearest = _decode(a.get("nearest_mode", "round_prefer_floor"))
        if not ((coord == "asymmetric" and (b.p.opset < 11 or nearest == "floor")) or (coord == "half_pixel" and integral)):
            raise b.unsupported(f"nearest with coordinate_transformation_mode '{coord}' and nearest_mode '{nearest}'")
        return [b.fn(F.interpolate, b.x(0), size=size, mode="nearest")]
    if mode == "linear" and len(in_shape) == 4 and coord in ("half_pixel", "pytorch_half_pixel", "align_corners"):
        return [b.fn(F.interpolate, b.x(0), size=size, mode="bilinear", align_corners=coord == "align_corners")]
    raise b.unsupported(f"mode '{mode}' with coordinate_transformation_mode '{coord}' (supported: nearest, 2-d linear)")


def cast(b: Builder) -> list[Value]:
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(int(b.attrs()["to"]))
    return [b.graph.call_method("to", (b.x(0), torch.from_numpy(np.empty(0, dtype=np_dtype)).dtype))]


def passthrough(b: Builder) -> list[Value]:
    if len([o for o in b.node.output if o]) > 1 and b.node.op_type == "Dropout":
        raise b.unsupported("the mask output")
    return [b.x(0)]


def _binary(target: Callable[..., Any]) -> Callable[[Builder], list[Value]]:
    return lambda b: [b.fn(target, b.x(0), b.x(1))]


def _unary(target: Callable[..., Any]) -> Callable[[Builder], list[Value]]:
    return lambda b: [b.fn(target, b.x(0))]


CONVERTERS: dict[str, Callable[[Builder], list[Value]]] = {
    "Conv": conv, "BatchNormalization": batchnorm, "LayerNormalization": layer_norm, "Gemm": gemm, "MatMul": matmul,
    "MaxPool": pool, "AveragePool": pool, "GlobalAveragePool": global_pool, "GlobalMaxPool": global_pool,
    "ReduceMean": reduce, "ReduceSum": reduce, "ReduceMax": reduce,
    "Relu": _simple_module(lambda a: nn.ReLU()), "Sigmoid": _simple_module(lambda a: nn.Sigmoid()),
    "Tanh": _simple_module(lambda a: nn.Tanh()), "HardSwish": _simple_module(lambda a: nn.Hardswish()),
    "LeakyRelu": _simple_module(lambda a: nn.LeakyReLU(float(a.get("alpha", 0.01)))),
    "Elu": _simple_module(lambda a: nn.ELU(float(a.get("alpha", 1.0)))),
    "Gelu": _simple_module(lambda a: nn.GELU(approximate=_decode(a.get("approximate", "none")))),
    "LRN": _simple_module(lambda a: nn.LocalResponseNorm(int(a["size"]), float(a.get("alpha", 1e-4)),
                                                         float(a.get("beta", 0.75)), float(a.get("bias", 1.0)))),
    "Clip": clip, "HardSigmoid": hard_sigmoid, "Softmax": softmax, "LogSoftmax": softmax,
    "Flatten": flatten, "Reshape": reshape, "Transpose": transpose, "Concat": concat, "Split": split, "Slice": slice_,
    "Gather": gather, "Squeeze": squeeze, "Unsqueeze": unsqueeze, "Pad": pad, "Resize": resize, "Upsample": resize,
    "Cast": cast, "Dropout": passthrough, "Identity": passthrough,
    "Add": _binary(operator.add), "Sub": _binary(operator.sub), "Mul": _binary(operator.mul),
    "Div": _binary(operator.truediv), "Pow": _binary(torch.pow),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Erf": _unary(torch.erf), "Neg": _unary(operator.neg),
    "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal), "Log": _unary(torch.log),
}
SUPPORTED_OPS = tuple(sorted(CONVERTERS))


def build_graph_module(prepared: Prepared, label: str) -> torch.fx.GraphModule:
    """The fx GraphModule computing ``prepared.model``'s graph (placeholders keep the ONNX input names)."""
    b = Builder(prepared, label)
    for name, _shape, _dtype in prepared.inputs:
        b.env[name] = b.graph.placeholder(b.unique(name))
    for node in prepared.model.graph.node:
        b.node = node
        convert = CONVERTERS.get(node.op_type)
        if convert is None:
            raise CaptureError(f"{label}: node '{node.name}' ({node.op_type}) is not supported; "
                               f"graphopt imports: {', '.join(SUPPORTED_OPS)}")
        for out_name, value in zip(node.output, convert(b)):
            if out_name:
                b.env[out_name] = value
    b.node = None
    outputs = [b.value(o.name) for o in prepared.model.graph.output]
    b.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return torch.fx.GraphModule(b.root, b.graph, class_name="OnnxModel")
