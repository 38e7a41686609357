"""``--target cpu``: compile for every CPU target of a precision, keep the fastest verified one.

A *family* names a set of targets: ``cpu`` (with ``--precision fp32|bf16|int8``) or
``cpu-PRECISION-any`` (``cpu-int8-any``...). :func:`compile_best` compiles the source for
each target of the family through :func:`graphopt.compile` (each verified on its own
artifact, read back from disk, against its own tolerance); the candidates share one
capture, one set of data and, per distinct pipeline, one run of the passes (so ``ort-int8``
and ``ov-int8`` share one calibration). The verified artifacts are then timed on the
input shapes being compiled for, one at a time (:func:`time_candidates`: six rounds in
alternating order, each a settling warm-up and 10 timed calls per candidate; the median of
the round medians), and the fastest is written to the output folder. Every candidate is a
row of the table (``report.json``: ``candidates``), unavailable and failed ones with their
reason.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from graphopt.compiler import CompileOptions, CompileResult, _input_paths, compile, default_output_dir, host_with, load_artifact
from graphopt.errors import BackendUnavailableError, GraphoptError, UsageError, VerificationError, choices, first_line
from graphopt.output import REPORT, Output
from graphopt.targets import Artifact, TargetSpec, options_of

__all__ = ["FAMILY", "PRECISIONS", "Candidate", "compile_best", "family_precision", "candidates_for", "render_candidates"]

FAMILY = "cpu"
PRECISIONS = ("fp32", "bf16", "int8")
#: the target name prefixes that run on the CPU
CPU_PREFIXES = ("cpu-", "ort-", "ov-")


def family_precision(target: str, precision: str | None) -> str | None:
    """The precision a family name asks for (``cpu`` + ``precision``, or ``cpu-int8-any``); None: not a family."""
    if target == FAMILY:
        chosen = precision or "fp32"
    elif target.startswith(f"{FAMILY}-") and target.endswith("-any"):
        chosen = target[len(FAMILY) + 1:-len("-any")]
        if precision is not None and precision != chosen:
            raise UsageError(f"--precision {precision} contradicts --target {target}; give one of them")
    else:
        if precision is not None:
            raise UsageError(f"--precision applies to a target family ('{FAMILY}', '{FAMILY}-int8-any'...), not to '{target}'")
        return None
    if chosen not in PRECISIONS:
        raise UsageError(f"precision '{chosen}' for --target {target}: not one of {choices(PRECISIONS)}")
    return chosen


def candidates_for(targets: Sequence[TargetSpec], precision: str) -> list[TargetSpec]:
    """The CPU targets of ``precision``, in registry order."""
    return [t for t in targets if t.precision == precision and t.name.startswith(CPU_PREFIXES)]


@dataclass
class Candidate:
    """One row of the table: a target, what happened, and (when it verified) its numbers."""

    target: str
    status: str  # "selected", "verified", "failed", "unavailable"
    reason: str = ""
    latency_ms: float | None = None
    metrics: dict[str, Any] | None = None
    size_bytes: int | None = None
    result: CompileResult | None = None
    folder: Path | None = None

    def to_json(self) -> dict[str, Any]:
        m = self.metrics or {}
        return {"target": self.target, "status": self.status, "reason": self.reason, "latency_ms": self.latency_ms,
                "cosine": m.get("cosine"), "max_rel_err": m.get("max_rel_err"), "sqnr_db": m.get("sqnr_db"),
                "top1_agreement": m.get("top1_agreement"), "size_bytes": self.size_bytes}


def time_candidates(artifacts: dict[str, Artifact], inputs: tuple[torch.Tensor, ...], *, warmup: int = 5,
                    settle_ms: float = 30.0, runs: int = 10, rounds: int = 6) -> dict[str, float]:
    """Each artifact's latency (ms): the median over ``rounds`` of its block medians.

    Not interleaved call by call: right after another runtime has run, its idle threads
    still spin for a few milliseconds (torch's OpenMP pool, ONNX Runtime's, OpenVINO's) and
    tax whichever artifact follows (measured: ov-int8 ResNet-18 4.6 ms alone, 5.3 ms
    interleaved with cpu-int8 and ort-int8 in one process; at 64x64 cpu-int8's first calls
    after ort-int8 took 1.67, 0.98, 0.77 ms against 0.68 steady; the deployed model runs
    alone). So each round times every artifact in its own block: untimed calls, at least
    ``warmup`` of them and for at least ``settle_ms``, then ``runs`` timed ones. Rounds
    alternate the order, and the median over rounds counts: this machine's speed drifts by
    20-30 % over seconds (MobileNetV2 batch 8: ov-int8 14.7 ms, then 11.4 ms a few seconds
    later in one process), and two long passes let a slow spell flip a 20 % decision.
    """
    medians: dict[str, list[float]] = {name: [] for name in artifacts}
    order = list(artifacts)
    with torch.inference_mode():
        for r in range(rounds):
            for name in (order if r % 2 == 0 else order[::-1]):
                art = artifacts[name]
                start, calls = time.perf_counter(), 0
                while calls < warmup or (time.perf_counter() - start) * 1e3 < settle_ms:
                    art.run(*inputs)
                    calls += 1
                times = []
                for _ in range(runs):
                    t0 = time.perf_counter()
                    art.run(*inputs)
                    times.append((time.perf_counter() - t0) * 1e3)
                medians[name].append(statistics.median(times))
    return {name: statistics.median(m) for name, m in medians.items()}


def _compile_candidate(source: Any, opts: CompileOptions, spec: TargetSpec, folder: Path) -> Candidate:
    """One target of the family compiled into ``folder`` (its backend's own options only)."""
    declared = {o.name for o in options_of(spec.backend)}
    options = {k: v for k, v in opts.backend_options.items() if k in declared}
    try:
        result = compile(source, replace(opts, target=spec.name, output=folder, force=False, measure=False,
                                         backend_options=options))
    except BackendUnavailableError as exc:
        return Candidate(spec.name, "unavailable", first_line(exc))
    except VerificationError as exc:
        report = getattr(exc, "report", None)
        metrics = report.verification.metrics.to_json() if report is not None and report.verification else None
        return Candidate(spec.name, "failed", first_line(exc), metrics=metrics)
    except GraphoptError as exc:
        return Candidate(spec.name, "failed", f"{exc.kind}: {first_line(exc)}")
    assert result.report.verification is not None
    return Candidate(spec.name, "verified", metrics=result.report.verification.metrics.to_json(),
                     size_bytes=result.report.size_bytes.get("compiled"), result=result, folder=folder)


def compile_best(source: Any, options: CompileOptions, precision: str) -> tuple[CompileResult, list[Candidate]]:
    """Compile ``source`` for every CPU target of ``precision``; write the fastest verified one to ``options.output``.

    Returns the winner's result (its report carries the table as ``extra['candidates']``)
    and every candidate. BackendUnavailableError when no target of the precision can run
    here, VerificationError when none verified (both name every candidate and why).
    """
    host = host_with(options.plugins)
    specs = candidates_for(list(host.targets), precision)
    if not specs:
        raise UsageError(f"no CPU target has precision '{precision}'; targets: {choices(t.name for t in host.targets)}")
    family = f"{FAMILY}-{precision}-any"
    final = Path(options.output) if options.output is not None else default_output_dir(source, family)
    with Output(final, force=options.force, inputs=_input_paths(source, options)) as out:
        assert out.staging is not None
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}.candidates-", dir=out.staging.parent))
        try:
            opts = replace(options, shared={}, output=None)
            rows = [_compile_candidate(source, opts, spec, scratch / spec.name) for spec in specs]
            verified = [c for c in rows if c.status == "verified"]
            if not verified:
                why = "; ".join(f"{c.target}: {c.status} ({c.reason})" for c in rows)
                error = BackendUnavailableError if all(c.status == "unavailable" for c in rows) else VerificationError
                raise error(f"no {family} candidate verified: {why}")
            if options.on_stage:
                options.on_stage("timing the candidates")
            inputs = tuple(torch.randn(s.shape, generator=torch.Generator().manual_seed(options.seed)).to(s.dtype)
                           for s in verified[0].result.artifact.input_specs)
            latency = time_candidates({c.target: c.result.artifact for c in verified}, inputs)
            for c in verified:
                c.latency_ms = latency[c.target]
            best = min(verified, key=lambda c: c.latency_ms)
            best.status = "selected"
            for item in best.folder.iterdir():
                shutil.move(str(item), str(out.staging / item.name))
            report = best.result.report
            report.latency_ms = {"original": None, "compiled": best.latency_ms}
            report.extra["candidates"] = {"family": family, "inputs": [list(t.shape) for t in inputs],
                                          "rows": [c.to_json() for c in rows]}
            report.write(out.staging / REPORT)
            out.commit()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    artifact = load_artifact(final, host=host)
    return CompileResult(artifact, report, best.result.program, final), rows


def render_candidates(console: Any, rows: Sequence[Candidate]) -> None:
    """The candidates as a table on a rich Console."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="candidates (fastest verified one kept)", title_justify="left")
    for col in ("target", "status", "latency (ms)", "cosine", "max rel err", "size (MB)", "reason"):
        table.add_column(col, justify="right" if col in ("latency (ms)", "cosine", "max rel err", "size (MB)") else "left")
    for c in rows:
        m = c.metrics or {}
        table.add_row(c.target, c.status, f"{c.latency_ms:.2f}" if c.latency_ms is not None else "–",
                      f"{m['cosine']:.6f}" if m.get("cosine") is not None else "–",
                      f"{m['max_rel_err']:.3g}" if m.get("max_rel_err") is not None else "–",
                      f"{c.size_bytes / 1e6:.2f}" if c.size_bytes is not None else "–", escape(c.reason))
    console.print(table)
