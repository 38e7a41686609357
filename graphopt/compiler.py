"""compile(): capture → passes → lower → save → load back → verify → rename into place.

The artifact that is verified is the one read back from disk, so a serialization bug
cannot hide. Outputs are written to a temporary folder beside the destination and
renamed into place only after verification passed: a failed compile leaves nothing.
"""

from __future__ import annotations

import io
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from graphopt.data import Sample, samples_for
from graphopt.errors import UsageError, VerificationError, choices
from graphopt.pipeline import Instrument, PassInvocation, PassManager, PassRecord, parse_pipeline
from graphopt.plugins import PluginHost, default_host
from graphopt.program import Program
from graphopt.report import Report, Verification
from graphopt.targets import Artifact, TargetSpec, read_manifest
from graphopt.verify import Tolerance, compare, default_tolerance

__all__ = ["compile", "CompileResult", "load_artifact", "host_with", "measure_latency_ms", "run_all", "default_output_dir"]


@dataclass
class CompileResult:
    artifact: Artifact
    report: Report
    program: Program
    output: Path | None


def host_with(plugins: Sequence[str] = ()) -> PluginHost:
    """The default host, or a fresh one with extra plugins loaded."""
    if not plugins:
        return default_host()
    host = PluginHost()
    host.load_entry_points()
    for p in plugins:
        host.load(p)
    return host


def run_all(fn: Callable[..., Any], samples: Sequence[Sample]) -> list[Any]:
    with torch.inference_mode():
        return [fn(*s) for s in samples]


def measure_latency_ms(fn: Callable[..., Any], sample: Sample, *, min_runs: int = 5, budget_s: float = 0.5) -> float:
    """Median wall time of ``fn(*sample)`` in ms, after two warm-up runs."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(2):
            fn(*sample)
        deadline = time.perf_counter() + budget_s
        while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 200):
            t0 = time.perf_counter()
            fn(*sample)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _state_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name not in ("report.json", "artifact.json"))


class VerifyEach:
    """Instrument: run the program before and after every pass and hold each pass to its contract."""

    def __init__(self, samples: Sequence[Sample], exact: Tolerance) -> None:
        self.samples = list(samples)
        self.exact = exact
        self._before: list[Any] = []
        self._done: list[str] = []

    def before_pass(self, inv: PassInvocation, program: Program) -> None:
        self._before = run_all(program.run, self.samples)

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


def default_output_dir(source: Any, target: str) -> Path:
    """``zoo:resnet18`` + ``cpu-fp32`` -> ``resnet18.cpu-fp32`` (in the working directory)."""
    if not isinstance(source, str):
        name = type(source).__name__
    elif source.startswith("zoo:"):
        name = source[4:]
    elif Path(source).suffix in (".pt", ".pth", ".pt2", ".onnx"):
        name = Path(source).stem
    else:
        name = source.rsplit(":", 1)[-1]
    return Path(f"{name}.{target}")


def compile(
    source: Any,
    *,
    target: str = "cpu-fp32",
    example_inputs: tuple[torch.Tensor, ...] | None = None,
    input_shapes: Sequence[tuple[int, ...]] | None = None,
    pipeline: str | None = None,
    output: str | Path | None = None,
    force: bool = False,
    verify_each: bool = False,
    data: str | Path | None = None,
    verify_samples: int = 8,
    seed: int = 0,
    tolerance: Tolerance | None = None,
    plugins: Sequence[str] = (),
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    instruments: Iterable[Instrument] = (),
    print_ir_after: Sequence[str] = (),
    ir_stream: TextIO | None = None,
    measure: bool = True,
    on_stage: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile ``source`` (an nn.Module, ``zoo:NAME``, ``pkg.mod:fn``, ``.pt2``, ``.pt``) for ``target``.

    Raises a :class:`~graphopt.errors.GraphoptError` subclass on bad input, a failed
    pass or failed verification; nothing is written in that case.
    """
    from graphopt.capture import capture

    stage = on_stage or (lambda _s: None)
    host = host_with(plugins)
    spec: TargetSpec = host.targets.get(target)
    spec.check_available()
    pipe = parse_pipeline(pipeline if pipeline is not None else spec.pipeline, host.passes)
    for name in print_ir_after:
        if name != "all" and name not in pipe.names():
            raise UsageError(f"--print-ir-after '{name}': not in the pipeline; choose from {choices([*pipe.names(), 'all'])}")
    tol = tolerance or default_tolerance(spec.precision)
    out_dir = Path(output) if output is not None else None
    if out_dir is not None and out_dir.exists() and not force:
        raise UsageError(f"output folder '{out_dir}' already exists; pass --force to replace it")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output '{out_dir}' exists and is not a folder")
    if data is not None and not Path(data).exists():
        raise UsageError(f"--calib-data '{data}' does not exist")

    stage("capturing")
    program = capture(source, input_shapes=input_shapes, example_inputs=example_inputs, weights=weights, trust_pickle=trust_pickle)
    original = program.clone()
    samples = samples_for(program.input_specs, n=verify_samples, seed=seed, path=data)
    references = run_all(original.run, samples)

    all_instruments: list[Instrument] = list(instruments)
    if verify_each:
        all_instruments.append(VerifyEach(samples[:2], default_tolerance("fp32")))
    if print_ir_after:
        import sys

        all_instruments.append(PrintIR(print_ir_after, ir_stream or sys.stderr))
    stage("running passes")
    records = PassManager(pipe, all_instruments).run(program)

    stage(f"lowering to {spec.name}")
    artifact = spec.backend.lower(program, spec)
    report = Report(source=program.meta.get("source", str(source)), target=spec.name, pipeline=str(pipe), passes=records)

    staging: Path | None = None
    try:
        if out_dir is not None:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
            stage("saving")
            artifact.save(staging)
            artifact = load_artifact(staging, host=host)

        stage("verifying")
        comparison = compare(references, run_all(artifact.run, samples))
        violations = tol.violations(comparison.metrics)
        report.verification = Verification(not violations, comparison.metrics, tol, len(samples), violations, comparison)

        from graphopt.cost import count_macs

        program.propagate_shapes()
        report.macs = {"original": count_macs(original.graph_module), "compiled": count_macs(program.graph_module)}
        report.size_bytes = {
            "original": _state_bytes(original.graph_module),
            "compiled": _dir_bytes(staging) if staging is not None else _state_bytes(program.graph_module),
        }
        if violations:
            raise VerificationError(
                f"verification failed for {spec.name}: {'; '.join(violations)} (over {len(samples)} inputs); "
                "nothing was written",
                report,
            )
        if measure:
            stage("measuring latency")
            report.latency_ms = {
                "original": measure_latency_ms(original.run, samples[0]),
                "compiled": measure_latency_ms(artifact.run, samples[0]),
            }
            o, c = report.latency_ms["original"], report.latency_ms["compiled"]
            if o and c and c > o * 1.05:
                report.warnings.append(
                    f"the compiled model is SLOWER than the original on this machine: {c:.2f} ms vs {o:.2f} ms (p50)"
                )
        if program.meta.get("training_mode_was"):
            report.warnings.append("the model was in training mode; graphopt compiled it in eval mode")

        if staging is not None and out_dir is not None:
            report.write(staging / "report.json")
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.rename(out_dir)
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return CompileResult(artifact, report, program, out_dir)


def load_artifact(directory: str | Path, *, host: PluginHost | None = None) -> Artifact:
    """Load a compiled artifact folder; the backend named in its manifest reads it."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    host = host or default_host()
    spec = host.targets.get(manifest["target"])
    spec.check_available()
    return spec.backend.load(directory, manifest, spec)
