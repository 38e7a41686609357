"""Reading an ONNX file safely and simplifying it before conversion.

``load`` parses the protobuf only (no code runs), checks the opsets and domains, and reads
external data only from files beside the model (a location escaping that folder is refused).
``prepare`` fixes the input shapes (a symbolic dim defaults to 1), runs onnx shape inference
and onnx-graphsurgeon's ``fold_constants`` (Shape/Gather/Concat/ConstantOfShape/Cast chains and
weight subgraphs become constants; ONNX Runtime evaluates them), and returns the shapes of
every tensor and the constant values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from graphopt.capture.common import first_line, shape_text
from graphopt.errors import CaptureError

__all__ = ["MIN_OPSET", "MAX_OPSET", "Prepared", "load", "prepare", "opset_of"]

MIN_OPSET = 7
MAX_OPSET = onnx.defs.onnx_opset_version()
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONVERT_BELOW = 9
_MAX_FOLDS = 4  # older opsets go through onnx.version_converter


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), 0)


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in onnx.external_data_helper._get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]


def _load_external(model: onnx.ModelProto, path: Path, label: str) -> None:
    folder = path.resolve().parent
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(folder):
            raise CaptureError(f"{label}: tensor '{tensor.name}' names external data '{location}' outside the model's folder; "
                               "graphopt reads external data only from files beside the .onnx")
        if not target.is_file():
            raise CaptureError(f"{label}: external data file '{target}' for tensor '{tensor.name}' is missing; "
                               "put it beside the .onnx")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(folder))
    except Exception as exc:  # noqa: BLE001 - short or unreadable external file
        raise CaptureError(f"{label}: external data could not be read: {first_line(exc)}") from exc


def load(path: Path, label: str) -> onnx.ModelProto:
    """The model in ``path`` with its external data, at opset >= 9; one-line CaptureError otherwise."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - DecodeError and friends
        raise CaptureError(f"{label} is not a readable ONNX file (truncated or corrupt): {first_line(exc)}") from exc
    if not model.graph.node or not model.graph.output:
        raise CaptureError(f"{label} is not a readable ONNX file: it holds no graph (truncated or corrupt?)")
    for node in model.graph.node:
        if node.domain not in _DEFAULT_DOMAINS:
            raise CaptureError(f"{label}: node '{node.name}' ({node.op_type}) is in custom domain '{node.domain}'; "
                               "graphopt imports only standard ONNX (ai.onnx) operators")
    opset = opset_of(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CaptureError(f"{label} uses opset {opset}; graphopt reads opsets {MIN_OPSET} to {MAX_OPSET}")
    _load_external(model, path, label)
    if opset < _CONVERT_BELOW:
        try:
            model = onnx.version_converter.convert_version(model, 13)
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"{label} uses opset {opset} and onnx could not convert it to opset 13: {first_line(exc)}") from exc
    return model


@dataclass
class Prepared:
    """The simplified model: its graph, input names/shapes/dtypes, every tensor's static shape, the constants."""

    model: onnx.ModelProto
    inputs: list[tuple[str, tuple[int, ...], np.dtype]]
    shapes: dict[str, tuple[int, ...]]
    consts: dict[str, np.ndarray]
    opset: int


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fix_inputs(model: onnx.ModelProto, label: str, overrides: Sequence[tuple[int, ...]] | None) -> list[tuple]:
    inputs = _graph_inputs(model)
    if overrides is not None and len(overrides) != len(inputs):
        names = ", ".join(i.name for i in inputs)
        raise CaptureError(f"{label} takes {len(inputs)} input(s) ({names}) but {len(overrides)} --input-shape were given")
    fixed = []
    for k, info in enumerate(inputs):
        ttype = info.type.tensor_type
        if not ttype.HasField("shape"):
            raise CaptureError(f"{label}: input '{info.name}' has no static rank; graphopt needs a ranked input "
                               "(re-export with a fixed shape)")
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in ttype.shape.dim]
        if overrides is not None:
            if len(overrides[k]) != len(dims):
                raise CaptureError(f"{label}: --input-shape {shape_text(overrides[k])} for input '{info.name}' has rank "
                                   f"{len(overrides[k])}, the file says rank {len(dims)}")
            fixed_dims = [d.dim_value if d.HasField("dim_value") else None for d in ttype.shape.dim]
            clash = next((i for i, (f, o) in enumerate(zip(fixed_dims, overrides[k])) if f and f != o), None)
            if clash is not None:
                raise CaptureError(f"{label}: --input-shape {shape_text(overrides[k])} for input '{info.name}': dim {clash} is "
                                   f"fixed to {fixed_dims[clash]} in the file; only symbolic dims can be set")
            dims = list(overrides[k])
        for d, value in zip(ttype.shape.dim, dims):
            d.Clear()
            d.dim_value = value
        fixed.append((info.name, tuple(dims), onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)))
    return fixed


