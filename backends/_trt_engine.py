"""TensorRT engines: build one from the TensorRT-ready ONNX, cache it beside the artifact, run it on torch CUDA tensors.

An engine is specific to a GPU model and a TensorRT version, so it is built on the
machine that runs it and cached under ``engines/`` in the artifact folder, keyed by GPU
name + compute capability + TensorRT version (:func:`cache_key`, as ONNX Runtime's
TensorRT provider keys its cache). A cache entry is written only after the engine
matched the artifact's goldens (:func:`load_or_build`); writing is atomic.

Networks are strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): int8
comes from the ONNX's Q/DQ pairs and fp16 from its fp16 tensors. TensorRT 11 removed
``BuilderFlag.FP16/INT8`` and TensorRT 10 refuses them on a strongly typed network, so
the precision flags are set only on a TensorRT without strong typing (weakly typed).

Everything here needs ``tensorrt`` and a CUDA build of torch; only :func:`cache_key` and
:func:`engine_path` run without them (and are tested on CPU).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.errors import ArtifactError, BackendUnavailableError, LoweringError, first_line

ENGINE_DIR = "engines"
#: Default builder workspace (``--workspace-mib``).
DEFAULT_WORKSPACE_MIB = 1024


def cache_key(gpu_name: str, capability: tuple[int, int], trt_version: str) -> str:
    """``NVIDIA H100 80GB HBM3``, (9, 0), ``10.3.0`` -> ``nvidia-h100-80gb-hbm3.sm90.trt10.3.0``."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"
    version = re.sub(r"[^0-9A-Za-z.]+", "-", trt_version) or "unknown"
    return f"{slug}.sm{capability[0]}{capability[1]}.trt{version}"


def engine_path(directory: Path, key: str) -> Path:
    return Path(directory) / ENGINE_DIR / f"{key}.engine"


def current_key() -> str:
    """The cache key of this machine's current GPU and TensorRT."""
    import tensorrt as trt

    index = torch.cuda.current_device()
    return cache_key(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), trt.__version__)


def _logger() -> Any:
    import tensorrt as trt

    return trt.Logger(trt.Logger.ERROR)


def _network_flags(trt: Any) -> tuple[int, bool]:
    """(create_network flags, strongly typed?)."""
    strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(strongly), True) if strongly is not None else (0, False)


def build_engine(onnx_bytes: bytes, precision: str, input_shapes: Sequence[tuple[int, ...]], *,
                 workspace_mib: int = DEFAULT_WORKSPACE_MIB, max_batch: int | None = None, what: str = "tensorrt") -> bytes:
    """A serialized engine (plan) of the ONNX model. Inputs whose batch dim is dynamic get an
    optimization profile ``1 .. max_batch`` (optimal at the compiled batch); static ones a fixed one."""
    import tensorrt as trt

    logger = _logger()
    builder = trt.Builder(logger)
    flags, strongly_typed = _network_flags(trt)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise LoweringError(f"{what}: TensorRT's ONNX parser rejected the model: {errors or 'no detail'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer precision in the inspector
    if not strongly_typed:  # a TensorRT before strong typing: the precision flags choose the kernels
        for name in ("FP16",) + (("INT8",) if precision == "int8" else ()):
            flag = getattr(trt.BuilderFlag, name, None)
            if flag is not None:
                config.set_flag(flag)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        opt = tuple(input_shapes[i])
        dims = tuple(tensor.shape)
        low = (1, *opt[1:]) if dims and dims[0] == -1 else opt
        high = (max(max_batch or opt[0], opt[0]), *opt[1:]) if dims and dims[0] == -1 else opt
        profile.set_shape(tensor.name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise LoweringError(f"{what}: TensorRT could not build an engine (run with --debug and TensorRT's log; "
                            "'could not find any implementation' means no int8 kernel for a layer on this GPU)")
    return bytes(plan)


#: How the inspector's "Format/Datatype" text names a layer output's precision (first match wins).
PRECISION_WORDS = (("int8", ("int8",)), ("fp16", ("half", "fp16")), ("bf16", ("bf16",)), ("fp32", ("float", "fp32")))

_TORCH_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "INT8": torch.int8, "INT32": torch.int32,
                 "INT64": torch.int64, "BOOL": torch.bool, "BF16": torch.bfloat16}


class EngineRunner:
    """A deserialized engine and one execution context, run on torch CUDA tensors on the current stream."""

    def __init__(self, plan: bytes) -> None:
        import tensorrt as trt

        self.plan = plan
        self.runtime = trt.Runtime(_logger())
        if hasattr(self.runtime, "engine_host_code_allowed"):
            self.runtime.engine_host_code_allowed = False  # an engine file may not run host code (TensorRT's default)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise ArtifactError("TensorRT could not deserialize the cached engine (another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def _dtype(self, name: str) -> torch.dtype:
        return _TORCH_DTYPES[str(self.engine.get_tensor_dtype(name)).rsplit(".", 1)[-1]]

    def run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs (CUDA tensors) for CUDA ``inputs`` in the engine's input order."""
        ctx = self.context
        keep = []
        for name, t in zip(self.inputs, inputs):
            t = t.to(device="cuda", dtype=self._dtype(name)).contiguous()
            keep.append(t)
            ctx.set_input_shape(name, tuple(t.shape))
            ctx.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._dtype(name), device="cuda")
            ctx.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise LoweringError("TensorRT's execute_async_v3 failed")
        return outs

    def layer_precisions(self) -> dict[str, int]:
        """How many engine layers compute in each precision (the engine inspector's view)."""
        import json

        import tensorrt as trt

        inspector = self.engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        counts: dict[str, int] = {}
        for layer in info.get("Layers", []):
            if not isinstance(layer, dict):
                continue
            text = " ".join(str(t.get("Format/Datatype", "")) for t in layer.get("Outputs", []) if isinstance(t, dict)).lower()
            kind = next((k for k, words in PRECISION_WORDS if any(w in text for w in words)), "other")
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def require_gpu(what: str) -> None:
    from graphopt.backends.tensorrt import gpu_missing

    reason = gpu_missing()
    if reason:
        raise BackendUnavailableError(f"{what} cannot build its engine here: {reason}")


def load_cached(directory: Path) -> tuple[str, bytes | None]:
    """(this machine's key, the cached engine for it or None)."""
    key = current_key()
    path = engine_path(directory, key)
    try:
        return key, path.read_bytes() if path.is_file() else None
    except OSError as exc:
        raise ArtifactError(f"cannot read the cached engine '{path}': {first_line(exc)}") from None
