"""Channel dependency analysis for structured pruning (used by ``prune-channels``).

Every channel of every tensor in the module-level fx graph is an element of a
union-find; two elements are joined when they must be removed together:

* elementwise ops, BatchNorm, pooling, activations: output channel c *is* input channel c;
* residual adds and broadcast multiplies (squeeze-excite ``x * s``): the operands' channel
  c are joined;
* ``torch.cat`` on dim 1 concatenates its members' channels; ``chunk``/``split``/slicing
  on dim 1 take a sub-range; the ShuffleNet channel shuffle (view/transpose/view) permutes;
* a depthwise conv (one input channel per group) joins input channel i with its output
  channels; a grouped conv joins the same local index across its groups (on each side);
* flatten into a Linear repeats each channel over its ``H*W`` features;
* ``permute``/``transpose``/``flatten``/``view`` may move the channels to another axis: every
  tracked tensor records its channel axis (:mod:`graphopt.passes._channel_layout`), so a
  channels-last ``LayerNorm(C)`` is sliced with them, a ``Linear`` on the channel axis
  consumes them and produces a new group (the ConvNeXt / MLP-mixer MLP), and a ``Linear``
  on another axis (MLP-mixer token mixing) leaves them where they are;
* a module called from several places joins its channels across the call sites;
* a parameter or buffer in an elementwise op (a layer-scale ``[C, 1, 1]``) is sliced
  with the channels it meets; ``index_select`` on dim 1 (a pruned shuffle) re-indexes.

Reductions and softmax over the channels, ``view``/``reshape`` that fix the channel count or
interleave the channels with another axis, ``permute`` that moves the batch, spatial ops
(pooling, convs, slicing, split) on channels that are not on axis 1, LayerNorm over the
channels and other axes, GroupNorm/PReLU, transposed and functional convs, and anything
else unknown *block*.

A *unit* is one union-find class: removing it removes one channel (or a few tied ones)
from every tensor it touches. Units are grouped by the set of layers that produce them
(a conv's output channels, and every other conv or linear whose outputs are tied to
them): that is a :class:`ChannelGroup`, the thing a pruning ratio applies to.

Anything the analysis does not understand *blocks* the units it touches (they are
never removed) and names the node; graph inputs and outputs are *protected*.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.passes._channel_layout import flattened, moved, reduced, reshaped

__all__ = ["ChannelGroup", "ChannelAnalysis", "analyze", "module_parts"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: modules that act on every element alone: the only ones allowed on channels moved off axis 1
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.SELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip
_PASS_MODULES = (
    *_ELEMENTWISE,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d,
)  # fmt: skip
# Functions and methods that act on each channel independently (by __name__ / method name).
_PASS_NAMES = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "hardsigmoid", "hardswish",
    "silu", "gelu", "tanh", "tanh_", "leaky_relu", "elu", "selu", "mish", "softplus", "dropout", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "max_pool1d", "max_pool2d",
    "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "interpolate", "upsample", "clamp", "clamp_", "clamp_min", "clamp_max", "clip", "contiguous", "clone",
    "detach", "abs", "neg", "float", "to", "type_as",
}  # fmt: skip
#: of those, the ones that look at the spatial layout (NCHW): not allowed on moved channels
_SPATIAL_NAMES = {n for n in _PASS_NAMES if "pool" in n or n.startswith("dropout") and n[-2:] in ("1d", "2d", "3d")}
_SPATIAL_NAMES |= {"interpolate", "upsample"}
_BINARY = {"add", "sub", "mul", "truediv", "div", "maximum", "minimum", "add_", "sub_", "mul_", "div_",
           "iadd", "isub", "imul", "itruediv", "__add__", "__sub__", "__mul__", "__truediv__",
           "__radd__", "__rmul__"}
_INDEX_DTYPES = (torch.int64, torch.int32)
_INT_ARITH = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod}
_REDUCTIONS = {"mean", "sum", "amax", "amin"}
PROTECTED_INPUT = "protected: a model input"
PROTECTED_OUTPUT = "protected: a graph output"


def getattr_path(root: nn.Module, target: str) -> Any:
    """The attribute a ``get_attr`` node reads (``a.b.c``), or None."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def module_parts(module: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """``(core conv/linear, following parts)`` of a plain or fused (Sequential) layer."""
    parts = list(module) if isinstance(module, nn.Sequential) else [module]
    if not parts or type(parts[0]) not in (*_CONVS, nn.Linear):
        return None
    return parts[0], parts[1:]


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class _Size:
    """``x.size()`` / ``x.shape`` of a channel tensor."""

    ids: np.ndarray
    dim: int  # the rank of x
    axis: int = 1  # where x carries its channels


@dataclass(frozen=True)
class _Count:
    """An int derived from a tensor's channel count (``x.size(1)`` and arithmetic on it)."""

    ids: np.ndarray


@dataclass
class _Tuple:
    items: list[Any]


