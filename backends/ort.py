"""ort-fp32 and ort-int8: ONNX models run by ONNX Runtime on the CPU.

**ort-fp32** exports the optimized fx program (:mod:`graphopt.backends._onnx_export`),
checks it with ``onnx.checker`` and runs it in an ``InferenceSession`` (``ORT_ENABLE_ALL``,
``--threads`` intra-op threads, ``CPUExecutionProvider``).

**ort-int8** exports the *simulated int8* program (``insert-quant-stubs``) with the one
Q/DQ exporter (:mod:`graphopt.backends._onnx_qdq`) under ONNX Runtime's placement policy
(``ONNXRUNTIME``: ReLU/Clip folded into the quantizers so ``DQ → Conv/Add → Q`` fuses into
``QLinearConv``/``QLinearAdd``, same-qparams Q/DQ pairs after data-movement ops, fp32
layers pinned by a per-channel DequantizeLinear).

Every simulated quantizer is tied to the ONNX tensor holding its 8-bit value (the
manifest's ``points``). ``OrtArtifact.graph_module``/``points`` expose them as an fx
graph, so :func:`graphopt.quant.verify_int8` holds every quantized op to its own output
steps (``check_lowering_local``). After the export the simulated program is made to
round as ONNX Runtime's kernels do (:func:`set_ort_arithmetic` installs the strategies
below); where every quantized op is modelled the artifact says so (``exact_simulation``)
and the compile also holds it to 2 output steps end to end (it matches bit for bit); the
manifest's ``not_bit_exact`` lists the ops that are not.

Both targets save ``model.onnx`` (+ ``artifact.json``); ``run(*inputs)`` returns torch
tensors in the structure the original model returns (recorded as a pytree spec).

No backend options. ONNX Runtime's intra-op threads are ``--threads`` (:mod:`graphopt.threads`:
the session option ``intra_op_num_threads``, recorded in the manifest).
"""

from __future__ import annotations

import importlib
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.backends._onnx_export import OPSET, OnnxExportError, export_fp32
from graphopt.backends._onnx_qdq import ONNXRUNTIME, export_int8
from graphopt.errors import ArtifactError, UsageError, choices, first_line
from graphopt.fx_util import is_relu
from graphopt.program import InputSpec, Program
from graphopt.quant import (
    ActFakeQuant,
    LayerArithmetic,
    OpKind,
    QParams,
    QuantLayer,
    Rounding,
    absorbable_activation,
    is_add,
    is_cat,
    op_kind,
    pool_window,
    quantizer_of,
)
from graphopt.targets import Artifact, TargetSpec, manifest_inputs, register_target
from graphopt.threads import default_threads, manifest_threads, program_threads

__all__ = [
    "OPSET",
    "MODEL_FILE",
    "OnnxExportError",
    "OrtArtifact",
    "OrtBackend",
    "OrtRounding",
    "QLinearAdd",
    "QLinearAveragePool",
    "QLinearConvArithmetic",
    "QLinearGlobalAveragePool",
    "set_ort_arithmetic",
    "probe_graph",
    "ProbedArtifact",
    "ort_fp32",
    "ort_int8",
    "default_threads",
]

MODEL_FILE = "model.onnx"
# ---------------------------------------------------------------------------------------
# Availability (imports are lazy: this module loads without onnx/onnxruntime)


