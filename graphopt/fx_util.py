"""Small torch.fx helpers that passes, quantization and backends share: written once, here.

Only what fx itself does not offer (``Graph.inserting_before``, ``replace_all_uses_with``,
``GraphModule.get_submodule`` and ``eliminate_dead_code`` are used directly).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.data import fresh

__all__ = ["ADD_OPS", "MUL_OPS", "CAT_OPS", "RELU_FUNCTIONS", "get_attr", "module_of", "set_module", "is_relu",
           "describe", "run_all"]

#: The call_function targets tracing produces for an addition, a multiplication, a concatenation, a ReLU.
ADD_OPS = frozenset({operator.add, operator.iadd, torch.add})
MUL_OPS = frozenset({operator.mul, operator.imul, torch.mul})
CAT_OPS = frozenset({torch.cat, torch.concat, torch.concatenate})
RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_})


def get_attr(root: nn.Module, target: str) -> Any:
    """What a ``get_attr`` node (or any dotted path) names under ``root``: ``'layer1.0.weight'``."""
    return operator.attrgetter(target)(root) if target else root


def module_of(gm: GraphModule, node: Node) -> nn.Module | None:
    """The module a ``call_module`` node calls; None for any other node."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def set_module(gm: GraphModule, target: str, module: nn.Module) -> None:
    """Install ``module`` at the dotted path ``target`` (replacing what was there)."""
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def is_relu(gm: GraphModule, node: Node) -> bool:
    """A ReLU of one tensor in any form tracing produces (module, function, method)."""
    m = module_of(gm, node)
    if m is not None:
        return type(m) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS and len(node.args) == 1
    return node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1


def describe(gm: GraphModule, node: Node, *, brief: bool = False) -> str:
    """How errors name a node.

    ``node 'x' (module 'layer1.conv' (torch.nn.modules.conv.Conv2d)) at <the user's source line>``;
    ``brief``: ``node 'x' (Conv2d)`` (the op alone, no source line).
    """
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        what = type(m).__name__ if brief else f"module '{node.target}' ({type(m).__module__}.{type(m).__qualname__})"
    elif node.op == "call_function":
        module = getattr(node.target, "__module__", None)
        name = getattr(node.target, "__name__", None) or repr(node.target)
        if isinstance(node.target, torch._ops.OpOverload):
            what = str(node.target)
        else:
            what = name if brief else f"call to {module + '.' if module else ''}{name}"
    elif node.op == "call_method":
        what = f".{node.target}()" if brief else f"method '.{node.target}()'"
    else:
        what = node.op
    lines = [] if brief else (node.stack_trace or "").strip().splitlines()
    where = f" at {lines[-2].strip()}" if len(lines) >= 2 else ""
    return f"node '{node.name}' ({what}){where}"


def run_all(fn: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]) -> list[Any]:
    """``fn`` on every sample, without autograd, each run on fresh copies (a model that writes into its input changes nothing)."""
    with torch.inference_mode():
        return [fn(*fresh(s)) for s in samples]
