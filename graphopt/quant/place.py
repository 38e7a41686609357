"""Placing and stripping quantizers, deriving qparams, the whole-program entry point and its summary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from graphopt.errors import DataError
from graphopt.fx_util import get_attr
from graphopt.program import Program, delete_unused_submodules
from graphopt.quant.calibrate import SCHEMES, Observer, activation_qparams, calibrate, select_range
from graphopt.quant.regions import OpKind, absorbable_activation, anchor_inputs, anchor_name, op_kind
from graphopt.quant.simulate import ActFakeQuant, QuantLayer, clear_kernel_arithmetic

#: ``program.meta`` key of the :class:`QuantInfo` (config, qparams per activation, layers).
META_KEY = "quant"
#: ``program.meta`` key of the calibration itself: ``{node name: Observer}`` (not JSON).
CALIBRATION_KEY = "quant_calibration"

# ---------------------------------------------------------------------------------------
# Placement


@dataclass(frozen=True)
class QuantConfig:
    """How a program is quantized: the ``insert-quant-stubs`` options a placement needs.

    Field names are the pass's option names; ``skip`` holds resolved anchor names (the
    pass's ``skip`` and ``keep-fp32`` together).
    """

    activations: str = "u8"  # "u8" (asymmetric, quint8) or "s8" (symmetric, qint8)
    observer: str = "histogram"  # range method: "minmax", "histogram" or "entropy"
    per_channel: bool = True
    reduce_range: bool = False
    skip: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {"activations": self.activations, "observer": self.observer, "per_channel": self.per_channel,
                "reduce_range": self.reduce_range, "skip": sorted(self.skip)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantConfig:
        return cls(str(d["activations"]), str(d["observer"]), bool(d["per_channel"]), bool(d["reduce_range"]),
                   frozenset(d["skip"]))


@dataclass
class QuantInfo:
    """What ``program.meta[META_KEY]`` holds once a program is simulated int8 (JSON: :meth:`to_json`)."""

    config: QuantConfig
    calibration_samples: int
    #: quantizer module -> {"point", qparams..., "observed" [min, max] or "inherit"}
    activations: dict[str, dict[str, Any]]
    #: QuantLayer -> {"type", "channels", "scale_min", "scale_max"}
    weights: dict[str, dict[str, Any]]
    #: anchors left in fp32: {"layer", "reason": "skip" | "auto", "sensitivity" (auto)}
    kept_fp32: list[dict[str, Any]]
    #: per output: the scale of the last quantizer before it (None: computed in fp32 after it)
    output_scales: list[float | None]
    #: what ``keep-fp32=[auto]`` measured and chose (None when it did not run)
    keep_fp32_auto: dict[str, Any] | None = None
    #: compute ops that run in fp32 because no int8 lowering has a kernel for them (SiLU, Sigmoid,
    #: GELU, LayerNorm, ...): {"layer", "op", "reason"}
    float_ops: list[dict[str, Any]] = field(default_factory=list)

    @property
    def quantized_layers(self) -> list[str]:
        return sorted(self.weights)

    def to_json(self) -> dict[str, Any]:
        out = {"config": self.config.to_json(), "calibration_samples": self.calibration_samples,
               "activations": self.activations, "weights": self.weights, "quantized_layers": self.quantized_layers,
               "kept_fp32": self.kept_fp32, "output_scales": self.output_scales}
        if self.keep_fp32_auto is not None:
            out["keep_fp32_auto"] = self.keep_fp32_auto
        out["float_ops"] = self.float_ops
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantInfo:
        return cls(QuantConfig.from_json(d["config"]), int(d["calibration_samples"]), dict(d["activations"]),
                   dict(d["weights"]), list(d["kept_fp32"]), list(d["output_scales"]), d.get("keep_fp32_auto"),
                   list(d.get("float_ops", [])))


@dataclass
class Placement:
    """The simulated graph and what was quantized."""

    graph_module: GraphModule
    quantized: list[str] = field(default_factory=list)  # anchors running int8
    kept_fp32: list[str] = field(default_factory=list)  # anchors left in fp32 (skip)


def _shallow_copy(gm: GraphModule) -> GraphModule:
    """A GraphModule with a copied graph that shares the original's submodules and tensors."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    root: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            root[str(n.target)] = gm.get_submodule(str(n.target))
        elif n.op == "get_attr":
            root[str(n.target)] = get_attr(gm, str(n.target))
    new = GraphModule(root, graph, class_name=type(gm).__name__)
    new.meta = dict(getattr(gm, "meta", {}))
    new.training = gm.training
    return new


def _fq_name(gm: GraphModule, point: str) -> str:
    name = f"fq_{point}"
    i = 1
    while hasattr(gm, name):
        i += 1
        name = f"fq_{point}_{i}"
    return name


