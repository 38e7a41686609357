"""``.pt2`` files (``torch.export.save`` archives): load, raise the ATen graph back to
modules (:mod:`graphopt.capture.raise_aten`), take input shapes from the archive."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.capture.common import check_shapes, finish, first_line
from graphopt.capture.raise_aten import raise_to_modules
from graphopt.capture.safe_pt2 import load_pt2, module_of
from graphopt.errors import CaptureError
from graphopt.program import Program

__all__ = ["load_exported", "to_module_level", "strip_export_meta", "from_export"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export logs a traceback before re-raising a load error; graphopt reports it itself."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load_exported(path: Path, name: str) -> torch.export.ExportedProgram:
    """The archive, checked and loaded by :func:`~graphopt.capture.safe_pt2.load_pt2` (no code from
    the file runs), with a one-line CaptureError for unreadable or refused archives."""
    with _quiet():
        return load_pt2(path, f"'{name}'", CaptureError)


def _dim(d: Any) -> int | None:
    try:
        return int(d)
    except Exception:  # noqa: BLE001 - a symbolic size without a hint
        hint = getattr(getattr(d, "node", None), "hint", None)
        return int(hint) if hint is not None else None


def _recorded_inputs(gm: torch.fx.GraphModule, name: str, need_shapes: bool) -> tuple[list[tuple[int, ...]], list[torch.dtype]]:
    """Shapes (as recorded at export) and dtypes of the graph's inputs."""
    shapes: list[tuple[int, ...]] = []
    dtypes: list[torch.dtype] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise CaptureError(f"'{name}': input '{node.target}' is not a tensor ({type(val).__name__}); graphopt captures tensor inputs only")
        dims = [_dim(d) for d in val.shape]
        if need_shapes and any(d is None for d in dims):
            text = "x".join(str(d) for d in val.shape)
            raise CaptureError(
                f"'{name}': input '{node.target}' has a dynamic shape ({text}); pass --input-shape, "
                "e.g. --input-shape 1x3x224x224"
            )
        shapes.append(tuple(d or 1 for d in dims))
        dtypes.append(val.dtype)
    return shapes, dtypes


_aten = torch.ops.aten


def _to_inference(gm: torch.fx.GraphModule) -> bool:
    """Rewrite a graph exported in training mode to inference semantics, as graphopt does
    for an ``nn.Module`` in training mode: BatchNorm uses its running statistics (and no
    longer counts batches) and dropout is off. Returns whether anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default and len(node.args) > 5 and node.args[5] and node.args[3] is not None:
            node.update_arg(5, False)
            changed = True
        elif node.target is _aten.dropout.default and len(node.args) > 2 and node.args[2]:
            node.update_arg(2, False)
            changed = True
        elif (
            node.target is _aten.add_.Tensor and not node.users
            and getattr(node.args[0], "op", None) == "get_attr"
            and str(node.args[0].target).endswith("num_batches_tracked")
        ):
            gm.graph.erase_node(node)
            changed = True
    return changed


_KEEP_META = ("stack_trace", "nn_module_stack")


def strip_export_meta(gm: torch.fx.GraphModule) -> None:
    """Keep where each node came from; drop export's fake tensors (tied to its FakeTensorMode)
    and provenance records. ShapeProp fills ``tensor_meta`` afresh."""
    for node in gm.graph.nodes:
        kept = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
        node.meta.clear()
        node.meta.update(kept)


def to_module_level(unlifted: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, bool]:
    """An unlifted ATen graph in inference semantics, raised to modules; and whether it was in training mode."""
    was_training = _to_inference(unlifted)
    return raise_to_modules(unlifted), was_training


def from_export(
    path: Path,
    name: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
) -> Program:
    """Capture a ``torch.export`` archive as a module-level Program."""
    exported = load_exported(path, name)
    label = f"'{name}'"
    try:
        with _quiet():
            unlifted = module_of(exported)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"'{name}' is not a readable torch.export archive: {first_line(exc)}") from exc
    gm, was_training = to_module_level(unlifted)
    meta: dict[str, Any] = {"source": name, "source_kind": "export", "file": os.path.abspath(path)}
    if was_training:
        meta["training_mode_was"] = True
    if example_inputs is not None:
        strip_export_meta(gm)
        return finish(gm, label, meta, example_inputs=example_inputs, given_as="example input")
    recorded, dtypes = _recorded_inputs(gm, name, need_shapes=input_shapes is None)
    shapes = check_shapes(input_shapes, label) if input_shapes is not None else recorded
    strip_export_meta(gm)
    return finish(gm, label, meta, shapes=shapes, dtypes=dtypes if len(dtypes) == len(shapes) else None)
