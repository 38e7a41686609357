"""ov-fp32, ov-bf16 and ov-int8: OpenVINO on the CPU, fed graphopt's own ONNX export.

**ov-fp32** / **ov-bf16** read the optimized fx program's ONNX export
(:func:`~graphopt.backends._onnx_export.export_fp32`) into OpenVINO and compile it with
``INFERENCE_PRECISION_HINT`` ``f32`` / ``bf16`` (bf16 needs a CPU with AVX-512-BF16 or
AMX-BF16; elsewhere the target is unavailable and says which feature is missing).

**ov-int8** reads the *simulated int8* program's Q/DQ export
(:func:`~graphopt.backends._onnx_qdq.export_int8`) under OpenVINO's row of the placement
table (:data:`OPENVINO`); OpenVINO turns every QuantizeLinear/DequantizeLinear pair into a
FakeQuantize and its low-precision transformations run the convolutions on u8/i8 values.
Layers kept in fp32 (``--keep-fp32``) have no Q/DQ on their weights and run in fp32 (or bf16, below).
OpenVINO 2026.4.1's CPU plugin segfaults compiling ``Concat (2+ inputs) → Q/DQ (zero point ≠ 0) →
BatchNorm/Mul/Add by constants → Q/DQ`` (DenseNet-121's pre-activation layers; in its low-precision
``MoveFakeQuantize``), so the row leaves that concatenation's pair out, in the simulation too
(``float_concat_before_affine``, :func:`~graphopt.backends._onnx_qdq._float_concats_before_affine`);
every conv still runs u8. Each model is still compiled once in a child process first (:func:`_compile_in_child`).

Activation scheme, chosen by measurement (``insert-quant-stubs{activations=u8|s8}`` on the
same calibration, 224x224, batch 1, 2 OpenVINO threads, 15 interleaved rounds of 10 runs,
medians; this 2-core AVX-512-VNNI machine, shared with other jobs, so read the ratios):
u8 asymmetric activations won: s8/u8 latency 1.19x on ResNet-18 (119.7 vs 100.9 ms) and
1.09x on MobileNetV2 (39.3 vs 36.0 ms), and u8 is the more accurate (cosine vs fp32
0.99968 vs 0.99944 and 0.99564 vs 0.99399): an s8 quantizer after a ReLU wastes half its
codes. Weights are symmetric int8 per output channel in both. ONNX Runtime's extra
same-qparams pairs after MaxPool/Flatten bought nothing (1.03x and 1.00x slower with
them), so OpenVINO's row has none. ``ov-int8`` runs ``insert-quant-stubs{activations=u8}``;
s8 programs are accepted.

OpenVINO's int8 kernels accumulate in int32 and requantize in their own order, so the
artifact is not claimed bit-exact against the simulation (``exact_simulation`` False):
verification holds every quantized op to 2 of its own output steps, fed OpenVINO's own
inputs (``lowering_local``: each point's FakeQuantize output exposed by a probe model),
reports the end-to-end error against the simulated program in output steps
(``lowering_check``; one-step rounding ties compound through depth: 5 output steps on
ResNet-18 at 64x64, 9 on MobileNetV2 at 48x48) and holds the outputs to the int8 tolerance against the original.

**ov-int8 ``--float-precision fp32|bf16``** (``backend_options={"float_precision": ...}``) is the precision
OpenVINO runs the part of the int8 model that is not int8 in: the ``--keep-fp32`` layers (explicit or
``auto``) and the float arithmetic between a dequantize and the next quantize. ``fp32`` (default):
``INFERENCE_PRECISION_HINT`` ``f32``, the artifact exactly as before (nothing more recorded). ``bf16``:
the hint ``bf16`` on the int8 model (a CPU without AVX-512-BF16/AMX-BF16 is unavailable, exit 3, naming
the feature); recorded in the manifest (``backend_options`` and ``config``), so a reload compiles the same
way; :func:`compile_config` is the one place the artifact, its probe and the child-process check get their
configuration from. The report's ``openvino`` entry names the float part's precision and counts the
compute layers by runtime precision (``Convolution:bf16 2, Convolution:u8 18``). Measured (MobileNetV2
224x224, batch 1, 2 OpenVINO threads, 10 layers kept: features.0-2, 17, 18; 30 interleaved rounds of
10 runs, medians; this 2-core AVX-512-BF16 machine (no AMX) was shared with other jobs at load 5-6, so
read the ratio): bf16 10.1 vs fp32 14.0 ms (0.72x; a second run, 15 rounds: 4.5 vs 6.9 ms, 0.65x);
with no layer kept the hint changes nothing measurable (8.7 vs 8.9 ms).

bf16 keeps 8 significant bits: one rounding of a value of up to 255 output steps moves it by up to half
a step, and OpenVINO rounds to bf16 in places its runtime model does not all report (a kept layer's
inputs, weights and output; on ConvNeXt the float arithmetic around int8 FullyConnected layers too). The
per-op check measured it (worst quantizer, in its own steps, 48x48, 4 layers kept, fp32 -> bf16): 1 -> 2
on ResNet-18/50, SE-ResNet, ShuffleNetV2, SqueezeNet and MobileNetV2 at 64x64 (the quantizers after the
kept layers), 1 -> 3 on Inception (after kept stem convolutions) and ConvNeXt (its fc1 quantizers, also
with no layer kept), 1 -> 1 on EfficientNet-B0 and MobileNetV2 at 48x48. Under bf16 every quantized op is therefore held to 2 +
:data:`BF16_EXTRA_STEPS` = 4 of its own steps (``Artifact.extra_steps``; the report shows the bound);
fp32 keeps 2, and the end-to-end check against the original holds both to the int8 tolerance.

Every target compiles with ``PERFORMANCE_HINT=LATENCY`` and ``INFERENCE_NUM_THREADS`` from
``--threads`` (:mod:`graphopt.threads`; default: the cores this process may use). The artifact is the
OpenVINO IR (``model.xml`` + ``model.bin``, written by ``ov.save_model`` without fp16
compression): no pickles; it reloads without the original or ONNX.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.fx import GraphModule

from graphopt.backends._onnx_export import export_fp32
from graphopt.backends._onnx_qdq import OPENVINO, export_int8
from graphopt.backends.ort import ProbedArtifact, _missing, probe_graph, read_io_specs
from graphopt.errors import ArtifactError, LoweringError, UsageError, choices, first_line
from graphopt.program import InputSpec, Program
from graphopt.targets import Artifact, BackendOption, TargetSpec, register_target
from graphopt.threads import default_threads, manifest_threads, program_threads

__all__ = ["MODEL_FILE", "WEIGHTS_FILE", "OvArtifact", "OvBackend", "ov_fp32", "ov_bf16", "ov_int8", "cpu_flags"]

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
#: the precision hint each target compiles with (ov-int8: that of its float part, ``--float-precision``)
PRECISION_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
#: ``--float-precision bf16``: output steps added to every quantized op's bound (see the module doc)
BF16_EXTRA_STEPS = 2.0
#: the layers ``report_extra`` counts by runtime precision (the ones that do the arithmetic)
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
#: ov-int8's option: the precision OpenVINO runs everything that is not int8 in
FLOAT_PRECISION = BackendOption(
    "float_precision", "precision of the part not run in int8 (--keep-fp32 layers, ops without int8 kernels); "
    "bf16 needs AVX-512-BF16 or AMX-BF16 [default: fp32]", choices=("fp32", "bf16"), default="fp32")


def cpu_flags() -> set[str]:
    """The CPU feature flags the OS reports (``/proc/cpuinfo``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def _core() -> Any:
    import openvino as ov

    return ov.Core()


def _bf16_missing(what: str = "ov-bf16") -> str | None:
    """Why this CPU cannot run bf16 kernels (None when it can); ``what`` is the thing that needs them."""
    try:
        capabilities = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as exc:  # no CPU plugin
        return f"OpenVINO has no CPU device: {first_line(exc)}"
    if "BF16" in capabilities:
        return None
    flags = cpu_flags()
    missing = [f for f in ("avx512_bf16", "amx_bf16") if f not in flags]
    return f"this CPU lacks {' and '.join(missing) or 'bf16 support'} ({what} needs AVX-512-BF16 or AMX-BF16)"


def _fq_inputs(model_bytes: bytes, points: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each point with the ONNX tensor its QuantizeLinear reads (``input``): OpenVINO keeps that
    tensor's name on the input of the FakeQuantize it makes of the Q/DQ pair (its own output is unnamed)."""
    import onnx

    reads = {n.output[0]: n.input[0] for n in onnx.load_from_string(model_bytes).graph.node if n.op_type == "QuantizeLinear"}
    return {sim: {**p, "input": reads[p["tensor"]]} for sim, p in points.items() if p["tensor"] in reads}


def _fq_range(fq: Any) -> tuple[float, float, int] | None:
    """A per-tensor FakeQuantize's (output low, output high, levels); None if they are not scalar constants."""
    bounds = []
    for k in (3, 4):
        node = fq.input_value(k).get_node()
        if node.get_type_name() != "Constant" or node.get_data().size != 1:
            return None
        bounds.append(float(node.get_data().reshape(())))
    return bounds[0], bounds[1], int(fq.get_levels())


class _OvProbe(nn.Module):
    """Runs the model with every point's FakeQuantize output exposed as well: the outputs, then one
    quantized torch tensor per point (its values are on the point's grid; their codes are recovered)."""

    def __init__(self, model: Any, points: list[dict[str, Any]], config: dict[str, Any]) -> None:
        super().__init__()
        probe = model.clone()
        fq_by_input: dict[str, Any] = {}
        for op in probe.get_ordered_ops():
            if op.get_type_name() == "FakeQuantize":
                for name in op.input(0).get_source_output().get_names():
                    fq_by_input.setdefault(name, op)
        self.points = [p for p in points if p.get("input") in fq_by_input and _fq_range(fq_by_input[p["input"]]) is not None]
        #: per point: the FakeQuantize's (output low, output high, levels); its output is on that grid
        self.ranges = [_fq_range(fq_by_input[p["input"]]) for p in self.points]
        self.n_outputs = len(probe.outputs)
        probe.add_outputs([fq_by_input[p["input"]].output(0) for p in self.points])
        self.compiled = _core().compile_model(probe, "CPU", config)
        self.request = self.compiled.create_infer_request()

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from graphopt.quant import silence_quantized_deprecation

        silence_quantized_deprecation()
        results = self.request.infer({i: t.detach().cpu().contiguous().numpy() for i, t in enumerate(inputs)})
        outs = [torch.from_numpy(results[o].copy()) for o in self.compiled.outputs]
        quantized = []
        for value, p, (out_low, out_high, levels) in zip(outs[self.n_outputs:], self.points, self.ranges):
            low, high = (0, 255) if p["dtype"] == "uint8" else (-128, 127)
            # OpenVINO's ONNX reader makes the FakeQuantize output the 8-bit codes (as floats) and the
            # DequantizeLinear a Subtract/Multiply after it; the grid is read, not assumed
            codes = torch.round(low + (value.double() - out_low) / (out_high - out_low) * (levels - 1))
            codes = torch.clamp(codes, low, high)
            codes = codes.to(torch.uint8 if p["dtype"] == "uint8" else torch.int8)
            quantized.append(torch._make_per_tensor_quantized_tensor(codes, p["scale"], p["zero_point"]))
        return tuple(outs[:self.n_outputs] + quantized)


class OvArtifact(ProbedArtifact):
    """An OpenVINO model (``ov.Model``) compiled for the CPU with one infer request.

    int8 artifacts know their *points* (simulated quantizer -> the ONNX tensor its
    FakeQuantize reads): ``graph_module``/``points`` then expose every quantizer's value
    through a second compiled model with those FakeQuantize outputs added, so
    :func:`graphopt.quant.verify_int8` holds every quantized op to its own output steps.
    """

    def __init__(self, model: Any, target: str, precision: str, input_specs: list[InputSpec], output_spec: pytree.TreeSpec,
                 fields: dict[str, Any], threads: int | None = None) -> None:
        self.model = model
        self.target = target
        self.precision = precision
        self.input_specs = input_specs
        self.output_spec = output_spec
        self.fields = dict(fields)
        self.threads = threads or default_threads()
        #: ov-int8: the precision of its float part (``--float-precision``, recorded in ``backend_options``); else None
        self.float_precision = float_precision(precision, self.fields)
        self.config = compile_config(precision, self.threads, self.float_precision)
        self.compiled = _core().compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self.n_outputs = len(self.compiled.outputs)
        self.probe_points: dict[str, dict[str, Any]] = dict(self.fields.get("points") or {})
        self._probe: tuple[GraphModule, dict[str, str]] | None = None

    def run(self, *inputs: torch.Tensor) -> Any:
        if len(inputs) != len(self.input_specs):
            raise UsageError(f"{self.target} expects {len(self.input_specs)} input(s), got {len(inputs)}")
        feed = {i: t.detach().cpu().contiguous().numpy() for i, t in enumerate(inputs)}
        results = self.request.infer(feed)
        outs = [torch.from_numpy(results[self.compiled.outputs[k]].copy()) for k in range(self.n_outputs)]
        return pytree.tree_unflatten(outs, self.output_spec)

    def _build_probe(self) -> tuple[GraphModule, dict[str, str]]:
        if self._probe is None:
            probe = _OvProbe(self.model, list(self.probe_points.values()), self.config)
            kept = [sim for sim, p in self.probe_points.items() if p in probe.points]
            self._probe = probe_graph("openvino", "ov", probe, self.input_specs, self.n_outputs, kept, self.output_spec)
        return self._probe

    @property
    def extra_steps(self) -> float:
        """``--float-precision bf16``: :data:`BF16_EXTRA_STEPS` on every quantized op's bound (see the module doc)."""
        return BF16_EXTRA_STEPS if self.float_precision == "bf16" else 0.0

    def runtime_precisions(self) -> dict[str, str]:
        """Each executed layer of the compiled graph -> the precision OpenVINO runs it in (``runtimePrecision``)."""
        found = {}
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            found[op.get_friendly_name()] = f"{info['layerType'].astype(str)}:{info['runtimePrecision'].astype(str)}"
        return found

    @property
    def report_extra(self) -> dict[str, Any]:
        if self.float_precision is None:
            return {}
        layers = Counter(v for v in self.runtime_precisions().values() if v.split(":")[0] in COMPUTE_LAYERS)
        return {"openvino": {"float_precision": self.float_precision, "layer_precisions": dict(sorted(layers.items()))}}

    def save_files(self, directory: Path) -> dict[str, Any]:
        import openvino as ov

        ov.save_model(self.model, str(directory / MODEL_FILE), compress_to_fp16=False)
        return {
            "backend": "openvino",
            "files": [MODEL_FILE, WEIGHTS_FILE],
            "output_structure": pytree.treespec_dumps(self.output_spec),
            "openvino": ov.__version__,
            "config": {k: str(v) for k, v in self.config.items()},
            **self.fields,
        }


class OvBackend:
    name = "openvino"
    cpu_threads = True  # INFERENCE_NUM_THREADS from --threads (graphopt.threads)

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self._needs = ("openvino", "onnx") + (("onnx_graphsurgeon",) if precision == "int8" else ())
        self.options = (FLOAT_PRECISION,) if precision == "int8" else ()

    def unavailable_reason(self) -> str | None:
        return _missing(self._needs, "openvino") or (_bf16_missing() if self.precision == "bf16" else None)

    def unavailable_reason_for(self, options: dict[str, Any]) -> str | None:
        """As :meth:`unavailable_reason`; ov-int8 with ``float_precision`` bf16 also needs a bf16 CPU."""
        bf16 = options.get("float_precision") == "bf16"
        return self.unavailable_reason() or (_bf16_missing("--float-precision bf16") if bf16 else None)

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        threads = program_threads(program)
        options = target.backend_options({k: v for k, v in (program.meta.get("backend_options") or {}).items() if v is not None})
        target.check_available(options)
        if self.precision == "int8":
            data, fields, spec = export_int8(program, OPENVINO, target.name)
        else:
            data, fields, spec = export_fp32(program, target.name)
        if "points" in fields:
            fields["points"] = _fq_inputs(data, fields["points"])
        if options.get("float_precision", "fp32") != "fp32":  # recorded only when not the default: fp32 artifacts unchanged
            fields["backend_options"] = {"float_precision": options["float_precision"]}
        _compile_in_child(data, target.name, compile_config(self.precision, threads, float_precision(self.precision, fields)))
        model = _core().read_model(data)
        return OvArtifact(model, target.name, self.precision, program.input_specs, spec, fields, threads)

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        for name in (MODEL_FILE, WEIGHTS_FILE):
            if not (directory / name).is_file():
                raise ArtifactError(f"artifact '{directory}' is missing {name}")
        specs, output_spec = read_io_specs(manifest, directory, target)
        path = directory / MODEL_FILE
        try:
            model = _core().read_model(str(path), str(directory / WEIGHTS_FILE))
        except Exception as exc:
            raise ArtifactError(f"OpenVINO cannot read '{path}': {first_line(exc)}") from None
        names = [next(iter(sorted(i.get_names())), "") for i in model.inputs]
        if names != [s.name for s in specs]:
            raise ArtifactError(f"'{path}' has inputs {names}, but its manifest names {[s.name for s in specs]}")
        skip = {"format", "target", "precision", "inputs", "backend", "files", "output_structure", "openvino", "config",
                "threads"}
        fields = {k: v for k, v in manifest.items() if k not in skip}
        float_precision(self.precision, fields)  # a damaged --float-precision record: ArtifactError naming the choices
        try:
            return OvArtifact(model, target.name, self.precision, specs, output_spec, fields, manifest_threads(manifest))
        except Exception as exc:
            raise ArtifactError(f"OpenVINO cannot compile '{path}': {first_line(exc)}") from None


def float_precision(precision: str, fields: dict[str, Any]) -> str | None:
    """An ov-int8 artifact's ``--float-precision`` (its fields' or manifest's ``backend_options``; fp32 when absent);
    None for the fp32/bf16 targets, whose precision is the target's."""
    if precision != "int8":
        return None
    value = (fields.get("backend_options") or {}).get("float_precision", "fp32")
    if value not in FLOAT_PRECISION.choices:
        raise ArtifactError(f"ov-{precision} artifact records backend_options.float_precision {value!r}, "
                            f"not one of {choices(FLOAT_PRECISION.choices)}")
    return value


def compile_config(precision: str, threads: int, float_part: str | None = None) -> dict[str, Any]:
    """The CPU plugin configuration every OpenVINO target compiles with (artifact, probe and child check alike);
    ``float_part``: ov-int8's ``--float-precision`` (the hint then applies to what is not int8)."""
    hint = PRECISION_HINT[float_part or precision]
    return {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": hint}


#: compiles the ONNX file argv[1] for the CPU with the JSON config argv[2]
_CHILD = "import json, sys, openvino as ov; c = ov.Core(); c.compile_model(c.read_model(sys.argv[1]), 'CPU', json.loads(sys.argv[2]))"


def _compile_in_child(data: bytes, target: str, config: dict[str, Any]) -> None:
    """Compile the model once in a child process first: OpenVINO 2026.4.1's CPU plugin segfaults on
    some graphs (DenseNet-121's Q/DQ model did, before OpenVINO's placement row avoided its pattern),
    which would kill this process with no message and take a ``--target cpu`` search down with it.
    A crash there is a LoweringError naming the signal; an ordinary failure is left to the compile
    in this process, which reports its own message."""
    with tempfile.TemporaryDirectory(prefix="graphopt-ov-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(config)], capture_output=True)
    if proc.returncode < 0:
        raise LoweringError(f"{target}: OpenVINO crashed (signal {-proc.returncode}) compiling this model for the CPU; "
                            "a known OpenVINO defect on some graphs: use ort-int8 or cpu-int8")


def _target(precision: str, pipeline: str, doc: str) -> TargetSpec:
    return register_target(f"ov-{precision}", backend=OvBackend(precision), precision=precision, pipeline=pipeline, doc=doc)


ov_fp32 = _target("fp32", "fuse-conv-bn-relu,dce", "OpenVINO on the CPU, fp32 (latency hint); model.xml/.bin")
ov_bf16 = _target("bf16", "fuse-conv-bn-relu,dce",
                  "OpenVINO on the CPU, bf16 inference precision (AVX-512-BF16/AMX); model.xml/.bin")
ov_int8 = _target("int8", "fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce",
                  "OpenVINO on the CPU, int8 from graphopt's Q/DQ ONNX (u8 activations, s8 per-channel weights); "
                  "model.xml/.bin")
