"""fuse-conv-bn-relu: fold eval-mode BatchNorm into the preceding Conv/Linear, then
absorb a following ReLU into a fused module (``torch.ao.nn.intrinsic.ConvReLU2d`` and
friends) that int8 lowerings map to fused kernels.

Folding (per output channel c, s = γ / sqrt(σ² + ε)):  W'[c] = W[c]·s,  b'[c] = (b[c] − μ)·s + β.
Computed in float64, stored in the weight's dtype.

Left alone, and said so in the detail: BatchNorm in training mode or without running
statistics, a conv whose output has other users than the BatchNorm, a conv module
called from more than one place (its weights are shared), and Linear followed by a
BatchNorm over anything but ``[N, C]``.
"""

from __future__ import annotations

import copy

import torch
import torch.ao.nn.intrinsic as nni
from torch import nn
from torch.fx import GraphModule, Node

from graphopt import PassResult, Program, register_pass
from graphopt.fx_util import is_relu, module_of, set_module
from graphopt.program import delete_unused_submodules

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FUSED = {nn.Conv1d: nni.ConvReLU1d, nn.Conv2d: nni.ConvReLU2d, nn.Conv3d: nni.ConvReLU3d, nn.Linear: nni.LinearReLU}


def _call_sites(gm: GraphModule) -> dict[str, int]:
    sites: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites[n.target] = sites.get(n.target, 0) + 1
    return sites



def fold_bn(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """A copy of ``layer`` (Conv or Linear) with ``bn`` folded into its weight and bias."""
    fused = copy.deepcopy(layer)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    mean = bn.running_mean.double()
    var = bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    shape = (-1,) + (1,) * (w.dim() - 1)
    fused.weight = nn.Parameter((w * scale.reshape(shape)).to(layer.weight.dtype))
    fused.bias = nn.Parameter(((b - mean) * scale + beta).to(layer.weight.dtype))
    return fused


def _why_not_fold(gm: GraphModule, bn_node: Node, sites: dict[str, int]) -> str:
    """Why the BatchNorm cannot be folded into its producer; empty if it can."""
    bn = gm.get_submodule(bn_node.target)
    if bn.training:
        return "in training mode"
    if bn.running_mean is None or bn.running_var is None:
        return "has no running statistics"
    producer = bn_node.args[0] if bn_node.args else None
    layer = module_of(gm, producer) if isinstance(producer, Node) else None
    if type(layer) not in (*_CONVS, nn.Linear):
        return "its input is not a conv or linear layer"
    if len(producer.users) != 1:
        return f"the output of '{producer.target}' has {len(producer.users)} users"
    if sites[producer.target] != 1:
        return f"'{producer.target}' is called from {sites[producer.target]} places"
    if isinstance(layer, nn.Linear):
        meta = producer.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 2:
            return "linear output is not [N, C]"
    if layer.weight.shape[0] != bn.num_features:
        return "channel counts differ"
    return ""


@register_pass("fuse-conv-bn-relu", contract="exact")
def fuse_conv_bn_relu(program: Program) -> PassResult:
    """Fold eval-mode BatchNorm into the preceding Conv/Linear; absorb a following ReLU."""
    gm = program.graph_module
    sites = _call_sites(gm)
    folded, fused = 0, 0
    left: list[str] = []

    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), _BNS):
            continue
        reason = _why_not_fold(gm, node, sites)
        if reason:
            left.append(f"{node.target} ({reason})")
            continue
        producer = node.args[0]
        set_module(gm, producer.target, fold_bn(gm.get_submodule(producer.target), gm.get_submodule(node.target)))
        node.replace_all_uses_with(producer)
        gm.graph.erase_node(node)
        folded += 1

    for node in list(gm.graph.nodes):
        layer = module_of(gm, node)
        if type(layer) not in _FUSED or sites.get(node.target, 0) != 1 or len(node.users) != 1:
            continue
        (user,) = node.users
        if not is_relu(gm, user) or user.args[0] is not node:
            continue
        set_module(gm, node.target, _FUSED[type(layer)](layer, nn.ReLU()))
        user.replace_all_uses_with(node)
        gm.graph.erase_node(user)
        fused += 1

    if folded:
        delete_unused_submodules(gm)
    detail = f"{folded} BatchNorm folded, {fused} ReLU absorbed"
    if left:
        shown = ", ".join(left[:5]) + (f", … {len(left) - 5} more" if len(left) > 5 else "")
        detail += f"; left {len(left)}: {shown}"
    return PassResult(changed=folded + fused > 0, detail=detail, data={"folded": folded, "relu_absorbed": fused, "left": left})


