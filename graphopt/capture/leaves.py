"""Leaf functions at capture: user functions that ``torch.fx`` kept as ``call_function`` nodes.

``torch.fx.wrap("fn")`` (torchvision's ``stochastic_depth``, timm's ``drop_path``) makes the
tracer record a call to ``fn`` instead of its body. No backend can save or lower such a
call, so capture resolves every one of them, up front:

1. **Removed**: a function whose name says it is a regularizer that is the identity in eval
   mode (``stochastic_depth``, ``drop_path``, ``dropout``/``drop_block`` variants: the name
   contains ``drop`` or ``stochastic_depth``) *and* whose output equals its first tensor
   argument, bit for bit, on the example inputs. Both must hold: the name alone would trust a
   misnamed function, the value check alone could match a function that only happens to be the
   identity on these inputs.
2. **Lowered**: any other leaf function whose body ``symbolic_trace`` can trace into torch ops
   (with the node's constant arguments) is inlined in its place; the inlined graph must give the
   same outputs as the call on the example inputs.
3. **Refused**: otherwise a :class:`CaptureError` naming the function and the node.

A function counts as a leaf unless it comes from ``torch``, ``operator``, ``builtins`` or ``math``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Callable

import torch
import torch.fx
from torch.fx import GraphModule, Node

from graphopt.errors import CaptureError
from graphopt.fx_util import describe
from graphopt.program import flatten_outputs

__all__ = ["is_leaf_function", "resolve_leaf_functions"]

_LIBRARY_MODULES = re.compile(r"^(torch|_operator|operator|builtins|math|_?functools)(\.|$)")
_EVAL_IDENTITY_NAMES = re.compile(r"drop|stochastic_depth", re.IGNORECASE)


def is_leaf_function(node: Node) -> bool:
    """A ``call_function`` to something outside torch, operator, builtins and math."""
    if node.op != "call_function":
        return False
    module = getattr(node.target, "__module__", None) or ""
    return not _LIBRARY_MODULES.match(module)


def _name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"


def _trace_body(fn: Callable[..., Any], node: Node, sources: list[Node]) -> torch.fx.Graph:
    """The graph of ``fn``'s body called with ``node``'s constant arguments, one placeholder per source node."""
    tracer = torch.fx.Tracer()
    tracer.root, tracer.graph, tracer.tensor_attrs = torch.nn.Module(), torch.fx.Graph(), {}
    proxies = {n: tracer.create_proxy("placeholder", f"x{i}", (), {}) for i, n in enumerate(sources)}
    out = fn(*torch.fx.node.map_arg(node.args, proxies.__getitem__), **torch.fx.node.map_arg(node.kwargs, proxies.__getitem__))
    tracer.create_node("output", "output", (tracer.create_arg(out),), {})
    return tracer.graph


def _values(gm: GraphModule, inputs: Sequence[torch.Tensor]) -> dict[Node, Any]:
    interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
    with torch.no_grad():
        interp.run(*(t.clone() for t in inputs))
    return interp.env


def _outputs(gm: GraphModule, values: dict[Node, Any]) -> list[torch.Tensor]:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    return flatten_outputs(torch.fx.node.map_arg(output.args[0], values.__getitem__))


def _first_tensor_arg(node: Node, values: dict[Node, Any]) -> Node | None:
    return next((a for a in node.args if isinstance(a, Node) and isinstance(values.get(a), torch.Tensor)), None)


def _is_eval_identity(node: Node, values: dict[Node, Any]) -> Node | None:
    """The argument node the call returns unchanged, when rule 1 applies."""
    if not _EVAL_IDENTITY_NAMES.search(getattr(node.target, "__name__", "")):
        return None
    arg = _first_tensor_arg(node, values)
    out = values.get(node)
    if arg is None or not isinstance(out, torch.Tensor):
        return None
    src = values[arg]
    same = out.shape == src.shape and out.dtype == src.dtype and torch.equal(out, src)
    return arg if same else None


def _lower(gm: GraphModule, node: Node, label: str) -> None:
    """Inline the traced body of ``node``'s function, or a CaptureError saying why it cannot be."""
    sources: list[Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: sources.append(n) if n not in sources else None)
    fn = node.target
    what = f"{label}: the leaf function {_name(fn)} ({describe(gm, node, brief=True)})"
    try:
        body = _trace_body(fn, node, sources)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means it cannot be lowered
        raise CaptureError(f"{what} cannot be traced into torch ops ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                           "graphopt lowers only torch ops: make it traceable, or drop torch.fx.wrap on it") from None
    inner = [n for n in body.nodes if is_leaf_function(n) or n.op in ("call_module", "get_attr")]
    if inner:
        raise CaptureError(f"{what} calls {inner[0].target!r}, which graphopt cannot lower; "
                           "graphopt lowers only torch ops: make it traceable, or drop torch.fx.wrap on it")
    placeholders = [n for n in body.nodes if n.op == "placeholder"]
    with gm.graph.inserting_before(node):
        out = gm.graph.graph_copy(body, dict(zip(placeholders, sources)))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)


def resolve_leaf_functions(gm: GraphModule, inputs: Sequence[torch.Tensor], label: str) -> list[str]:
    """Remove, lower or refuse every leaf function call of ``gm`` (see the module doc), in place.

    Returns one line per call resolved (for the capture's meta); ``gm`` is recompiled.
    """
    leaves = [n for n in gm.graph.nodes if is_leaf_function(n)]
    if not leaves:
        return []
    try:
        values = _values(gm, inputs)
    except Exception:  # noqa: BLE001 - finish() runs the graph next and names the node that fails
        return []
    before = _outputs(gm, values)
    done = []
    for node in leaves:
        fn_name, where = _name(node.target), node.name
        arg = _is_eval_identity(node, values)
        if arg is not None:
            node.replace_all_uses_with(arg)
            gm.graph.erase_node(node)
            done.append(f"removed {fn_name} at node '{where}' (the identity in eval mode)")
        else:
            _lower(gm, node, label)
            done.append(f"lowered {fn_name} at node '{where}' (its body traced into torch ops)")
    gm.graph.lint()
    gm.recompile()
    after = _outputs(gm, _values(gm, inputs))
    if len(after) != len(before) or not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(after, before)):
        raise CaptureError(f"{label}: resolving the leaf functions ({'; '.join(done)}) changed the outputs on the example "
                           "inputs; graphopt cannot lower them")
    return done
