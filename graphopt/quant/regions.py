"""Op roles in a quantized region: which node is an anchor, add, cat, pool, ReLU (the one place that says)."""

from __future__ import annotations

import difflib
import math
import operator
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.errors import PipelineError
from graphopt.fx_util import ADD_OPS, CAT_OPS, MUL_OPS, is_relu, module_of
from graphopt.quant.simulate import _WEIGHTED, QuantLayer, _base

# ---------------------------------------------------------------------------------------
# Op classification (shared by the pass and the lowerings)


class OpKind(Enum):
    WEIGHTED = "weighted"  # conv/linear: own output qparams, int8 weights
    ANCHOR = "anchor"  # add, mul, cat, batchnorm: own output qparams
    PASSTHROUGH = "passthrough"  # keeps the input's qparams exactly (values stay on the grid)
    REQUANT = "requant"  # keeps the input's qparams, rounds again (average pooling, mean, relu6)
    SHAPE = "shape"  # reads only metadata (size, dim): works on quantized tensors as is
    FLOAT = "float"  # runs in fp32


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


def is_relu6(gm: GraphModule, n: Node) -> bool:
    """A ReLU6 (or hardtanh clamping to [0, 6])."""
    m = module_of(gm, n)
    if m is not None:
        return type(m) is nn.ReLU6 or (type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val == 6.0)
    if n.op == "call_function" and n.target is F.relu6:
        return True
    if n.op == "call_function" and n.target is F.hardtanh:
        lo = n.args[1] if len(n.args) > 1 else n.kwargs.get("min_val", -1.0)
        hi = n.args[2] if len(n.args) > 2 else n.kwargs.get("max_val", 1.0)
        return (lo, hi) == (0.0, 6.0)
    return False


def is_add(n: Node) -> bool:
    """An addition (``+``, ``torch.add``, ``.add()``)."""
    return (n.op == "call_function" and n.target in ADD_OPS) or (n.op == "call_method" and n.target in ("add", "add_"))


def is_cat(n: Node) -> bool:
    """A concatenation (``torch.cat`` and its aliases)."""
    return n.op == "call_function" and n.target in CAT_OPS


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
        if t in ADD_OPS or t in MUL_OPS:
            if len(n.args) == 2 and not n.kwargs and all(_is_tensor_node(a) for a in n.args):
                return OpKind.ANCHOR
            return OpKind.FLOAT
        if t in CAT_OPS:
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
    if is_relu(gm, u):
        return u
    if op_kind(gm, n) is OpKind.WEIGHTED and is_relu6(gm, u):
        return u
    return None


def anchor_inputs(gm: GraphModule, n: Node) -> list[Node]:
    """The tensor inputs an anchor reads quantized."""
    if op_kind(gm, n) is OpKind.WEIGHTED or n.op == "call_module":
        return [n.args[0]] if n.args and isinstance(n.args[0], Node) else []
    if n.op == "call_function" and n.target in CAT_OPS:
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



def pool_window(gm: GraphModule, n: Node) -> int | None:
    """Elements averaged per output of the average pool ``n``, when the same for every output.

    None for anything else (or when the window varies: ceil mode, padding not counted,
    adaptive pooling that does not divide the input).
    """
    shape = getattr(n.args[0].meta.get("tensor_meta"), "shape", None) if n.args and isinstance(n.args[0], Node) else None
    m = module_of(gm, n)
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
        uneven = not m.count_include_pad and m.padding not in (0, (0,), (0, 0))
        if m.ceil_mode or getattr(m, "divisor_override", None) or uneven:
            return None
        k = m.kernel_size
        return math.prod(k) if isinstance(k, (tuple, list)) else k ** (1 if isinstance(m, nn.AvgPool1d) else 2)
    return None

