"""TorchScript files (``torch.jit.save``): loaded with ``torch.jit.load``, converted to a
module-level Program; the loaded ScriptModule is the verification reference.

``torch.jit.load`` does not unpickle arbitrary Python objects: its unpickler resolves only
TorchScript types (``__torch__.*``) and torch's own tensor/storage rebuild functions, and the
model's code is TorchScript run by the TorchScript interpreter (torch ops only; no Python,
no imports), so no ``--trust-pickle`` is needed.

Conversion: torch's TorchScript -> ExportedProgram converter (``TS2EPConverter``) then the
``.pt2`` raising (:mod:`graphopt.capture.raise_aten`). Where the converter fails (it cannot
convert ``aten::chunk`` on a traced graph, for example), the ScriptModule is exported to ONNX
with torch's TorchScript-based exporter and imported by :mod:`graphopt.capture.onnx_file`.
Both routes are checked against the ScriptModule by verification.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.capture.common import Reference, check_shapes, finish, first_line
from graphopt.capture.export import strip_export_meta, to_module_level
from graphopt.errors import CaptureError
from graphopt.program import InputSpec, Program

__all__ = ["ScriptReference", "from_torchscript"]


class ScriptReference(Reference):
    """Runs the loaded ScriptModule: the original a TorchScript source is verified against."""

    runtime = f"TorchScript (torch.jit {torch.__version__}) running the original file"

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module

    def __call__(self, *inputs: torch.Tensor) -> Any:
        with torch.no_grad():
            return self.module(*inputs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _load(path: Path, label: str) -> torch.jit.ScriptModule:
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label} is not a loadable TorchScript file: {first_line(exc)}") from exc
    module.eval()
    return module


def _via_ts2ep(module: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    from torch._export.converter import TS2EPConverter

    with _quiet():
        exported = TS2EPConverter(module, inputs).convert()
        unlifted = exported.module()
    gm, _ = to_module_level(unlifted)
    strip_export_meta(gm)
    return gm


def _via_onnx(module: torch.jit.ScriptModule, inputs: tuple[torch.Tensor, ...], name: str) -> Program:
    from graphopt.capture.onnx_file import from_onnx

    with tempfile.TemporaryDirectory(prefix="graphopt-ts-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        with _quiet():
            torch.onnx.export(module, inputs, str(onnx_path), opset_version=17, dynamo=False)
        return from_onnx(onnx_path, name, input_shapes=None, example_inputs=inputs)


_FLOW_WORDS = ("if ", "for ", "while ")


def _control_flow(module: torch.jit.ScriptModule) -> str | None:
    """Where the (inlined) forward branches or loops, as ``"`if y.sum() > 0:` (model.py, line 7)"``; None if straight-line."""
    try:
        nodes = list(module.inlined_graph.nodes())
    except Exception:  # noqa: BLE001 - a module without a forward graph
        return None
    for node in nodes:
        if node.kind() not in ("prim::If", "prim::Loop"):
            continue
        lines = node.sourceRange().splitlines()
        stmt = next((ln.strip() for ln in lines[1:] if ln.strip().startswith(_FLOW_WORDS)), node.kind())
        place = lines[0].strip().replace("File ", "").replace('"', "") if lines else "unknown place"
        return f"`{stmt}` ({os.path.basename(place.split(',')[0])},{place.split(',', 1)[-1]})"
    return None


def from_torchscript(
    path: Path,
    name: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
) -> Program:
    """Capture a TorchScript file; ``input_shapes`` are required (TorchScript does not record them)."""
    label = f"'{name}'"
    module = _load(path, label)
    if example_inputs is None and input_shapes is None:
        raise CaptureError(f"{label} is TorchScript, which does not record input shapes; pass --input-shape, "
                           "e.g. --input-shape 1x3x224x224")
    if example_inputs is not None:
        inputs = tuple(t.detach().clone() for t in example_inputs)
    else:
        generator = torch.Generator().manual_seed(0)
        inputs = tuple(InputSpec(f"x{i}", s).random(generator) for i, s in enumerate(check_shapes(input_shapes, label)))
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label}: the TorchScript forward failed on inputs of shape "
                           f"{', '.join('x'.join(map(str, t.shape)) for t in inputs)}: {first_line(exc)}") from exc
    meta: dict[str, Any] = {"source": name, "source_kind": "torchscript", "file": os.path.abspath(path),
                            "reference_runtime": ScriptReference.runtime}
    try:
        gm = _via_ts2ep(module, inputs)
        program = finish(gm, label, meta, example_inputs=inputs, given_as="example input")
    except Exception as first:  # noqa: BLE001 - the converter's coverage is partial; try the ONNX route
        try:
            program = _via_onnx(module, inputs, name)
        except Exception as exc:  # noqa: BLE001
            flow = _control_flow(module)
            if flow is not None:
                raise CaptureError(
                    f"{label}: TorchScript method 'forward' has control flow graphopt cannot capture at {flow}; re-save "
                    "the model with torch.jit.trace on an example input, or export it with torch.export and compile the .pt2"
                ) from exc
            raise CaptureError(f"{label}: TorchScript method 'forward' could not be converted to a graph: "
                               f"{first_line(first)[:160]} (via ONNX: {first_line(exc)[:160]})") from exc
        program.meta.update(meta)
        program.meta["converted_via"] = "onnx"
    program.reference = ScriptReference(module)
    return program
