"""ort-fp32 and ort-int8: ONNX models run by ONNX Runtime on the CPU.

**ort-fp32** exports the optimized fx program with ``torch.onnx.export`` (the TorchScript
exporter, ``dynamo=False``, opset :data:`OPSET`, the fixed input shapes of
``program.input_specs``; where that exporter fails, the torch.export-based one is
tried), checks it with ``onnx.checker`` and runs it in an ``InferenceSession``
(``ORT_ENABLE_ALL``, one intra-op thread per core, ``CPUExecutionProvider``).

**ort-int8** lowers the *simulated int8* program (``insert-quant-stubs``) to an ONNX QDQ
model built from the program's own calibrated qparams (ONNX Runtime's quantizer is never
asked for any):

- every enabled :class:`~graphopt.quant.ActFakeQuant` exports as a
  ``QuantizeLinear → DequantizeLinear`` pair with its scale and zero point (``uint8``
  for the ``u8`` scheme, ``int8`` with zero point 0 for ``s8``; a reduced range gets a
  ``Clip`` before the pair, since ONNX saturates at the full 8-bit range);
- every :class:`~graphopt.quant.QuantLayer` exports its conv/linear with an ``int8``
  weight initializer read through ``DequantizeLinear`` (per output channel: ``axis=0``);
  the bias stays fp32 (ONNX Runtime's ``WeightBiasQuantization`` turns it into the
  int32 bias of ``QLinearConv``/``QGemm``, rounded to steps of input scale x weight
  scale, which :func:`set_ort_arithmetic` models);
- onnx-graphsurgeon then shapes the graph for ONNX Runtime's QDQ fusions: a ReLU/Clip
  between an op and its ``QuantizeLinear`` is dropped where the quantizer's own
  saturation makes it redundant (zero point at the bottom of the range), so
  ``DQ → Conv/Add → Q`` groups fuse into ``QLinearConv``/``QLinearAdd``; and after every
  data-movement op that reads a dequantized value (``MaxPool``, ``Reshape``,
  ``Transpose``, ``Flatten``, ``Split``, ``Slice``…) a Q/DQ pair with the *same* qparams
  is inserted — exact, as those ops keep values on the grid — so the next conv still
  reads ``DequantizeLinear`` and the data-movement op runs on 8-bit values; layers the
  program keeps in fp32 read their input through a per-channel DequantizeLinear, which
  stops ONNX Runtime from quantizing their weights on its own.

Every simulated quantizer is tied to the ONNX tensor holding its 8-bit value (the
manifest's ``points``). ``OrtArtifact.graph_module``/``points`` expose them as an fx
graph, so :func:`graphopt.quant.verify_int8` holds every quantized op to its own output
steps (``check_lowering_local``). After the export the simulated program is made to
round as ONNX Runtime's kernels do (:func:`set_ort_arithmetic`); where every quantized op
is modelled the artifact says so (``exact_simulation``) and the compile also holds it to
2 output steps end to end (it matches bit for bit); the manifest's ``not_bit_exact``
lists the ops that are not.

Both targets save ``model.onnx`` (+ ``artifact.json``); ``run(*inputs)`` returns torch
tensors in the structure the original model returns (recorded as a pytree spec).

Backend options (``program.meta['backend_options']``): ``threads`` (intra-op threads;
default: this machine's cores).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.errors import ArtifactError, LoweringError, UsageError, choices
from graphopt.program import InputSpec, Program
from graphopt.quant import (
    META_KEY,
    ActFakeQuant,
    KernelArithmetic,
    OpKind,
    PoolRounding,
    QParams,
    QuantLayer,
    absorbable_activation,
    clear_kernel_arithmetic,
    op_kind,
    pool_window,
    quantizer_of,
)
from graphopt.targets import Artifact, BackendOption, TargetSpec, register_target

__all__ = [
    "OPSET",
    "MODEL_FILE",
    "OnnxExportError",
    "OrtArtifact",
    "OrtBackend",
    "export_fp32",
    "export_int8",
    "ort_fp32",
    "ort_int8",
]

MODEL_FILE = "model.onnx"
#: Opset of the TorchScript exporter (QuantizeLinear/DequantizeLinear with ``axis``
#: need 13; 17 is the newest all of onnx/onnxruntime/TensorRT read without surprises).
OPSET = 17
#: The torch.export-based exporter (fallback for fp32 only) starts at 18.
DYNAMO_OPSET = 18
BACKEND_OPTIONS = ("threads",)
#: Temporary attribute on exported QuantizeLinear nodes: the simulated quantizer they stand for.
POINT_ATTR = "graphopt_point"

#: ONNX ops that only move, select or reorder values (and Relu, MaxPool): a value on an
#: 8-bit grid stays on it, so a Q/DQ pair with the same qparams after them is exact.
DATA_MOVEMENT_OPS = frozenset(
    {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split", "Gather", "Identity",
     "Relu", "Expand", "Tile", "DepthToSpace", "SpaceToDepth"}
)


class OnnxExportError(LoweringError):
    """The program could not be turned into an ONNX model (names the node at fault)."""


# ---------------------------------------------------------------------------------------
# Availability (imports are lazy: this module loads without onnx/onnxruntime)


def _missing(modules: tuple[str, ...]) -> str | None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or a broken install raising something else
            missing.append(name)
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (pip install 'graphopt[onnx]')"
    return None


def default_threads() -> int:
    """This machine's cores (those this process may run on, where the OS says)."""
    count = getattr(os, "process_cpu_count", None)
    if count is not None and count():
        return int(count())
    try:
        return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------
