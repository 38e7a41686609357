"""TensorRT's Q/DQ placement and fp16 form of an exported ONNX model (the ``TENSORRT`` policy row).

TensorRT fuses explicit quantization only in a few shapes (NVIDIA's Q/DQ rules, see
``/work/shared/notes``): symmetric int8, Q/DQ on the *inputs* of Conv/Gemm (activation
and weight), never on their outputs, nothing between Conv, BatchNorm and ReLU, the
identity branch of a residual Add quantized so the Add fuses into the conv, no pairs
around MaxPool/reshape-like ops (TensorRT moves them itself), Concat inputs on one scale.
Every other pair breaks a fusion and makes int8 slower than fp16.

:func:`place_for_tensorrt` starts from the exporter's pairs (one per simulated quantizer)
and keeps only those a quantized op reads; :func:`mirror_on_simulation` makes the
simulated-int8 program compute the same (a dropped pair's quantizer is taken out, a
concat no longer reads a bypassed one), so verification still splits quantization error
from lowering error. :func:`to_fp16` converts everything left in float to fp16 with
onnxconverter-common (opset 19: QuantizeLinear/DequantizeLinear take fp16 scales there).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from graphopt.errors import LoweringError, first_line

#: Ops a quantized activation reaches its consumer through unchanged (TensorRT moves Q/DQ across them).
MOVES = frozenset({"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
                   "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"})
#: Ops whose activation input TensorRT runs in int8 (input 0).
QUANTIZED_INPUT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
#: Opset where QuantizeLinear/DequantizeLinear accept fp16 scales.
FP16_QDQ_OPSET = 19


@dataclass
class Placement:
    """What :func:`place_for_tensorrt` did, by simulated quantizer (``point``)."""

    kept: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    #: quantizers a Concat no longer reads (its inputs' scales differed)
    concat_bypassed: list[str] = field(default_factory=list)
    residual_adds: int = 0
    #: data-movement ops a kept pair was moved above
    hoisted: int = 0
    weight_transposes_folded: int = 0

    def stats(self) -> dict[str, int]:
        return {"kept_pairs": len(self.kept), "dropped_pairs": len(self.dropped),
                "concat_bypassed": len(self.concat_bypassed), "residual_adds_fused": self.residual_adds,
                "hoisted_above_data_movement": self.hoisted, "weight_transposes_folded": self.weight_transposes_folded}


def _producer(t: Any) -> Any:
    return t.inputs[0] if len(t.inputs) == 1 else None


def _pair_input(dq: Any) -> Any:
    """The float tensor an activation ``Q → DQ`` pair quantizes (None for a weight DQ)."""
    q = _producer(dq.inputs[0]) if dq.op == "DequantizeLinear" else None
    return q.inputs[0] if q is not None and q.op == "QuantizeLinear" else None


def _conv_behind(t: Any) -> Any:
    """The Conv/Gemm whose output ``t`` is (directly or through its own Q/DQ pair), if it feeds nothing else."""
    p = _producer(t)
    if p is not None and p.op == "DequantizeLinear" and _pair_input(p) is not None:
        if len(t.outputs) != 1 or len(p.inputs[0].outputs) != 1:
            return None  # the quantized conv output is read elsewhere too: the Add cannot fuse into the conv
        t = _pair_input(p)
        p = _producer(t)
    if p is not None and p.op in ("Conv", "Gemm") and len(t.outputs) == 1:
        return p
    return None


def _conv_depth(graph: Any) -> dict[str, int]:
    """Per node: the most Conv/Gemm layers on a path from the inputs up to and including it."""
    depth: dict[str, int] = {}
    for node in graph.nodes:  # topologically sorted
        before = [depth[p.name] for t in node.inputs for p in t.inputs if p.name in depth]
        depth[node.name] = max(before, default=0) + (node.op in ("Conv", "Gemm"))
    return depth


def _identity_inputs(graph: Any) -> tuple[set[tuple[str, int]], int]:
    """(Add node, input index) pairs that are a residual identity branch, and how many Adds have one.

    The other input is a conv's output, which TensorRT fuses the Add into; where both are
    (a downsampling shortcut), the deeper conv is the main branch.
    """
    depth = _conv_depth(graph)
    identity: set[tuple[str, int]] = set()
    adds = 0
    for node in graph.nodes:
        if node.op != "Add" or len(node.inputs) != 2 or any(not t.inputs for t in node.inputs):
            continue
        convs = [_conv_behind(t) for t in node.inputs]
        fed = [i for i, c in enumerate(convs) if c is not None]
        if not fed:
            continue
        fused = max(fed, key=lambda i: (depth[convs[i].name], -i))
        identity.add((node.name, 1 - fused))
        adds += 1
    return identity, adds


def _read_quantized(t: Any, identity: set[tuple[str, int]], graph: Any) -> bool:
    """Does an int8-capable op read ``t`` (through ops TensorRT moves Q/DQ across)?"""
    for c in t.outputs:
        if c.op in QUANTIZED_INPUT_OPS and c.inputs and c.inputs[0] is t:
            return True
        if c.op == "Add" and any((c.name, i) in identity for i, x in enumerate(c.inputs) if x is t):
            return True
        if c.op in MOVES and any(_read_quantized(o, identity, graph) for o in c.outputs if o not in graph.outputs):
            return True
    return False


def _drop_pair(graph: Any, dq: Any) -> None:
    """Consumers of the pair's output read its float input instead (an Identity where it is a graph output)."""
    raw, out = _pair_input(dq), dq.outputs[0]
    for c in list(out.outputs):
        for i, x in enumerate(list(c.inputs)):
            if x is out:
                c.inputs[i] = raw
    if out in graph.outputs:
        dq.op, dq.attrs = "Identity", {}
        dq.inputs.clear()
        dq.inputs.append(raw)
    else:
        dq.outputs.clear()


