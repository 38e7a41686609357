"""Per-node profile of a Program: where the time, the MACs and the parameters are.

:func:`profile_program` runs the graph node by node with a ``torch.fx.Interpreter``
that times every node with ``time.perf_counter`` (synchronizing CUDA around each node
when the model is on a GPU), ``warmup`` untimed runs and then ``runs`` timed ones. A
node's time is its median over the timed runs; ``overhead_ms`` is the median over runs
of the interpreter's own bookkeeping (a run's wall time minus its node times), and
``total_ms`` is the sum of the node medians plus that overhead, so the node times add up
to the total exactly, and a hiccup of the machine during one node of one run moves
neither. ``run_ms``, the median wall time of whole runs, is kept for comparison (on a
busy machine it is the larger). Running node by node is slower than the compiled
``GraphModule.forward`` by the overhead — the numbers rank nodes, they are not a
latency benchmark.

MACs and parameters come from :func:`graphopt.cost.node_cost` (the one MAC counter),
at the shapes of ``sample`` (shapes are propagated for that, and the Program's
``tensor_meta`` restored afterwards). A module called twice counts its parameters at its
first call only, so the node parameters sum to the model's parameter count.

Placeholders and the output node are not listed; every other node is.

A file source whose original runs in its own runtime (an ONNX file on ONNX Runtime, a
TorchScript file as its ScriptModule: ``Program.reference``) also gets ``original_ms``, the
median latency of that original on the sample, and ``original_runtime`` naming the runtime.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx
from torch import Tensor
from torch.fx import Node
from torch.fx.passes.shape_prop import ShapeProp

from graphopt.cost import count_params, node_cost
from graphopt.errors import DataError, UsageError
from graphopt.program import Program

__all__ = ["NodeProfile", "Profile", "profile_program"]

Shape = tuple[Any, ...]


@dataclass
class NodeProfile:
    """One node: its median time, its share of the node time, MACs, parameters, shape."""

    name: str  # the fx node name
    op: str  # call_module / call_function / call_method / get_attr
    target: str  # what runs: the module class (Conv2d), function (torch.flatten) or method (.view)
    ms: float  # median over the timed runs
    share: float  # ms / sum of all nodes' ms
    macs: int
    params: int
    output_shape: Shape | None  # a tensor's shape, a tuple of shapes for tuple outputs, or None
    index: int = 0  # position in the graph

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["output_shape"] = _shape_json(self.output_shape)
        return data


@dataclass
class Profile:
    """Every node's profile, sorted by time (slowest first), and the totals."""

    nodes: list[NodeProfile]
    total_ms: float  # sum of the node medians + overhead_ms
    total_macs: int
    total_params: int
    runs: int
    overhead_ms: float = 0.0  # median interpreter time outside the nodes, per run
    run_ms: float = 0.0  # median wall time of a whole interpreter run
    original_ms: float | None = None  # the original file in its own runtime (None: no such original)
    original_runtime: str | None = None  # which runtime ran it ("ONNX Runtime ... on the original file")

    @property
    def nodes_ms(self) -> float:
        return sum(n.ms for n in self.nodes)

    def to_json(self) -> dict[str, Any]:
        return {
            "total_ms": self.total_ms,
            "nodes_ms": self.nodes_ms,
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "runs": self.runs,
            "overhead_ms": self.overhead_ms,
            "run_ms": self.run_ms,
            "original_ms": self.original_ms,
            "original_runtime": self.original_runtime,
            "nodes": [n.to_json() for n in self.nodes],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Profile":
        nodes = [NodeProfile(**{**n, "output_shape": _shape_from_json(n["output_shape"])}) for n in data["nodes"]]
        return cls(nodes, data["total_ms"], data["total_macs"], data["total_params"], data["runs"],
                   data.get("overhead_ms", 0.0), data.get("run_ms", 0.0), data.get("original_ms"), data.get("original_runtime"))

    def render(self, console: Any, top: int | None = None) -> None:
        """A rich table of the ``top`` slowest nodes (all by default) and the totals."""
        from rich.table import Table

        shown = self.nodes if top is None else self.nodes[: max(0, top)]
        table = Table(
            title=f"profile: {self.total_ms:.3f} ms per run (node medians over {self.runs} runs + overhead; "
            f"whole runs {self.run_ms:.3f} ms), {self.total_macs:,} MACs, {self.total_params:,} params",
            title_justify="left",
        )
        for header, justify in (("#", "right"), ("node", "left"), ("op", "left"), ("output", "left"), ("ms", "right"),
                                ("share", "right"), ("MACs", "right"), ("params", "right")):
            table.add_column(header, justify=justify)  # type: ignore[arg-type]
        for rank, n in enumerate(shown, 1):
            table.add_row(str(rank), n.name, n.target, _shape_text(n.output_shape), f"{n.ms:.3f}", f"{n.share:.1%}",
                          f"{n.macs:,}" if n.macs else "", f"{n.params:,}" if n.params else "")
        rest = self.nodes[len(shown):]
        if rest:
            ms = sum(n.ms for n in rest)
            table.add_row("", f"... {len(rest)} more nodes", "", "", f"{ms:.3f}", f"{sum(n.share for n in rest):.1%}",
                          f"{sum(n.macs for n in rest):,}", f"{sum(n.params for n in rest):,}")
        table.add_section()
        table.add_row("", "interpreter overhead", "", "", f"{self.overhead_ms:.3f}", "", "", "")
        table.add_row("", "total", "", "", f"{self.total_ms:.3f}", "", f"{self.total_macs:,}", f"{self.total_params:,}")
        console.print(table)
        if self.original_ms is not None:
            console.print(f"original latency: {self.original_ms:.3f} ms (p50, {self.original_runtime})")


# --------------------------------------------------------------------------- helpers


def _shape_of(meta: Any) -> Shape | None:
    if meta is None:
        return None
    if hasattr(meta, "shape"):
        return tuple(int(d) for d in meta.shape)
    if isinstance(meta, (tuple, list)):
        shapes = [_shape_of(m) for m in meta]
        return tuple(shapes) if shapes and all(s is not None for s in shapes) else None
    return None


def _shape_json(shape: Any) -> Any:
    return [_shape_json(s) for s in shape] if isinstance(shape, tuple) else shape


def _shape_from_json(data: Any) -> Any:
    return tuple(_shape_from_json(d) for d in data) if isinstance(data, list) else data


def _shape_text(shape: Shape | None) -> str:
    if shape is None:
        return ""
    if shape and isinstance(shape[0], tuple):
        return ", ".join(_shape_text(s) for s in shape)
    return "x".join(str(d) for d in shape) or "scalar"


def _target_text(gm: torch.fx.GraphModule, node: Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    if node.op == "call_method":
        return f".{node.target}"
    if node.op == "get_attr":
        return f"attr {node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", str(target))
    module = {"_operator": "operator", "torch._C._nn": "torch.nn.functional", "torch._C._VariableFunctions": "torch"}.get(module, module)
    return f"{module}.{name}" if module and module != "builtins" else name


class _NodeTimer(torch.fx.Interpreter):
    """Runs the graph and records every node's wall time of this run."""

    def __init__(self, gm: torch.fx.GraphModule, sync: bool) -> None:
        super().__init__(gm)
        self.sync = sync
        self.times: dict[Node, float] = {}

    def run_node(self, n: Node) -> Any:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = super().run_node(n)
        if self.sync:
            torch.cuda.synchronize()
        self.times[n] = time.perf_counter() - start
        return out


def _check(program: Program, sample: Any, runs: Any, warmup: Any) -> tuple[Tensor, ...]:
    if not isinstance(program, Program):
        raise UsageError(f"profile: expected a graphopt Program, got {type(program).__name__}")
    for name, value, low in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"profile: {name} must be an integer >= {low}, got {value!r}")
    if sample is None:
        return program.example_inputs
    if isinstance(sample, Tensor):
        sample = (sample,)
    if not isinstance(sample, Sequence) or not all(isinstance(t, Tensor) for t in sample):
        raise DataError(f"profile: the sample must be a tuple of tensors, got {type(sample).__name__}")
    return tuple(sample)


