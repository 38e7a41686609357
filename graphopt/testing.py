"""Numerical-equivalence checks for users' own tests, and a pytest plugin.

``assert_equivalent(reference, candidate, inputs)`` runs both on the same inputs and
fails with the metrics when they disagree beyond tolerance. The pytest plugin
(registered through the ``pytest11`` entry point, so installing graphopt is enough)
adds a ``graphopt_golden`` fixture: recorded outputs are kept next to the test in
``goldens/NAME.npz`` and every run compares against them. Record or refresh with
``pytest --graphopt-update-goldens``; a missing golden fails the test, so a check can
never pass without something to compare against.

This module imports torch lazily: pytest loads it in every session.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from graphopt.verify import Comparison, Tolerance

__all__ = ["assert_equivalent", "GoldenChecker"]


def _run(fn: Callable[..., Any], samples: Any) -> list[Any]:
    from graphopt.fx_util import run_all  # torch is imported only when a test uses graphopt (this is a pytest plugin)

    return run_all(fn, samples)


def _samples(inputs: Any) -> list[tuple[Any, ...]]:
    import torch

    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple) and all(isinstance(t, torch.Tensor) for t in inputs):
        return [inputs]
    if isinstance(inputs, list):
        return [s if isinstance(s, tuple) else (s,) for s in inputs]
    raise TypeError("inputs must be a tensor, a tuple of tensors (one sample) or a list of samples")


def assert_equivalent(
    reference: Callable[..., Any],
    candidate: Callable[..., Any],
    inputs: Any,
    *,
    precision: str = "fp32",
    tolerance: Tolerance | None = None,
    **overrides: float,
) -> Comparison:
    """Assert ``candidate`` computes what ``reference`` does on ``inputs``.

    ``inputs``: a tensor, a tuple of tensors (one sample) or a list of samples.
    The tolerance is the precision's default (see ``graphopt.verify``) unless given;
    keyword overrides such as ``max_rel_err=1e-3`` adjust single bounds.
    Returns the comparison so tests can assert more.
    """
    from graphopt.verify import compare, default_tolerance

    tol = (tolerance or default_tolerance(precision)).with_overrides(**overrides)
    samples = _samples(inputs)
    comparison = compare(_run(reference, samples), _run(candidate, samples))
    bad = tol.violations(comparison.metrics)
    if bad:
        lines = [f"outputs differ beyond tolerance: {'; '.join(bad)}", "worst outputs:"]
        for w in comparison.worst(3):
            lines.append(
                f"  input {w.sample} output {w.output} {list(w.shape)}: max_abs_err {w.metrics.max_abs_err:.3g} "
                f"max_rel_err {w.metrics.max_rel_err:.3g} cosine {w.metrics.cosine:.6f}"
            )
        raise AssertionError("\n".join(lines))
    return comparison


class GoldenChecker:
    """Compares a model's outputs with a golden file kept beside the test."""

    def __init__(self, directory: Path, update: bool) -> None:
        self.directory = directory
        self.update = update

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.npz"

    def check(self, name: str, model: Callable[..., Any], inputs: Any = None, *, precision: str = "fp32",
              tolerance: Tolerance | None = None, **overrides: float) -> Comparison | None:
        """Record (with --graphopt-update-goldens) or compare ``model``'s outputs.

        ``inputs`` are needed when recording; when comparing, the golden's inputs are used.
        """
        from graphopt.verify import compare, default_tolerance, load_golden, save_golden

        path = self.path(name)
        if self.update:
            if inputs is None:
                raise ValueError("recording a golden needs inputs")
            samples = _samples(inputs)
            self.directory.mkdir(parents=True, exist_ok=True)
            save_golden(path, samples, _run(model, samples), {"name": name})
            return None
        if not path.exists():
            pytest.fail(f"golden '{path}' does not exist; record it with: pytest --graphopt-update-goldens", pytrace=False)
        golden = load_golden(path)
        comparison = compare(golden.outputs, _run(model, golden.inputs))
        tol = (tolerance or default_tolerance(precision)).with_overrides(**overrides)
        bad = tol.violations(comparison.metrics)
        if bad:
            raise AssertionError(f"'{name}' no longer matches its golden {path}: {'; '.join(bad)}")
        return comparison


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("graphopt")
    group.addoption("--graphopt-update-goldens", action="store_true", default=False,
                    help="record (or overwrite) graphopt golden files instead of comparing")


@pytest.fixture
def graphopt_golden(request: pytest.FixtureRequest) -> GoldenChecker:
    """Check model outputs against golden files in ``goldens/`` next to the test file."""
    directory = Path(str(request.node.fspath)).parent / "goldens"
    return GoldenChecker(directory, bool(request.config.getoption("--graphopt-update-goldens")))
