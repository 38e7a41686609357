"""dce: remove dead nodes, then the submodules, parameters and buffers nothing uses.

A node is kept if it is impure: fx's own notion (placeholders, output, side-effectful
calls such as ``torch._assert``, modules marked impure) plus anything that writes to
its inputs — in-place methods and functions (``x.add_(y)``, ``torch.relu_``,
``operator.iadd``), ``inplace=True`` calls and modules, and mutable ATen overloads.
Removing a dead in-place op would change the tensor it wrote to.
"""

from __future__ import annotations

import operator

from torch.fx import GraphModule, Node

from graphopt import PassResult, Program, register_pass
from graphopt.program import delete_unused_submodules, name_prefixes

_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                      operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                      operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _writes_inputs(gm: GraphModule, node: Node) -> bool:
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        target = node.target
        if target in _INPLACE_OPERATORS:
            return True
        schema = getattr(target, "_schema", None)
        if schema is not None:
            return bool(schema.is_mutable)
        name = getattr(target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return getattr(gm.get_submodule(node.target), "inplace", False) is True
    return False


def is_impure(gm: GraphModule, node: Node) -> bool:
    """True if removing the node could change behaviour even when its result is unused."""
    return node.is_impure() or _writes_inputs(gm, node)


def _remove_unused_attributes(gm: GraphModule) -> int:
    """Delete parameters and buffers on the root module that no get_attr node reads."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_prefixes = {p for u in used for p in name_prefixes(u)}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        if name in used or (owner and any(p in used_modules for p in name_prefixes(owner))):
            continue
        if name in used_prefixes:  # a get_attr reads something below it
            continue
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
        else:
            continue
        removed += 1
    return removed


@register_pass("dce", contract="exact")
def dce(program: Program) -> PassResult:
    """Remove dead nodes (never impure or in-place ones), then unused submodules, parameters and buffers."""
    gm = program.graph_module
    nodes_before = len(gm.graph.nodes)
    modules_before = sum(1 for _ in gm.named_modules())
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: is_impure(gm, n))
    nodes = nodes_before - len(gm.graph.nodes)
    delete_unused_submodules(gm)
    modules = modules_before - sum(1 for _ in gm.named_modules())
    attrs = _remove_unused_attributes(gm)
    changed = bool(nodes or modules or attrs)
    detail = f"removed {nodes} nodes, {modules} submodules, {attrs} parameters/buffers"
    return PassResult(changed=changed, detail=detail, data={"nodes": nodes, "submodules": modules, "attributes": attrs})


