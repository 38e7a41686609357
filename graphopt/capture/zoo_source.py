"""``zoo:NAME`` sources: a model from :mod:`graphopt.zoo`, at the zoo's input shape."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from graphopt.capture.module import program_from_module
from graphopt.errors import CaptureError, choices
from graphopt.program import Program

__all__ = ["from_zoo"]


def from_zoo(
    name: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
    weights: str | os.PathLike[str] | None,
) -> Program:
    """Build ``zoo:NAME`` (seed 0, eval mode) and trace it; ``weights`` replaces its random weights."""
    from graphopt import zoo

    source = f"zoo:{name}"
    try:
        entry = zoo.get(name)
    except KeyError:
        raise CaptureError(f"unknown zoo model '{name}' in '{source}'; choose from {choices(zoo.names())}") from None
    model = zoo.build(name).eval()
    label = f"'{source}'"
    if weights is not None:
        from graphopt.capture.weights import load_weights

        load_weights(model, weights, label)
    meta: dict[str, Any] = {"source": source, "source_kind": "zoo"}
    return program_from_module(
        model, label, meta, input_shapes=input_shapes, example_inputs=example_inputs,
        fallback_shapes=[tuple(entry.input_shape)],
    )
