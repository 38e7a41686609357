"""cuda-fp32 and cuda-fp16: the optimized program on an NVIDIA GPU, replayed from a CUDA graph.

The program is exported with ``torch.export`` (the same archive as ``cpu-fp32``:
``model.pt2``, no pickles, read back through :func:`graphopt.capture.safe_pt2.load_pt2`)
and prepared for the GPU when it is loaded:

- weights and activations in ``channels_last`` (cuDNN's fast layout for convolutions);
- **cuda-fp16**: every parameter and activation in fp16 except the layers the
  sensitivity check keeps in fp32 (:func:`choose_fp32_layers`: the whole program in
  fp16 is compared with fp32 on the example and calibration inputs; while it misses the
  target's tolerance, the layer whose fp16 run alone loses the most is kept in fp32).
  The kept layers are recorded in the manifest (``fp32_layers``), so a load prepares
  the same program; inputs are cast in, outputs cast back to fp32;
- a **CUDA graph** captured for the compiled input shapes after warm-up runs on a side
  stream; ``run_cuda`` copies the inputs into its static buffers and replays it (other
  shapes run eagerly).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch.fx import GraphModule

from graphopt.capture.safe_pt2 import load_pt2, module_of
from graphopt.errors import ArtifactError, UsageError
from graphopt.program import InputSpec, Program
from graphopt.targets import Artifact, TargetSpec, manifest_inputs, register_target

__all__ = ["CudaArtifact", "CudaBackend", "choose_fp32_layers", "prepare", "cuda_missing", "cuda_fp32", "cuda_fp16"]

MODEL_FILE = "model.pt2"
#: At most this many sensitivity-ranked layers are tried in fp32 before giving up (the compile then fails verification).
MAX_FP32_LAYERS = 64


def cuda_missing() -> str | None:
    if torch.cuda.is_available():
        return None
    build = "built without CUDA" if torch.version.cuda is None else "no CUDA device visible"
    return f"no CUDA GPU (torch {torch.__version__}: {build})"


# ---------------------------------------------------------------------------------------
# Mixed precision on the exported (ATen-level) graph


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in ``tree`` as ``dtype`` (others untouched)."""
    return pytree.tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t, tree)


def _layer_of(target: str) -> str:
    """``features.0.0.weight`` -> ``features.0.0``: the layer owning a parameter or buffer."""
    return target.rsplit(".", 1)[0] if "." in target else target


def layers(gm: GraphModule) -> list[str]:
    """The layers of an exported graph, in graph order: the owners of the weights its ops read."""
    found: dict[str, None] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    found.setdefault(_layer_of(str(a.target)))
    return list(found)


def prepare(exported_module: GraphModule, precision: str, fp32_layers: Sequence[str], device: str | torch.device) -> GraphModule:
    """A copy of the exported module on ``device``, channels_last, in ``precision`` (fp16 but ``fp32_layers``)."""
    gm = copy.deepcopy(exported_module)
    keep = set(fp32_layers)
    unknown = keep - set(layers(gm))
    if unknown:
        raise UsageError(f"fp32 layers {sorted(unknown)} are not in the program; its layers: {', '.join(layers(gm)[:20])}")
    if precision == "fp16":
        for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
            if t.is_floating_point() and _layer_of(name) not in keep:
                t.data = t.data.half()
        _insert_casts(gm, keep)
    gm = gm.to(device)
    for t in [*gm.parameters(), *gm.buffers()]:
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return gm.eval()