# Export helpers


class _Flat(nn.Module):
    """Returns the program's output leaves as a flat tuple (ONNX outputs are a flat list)."""

    def __init__(self, gm: nn.Module) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pytree.tree_leaves(self.gm(*inputs)))


def _output_spec(gm: nn.Module, example: tuple[torch.Tensor, ...]) -> tuple[pytree.TreeSpec, int]:
    with torch.no_grad():
        out = gm(*example)
    leaves, spec = pytree.tree_flatten(out)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        raise OnnxExportError(f"the model returns non-tensor values ({', '.join(sorted(set(bad)))}); ONNX outputs are tensors only")
    if not leaves:
        raise OnnxExportError("the model returns no tensor")
    return spec, len(leaves)


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation, tracer warnings
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return line if len(line) <= 300 else line[:299] + "…"


def _torchscript_export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                        output_names: list[str], opset: int = OPSET) -> bytes:
    buf = io.BytesIO()
    # On failure the exporter prints the whole TorchScript graph to stdout.
    with _quiet_export(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, example, buf, dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, do_constant_folding=True)
    return buf.getvalue()


def _dynamo_export(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                   output_names: list[str]) -> bytes:
    import logging

    quiet = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.CRITICAL)
    try:
        with _quiet_export(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            prog = torch.onnx.export(module, example, dynamo=True, opset_version=DYNAMO_OPSET, input_names=input_names,
                                     output_names=output_names, verbose=False, report=False)
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return prog.model_proto.SerializeToString()


def _describe(gm: GraphModule, n: Node) -> str:
    if n.op == "call_module":
        m = gm.get_submodule(str(n.target))
        what = f"module '{n.target}' ({type(m).__module__}.{type(m).__qualname__})"
    elif n.op == "call_function":
        module = getattr(n.target, "__module__", None)
        name = getattr(n.target, "__name__", None) or repr(n.target)
        what = f"call to {module + '.' if module else ''}{name}"
    else:
        what = f"method '.{n.target}()'"
    line = (n.stack_trace or "").strip().splitlines()
    where = f" at {line[-2].strip()}" if len(line) >= 2 else ""
    return f"node '{n.name}' ({what}){where}"


class _OneNode(nn.Module):
    """One fx node as a module, its tensor arguments as inputs (for diagnosis)."""

    def __init__(self, gm: GraphModule, n: Node, values: dict[Node, Any]) -> None:
        super().__init__()
        self.gm, self.node = gm, n
        self.tensor_args = [a for a in dict.fromkeys(_nodes_in((n.args, n.kwargs))) if isinstance(values.get(a), torch.Tensor)]
        self.values = values

    def forward(self, *tensors: torch.Tensor) -> Any:
        env = dict(zip(self.tensor_args, tensors))
        fill = lambda a: env[a] if a in env else self.values[a]  # noqa: E731
        args = torch.fx.node.map_arg(self.node.args, fill)
        kwargs = torch.fx.node.map_arg(self.node.kwargs, fill)
        n = self.node
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        return getattr(args[0], str(n.target))(*args[1:], **kwargs)


def _nodes_in(a: Any) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg(a, lambda x: found.append(x) or x)
    return found


def _diagnose(gm: GraphModule, example: tuple[torch.Tensor, ...]) -> str | None:
    """The first fx node that does not export on its own, described; None if all do."""
    values: dict[Node, Any] = {}

    class _Record(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            values[n] = out
            return out

    try:
        with torch.no_grad():
            _Record(gm).run(*example)
    except Exception as exc:  # the graph does not even run: name where
        bad = next((n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and n not in values), None)
        return f"{_describe(gm, bad)} fails to run: {_first_line(exc)}" if bad is not None else None
    for n in gm.graph.nodes:
        if n.op not in ("call_module", "call_function", "call_method"):
            continue
        out = values.get(n)
        if not (isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and out and all(isinstance(t, torch.Tensor) for t in out))):
            continue
        one = _OneNode(gm, n, values)
        inputs = tuple(values[a] for a in one.tensor_args)
        if not inputs:
            continue
        try:
            _torchscript_export(_Flat(one), inputs, [f"in_{i}" for i in range(len(inputs))],
                                [f"out_{i}" for i in range(len(pytree.tree_leaves(out)))])
        except Exception as exc:
            return f"{_describe(gm, n)}: {_first_line(exc)}"
    return None


def _export(gm: GraphModule, example: tuple[torch.Tensor, ...], input_names: list[str], *, what: str,
            allow_dynamo: bool) -> tuple[bytes, str, int, pytree.TreeSpec]:
    """(ONNX bytes, exporter name, opset, output spec) of ``gm``."""
    spec, n_out = _output_spec(gm, example)
    output_names = [f"output_{i}" for i in range(n_out)]
    wrapper = _Flat(gm).eval()
    try:
        return _torchscript_export(wrapper, example, input_names, output_names), "torchscript", OPSET, spec
    except Exception as exc:
        first = exc
    if allow_dynamo:
        try:
            return _dynamo_export(wrapper, example, input_names, output_names), "dynamo", DYNAMO_OPSET, spec
        except Exception:
            pass
    where = _diagnose(gm, example)
    if where:
        raise OnnxExportError(f"{what}: cannot export {where} (torch.onnx, opset {OPSET})") from None
    raise OnnxExportError(f"{what}: torch.onnx.export failed: {type(first).__name__}: {_first_line(first)}") from None


def _check(model: Any, what: str) -> None:
    import onnx

    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxExportError(f"{what}: the exported ONNX model does not pass onnx.checker: {_first_line(exc)}") from None


# ---------------------------------------------------------------------------------------
# int8: fake-quant modules -> exportable QDQ markers


@dataclasses.dataclass(frozen=True, eq=False)
class _ActQDQ:
    """An activation quantizer, as a plain Python value the exporter passes to ``symbolic``."""

    point: str  # the simulated graph's quantizer node
    scale: float
    zero_point: int
    quant_min: int
    quant_max: int

    @property
    def onnx_dtype(self) -> torch.dtype:
        return torch.uint8 if self.quant_min >= 0 else torch.int8

    @property
    def full_range(self) -> bool:
        return (self.quant_min, self.quant_max) in ((0, 255), (-128, 127))


class _QDQFunction(torch.autograd.Function):
    """fake-quant in torch; ``[Clip →] QuantizeLinear → DequantizeLinear`` in ONNX."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q: _ActQDQ) -> torch.Tensor:  # type: ignore[override]
        return torch.fake_quantize_per_tensor_affine(x, q.scale, q.zero_point, q.quant_min, q.quant_max)

    @staticmethod
    def symbolic(g: Any, x: Any, q: _ActQDQ) -> Any:
        scale = g.op("Constant", value_t=torch.tensor(q.scale, dtype=torch.float32))
        zp = g.op("Constant", value_t=torch.tensor(q.zero_point, dtype=q.onnx_dtype))
        if not q.full_range:  # ONNX saturates at the full 8-bit range; the simulation at [qmin, qmax]
            lo = g.op("Constant", value_t=torch.tensor((q.quant_min - q.zero_point) * q.scale, dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor((q.quant_max - q.zero_point) * q.scale, dtype=torch.float32))
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
    counts = {"activation_quantizers": 0, "int8_layers": 0, "float_layers": 0}
    for n in list(graph.nodes):
        if n.op == "call_module":
            target = str(n.target)
            m = sim.get_submodule(target)
            if isinstance(m, ActFakeQuant):
                if not m.enabled:
                    n.replace_all_uses_with(n.args[0])
                    graph.erase_node(n)
                    continue
                qp: QParams = m.qparams
                root[target] = _ActMarker(_ActQDQ(sim_name[n], qp.scale, qp.zero_point, qp.quant_min, qp.quant_max))
                counts["activation_quantizers"] += 1
            elif isinstance(m, QuantLayer):
                if m.enabled:
                    root[target] = _QDQLayer(target, m)
                    counts["int8_layers"] += 1
                else:
                    root[target] = m.layer
                    counts["float_layers"] += 1
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
# int8: graph surgery for ONNX Runtime's QDQ fusions


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
        value = node.attrs.get("value")
        if not isinstance(value, gs.Constant):
            continue
        out = node.outputs[0]
        if out in graph.outputs:
            continue
        const = gs.Constant(out.name, values=value.values)
        for consumer in list(out.outputs):
            for i, inp in enumerate(consumer.inputs):
                if inp is out:
                    consumer.inputs[i] = const
        node.outputs.clear()


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


def _requantize_data_movement(graph: Any) -> int:
    """After data-movement ops reading a DequantizeLinear, a Q/DQ pair with the same qparams.

    Exact (the values stay on the grid), and it keeps every quantized op's inputs coming
    from DequantizeLinear: ``DQ → MaxPool → Q → DQ → Conv`` lets ONNX Runtime run the pool
    on 8-bit values and fuse the conv.
    """
    import onnx_graphsurgeon as gs

    graph.toposort()
    inserted = 0
    for node in list(graph.nodes):
        if node.op not in DATA_MOVEMENT_OPS or not node.inputs:
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
            raw = gs.Variable(f"{out.name}_raw", dtype=out.dtype, shape=out.shape)
            quant = gs.Variable(f"{out.name}_q", dtype=dq.inputs[0].dtype, shape=out.shape)
            node.outputs[k] = raw
            graph.nodes.append(gs.Node("QuantizeLinear", f"{node.name}_requant_{k}", inputs=[raw, scale, zp], outputs=[quant]))
            graph.nodes.append(gs.Node("DequantizeLinear", f"{node.name}_dequant_{k}", inputs=[quant, scale, zp], outputs=[out]))
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
        graph.nodes.append(gs.Node(
            "DequantizeLinear", f"{node.name}_input_dequant", attrs={"axis": 1},
            inputs=[dq.inputs[0],
                    gs.Constant(f"{out.name}_scale", np.full(channels, scale.reshape(()), dtype=np.float32)),
                    gs.Constant(f"{out.name}_zero_point", np.full(channels, zp.reshape(()), dtype=zp.dtype))],
            outputs=[out]))
        node.inputs[0] = out
        pinned += 1
    graph.toposort()
    return pinned


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


def _shape_for_ort(model_bytes: bytes, *, pin_fp32_layers: bool = True) -> tuple[Any, dict[str, int], dict[str, dict[str, Any]]]:
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.load_from_string(model_bytes))
    _constants_to_initializers(graph)
    graph.cleanup()
    points = _collect_points(graph)
    stats = {"relu_clip_absorbed": _drop_redundant_activations(graph)}
    graph.cleanup()
    stats["requantized_data_movement"] = _requantize_data_movement(graph)
    if pin_fp32_layers:
        stats["pinned_fp32_layers"] = _pin_fp32_layers(graph)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph, do_type_check=True)
    model.opset_import[0].version = max(model.opset_import[0].version, OPSET)
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
# Export entry points


def export_fp32(program: Program) -> tuple[bytes, dict[str, Any], pytree.TreeSpec]:
    """ONNX bytes of the (fp32) program, manifest fields, output structure."""
    import onnx

    gm = program.graph_module.eval()
    example = tuple(t.detach() for t in program.example_inputs)
    names = [s.name for s in program.input_specs]
    data, exporter, opset, spec = _export(gm, example, names, what="ort-fp32", allow_dynamo=True)
    model = onnx.load_from_string(data)
    _check(model, "ort-fp32")
    return data, {"exporter": exporter, "opset": opset}, spec


def export_int8(program: Program, *, pin_fp32_layers: bool = True) -> tuple[bytes, dict[str, Any], pytree.TreeSpec]:
    """ONNX QDQ bytes of a simulated-int8 program (its own qparams), manifest fields, output structure.

    ``pin_fp32_layers``: make layers kept in fp32 stay fp32 under ONNX Runtime (see
    :func:`_pin_fp32_layers`; it uses per-channel activation DequantizeLinear, which a
    runtime other than ORT may not take).
    """
    info = program.meta.get(META_KEY)
    if info is None:
        raise UsageError("ort-int8 lowers simulated-int8 programs: put insert-quant-stubs in the pipeline")
    scheme = info["config"]["activations"]
    clear_kernel_arithmetic(program.graph_module)  # the export traces plain fake-quantization
    gm, counts = _qdq_module(program.graph_module)
    example = tuple(t.detach() for t in program.example_inputs)
    names = [s.name for s in program.input_specs]
    data, exporter, opset, spec = _export(gm, example, names, what="ort-int8", allow_dynamo=False)
    model, surgery, points = _shape_for_ort(data, pin_fp32_layers=pin_fp32_layers)
    _check(model, "ort-int8")
    fields = {
        "exporter": exporter,
        "opset": opset,
        "activations": scheme,
        "reduce_range": bool(info["config"].get("reduce_range", False)),
        "weights": "int8 symmetric " + ("per-channel (axis 0)" if info["config"].get("per_channel", True) else "per-tensor"),
        "qdq": {**_qdq_stats(model), **counts, **surgery},
        "points": points,
        # s8 activations keep a ReLU before their symmetric quantizers, which ONNX Runtime
        # does not fuse: not modelled (measured 2-4 output steps end to end)
        "not_bit_exact": set_ort_arithmetic(program.graph_module) if scheme == "u8" else ["activations=s8"],
    }
    return model.SerializeToString(), fields, spec


def set_ort_arithmetic(sim: GraphModule) -> list[str]:
    """Make the simulated program round as ONNX Runtime's int8 kernels do; return what is not modelled.

    Measured against onnxruntime 1.32 (``tests/backends/test_ort.py``): QLinearConv and
    QGemm take the fp32 bias as int32 at steps of ``s_in * s_w`` and requantize with one
    float32 multiplier (:class:`~graphopt.quant.KernelArithmetic` ``ort``);
    QLinearGlobalAveragePool and QLinearAveragePool round as
    :class:`~graphopt.quant.PoolRounding` ``ort-global``/``ort-average``; QuantizeLinear
    and QLinearConcat divide by the scale (``quantize_rounding="onnx"``); QLinearAdd is
    computed from its operands' integers (``ActFakeQuant.qlinear_add``). Not modelled:
    QLinearMul, quantized BatchNorm, a ReLU/ReLU6 that stays in the graph, an add whose
    operands pass through other ops first, and fp32 ops ONNX Runtime may fuse into lookup
    tables (QLinearSigmoid...) — where any is present, verification holds ops one by one
    only.
    """
    def fq_of(n: Node | None) -> ActFakeQuant | None:
        fq = quantizer_of(sim, n)
        return fq if fq is not None and fq.enabled else None

    def input_fq(n: Node) -> ActFakeQuant | None:
        while isinstance(n, Node) and fq_of(n) is None and op_kind(sim, n) is OpKind.PASSTHROUGH:
            n = n.args[0]
        return fq_of(n)

    unmodelled: list[str] = []
    handled: set[Node | None] = set()  # activations absorbed into the op before them
    for n in sim.graph.nodes:
        if n in handled:
            continue
        kind = op_kind(sim, n)
        users = list(n.users)
        if kind is OpKind.WEIGHTED and isinstance(sim.get_submodule(str(n.target)), QuantLayer):
            act = absorbable_activation(sim, n)
            handled.add(act)
            end_users = list((act or n).users)
            fin, fout = input_fq(n.args[0]), fq_of(end_users[0]) if len(end_users) == 1 else None
            if fin is None or fout is None or fout.inherit is not None:
                continue  # runs in fp32 under ONNX Runtime too
            if act is not None and not _folded(sim, act, fout.qparams):
                unmodelled.append(n.name)  # the ReLU/Clip stays in the graph: not QLinearConv's arithmetic
                continue
            sim.get_submodule(str(n.target)).arithmetic = KernelArithmetic("ort", fin.qparams, fout.qparams)
        elif kind is OpKind.ANCHOR:
            act = absorbable_activation(sim, n)
            handled.add(act)
            end_users = list((act or n).users)
            out = fq_of(end_users[0]) if len(end_users) == 1 else None
            if out is None:
                continue  # an fp32 result
            operands = [_integer_path(sim, a, fq_of) for a in n.args] if len(n.args) == 2 else []
            relu_folded = act is None or (_is_relu(sim, act) and _folded(sim, act, out.qparams))
            if n.op == "call_function" and n.target in (torch.cat, torch.concat, torch.concatenate) and act is None:
                out.quantize_rounding = "onnx"  # QLinearConcat
            elif _is_add(n) and relu_folded and operands and all(o is not None for o in operands):
                for fq, _ in operands:  # QLinearAdd reads their integers
                    fq.stash = True
                out.qlinear_add = (operands[0][0], operands[1][0])
                out.qlinear_add_paths = (operands[0][1], operands[1][1])
            else:
                unmodelled.append(n.name)
        elif kind is OpKind.REQUANT and len(users) == 1 and fq_of(users[0]) is not None:
            m = sim.get_submodule(str(n.target)) if n.op == "call_module" else None
            size = pool_window(sim, n)
            if size is not None and isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
                fq_of(users[0]).pool_rounding = PoolRounding(size, (), "ort-global")
            elif size is not None and isinstance(m, nn.AvgPool2d):
                fq_of(users[0]).pool_rounding = PoolRounding(size, (), "ort-average")
            else:
                unmodelled.append(n.name)
        elif n.op in ("placeholder", "call_function", "call_method", "call_module") and kind is OpKind.FLOAT:
            for u in users:
                fq = fq_of(u)
                if fq is not None and fq.inherit is None:
                    fq.quantize_rounding = "onnx"  # QuantizeLinear
                    if n.op != "placeholder":
                        unmodelled.append(u.name)  # ONNX Runtime may fuse the fp32 op into a lookup table
    return sorted(set(unmodelled))


_INTEGER_MOVES = (nn.MaxPool1d, nn.MaxPool2d, nn.Flatten, nn.Identity, nn.Dropout)


def _integer_path(sim: GraphModule, n: Node, fq_of) -> tuple[ActFakeQuant, tuple[tuple[Any, tuple[Any, ...]], ...]] | None:
    """The quantizer behind ``n`` and the data-movement ops between, replayable on integers.

    Max pooling, flattening and reshaping move integers exactly as they move the values
    they stand for; anything else (or an op with a computed argument) gives None.
    """
    path: list[tuple[Any, tuple[Any, ...]]] = []
    while isinstance(n, Node) and fq_of(n) is None:
        if any(isinstance(a, Node) for a in list(n.args[1:]) + list(n.kwargs.values())):
            return None
        m = sim.get_submodule(str(n.target)) if n.op == "call_module" else None
        if isinstance(m, _INTEGER_MOVES) and not getattr(m, "return_indices", False):
            path.append((m, ()))
        elif n.op == "call_function" and n.target in (F.max_pool1d, F.max_pool2d, torch.flatten) and not n.kwargs:
            path.append((n.target, tuple(n.args[1:])))
        elif n.op == "call_method" and n.target in ("view", "reshape", "flatten", "contiguous") and not n.kwargs:
            path.append((str(n.target), tuple(n.args[1:])))
        else:
            return None
        n = n.args[0]
    fq = fq_of(n)
    return (fq, tuple(reversed(path))) if fq is not None else None


def _is_add(n: Node) -> bool:
    return (n.op == "call_function" and n.target in (operator.add, operator.iadd, torch.add)) or \
        (n.op == "call_method" and n.target in ("add", "add_"))


def _folded(sim: GraphModule, act: Node, qp: QParams) -> bool:
    """Does the export drop this ReLU/ReLU6 (see :func:`_drop_redundant_activations`)?"""
    at_bottom = qp.zero_point == qp.quant_min
    return at_bottom and (_is_relu(sim, act) or round(6.0 / qp.scale) + qp.zero_point >= qp.quant_max)


def _is_relu(sim: GraphModule, act: Node) -> bool:
    m = sim.get_submodule(str(act.target)) if act.op == "call_module" else None
    return type(m) is nn.ReLU if m is not None else act.target in (F.relu, torch.relu, torch.relu_, "relu", "relu_")


# ---------------------------------------------------------------------------------------
# Artifact and backend


def _session(model_bytes: bytes, threads: int, *, spin: bool = True) -> Any:
    """An ORT_ENABLE_ALL CPU session. ``spin``: idle intra-op threads busy-wait for the next
    run (ONNX Runtime's default: ~25% lower latency on resnet18 int8 here, but a torch
    run right after it fights those threads for the cores)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


class _OrtProbe(nn.Module):
    """Runs the ONNX model with every quantizer's 8-bit output exposed as well.

    Returns the model's outputs, then one quantized torch tensor per point. Exposing
    the QuantizeLinear outputs leaves ONNX Runtime's fusions in place (a fused
    ``QLinearConv`` produces exactly that tensor).
    """

    def __init__(self, model_bytes: bytes, output_names: list[str], points: dict[str, dict[str, Any]], threads: int) -> None:
        super().__init__()
        import onnx

        model = onnx.load_from_string(model_bytes)
        present = {o.name for o in model.graph.output}
        types = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
        for p in points.values():
            if p["tensor"] not in present:
                model.graph.output.append(onnx.helper.make_tensor_value_info(p["tensor"], types[p["dtype"]], None))
        self.session = _session(model.SerializeToString(), threads, spin=False)  # checks interleave with torch
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = list(output_names)
        self.points = list(points.values())

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from graphopt.quant import silence_quantized_deprecation

        silence_quantized_deprecation()
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names + [p["tensor"] for p in self.points], feed)
        n = len(self.output_names)
        finals = [torch.from_numpy(o) for o in outs[:n]]
        quantized = [torch._make_per_tensor_quantized_tensor(torch.from_numpy(o), p["scale"], p["zero_point"])
                     for o, p in zip(outs[n:], self.points)]
        return tuple(finals + quantized)