def place(
    gm: GraphModule,
    observers: dict[str, Observer],
    config: QuantConfig,
) -> Placement:
    """The simulated-int8 graph of the fp32 graph ``gm``: quantizers placed, qparams derived.

    Shares ``gm``'s float modules (never mutates them or ``gm``). ``config.skip`` holds
    resolved anchor names (:func:`resolve_names`) that stay in fp32.
    """
    sim = _shallow_copy(gm)
    graph = sim.graph
    qsrc: dict[Node, str] = {}  # node -> name of the ActFakeQuant whose grid its value is on
    input_fq: dict[Node, Node] = {}  # fp32 node -> its entry quantizer node
    placement = Placement(sim)

    def add_fq(after: Node, inherit: str | None = None) -> Node:
        if after.name not in observers and inherit is None:
            raise RuntimeError(f"no calibration statistics for '{after.name}'")
        mod = ActFakeQuant(after.name, None if inherit else observers[after.name], inherit)
        name = _fq_name(sim, after.name)
        sim.add_module(name, mod)
        with graph.inserting_after(after):
            fq = graph.call_module(name, (after,))
        return fq

    for n in list(graph.nodes):
        if n.op in ("placeholder", "output", "get_attr"):
            continue
        kind = op_kind(sim, n)
        if kind in (OpKind.WEIGHTED, OpKind.ANCHOR):
            name = anchor_name(n)
            ins = anchor_inputs(sim, n)
            if name in config.skip or not ins:
                placement.kept_fp32.append(name)
                continue
            for a in ins:
                if a in qsrc:
                    continue
                if a not in input_fq:
                    input_fq[a] = add_fq(a)
                    qsrc[input_fq[a]] = str(input_fq[a].target)
                n.replace_input_with(a, input_fq[a])
            if kind is OpKind.WEIGHTED and not isinstance(sim.get_submodule(str(n.target)), QuantLayer):
                sim.add_submodule(str(n.target), QuantLayer(sim.get_submodule(str(n.target)), config.per_channel))
            end = absorbable_activation(sim, n) or n
            users = list(end.users)
            fq = add_fq(end)
            for u in users:
                u.replace_input_with(end, fq)
            qsrc[fq] = str(fq.target)
            placement.quantized.append(name)
        elif kind in (OpKind.PASSTHROUGH, OpKind.REQUANT) and n.args and isinstance(n.args[0], Node) and n.args[0] in qsrc:
            src = qsrc[n.args[0]]
            if kind is OpKind.PASSTHROUGH:
                qsrc[n] = src
            else:
                users = list(n.users)
                fq = add_fq(n, inherit=src)
                for u in users:
                    u.replace_input_with(n, fq)
                qsrc[fq] = str(fq.target)
    placement.quantized = list(dict.fromkeys(placement.quantized))
    placement.kept_fp32 = list(dict.fromkeys(k for k in placement.kept_fp32 if k not in placement.quantized))
    sim.recompile()
    derive_qparams(sim, config.activations, config.observer, reduce_range=config.reduce_range)
    return placement


def strip(gm: GraphModule) -> GraphModule:
    """The fp32 graph a simulated graph was placed on: quantizers removed, layers unwrapped."""
    out = _shallow_copy(gm)
    for n in list(out.graph.nodes):
        if n.op != "call_module":
            continue
        m = out.get_submodule(str(n.target))
        if isinstance(m, ActFakeQuant):
            n.replace_all_uses_with(n.args[0])
            out.graph.erase_node(n)
        elif isinstance(m, QuantLayer):
            out.add_submodule(str(n.target), m.layer)
    delete_unused_submodules(out)
    out.recompile()
    return out


def _act_quantizers(gm: GraphModule) -> list[tuple[str, ActFakeQuant]]:
    seen: dict[str, ActFakeQuant] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, ActFakeQuant):
                seen.setdefault(str(n.target), m)
    return list(seen.items())


