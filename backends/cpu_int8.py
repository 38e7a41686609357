"""cpu-int8: the simulated-int8 program lowered to PyTorch's quantized CPU kernels.

Lowering (:func:`lower_quantized`) walks the simulated graph once and keeps every value
either quantized (with its qparams) or fp32:

- a conv/linear :class:`~graphopt.quant.QuantLayer` whose output quantizer follows it
  (through an absorbed ReLU/ReLU6) becomes ``torch.ao.nn.quantized`` Conv1d/Conv2d/Linear
  or the fused ``ConvReLU1d/ConvReLU2d/LinearReLU`` with packed int8 weights and that
  quantizer's scale/zero point: the kernel requantizes directly, no dequantize between;
- add / mul (``+ relu``), cat and BatchNorm2d (``+ relu``) become ``quantized::add``,
  ``add_relu``, ``mul``, ``mul_relu``, ``cat`` and quantized BatchNorm2d / BNReLU2d;
- max/avg/adaptive pooling, mean, flatten, view/reshape, chunk/split, ReLU/ReLU6 run on
  the quantized tensor itself (same qparams);
- a quantizer on an fp32 value becomes ``quantize_per_tensor``; an fp32 consumer of a
  quantized value (an fp32 island, the graph output) gets one ``dequantize``.

Engines: ``x86`` (dispatches between fbgemm and oneDNN per layer), ``fbgemm``, ``onednn``.
Weights are packed for one engine at lowering and again at load. The default is
:data:`DEFAULT_ENGINE` (measured: see ``bench/measure_cpu_int8.py``); choose another with
``program.meta['backend_options'] = {'engine': NAME}`` (the compiler's ``--engine``).

Saved as ``graph.json`` (nodes with their targets from an allow-list, module configs)
plus ``weights.pt`` (int8 and fp32 tensors only), which loads with
``torch.load(weights_only=True)``: no code is unpickled.

Runs without per-op Python dispatch: on its first run the artifact compiles the fx graph
(rebuilt from the allow-listed ``graph.json``, or fresh from the lowering) with
``torch.jit.script`` and ``torch.jit.freeze(optimize_numerics=False)`` (:func:`freeze`), as
torch.ao users freeze theirs. No TorchScript file is stored or read: the code compiled is
the code fx generates from the allow-listed graph (less the input-rank checks the quantized
modules script before each kernel: :func:`_drop_input_checks`). The frozen module calls the very
kernels, with the very packed weights, the fx graph calls, so it computes the same bits
(``tests/backends/test_cpu_int8.py`` holds the frozen artifact to the simulation).
``optimize_numerics`` stays off: its folds (an fp32 conv's following add/mul into its
weights) may move fp32 islands' numbers; with it on the zoo still matched, but nothing promises it.
Measured side by side in one process (224x224, batch 1, 2 threads, 8 interleaved rounds
of 15 runs, on a shared 2-core AVX512-VNNI EPYC at load 12-14, so fastest runs, medians
being noise): ResNet-18 fx 18.19 ms, frozen 17.66, torch.ao FX x86 + trace + freeze 17.71
(1.00x); MobileNetV2 fx 17.02, frozen 2.73, torch.ao 3.01 (0.91x); medians 1.54x -> 1.09x
of torch.ao (a rerun at load 10: ResNet-18 frozen 13.05 vs torch.ao 12.97 ms, 1.01x; medians
noise). For ResNet-18 the frozen graph holds exactly torch.ao's kernel calls (20 quantized
convs, 8 add_relu, 1 linear, one quantize/dequantize, no other op); at 64x64 on 1 thread,
where per-op overhead shows most: 1.008 ms vs torch.ao's 0.991 (fastest of 200 runs, 1.02x).
``torch.jit.optimize_for_inference`` was within noise of it (2.48 / 17.68 ms)
and turns fp32 convolutions (fp32 islands) into MKLDNN ones, other numerics: not used.
It runs on ``--threads`` intra-op threads (:mod:`graphopt.threads`), the process's own
setting restored after each run.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node

from graphopt.backends._cpu_int8_arith import (
    ENGINES,
    OnednnArithmetic,
    _empty_quantized_layer,
    _mark_fused_inputs,
    _measure_kernels,
    engine_scope,
    kernel_rounding,
    layer_arithmetic,
    pool_ties,
)
from graphopt.backends._cpu_int8_graph import load_graph, save_graph, set_output_qparams
from graphopt.errors import UsageError, choices
from graphopt.fx_util import is_relu
from graphopt.program import InputSpec, Program
from graphopt.quant import (
    META_KEY,
    ActFakeQuant,
    OpKind,
    QParams,
    QuantLayer,
    absorbable_activation,
    anchor_inputs,
    clear_kernel_arithmetic,
    is_add,
    is_cat,
    op_kind,
    pool_window,
    quantizer_of,
    rederive,
    silence_quantized_deprecation,
)
from graphopt.targets import Artifact, BackendOption, TargetSpec, manifest_inputs, register_target
from graphopt.threads import manifest_threads, program_threads, torch_threads

#: x86 picks fbgemm or oneDNN per layer; it measured fastest on the machines we ran
#: (``bench/measure_cpu_int8.py``; figures in ``bench/README.md``), so it is the default where supported.
DEFAULT_ENGINE = "x86"


def default_engine() -> str:
    supported = torch.backends.quantized.supported_engines
    for name in (DEFAULT_ENGINE, "fbgemm", "onednn"):
        if name in supported:
            return name
    return DEFAULT_ENGINE


def _cpu_flags() -> str | None:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return None


def cpu_has_vnni() -> bool:
    """True where 8-bit dot products accumulate in 32 bits (no u8*s8 pair saturation)."""
    flags = _cpu_flags()
    if flags is None:
        return True  # not Linux: assume a modern CPU; the lowering check still guards
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def cpu_has_avx512_vnni() -> bool:
    """The test torch's ``x86`` engine makes to send convolutions to oneDNN (Linux only)."""
    flags = _cpu_flags()
    return flags is not None and "avx512_vnni" in flags