class OrtArtifact(Artifact):
    """An ONNX model and its ONNX Runtime session.

    int8 artifacts also know their *points* (simulated quantizer node -> the ONNX tensor
    holding the same 8-bit value); ``graph_module`` then is an fx graph that runs the
    model with those tensors exposed, one node per point (``points`` maps to them), so
    :func:`graphopt.quant.verify_int8` / ``check_lowering_local`` can hold every
    quantized op to its own output steps, not only the end-to-end output.
    """

    def __init__(self, model_bytes: bytes, target: TargetSpec | str, precision: str, input_specs: list[InputSpec],
                 output_spec: pytree.TreeSpec, fields: dict[str, Any], threads: int | None = None) -> None:
        self.model_bytes = model_bytes
        self.target = target if isinstance(target, str) else target.name
        self.precision = precision
        self.input_specs = input_specs
        self.output_spec = output_spec
        self.fields = dict(fields)
        self.onnx_points: dict[str, dict[str, Any]] = dict(self.fields.get("points") or {})
        #: the simulated program it was lowered from rounds as these kernels do (set_ort_arithmetic)
        self.exact_simulation = precision == "int8" and not self.fields.get("not_bit_exact", ["unknown"])
        self.threads = threads or default_threads()
        self.session = _session(model_bytes, self.threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._probe: tuple[GraphModule, dict[str, str]] | None = None

    @property
    def model(self) -> Any:
        """The ONNX ModelProto (parsed on demand)."""
        import onnx

        return onnx.load_from_string(self.model_bytes)

    def run(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_names):
            raise UsageError(f"{self.target} expects {len(self.input_names)} input(s), got {len(inputs)}")
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, inputs)}
        outs = self.session.run(self.output_names, feed)
        return pytree.tree_unflatten([torch.from_numpy(o) for o in outs], self.output_spec)

    def _build_probe(self) -> tuple[GraphModule, dict[str, str]]:
        if self._probe is None:
            probe = _OrtProbe(self.model_bytes, self.output_names, self.onnx_points, self.threads)
            graph = torch.fx.Graph()
            placeholders = [graph.placeholder(s.name) for s in self.input_specs]
            call = graph.call_module("onnxruntime", tuple(placeholders))
            finals = [graph.call_function(operator.getitem, (call, i)) for i in range(len(self.output_names))]
            points: dict[str, str] = {}
            for k, sim_name in enumerate(self.onnx_points):
                node = graph.create_node("call_function", operator.getitem, (call, len(finals) + k), name=f"ort_{sim_name}")
                points[sim_name] = node.name
            graph.output(pytree.tree_unflatten(finals, self.output_spec))
            gm = GraphModule({"onnxruntime": probe}, graph, class_name="OrtProbe")
            self._probe = (gm.eval(), points)
        return self._probe

    @property
    def graph_module(self) -> GraphModule | None:
        """int8: an fx graph running the model with every quantizer's value exposed (see the class doc)."""
        return self._build_probe()[0] if self.onnx_points else None

    @property
    def points(self) -> dict[str, str]:
        """Simulated quantizer node -> the node of :attr:`graph_module` with the same 8-bit value."""
        return self._build_probe()[1] if self.onnx_points else {}

    def save_files(self, directory: Path) -> dict[str, Any]:
        (directory / MODEL_FILE).write_bytes(self.model_bytes)
        import onnxruntime

        return {
            "backend": "onnxruntime",
            "files": [MODEL_FILE],
            "output_structure": pytree.treespec_dumps(self.output_spec),
            "onnxruntime": onnxruntime.__version__,
            **self.fields,
        }