@dataclass
class Layer:
    """A conv or linear layer: its input and output channel elements (joined over call sites)."""

    name: str
    core: nn.Module
    in_ids: np.ndarray
    out_ids: np.ndarray


@dataclass
class SplitUse:
    """A chunk/split on the channel dim: rewritten to ``split(sizes)`` when pieces shrink."""

    node: Node
    pieces: list[np.ndarray]


@dataclass
class SliceUse:
    """``x[:, a:b]``: bounds rewritten to the kept counts."""

    node: Node
    source: np.ndarray
    start: int
    stop: int


@dataclass
class ShuffleUse:
    """A view/transpose/[contiguous]/view channel shuffle: becomes ``index_select`` when pruned."""

    first: Node
    last: Node
    nodes: list[Node]
    in_ids: np.ndarray
    perm: np.ndarray  # output channel j = input channel perm[j]


@dataclass
class SelectUse:
    """``index_select(x, 1, buffer)`` (what a pruned shuffle becomes): the buffer is re-indexed."""

    node: Node
    attr: str
    in_ids: np.ndarray
    index: np.ndarray


@dataclass
class ChannelGroup:
    """Channels produced by one set of layers; removing a unit removes all its tied channels."""

    name: str  # the first producing layer
    producers: tuple[str, ...]
    units: list[int]  # union-find roots, in the first producer's channel order
    #: per unit: producing layer -> its output channel indices in this unit
    outputs: list[dict[str, tuple[int, ...]]]
    #: per unit: BatchNorm / LayerNorm module -> its channel indices in this unit
    norms: list[dict[str, tuple[int, ...]]]
    blocked: str = ""  # why the group must be left alone ("" when it may be pruned)

    @property
    def size(self) -> int:
        return len(self.units)

    def unit_width(self, producer: str) -> int:
        """Output channels of ``producer`` per unit (1 unless tied by a grouped conv)."""
        return min(len(o.get(producer, ())) for o in self.outputs) or 1


@dataclass
class ChannelAnalysis:
    """The groups of a graph plus what is needed to remove a set of units from it."""

    gm: GraphModule
    groups: list[ChannelGroup]
    roots: np.ndarray  # element id -> union-find root
    values: dict[Node, Any]
    layers: dict[str, Layer]
    norms: dict[str, np.ndarray]
    attrs: dict[str, tuple[int, np.ndarray]]  # get_attr tensors: channel dim, elements
    splits: list[SplitUse]
    slices: list[SliceUse]
    shuffles: list[ShuffleUse]
    reasons: dict[int, str] = field(default_factory=dict)  # root -> why it is blocked/protected
    selects: list[SelectUse] = field(default_factory=list)
    #: ``F.layer_norm`` calls over the channels (an nn.LayerNorm subclass's forward): their
    #: ``normalized_shape`` argument is rewritten to the kept count
    norm_calls: list[tuple[Node, np.ndarray]] = field(default_factory=list)

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def keep(self, ids: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        """Boolean mask of the elements of ``ids`` that survive removing ``pruned`` roots."""
        return ~np.isin(self.roots[ids], pruned)


# --------------------------------------------------------------------------- the walk


def _shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, Node):
        return None
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return tuple(shape) if shape is not None else None


def _name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", "")


def _is_torch_fn(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module.startswith("torch") or module in ("operator", "_operator")


def _dims(value: Any, rank: int) -> list[int] | None:
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(d, int) for d in items):
        return None
    return [d % rank for d in items]


def _flat(args: Any) -> list[Any]:
    out: list[Any] = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        if isinstance(a, (list, tuple)):
            out += _flat(a)
        elif isinstance(a, dict):
            out += _flat(list(a.values()))
        else:
            out.append(a)
    return out


