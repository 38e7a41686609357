"""trt-fp16 and trt-int8: TensorRT engines built from a TensorRT-ready ONNX model.

Lowering writes the ONNX TensorRT will read (strongly typed networks: the file says the
precision of every tensor):

- **trt-int8**: the simulated-int8 program (``insert-quant-stubs{activations=s8}``, the
  same calibration as every int8 target) exported by the one Q/DQ exporter under the
  ``TENSORRT`` row of its placement table (:mod:`graphopt.backends._trt_placement`:
  symmetric int8, Q/DQ only on the inputs of Conv/Gemm and residual identities, one
  scale per Concat), everything not quantized in fp16 (onnxconverter-common);
- **trt-fp16**: the optimized fp32 program exported and converted to fp16.

The artifact is ``model.onnx`` + ``goldens.npz`` (verification inputs and the original's
outputs) + ``artifact.json``; the engine is built on the machine that runs it and cached
under ``engines/`` keyed by GPU + compute capability + TensorRT version
(:mod:`graphopt.backends._trt_engine`).

Where no GPU or TensorRT is present, ``--defer-engine`` still writes the artifact: its
ONNX is verified here by ONNX Runtime on that exact file (``ORT_DISABLE_ALL``: every op as
the graph says, int8 simulated through its Q/DQ pairs; ORT's own fused fp16 Q/DQ kernels
disagree with the graph, cosine 0.94 on ResNet-18). On the GPU machine the first
:func:`graphopt.load_artifact` (or ``graphopt verify OUT/``) builds the engine, holds it to
the target's tolerance against the goldens and caches it only then.

Backend options: ``defer_engine`` (flag), ``workspace_mib`` (builder workspace),
``max_batch`` (upper end of the batch optimization profile when the batch dim is dynamic).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from graphopt.backends import _trt_engine as engine_mod
from graphopt.backends._onnx_export import _check, export_fp32
from graphopt.backends._onnx_qdq import TENSORRT, export_int8
from graphopt.backends._trt_placement import to_fp16
from graphopt.backends.ort import MANIFEST_KEYS, MODEL_FILE, OrtArtifact, _missing, load_onnx_artifact
from graphopt.errors import ArtifactError, UsageError, VerificationError
from graphopt.program import Program
from graphopt.targets import Artifact, BackendOption, TargetSpec, register_target
from graphopt.verify import GOLDENS_FILE, compare, default_tolerance, load_golden, save_golden

__all__ = ["TensorRTArtifact", "TensorRTBackend", "gpu_missing", "trt_fp16", "trt_int8"]

ONNX_MODULES = ("onnx", "onnxruntime", "onnx_graphsurgeon", "onnxconverter_common")
DEFER_HINT = ("use --defer-engine for a portable artifact (TensorRT-ready ONNX + goldens, checked here with ONNX Runtime; "
              "the engine is built on the GPU machine)")


def gpu_missing() -> str | None:
    """None where a CUDA GPU and TensorRT are both usable, else what is missing (one clause)."""
    missing = []
    if not torch.cuda.is_available():
        build = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
        missing.append(f"no CUDA GPU (torch {torch.__version__}: {build})")
    try:
        importlib.import_module("tensorrt")
    except Exception:
        missing.append("tensorrt is not installed (pip install 'graphopt[tensorrt]')")
    return " and ".join(missing) or None


def onnx_missing() -> str | None:
    """None where the TensorRT-ready ONNX can be prepared and checked (the ONNX tools import), else what is missing."""
    return _missing(ONNX_MODULES, "onnx,tensorrt")


class TensorRTArtifact(OrtArtifact):
    """A TensorRT-ready ONNX model, its goldens, and (on a GPU machine) its engine.

    Without an engine it runs the ONNX with ONNX Runtime op by op (the deferred form, or
    the reference the per-op check reads); ``graph_module``/``points`` always come from
    that ONNX Runtime run, so every kept quantizer is held to its own output steps
    against the simulated program, while the engine is held to the target's tolerance
    against the original (TensorRT's int8 kernels accumulate differently by design).
    """

    optimize = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engine: engine_mod.EngineRunner | None = None
        self.engine_key: str | None = None

    @property
    def runtime(self) -> str:
        if self.engine is not None:
            return f"TensorRT ({self.engine_key})"
        return "ONNX Runtime on the CPU (engine deferred: built on the GPU machine)"

    def attach_engine(self, plan: bytes, key: str) -> None:
        self.engine, self.engine_key = engine_mod.EngineRunner(plan), key

    def run_cuda(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """The engine's outputs as CUDA tensors (flat), enqueued on the current stream, not synchronized."""
        if self.engine is None:
            raise UsageError(f"{self.target}: no engine here ({self.runtime})")
        return self.engine.run(inputs)

    def run(self, *inputs: torch.Tensor) -> Any:
        if self.engine is None:
            return super().run(*inputs)
        if len(inputs) != len(self.input_names):
            raise UsageError(f"{self.target} expects {len(self.input_names)} input(s), got {len(inputs)}")
        outs = self.run_cuda(*inputs)
        torch.cuda.current_stream().synchronize()
        return pytree.tree_unflatten([o.float().cpu() for o in outs], self.output_spec)

    @property
    def report_extra(self) -> dict[str, Any]:
        info: dict[str, Any] = {"runtime": self.runtime, "qdq": self.fields.get("qdq")}
        if self.engine is not None:
            info["engine"] = self.engine_key
            info["layer_precisions"] = self.engine.layer_precisions()
        return {"tensorrt": info}

    def save_files(self, directory: Path) -> dict[str, Any]:
        (directory / MODEL_FILE).write_bytes(self.model_bytes)
        files = [MODEL_FILE, GOLDENS_FILE, engine_mod.ENGINE_DIR]
        if self.goldens is not None:
            inputs, outputs = self.goldens
            save_golden(directory / GOLDENS_FILE, inputs, outputs, {"source": "the original model", "target": self.target})
        if self.engine is not None:
            engine_mod.write_atomic(engine_mod.engine_path(directory, self.engine_key), self.engine.plan)
        fields = {k: v for k, v in self.fields.items() if k != "engine"}
        return {"backend": "tensorrt", "files": files, "output_structure": pytree.treespec_dumps(self.output_spec),
                "engine": "built" if self.engine is not None else "deferred", **fields}


class TensorRTBackend:
    name = "tensorrt"
    options = (
        BackendOption("defer_engine", "where no GPU/TensorRT is present: write the TensorRT-ready ONNX + goldens, "
                      "checked with ONNX Runtime; the engine is built when loaded on the GPU machine", type=bool),
        BackendOption("workspace_mib", f"TensorRT builder workspace in MiB [default: {engine_mod.DEFAULT_WORKSPACE_MIB}]",
                      type=int),
        BackendOption("max_batch", "largest batch of the engine's optimization profile [default: the compiled batch]", type=int),
    )

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def unavailable_reason(self) -> str | None:
        reason = gpu_missing()
        return f"{reason}; {DEFER_HINT}" if reason else onnx_missing()

    def unavailable_reason_for(self, options: dict[str, Any]) -> str | None:
        return onnx_missing() if options.get("defer_engine") else self.unavailable_reason()

    @staticmethod
    def _options(program: Program, what: str) -> dict[str, Any]:
        options = {k: v for k, v in (program.meta.get("backend_options") or {}).items() if v is not None}
        for name in ("workspace_mib", "max_batch"):
            if name in options and (not isinstance(options[name], int) or options[name] < 1):
                raise UsageError(f"{what}: backend option '{name}' must be a positive integer, got {options[name]!r}")
        return options

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        import onnx

        options = self._options(program, target.name)
        if self.precision == "int8":
            data, fields, spec = export_int8(program, TENSORRT, target.name)
            # the simulated program mirrors the placement; the fp16 ops between quantizers are not modelled
            fields["not_bit_exact"] = ["fp16 between quantizers"]
        else:
            data, fields, spec = export_fp32(program, target.name)
            model = to_fp16(onnx.load_from_string(data), target.name)
            _check(model, target.name)
            data = model.SerializeToString()
            fields["opset"] = model.opset_import[0].version
        if options.get("max_batch", 0) > program.input_specs[0].shape[0]:
            data = dynamic_batch(data, options["max_batch"], target.name)
        fields["backend_options"] = {"defer_engine": bool(options.get("defer_engine"))}
        fields["engine_options"] = {k: options[k] for k in ("workspace_mib", "max_batch") if k in options}
        art = TensorRTArtifact(data, target, self.precision, program.input_specs, spec, fields)
        if not options.get("defer_engine"):
            engine_mod.require_gpu(target.name)
            art.attach_engine(_build(art, target.name), engine_mod.current_key())
        return art

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        art = load_onnx_artifact(TensorRTArtifact, directory, manifest, target, self.precision, MANIFEST_KEYS | {"engine"})
        if (directory / GOLDENS_FILE).is_file():
            gold = load_golden(directory / GOLDENS_FILE)
            art.goldens = (gold.inputs, gold.outputs)
        if gpu_missing() is not None:
            return art  # deferred (load_artifact refuses a non-deferred one here: the target is unavailable)
        key, plan = engine_mod.load_cached(directory)
        if art.goldens is None:  # the engine would be unchecked: a cached one may come from anywhere
            raise ArtifactError(f"'{directory}' has no {GOLDENS_FILE} to check its TensorRT engine against")
        art.attach_engine(plan if plan is not None else _build(art, target.name), key)
        _check_goldens(art, directory, cached=plan is not None)
        if plan is None:
            engine_mod.write_atomic(engine_mod.engine_path(directory, key), art.engine.plan)
        return art


def dynamic_batch(model_bytes: bytes, max_batch: int, what: str) -> bytes:
    """The model with a symbolic batch dim (``batch``) on every input and output, checked on ONNX Runtime:
    ``max_batch`` copies of one input must give that input's outputs. UsageError where the graph fixes the batch."""
    import numpy as np
    import onnx

    from graphopt.backends.ort import _session

    model = onnx.load_from_string(model_bytes)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    del model.graph.value_info[:]  # shapes inside were inferred at the compiled batch
    data = model.SerializeToString()
    try:
        session = _session(data, 1, spin=False, optimize=False)
        rng = np.random.default_rng(0)
        feeds = {i.name: np.repeat(rng.standard_normal((1, *shapes[i.name][1:])).astype(np.float32), max_batch, axis=0)
                 for i in session.get_inputs()}
        outs = session.run(None, feeds)
        ok = all(o.shape[0] == max_batch and np.allclose(o, o[:1], rtol=1e-2, atol=1e-2) for o in outs)
    except Exception:
        ok = False
    if not ok:
        raise UsageError(f"{what}: --max-batch {max_batch}: the exported graph fixes its batch dim (a reshape to a constant "
                         "batch?); compile at the batch size you need instead")
    return data


def _build(art: TensorRTArtifact, what: str) -> bytes:
    opts = art.fields.get("engine_options") or {}
    return engine_mod.build_engine(art.model_bytes, art.precision, [s.shape for s in art.input_specs],
                                   workspace_mib=opts.get("workspace_mib", engine_mod.DEFAULT_WORKSPACE_MIB),
                                   max_batch=opts.get("max_batch"), what=what)


def _check_goldens(art: TensorRTArtifact, directory: Path, *, cached: bool) -> None:
    """The engine against the stored goldens, at the target's tolerance; VerificationError (a new one is not cached) if not."""
    from graphopt.fx_util import run_all

    inputs, outputs = art.goldens
    metrics = compare(outputs, run_all(art.run, inputs)).metrics
    bad = default_tolerance(art.precision).violations(metrics)
    if bad:
        which = f"the cached engine '{engine_mod.engine_path(directory, art.engine_key)}'" if cached else \
            f"the engine built for '{directory}' on {art.engine_key}"
        raise VerificationError(f"{which} does not match its goldens: {'; '.join(bad)}"
                                f"{'' if cached else '; no engine was cached'}")


def _target(precision: str, pipeline: str, doc: str) -> TargetSpec:
    return register_target(f"trt-{precision}", backend=TensorRTBackend(precision), precision=precision, pipeline=pipeline,
                           doc=doc)


trt_fp16 = _target("fp16", "fuse-conv-bn-relu,dce",
                   "TensorRT engine from an fp16 ONNX (strongly typed); model.onnx + goldens, engine cached per GPU/TensorRT")
trt_int8 = _target("int8", "fuse-conv-bn-relu,insert-quant-stubs{activations=s8},dce",
                   "TensorRT engine from a Q/DQ ONNX under TensorRT's placement rules, fp16 elsewhere; "
                   "model.onnx + goldens, engine cached per GPU/TensorRT")