class OrtBackend:
    name = "onnxruntime"
    options = (BackendOption("threads", "ONNX Runtime intra-op threads [default: one per core]", type=int),)

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self._needs = ("onnx", "onnxruntime") + (("onnx_graphsurgeon",) if precision == "int8" else ())

    def unavailable_reason(self) -> str | None:
        return _missing(self._needs)

    def _threads(self, program: Program) -> int | None:
        options = program.meta.get("backend_options") or {}
        unknown = {k for k, v in options.items() if v is not None} - set(BACKEND_OPTIONS)
        if unknown:
            raise UsageError(f"ort-{self.precision}: unknown backend option(s) {choices(unknown)}; valid: {choices(BACKEND_OPTIONS)}")
        threads = options.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise UsageError(f"ort-{self.precision}: backend option 'threads' must be a positive integer, got {threads!r}")
        return threads

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        threads = self._threads(program)
        if self.precision == "int8":
            data, fields, spec = export_int8(program)
        else:
            data, fields, spec = export_fp32(program)
        return OrtArtifact(data, target, self.precision, program.input_specs, spec, fields, threads)

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        import onnx

        path = directory / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"artifact '{directory}' is missing {MODEL_FILE}")
        data = path.read_bytes()
        try:
            onnx.load_from_string(data)
        except Exception as exc:
            raise ArtifactError(f"'{path}' is not a readable ONNX model: {_first_line(exc)}") from None
        try:
            specs = [InputSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"])) for i in manifest["inputs"]]
            output_spec = pytree.treespec_loads(manifest["output_structure"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(f"'{directory / 'artifact.json'}' is malformed for {target.name}: {type(exc).__name__}: {exc}") from None
        skip = {"format", "target", "precision", "inputs", "backend", "files", "output_structure", "onnxruntime"}
        fields = {k: v for k, v in manifest.items() if k not in skip}
        try:
            art = OrtArtifact(data, target, self.precision, specs, output_spec, fields)
        except Exception as exc:
            raise ArtifactError(f"ONNX Runtime cannot load '{path}': {_first_line(exc)}") from None
        if art.input_names != [s.name for s in specs]:
            raise ArtifactError(f"'{path}' has inputs {art.input_names}, but its manifest names {[s.name for s in specs]}")
        return art


ort_fp32 = register_target(
    "ort-fp32",
    backend=OrtBackend("fp32"),
    precision="fp32",
    pipeline="fuse-conv-bn-relu,dce",
    doc="ONNX Runtime on the CPU, fp32 (ORT_ENABLE_ALL); model.onnx",
)

ort_int8 = register_target(
    "ort-int8",
    backend=OrtBackend("int8"),
    precision="int8",
    pipeline="fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce",
    doc="ONNX Runtime on the CPU, int8 QDQ model from graphopt's calibration (u8 activations, s8 per-channel weights); model.onnx",
)
