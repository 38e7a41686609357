"""depthwise-substitution: replace a dense KxK conv by a depthwise KxK conv followed by a
1x1 pointwise conv, initialised from the original weights.

For each input channel i the slice ``W[:, i]`` (``Cout x K²``) is factored by SVD,
``U S Vᵀ``; keeping the top ``r`` singular values gives the depthwise filters
``sqrt(S_k) · Vᵀ[k]`` (channel multiplier ``r``: input channel i feeds depthwise outputs
``i*r .. i*r+r-1``) and the pointwise weights ``U[:, k] · sqrt(S_k)``; the bias moves to
the pointwise conv, and a fused ReLU (``ConvReLU2d``) stays after it. With
``r = min(Cout, K²)`` the factorisation is exact.

Per layer the pass takes the smallest ``r`` whose relative weight error
``||W - W_r||_F / ||W||_F`` is at most ``max-error`` and, unless
``require-savings=false``, only if depthwise + pointwise costs fewer MACs than the
original. Left alone, and said so: grouped or 1x1 convs (not candidates), convs with
fewer than ``min-channels`` input or output channels, convs called from several places,
and layers where no ``r`` both meets the error bound and saves MACs.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Node

from graphopt import PassResult, Program, register_pass
from graphopt.cost import count_macs
from graphopt.errors import PipelineError, choices

__all__ = ["depthwise_substitution", "factorize"]

_PASS = "depthwise-substitution"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6)


def factorize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-input-channel SVD of a conv weight ``[Cout, Cin, *k]``, in float64.

    Returns ``U [Cin, Cout, q]``, ``S [Cin, q]`` (descending), ``Vh [Cin, q, K]`` with
    ``q = min(Cout, K)``, and ``errors [q + 1]``: ``errors[r]`` is the relative Frobenius
    error of keeping ``r`` components (``errors[q] == 0``). The right singular vectors come
    from the ``K x K`` Gram matrices (``eigh``): batched LAPACK SVD of the tall
    ``Cout x K`` slices is orders of magnitude slower on CPU.
    """
    cout, cin = weight.shape[:2]
    m = weight.detach().double().reshape(cout, cin, -1).permute(1, 0, 2)  # [Cin, Cout, K]
    q = min(cout, m.shape[2])
    _, vecs = torch.linalg.eigh(m.transpose(1, 2) @ m)  # ascending eigenvalues
    v = vecs.flip(-1)[:, :, :q]  # [Cin, K, q]
    us = m @ v  # [Cin, Cout, q] = U S
    s = us.norm(dim=1)  # [Cin, q]
    s, order = s.sort(dim=1, descending=True)
    v = v.gather(2, order[:, None, :].expand_as(v))
    us = us.gather(2, order[:, None, :].expand_as(us))
    u = torch.where(s[:, None, :] > 0, us / s[:, None, :].clamp(min=1e-300), torch.zeros_like(us))
    energy = s.pow(2).sum(0)  # per component, over input channels
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])  # tail[r] = sum_{k>=r}
    total = float(m.pow(2).sum())
    errors = (tail / total).sqrt() if total > 0 else torch.zeros_like(tail)
    return u, s, v.transpose(1, 2), errors


def _build(conv: nn.Module, r: int, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[nn.Module, nn.Module]:
    cin, cout, kernel = conv.in_channels, conv.out_channels, tuple(conv.kernel_size)
    kind, dtype, device = type(conv), conv.weight.dtype, conv.weight.device
    root = s[:, :r].sqrt()  # [Cin, r]: the singular values split evenly between the two convs
    dw = kind(cin, cin * r, kernel, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
              groups=cin, bias=False, padding_mode=conv.padding_mode, device=device, dtype=dtype)
    pw = kind(cin * r, cout, 1, bias=conv.bias is not None, device=device, dtype=dtype)
    dw_w = (root[:, :, None] * vh[:, :r, :]).reshape(cin * r, 1, *kernel)
    pw_w = (u[:, :, :r] * root[:, None, :]).permute(1, 0, 2).reshape(cout, cin * r, *([1] * len(kernel)))
    with torch.no_grad():
        dw.weight.copy_(dw_w.to(dtype))
        pw.weight.copy_(pw_w.to(dtype))
        if conv.bias is not None:
            pw.bias.copy_(conv.bias.detach())
    return dw, pw


def _macs(conv: nn.Module, out_shape: tuple[int, ...], r: int | None) -> int:
    """MACs of the conv (r=None) or of its depthwise+pointwise pair, as graphopt.cost counts them."""
    positions = out_shape[0] * math.prod(out_shape[2:])
    k = math.prod(conv.kernel_size)
    cin, cout = conv.in_channels, conv.out_channels
    if r is None:
        return positions * cout * cin * k
    return positions * (cin * r * k + cout * cin * r)


def _check_options(gm: GraphModule, max_error: Any, min_channels: Any, skip: Any) -> None:
    if isinstance(max_error, bool) or not isinstance(max_error, (int, float)) or not 0 <= max_error < 1:
        raise PipelineError(f"{_PASS}: option 'max-error' must be a number with 0 <= max-error < 1, got {max_error!r}")
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        raise PipelineError(f"{_PASS}: option 'min-channels' must be an integer >= 1, got {min_channels!r}")
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)):
        raise PipelineError(f"{_PASS}: option 'skip' must be a list of module names, got {skip!r}")
    modules = [n for n, _ in gm.named_modules() if n]
    for name in skip:
        if name not in modules:
            close = difflib.get_close_matches(name, modules, n=5, cutoff=0.5)
            hint = f"close names: {choices(close)}" if close else "no module has a similar name"
            raise PipelineError(f"{_PASS}: option 'skip' names unknown module {name!r}; {hint}")