class _Walker:
    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.parent: list[int] = []
        self.values: dict[Node, Any] = {}
        self.layers: dict[str, Layer] = {}
        self.norms: dict[str, np.ndarray] = {}
        self.attrs: dict[str, tuple[int, np.ndarray]] = {}
        self.splits: list[SplitUse] = []
        self.slices: list[SliceUse] = []
        self.shuffles: list[ShuffleUse] = []
        self.selects: list[SelectUse] = []
        self.norm_calls: list[tuple[Node, np.ndarray]] = []
        self.marks: list[tuple[np.ndarray, str]] = []  # (elements, reason) blocked or protected
        self.axes: dict[Node, int] = {}  # tensors whose channels are not on axis 1
        self.done: set[Node] = set()  # nodes already given values by a pattern (shuffle)

    # union-find ---------------------------------------------------------------------
    def fresh(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        if a is b:
            return
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    # helpers -------------------------------------------------------------------------
    def block(self, ids: np.ndarray, reason: str) -> None:
        if len(ids):
            self.marks.append((ids, reason))

    def ids(self, arg: Any) -> np.ndarray | None:
        value = self.values.get(arg) if isinstance(arg, Node) else None
        return value if isinstance(value, np.ndarray) else None

    def axis(self, arg: Any) -> int:
        """The axis ``arg`` carries its channels on."""
        return self.axes.get(arg, 1) if isinstance(arg, Node) else 1

    def put(self, node: Node, ids: np.ndarray, axis: int) -> None:
        self.values[node] = ids
        if axis != 1:
            self.axes[node] = axis

    def moved_off(self, node: Node) -> int | None:
        """The channel axis of the first input whose channels are not on axis 1, if any."""
        for a in _flat((node.args, node.kwargs)):
            if isinstance(a, Node) and a in self.axes and self.values.get(a) is not None:
                return self.axes[a]
        return None

    def opaque(self, node: Node, why: str) -> None:
        """An op the analysis does not understand: block every channel it touches."""
        reason = f"blocked by node '{node.name}' ({why})"
        for a in _flat((node.args, node.kwargs)):
            value = self.values.get(a) if isinstance(a, Node) else None
            for v in value.items if isinstance(value, _Tuple) else [value]:
                if isinstance(v, (np.ndarray, _Size, _Count)):
                    self.block(v if isinstance(v, np.ndarray) else v.ids, reason)
        self.values[node] = self.fresh_like(node, reason)

    def fresh_like(self, node: Node, reason: str) -> Any:
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (list, tuple)) and not hasattr(meta, "shape"):
            return _Tuple([self._fresh_meta(m, reason) for m in meta])
        return self._fresh_meta(meta, reason)

    def _fresh_meta(self, meta: Any, reason: str) -> Any:
        shape = getattr(meta, "shape", None)
        if shape is None or len(shape) < 2:
            return None
        ids = self.fresh(shape[1])
        self.block(ids, reason)
        return ids

    def passthrough(self, node: Node, src: Any, axis: int | None = None) -> None:
        """Output channel c is input channel c (on axis ``axis`` of the output; default: the input's)."""
        ids, a = self.ids(src), self.axis(src)
        b = a if axis is None else axis
        out, inp = _shape(node), _shape(src)
        if ids is None:
            self.generic(node)
        elif out is None or inp is None or len(out) <= b or out[b] != inp[a] or out[0] != inp[0]:
            self.opaque(node, "changes the channel dimension")
        else:
            self.put(node, ids, b)

    def generic(self, node: Node) -> None:
        """A node with no channel tensor among its inputs (ints, sizes, constants)."""
        inputs = [self.values.get(a) for a in _flat((node.args, node.kwargs)) if isinstance(a, Node)]
        counts = [v for v in inputs if isinstance(v, (_Count, _Size))]
        tensors = [v for v in inputs if isinstance(v, (np.ndarray, _Tuple))]
        if counts and not tensors and node.op == "call_function" and node.target in _INT_ARITH:
            self.values[node] = _Count(counts[0].ids)
        elif counts or tensors:
            self.opaque(node, f"{node.op} {_name(node.target)!r} is not understood")
        else:
            self.values[node] = self.fresh_like(node, f"created by node '{node.name}' with a fixed channel count")

    # visitors ------------------------------------------------------------------------
    def visit(self, node: Node) -> None:
        if node in self.done:
            return
        if node.op == "placeholder":
            self.values[node] = self.fresh_like(node, PROTECTED_INPUT)
        elif node.op == "output":
            for a in _flat(node.args):
                v = self.values.get(a) if isinstance(a, Node) else None
                for item in v.items if isinstance(v, _Tuple) else [v]:
                    if isinstance(item, np.ndarray):
                        self.block(item, PROTECTED_OUTPUT)
        elif node.op == "get_attr":
            self.values[node] = None  # given channel elements where a binary op uses it
        elif node.op == "call_module":
            self.visit_module(node)
        else:
            self.visit_call(node)

    def visit_module(self, node: Node) -> None:
        module = self.gm.get_submodule(str(node.target))
        name = str(node.target)
        parts = module_parts(module)
        src = node.args[0] if node.args else None
        if parts is not None:
            return self.visit_layer(node, name, *parts)
        if isinstance(module, nn.LayerNorm):
            self.layer_norm(node, name, module.normalized_shape, src, len(node.args) == 1 and not node.kwargs)
            return
        moved_to = self.moved_off(node)
        if moved_to is not None and not isinstance(module, _ELEMENTWISE):
            return self.opaque(node, f"{type(module).__name__} on channels moved to axis {moved_to}")
        if isinstance(module, _BNS):
            ids = self.ids(src)
            if ids is None or len(ids) != module.num_features or len(node.args) != 1:
                return self.opaque(node, "BatchNorm over an unexpected input")
            self.record_norm(name, ids)
            return self.passthrough(node, src)
        if isinstance(module, _PASS_MODULES) and len(node.args) == 1 and not node.kwargs:
            if getattr(module, "return_indices", False):
                return self.opaque(node, "returns indices")
            return self.passthrough(node, src)
        if isinstance(module, nn.Flatten):
            return self.flatten(node, src, module.start_dim, module.end_dim)
        if isinstance(module, nn.Softmax) and module.dim is not None:
            rank = len(_shape(src) or ())
            if rank >= 2 and module.dim % rank != 1:
                return self.passthrough(node, src)
        self.opaque(node, type(module).__name__)

    def layer_norm(self, node: Node, name: str | None, normalized_shape: Any, src: Any, plain: bool = True) -> bool:
        """LayerNorm over the channel axis alone: the weight and bias of module ``name`` are sliced
        with the channels (it then normalizes over the kept ones); over other axes only: the
        channels pass. True when it normalizes over the channels."""
        ids, shape, a = self.ids(src), _shape(src), self.axis(src)
        if ids is None and not self._touches_channels(node):
            self.generic(node)
            return False
        normalized = tuple(normalized_shape) if isinstance(normalized_shape, (list, tuple)) else ()
        if ids is None or shape is None or not plain or not normalized:
            self.opaque(node, "LayerNorm not understood")
            return False
        if a < len(shape) - len(normalized):
            self.passthrough(node, src)
            return False
        if len(normalized) != 1 or a != len(shape) - 1 or normalized[0] != len(ids) or name is None:
            self.opaque(node, "LayerNorm over the channels and other dimensions, or without its module")
            return False
        self.record_norm(name, ids)
        self.passthrough(node, src)
        return True

    def functional_layer_norm(self, node: Node, args: tuple, kwargs: dict) -> None:
        """``F.layer_norm(x, shape, weight, bias, eps)`` as a LayerNorm subclass's forward calls it
        (ConvNeXt's LayerNorm2d; traced, its module is a plain holder of ``weight`` and ``bias``):
        the holder's parameters are sliced, the shape argument rewritten."""
        keys = ("input", "normalized_shape", "weight", "bias")
        src, normalized, *params = [args[k] if len(args) > k else kwargs.get(key) for k, key in enumerate(keys)]
        owner = str(params[0].target).rpartition(".")[0] if isinstance(params[0], Node) else None
        module = getattr_path(self.gm, owner) if owner and params[0].op == "get_attr" else None
        plain = isinstance(module, nn.Module) and all(
            isinstance(p, Node) and p.op == "get_attr" and str(p.target) == f"{owner}.{attr}"
            for p, attr in zip(params, ("weight", "bias")))
        if self.layer_norm(node, owner if plain else None, normalized, src):
            self.norm_calls.append((node, self.values[node]))

    def record_norm(self, name: str, ids: np.ndarray) -> None:
        if name in self.norms:
            self.union(self.norms[name], ids)
        else:
            self.norms[name] = ids

    def visit_layer(self, node: Node, name: str, core: nn.Module, rest: list[nn.Module]) -> None:
        src = node.args[0] if node.args else None
        ids, shape, out, a = self.ids(src), _shape(src), _shape(node), self.axis(src)
        is_conv = isinstance(core, _CONVS)
        if len(node.args) != 1 or node.kwargs or ids is None or out is None or len(out) < 2:
            return self.opaque(node, "layer with unexpected inputs")
        if is_conv and a != 1:
            return self.opaque(node, f"{type(core).__name__} on channels moved to axis {a}")
        if not is_conv and a != len(shape) - 1:  # a Linear over another axis (MLP-mixer token mixing)
            if rest or shape[-1] != core.in_features or a >= len(out) - 1:
                return self.opaque(node, "Linear over another axis, fused or unexpected")
            return self.passthrough(node, src)
        if any(not isinstance(p, _PASS_MODULES + _BNS) for p in rest):
            return self.opaque(node, f"fused {type(core).__name__} with {type(rest[0]).__name__}")
        n_in = core.in_channels if is_conv else core.in_features
        n_out = core.out_channels if is_conv else core.out_features
        if len(ids) != n_in or out[a] != n_out:
            return self.opaque(node, "channel counts do not match the layer")
        out_ids = self.fresh(n_out)
        if is_conv and core.groups > 1:
            g = core.groups
            cpg, opg = n_in // g, n_out // g
            if cpg == 1:  # depthwise(-like): input channel i owns output channels i*opg..
                for i in range(g):
                    self.union(np.repeat(ids[i : i + 1], opg), out_ids[i * opg : (i + 1) * opg])
            else:  # grouped: the same local index is removed in every group
                for k in range(1, g):
                    self.union(ids[:cpg], ids[k * cpg : (k + 1) * cpg])
                    self.union(out_ids[:opg], out_ids[k * opg : (k + 1) * opg])
        if name in self.layers:  # shared weights: every call site prunes the same channels
            layer = self.layers[name]
            self.union(layer.in_ids, ids)
            self.union(layer.out_ids, out_ids)
        else:
            self.layers[name] = Layer(name, core, ids, out_ids)
        for i, part in enumerate(rest):
            if isinstance(part, _BNS):
                self.record_norm(f"{name}.{i + 1}", out_ids)
        self.put(node, out_ids, len(out) - 1 if not is_conv else 1)

    def flatten(self, node: Node, src: Any, start: int, end: int) -> None:
        ids, shape = self.ids(src), _shape(src)
        if ids is None or shape is None:
            return self.generic(node)
        where = flattened(shape, start, end, self.axis(src))
        if where is None:
            what = "the batch" if start % len(shape) == 0 else "a preceding axis"
            return self.opaque(node, f"flattens {what} and the channel dimension together")
        axis, repeat = where
        if repeat == 1:
            return self.passthrough(node, src, axis)
        self.put(node, np.repeat(ids, repeat), axis)

    def visit_call(self, node: Node) -> None:
        target, args, kwargs = node.target, node.args, node.kwargs
        name = _name(target)
        is_method = node.op == "call_method"
        if not is_method and target in _INT_ARITH and _shape(node) is None:
            return self.generic(node)
        if target is getattr:
            return self.size(node, args[0], self.values.get(args[0]), args, kwargs)
        if not is_method and not _is_torch_fn(target):
            return self.generic(node) if not self._touches_channels(node) else self.opaque(node, f"function {name!r}")
        src = args[0] if args else None
        src_value = self.values.get(src) if isinstance(src, Node) else None

        if name == "getitem" and not is_method:
            return self.getitem(node, src_value, args[1])
        if name in ("size", "getattr") or (name == "dim" and is_method):
            return self.size(node, src, src_value, args, kwargs)
        if name == "layer_norm" and not is_method:
            return self.functional_layer_norm(node, args, kwargs)
        moved_to = self.moved_off(node)
        if moved_to is not None and (name in ("chunk", "split", "index_select", "pad") or name in _SPATIAL_NAMES):
            return self.opaque(node, f"{name} on channels moved to axis {moved_to}")
        if name in ("cat", "concat", "concatenate"):
            members = args[0] if args else kwargs.get("tensors")
            return self.cat(node, members, args[1] if len(args) > 1 else kwargs.get("dim", 0))
        if name in ("chunk", "split"):
            return self.split(node, name, src, args, kwargs)
        if name == "flatten":
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(node, src, start, end)
        if name in ("view", "reshape"):
            dims = list(args[1:]) if len(args) > 1 else list(kwargs.get("shape", kwargs.get("size", ())))
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = list(dims[0])
            return self.view(node, src, dims)
        if name == "index_select" and not is_method:
            return self.index_select(node, src, args[1:], kwargs)
        if name in ("transpose", "permute", "unsqueeze", "squeeze"):
            return self.layout(node, name, src, args, kwargs)
        if name in _REDUCTIONS:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            rank = len(_shape(src) or ())
            axis = reduced(_dims(dim, rank) if rank else None, rank, self.axis(src), bool(keepdim))
            if axis is None:
                return self.opaque(node, f"{name} over the batch or channel dimension")
            return self.passthrough(node, src, axis)
        if name in ("softmax", "log_softmax"):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            rank = len(_shape(src) or ())
            if isinstance(dim, int) and rank >= 2 and dim % rank not in (0, self.axis(src)):
                return self.passthrough(node, src)
            return self.opaque(node, f"{name} over channels")
        if name in _BINARY:
            return self.binary(node)
        if name == "pad" and isinstance(src_value, np.ndarray):
            pad = args[1] if len(args) > 1 else kwargs.get("pad")
            if isinstance(pad, (list, tuple)) and len(pad) <= 2 * (len(_shape(src) or ()) - 2):
                return self.passthrough(node, src)  # pads the spatial dims only
            return self.opaque(node, "pads the channel dimension")
        if name in _PASS_NAMES and isinstance(src_value, np.ndarray):
            others = [a for a in _flat((args[1:], kwargs)) if isinstance(a, Node)]
            if all(self.values.get(a) is None and _shape(a) in (None, ()) for a in others):
                return self.passthrough(node, src)
            return self.opaque(node, f"{name} with tensor arguments")
        if self._touches_channels(node):
            return self.opaque(node, f"{node.op} {name!r} is not understood")
        self.generic(node)

    def _touches_channels(self, node: Node) -> bool:
        for a in _flat((node.args, node.kwargs)):
            if isinstance(a, Node) and self.values.get(a) is not None:
                return True
        return False

    def getitem(self, node: Node, value: Any, index: Any) -> None:
        if isinstance(value, _Tuple) and isinstance(index, int):
            self.values[node] = value.items[index]
        elif isinstance(value, _Size) and isinstance(index, int):
            self.values[node] = _Count(value.ids) if index % value.dim == value.axis else None
        elif isinstance(value, _Size) and isinstance(index, slice):  # e.g. x.shape[2:]
            self.values[node] = _Count(value.ids) if value.axis in range(value.dim)[index] else None
        elif isinstance(value, np.ndarray) and self.axis(node.args[0]) != 1:
            self.opaque(node, f"indexing channels moved to axis {self.axis(node.args[0])}")
        elif isinstance(value, np.ndarray):
            self.slice(node, node.args[0], value, index)
        elif value is None:
            self.generic(node)
        else:
            self.opaque(node, "indexing not understood")

    def slice(self, node: Node, src: Node, ids: np.ndarray, index: Any) -> None:
        idx = index if isinstance(index, tuple) else (index,)
        if len(idx) < 2:  # indexes the batch only: x[a:b] keeps channels at dim 1
            if len(idx) == 1 and isinstance(idx[0], slice) and _shape(node) and len(_shape(node)) >= 2:
                return self.passthrough(node, src)
            return self.opaque(node, "indexing not understood")
        if not all(isinstance(i, slice) or i is Ellipsis for i in idx) or idx[0] != slice(None):
            return self.opaque(node, "indexing not understood")
        rest = idx[2:]
        if any(not isinstance(i, slice) or i.step not in (None, 1) for i in idx[1:2]) or Ellipsis in idx[:2]:
            return self.opaque(node, "indexing the channel dimension with a step")
        if Ellipsis in rest and not all(i is Ellipsis or i == slice(None) for i in rest):
            return self.opaque(node, "indexing not understood")
        s = idx[1]
        if any(isinstance(v, Node) for v in (s.start, s.stop)):
            return self.opaque(node, "slicing channels with computed bounds")
        start, stop, _ = s.indices(len(ids))
        out = _shape(node)
        if out is None or out[1] != max(0, stop - start):
            return self.opaque(node, "indexing not understood")
        sub = ids[start:stop]
        if s != slice(None):
            self.slices.append(SliceUse(node, ids, start, stop))
        self.values[node] = sub

    def size(self, node: Node, src: Any, value: Any, args: tuple, kwargs: dict) -> None:
        if not isinstance(value, np.ndarray):
            return self.generic(node)
        rank = len(_shape(src) or ())
        if _name(node.target) == "dim":
            self.values[node] = None
        elif _name(node.target) == "getattr":
            attr = args[1] if len(args) > 1 else None
            self.values[node] = _Size(value, rank, self.axis(src)) if attr == "shape" else None
            if attr not in ("shape", "dtype", "device"):
                self.opaque(node, f"reads .{attr}")
        else:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is None:
                self.values[node] = _Size(value, rank, self.axis(src))
            else:
                self.values[node] = _Count(value) if dim % rank == self.axis(src) else None

    def cat(self, node: Node, members: Any, dim: Any) -> None:
        out = _shape(node)
        if not isinstance(members, (list, tuple)) or not isinstance(dim, int) or out is None:
            return self.opaque(node, "cat not understood")
        ids = [self.ids(m) for m in members]
        if any(i is None for i in ids):
            return self.opaque(node, "cat of tensors without known channels")
        axis = self.axis(members[0])
        if any(self.axis(m) != axis for m in members):
            return self.opaque(node, "cat of tensors with channels on different axes")
        if dim % len(out) == axis:
            self.put(node, np.concatenate(ids), axis)
            return
        for other in ids[1:]:
            if len(other) != len(ids[0]):
                return self.opaque(node, "cat not understood")
            self.union(ids[0], other)
        self.put(node, ids[0], axis)

    def split(self, node: Node, name: str, src: Any, args: tuple, kwargs: dict) -> None:
        ids, shape = self.ids(src), _shape(src)
        arg = args[1] if len(args) > 1 else kwargs.get("chunks", kwargs.get("split_size_or_sections", kwargs.get("split_size")))
        dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
        if ids is None or shape is None or not isinstance(dim, int):
            return self.generic(node) if ids is None and not self._touches_channels(node) else self.opaque(node, f"{name} not understood")
        if dim % len(shape) != 1:
            meta = node.meta.get("tensor_meta")
            many = isinstance(meta, (list, tuple)) and not hasattr(meta, "shape")
            self.values[node] = _Tuple([ids for _ in (meta if many else [0])])
            return
        c = len(ids)
        if name == "chunk" and isinstance(arg, int):
            size = -(-c // arg)
            sizes = [min(size, c - k) for k in range(0, c, size)]
        elif isinstance(arg, int):
            sizes = [min(arg, c - k) for k in range(0, c, arg)]
        elif isinstance(arg, (list, tuple)) and all(isinstance(s, int) for s in arg) and sum(arg) == c:
            sizes = list(arg)
        else:
            return self.opaque(node, f"{name} not understood")
        offsets = np.cumsum([0] + sizes)
        pieces = [ids[offsets[k] : offsets[k + 1]] for k in range(len(sizes))]
        self.splits.append(SplitUse(node, pieces))
        self.values[node] = _Tuple(pieces)

    def view(self, node: Node, src: Any, dims: list[Any]) -> None:
        ids, shape, out = self.ids(src), _shape(src), _shape(node)
        if ids is None or shape is None or out is None:
            return self.generic(node) if not self._touches_channels(node) else self.opaque(node, "view not understood")
        axis = self.axis(src)
        if axis == 1 and self.shuffle(node, ids, shape):
            return
        where = reshaped(shape, out, axis) if len(dims) == len(out) else None
        if where is None:
            return self.opaque(node, "view/reshape that splits the channels or merges them with a preceding axis")
        j, repeat = where
        counts = {k: self.values.get(d) for k, d in enumerate(dims) if isinstance(d, Node)}
        sizes = [(k, v) for k, v in counts.items() if isinstance(v, (_Count, _Size))]
        own_count = all(isinstance(v, _Count) and v.ids is ids and k == j for k, v in sizes)
        follows = dims[j] == -1 or (repeat == 1 and isinstance(counts.get(j), _Count))  # sized by the channels at run time
        if not (own_count and follows):
            return self.opaque(node, "view/reshape with a fixed channel count")
        if repeat == 1:
            return self.passthrough(node, src, j)
        self.put(node, np.repeat(ids, repeat), j)

    def shuffle(self, node: Node, ids: np.ndarray, shape: tuple[int, ...]) -> bool:
        """view(N, g, C/g, *S) -> transpose(1, 2) -> [contiguous] -> view(N, C or -1, *S)."""
        mid = _shape(node)
        c = shape[1]
        if mid is None or len(mid) != len(shape) + 1 or mid[0] != shape[0] or mid[1] * mid[2] != c or mid[3:] != shape[2:]:
            return False
        chain, cur = [node], node
        for expect in ("transpose", "contiguous", "view"):
            if len(cur.users) != 1:
                return False
            (nxt,) = cur.users
            name = _name(nxt.target) if nxt.op == "call_method" else ""
            if expect == "contiguous" and name != "contiguous":
                if name != "view":
                    return False
                expect = "view"
            if name != expect or nxt.args[0] is not cur:
                return False
            if expect == "transpose" and sorted(d % len(mid) for d in nxt.args[1:3]) != [1, 2]:
                return False
            chain.append(nxt)
            cur = nxt
        last = chain[-1]
        if _shape(last) != shape:
            return False
        for view in (chain[0], last):  # channel counts the views use must be this tensor's
            for d in view.args[1:]:
                v = self.values.get(d) if isinstance(d, Node) else None
                if isinstance(v, (_Count, _Size)) and v.ids is not ids:
                    return False
        g, per = mid[1], mid[2]
        j = np.arange(c)
        perm = (j % g) * per + j // g
        self.shuffles.append(ShuffleUse(chain[0], last, chain, ids, perm))
        for n in chain[:-1]:
            self.values[n] = None
        self.values[last] = ids[perm]
        self.done.update(chain[1:])
        return True

    def index_select(self, node: Node, src: Any, args: tuple, kwargs: dict) -> None:
        ids, shape = self.ids(src), _shape(src)
        dim = args[0] if args else kwargs.get("dim")
        index = args[1] if len(args) > 1 else kwargs.get("index")
        if ids is None or shape is None:
            return self.generic(node)
        if not isinstance(dim, int) or dim % len(shape) != 1:
            return self.passthrough(node, src) if isinstance(dim, int) and dim % len(shape) > 1 else self.opaque(node, "index_select not understood")
        value = None
        if isinstance(index, Node) and index.op == "get_attr" and len(index.users) == 1:
            value = getattr_path(self.gm, str(index.target))
        if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.dtype not in _INDEX_DTYPES:
            return self.opaque(node, "index_select with a computed or shared index")
        idx = value.cpu().numpy().astype(np.int64)
        self.selects.append(SelectUse(node, str(index.target), ids, idx))
        self.values[node] = ids[idx]

    def layout(self, node: Node, name: str, src: Any, args: tuple, kwargs: dict) -> None:
        shape, out = _shape(src), _shape(node)
        if self.ids(src) is None or shape is None or out is None:
            return self.generic(node) if not self._touches_channels(node) else self.opaque(node, f"{name} not understood")
        axis = moved(name, args, kwargs, len(shape), self.axis(src))
        if axis is None:
            return self.opaque(node, f"{name} moves the batch or removes the channel dimension")
        self.passthrough(node, src, axis)

    def binary(self, node: Node) -> None:
        out = _shape(node)
        operands = _flat((node.args, node.kwargs))
        if out is None or len(out) < 2:
            return self.generic(node)
        axes = {self.axis(a) for a in operands if isinstance(a, Node) and isinstance(self.values.get(a), np.ndarray)}
        if len(axes) > 1:
            return self.opaque(node, "elementwise op over channels on different axes")
        axis = axes.pop() if axes else 1
        c = out[axis] if axis < len(out) else -1
        joined: list[np.ndarray] = []
        for a in operands:
            if not isinstance(a, Node):
                continue
            shape = _shape(a)
            if a.op == "get_attr":
                if not self.attr_operand(node, a, out, axis, joined):
                    return
                continue
            value = self.values.get(a)
            if value is None and shape in (None, ()):
                continue
            if not isinstance(value, np.ndarray) or shape is None or len(shape) != len(out):
                return self.opaque(node, "elementwise op over tensors of different ranks")
            if len(value) == c:
                joined.append(value)
            elif len(value) == 1:
                continue  # broadcast along the channels: pruning can never empty it (min 1 kept)
            else:
                return self.opaque(node, "elementwise op not understood")
        if not joined:
            return self.opaque(node, "elementwise op not understood")
        for other in joined[1:]:
            self.union(joined[0], other)
        self.put(node, joined[0], axis)

    def attr_operand(self, node: Node, attr: Node, out: tuple[int, ...], axis: int, joined: list[np.ndarray]) -> bool:
        """A parameter/buffer in an elementwise op (a layer scale): sliced along the dim that meets the channels."""
        shape = _shape(attr) or ()
        d = axis - (len(out) - len(shape))
        if d < 0 or shape[d] == 1:
            return True  # does not vary along the channels
        if shape[d] != out[axis]:
            self.opaque(node, "elementwise op not understood")
            return False
        name = str(attr.target)
        if name in self.attrs:
            dim, ids = self.attrs[name]
            if dim != d:
                self.opaque(node, f"parameter '{name}' meets the channels along two dimensions")
                return False
        else:
            ids = self.fresh(shape[d])
            self.attrs[name] = (d, ids)
        joined.append(ids)
        return True

    # results -------------------------------------------------------------------------
    def finish(self) -> ChannelAnalysis:
        roots = np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)
        reasons: dict[int, str] = {}
        marks = sorted(self.marks, key=lambda m: not m[1].startswith("protected"))  # report why first
        for ids, reason in marks:
            for r in roots[ids].tolist():
                reasons.setdefault(r, reason)
        for name, (_, ids) in self.attrs.items():  # a parameter used by anything else is opaque
            users = [n for n in self.gm.graph.nodes if n.op == "get_attr" and n.target == name]
            for u in users:
                for user in u.users:
                    if _name(user.target) not in _BINARY:
                        for r in roots[ids].tolist():
                            reasons.setdefault(r, f"blocked by node '{user.name}' (uses parameter '{name}')")
        calls = {n for n, _ in self.norm_calls}
        for node in self.gm.graph.nodes:  # a layer's weights read directly: its channels stay
            if node.op != "get_attr" or node.users and set(node.users) <= calls:
                continue
            target = str(node.target)
            sliced = [(n, [layer.in_ids, layer.out_ids]) for n, layer in self.layers.items()] + [(n, [i]) for n, i in self.norms.items()]
            for name, arrays in sliced:
                if target.startswith(name + "."):
                    for ids in arrays:
                        for r in roots[ids].tolist():
                            reasons.setdefault(r, f"blocked by node '{node.name}' (reads '{target}' directly)")
        outputs: dict[int, dict[str, list[int]]] = {}
        for layer in self.layers.values():
            for j, r in enumerate(roots[layer.out_ids].tolist()):
                outputs.setdefault(r, {}).setdefault(layer.name, []).append(j)
        by_producers: dict[tuple[str, ...], list[int]] = {}
        for r, per_layer in outputs.items():  # dict order: first producer's channel order
            by_producers.setdefault(tuple(per_layer), []).append(r)
        norm_channels: dict[int, dict[str, list[int]]] = {}
        for name, ids in self.norms.items():
            for j, r in enumerate(roots[ids].tolist()):
                norm_channels.setdefault(r, {}).setdefault(name, []).append(j)
        groups: list[ChannelGroup] = []
        seen: dict[str, int] = {}
        for producers, units in by_producers.items():
            name = producers[0]
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            blocked = next((reasons[u] for u in units if u in reasons), "")
            groups.append(ChannelGroup(
                name=name,
                producers=producers,
                units=units,
                outputs=[{k: tuple(v) for k, v in outputs[u].items()} for u in units],
                norms=[{k: tuple(v) for k, v in norm_channels.get(u, {}).items()} for u in units],
                blocked=blocked,
            ))
        return ChannelAnalysis(self.gm, groups, roots, self.values, self.layers, self.norms, self.attrs,
                               self.splits, self.slices, self.shuffles, reasons, self.selects, self.norm_calls)


def analyze(gm: GraphModule) -> ChannelAnalysis:
    """Channel groups of a module-level graph whose nodes carry ``tensor_meta``."""
    walker = _Walker(gm)
    for node in gm.graph.nodes:
        walker.visit(node)
    return walker.finish()