def _insert_casts(gm: GraphModule, keep: set[str]) -> None:
    """fp16 in and fp32 out of the graph; an fp32 island around every op reading a kept layer's weights."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op == "placeholder":
            with graph.inserting_after(n):
                cast = graph.call_function(_cast, (n, torch.float16))
            n.replace_all_uses_with(cast, delete_user_cb=lambda u: u is not cast)
        elif n.op == "call_function" and any(a.op == "get_attr" and _layer_of(str(a.target)) in keep for a in n.all_input_nodes):
            with graph.inserting_before(n):
                to_fp32 = lambda a: a if a.op == "get_attr" else graph.call_function(_cast, (a, torch.float32))  # noqa: E731
                n.args = torch.fx.node.map_arg(n.args, to_fp32)
            with graph.inserting_after(n):
                back = graph.call_function(_cast, (n, torch.float16))
            n.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
        elif n.op == "output":
            with graph.inserting_before(n):
                out = graph.call_function(_cast, (n.args[0], torch.float32))
            n.args = (out,)
    graph.lint()
    gm.recompile()


def _cosine(refs: list[torch.Tensor], outs: list[torch.Tensor]) -> float:
    r = torch.cat([t.double().flatten() for t in refs])
    o = torch.cat([t.double().flatten() for t in outs])
    if not torch.isfinite(o).all():
        return -1.0
    return float(torch.nn.functional.cosine_similarity(r, o, dim=0))


def choose_fp32_layers(exported_module: GraphModule, samples: Sequence[Sequence[torch.Tensor]], min_cosine: float,
                       device: str | torch.device) -> list[str]:
    """The layers to keep in fp32 so the fp16 program meets ``min_cosine`` against fp32 on ``samples`` (graph order).

    Greedy: while the mixed program misses the bound, keep the layer whose fp16 run alone
    (everything else fp32) loses the most cosine. At most :data:`MAX_FP32_LAYERS`.
    """
    def outputs(gm: GraphModule) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [t.float().cpu() for s in samples for t in pytree.tree_leaves(gm(*[x.to(device) for x in s]))]

    refs = outputs(prepare(exported_module, "fp32", (), device))
    candidates = layers(exported_module)
    keep: list[str] = []
    if _cosine(refs, outputs(prepare(exported_module, "fp16", keep, device))) >= min_cosine:
        return keep
    loss = {name: 1 - _cosine(refs, outputs(prepare(exported_module, "fp16", [c for c in candidates if c != name], device)))
            for name in candidates}
    for name in sorted(candidates, key=lambda c: -loss[c])[:MAX_FP32_LAYERS]:
        keep.append(name)
        if _cosine(refs, outputs(prepare(exported_module, "fp16", keep, device))) >= min_cosine:
            break
    return [c for c in candidates if c in keep]


# ---------------------------------------------------------------------------------------
# CUDA graphs


class GraphReplay:
    """``module`` captured into a CUDA graph for one set of input shapes; other shapes run eagerly."""

    def __init__(self, module: torch.nn.Module, specs: Sequence[InputSpec], warmup: int = 3) -> None:
        self.module = module
        self.shapes = [tuple(s.shape) for s in specs]
        self.static = [torch.zeros(s.shape, dtype=s.dtype, device="cuda") for s in specs]
        self.static = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in self.static]
        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    module(*self.static)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = module(*self.static)

    def __call__(self, *inputs: torch.Tensor) -> Any:
        if [tuple(x.shape) for x in inputs] != self.shapes:
            with torch.inference_mode():
                return self.module(*inputs)
        for buf, x in zip(self.static, inputs):
            buf.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.out  # static buffers: overwritten by the next replay


class CudaArtifact(Artifact):
    """The exported program prepared for the GPU (see the module doc); ``run`` takes and returns CPU tensors."""

    def __init__(self, exported: torch.export.ExportedProgram, target: TargetSpec, input_specs: list[InputSpec],
                 fp32_layers: Sequence[str] = (), *, cuda_graphs: bool = True) -> None:
        self.exported = exported
        self.target = target.name
        self.precision = target.precision
        self.input_specs = input_specs
        self.fp32_layers = list(fp32_layers)
        self.module = prepare(module_of(exported), self.precision, self.fp32_layers, "cuda")
        self.replay = GraphReplay(self.module, input_specs) if cuda_graphs else None

    def run_cuda(self, *inputs: torch.Tensor) -> Any:
        """Outputs as CUDA tensors, enqueued on the current stream (replayed buffers: copy before the next call)."""
        xs = [x.to("cuda", non_blocking=True) for x in inputs]
        if self.replay is not None:
            return self.replay(*xs)
        with torch.inference_mode():
            return self.module(*xs)

    def run(self, *inputs: torch.Tensor) -> Any:
        out = pytree.tree_map(lambda t: t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t, self.run_cuda(*inputs))
        torch.cuda.synchronize()
        return out

    @property
    def report_extra(self) -> dict[str, Any]:
        return {"cuda": {"device": torch.cuda.get_device_name(), "fp32_layers": self.fp32_layers, "channels_last": True,
                         "cuda_graphs": self.replay is not None}}

    def save_files(self, directory: Path) -> dict[str, Any]:
        torch.export.save(self.exported, directory / MODEL_FILE)
        return {"backend": "torch-cuda", "files": [MODEL_FILE], "fp32_layers": self.fp32_layers, "channels_last": True,
                "cuda_graphs": self.replay is not None}


class CudaBackend:
    name = "torch-cuda"

    def __init__(self, precision: str) -> None:
        self.precision = precision

    def unavailable_reason(self) -> str | None:
        return cuda_missing()

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        from graphopt.verify import default_tolerance

        gm = program.graph_module.eval()
        example = tuple(t.detach() for t in program.example_inputs)
        with torch.no_grad():
            exported = torch.export.export(gm, example)
        fp32_layers: list[str] = []
        if self.precision == "fp16":
            samples = [example, *[tuple(s) for s in (program.calibration or [])[:3]]]
            bound = default_tolerance("fp16").min_cosine or 0.999
            fp32_layers = choose_fp32_layers(module_of(exported), samples, bound, "cuda")
        return CudaArtifact(exported, target, program.input_specs, fp32_layers)

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        path = directory / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"artifact '{directory}' is missing {MODEL_FILE}")
        layers_kept = manifest.get("fp32_layers", [])
        if not isinstance(layers_kept, list) or not all(isinstance(x, str) for x in layers_kept):
            raise ArtifactError(f"'{directory / 'artifact.json'}': 'fp32_layers' is {layers_kept!r}, "
                                "expected a list of layer names")
        exported = load_pt2(path, f"'{path}'", ArtifactError)
        return CudaArtifact(exported, target, manifest_inputs(manifest), layers_kept,
                            cuda_graphs=bool(manifest.get("cuda_graphs", True)))


def _target(precision: str, doc: str) -> TargetSpec:
    return register_target(f"cuda-{precision}", backend=CudaBackend(precision), precision=precision,
                           pipeline="fuse-conv-bn-relu,dce", doc=doc)


cuda_fp32 = _target("fp32", "PyTorch on an NVIDIA GPU, fp32, channels_last, replayed from a CUDA graph; model.pt2")
cuda_fp16 = _target("fp16", "PyTorch on an NVIDIA GPU, fp16 (sensitive layers kept fp32), channels_last, CUDA graph; model.pt2")