def _candidate(gm: GraphModule, node: Node) -> tuple[nn.Module, list[nn.Module]] | None:
    """The dense KxK conv (and what a fused module applies after it) of a call_module node."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(str(node.target))
    parts = list(module) if isinstance(module, nn.Sequential) else [module]
    if not parts or type(parts[0]) not in _CONVS:
        return None
    conv = parts[0]
    if conv.groups != 1 or math.prod(conv.kernel_size) <= 1:
        return None
    return conv, parts[1:]


def _why_not(gm: GraphModule, node: Node, conv: nn.Module, rest: list[nn.Module], min_channels: int,
             skip: list[str], sites: dict[str, int]) -> str:
    name = str(node.target)
    if any(name == k or name.startswith(k + ".") for k in skip):
        return "named in skip"
    if conv.in_channels < min_channels or conv.out_channels < min_channels:
        return f"fewer than {min_channels} channels"
    if sites.get(name, 0) != 1:
        return f"called from {sites.get(name, 0)} places"
    if any(type(p) not in _ACTIVATIONS for p in rest):
        return f"fused with {', '.join(type(p).__name__ for p in rest)}"
    if len(node.args) != 1 or node.kwargs or "tensor_meta" not in node.meta:
        return "unexpected call"
    return ""


@register_pass("depthwise-substitution", contract="approximate")
def depthwise_substitution(
    program: Program,
    *,
    max_error: float = 0.0,
    require_savings: bool = True,
    min_channels: int = 8,
    skip: list[str] = [],  # noqa: B006 (never mutated; the option's default)
) -> PassResult:
    """Replace dense KxK convs by depthwise KxK + pointwise 1x1 convs (per-input-channel SVD)."""
    gm = program.graph_module
    _check_options(gm, max_error, min_channels, skip)
    program.propagate_shapes()
    macs_before = count_macs(gm)
    sites: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            sites[str(n.target)] = sites.get(str(n.target), 0) + 1
        elif n.op == "get_attr":  # a parameter read directly also pins its module
            owner = str(n.target).rpartition(".")[0]
            sites[owner] = sites.get(owner, 0) + 1
    layers: list[dict[str, Any]] = []
    for node in list(gm.graph.nodes):
        found = _candidate(gm, node)
        if found is None:
            continue
        conv, rest = found
        name = str(node.target)
        entry: dict[str, Any] = {"name": name, "status": "skipped"}
        layers.append(entry)
        reason = _why_not(gm, node, conv, rest, min_channels, list(skip), sites)
        if reason:
            entry["reason"] = reason
            continue
        u, s, vh, errors = factorize(conv.weight)
        q = s.shape[1]
        out_shape = tuple(node.meta["tensor_meta"].shape)
        r = next(k for k in range(1, q + 1) if float(errors[k]) <= max_error + 1e-12)
        before, after = _macs(conv, out_shape, None), _macs(conv, out_shape, r)
        entry.update(r=r, max_r=q, weight_error=float(errors[r]), macs_before=before, macs_after=after)
        if require_savings and after >= before:
            entry["reason"] = f"no r saves MACs at max-error {max_error:g} (needs r={r} of {q})"
            continue
        dw, pw = _build(conv, r, u, s, vh)
        if rest:
            pw = type(gm.get_submodule(name))(pw, *rest)
        dw_name, pw_name = f"{name}_dw", f"{name}_pw"
        gm.add_submodule(dw_name, dw)
        gm.add_submodule(pw_name, pw)
        with gm.graph.inserting_before(node):
            dw_node = gm.graph.call_module(dw_name, node.args)
            pw_node = gm.graph.call_module(pw_name, (dw_node,))
        node.replace_all_uses_with(pw_node)
        gm.graph.erase_node(node)
        gm.delete_submodule(name)
        entry["status"] = "substituted"
    done = [e for e in layers if e["status"] == "substituted"]
    if done:
        program.recompile()
        program.propagate_shapes()
    macs_after = count_macs(gm)
    change = (macs_after - macs_before) / macs_before * 100 if macs_before else 0.0
    detail = f"substituted {len(done)} of {len(layers)} convs, MACs {change:+.0f}%"
    if done:
        worst = max(e["weight_error"] for e in done)
        detail += f", worst weight error {worst:.3g}"
    skipped = [e for e in layers if e["status"] == "skipped"]
    if skipped:
        reasons: dict[str, int] = {}
        for e in skipped:
            key = e["reason"].split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
        detail += "; skipped: " + ", ".join(f"{n} {why}" for why, n in reasons.items())
    return PassResult(changed=bool(done), detail=detail,
                      data={"layers": layers, "macs_before": macs_before, "macs_after": macs_after})
