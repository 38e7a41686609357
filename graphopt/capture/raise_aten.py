"""Raise a ``torch.export`` graph back to a module-level fx graph.

``ExportedProgram.module()`` gives ATen calls on weights read with ``get_attr``.
graphopt's passes work on modules (a ``Conv2d`` with its weight, a ``BatchNorm2d`` with
its running statistics), so each recognised ATen call whose weights are constants
becomes a ``call_module`` node on a new ``nn.Module`` holding those tensors:

    aten.conv1d/conv2d/conv3d, aten.convolution (not transposed)     -> nn.Conv1d/2d/3d
    aten.batch_norm (eval), aten._native_batch_norm_legit_no_training -> nn.BatchNorm1d/2d/3d
    aten.layer_norm with constant weight (and bias)                   -> nn.LayerNorm
    aten.linear, aten.addmm / aten.mm with a transposed weight        -> nn.Linear
    aten.relu, relu_, hardtanh (0, 6 -> ReLU6), sigmoid, tanh, silu,
    hardswish, hardsigmoid, gelu                                       -> activation modules
    aten.max_pool2d(_with_indices), avg_pool2d, adaptive_avg_pool2d,
    aten.dropout (eval)                                                -> pooling / Dropout

ATen calls a ``torch.fx.symbolic_trace`` spells as a Python operator or torch function become
that call, so passes and lowerings that match ``operator.add`` / ``torch.cat`` see them:

    aten.add/sub (alpha 1), mul, div (no rounding) .Tensor             -> operator.add/sub/mul/truediv
    aten.cat, flatten, view/reshape, permute, transpose, mean.dim      -> torch.cat/flatten/reshape/...

Everything else stays a ``call_function`` on the ATen op, which runs as is. New modules are named after the weights' original names
(``layer1.0.conv1.weight`` -> ``layer1.0.conv1``) or the ``nn_module_stack`` the export
recorded; a module called twice (shared weights) becomes one module called twice, as
``torch.fx.symbolic_trace`` would have it. ``get_attr`` nodes and tensors left unused
are dropped.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch import nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen
from torch.fx.operator_schemas import normalize_function

from graphopt.capture.common import sanitize_name
from graphopt.fx_util import get_attr

__all__ = ["raise_to_modules"]

aten = torch.ops.aten

_TRANSPOSES = {aten.t.default, aten.permute.default, aten.transpose.int}


@dataclass
class _Match:
    """One ATen call (and the getitem/transposes it owns) to replace by a module call."""

    module: nn.Module
    input: torch.fx.Node
    replaces: list[torch.fx.Node]  # the values whose uses move to the module call
    dead: list[torch.fx.Node]  # nodes to erase afterwards, in this order
    name_hint: str
    share_key: tuple[Any, ...] | None = None
    meta_from: torch.fx.Node | None = None


@dataclass
class _Context:
    attrs: dict[str, Any]
    node: torch.fx.Node
    kw: dict[str, Any] = field(default_factory=dict)

    def const(self, arg: Any) -> torch.Tensor | None:
        """The tensor behind a ``get_attr`` argument; None if it is not one."""
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            value = self.attrs.get(str(arg.target))
            return value if isinstance(value, torch.Tensor) else None
        return None

    def input(self) -> torch.fx.Node | None:
        first = next(iter(self.kw.values()), None)
        return first if isinstance(first, torch.fx.Node) else None

    def rank(self) -> int | None:
        inp = self.input()
        val = inp.meta.get("val") if inp is not None else None
        return val.dim() if isinstance(val, torch.Tensor) else None


def _param(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)


def _tuple(value: Any, n: int) -> Any:
    """aten spells ints as lists that may be shorter than the spatial rank."""
    if isinstance(value, str):
        return value
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = items * n
    return tuple(int(i) for i in items)


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else target


def _stack_hint(node: torch.fx.Node, cls: type[nn.Module]) -> str:
    """``layer1.0.relu`` if the export recorded the call inside a module of that class."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return cls.__name__.lower()
    path, type_name = list(stack.values())[-1]
    type_name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if type_name.rsplit(".", 1)[-1] == cls.__name__ and path:
        return str(path)
    return f"{path}.{cls.__name__.lower()}" if path else cls.__name__.lower()


