"""Capture: every model source becomes a :class:`~graphopt.program.Program`.

The Program's graph is a *module-level* ``torch.fx.GraphModule``: Conv, BatchNorm,
Linear, activations, pooling, Flatten and Dropout are ``call_module`` nodes that hold
their parameters, so passes can read and rewrite weights; ``node.meta["tensor_meta"]``
is filled by ShapeProp. One module per source kind:

=========================  ======================================  ================
source                     module                                  ``source_kind``
=========================  ======================================  ================
``nn.Module`` object       :mod:`graphopt.capture.module`          ``module``
``zoo:NAME``               :mod:`graphopt.capture.zoo_source`      ``zoo``
``pkg.module:callable``    :mod:`graphopt.capture.factory`         ``factory``
``model.pt2``              :mod:`graphopt.capture.export`          ``export``
``model.pt`` / ``.pth``    :mod:`graphopt.capture.pickle_file`     ``pickle``
TorchScript ``.pt``        :mod:`graphopt.capture.torchscript`     ``torchscript``
``model.onnx``             :mod:`graphopt.capture.onnx_file`       ``onnx``
=========================  ======================================  ================

TorchScript and ONNX are recognised by their content, not their extension. For those two
the Program's ``reference`` runs the original (the ScriptModule; ONNX Runtime on the file).

Every failure is a one-line :class:`~graphopt.errors.CaptureError` naming the source.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from graphopt.capture import export, factory, module, onnx_file, pickle_file, torchscript, zoo_source
from graphopt.capture.common import KNOWN_FORMATS, sniff_archive, too_big
from graphopt.errors import CaptureError, UsageError
from graphopt.program import Program

__all__ = ["parse_shape", "capture", "SOURCE_KINDS"]

#: The values of ``Program.meta["source_kind"]``.
SOURCE_KINDS = ("module", "zoo", "factory", "export", "pickle", "torchscript", "onnx")

_SHAPE = re.compile(r"^[0-9]+(x[0-9]+)*$")
_EXPORT_SUFFIXES = {".pt2"}
_ONNX_SUFFIXES = {".onnx"}
_TORCH_SUFFIXES = {".pt", ".pth"}


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1x3x224x224"`` -> ``(1, 3, 224, 224)``.

    Raises :class:`~graphopt.errors.UsageError` for anything but positive integers
    joined by ``x``, and for a shape whose float32 tensor would exceed
    :data:`graphopt.program.MAX_INPUT_BYTES` (2 GiB), before anything is allocated.
    """
    cleaned = text.strip() if isinstance(text, str) else ""
    dims = tuple(int(d) for d in cleaned.split("x")) if _SHAPE.match(cleaned) else ()
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape {text!r}: expected positive integers joined by 'x', like 1x3x224x224")
    if too_big(dims):
        raise UsageError(f"--input-shape {text!r}: {too_big(dims)}")
    return dims


def _example_inputs(example_inputs: object) -> tuple[torch.Tensor, ...] | None:
    if example_inputs is None:
        return None
    items = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else example_inputs
    if not isinstance(items, (tuple, list)) or not items or not all(isinstance(t, torch.Tensor) for t in items):
        raise CaptureError(f"example_inputs must be a non-empty tuple of tensors, got {type(example_inputs).__name__}")
    return tuple(items)


