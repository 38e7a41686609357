"""The compiler's pass-manager instruments (hooks ``before_pass`` / ``after_pass``).

``VerifyEach`` holds every pass to its contract, ``PrintIR`` dumps graphs, ``Recovery``
runs the distillation fine-tune before quantization, ``QuantAwareTraining`` the QAT after
it, and ``SnapshotBefore`` keeps the program as it was before a named pass. Users add their own through
``CompileOptions.instruments``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from graphopt.data import Sample
from graphopt.errors import VerificationError
from graphopt.fx_util import run_all
from graphopt.pipeline import PassInvocation, PassRecord
from graphopt.program import Program
from graphopt.verify import Tolerance, compare

__all__ = ["QUANT_PASS", "VerifyEach", "PrintIR", "Recovery", "QuantAwareTraining", "SnapshotBefore", "run_all"]

#: the pass that turns a program into simulated int8 (recovery runs before it; its input is the fp32 reference)
QUANT_PASS = "insert-quant-stubs"


class VerifyEach:
    """Instrument: run the program before and after every pass and hold each pass to its contract."""

    def __init__(self, samples: Sequence[Sample], exact: Tolerance) -> None:
        self.samples = list(samples)
        self.exact = exact
        self._before: list[Any] = []
        self._done: list[str] = []

    def before_pass(self, inv: PassInvocation, program: Program) -> None:
        self._before = run_all(program.run, self.samples)
        if not self._done and program.reference is not None:  # the baseline: the original file in its own runtime
            bad = self.exact.violations(compare(run_all(program.run_reference, self.samples), self._before).metrics)
            if bad:
                runtime = program.meta.get("reference_runtime", "the original")
                raise VerificationError(f"--verify-each: the captured graph differs from {runtime} before any pass: "
                                        f"{'; '.join(bad)} (a conversion error in capture)")

    def after_pass(self, inv: PassInvocation, program: Program, record: PassRecord) -> None:
        comparison = compare(self._before, run_all(program.run, self.samples))
        record.data["error"] = comparison.metrics.to_json()
        if inv.spec.contract == "exact":
            bad = self.exact.violations(comparison.metrics)
            if bad:
                raise VerificationError(
                    f"--verify-each: pass '{inv.name}' broke its 'exact' contract: {'; '.join(bad)} "
                    f"(passes before it: [{', '.join(self._done) or 'none'}])"
                )
        self._done.append(inv.name)


class PrintIR:
    """Instrument: write the graph after the named passes (or ``all``)."""

    def __init__(self, names: Iterable[str], stream: TextIO) -> None:
        self.names = set(names)
        self.stream = stream

    def after_pass(self, inv: PassInvocation, program: Program, record: PassRecord) -> None:
        if "all" in self.names or inv.name in self.names:
            self.stream.write(f"// ----- IR after {inv} -----\n{program.graph}\n")
            self.stream.flush()


class Recovery:
    """Instrument: the distillation fine-tune (``--recover-steps``), before quantization.

    It runs once, just before ``insert-quant-stubs`` when the pipeline has it, else after
    the last pass (:meth:`finish`), so int8 calibration always sees the recovered weights.
    With ``every`` (iterative pruning: ``--recover-every``) it runs after each approximate
    structural pass that changed the program instead (prune → recover, k times).
    ``labels``/``batch_size`` come from ``--train-data``.
    """

    def __init__(self, teacher: Callable[..., Any], samples: Sequence[Sample], steps: int, lr: float,
                 progress: Callable[[int, int, float], None] | None = None, *, every: bool = False,
                 labels: Any = None, batch_size: int | None = None) -> None:
        self.teacher, self.samples, self.steps, self.lr, self.progress = teacher, list(samples), steps, lr, progress
        self.every, self.labels, self.batch_size = every, labels, batch_size
        self.result: Any = None
        self.rounds = 0

    def _run(self, program: Program) -> None:
        from graphopt.recover import recover

        self.result = recover(program, self.teacher, self.samples, steps=self.steps, lr=self.lr, progress=self.progress,
                              labels=self.labels, batch_size=self.batch_size)
        self.rounds += 1

    def before_pass(self, inv: PassInvocation, program: Program) -> None:
        if inv.name == QUANT_PASS and self.result is None:
            self._run(program)

    def after_pass(self, inv: PassInvocation, program: Program, record: PassRecord) -> None:
        if self.every and record.changed and inv.spec.contract == "approximate" and inv.name != QUANT_PASS:
            self._run(program)

    def finish(self, program: Program) -> None:
        if self.result is None:
            self._run(program)


class QuantAwareTraining:
    """Instrument: ``--qat-steps`` of quantization-aware fine-tuning right after ``insert-quant-stubs``."""

    def __init__(self, teacher: Callable[..., Any], samples: Sequence[Sample], steps: int, lr: float,
                 progress: Callable[[int, int, float], None] | None = None, *, labels: Any = None,
                 batch_size: int | None = None) -> None:
        self.teacher, self.samples, self.steps, self.lr, self.progress = teacher, list(samples), steps, lr, progress
        self.labels, self.batch_size = labels, batch_size
        self.result: dict[str, Any] | None = None

    def after_pass(self, inv: PassInvocation, program: Program, record: PassRecord) -> None:
        from graphopt.quant.qat import qat

        if inv.name == QUANT_PASS:
            self.result = qat(program, self.teacher, self.samples, steps=self.steps, lr=self.lr, labels=self.labels,
                              batch_size=self.batch_size, progress=self.progress)


class SnapshotBefore:
    """Instrument: a copy of the program just before the named pass (the fp32 reference of quantization)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.program: Program | None = None

    def before_pass(self, inv: PassInvocation, program: Program) -> None:
        if inv.name == self.name and self.program is None:
            self.program = program.clone()