def profile_program(program: Program, sample: tuple[Tensor, ...] | None = None, *, runs: int = 10,
                    warmup: int = 2) -> Profile:
    """Time every node of ``program`` on ``sample`` (default: its example inputs).

    Raises :class:`~graphopt.errors.UsageError` for bad ``runs``/``warmup`` and
    :class:`~graphopt.errors.DataError` when the sample does not fit the program.
    """
    inputs = _check(program, sample, runs, warmup)
    gm = program.graph_module
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]

    # shapes (and so MACs) at the sample's shapes; the Program's own tensor_meta is kept
    missing = object()
    saved = {n: n.meta.get("tensor_meta", missing) for n in gm.graph.nodes}
    try:
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(*inputs)
        except Exception as exc:  # noqa: BLE001
            shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
            raise DataError(f"profile: the program cannot run the sample ({shapes}): {type(exc).__name__}: {exc}") from exc
        costs = {n: node_cost(gm, n) for n in nodes}
        out_shapes = {n: _shape_of(n.meta.get("tensor_meta")) for n in nodes}
    finally:
        for n, meta in saved.items():
            if meta is missing:
                n.meta.pop("tensor_meta", None)
            else:
                n.meta["tensor_meta"] = meta

    sync = any(t.is_cuda for t in inputs) or any(p.is_cuda for p in gm.parameters())
    timer = _NodeTimer(gm, sync)
    per_node: dict[Node, list[float]] = {n: [] for n in nodes}
    totals: list[float] = []
    overheads: list[float] = []
    with torch.inference_mode():
        for i in range(warmup + runs):
            timer.times = {}
            if sync:
                torch.cuda.synchronize()
            start = time.perf_counter()
            timer.run(*inputs)
            if sync:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                totals.append(elapsed)
                overheads.append(max(0.0, elapsed - sum(timer.times.values())))
                for n in nodes:
                    per_node[n].append(timer.times.get(n, 0.0))

    ms = {n: statistics.median(per_node[n]) * 1e3 for n in nodes}
    node_total = sum(ms.values())
    seen: set[str] = set()
    profiles = []
    for index, n in enumerate(nodes):
        params = costs[n].params
        if n.op == "call_module":
            if str(n.target) in seen:
                params = 0  # a module called again: its parameters were counted at its first call
            seen.add(str(n.target))
        profiles.append(NodeProfile(
            name=n.name,
            op=n.op,
            target=_target_text(gm, n),
            ms=ms[n],
            share=ms[n] / node_total if node_total > 0 else 0.0,
            macs=costs[n].macs,
            params=params,
            output_shape=out_shapes[n],
            index=index,
        ))
    profiles.sort(key=lambda p: (-p.ms, p.index))
    overhead = statistics.median(overheads) * 1e3
    original_ms = None
    if program.reference is not None:  # the original file in its own runtime, not the converted graph
        from graphopt.compiler import measure_latency_ms

        original_ms = measure_latency_ms(program.run_reference, inputs, min_runs=runs)
    return Profile(
        nodes=profiles,
        total_ms=node_total + overhead,
        total_macs=sum(p.macs for p in profiles),
        total_params=count_params(gm),
        runs=runs,
        overhead_ms=overhead,
        run_ms=statistics.median(totals) * 1e3,
        original_ms=original_ms,
        original_runtime=program.meta.get("reference_runtime") if original_ms is not None else None,
    )