# ---------------------------------------------------------------------------------------
# Lowering


_QUANT_ADD = {False: torch.ops.quantized.add, True: torch.ops.quantized.add_relu}
_QUANT_MUL = {False: torch.ops.quantized.mul, True: torch.ops.quantized.mul_relu}


_fq = quantizer_of


def _same(a: QParams | None, b: QParams | None) -> bool:
    return a is not None and b is not None and (a.scale, a.zero_point, a.dtype) == (b.scale, b.zero_point, b.dtype)


def _map_nodes(a: Any, fn) -> Any:
    return torch.fx.node.map_arg(a, fn)


def pack_engine(layer: nn.Module, engine: str) -> str:
    """The kernel family (``fbgemm`` or ``onednn``) a conv/linear is packed for.

    Packed weights carry their kernel, so engines mix within one graph; naming the
    family here (never ``x86``) lets the simulation reproduce that kernel's arithmetic
    (:class:`~graphopt.backends._cpu_int8_arith.FbgemmArithmetic`, ``OnednnArithmetic``). ``x86`` is resolved as torch resolves
    it: convolutions with at most 100 groups go to oneDNN on AVX512-VNNI Linux CPUs,
    everything else to fbgemm. Depthwise convolutions always go to oneDNN where
    available: fbgemm's depthwise kernel sums pairs of u8*s8 products in 16 bits
    (``vpmaddubsw``) and saturates with a non-zero input zero point, by up to ~30
    output steps, even on VNNI CPUs; oneDNN's is exact and as fast.
    """
    if engine == "onednn":
        return "onednn"
    has_onednn = "onednn" in torch.backends.quantized.supported_engines
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and has_onednn:
        depthwise = layer.groups > 1 and layer.groups == layer.in_channels
        if depthwise or (engine == "x86" and cpu_has_avx512_vnni() and layer.groups <= 100):
            return "onednn"
    return "fbgemm"


