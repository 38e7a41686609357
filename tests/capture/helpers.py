"""Checks shared by the capture tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from graphopt.program import Program, flatten_outputs


def line_of(path: Path, snippet: str) -> int:
    """1-based line number of the first line of ``path`` containing ``snippet``."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if snippet in line:
            return i
    raise AssertionError(f"{snippet!r} not in {path}")


def one_line(exc_info: pytest.ExceptionInfo) -> str:
    """The error's message, checked to be a single line without traceback text."""
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message, message
    return message


def assert_same_outputs(program: Program, reference: Callable, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        expected = flatten_outputs(reference(*inputs))
    got = flatten_outputs(program.run(*inputs))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def module_types(program: Program) -> set[str]:
    """Types of the modules the graph calls."""
    mods = program.modules()
    return {type(mods[n.target]).__name__ for n in program.graph.nodes if n.op == "call_module"}


def assert_shapes_propagated(program: Program) -> None:
    for node in program.graph.nodes:
        if node.op not in ("output",):
            assert "tensor_meta" in node.meta, node.format_node()
