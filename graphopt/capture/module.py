"""``nn.Module`` objects: copy, switch to eval mode, and trace with ``torch.fx``.

The user's module is never modified: passes rewrite weights in place, so graphopt
always traces a deep copy. Tracing errors name the user's file, line and source line.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from graphopt.capture.common import check_shapes, finish, first_line, model_input_shapes, where
from graphopt.errors import CaptureError
from graphopt.program import Program

__all__ = ["copy_for_inference", "trace", "program_from_module", "from_module"]

_CONTROL_FLOW_ADVICE = (
    "data-dependent control flow can't be captured by torch.fx; rewrite it with torch.where, "
    "move it out of forward, or export with torch.export and compile the .pt2"
)


def copy_for_inference(model: nn.Module, label: str) -> tuple[nn.Module, bool]:
    """A deep copy of ``model`` in eval mode, and whether ``model`` was in training mode."""
    try:
        clone = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(
            f"cannot copy {label} (graphopt compiles a copy so your model is never modified): "
            f"{type(exc).__name__}: {first_line(exc)}"
        ) from exc
    return clone.eval(), model.training


def _defaults_beyond(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Concrete default values for ``forward`` parameters after the first ``n_inputs``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) != len(params) or len(positional) <= n_inputs:
        return {}
    rest = positional[n_inputs:]
    if any(p.default is p.empty for p in rest):
        return {}
    return {p.name: p.default for p in rest}


def trace(model: nn.Module, label: str, n_inputs: int) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace`` with errors that point at the user's code.

    ``forward`` parameters with defaults beyond the ``n_inputs`` given keep their defaults.
    """
    concrete = _defaults_beyond(model, n_inputs)
    try:
        return torch.fx.symbolic_trace(model, concrete_args=concrete or None)
    except Exception as exc:  # noqa: BLE001
        loc = where(exc)
        reason = first_line(exc)
        if isinstance(exc, torch.fx.proxy.TraceError):
            if "inputs to control flow" in reason:
                raise CaptureError(f"cannot trace {label}{loc}: {_CONTROL_FLOW_ADVICE}") from exc
            reason = reason.split(". ")[0]  # fx appends a paragraph of advice
        raise CaptureError(
            f"cannot trace {label}{loc}: {type(exc).__name__}: {reason}; "
            "rewrite that code so torch.fx can trace it, or export with torch.export and compile the .pt2"
        ) from exc


def program_from_module(
    model: nn.Module,
    label: str,
    meta: dict[str, Any],
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
    fallback_shapes: Sequence[tuple[int, ...]] | None = None,
    missing_hint: str = "pass --input-shape, e.g. --input-shape 1x3x224x224",
) -> Program:
    """Trace an eval-mode module graphopt owns into a Program.

    Shapes come from ``example_inputs``, else ``input_shapes``, else ``fallback_shapes``,
    else the module's ``example_input_shape`` attribute; with none of them, a
    CaptureError saying to pass input shapes.
    """
    if example_inputs is not None:
        gm = trace(model, label, len(example_inputs))
        return finish(gm, label, meta, example_inputs=example_inputs, given_as="example input", original=model)
    shapes = (
        check_shapes(input_shapes, label) if input_shapes is not None
        else fallback_shapes or model_input_shapes(model, label)
    )
    if shapes is None:
        raise CaptureError(f"{label}: the input shape is unknown; {missing_hint}")
    gm = trace(model, label, len(shapes))
    return finish(gm, label, meta, shapes=shapes, original=model)


def from_module(
    model: nn.Module,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
    weights: Any = None,
) -> Program:
    """Capture a live ``nn.Module`` (the Python API): trace a deep copy in eval mode."""
    name = type(model).__name__
    label = f"the {name} module"
    clone, was_training = copy_for_inference(model, label)
    if weights is not None:
        from graphopt.capture.weights import load_weights

        load_weights(clone, weights, label)
    meta: dict[str, Any] = {"source": name, "source_kind": "module"}
    if was_training:
        meta["training_mode_was"] = True
    return program_from_module(
        clone, label, meta, input_shapes=input_shapes, example_inputs=example_inputs,
        missing_hint="pass input_shapes=[(1, 3, 224, 224)] or example_inputs=(tensor,)",
    )