def _quantized_layer(q: QuantLayer, relu: bool, qp: QParams, engine: str) -> nn.Module:
    base = q.base
    weight = q.weight_fq.quantize(base.weight)
    bias = base.bias.detach().float() if base.bias is not None else None
    m = _empty_quantized_layer(base, relu)
    m.pack_engine = pack_engine(base, engine)
    with engine_scope(m.pack_engine):
        m.set_weight_bias(weight, bias)
    set_output_qparams(m, qp.scale, qp.zero_point)
    return m


def _baked_float_layer(q: QuantLayer) -> nn.Module:
    """An fp32 copy of a QuantLayer computing with its fake-quantized weights."""
    layer = copy.deepcopy(q.layer)
    with torch.no_grad():
        base = layer[0] if isinstance(layer, nni._FusedModule) else layer
        base.weight.copy_(q.weight_fq(q.base.weight))
    return layer


def _quantized_bn(bn: nn.BatchNorm2d, relu: bool, qp: QParams) -> nn.Module:
    cls = nniq.BNReLU2d if relu else nnq.BatchNorm2d
    m = cls(bn.num_features, bn.eps, bn.momentum if bn.momentum is not None else 0.1)
    with torch.no_grad():
        m.weight.copy_(bn.weight.detach() if bn.weight is not None else torch.ones(bn.num_features))
        m.bias.copy_(bn.bias.detach() if bn.bias is not None else torch.zeros(bn.num_features))
        m.running_mean.copy_(bn.running_mean)
        m.running_var.copy_(bn.running_var)
    set_output_qparams(m, qp.scale, qp.zero_point)
    return m


