"""cpu-fp32: the optimized fx program itself, run by PyTorch eager on the CPU.

Saved as a ``torch.export`` archive (``model.pt2``): a graph of ATen ops plus raw tensors.
It is read back through :func:`graphopt.capture.safe_pt2.load_pt2`, which refuses an archive
that would make ``torch.export.load`` unpickle objects or run code. It runs on ``--threads``
intra-op threads (:mod:`graphopt.threads`), the process's own setting restored after each run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from graphopt.capture.safe_pt2 import load_pt2, module_of
from graphopt.errors import ArtifactError
from graphopt.program import InputSpec, Program
from graphopt.targets import Artifact, TargetSpec, manifest_inputs, register_target
from graphopt.threads import manifest_threads, program_threads, torch_threads

MODEL_FILE = "model.pt2"


class ExportedArtifact(Artifact):
    """An fx program (in memory) or its torch.export archive (loaded)."""

    def __init__(self, module: torch.nn.Module, target: TargetSpec, input_specs: list[InputSpec],
                 exported: torch.export.ExportedProgram | None = None, threads: int | None = None) -> None:
        self.module = module
        self.exported = exported
        self.target = target.name
        self.precision = target.precision
        self.input_specs = input_specs
        self.threads = threads

    def run(self, *inputs: torch.Tensor) -> Any:
        with torch_threads(self.threads), torch.inference_mode():
            return self.module(*inputs)

    def save_files(self, directory: Path) -> dict[str, Any]:
        exported = self.exported
        if exported is None:
            example = tuple(torch.zeros(s.shape, dtype=s.dtype) for s in self.input_specs)
            with torch.no_grad():
                exported = torch.export.export(self.module, example)
        torch.export.save(exported, directory / MODEL_FILE)
        return {"backend": "torch-eager", "files": [MODEL_FILE]}


class TorchEagerBackend:
    name = "torch-eager"
    cpu_threads = True

    def unavailable_reason(self) -> str | None:
        return None

    def lower(self, program: Program, target: TargetSpec) -> Artifact:
        gm = program.graph_module
        gm.eval()
        return ExportedArtifact(gm, target, program.input_specs, threads=program_threads(program))

    def load(self, directory: Path, manifest: dict[str, Any], target: TargetSpec) -> Artifact:
        path = directory / MODEL_FILE
        if not path.is_file():
            raise ArtifactError(f"artifact '{directory}' is missing {MODEL_FILE}")
        exported = load_pt2(path, f"'{path}'", ArtifactError)
        specs = manifest_inputs(manifest)
        return ExportedArtifact(module_of(exported), target, specs, exported, manifest_threads(manifest))


BACKEND = TorchEagerBackend()

cpu_fp32 = register_target(
    "cpu-fp32",
    backend=BACKEND,
    precision="fp32",
    pipeline="fuse-conv-bn-relu,dce",
    doc="PyTorch eager on the CPU, fp32; saved as a torch.export archive",
)