def derive_qparams(gm: GraphModule, scheme: str, method: str, *, reduce_range: bool = False) -> None:
    """Set every activation quantizer's qparams from its recorded statistics (in place).

    Drops any kernel arithmetic a lowering set (:func:`clear_kernel_arithmetic`): it
    was tied to the old qparams.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown activation scheme {scheme!r}; valid: {', '.join(SCHEMES)}")
    clear_kernel_arithmetic(gm)
    fqs = _act_quantizers(gm)
    by_name = dict(fqs)
    for _, m in fqs:
        if m.inherit is None:
            obs = m.observer()
            lo, hi = select_range(obs, method, scheme)
            m.set_qparams(activation_qparams(lo, hi, scheme, reduce_range=reduce_range))
    for _, m in fqs:  # inherited qparams follow their (possibly inherited) source
        src, hops = m, 0
        while src.inherit is not None and hops < len(fqs):
            src, hops = by_name[src.inherit], hops + 1
        m.set_qparams(src.qparams)



def rederive(program: Program, scheme: str, *, method: str | None = None, reduce_range: bool | None = None) -> None:
    """Switch a simulated program to another activation scheme from the same calibration.

    Only qparams change (in place), and ``program.meta[META_KEY]`` is rewritten; no sample
    is run again.
    """
    info: QuantInfo | None = program.meta.get(META_KEY)
    if info is None:
        raise ValueError("the program has not been through insert-quant-stubs")
    method = method or info.config.observer
    rr = info.config.reduce_range if reduce_range is None else reduce_range
    derive_qparams(program.graph_module, scheme, method, reduce_range=rr)
    config = replace(info.config, activations=scheme, observer=method, reduce_range=rr)
    program.meta[META_KEY] = summary(program.graph_module, config, info.kept_fp32, info.calibration_samples)


# ---------------------------------------------------------------------------------------
# Whole-program entry point and summary


def quantize_program(
    program: Program,
    config: QuantConfig,
    *,
    observers: dict[str, Observer] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Placement:
    """Calibrate ``program`` (fp32) on ``program.calibration`` and make it simulated int8, in place."""
    if observers is None:
        if not program.calibration:
            raise DataError("insert-quant-stubs needs calibration data: pass --calib-data (or fill program.calibration)")
        observers = calibrate(program.graph_module, program.calibration, progress=progress)
    placement = place(program.graph_module, observers, config)
    program.graph_module = placement.graph_module
    program.meta[CALIBRATION_KEY] = observers
    n_samples = len(program.calibration) if program.calibration else 0
    kept = [{"layer": k, "reason": "skip"} for k in placement.kept_fp32]
    program.meta[META_KEY] = summary(program.graph_module, config, kept, n_samples)
    return placement


def summary(gm: GraphModule, config: QuantConfig, kept_fp32: list[dict[str, Any]], calibration_samples: int) -> QuantInfo:
    """The record of a simulated program's quantization (what ``program.meta[META_KEY]`` holds)."""
    acts: dict[str, Any] = {}
    for name, m in _act_quantizers(gm):
        entry = {"point": m.point, **m.qparams.to_json()}
        if m.inherit:
            entry["inherit"] = m.inherit
        else:
            obs = m.observer()
            entry["observed"] = [obs.min, obs.max]
        acts[name] = entry
    weights: dict[str, Any] = {}
    for name, m in gm.named_modules():
        if isinstance(m, QuantLayer):
            s = m.weight_fq.scale
            weights[name] = {"type": type(m.layer).__name__, "channels": int(s.numel()),
                             "scale_min": float(s.min()), "scale_max": float(s.max())}
    return QuantInfo(config, calibration_samples, acts, weights, kept_fp32, output_scales(gm), float_ops=float_ops(gm))


#: Why an op of these kinds stays fp32 in every int8 lowering (cpu-int8 and ort-int8).
NO_INT8_KERNEL = "no int8 kernel in the cpu-int8/ort-int8 lowerings: runs in fp32 between dequantize and quantize"


def float_ops(gm: GraphModule) -> list[dict[str, Any]]:
    """The compute ops of a simulated graph that run in fp32 (``OpKind.FLOAT`` modules and functions)."""
    out = []
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function") or op_kind(gm, n) is not OpKind.FLOAT:
            continue
        if n.op == "call_module":
            m = gm.get_submodule(str(n.target))
            if isinstance(m, (ActFakeQuant, QuantLayer)) or type(m).__module__.startswith("graphopt"):
                continue
            op = type(m).__name__
        else:
            op = getattr(n.target, "__name__", str(n.target))
            if getattr(n.target, "__module__", None) in ("_operator", "builtins") or op in ("dequantize", "quantize_per_tensor"):
                continue  # arithmetic on sizes (shufflenet's c // groups), getattr: no tensor op
        out.append({"layer": anchor_name(n), "op": op, "reason": NO_INT8_KERNEL})
    return out


def output_scales(gm: GraphModule) -> list[float | None]:
    """Per output tensor: the scale of the last quantizer before the final dequantize.

    ``None`` for an output computed in fp32 after its last quantizer (then no bound in
    quantization steps applies).
    """
    (out_node,) = [n for n in gm.graph.nodes if n.op == "output"]
    leaves: list[Node | None] = []

    def collect(a: Any) -> None:
        if isinstance(a, Node) or a is None:
            leaves.append(a)
        elif isinstance(a, (list, tuple)):
            for x in a:
                collect(x)
        elif isinstance(a, dict):
            for k in sorted(a):
                collect(a[k])

    collect(out_node.args[0])
    scales: list[float | None] = []
    for leaf in leaves:
        n, found = leaf, None
        while isinstance(n, Node):
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), ActFakeQuant):
                found = float(gm.get_submodule(str(n.target)).scale)
                break
            if op_kind(gm, n) is OpKind.PASSTHROUGH and n.args and isinstance(n.args[0], Node):
                n = n.args[0]
                continue
            break
        scales.append(found)
    return scales