_LIGHT_ELEMENTS = 1024  # initializers bigger than this are shown to shape inference as typed inputs (shape, no values)


def _infer(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    """``model`` with the value_info onnx shape inference finds (run on a copy without the big weights: fast)."""
    g = model.graph
    big = [t for t in g.initializer if np.prod(t.dims, dtype=np.int64) > _LIGHT_ELEMENTS]
    light_graph = onnx.helper.make_graph(
        list(g.node), g.name, [*g.input, *(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in big)],
        list(g.output), [t for t in g.initializer if np.prod(t.dims, dtype=np.int64) <= _LIGHT_ELEMENTS])
    light = onnx.helper.make_model(light_graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, strict_mode=True, data_prop=True)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label}: onnx shape inference failed: {first_line(exc)}") from exc
    del g.value_info[:]
    g.value_info.extend(inferred.graph.value_info)
    del g.output[:]
    g.output.extend(inferred.graph.output)
    return model


def _fold(model: onnx.ModelProto, label: str) -> onnx.ModelProto:
    import onnx_graphsurgeon as gs
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # graphsurgeon folds with ONNX Runtime; its optimizer warnings are noise here
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        graph = gs.import_onnx(model)
        graph.fold_constants(error_ok=False).cleanup().toposort()
        return gs.export_onnx(graph, do_type_check=False)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label}: constant folding failed: {first_line(exc)}") from exc


_SHAPE_OPS = {"Shape", "Size", "Constant", "ConstantOfShape"}


def _foldable(model: onnx.ModelProto) -> bool:
    """Whether any node computes a constant (all inputs constant, or a shape op): else folding has nothing to do."""
    consts = {t.name for t in model.graph.initializer}
    return any(n.op_type in _SHAPE_OPS or all(not i or i in consts for i in n.input) for n in model.graph.node)


def _shapes_by_running(model: onnx.ModelProto, inputs: list[tuple], label: str) -> onnx.ModelProto:
    """Replace every Shape node by its value, read by running the model once with ONNX Runtime.

    The input shapes are fixed, so these values are constants of the model; ONNX Runtime computes
    them on zero inputs (the values of the tensors do not matter, only their shapes).
    """
    import onnxruntime

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    shape_nodes = [n for n in probe.graph.node if n.op_type == "Shape"]
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.INT64, None) for n in shape_nodes)
    try:
        sess = onnxruntime.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        values = sess.run(None, {name: np.zeros(shape, dtype=dtype) for name, shape, dtype in inputs})
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label}: ONNX Runtime could not compute the Shape values: {first_line(exc)}") from exc
    out = onnx.ModelProto()
    out.CopyFrom(model)
    keep = [n for n in out.graph.node if n.op_type != "Shape"]
    del out.graph.node[:]
    out.graph.node.extend(keep)
    out.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), n.output[0]) for n, v in zip(shape_nodes, values))
    return out


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    g = model.graph
    for info in [*g.input, *g.value_info, *g.output]:
        ttype = info.type.tensor_type
        if ttype.HasField("shape") and all(d.HasField("dim_value") for d in ttype.shape.dim):
            shapes[info.name] = tuple(d.dim_value for d in ttype.shape.dim)
    return shapes


def prepare(model: onnx.ModelProto, label: str, overrides: Sequence[tuple[int, ...]] | None) -> Prepared:
    """Fix the input shapes, infer every shape, fold constants (see the module docstring)."""
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    inputs = _fix_inputs(model_copy, label, overrides)
    inferred = _infer(model_copy, label)
    folded = _infer(_fold(inferred, label), label) if _foldable(inferred) else inferred
    if any(n.op_type == "Shape" for n in folded.graph.node):  # a chain onnx's data propagation could not follow (Div)
        folded = _infer(_fold(_shapes_by_running(folded, inputs, label), label), label)
    consts = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    shapes = _static_shapes(folded)
    shapes.update({k: tuple(v.shape) for k, v in consts.items()})
    return Prepared(folded, inputs, shapes, consts, opset_of(folded))
