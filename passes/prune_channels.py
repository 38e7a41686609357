"""prune-channels: structured channel pruning over dependency groups.

Channels that must go together (a conv's filters, its BatchNorm, the consumers' input
channels, both sides of a residual add, the members of a concat, a depthwise conv's
channel, the Linear features a flattened channel becomes, a squeeze-excite gate, a
channels-last LayerNorm and Linear after a ``permute``, a layer scale...) are found by
:mod:`graphopt.passes._channel_groups`. In every group the lowest-importance units are
removed; weights, BatchNorm statistics, LayerNorm affines and layer scales are sliced;
``chunk``/``split``/slices are rewritten to the new sizes, and a channel shuffle whose
channels were pruned becomes an ``index_select`` with the equivalent permutation. A
LayerNorm over the channels then normalizes over the kept ones (an approximation, as
pruning is).

A group is left alone, and said so, when an op the analysis does not understand touches
its channels; graph inputs and outputs (the classifier's logits) are never pruned.

``ratio`` is a fraction, or a mapping from module names to fractions; in a mapping a
name also covers the modules below it, and ``*`` sets the ratio of every other group
(without it, groups no name covers are not pruned). A group whose producing layers get
different ratios uses the smallest.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from torch.fx import GraphModule, Node

from graphopt import PassResult, Program, register_pass
from graphopt.cost import count_macs
from graphopt.errors import PipelineError, choices
from graphopt.passes._channel_groups import _BNS, ChannelAnalysis, ChannelGroup, _Tuple, analyze, module_parts
from graphopt.passes.dce import is_impure

__all__ = ["prune_channels", "prune_channels_by_index", "analyze_program"]

Importance = Literal["l1", "l2", "bn-gamma"]
_PASS = "prune-channels"


# --------------------------------------------------------------------------- options


def _check_names(option: str, names: Sequence[str], modules: list[str]) -> None:
    known = set(modules)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, modules, n=5, cutoff=0.5)
            hint = f"close names: {choices(close)}" if close else "no module has a similar name"
            raise PipelineError(f"{_PASS}: option '{option}' names unknown module {name!r}; {hint}")


def _check_options(gm: GraphModule, ratio: Any, importance: str, round_to: int, min_channels: int, skip: Any) -> None:
    ratios = ratio.items() if isinstance(ratio, Mapping) else [("", ratio)]
    for key, r in ratios:
        what = f"ratio for {key!r}" if key else "ratio"
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise PipelineError(f"{_PASS}: option '{what}' must be a number with 0 <= ratio < 1, got {r!r}")
    if importance not in ("l1", "l2", "bn-gamma"):
        raise PipelineError(f"{_PASS}: option 'importance' must be one of {choices(['l1', 'l2', 'bn-gamma'])}, got {importance!r}")
    for option, value in (("round-to", round_to), ("min-channels", min_channels)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PipelineError(f"{_PASS}: option '{option}' must be an integer >= 1, got {value!r}")
    if isinstance(skip, str) or not isinstance(skip, Sequence):
        raise PipelineError(f"{_PASS}: option 'skip' must be a list of module names, got {skip!r}")
    modules = [n for n, _ in gm.named_modules() if n]
    _check_names("skip", list(skip), modules)
    if isinstance(ratio, Mapping):
        _check_names("ratio", [k for k in ratio if k != "*"], modules)


def _covers(key: str, name: str) -> bool:
    return name == key or name.startswith(key + ".")


def _members(group: ChannelGroup) -> list[str]:
    return list(group.producers) + sorted({bn for per_unit in group.norms for bn in per_unit})


def _ratio_of(group: ChannelGroup, ratio: float | Mapping[str, float]) -> float:
    if not isinstance(ratio, Mapping):
        return float(ratio)
    hits = [r for key, r in ratio.items() if key != "*" and any(_covers(key, m) for m in _members(group))]
    return float(min(hits)) if hits else float(ratio.get("*", 0.0))


# --------------------------------------------------------------------------- importance


def _importance(gm: GraphModule, group: ChannelGroup, importance: str) -> tuple[np.ndarray, str]:
    """Score per unit (higher = more important) and the criterion actually used."""
    bns = {n for per_unit in group.norms for n in per_unit if isinstance(gm.get_submodule(n), _BNS)}
    if importance == "bn-gamma" and bns:
        scores = np.zeros(group.size)
        for u, per_bn in enumerate(group.norms):
            for bn_name, channels in per_bn.items():
                if bn_name not in bns:
                    continue  # a LayerNorm's gain says nothing about its channel alone
                bn = gm.get_submodule(bn_name)
                gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(bn.num_features)
                scores[u] += float(gamma[list(channels)].sum())
        return scores, "bn-gamma"
    criterion = "l2" if importance == "l2" else "l1"
    scores = np.zeros(group.size)
    for producer in group.producers:
        core = module_parts(gm.get_submodule(producer))[0]
        w = core.weight.detach().double().flatten(1)
        norms = w.abs().sum(1) if criterion == "l1" else w.pow(2).sum(1).sqrt()
        for u, per_layer in enumerate(group.outputs):
            scores[u] += float(norms[list(per_layer.get(producer, ()))].sum())
    return scores, criterion


# --------------------------------------------------------------------------- rewriting


def _mask(keep: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(keep, dtype=bool))


def _param(old: torch.Tensor, new: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(new.detach().clone(), requires_grad=old.requires_grad)


def _slice_layer(core: nn.Module, keep_in: np.ndarray, keep_out: np.ndarray) -> None:
    w = core.weight.detach()
    if isinstance(core, nn.Linear):
        core.weight = _param(core.weight, w[_mask(keep_out)][:, _mask(keep_in)])
        core.in_features, core.out_features = int(keep_in.sum()), int(keep_out.sum())
    else:
        g, cin, cout = core.groups, core.in_channels, core.out_channels
        cpg, opg = cin // g, cout // g
        if g == 1:
            w, groups = w[_mask(keep_out)][:, _mask(keep_in)], 1
        elif cpg == 1:  # depthwise(-like): whole groups go
            if not np.array_equal(keep_out, np.repeat(keep_in, opg)):
                raise RuntimeError("depthwise conv: output channels not pruned with their input channel")
            w, groups = w[_mask(keep_out)], int(keep_in.sum())
        else:  # grouped: the same local channels go in every group
            local_in, local_out = keep_in[:cpg], keep_out[:opg]
            if not (np.array_equal(keep_in, np.tile(local_in, g)) and np.array_equal(keep_out, np.tile(local_out, g))):
                raise RuntimeError("grouped conv: groups pruned unevenly")
            w, groups = w[_mask(keep_out)][:, _mask(local_in)], g
        core.weight = _param(core.weight, w)
        core.in_channels, core.out_channels, core.groups = int(keep_in.sum()), int(keep_out.sum()), groups
    if core.bias is not None:
        core.bias = _param(core.bias, core.bias.detach()[_mask(keep_out)])


def _slice_norm(bn: nn.Module, keep: np.ndarray) -> None:
    m = _mask(keep)
    for attr in ("weight", "bias"):
        p = getattr(bn, attr)
        if p is not None:
            setattr(bn, attr, _param(p, p.detach()[m]))
    if not isinstance(bn, _BNS):  # a LayerNorm over the channels alone: it normalizes over the kept ones
        if isinstance(bn, nn.LayerNorm):
            bn.normalized_shape = (int(keep.sum()),)
        return
    for attr in ("running_mean", "running_var"):
        b = getattr(bn, attr)
        if b is not None:
            setattr(bn, attr, b[m].clone())
    bn.num_features = int(keep.sum())


def _slice_attr(gm: GraphModule, name: str, dim: int, keep: np.ndarray) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    value = getattr(owner, attr)
    index = torch.from_numpy(np.nonzero(keep)[0])
    new = value.detach().index_select(dim, index).clone()
    if isinstance(value, nn.Parameter):
        setattr(owner, attr, _param(value, new))
    elif attr in owner._buffers:
        owner._buffers[attr] = new
    else:
        setattr(owner, attr, new)


def _erase_dead(gm: GraphModule, candidates: list[Any]) -> None:
    """Erase nodes among ``candidates`` (and their inputs) left without users."""
    todo = [c for c in candidates if isinstance(c, Node)]
    while todo:
        node = todo.pop()
        if getattr(node, "_erased", False) or node.users or node.op in ("placeholder", "output") or is_impure(gm, node):
            continue
        inputs = list(node.all_input_nodes)
        gm.graph.erase_node(node)
        todo += inputs


def _rewrite_nodes(gm: GraphModule, analysis: ChannelAnalysis, pruned: np.ndarray) -> None:
    graph = gm.graph
    for use in analysis.splits:
        old = [len(p) for p in use.pieces]
        new = [int(analysis.keep(p, pruned).sum()) for p in use.pieces]
        if new == old:
            continue
        with graph.inserting_after(use.node):
            split = graph.call_method("split", (use.node.args[0], new), {"dim": 1})
        use.node.replace_all_uses_with(split)
        graph.erase_node(use.node)
    for use in analysis.slices:
        keep = analysis.keep(use.source, pruned)
        start, stop = int(keep[: use.start].sum()), int(keep[: use.stop].sum())
        src, index = use.node.args
        parts = list(index)
        parts[1] = slice(start, stop)
        use.node.args = (src, tuple(parts))
    for node, ids in analysis.norm_calls:  # F.layer_norm(x, (C,), ...): the new C
        kept = (int(analysis.keep(ids, pruned).sum()),)
        if len(node.args) > 1:
            node.args = (node.args[0], kept, *node.args[2:])
        else:
            node.kwargs = {**node.kwargs, "normalized_shape": kept}
    for use in analysis.selects:
        keep_in = analysis.keep(use.in_ids, pruned)
        if keep_in.all():
            continue
        position = np.cumsum(keep_in) - 1
        index = torch.from_numpy(position[use.index[keep_in[use.index]]].astype(np.int64))
        owner_name, _, attr = use.attr.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        if attr in owner._buffers:
            owner._buffers[attr] = index
        else:
            setattr(owner, attr, index)
    for k, use in enumerate(analysis.shuffles):
        keep_in = analysis.keep(use.in_ids, pruned)
        if keep_in.all():
            continue
        position = np.cumsum(keep_in) - 1
        keep_out = keep_in[use.perm]
        index = torch.from_numpy(position[use.perm[keep_out]].astype(np.int64))
        name = f"_pruned_shuffle_{k}"
        while hasattr(gm, name):
            name += "_"
        gm.register_buffer(name, index)
        with graph.inserting_before(use.last):
            attr = graph.get_attr(name)
            select = graph.call_function(torch.index_select, (use.first.args[0], 1, attr))
        use.last.replace_all_uses_with(select)
        args = [a for n in use.nodes for a in n.all_input_nodes]
        for n in reversed(use.nodes):
            graph.erase_node(n)
        _erase_dead(gm, args)


def _check_shapes(program: Program) -> None:
    """Every conv/linear/BatchNorm agrees with the shapes of its input and output."""
    gm = program.graph_module
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(str(node.target))
        meta_in = node.args[0].meta.get("tensor_meta") if node.args and isinstance(node.args[0], Node) else None
        meta_out = node.meta.get("tensor_meta")
        if meta_in is None or meta_out is None or not hasattr(meta_in, "shape"):
            continue
        cin, cout = meta_in.shape[1], meta_out.shape[1]
        parts = module_parts(module)
        if parts is not None:
            core = parts[0]
            want = (core.in_features, core.out_features) if isinstance(core, nn.Linear) else (core.in_channels, core.out_channels)
            if isinstance(core, nn.Linear):
                cin, cout = meta_in.shape[-1], meta_out.shape[-1]
            if (cin, cout) != want or core.weight.shape[0] != want[1]:
                raise RuntimeError(f"{_PASS} left node '{node.name}' inconsistent: {want} vs input/output {(cin, cout)}")
        elif isinstance(module, _BNS) and (cin != module.num_features or module.running_mean is not None and len(module.running_mean) != cin):
            raise RuntimeError(f"{_PASS} left node '{node.name}' inconsistent: {module.num_features} features, input has {cin}")
        elif isinstance(module, nn.LayerNorm) and module.weight is not None and module.weight.shape != module.normalized_shape:
            raise RuntimeError(f"{_PASS} left node '{node.name}' inconsistent: weight {tuple(module.weight.shape)}, "
                               f"normalized shape {module.normalized_shape}")


def _emptied(analysis: ChannelAnalysis, pruned: np.ndarray) -> tuple[str, set[int]] | None:
    """A tensor that would lose every channel: its name and its units."""
    for node, value in analysis.values.items():
        items = value.items if isinstance(value, _Tuple) else [value]
        for ids in items:
            if isinstance(ids, np.ndarray) and len(ids) and not analysis.keep(ids, pruned).any():
                return node.name, set(analysis.roots[ids].tolist())
    return None


def _apply(program: Program, analysis: ChannelAnalysis, pruned: np.ndarray) -> None:
    gm = program.graph_module
    for layer in analysis.layers.values():
        keep_in, keep_out = analysis.keep(layer.in_ids, pruned), analysis.keep(layer.out_ids, pruned)
        if not (keep_in.all() and keep_out.all()):
            _slice_layer(layer.core, keep_in, keep_out)
    for name, ids in analysis.norms.items():
        keep = analysis.keep(ids, pruned)
        if not keep.all():
            _slice_norm(gm.get_submodule(name), keep)
    for name, (dim, ids) in analysis.attrs.items():
        keep = analysis.keep(ids, pruned)
        if not keep.all():
            _slice_attr(gm, name, dim, keep)
    _rewrite_nodes(gm, analysis, pruned)
    program.recompile()
    program.propagate_shapes()
    _check_shapes(program)


# --------------------------------------------------------------------------- reporting


def _macs_text(macs: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if macs >= scale:
            return f"{macs / scale:.3g}{unit}"
    return str(macs)


def _run(program: Program, analysis: ChannelAnalysis, plan: dict[str, list[int]], info: dict[str, dict[str, Any]],
         macs_before: int, extra: dict[str, Any]) -> PassResult:
    """Remove the planned units (group name -> unit positions) and report."""
    by_name = {g.name: g for g in analysis.groups}
    while True:
        pruned = np.array(sorted(by_name[n].units[u] for n, units in plan.items() for u in units), dtype=np.int64)
        empty = _emptied(analysis, pruned)
        if empty is None:
            break
        node_name, roots = empty
        for n in [n for n, units in plan.items() if roots & {by_name[n].units[u] for u in units}]:
            del plan[n]
            info[n].update(status="left", reason=f"would remove every channel of node '{node_name}'", pruned=0)
    if len(pruned):
        backup = copy.deepcopy(program.graph_module)
        try:
            _apply(program, analysis, pruned)
        except Exception:
            program.graph_module = backup  # a failed rewrite never leaves a broken graph
            raise
    macs_after = count_macs(program.graph_module)
    total = sum(g["channels"] for g in info.values())
    removed = sum(g["pruned"] for g in info.values())
    n_groups = sum(1 for g in info.values() if g["pruned"])
    left = [(n, g["reason"]) for n, g in info.items() if g["status"] == "left"]
    change = (macs_after - macs_before) / macs_before * 100 if macs_before else 0.0
    detail = (f"pruned {removed} of {total} channels in {n_groups} groups; "
              f"MACs {_macs_text(macs_before)} -> {_macs_text(macs_after)} ({change:+.0f}%)")
    if left:
        shown = ", ".join(f"{n} ({why})" for n, why in left[:4]) + (f", … {len(left) - 4} more" if len(left) > 4 else "")
        detail += f"; left {len(left)} groups: {shown}"
    data = {"groups": list(info.values()), "channels_total": total, "channels_pruned": removed,
            "groups_pruned": n_groups, "macs_before": macs_before, "macs_after": macs_after, **extra}
    return PassResult(changed=bool(len(pruned)), detail=detail, data=data)


def _group_info(group: ChannelGroup) -> dict[str, Any]:
    width = group.unit_width(group.producers[0])
    status = "protected" if group.blocked.startswith("protected") else ("left" if group.blocked else "unchanged")
    return {"name": group.name, "producers": list(group.producers), "channels": group.size * width, "pruned": 0,
            "kept": group.size * width, "status": status, "reason": group.blocked}


def analyze_program(program: Program) -> ChannelAnalysis:
    """The channel groups of ``program`` (shapes are propagated first)."""
    program.propagate_shapes()
    return analyze(program.graph_module)


def _kept_counts(groups: list[ChannelGroup], ratios: dict[str, float], round_to: int,
                 min_channels: int) -> tuple[dict[str, int], list[str]]:
    """Units to keep per group: ``ratio`` per group, then every pruned layer's output count is
    moved to the nearest multiple of ``round_to`` (at least ``min_channels``).

    A layer's outputs may span several groups (ShuffleNet splits a conv's channels between
    the branch and the pass-through half): layers touching the most groups are settled
    first, each adjusting only groups no earlier layer has settled. Returns the counts and
    the layers whose count could not be rounded.
    """
    keep = {g.name: g.size for g in groups}
    for g in groups:
        if g.name in ratios:
            keep[g.name] = min(g.size, max(1, g.size - math.floor(ratios[g.name] * g.size + 0.5)))
    layers: dict[str, list[tuple[ChannelGroup, int]]] = {}
    for g in groups:
        for p in g.producers:
            layers.setdefault(p, []).append((g, g.unit_width(p)))
    free = set(ratios)
    unrounded: list[str] = []
    for layer in sorted(layers, key=lambda p: -sum(g.name in free for g, _ in layers[p])):
        parts = layers[layer]
        total = sum(keep[g.name] * w for g, w in parts)
        full = sum(g.size * w for g, w in parts)
        adjustable = [(g, w) for g, w in parts if g.name in free]
        names = {g.name for g, _ in adjustable}
        free -= names
        if total == full:
            continue
        fixed = sum(keep[g.name] * w for g, w in parts if g.name not in names)
        low = fixed + sum(w for _, w in adjustable)  # adjustable groups keep at least one unit
        lowest = max(low, min_channels)
        targets = list(range(-(-lowest // round_to) * round_to, full + 1, round_to))
        if adjustable and not targets:  # too narrow for min-channels/round-to: leave it whole
            for g, _ in adjustable:
                keep[g.name] = g.size
            total = sum(keep[g.name] * w for g, w in parts)
        if not adjustable or not targets:
            if total != full and (total % round_to or total < min_channels):
                unrounded.append(layer)
            continue
        delta = min(targets, key=lambda m: (abs(m - total), -m)) - total
        adjustable.sort(key=lambda gw: -gw[0].size)
        moved = True
        while delta and moved:
            moved = False
            for g, w in adjustable:
                step = w if delta > 0 else -w
                if abs(step) <= abs(delta) and 1 <= keep[g.name] + (1 if delta > 0 else -1) <= g.size:
                    keep[g.name] += 1 if delta > 0 else -1
                    delta -= step
                    moved = True
                    if not delta:
                        break
        if delta:
            unrounded.append(layer)
    return keep, unrounded


# --------------------------------------------------------------------------- the passes


@register_pass("prune-channels", contract="approximate")
def prune_channels(
    program: Program,
    *,
    ratio: float | dict[str, float] = 0.3,
    importance: Importance = "l1",
    round_to: int = 1,
    min_channels: int = 1,
    skip: list[str] = [],  # noqa: B006 (never mutated; the option's default)
) -> PassResult:
    """Remove the least important channels of every dependency group (a fraction `ratio`)."""
    gm = program.graph_module
    _check_options(gm, ratio, importance, round_to, min_channels, skip)
    analysis = analyze_program(program)
    macs_before = count_macs(gm)
    info = {g.name: _group_info(g) for g in analysis.groups}
    ratios: dict[str, float] = {}
    for group in analysis.groups:
        if group.blocked:
            continue
        if any(_covers(key, m) for key in skip for m in _members(group)):
            info[group.name].update(status="skipped", reason="named in skip")
            continue
        ratios[group.name] = info[group.name]["ratio"] = _ratio_of(group, ratio)
    keep, unrounded = _kept_counts(analysis.groups, ratios, round_to, min_channels)
    plan: dict[str, list[int]] = {}
    fallback = 0
    for group in analysis.groups:
        k = keep[group.name]
        if k >= group.size:
            continue
        scores, used = _importance(gm, group, importance)
        fallback += used != importance
        order = np.argsort(scores, kind="stable")
        plan[group.name] = sorted(order[: group.size - k].tolist())
        width = group.unit_width(group.producers[0])
        info[group.name].update(status="pruned", pruned=(group.size - k) * width, kept=k * width)
    extra: dict[str, Any] = {"importance": importance}
    if unrounded:
        extra["round_to_not_met"] = unrounded
    if fallback:
        extra["importance_fallback"] = f"bn-gamma fell back to l1 in {fallback} groups without BatchNorm"
    return _run(program, analysis, plan, info, macs_before, extra)


def prune_channels_by_index(program: Program, selection: Mapping[str, Sequence[int]]) -> PassResult:
    """Remove exactly the given output channels of the given layers, and every channel tied to them.

    ``selection`` maps a producing layer (a conv or linear module name) to its output
    channel indices. Raises ``ValueError`` when a channel belongs to a blocked or
    protected group, or when the layer produces no prunable group.
    """
    analysis = analyze_program(program)
    macs_before = count_macs(program.graph_module)
    info = {g.name: _group_info(g) for g in analysis.groups}
    unit_of: dict[int, tuple[ChannelGroup, int]] = {r: (g, u) for g in analysis.groups for u, r in enumerate(g.units)}
    plan: dict[str, set[int]] = {}
    for layer_name, channels in selection.items():
        if layer_name not in analysis.layers:
            raise ValueError(f"'{layer_name}' is not a conv or linear layer of the graph; layers: {choices(analysis.layers)}")
        layer = analysis.layers[layer_name]
        for c in channels:
            group, u = unit_of[int(analysis.roots[layer.out_ids[c]])]
            if group.blocked:
                raise ValueError(f"channel {c} of '{layer_name}' is in group '{group.name}', {group.blocked}")
            plan.setdefault(group.name, set()).add(u)
    for name, units in plan.items():
        group = analysis.group(name)
        width = group.unit_width(group.producers[0])
        info[name].update(status="pruned", pruned=len(units) * width, kept=(group.size - len(units)) * width)
    return _run(program, analysis, {n: sorted(u) for n, u in plan.items()}, info, macs_before, {})