def capture(
    source: str | os.PathLike[str] | torch.nn.Module,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
) -> Program:
    """Turn ``source`` into a Program with example inputs and propagated shapes.

    ``source`` is an ``nn.Module`` (a deep copy is traced in eval mode: the model is never
    modified), ``"zoo:NAME"``, ``"pkg.module:callable"`` (called with no arguments), a
    ``.pt2`` file (``torch.export.save``), a TorchScript file (``torch.jit.save``), an ONNX
    file, or a ``.pt``/``.pth`` file holding a pickled ``nn.Module`` (read only with
    ``trust_pickle=True``).

    ``input_shapes`` (one per model input) override the shapes the source knows;
    ``example_inputs`` are an alternative that fixes the input values too. ``weights``
    is a state_dict file loaded (``strict=True``) into a model graphopt builds
    (``pkg.module:callable``, ``zoo:NAME``, or a copy of an ``nn.Module``).
    Without ``example_inputs`` the inputs are seeded random normal tensors (seed 0).

    Raises :class:`~graphopt.errors.CaptureError` (one line, naming the source) when the
    source cannot be captured.
    """
    inputs = _example_inputs(example_inputs)
    if inputs is not None and input_shapes is not None:
        raise CaptureError("pass either input_shapes or example_inputs, not both")
    if isinstance(source, torch.nn.Module):
        return module.from_module(source, input_shapes=input_shapes, example_inputs=inputs, weights=weights)
    if not isinstance(source, (str, os.PathLike)):
        raise CaptureError(f"cannot capture a {type(source).__name__}: pass an nn.Module or a source string; {KNOWN_FORMATS}")

    text = os.fspath(source)
    if isinstance(source, str) and text.startswith("zoo:"):
        return zoo_source.from_zoo(text[4:], input_shapes=input_shapes, example_inputs=inputs, weights=weights)
    path = Path(text)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise CaptureError(f"'{text}' is a folder, not a model file; {KNOWN_FORMATS}")
    if path.is_file():
        return _from_file(path, text, suffix, inputs, input_shapes, weights, trust_pickle)
    if isinstance(source, str) and factory.is_factory_spec(text):
        return factory.from_factory(text, input_shapes=input_shapes, example_inputs=inputs, weights=weights)
    if suffix in _EXPORT_SUFFIXES | _TORCH_SUFFIXES | _ONNX_SUFFIXES or (":" not in text and (os.sep in text or "/" in text)):
        raise CaptureError(f"'{text}' does not exist")
    what = f"unknown model format '{suffix}'" if suffix else "unknown model source"
    raise CaptureError(f"'{text}': {what}; {KNOWN_FORMATS}{_zoo_hint(text)}")


def _zoo_hint(text: str) -> str:
    from graphopt import zoo

    return f" (did you mean 'zoo:{text}'?)" if text in zoo.names() else ""


def _from_file(
    path: Path,
    name: str,
    suffix: str,
    inputs: tuple[torch.Tensor, ...] | None,
    input_shapes: Sequence[tuple[int, ...]] | None,
    weights: str | os.PathLike[str] | None,
    trust_pickle: bool,
) -> Program:
    if path.stat().st_size and suffix not in _EXPORT_SUFFIXES | _TORCH_SUFFIXES and onnx_file.looks_like_onnx(path):
        if weights is not None:
            raise CaptureError(f"--weights applies to pkg.module:callable and zoo:NAME sources; '{name}' carries its own weights")
        return onnx_file.from_onnx(path, name, input_shapes=input_shapes, example_inputs=inputs)
    if suffix not in _EXPORT_SUFFIXES | _TORCH_SUFFIXES:
        what = f"unknown model format '{suffix}'" if suffix else "unknown model format (no file extension)"
        raise CaptureError(f"'{name}': {what}; {KNOWN_FORMATS}")
    if weights is not None:
        raise CaptureError(
            f"--weights applies to pkg.module:callable and zoo:NAME sources; '{name}' carries its own weights"
        )
    if path.stat().st_size == 0:
        raise CaptureError(f"'{name}' is empty")
    kind = sniff_archive(path)  # trust the content over the extension
    if kind == "torchscript":
        return torchscript.from_torchscript(path, name, input_shapes=input_shapes, example_inputs=inputs)
    if kind == "export" or (suffix in _EXPORT_SUFFIXES and kind != "torch-save"):
        return export.from_export(path, name, input_shapes=input_shapes, example_inputs=inputs)
    return pickle_file.from_pickle(path, name, input_shapes=input_shapes, example_inputs=inputs, trust_pickle=trust_pickle)
