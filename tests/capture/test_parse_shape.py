"""parse_shape and the source dispatch."""

from __future__ import annotations

import pytest
import torch

from graphopt.capture import capture, parse_shape
from graphopt.errors import CaptureError, UsageError


@pytest.mark.parametrize(
    ("text", "shape"),
    [("1x3x224x224", (1, 3, 224, 224)), ("7", (7,)), (" 2x5 ", (2, 5))],
)
def test_parse_shape(text: str, shape: tuple[int, ...]) -> None:
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1x3xabc", "0x3", "-1x3", "1,3", "1x", "x3", "1xx3", "1.5x3", "1 x 3"])
def test_parse_shape_rejects(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_shape(text)
    message = str(err.value)
    assert message == f"--input-shape {text!r}: expected positive integers joined by 'x', like 1x3x224x224"
    assert "\n" not in message


def test_source_of_the_wrong_type() -> None:
    with pytest.raises(CaptureError) as err:
        capture(42)  # type: ignore[arg-type]
    assert "cannot capture a int" in str(err.value)


def test_example_inputs_must_be_tensors() -> None:
    with pytest.raises(CaptureError, match="example_inputs must be a non-empty tuple of tensors"):
        capture(torch.nn.ReLU(), example_inputs=([1, 2],))  # type: ignore[arg-type]


def test_a_single_tensor_is_accepted_as_example_inputs() -> None:
    program = capture(torch.nn.ReLU(), example_inputs=torch.randn(2, 3))  # type: ignore[arg-type]
    assert program.meta["input_shapes"] == [[2, 3]]
