"""The ``user_module`` fixture: user code written to a temporary working directory."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

_counter = itertools.count()


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], tuple[str, Path]]]:
    """Write ``code`` as a fresh module in ``tmp_path`` (the working directory) and
    return ``(module_name, file)``; the module is forgotten after the test."""
    monkeypatch.chdir(tmp_path)
    names: list[str] = []

    def write(code: str) -> tuple[str, Path]:
        name = f"usermodels_{next(_counter)}"
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(code))
        names.append(name)
        return name, path

    yield write
    for name in names:
        sys.modules.pop(name, None)