class _Lowering:
    """One walk over the simulated graph, building the quantized graph."""

    def __init__(self, sim: GraphModule, engine: str) -> None:
        self.sim = sim
        self.engine = engine
        self.graph = Graph()
        self.root: dict[str, Any] = {}
        self.env: dict[Node, Node] = {}
        self.qp: dict[Node, QParams | None] = {}
        self.dequantized: dict[Node, Node] = {}
        self.absorbed: set[Node] = set()
        self.points: dict[str, str] = {}  # simulated quantizer node -> lowered node with the same value
        self.pools: dict[str, tuple[ActFakeQuant, int]] = {}  # lowered avg pool -> its simulated requantizer, window
        self.onednn_layers: dict[str, tuple[QuantLayer, bool]] = {}  # lowered oneDNN conv/linear -> simulated layer, relu
        self.inexact: set[str] = set()  # simulated layers called with other qparams each time: no arithmetic
        self.unmodelled: list[str] = []  # quantized ops whose rounding the simulation does not reproduce
        self.requant_cats: dict[str, ActFakeQuant] = {}  # lowered cat requantizing its inputs -> its output quantizer
        self.fused_dequantize: set[str] = set()  # lowered ops reading inputs as fma(q, s, -zp*s)
        self.stats = {"quantized_layers": 0, "quantized_ops": 0, "float_ops": 0, "quantize": 0, "dequantize": 0,
                      "float_layers": []}

    # -- values
    def fp32(self, n: Node) -> Node:
        if self.qp.get(n) is None:
            return self.env[n]
        if n not in self.dequantized:
            self.dequantized[n] = self.graph.call_function(torch.dequantize, (self.env[n],))
            self.stats["dequantize"] += 1
        return self.dequantized[n]

    def quantized(self, n: Node, qp: QParams) -> Node:
        cur = self.qp.get(n)
        if _same(cur, qp):
            return self.env[n]
        src = self.fp32(n)
        self.stats["quantize"] += 1
        return self.graph.call_function(torch.quantize_per_tensor, (src, qp.scale, qp.zero_point, qp.dtype))

    def module_name(self, target: str) -> str:
        name, i = target, 1
        while name in self.root:
            i += 1
            name = f"{target}_{i}"
        return name

    def copy_node(self, n: Node, args_fn) -> Node:
        args = _map_nodes(n.args, args_fn)
        kwargs = _map_nodes(n.kwargs, args_fn)
        target = n.target
        if n.op == "call_module":
            name = self.module_name(str(n.target)) if str(n.target) in self.root else str(n.target)
            module = self.sim.get_submodule(str(n.target))
            has_state = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
            self.root[name] = copy.deepcopy(module) if has_state else module  # the artifact owns its weights
            target = name
        elif n.op == "get_attr":
            obj: Any = self.sim
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            self.root[str(n.target)] = obj
        return self.graph.create_node(n.op, target, args, kwargs, name=n.name)

    # -- the walk
    def output_quantizer(self, n: Node) -> tuple[Node, str | None, ActFakeQuant] | None:
        """(end, activation kind, quantizer) when ``n``'s output (after an absorbed ReLU/ReLU6) is quantized."""
        act = absorbable_activation(self.sim, n)
        end = act or n
        if len(end.users) != 1:
            return None
        (user,) = end.users
        fq = _fq(self.sim, user)
        if fq is None or fq.inherit is not None:
            return None
        kind = None
        if act is not None:
            kind = "relu" if is_relu(self.sim, act) else "relu6"
        return end, kind, fq

    def run(self) -> GraphModule:
        for n in self.sim.graph.nodes:
            if n in self.absorbed:
                continue
            if n.op == "placeholder":
                self.env[n] = self.graph.create_node("placeholder", n.target, n.args, name=n.name)
                self.qp[n] = None
            elif n.op == "output":
                self.graph.output(_map_nodes(n.args[0], self.fp32))
            elif n.op == "get_attr":
                self.env[n] = self.copy_node(n, self.fp32)
                self.qp[n] = None
            elif _fq(self.sim, n) is not None:
                self.lower_quantizer(n)
            else:
                self.lower_op(n)
        gm = GraphModule(self.root, self.graph, class_name="QuantizedGraphModule")
        gm.graph.lint()
        gm.recompile()
        gm.eval()
        return gm

    def lower_quantizer(self, n: Node) -> None:
        fq = _fq(self.sim, n)
        src = n.args[0]
        qp = fq.qparams
        if not _same(self.qp.get(src), qp):  # lowered to quantize_per_tensor
            kernel_rounding(fq).quantize_per_tensor = True
        self.env[n] = self.quantized(src, qp)
        self.qp[n] = qp
        self.points[n.name] = self.env[n].name

    def lower_op(self, n: Node) -> None:
        kind = op_kind(self.sim, n)
        if kind in (OpKind.WEIGHTED, OpKind.ANCHOR) and self.lower_anchor(n, kind):
            return
        first = n.args[0] if n.args else None
        on_grid = isinstance(first, Node) and self.qp.get(first) is not None
        if kind in (OpKind.PASSTHROUGH, OpKind.REQUANT, OpKind.SHAPE) and on_grid:
            # Runs on the quantized tensor; other Node arguments (sizes, indices) are plain values.
            new = self.copy_node(n, lambda a: self.env[a] if a is first else self.fp32(a))
            self.env[n] = new
            size = pool_window(self.sim, n) if kind is OpKind.REQUANT else None
            if size is not None and len(n.users) == 1 and _fq(self.sim, next(iter(n.users))) is not None:
                self.pools[new.name] = (_fq(self.sim, next(iter(n.users))), size)
            elif kind is OpKind.REQUANT and not self._clamps(n):
                self.unmodelled.append(n.name)  # a mean or a pool with uneven windows
            self.qp[n] = self.qp[first] if kind is not OpKind.SHAPE else None
            self.stats["quantized_ops"] += kind is not OpKind.SHAPE
            return
        self.lower_float(n)

    def _clamps(self, n: Node) -> bool:
        """ReLU6/hardtanh: a clamp on the integers, exact in the simulation."""
        m = self.sim.get_submodule(str(n.target)) if n.op == "call_module" else None
        return isinstance(m, (nn.ReLU6, nn.Hardtanh)) or n.target in (F.relu6, F.hardtanh)

    def lower_float(self, n: Node) -> None:
        if n.op == "call_module" and isinstance(self.sim.get_submodule(str(n.target)), QuantLayer):
            q = self.sim.get_submodule(str(n.target))
            name = self.module_name(str(n.target))
            self.root[name] = _baked_float_layer(q)
            self.env[n] = self.graph.call_module(name, _map_nodes(n.args, self.fp32), _map_nodes(n.kwargs, self.fp32))
            self.stats["float_layers"].append(str(n.target))
        else:
            self.env[n] = self.copy_node(n, self.fp32)
            layer = self.sim.get_submodule(str(n.target)) if n.op == "call_module" else None
            if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                self.stats["float_layers"].append(str(n.target))
            if isinstance(layer, nn.LayerNorm) or n.target is F.layer_norm:
                # dividing by the row's std amplifies the last-ulp differences of fbgemm's dequantize
                # into rounding ties at the next quantizer: the simulation is not bit-exact past it
                self.unmodelled.append(n.name)
        self.qp[n] = None
        self.stats["float_ops"] += 1

    def lower_anchor(self, n: Node, kind: OpKind) -> bool:
        ins = anchor_inputs(self.sim, n)
        if not ins or any(self.qp.get(a) is None for a in ins):
            return False
        if kind is OpKind.WEIGHTED and not isinstance(self.sim.get_submodule(str(n.target)), QuantLayer):
            return False  # kept in fp32 (--keep-fp32) between quantized values: lowered as a float layer
        found = self.output_quantizer(n)
        if found is None:
            return False
        end, act, fq = found
        qp = fq.qparams
        lo, hi = qp.range
        relu = act is not None
        clamp6 = act == "relu6" and hi > 6.0 + 1e-6  # the qparams alone do not clip at 6
        if kind is OpKind.WEIGHTED:
            q = self.sim.get_submodule(str(n.target))
            relu = relu or q.fused_relu
            name = self.module_name(str(n.target))
            self.root[name] = _quantized_layer(q, relu, qp, self.engine)
            arith = layer_arithmetic(self.root[name].pack_engine, self.qp[n.args[0]], qp)
            new = self.graph.create_node("call_module", name, (self.env[n.args[0]],), name=n.name)
            if q.arithmetic is not None and q.arithmetic != arith:
                # one layer called twice with other qparams: a single arithmetic cannot describe both
                self.inexact.add(str(n.target))
            q.arithmetic = None if str(n.target) in self.inexact else arith
            if isinstance(q.arithmetic, OnednnArithmetic):
                self.onednn_layers[new.name] = (q, relu)
            self.stats["quantized_layers"] += 1
        elif n.op == "call_module":  # BatchNorm2d
            name = self.module_name(str(n.target))
            self.root[name] = _quantized_bn(self.sim.get_submodule(str(n.target)), relu, qp)
            self.unmodelled.append(n.name)
            new = self.graph.create_node("call_module", name, (self.env[n.args[0]],), name=n.name)
            self.stats["quantized_ops"] += 1
        elif is_cat(n):
            tensors = n.args[0] if n.args else n.kwargs["tensors"]
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            new = self.graph.create_node("call_function", torch.ops.quantized.cat,
                                         ([self.env[a] for a in tensors], dim, qp.scale, qp.zero_point), name=n.name)
            if not all(_same(self.qp.get(a), qp) for a in tensors):
                self.requant_cats[new.name] = fq  # requantizes its inputs (a copy otherwise)
            if relu:
                new = self.graph.call_function(torch.relu, (new,))
            self.stats["quantized_ops"] += 1
        else:  # add / mul
            fn = (_QUANT_ADD if is_add(n) else _QUANT_MUL)[relu]
            a, b = n.args
            new = self.graph.create_node("call_function", fn, (self.env[a], self.env[b], qp.scale, qp.zero_point), name=n.name)
            self.stats["quantized_ops"] += 1
        if clamp6:
            new = self.graph.call_function(F.hardtanh, (new, 0.0, 6.0))
        self.env[end] = new
        self.qp[end] = qp
        if end is not n:
            self.absorbed.add(end)
        return True


