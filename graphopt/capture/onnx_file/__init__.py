"""ONNX files -> a module-level fx Program; ONNX Runtime on the original file is the reference.

Steps: :func:`~graphopt.capture.onnx_file.load.load` parses the protobuf (no code runs; external
data only from beside the file), :func:`~graphopt.capture.onnx_file.load.prepare` fixes the input
shapes and folds constants with onnx shape inference + onnx-graphsurgeon's ``fold_constants``,
and :func:`~graphopt.capture.onnx_file.convert.build_graph_module` turns each node into the fx
node a torch capture gives (``nn.Conv2d``/``nn.BatchNorm2d``/``nn.Linear``/activation/pool
modules holding their weights; ``operator.add``, ``torch.cat`` ... for the rest), so every pass
and lowering applies with no ONNX special case.

Why not onnx2torch: it converts each ONNX node to its own custom module (``OnnxBinaryMathOperation``
for Add/Mul, ``OnnxGlobalAveragePoolWithKnownInputShape``, ``OnnxReshape`` ...), so
``fuse-conv-bn-relu``, ``prune-channels`` and the quantization passes, which match
``operator.add``/``nn.ReLU``/``torch.cat`` nodes, would each need an ONNX special case; its
shape-dependent ops stay dynamic (Shape/Gather chains become modules, not constants), it
has had no release since 2024, and it would add a dependency for what is ~400 lines over
onnx-graphsurgeon here.

The Program carries ``reference``: the original file run by ONNX Runtime (CPU), so
verification compares the compiled model with what the file computes, and a conversion bug
fails verification instead of being shipped.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.capture.common import Reference, finish, first_line
from graphopt.capture.onnx_file.convert import SUPPORTED_OPS, build_graph_module
from graphopt.capture.onnx_file.load import load, prepare
from graphopt.errors import CaptureError
from graphopt.program import Program

__all__ = ["SUPPORTED_OPS", "OrtReference", "looks_like_onnx", "from_onnx"]


def looks_like_onnx(path: Path) -> bool:
    """A ``.onnx`` name, or a protobuf ModelProto (field 1, ir_version, as a varint) at the start."""
    if path.suffix.lower() == ".onnx":
        return True
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x08 and head[1] < 0x80


class OrtReference(Reference):
    """Runs the original ONNX file with ONNX Runtime (CPU); returns what the fx graph returns."""

    runtime = f"ONNX Runtime {__import__('onnxruntime').__version__} (CPUExecutionProvider) on the original file"

    def __init__(self, path: Path, label: str) -> None:
        self.path = str(path)
        self.label = label
        self._session: Any = None

    def session(self) -> Any:
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            try:
                self._session = ort.InferenceSession(self.path, opts, providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001
                raise CaptureError(f"{self.label}: ONNX Runtime cannot load the original file: {first_line(exc)}") from exc
        return self._session

    def __call__(self, *inputs: torch.Tensor) -> Any:
        sess = self.session()
        feed = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), inputs)}
        outs = [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feed)]
        return outs[0] if len(outs) == 1 else tuple(outs)


def from_onnx(
    path: Path,
    name: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
) -> Program:
    """Capture an ONNX file as a module-level Program whose ``reference`` is ONNX Runtime on the file."""
    label = f"'{name}'"
    model = load(path, label)
    shapes = input_shapes if example_inputs is None else [tuple(t.shape) for t in example_inputs]
    prepared = prepare(model, label, shapes)
    gm = build_graph_module(prepared, label)
    reference = OrtReference(path, label)
    meta: dict[str, Any] = {"source": name, "source_kind": "onnx", "file": os.path.abspath(path),
                            "opset": prepared.opset, "reference_runtime": OrtReference.runtime}
    dtypes = [torch.from_numpy(np.empty(0, dtype=d)).dtype for _n, _s, d in prepared.inputs]
    # every converter emits deterministic ops (a random ONNX op is refused as unsupported): no determinism check
    if example_inputs is not None:
        program = finish(gm, label, meta, example_inputs=example_inputs, given_as="example input", deterministic_ops=True)
    else:
        program = finish(gm, label, meta, shapes=[s for _n, s, _d in prepared.inputs], dtypes=dtypes, deterministic_ops=True)
    program.reference = reference
    return program
