"""MACs and parameter counts of a Program: one function, used by the compile report,
``graphopt profile`` and the benchmarks.

MACs are multiply-accumulates of one forward pass at the example inputs' shapes, for
convolutions, linear layers and matrix products (everything else is O(elements) and
left out, as is customary). Needs ``node.meta['tensor_meta']`` (``Program.propagate_shapes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule, Node

__all__ = ["NodeCost", "node_cost", "count_macs", "count_params"]


@dataclass(frozen=True)
class NodeCost:
    macs: int
    params: int


def _shape(node: object) -> tuple[int, ...] | None:
    if not isinstance(node, Node):
        return None
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _core(module: nn.Module) -> nn.Module:
    """The conv/linear inside a fused container (ConvReLU2d is a Sequential) or inside the
    simulated-int8 wrapper ``graphopt.quant.QuantLayer`` (its ``.base``)."""
    while True:
        if isinstance(module, nn.Sequential) and len(module) > 0:
            module = module[0]
        elif type(module).__name__ == "QuantLayer" and isinstance(getattr(module, "base", None), nn.Module):
            module = module.base
        else:
            return module


def _weight_shape(module: nn.Module) -> tuple[int, ...] | None:
    w = getattr(module, "weight", None)
    if callable(w):  # quantized modules expose weight()
        try:
            w = w()
        except Exception:
            return None
    return tuple(w.shape) if isinstance(w, torch.Tensor) else None


def node_cost(gm: GraphModule, node: Node) -> NodeCost:
    out = _shape(node)
    macs = 0
    params = 0
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        params = sum(p.numel() for p in module.parameters())
        core = _core(module)
        w = _weight_shape(core)
        if out is not None and w is not None:
            if isinstance(core, nn.modules.conv._ConvNd) or "Conv" in type(core).__name__:
                # weight: [Cout, Cin/groups, *kernel]; each output element costs Cin/groups*K MACs
                macs = math.prod(out) * math.prod(w[1:])
            elif isinstance(core, nn.Linear) or "Linear" in type(core).__name__:
                macs = math.prod(out) * w[1]
    elif node.op in ("call_function", "call_method") and out is not None:
        name = getattr(node.target, "__name__", str(node.target))
        if name in ("matmul", "bmm", "mm", "__matmul__") or "matmul" in name:
            a = _shape(node.args[0] if node.op == "call_function" else node.args[0])
            if a:
                macs = math.prod(out) * a[-1]
    return NodeCost(int(macs), int(params))


def count_macs(gm: GraphModule) -> int:
    return sum(node_cost(gm, n).macs for n in gm.graph.nodes)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