def _only_getitem0(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The users of a tuple-returning op if all of them take element 0."""
    users = list(node.users)
    if users and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
        return users
    return None


# --------------------------------------------------------------------------- rules


def _conv(c: _Context) -> _Match | None:
    kw = c.kw
    w, inp = c.const(kw["weight"]), c.input()
    bias_arg = kw.get("bias")
    b = c.const(bias_arg)
    if w is None or inp is None or (bias_arg is not None and b is None):
        return None
    if "transposed" in kw and (kw["transposed"] or any(kw["output_padding"])):
        return None
    nd = w.dim() - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(nd)
    if cls is None:
        return None
    groups = int(kw["groups"])
    module = cls(
        w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride=_tuple(kw["stride"], nd),
        padding=_tuple(kw["padding"], nd), dilation=_tuple(kw["dilation"], nd), groups=groups,
        bias=b is not None, device="meta",
    )
    module.weight = _param(w)
    module.bias = _param(b) if b is not None else None
    key = (cls, id(w), id(b), module.stride, module.padding, module.dilation, groups)
    return _Match(module, inp, [c.node], [c.node], _owner(str(kw["weight"].target)), key)


def _batch_norm(c: _Context) -> _Match | None:
    kw, node = c.kw, c.node
    if node.target is aten.batch_norm.default:
        if kw["training"]:
            return None
        replaces = [node]
    else:  # _native_batch_norm_legit_no_training returns (out, empty, empty)
        replaces = _only_getitem0(node)
        if replaces is None:
            return None
    mean, var, inp = c.const(kw["running_mean"]), c.const(kw["running_var"]), c.input()
    w, b = c.const(kw["weight"]), c.const(kw["bias"])
    if mean is None or var is None or inp is None:
        return None
    if (kw["weight"] is None) != (kw["bias"] is None) or (kw["weight"] is not None and (w is None or b is None)):
        return None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(c.rank() or 0)
    if cls is None:
        return None
    module = cls(mean.shape[0], eps=float(kw["eps"]), momentum=kw["momentum"], affine=w is not None, device="meta")
    if w is not None:
        module.weight, module.bias = _param(w), _param(b)
    module.running_mean, module.running_var = mean, var
    module.num_batches_tracked = torch.tensor(0, dtype=torch.long)
    module.eval()
    owner = _owner(str((kw["weight"] if kw["weight"] is not None else kw["running_mean"]).target))
    key = (cls, id(w), id(b), id(mean), id(var), module.eps)
    dead = [node] if replaces == [node] else [*replaces, node]
    return _Match(module, inp, replaces, dead, owner, key, replaces[0])


def _linear_module(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    module.weight = _param(w)
    module.bias = _param(b) if b is not None else None
    return module


def _linear(c: _Context) -> _Match | None:
    kw = c.kw
    w, inp = c.const(kw["weight"]), c.input()
    b = c.const(kw.get("bias"))
    if w is None or w.dim() != 2 or inp is None or (kw.get("bias") is not None and b is None):
        return None
    return _Match(_linear_module(w, b), inp, [c.node], [c.node], _owner(str(kw["weight"].target)), (nn.Linear, id(w), id(b)))


def _transposed_weight(c: _Context, arg: Any) -> tuple[torch.fx.Node, torch.Tensor] | None:
    """``t(w)`` / ``permute(w, [1, 0])`` / ``transpose(w, 0, 1)`` of a constant 2-D weight."""
    if not (isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target in _TRANSPOSES):
        return None
    src = arg.args[0]
    w = c.const(src)
    if w is None or w.dim() != 2:
        return None
    if arg.target is aten.permute.default and list(arg.args[1]) != [1, 0]:
        return None
    if arg.target is aten.transpose.int and sorted(int(d) % 2 for d in arg.args[1:3]) != [0, 1]:
        return None
    return src, w


def _addmm(c: _Context) -> _Match | None:
    kw = c.kw
    is_addmm = c.node.target is aten.addmm.default
    mat1 = kw["mat1"] if is_addmm else kw["input"]
    found = _transposed_weight(c, kw["mat2"])
    if found is None or not isinstance(mat1, torch.fx.Node):
        return None
    src, w = found
    b = None
    if is_addmm:
        b = c.const(kw["input"])
        if b is None or b.dim() != 1 or b.shape[0] != w.shape[0] or kw["beta"] != 1 or kw["alpha"] != 1:
            return None
    dead = [c.node] + ([kw["mat2"]] if len(kw["mat2"].users) == 1 else [])
    return _Match(_linear_module(w, b), mat1, [c.node], dead, _owner(str(src.target)), (nn.Linear, id(w), id(b)))


def _simple(make: Callable[[dict[str, Any]], nn.Module | None], tuple_output: bool = False) -> Callable[[_Context], _Match | None]:
    """A rule for a weight-free op: ``make(kwargs)`` builds the module (or None to skip)."""

    def rule(c: _Context) -> _Match | None:
        inp = c.input()
        if inp is None:
            return None
        replaces = _only_getitem0(c.node) if tuple_output else [c.node]
        if replaces is None:
            return None
        module = make(c.kw)
        if module is None:
            return None
        dead = [*replaces, c.node] if tuple_output else [c.node]
        return _Match(module, inp, replaces, dead, _stack_hint(c.node, type(module)), None, replaces[0])

    return rule


def _layer_norm(c: _Context) -> _Match | None:
    kw = c.kw
    w, b, inp = c.const(kw.get("weight")), c.const(kw.get("bias")), c.input()
    if inp is None or w is None or (kw.get("bias") is not None and b is None):
        return None
    shape = tuple(int(d) for d in kw["normalized_shape"])
    if tuple(w.shape) != shape or (b is not None and tuple(b.shape) != shape):
        return None
    module = nn.LayerNorm(shape, eps=float(kw.get("eps", 1e-5)), bias=b is not None, device="meta")
    module.weight = _param(w)
    if b is not None:
        module.bias = _param(b)
    return _Match(module, inp, [c.node], [c.node], _owner(str(kw["weight"].target)), (nn.LayerNorm, id(w), id(b), module.eps))


def _hardtanh(inplace: bool) -> Callable[[dict[str, Any]], nn.Module]:
    def make(kw: dict[str, Any]) -> nn.Module:
        lo, hi = float(kw["min_val"]), float(kw["max_val"])
        return nn.ReLU6(inplace=inplace) if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi, inplace=inplace)

    return make


def _max_pool(kw: dict[str, Any]) -> nn.Module:
    kernel = _tuple(kw["kernel_size"], 2)
    stride = _tuple(kw["stride"], 2) if kw["stride"] else kernel
    return nn.MaxPool2d(kernel, stride, _tuple(kw["padding"], 2), _tuple(kw["dilation"], 2), ceil_mode=bool(kw["ceil_mode"]))


def _avg_pool(kw: dict[str, Any]) -> nn.Module:
    kernel = _tuple(kw["kernel_size"], 2)
    stride = _tuple(kw["stride"], 2) if kw["stride"] else kernel
    return nn.AvgPool2d(
        kernel, stride, _tuple(kw["padding"], 2), ceil_mode=bool(kw["ceil_mode"]),
        count_include_pad=bool(kw["count_include_pad"]), divisor_override=kw["divisor_override"],
    )


def _adaptive_avg_pool(kw: dict[str, Any]) -> nn.Module:
    return nn.AdaptiveAvgPool2d(_tuple(kw["output_size"], 2))


def _dropout(kw: dict[str, Any]) -> nn.Module | None:
    return None if kw["train"] else nn.Dropout(float(kw["p"])).eval()


_RULES: dict[Any, Callable[[_Context], _Match | None]] = {
    aten.conv1d.default: _conv, aten.conv1d.padding: _conv,
    aten.conv2d.default: _conv, aten.conv2d.padding: _conv,
    aten.conv3d.default: _conv, aten.conv3d.padding: _conv,
    aten.convolution.default: _conv,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm,
    aten.linear.default: _linear,
    aten.layer_norm.default: _layer_norm,
    aten.addmm.default: _addmm,
    aten.mm.default: _addmm,
    aten.relu.default: _simple(lambda kw: nn.ReLU()),
    aten.relu_.default: _simple(lambda kw: nn.ReLU(inplace=True)),
    aten.hardtanh.default: _simple(_hardtanh(inplace=False)),
    aten.hardtanh_.default: _simple(_hardtanh(inplace=True)),
    aten.sigmoid.default: _simple(lambda kw: nn.Sigmoid()),
    aten.tanh.default: _simple(lambda kw: nn.Tanh()),
    aten.silu.default: _simple(lambda kw: nn.SiLU()),
    aten.hardswish.default: _simple(lambda kw: nn.Hardswish()),
    aten.hardsigmoid.default: _simple(lambda kw: nn.Hardsigmoid()),
    aten.gelu.default: _simple(lambda kw: nn.GELU(approximate=kw.get("approximate", "none"))),
    aten.max_pool2d.default: _simple(_max_pool),
    aten.max_pool2d_with_indices.default: _simple(_max_pool, tuple_output=True),
    aten.avg_pool2d.default: _simple(_avg_pool),
    aten.adaptive_avg_pool2d.default: _simple(_adaptive_avg_pool),
    aten._adaptive_avg_pool2d.default: _simple(_adaptive_avg_pool),
    aten.dropout.default: _simple(_dropout),
}


# ATen op -> (the call a symbolic trace gives, its positional args from the normalized kwargs,
# or None when the call has options that the plain call does not take)
_FunctionRule = tuple[Callable[..., Any], Callable[[dict[str, Any]], tuple[Any, ...] | None]]


def _binary(op: Callable[..., Any]) -> _FunctionRule:
    return op, lambda kw: (kw["input"], kw["other"]) if kw.get("alpha", 1) == 1 else None


_FUNCTIONS: dict[Any, _FunctionRule] = {
    aten.add.Tensor: _binary(operator.add),
    aten.sub.Tensor: _binary(operator.sub),
    aten.mul.Tensor: (operator.mul, lambda kw: (kw["input"], kw["other"])),
    aten.div.Tensor: (operator.truediv, lambda kw: (kw["input"], kw["other"])),
    aten.cat.default: (torch.cat, lambda kw: (list(kw["tensors"]), kw.get("dim", 0))),
    aten.flatten.using_ints: (torch.flatten, lambda kw: (kw["input"], kw.get("start_dim", 0), kw.get("end_dim", -1))),
    aten.view.default: (torch.reshape, lambda kw: (kw["input"], list(kw["size"]))),
    aten.reshape.default: (torch.reshape, lambda kw: (kw["input"], list(kw["shape"]))),
    aten.permute.default: (torch.permute, lambda kw: (kw["input"], list(kw["dims"]))),
    aten.transpose.int: (torch.transpose, lambda kw: (kw["input"], kw["dim0"], kw["dim1"])),
    aten.mean.dim: (torch.mean, lambda kw: (kw["input"], kw["dim"], kw.get("keepdim", False)) if kw.get("dtype") is None else None),
}


def _plain_functions(graph: torch.fx.Graph) -> None:
    """Rewrite the ATen calls in :data:`_FUNCTIONS` to the calls a symbolic trace gives (same values)."""
    for node in graph.nodes:
        rule = _FUNCTIONS.get(node.target) if node.op == "call_function" else None
        normalized = rule and normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        args = normalized and rule[1](dict(normalized.kwargs))
        if args is not None:
            node.target, node.args, node.kwargs = rule[0], args, {}


# --------------------------------------------------------------------------- naming


class _Names:
    """Dotted names that can coexist as attributes of one root module."""

    def __init__(self, taken: set[str]) -> None:
        self.taken = set(taken)

    def _free(self, name: str) -> bool:
        return name not in self.taken and not any(
            t.startswith(name + ".") or name.startswith(t + ".") for t in self.taken
        )

    def claim(self, hint: str) -> str:
        base = sanitize_name(hint) or "module"
        name, i = base, 1
        while not self._free(name):
            name, i = f"{base}_{i}", i + 1
        self.taken.add(name)
        return name


# --------------------------------------------------------------------------- driver


def _simple_inputs(codegen: Any, n_placeholders: int) -> bool:
    """Whether ``forward(*tensors)`` maps 1:1 onto the placeholders (no kwargs, no nesting)."""
    info = getattr(codegen, "pytree_info", None)
    if info is None or info.in_spec is None:
        return True
    expected = pytree.tree_structure((tuple(range(n_placeholders)), {}))
    return info.in_spec == expected


def raise_to_modules(exported: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A module-level GraphModule computing what ``exported`` (``ep.module()``) computes."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(exported.graph, {})
    codegen = exported.graph._codegen
    n_inputs = sum(1 for n in graph.nodes if n.op == "placeholder")
    if isinstance(codegen, _PyTreeCodeGen) and _simple_inputs(codegen, n_inputs):
        out_spec = codegen.pytree_info.out_spec
        flat = list(out) if isinstance(out, (tuple, list)) else [out]
        graph.output(pytree.tree_unflatten(flat, out_spec) if out_spec is not None else out)
        graph._codegen = CodeGen()
    else:
        graph.output(out)
        graph._codegen = copy.deepcopy(codegen)  # keyword or nested inputs: keep export's calling convention

    attrs = {str(n.target): get_attr(exported, str(n.target)) for n in graph.nodes if n.op == "get_attr"}
    modules: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op == "call_module":
            if str(node.target).startswith("_guards_fn") and not node.users:
                graph.erase_node(node)  # export's input-shape guard; graphopt checks shapes itself
            else:
                modules[str(node.target)] = exported.get_submodule(str(node.target))

    # replace matches; temporary names first, final names once the leftovers are known
    pending: list[tuple[torch.fx.Node, str]] = []
    shared: dict[tuple[Any, ...], str] = {}
    for node in list(graph.nodes):
        rule = _RULES.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        ctx = _Context(attrs, node)
        normalized = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
        if normalized is None:
            continue
        ctx.kw = dict(normalized.kwargs)
        match = rule(ctx)
        if match is None:
            continue
        temp = shared.get(match.share_key) if match.share_key is not None else None
        if temp is None:
            temp = f"__graphopt_raised_{len(pending)}"
            modules[temp] = match.module
            if match.share_key is not None:
                shared[match.share_key] = temp
        with graph.inserting_after(match.replaces[-1]):
            node_name = sanitize_name(match.name_hint).replace(".", "_") or "module"
            call = graph.create_node("call_module", temp, (match.input,), {}, name=node_name)
        call.meta.update((match.meta_from or node).meta)
        for value in match.replaces:
            value.replace_all_uses_with(call)
        for dead in match.dead:
            if not dead.users:
                graph.erase_node(dead)
        pending.append((call, match.name_hint))

    _plain_functions(graph)
    for node in reversed(list(graph.nodes)):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    left = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    names = _Names(left | {t for t in modules if not t.startswith("__graphopt_raised_")})
    final: dict[str, str] = {}
    for call, hint in pending:
        temp = str(call.target)
        if temp not in final:
            final[temp] = names.claim(hint)
        call.target = final[temp]

    root: dict[str, Any] = {t: attrs[t] for t in left}
    root.update({final.get(t, t): m for t, m in modules.items() if t in final or not t.startswith("__graphopt_raised_")})
    graph.lint()
    gm = torch.fx.GraphModule(root, graph, class_name="GraphModule")
    return gm.eval()