def lower_quantized(program: Program, *, engine: str | None = None) -> tuple[GraphModule, dict[str, Any]]:
    """The quantized-kernel graph of a simulated-int8 program, and what was lowered how.

    Re-derives the program's qparams first when the kernels need another scheme (u8
    activations; 7-bit on CPUs without VNNI): the program stays the reference the result
    is verified against.
    """
    info = program.meta.get(META_KEY)
    if info is None:
        raise UsageError("cpu-int8 lowers simulated-int8 programs: put insert-quant-stubs in the pipeline")
    silence_quantized_deprecation()
    engine = engine or default_engine()
    if engine not in ENGINES:
        raise UsageError(f"unknown quantized engine '{engine}'; valid: {choices(ENGINES)}")
    cfg = info.config
    rederived = []
    want_rr = cfg.reduce_range or (engine in ("fbgemm", "x86") and not cpu_has_vnni())
    if cfg.activations != "u8" or want_rr != cfg.reduce_range:
        rederive(program, "u8", reduce_range=want_rr)
        rederived.append(f"activations re-derived as u8{' (reduce_range)' if want_rr else ''} from the same calibration")
    clear_kernel_arithmetic(program.graph_module)  # nothing left over from another lowering
    with engine_scope(engine):
        lowering = _Lowering(program.graph_module, engine)
        gm = lowering.run()
        _measure_kernels(lowering, gm, program.example_inputs)
        lowering.unmodelled += _mark_fused_inputs(program.graph_module, gm, lowering.fused_dequantize)
        lowering.unmodelled += [n for n, (fq, _) in lowering.pools.items() if pool_ties(fq) is None]
    not_exact = sorted(set(lowering.unmodelled) | lowering.inexact)
    stats = dict(lowering.stats, engine=engine, rederived=rederived, points=lowering.points,
                 exact_simulation=not not_exact, not_bit_exact=not_exact)
    return gm, stats