def _missing(modules: tuple[str, ...], extra: str = "onnx") -> str | None:
    """Which of ``modules`` cannot be imported, with the install hint (``graphopt[EXTRA]``); None if all can."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # ImportError, or a broken install raising something else
            missing.append(name)
    if missing:
        return f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed (pip install 'graphopt[{extra}]')"
    return None


def read_io_specs(manifest: dict[str, Any], directory: Path, target: TargetSpec) -> tuple[list[InputSpec], pytree.TreeSpec]:
    """(input specs, output structure) of a checked manifest; ArtifactError naming it if malformed."""
    try:
        return manifest_inputs(manifest), pytree.treespec_loads(manifest["output_structure"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ArtifactError(f"'{directory / 'artifact.json'}' is malformed for {target.name}: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------------------------------
# int8: ONNX Runtime's arithmetic, as strategies for the simulated program


@dataclass(frozen=True)
class QLinearConvArithmetic(LayerArithmetic):
    """ONNX Runtime's QLinearConv/QGemm (fused from QDQ): the fp32 bias becomes int32 at steps
    of ``s_in*s_w`` (float32 division, half to even) added to the accumulator, then scaled by
    float32 ``(s_in*s_w)/s_out``, rounded half to even; the zero point is added after."""

    def requantize(self, acc: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        act_times_w = torch.tensor(self.input.scale, dtype=torch.float32) * w_scale.float()
        bias_int = torch.round(bias / act_times_w)
        pre = (acc + bias_int.double()).float() * (act_times_w / torch.tensor(self.output.scale, dtype=torch.float32))
        return torch.round(pre) + self.output.zero_point


@dataclass(eq=False)
class OrtRounding(Rounding):
    """ONNX Runtime's rounding of one quantizer's value.

    ``divide``: QuantizeLinear (and QLinearConcat) round ``x / scale`` (fake-quantization
    multiplies by ``1/scale``). ``keep_integers``: remember the last integers handed on
    (``last``), for a :class:`QLinearAdd` downstream that reads them.
    """

    divide: bool = False
    keep_integers: bool = False
    last: torch.Tensor | None = field(default=None, repr=False)

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        if self.divide:
            return torch.round(x / fq.scale.float()) + int(fq.zero_point)
        return super().integers(fq, x)

    def value(self, fq: ActFakeQuant, q: torch.Tensor) -> torch.Tensor:
        if self.keep_integers:
            self.last = q
        return super().value(fq, q)


@dataclass(eq=False)
class QLinearGlobalAveragePool(OrtRounding):
    """QLinearGlobalAveragePool over ``size`` elements: ``round(float(sum) * (s / (s * size))) + zp``."""

    size: int = 1

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        # x is the fp32 mean of values on this grid: the integer sum is recovered exactly
        acc = torch.round(x.double() / float(fq.scale) * self.size)
        s = fq.scale.float()
        return torch.round(acc.float() * (s / (s * float(self.size)))) + int(fq.zero_point)


@dataclass(eq=False)
class QLinearAveragePool(OrtRounding):
    """QLinearAveragePool: ``round(mean / s + zp)`` on the float mean of the dequantized window
    (which the simulated pool computes identically)."""

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x / fq.scale.float() + int(fq.zero_point))


@dataclass(eq=False)
class QLinearAdd(OrtRounding):
    """ONNX Runtime's QLinearAdd of the values of quantizers ``a`` and ``b``, from their integers.

    Reads the last integers their :class:`OrtRounding` kept, each replayed through the
    data-movement ops between (``paths``: ``(op, extra args)`` for max pool, flatten...).
    MLAS computes ``fma(ra, A, fma(rb, B, zp_c - fma(ra, zp_a, rb * zp_b)))`` with
    ``ra = s_a/s_c``, ``rb = s_b/s_c``, float32 throughout (a float64 product of two
    float32 values is exact: one rounding per fused multiply-add), rounded half to even.
    """

    a: ActFakeQuant | None = None
    b: ActFakeQuant | None = None
    paths: tuple[tuple[tuple[Any, tuple[Any, ...]], ...], ...] = ((), ())

    def _operands(self) -> list[torch.Tensor] | None:
        ints = []
        for fq, path in zip((self.a, self.b), self.paths):
            t = fq.rounding.last if isinstance(fq.rounding, OrtRounding) else None
            if t is None:
                return None
            for op, extra in path:  # max pool, flatten, view...: they move integers as they move values
                t = getattr(t, op)(*extra) if isinstance(op, str) else op(t, *extra)
            ints.append(t)
        return ints

    def integers(self, fq: ActFakeQuant, x: torch.Tensor) -> torch.Tensor:
        ints = self._operands()
        if ints is None or any(t.shape != x.shape for t in ints):
            return super().integers(fq, x)
        qa, qb = ints
        sc = fq.scale.float()
        ra, rb = self.a.scale.float() / sc, self.b.scale.float() / sc
        fixed = (ra.double() * int(self.a.zero_point) + (rb * int(self.b.zero_point)).double()).float()
        adj = torch.tensor(float(int(fq.zero_point)), dtype=torch.float32) - fixed
        inner = (rb.double() * qb.double() + adj.double()).float()
        return torch.round((ra.double() * qa.double() + inner.double()).float())


def _ort_rounding(fq: ActFakeQuant, rule: OrtRounding | None = None) -> OrtRounding:
    """Install ``rule`` on ``fq`` (keeping whether its integers are kept), or its current ORT rounding."""
    current = fq.rounding if isinstance(fq.rounding, OrtRounding) else None
    if rule is None:
        rule = current or OrtRounding()
    elif current is not None:
        rule.keep_integers = current.keep_integers
    fq.rounding = rule
    return rule


def set_ort_arithmetic(sim: GraphModule) -> list[str]:
    """Make the simulated program round as ONNX Runtime's int8 kernels do; return what is not modelled.

    Measured against onnxruntime 1.32 (``tests/backends/test_ort.py``): QLinearConv and
    QGemm take the fp32 bias as int32 at steps of ``s_in * s_w`` and requantize with one
    float32 multiplier (:class:`QLinearConvArithmetic`); QLinearGlobalAveragePool and
    QLinearAveragePool round as :class:`QLinearGlobalAveragePool` / :class:`QLinearAveragePool`;
    QuantizeLinear and QLinearConcat divide by the scale (:class:`OrtRounding`); QLinearAdd
    is computed from its operands' integers (:class:`QLinearAdd`). Not modelled:
    QLinearMul, quantized BatchNorm, a ReLU/ReLU6 that stays in the graph, an add whose
    operands pass through other ops first, and fp32 ops ONNX Runtime may fuse into lookup
    tables (QLinearSigmoid...) — where any is present, verification holds ops one by one
    only.
    """
    def fq_of(n: Node | None) -> ActFakeQuant | None:
        return quantizer_of(sim, n)

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
            sim.get_submodule(str(n.target)).arithmetic = QLinearConvArithmetic(fin.qparams, fout.qparams)
        elif kind is OpKind.ANCHOR:
            act = absorbable_activation(sim, n)
            handled.add(act)
            end_users = list((act or n).users)
            out = fq_of(end_users[0]) if len(end_users) == 1 else None
            if out is None:
                continue  # an fp32 result
            operands = [_integer_path(sim, a, fq_of) for a in n.args] if len(n.args) == 2 else []
            relu_folded = act is None or (is_relu(sim, act) and _folded(sim, act, out.qparams))
            if is_cat(n) and act is None:
                _ort_rounding(out, OrtRounding(divide=True))  # QLinearConcat
            elif is_add(n) and relu_folded and operands and all(o is not None for o in operands):
                for fq, _ in operands:  # QLinearAdd reads their integers
                    _ort_rounding(fq).keep_integers = True
                _ort_rounding(out, QLinearAdd(a=operands[0][0], b=operands[1][0], paths=(operands[0][1], operands[1][1])))
            else:
                unmodelled.append(n.name)
        elif kind is OpKind.REQUANT and len(users) == 1 and fq_of(users[0]) is not None:
            m = sim.get_submodule(str(n.target)) if n.op == "call_module" else None
            size = pool_window(sim, n)
            if size is not None and isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
                _ort_rounding(fq_of(users[0]), QLinearGlobalAveragePool(size=size))
            elif size is not None and isinstance(m, nn.AvgPool2d):
                _ort_rounding(fq_of(users[0]), QLinearAveragePool())
            else:
                unmodelled.append(n.name)
        elif n.op in ("placeholder", "call_function", "call_method", "call_module") and kind is OpKind.FLOAT:
            for u in users:
                fq = fq_of(u)
                if fq is not None and fq.inherit is None:
                    _ort_rounding(fq, OrtRounding(divide=True))  # QuantizeLinear
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


def _folded(sim: GraphModule, act: Node, qp: QParams) -> bool:
    """Does the export drop this ReLU/ReLU6 (see :func:`_drop_redundant_activations`)?"""
    at_bottom = qp.zero_point == qp.quant_min
    return at_bottom and (is_relu(sim, act) or round(6.0 / qp.scale) + qp.zero_point >= qp.quant_max)


# ---------------------------------------------------------------------------------------
# Artifact and backend


def _session(model_bytes: bytes, threads: int, *, spin: bool = True, optimize: bool = True) -> Any:
    """An ORT_ENABLE_ALL CPU session. ``spin``: idle intra-op threads busy-wait for the next
    run (ONNX Runtime's default: ~25% lower latency on resnet18 int8 here, but a torch
    run right after it fights those threads for the cores). ``optimize=False``: ORT_DISABLE_ALL,
    every op run as the graph says (no fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    level = ort.GraphOptimizationLevel
    so.graph_optimization_level = level.ORT_ENABLE_ALL if optimize else level.ORT_DISABLE_ALL
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

    def __init__(self, model_bytes: bytes, output_names: list[str], points: dict[str, dict[str, Any]], threads: int,
                 optimize: bool = True) -> None:
        super().__init__()
        import onnx

        model = onnx.load_from_string(model_bytes)
        present = {o.name for o in model.graph.output}
        types = {"uint8": onnx.TensorProto.UINT8, "int8": onnx.TensorProto.INT8}
        for p in points.values():
            if p["tensor"] not in present:
                model.graph.output.append(onnx.helper.make_tensor_value_info(p["tensor"], types[p["dtype"]], None))
        self.session = _session(model.SerializeToString(), threads, spin=False, optimize=optimize)  # checks interleave with torch
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


def probe_graph(runtime: str, prefix: str, probe: nn.Module, input_specs: list[InputSpec], n_outputs: int,
                sim_points: list[str], output_spec: pytree.TreeSpec) -> tuple[GraphModule, dict[str, str]]:
    """An fx graph around ``probe`` (a module returning the outputs, then one quantized tensor per point),
    one node per point (``PREFIX_<quantizer>``): (graph module, {simulated quantizer: its node}), for
    ``check_lowering_local``."""
    graph = torch.fx.Graph()
    placeholders = [graph.placeholder(s.name) for s in input_specs]
    call = graph.call_module(runtime, tuple(placeholders))
    finals = [graph.call_function(operator.getitem, (call, i)) for i in range(n_outputs)]
    points: dict[str, str] = {}
    for k, sim_name in enumerate(sim_points):
        node = graph.create_node("call_function", operator.getitem, (call, n_outputs + k), name=f"{prefix}_{sim_name}")
        points[sim_name] = node.name
    graph.output(pytree.tree_unflatten(finals, output_spec))
    gm = GraphModule({runtime: probe}, graph, class_name="RuntimeProbe")
    return gm.eval(), points


class ProbedArtifact(Artifact):
    """An artifact whose quantized values an fx probe exposes (built on first use by ``_build_probe``)."""

    #: simulated quantizer -> where the runtime holds its value (empty: no probe)
    probe_points: dict[str, dict[str, Any]]

    def _build_probe(self) -> tuple[GraphModule, dict[str, str]]:
        raise NotImplementedError

    @property
    def graph_module(self) -> GraphModule | None:
        """int8: an fx graph running the model with every quantizer's value exposed (see the class doc)."""
        return self._build_probe()[0] if self.probe_points else None

    @property
    def points(self) -> dict[str, str]:
        """Simulated quantizer node -> the node of :attr:`graph_module` with the same 8-bit value."""
        return self._build_probe()[1] if self.probe_points else {}


class OrtArtifact(ProbedArtifact):
    """An ONNX model and its ONNX Runtime session.

    int8 artifacts also know their *points* (simulated quantizer node -> the ONNX tensor
    holding the same 8-bit value); ``graph_module`` then is an fx graph that runs the
    model with those tensors exposed, one node per point (``points`` maps to them), so
    :func:`graphopt.quant.verify_int8` / ``check_lowering_local`` can hold every
    quantized op to its own output steps, not only the end-to-end output.
    """

    #: ORT_ENABLE_ALL (False: run the graph op by op as written, for a file another runtime will run)
    optimize: bool = True

    def __init__(self, model_bytes: bytes, target: TargetSpec | str, precision: str, input_specs: list[InputSpec],
                 output_spec: pytree.TreeSpec, fields: dict[str, Any], threads: int | None = None) -> None:
        self.model_bytes = model_bytes
        self.target = target if isinstance(target, str) else target.name
        self.precision = precision
        self.input_specs = input_specs
        self.output_spec = output_spec
        self.fields = dict(fields)
        self.probe_points: dict[str, dict[str, Any]] = dict(self.fields.get("points") or {})
        #: the simulated program it was lowered from rounds as these kernels do (set_ort_arithmetic)
        self.exact_simulation = precision == "int8" and not self.fields.get("not_bit_exact", ["unknown"])
        self.threads = threads or default_threads()
        self.session = _session(model_bytes, self.threads, optimize=self.optimize)
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
            probe = _OrtProbe(self.model_bytes, self.output_names, self.probe_points, self.threads, self.optimize)
            self._probe = probe_graph("onnxruntime", "ort", probe, self.input_specs, len(self.output_names), list(self.probe_points),
                                      self.output_spec)
        return self._probe

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
    cpu_threads = True

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self._needs = ("onnx", "onnxruntime") + (("onnx_graphsurgeon",) if precision == "int8" else ())

    def unavailable_reason(self) -> str | None:
        return _missing(self._needs)

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        options = program.meta.get("backend_options") or {}
        unknown = {k for k, v in options.items() if v is not None}
        if unknown:
            raise UsageError(f"ort-{self.precision}: unknown backend option(s) {choices(unknown)}; it takes none "
                             "(threads: --threads)")
        threads = program_threads(program)
        if self.precision == "int8":
            data, fields, spec = export_int8(program, ONNXRUNTIME, target.name)
            # s8 activations keep a ReLU before their symmetric quantizers, which ONNX Runtime
            # does not fuse: not modelled (measured 2-4 output steps end to end)
            fields["not_bit_exact"] = set_ort_arithmetic(program.graph_module) if fields["activations"] == "u8" \
                else ["activations=s8"]
        else:
            data, fields, spec = export_fp32(program, target.name)
        return OrtArtifact(data, target, self.precision, program.input_specs, spec, fields, threads)

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        return load_onnx_artifact(OrtArtifact, directory, manifest, target, self.precision)


#: Manifest keys that are not the artifact's own fields (``OrtArtifact.fields``).
MANIFEST_KEYS = frozenset({"format", "target", "precision", "inputs", "backend", "files", "output_structure", "onnxruntime", "threads"})


def load_onnx_artifact(cls: type[OrtArtifact], directory: Path, manifest: dict[str, Any], target: TargetSpec,
                       precision: str, skip: frozenset[str] = MANIFEST_KEYS) -> OrtArtifact:
    """An :class:`OrtArtifact` (or subclass ``cls``) read back from ``model.onnx`` and its manifest; ArtifactError if damaged."""
    import onnx

    path = directory / MODEL_FILE
    if not path.is_file():
        raise ArtifactError(f"artifact '{directory}' is missing {MODEL_FILE}")
    data = path.read_bytes()
    try:
        onnx.load_from_string(data)
    except Exception as exc:
        raise ArtifactError(f"'{path}' is not a readable ONNX model: {first_line(exc)}") from None
    specs, output_spec = read_io_specs(manifest, directory, target)
    fields = {k: v for k, v in manifest.items() if k not in skip}
    try:
        art = cls(data, target, precision, specs, output_spec, fields, manifest_threads(manifest))
    except Exception as exc:
        raise ArtifactError(f"ONNX Runtime cannot load '{path}': {first_line(exc)}") from None
    if art.input_names != [s.name for s in specs]:
        raise ArtifactError(f"'{path}' has inputs {art.input_names}, but its manifest names {[s.name for s in specs]}")
    return art


def _target(precision: str, pipeline: str, doc: str):
    return register_target(f"ort-{precision}", backend=OrtBackend(precision), precision=precision, pipeline=pipeline, doc=doc)


ort_fp32 = _target("fp32", "fuse-conv-bn-relu,dce", "ONNX Runtime on the CPU, fp32 (ORT_ENABLE_ALL); model.onnx")
ort_int8 = _target("int8", "fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce",
                   "ONNX Runtime on the CPU, int8 QDQ model from graphopt's calibration (u8 activations, s8 per-channel weights); "
                   "model.onnx")
