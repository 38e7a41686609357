"""The one ONNX Q/DQ exporter: a simulated-int8 program as QuantizeLinear/DequantizeLinear pairs.

Built from the program's own calibrated qparams (no runtime's quantizer is asked for any):

- every :class:`~graphopt.quant.ActFakeQuant` exports as a ``QuantizeLinear →
  DequantizeLinear`` pair with its scale and zero point (``uint8`` for the ``u8`` scheme,
  ``int8`` with zero point 0 for ``s8``; a reduced range gets a ``Clip`` before the pair,
  since ONNX saturates at the full 8-bit range), tagged with the simulated quantizer it
  stands for (the manifest's ``points``);
- every :class:`~graphopt.quant.QuantLayer` exports its conv/linear with an ``int8``
  weight initializer read through ``DequantizeLinear`` (per output channel: ``axis=0``);
  the bias stays fp32.

Then onnx-graphsurgeon shapes the graph for one runtime, by that runtime's row of the
placement table (:class:`QDQPolicy`, :data:`POLICIES`): drop a ReLU/Clip whose work the
quantizer's saturation already does (so ``DQ → Conv/Add → Q`` fuses), put a same-qparams
Q/DQ pair after data-movement ops (exact: values stay on the grid; the next op still
reads DequantizeLinear), read fp32 conv/gemm layers through a per-channel
DequantizeLinear (so the runtime does not quantize them on its own), leave a Concat that a
BatchNorm reads unquantized (OpenVINO crashes on that pair). A new
ONNX-consuming runtime is a row in that table plus a session wrapper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.backends._onnx_export import OPSET, _check, _export
from graphopt.errors import UsageError, choices
from graphopt.program import Program
from graphopt.quant import META_KEY, ActFakeQuant, QParams, QuantInfo, QuantLayer, clear_kernel_arithmetic

#: Temporary attribute on exported QuantizeLinear nodes: the simulated quantizer they stand for.
POINT_ATTR = "graphopt_point"

#: ONNX ops that only move, select or reorder values (and Relu, MaxPool): a value on an
#: 8-bit grid stays on it, so a Q/DQ pair with the same qparams after them is exact.
DATA_MOVEMENT_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Identity",
     "Relu", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
)


@dataclass(frozen=True)
class QDQPolicy:
    """Where one runtime wants its Q/DQ pairs: a row of the placement table.

    ``activations``: the activation schemes it runs (``u8`` asymmetric, ``s8`` symmetric
    with zero point 0). ``fold_activations``: drop a Relu/Clip right before a
    QuantizeLinear whose saturation does the same (``DQ → op → Q`` then fuses).
    ``requantize_after``: ops after which a same-qparams Q/DQ pair is inserted, so the op
    runs on 8-bit values and the next quantized op still reads DequantizeLinear.
    ``pin_fp32_layers``: fp32 Conv/Gemm read their input through a per-channel
    DequantizeLinear, which stops the runtime from quantizing their weights itself.

    OpenVINO (:data:`OPENVINO`) reads every Q/DQ pair as a FakeQuantize and moves it across
    MaxPool/reshape itself, and never quantizes a float weight on its own: no extra pairs,
    no pinning; no pair between a Concat and a BatchNorm (``float_concat_before_affine``).
    TensorRT (:data:`TENSORRT`) fuses only symmetric int8 and moves MaxPool/reshape across Q/DQ itself.

    ``only_where_consumed``: keep an activation pair only where a quantized op reads it (the
    activation input of Conv/Gemm, the identity branch of a residual Add whose other branch
    is a conv the Add fuses into, see :mod:`graphopt.backends._trt_placement`); every other
    pair goes (TensorRT: extra pairs break its fusions). ``share_concat_scales``: a Concat
    reads its inputs' pairs only when they share one scale. ``high_precision``: the float
    type of everything not quantized (``fp16``: converted by onnxconverter-common, opset 19
    for fp16 Q/DQ scales).

    ``float_concat_before_affine``: no pair on the output of a Concat of two or more inputs
    that an affine op with constants reads (an unfolded BatchNorm, Mul/Add/Sub/Div by a
    constant): the op reads the float concatenation of its inputs' own dequantized values.
    OpenVINO 2026.4.1's CPU plugin segfaults compiling ``Concat → Q/DQ (zero point ≠ 0) →
    BatchNorm/Mul/Add → Q/DQ``, DenseNet-121's pre-activation layer, in its low-precision
    ``MoveFakeQuantize`` (``NetworkHelper::moveDequantizationBefore``); see
    :func:`_float_concats_before_affine`.
    """

    runtime: str
    activations: tuple[str, ...]
    fold_activations: bool
    requantize_after: frozenset[str]
    pin_fp32_layers: bool
    only_where_consumed: bool = False
    share_concat_scales: bool = False
    high_precision: str = "fp32"
    float_concat_before_affine: bool = False


ONNXRUNTIME = QDQPolicy("onnxruntime", ("u8", "s8"), fold_activations=True, requantize_after=DATA_MOVEMENT_OPS,
                        pin_fp32_layers=True)
#: u8 asymmetric activations measured faster and more accurate than s8 under OpenVINO
#: (numbers in :mod:`graphopt.backends.openvino`); weights symmetric int8 per channel.
OPENVINO = QDQPolicy("openvino", ("u8", "s8"), fold_activations=True, requantize_after=frozenset(), pin_fp32_layers=False,
                     float_concat_before_affine=True)
#: TensorRT: symmetric int8 only, Q/DQ only on the inputs of Conv/Gemm and residual identities,
#: nothing around MaxPool/reshape (TensorRT moves them itself), fp16 elsewhere (strongly typed).
TENSORRT = QDQPolicy("tensorrt", ("s8",), fold_activations=False, requantize_after=frozenset(), pin_fp32_layers=False,
                     only_where_consumed=True, share_concat_scales=True, high_precision="fp16")
#: The placement table: runtime -> its policy.
POLICIES: dict[str, QDQPolicy] = {p.runtime: p for p in (ONNXRUNTIME, OPENVINO, TENSORRT)}


# ---------------------------------------------------------------------------------------
# Fake-quant modules -> exportable Q/DQ markers


@dataclasses.dataclass(frozen=True, eq=False)
class _ActQDQ:
    """An activation quantizer, as a plain Python value the exporter passes to ``symbolic``."""

    point: str  # the simulated graph's quantizer node
    qp: QParams

    @property
    def onnx_dtype(self) -> torch.dtype:
        return torch.uint8 if self.qp.quant_min >= 0 else torch.int8

    @property
    def full_range(self) -> bool:
        return (self.qp.quant_min, self.qp.quant_max) in ((0, 255), (-128, 127))


class _QDQFunction(torch.autograd.Function):
    """fake-quant in torch; ``[Clip →] QuantizeLinear → DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: _ActQDQ) -> torch.Tensor:  # type: ignore[override]
        qp = q.qp
        return torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, qp.quant_min, qp.quant_max)

    @staticmethod
    def symbolic(g: Any, x: Any, q: _ActQDQ) -> Any:
        qp = q.qp
        scale = g.op("Constant", value_t=torch.tensor(qp.scale, dtype=torch.float32))
        zp = g.op("Constant", value_t=torch.tensor(qp.zero_point, dtype=q.onnx_dtype))
        if not q.full_range:  # ONNX saturates at the full 8-bit range; the simulation at [qmin, qmax]
            lo = g.op("Constant", value_t=torch.tensor((qp.quant_min - qp.zero_point) * qp.scale, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor((qp.quant_max - qp.zero_point) * qp.scale, dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        # The attribute names the simulated quantizer; graph surgery reads it and removes it.
        q_node = g.op("QuantizeLinear", x, scale, zp, **{f"{POINT_ATTR}_s": q.point})
        return g.op("DequantizeLinear", q_node, scale, zp)


class _ActMarker(nn.Module):
    def __init__(self, q: _ActQDQ) -> None:
        super().__init__()
        self.q = q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QDQFunction.apply(x, self.q)


@dataclasses.dataclass(frozen=True, eq=False)
class _WeightQDQ:
    """An int8 weight and its (per-channel) scales, passed to ``symbolic`` as a Python value."""

    name: str
    qweight: torch.Tensor  # int8
    scale: torch.Tensor  # float32, [C] (per channel) or [] (per tensor)
    dequantized: torch.Tensor  # float32: exactly the simulation's fake-quantized weight


class _WeightDQFunction(torch.autograd.Function):
    """The simulated weight in torch; ``DequantizeLinear(int8 initializer, axis=0)`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, anchor: torch.Tensor, w: _WeightQDQ) -> torch.Tensor:  # type: ignore[override]
        return w.dequantized.clone()

    @staticmethod
    def symbolic(g: Any, anchor: Any, w: _WeightQDQ) -> Any:
        q = g.op("Constant", value_t=w.qweight)
        scale = g.op("Constant", value_t=w.scale)
        zp = g.op("Constant", value_t=torch.zeros(w.scale.shape, dtype=torch.int8))
        if w.scale.dim() == 0:
            return g.op("DequantizeLinear", q, scale, zp)
        return g.op("DequantizeLinear", q, scale, zp, axis_i=0)


def _weight_qdq(name: str, layer: QuantLayer) -> _WeightQDQ:
    fq = layer.weight_fq
    w = layer.base.weight.detach().float()
    with torch.no_grad():
        dequantized = fq(w).detach().clone()
    if fq.per_channel:
        scale = fq.scale.detach().float().clone()
        view = scale.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        scale = fq.scale.detach().float().reshape(())
        view = scale
    q = torch.clamp(torch.round(dequantized / view), -128, 127).to(torch.int8)
    return _WeightQDQ(name, q, scale, dequantized)


class _QDQLayer(nn.Module):
    """A QuantLayer computing with its int8 weight read through DequantizeLinear."""

    def __init__(self, name: str, layer: QuantLayer) -> None:
        super().__init__()
        base = layer.base
        self.kind = "linear" if isinstance(base, nn.Linear) else "conv"
        self.conv = base if self.kind == "conv" else None  # for _conv_forward (stride, padding, ...)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        self.relu = layer.fused_relu
        self.w = _weight_qdq(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _WeightDQFunction.apply(x, self.w)
        y = F.linear(x, w, self.bias) if self.kind == "linear" else self.conv._conv_forward(x, w, self.bias)
        return F.relu(y) if self.relu else y


def _qdq_module(sim: GraphModule) -> tuple[GraphModule, dict[str, int]]:
    """A copy of the simulated graph whose quantizers/quantized layers export as QDQ."""
    graph = torch.fx.Graph()
    copied: dict[Node, Node] = {}
    graph.output(graph.graph_copy(sim.graph, copied))
    sim_name = {new: old.name for old, new in copied.items()}
    root: dict[str, Any] = {}
    counts = {"activation_quantizers": 0, "int8_layers": 0}
    for n in list(graph.nodes):
        if n.op == "call_module":
            target = str(n.target)
            m = sim.get_submodule(target)
            if isinstance(m, ActFakeQuant):
                root[target] = _ActMarker(_ActQDQ(sim_name[n], m.qparams))
                counts["activation_quantizers"] += 1
            elif isinstance(m, QuantLayer):
                root[target] = _QDQLayer(target, m)
                counts["int8_layers"] += 1
            else:
                root[target] = m
        elif n.op == "get_attr":
            obj: Any = sim
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            root[str(n.target)] = obj
    gm = GraphModule(root, graph, class_name="QDQExport")
    gm.graph.lint()
    gm.recompile()
    return gm.eval(), counts


# ---------------------------------------------------------------------------------------
# Graph surgery, by the policy


def _const_value(t: Any) -> Any:
    import numpy as np
    import onnx_graphsurgeon as gs

    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def _constants_to_initializers(graph: Any) -> None:
    """Constant nodes (what ``symbolic`` emits) become initializers: the int8 weights are stored as such."""
    import onnx_graphsurgeon as gs

    for node in [n for n in graph.nodes if n.op == "Constant"]:
        value, out = node.attrs.get("value"), node.outputs[0]
        if isinstance(value, gs.Constant) and out not in graph.outputs:
            node.outputs.clear()  # the node goes at the next cleanup()
            out.to_constant(value.values)


def _qparams_of(node: Any) -> tuple[Any, Any] | None:
    """(scale, zero point) constants of a per-tensor Q/DQ node."""
    if len(node.inputs) < 3:
        return None
    scale, zp = _const_value(node.inputs[1]), _const_value(node.inputs[2])
    if scale is None or zp is None or scale.size != 1 or zp.size != 1:
        return None
    return scale, zp


def _drop_redundant_activations(graph: Any) -> int:
    """Remove a Relu/Clip right before a QuantizeLinear whose saturation already does its job.

    ``Q(relu(x)) == Q(x)`` when the zero point is the lowest code (zero maps to qmin, and
    everything below saturates to it); ``Q(clip(x, lo, hi)) == Q(x)`` when also
    ``round(hi/scale) + zp >= qmax``. Then ``DQ → Conv/Add → Q`` fuses in ONNX Runtime.
    """
    import numpy as np

    removed = 0
    for q in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
        x = q.inputs[0]
        if len(x.inputs) != 1 or len(x.outputs) != 1 or x in graph.outputs:
            continue
        act = x.inputs[0]
        if act.op not in ("Relu", "Clip") or not act.inputs:
            continue
        params = _qparams_of(q)
        if params is None:
            continue
        scale, zp = float(params[0].reshape(())), int(params[1].reshape(()))
        qmin, qmax = (0, 255) if params[1].dtype == np.uint8 else (-128, 127)
        if zp != qmin:
            continue
        if act.op == "Clip":
            lo = _const_value(act.inputs[1]) if len(act.inputs) > 1 and act.inputs[1].name else np.array(-np.inf)
            hi = _const_value(act.inputs[2]) if len(act.inputs) > 2 and act.inputs[2].name else np.array(np.inf)
            if lo is None or hi is None or float(lo) != 0.0:
                continue
            if np.isfinite(float(hi)) and round(float(hi) / scale) + zp < qmax:
                continue
        q.inputs[0] = act.inputs[0]
        act.outputs.clear()
        removed += 1
    return removed


def _requantize_after(graph: Any, ops: frozenset[str]) -> int:
    """After ``ops`` (data movement) reading a DequantizeLinear, a Q/DQ pair with the same qparams.

    Exact (the values stay on the grid), and it keeps every quantized op's inputs coming
    from DequantizeLinear: ``DQ → MaxPool → Q → DQ → Conv`` lets ONNX Runtime run the pool
    on 8-bit values and fuse the conv.
    """
    import onnx_graphsurgeon as gs

    graph.toposort()
    inserted = 0
    for node in list(graph.nodes):
        if node.op not in ops or not node.inputs:
            continue
        src = node.inputs[0]
        if len(src.inputs) != 1 or src.inputs[0].op != "DequantizeLinear":
            continue
        dq = src.inputs[0]
        params = _qparams_of(dq)
        if params is None:
            continue
        scale, zp = dq.inputs[1], dq.inputs[2]
        for k, out in enumerate(list(node.outputs)):
            if out.outputs and all(c.op == "QuantizeLinear" for c in out.outputs) and out not in graph.outputs:
                continue  # already quantized right after (by the program's own quantizer)
            # typed from the qparams (ONNX: a QuantizeLinear's output has its zero point's type, a
            # DequantizeLinear's its scale's), not from the neighbours: the exporter leaves
            # intermediate tensors untyped, and a new graph output must carry a dtype
            raw = gs.Variable(f"{out.name}_raw", dtype=params[0].dtype, shape=out.shape)
            quant = gs.Variable(f"{out.name}_q", dtype=params[1].dtype, shape=out.shape)
            node.outputs[k] = raw
            graph.layer(op="QuantizeLinear", name=f"{node.name}_requant_{k}", inputs=[raw, scale, zp], outputs=[quant])
            graph.layer(op="DequantizeLinear", name=f"{node.name}_dequant_{k}", inputs=[quant, scale, zp], outputs=[out])
            inserted += 1
        graph.toposort()
    return inserted


def _pin_fp32_layers(graph: Any) -> int:
    """Keep fp32 conv/gemm layers (``skip``/``keep_fp32``) in fp32 under ONNX Runtime.

    ORT's ``WeightBiasQuantization`` quantizes the float weight of any Conv/Gemm whose
    input comes from a per-tensor DequantizeLinear (per tensor, its own scale): a layer
    the user kept in fp32 would silently run int8. Such a layer reads its input through a
    per-channel DequantizeLinear (``axis=1``, the same scale and zero point repeated),
    which computes the same values and which that transformer leaves alone. (A
    single-channel input cannot be pinned: a 1-element scale counts as per-tensor.)
    """
    import numpy as np
    import onnx_graphsurgeon as gs

    pinned = 0
    for node in [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "Gemm")]:
        if len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if not isinstance(w, gs.Constant) or np.asarray(w.values).dtype != np.float32:
            continue  # int8 layers read their weight through DequantizeLinear
        if len(x.inputs) != 1 or x.inputs[0].op != "DequantizeLinear" or _qparams_of(x.inputs[0]) is None:
            continue
        shape = w.shape
        if node.op == "Conv":
            channels = shape[1] * int(node.attrs.get("group", 1))
        elif node.op == "ConvTranspose":
            channels = shape[0]
        else:
            if int(node.attrs.get("transA", 0)):
                continue
            channels = shape[1] if int(node.attrs.get("transB", 0)) else shape[0]
        if channels <= 1:
            continue
        dq = x.inputs[0]
        scale, zp = _qparams_of(dq)
        out = gs.Variable(f"{x.name}_fp32_in_{pinned}", dtype=x.dtype, shape=x.shape)
        graph.layer(
            op="DequantizeLinear", name=f"{node.name}_input_dequant", attrs={"axis": 1},
            inputs=[dq.inputs[0],
                    gs.Constant(f"{out.name}_scale", np.full(channels, scale.reshape(()), dtype=np.float32)),
                    gs.Constant(f"{out.name}_zero_point", np.full(channels, zp.reshape(()), dtype=zp.dtype))],
            outputs=[out])
        node.inputs[0] = out
        pinned += 1
    graph.toposort()
    return pinned


#: Ops that scale/shift their input by constants (per channel or per tensor).
AFFINE_OPS = frozenset({"BatchNormalization", "Mul", "Add", "Sub", "Div"})


def _affine_by_constants(node: Any) -> bool:
    import onnx_graphsurgeon as gs

    if node.op == "BatchNormalization":
        return True
    return node.op in AFFINE_OPS and len(node.inputs) == 2 and any(isinstance(t, gs.Constant) for t in node.inputs)


def _float_concats_before_affine(graph: Any, points: dict[str, dict[str, Any]]) -> list[str]:
    """Drop the pair on a multi-input Concat's output that an affine op with constants reads; the dropped points.

    The pattern ``Concat(a, b) → Q/DQ → BatchNorm → Q/DQ → Conv`` (DenseNet-121's pre-activation
    BN-ReLU-conv over the concatenated features; the ReLU is folded into the second pair) makes
    OpenVINO 2026.4.1's ``MoveFakeQuantize`` (it moves a FakeQuantize after a Concat onto the
    Concat's inputs) dereference a null node whenever the first pair's zero point is not 0; a
    one-input Concat, a Conv reading the pair, or no pair after the affine op compile. Without the
    pair the affine op reads the concatenation of its inputs' own Q/DQ values, in float (what
    OpenVINO's NNCF does: it quantizes the inputs of Conv/MatMul, not of a BatchNorm); the Conv after
    still reads its own pair and runs int8. Applied whatever the zero point, so the placement does
    not depend on calibration.
    """
    from graphopt.backends._trt_placement import _drop_pair, _pair_input

    point_of = {p["tensor"]: name for name, p in points.items()}
    dropped = []
    for dq in [n for n in graph.nodes if n.op == "DequantizeLinear" and _pair_input(n) is not None]:
        src = _pair_input(dq).inputs
        if len(src) != 1 or src[0].op != "Concat" or len(src[0].inputs) < 2:
            continue
        if any(_affine_by_constants(c) for c in dq.outputs[0].outputs):
            _drop_pair(graph, dq)
            dropped.append(point_of.get(dq.inputs[0].name, dq.inputs[0].name))
    graph.cleanup()
    return dropped


def _collect_points(graph: Any) -> dict[str, dict[str, Any]]:
    """{simulated quantizer node: its QuantizeLinear's output tensor and qparams}; drops the tag attribute."""
    points: dict[str, dict[str, Any]] = {}
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or POINT_ATTR not in node.attrs:
            continue
        point = str(node.attrs.pop(POINT_ATTR))
        params = _qparams_of(node)
        if params is None:
            continue
        points[point] = {"tensor": node.outputs[0].name, "scale": float(params[0].reshape(())),
                         "zero_point": int(params[1].reshape(())), "dtype": str(params[1].dtype)}
    return points


def _shape(model_bytes: bytes, policy: QDQPolicy, sim: GraphModule) -> tuple[Any, dict[str, int], dict[str, dict[str, Any]]]:
    """The exported Q/DQ model shaped for ``policy``'s runtime: (model, surgery counts, points).

    Where the policy drops pairs (``only_where_consumed``), the simulated program ``sim`` is
    changed to compute the same.
    """
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load_from_string(model_bytes))
    _constants_to_initializers(graph)
    graph.cleanup()
    points = _collect_points(graph)
    stats: dict[str, int] = {}
    if policy.only_where_consumed:
        from graphopt.backends._trt_placement import mirror_on_simulation, place_for_tensorrt

        placement = place_for_tensorrt(graph, points)
        mirror_on_simulation(sim, placement)
        stats.update(placement.stats())
    if policy.float_concat_before_affine:
        from graphopt.backends._trt_placement import Placement, mirror_on_simulation

        dropped = _float_concats_before_affine(graph, points)
        if dropped:  # (other models' manifests and simulations stay as they were)
            mirror_on_simulation(sim, Placement(dropped=dropped))
            stats["float_concats_before_affine"] = len(dropped)
    if policy.fold_activations:
        stats["relu_clip_absorbed"] = _drop_redundant_activations(graph)
    graph.cleanup()
    if policy.requantize_after:
        stats["requantized_data_movement"] = _requantize_after(graph, policy.requantize_after)
    if policy.pin_fp32_layers:
        stats["pinned_fp32_layers"] = _pin_fp32_layers(graph)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=True)
    model.opset_import[0].version = max(model.opset_import[0].version, OPSET)
    if policy.high_precision == "fp16":
        from graphopt.backends._trt_placement import to_fp16

        model = to_fp16(model, policy.runtime)
    alive = {o for n in model.graph.node for o in n.output}
    return model, stats, {k: v for k, v in points.items() if v["tensor"] in alive}


def _qdq_stats(model: Any) -> dict[str, int]:
    import onnx

    init_types = {i.name: i.data_type for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    int8_weights = sum(
        1 for n in model.graph.node
        if n.op_type == "DequantizeLinear" and init_types.get(n.input[0]) == onnx.TensorProto.INT8
        and any(d.dims and len(d.dims) >= 2 for d in model.graph.initializer if d.name == n.input[0])
    )
    return {"quantize_linear": ops.count("QuantizeLinear"), "dequantize_linear": ops.count("DequantizeLinear"),
            "int8_weights": int8_weights}


# ---------------------------------------------------------------------------------------
# Entry point


def export_int8(program: Program, policy: QDQPolicy, what: str) -> tuple[bytes, dict[str, Any], pytree.TreeSpec]:
    """ONNX Q/DQ bytes of a simulated-int8 program (its own qparams), manifest fields, output structure.

    The export traces plain fake-quantization: any strategy a lowering installed on the
    program is cleared first. ``what``: the target, for messages.
    """
    info: QuantInfo | None = program.meta.get(META_KEY)
    if info is None:
        raise UsageError(f"{what} lowers simulated-int8 programs: put insert-quant-stubs in the pipeline")
    scheme = info.config.activations
    if scheme not in policy.activations:
        raise UsageError(f"{what}: {policy.runtime} does not run activations={scheme}; valid: {choices(policy.activations)}")
    if policy.only_where_consumed and info.config.reduce_range:
        raise UsageError(f"{what}: {policy.runtime} quantizes to the full int8 range; drop reduce_range from insert-quant-stubs")
    clear_kernel_arithmetic(program.graph_module)
    gm, counts = _qdq_module(program.graph_module)
    example = tuple(t.detach() for t in program.example_inputs)
    names = [s.name for s in program.input_specs]
    data, exporter, opset, spec = _export(gm, example, names, what=what, allow_dynamo=False)
    model, surgery, points = _shape(data, policy, program.graph_module)
    _check(model, what)
    fields = {
        "exporter": exporter,
        "opset": max(opset, model.opset_import[0].version),
        "activations": scheme,
        "reduce_range": info.config.reduce_range,
        "weights": "int8 symmetric " + ("per-channel (axis 0)" if info.config.per_channel else "per-tensor"),
        "qdq": {**_qdq_stats(model), **counts, **surgery},
        "points": points,
    }
    return model.SerializeToString(), fields, spec