# ---------------------------------------------------------------------------------------
# Artifact and backend


def freeze(gm: GraphModule, engine: str) -> torch.jit.ScriptModule | GraphModule:
    """``gm`` scripted and frozen (no Python between its kernels); ``gm`` itself where TorchScript cannot compile it."""
    try:
        with engine_scope(engine), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The TorchScript type system")  # fx's instance annotations
            frozen = torch.jit.freeze(torch.jit.script(gm.eval()), optimize_numerics=False)
    except Exception:  # noqa: BLE001 - an op TorchScript lacks: the fx graph runs it, op by op in Python
        return gm
    _drop_input_checks(frozen.graph)
    return frozen


def _drop_input_checks(graph: torch._C.Graph) -> None:
    """Remove the ``if len(input.shape) != 4: raise`` checks the quantized modules' forwards script
    (size, len, compare, branch before every kernel; a traced torch.ao module has none): the
    kernels still refuse an input of the wrong rank, and no value changes."""
    for node in list(graph.nodes()):
        if node.kind() != "prim::If" or node.outputsSize():
            continue
        ends = [[n.kind() for n in block.nodes()][-1:] for block in node.blocks()]
        if ["prim::RaiseException"] in ends and all(e in ([], ["prim::RaiseException"]) for e in ends):
            node.destroy()
    torch._C._jit_pass_dce(graph)