def _scale_of(dq: Any) -> float | None:
    import numpy as np
    import onnx_graphsurgeon as gs

    s = dq.inputs[1]
    return float(np.asarray(s.values).reshape(())) if isinstance(s, gs.Constant) and np.asarray(s.values).size == 1 else None


def _hoist_above_moves(graph: Any, dq: Any) -> int:
    """``x → Flatten → Q → DQ`` becomes ``x → Q → DQ → Flatten`` (exact: quantization commutes with
    data movement), repeatedly, so no pair sits right after a reshape-like op. Returns the ops crossed."""
    import onnx_graphsurgeon as gs

    q, moved = _producer(dq.inputs[0]), 0
    while True:
        raw = q.inputs[0]
        m = _producer(raw)
        if m is None or m.op not in MOVES or len(raw.outputs) != 1 or raw in graph.outputs or not m.inputs:
            return moved
        out = dq.outputs[0]
        below = gs.Variable(f"{out.name}_hoisted", dtype=m.inputs[0].dtype, shape=m.inputs[0].shape)
        q.inputs[0] = m.inputs[0]
        dq.outputs[0] = below
        m.inputs[0] = below
        m.outputs[0] = out
        moved += 1


def _fold_weight_transposes(graph: Any) -> int:
    """``DQ(W, axis) → Transpose → MatMul`` (a Linear on a >2-D input) becomes ``DQ(Wᵀ, 1 - axis) → MatMul``:
    TensorRT reads the per-channel weight straight from its DequantizeLinear."""
    import numpy as np
    import onnx_graphsurgeon as gs

    folded = 0
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and isinstance(n.inputs[0], gs.Constant)]:
        w, users = dq.inputs[0], dq.outputs[0].outputs
        if len(users) != 1 or users[0].op != "Transpose" or np.asarray(w.values).ndim != 2:
            continue
        t = users[0]
        if list(t.attrs.get("perm", [1, 0])) != [1, 0] or not all(c.op == "MatMul" for c in t.outputs[0].outputs):
            continue
        dq.inputs[0] = gs.Constant(f"{w.name}_t", np.ascontiguousarray(np.asarray(w.values).T))
        if np.asarray(dq.inputs[1].values).size > 1:
            dq.attrs["axis"] = 1 - int(dq.attrs.get("axis", 1))
        out = t.outputs[0]
        t.outputs.clear()
        dq.outputs[0] = out
        folded += 1
    return folded


def place_for_tensorrt(graph: Any, points: dict[str, dict[str, Any]]) -> Placement:
    """Keep the activation Q/DQ pairs TensorRT fuses; drop the rest; one scale per Concat. In place."""
    graph.toposort()
    point_of = {p["tensor"]: name for name, p in points.items()}
    identity, placement_adds = _identity_inputs(graph)
    placement = Placement(residual_adds=placement_adds)
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and _pair_input(n) is not None]:
        point = point_of.get(dq.inputs[0].name, dq.inputs[0].name)
        if _read_quantized(dq.outputs[0], identity, graph):
            placement.kept.append(point)
            placement.hoisted += _hoist_above_moves(graph, dq)
        else:
            _drop_pair(graph, dq)
            placement.dropped.append(point)
    placement.weight_transposes_folded = _fold_weight_transposes(graph)
    graph.cleanup().toposort()
    for cat in [n for n in graph.nodes if n.op == "Concat"]:
        sources = [(i, _producer(t)) for i, t in enumerate(cat.inputs)]
        pairs = [(i, dq) for i, dq in sources if dq is not None and dq.op == "DequantizeLinear" and _pair_input(dq) is not None]
        if len({_scale_of(dq) for _, dq in pairs}) <= 1:
            continue
        for i, dq in pairs:  # the concat reads the float values; its own output pair (if any) quantizes once
            cat.inputs[i] = _pair_input(dq)
            placement.concat_bypassed.append(point_of.get(dq.inputs[0].name, dq.inputs[0].name))
    graph.cleanup().toposort()
    return placement


def mirror_on_simulation(sim: GraphModule, placement: Placement) -> None:
    """Make the simulated program compute what the placed ONNX computes (quantizers taken out, concats rerouted)."""
    import torch

    from graphopt.quant import is_cat

    nodes = {n.name: n for n in sim.graph.nodes}
    for name in placement.concat_bypassed:
        q = nodes.get(name)
        if q is None:
            continue
        for user in [u for u in q.users if is_cat(u)]:
            user.args = torch.fx.node.map_arg(user.args, lambda a: q.args[0] if a is q else a)
    for name in placement.dropped:
        q = nodes.get(name)
        if q is None or q.op != "call_module":
            continue
        q.replace_all_uses_with(q.args[0])
        sim.graph.erase_node(q)
    sim.graph.lint()
    sim.delete_all_unused_submodules()
    sim.recompile()


def to_fp16(model: Any, what: str) -> Any:
    """``model`` with every float tensor but the inputs/outputs in fp16 (onnxconverter-common, opset 19)."""
    from onnx import version_converter
    from onnxconverter_common import float16

    try:
        if model.opset_import[0].version < FP16_QDQ_OPSET:
            model = version_converter.convert_version(model, FP16_QDQ_OPSET)
        with warnings.catch_warnings():  # one warning per weight below fp16's smallest normal: noise
            warnings.simplefilter("ignore", UserWarning)
            return float16.convert_float_to_float16(model, keep_io_types=True)
    except Exception as exc:
        raise LoweringError(f"{what}: the fp16 conversion (onnxconverter-common) failed: {first_line(exc)}") from None