class QuantizedArtifact(Artifact):
    """A graph of quantized CPU kernels (in memory or loaded from graph.json + weights.pt).

    ``graph_module`` is the fx graph (its nodes are the lowering points); ``run`` calls its
    frozen TorchScript compilation (:attr:`runner`, built on the first run).
    """

    def __init__(self, gm: GraphModule, target: TargetSpec | str, input_specs: list[InputSpec], engine: str,
                 stats: dict[str, Any] | None = None, threads: int | None = None) -> None:
        self.graph_module = gm
        self.target = target if isinstance(target, str) else target.name
        self.precision = "int8"
        self.input_specs = input_specs
        self.engine = engine
        self.stats = stats or {}
        #: simulated quantizer node -> lowered node computing the same quantized value
        self.points: dict[str, str] = dict(self.stats.get("points", {}))
        #: the program it was lowered from now simulates these kernels bit for bit
        #: (the strategies of _cpu_int8_arith), so end-to-end agreement can be demanded of it
        self.exact_simulation = bool(self.stats.get("exact_simulation"))
        self.threads = threads
        self._runner: torch.jit.ScriptModule | GraphModule | None = None
        self._qengine: int | None = None  # torch's id of ``engine``, known after the first run

    @property
    def runner(self) -> torch.jit.ScriptModule | GraphModule:
        """What ``run`` calls: the frozen TorchScript module (:func:`freeze`), or the fx graph where it cannot be scripted."""
        if self._runner is None:
            self._runner = freeze(self.graph_module, self.engine)
        return self._runner

    def run(self, *inputs: torch.Tensor) -> Any:
        # A serving loop (inference mode on, threads and engine already right) goes straight to the
        # frozen module: the checks below cost ~20 us a call (ResNet-18 at 32x32: 364 vs 343 us,
        # 0.5-1 % of a 224x224 ResNet), the same order as the gap measured to torch.ao's frozen module.
        if (self._qengine is not None and torch._C._get_qengine() == self._qengine and torch.is_inference_mode_enabled()
                and (self.threads is None or self.threads == torch.get_num_threads())):
            return self.runner(*inputs)
        if torch.backends.quantized.engine != self.engine:
            torch.backends.quantized.engine = self.engine
        self._qengine = torch._C._get_qengine()  # the engine as torch keeps it: one cheap comparison above
        with torch_threads(self.threads), torch.inference_mode():
            return self.runner(*inputs)

    def save_files(self, directory: Path) -> dict[str, Any]:
        files = save_graph(self.graph_module, directory, self.engine, self.points)
        return {"backend": "torch-quantized-cpu", "engine": self.engine, "files": files,
                "not_bit_exact": self.stats.get("not_bit_exact", ["unknown"])}


class CpuInt8Backend:
    name = "torch-quantized-cpu"
    cpu_threads = True
    options = (BackendOption("engine", "quantized kernel engine [default: the fastest here, x86 where it exists]",
                             choices=ENGINES),)

    def unavailable_reason(self) -> str | None:
        supported = torch.backends.quantized.supported_engines
        if not any(e in supported for e in ENGINES):
            return f"this torch build has no x86/fbgemm/onednn quantized engine (has {', '.join(supported)})"
        return None

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        options = program.meta.get("backend_options") or {}
        valid = [o.name for o in self.options]
        unknown = set(options) - set(valid)
        if unknown:
            raise UsageError(f"cpu-int8: unknown backend option(s) {choices(unknown)}; valid: {choices(valid)}")
        engine = options.get("engine") or default_engine()
        gm, stats = lower_quantized(program, engine=engine)
        return QuantizedArtifact(gm, target, program.input_specs, engine, stats, program_threads(program))

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        engine = manifest.get("engine") or default_engine()
        gm, points = load_graph(directory, engine)
        specs = manifest_inputs(manifest)
        not_exact = manifest.get("not_bit_exact", ["unknown"])
        return QuantizedArtifact(gm, target, specs, engine,
                                 {"points": points, "not_bit_exact": not_exact, "exact_simulation": not not_exact},
                                 manifest_threads(manifest))


BACKEND = CpuInt8Backend()

cpu_int8 = register_target(
    "cpu-int8",
    backend=BACKEND,
    precision="int8",
    pipeline="fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce",
    doc="int8 on the CPU: PyTorch quantized kernels (x86/fbgemm/oneDNN), packed weights; graph.json + weights.pt",
)
