"""compile(): capture → passes → lower → save → load back → verify → rename into place.

:class:`CompileOptions` holds how to compile (validated once); :func:`compile` reads as
its steps. The artifact that is verified is the one read back from disk, so a
serialization bug cannot hide. Outputs are written to a staging folder beside the
destination (:mod:`graphopt.output`) and renamed into place only after verification
passed: a failed compile leaves nothing.
"""

from __future__ import annotations

import importlib.util
import io
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TextIO

import torch

from graphopt.capture import capture
from graphopt.data import (
    NORMALIZATIONS,
    RANDOM_TRAINING_WARNING,
    CalibrationData,
    Sample,
    TrainingData,
    fresh,
    is_callable_source,
    training_data,
)
from graphopt.errors import ArtifactError, DataError, GraphoptError, UsageError, VerificationError, choices, first_line
from graphopt.instruments import QUANT_PASS, PrintIR, QuantAwareTraining, Recovery, SnapshotBefore, VerifyEach, run_all
from graphopt.output import REPORT, Output
from graphopt.pipeline import Instrument, PassManager, PassRecord, Pipeline, parse_pipeline
from graphopt.plugins import PluginHost, default_host
from graphopt.program import Program
from graphopt.report import Report, Verification
from graphopt.targets import Artifact, TargetSpec, read_manifest
from graphopt.threads import check_threads, default_threads, torch_threads, uses_threads
from graphopt.verify import Tolerance, check_finite, compare, default_tolerance

__all__ = ["compile", "CompileOptions", "CompileResult", "Plan", "load_artifact", "host_with", "measure_latency_ms",
           "run_all", "default_output_dir"]


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


def measure_latency_ms(fn: Callable[..., Any], sample: Sample, *, min_runs: int = 5, budget_s: float = 0.5) -> float:
    """Median wall time of ``fn(*sample)`` in ms, after two warm-up runs."""
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(2):
            fn(*fresh(sample))
        deadline = time.perf_counter() + budget_s
        while len(times) < min_runs or (time.perf_counter() < deadline and len(times) < 200):
            args = fresh(sample)
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _state_bytes(module: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def _dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and f.name not in ("report.json", "artifact.json"))


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


@dataclass
class SplitData:
    calibration: CalibrationData | None
    samples: list[Sample]  # verification inputs
    overlap_note: str | None = None
    training: TrainingData | None = None  # --train-data (else recovery/QAT train on the calibration samples)


def _split_data(source: str | Path | None, specs: Sequence[Any], opts: CompileOptions, *, needs_calibration: bool) -> SplitData:
    """Calibration data and verification inputs from one ``--calib-data`` source.

    Verification uses the samples after the first ``calib_samples`` when the source has
    enough (held out from calibration); else the first ``verify_samples`` (the report says
    they overlap). Without a source: random calibration (with its warning) and random
    verification inputs.
    """
    from graphopt.data import calibration_samples, random_samples

    calib_n, verify_n, seed = opts.calib_samples, opts.verify_samples, opts.seed
    if source is None:
        cal = calibration_samples(specs, source=None, n=calib_n, seed=seed) if needs_calibration else None
        return SplitData(cal, random_samples(specs, verify_n, seed + 1 if needs_calibration else seed))
    everything = calibration_samples(specs, source=source, n=0, image_size=opts.calib_size, normalize=opts.calib_normalize)
    samples = everything.samples
    if not samples:
        raise DataError(f"--calib-data '{source}' holds no samples")
    cal = type(everything)(samples[:calib_n], f"{everything.source.rsplit(',', 1)[0]}, {min(calib_n, len(samples))} samples")
    if not needs_calibration:
        return SplitData(None, samples[:verify_n])
    held_out = samples[calib_n:calib_n + verify_n]
    if len(held_out) >= min(verify_n, 2):
        return SplitData(cal, held_out)
    note = (f"verification inputs overlap the calibration inputs (--calib-data has {len(samples)} samples, "
            f"{calib_n} used for calibration): accuracy on unseen data is not shown")
    return SplitData(cal, samples[:verify_n], note)


@dataclass
class CompileOptions:
    """How to compile: everything :func:`compile` takes besides the source.

    Built once, by the CLI from its flags or by Python callers (directly, or from keywords
    to :func:`compile`). :meth:`validate` (run on construction) checks what the options
    alone decide; :meth:`plan` checks them against the target and its pipeline. Every
    error is one :class:`~graphopt.errors.UsageError` line naming the option.
    """

    target: str = "cpu-fp32"
    #: inputs to trace an ``nn.Module`` source with (else ``input_shapes`` or the source's own)
    example_inputs: tuple[torch.Tensor, ...] | None = None
    input_shapes: Sequence[tuple[int, ...]] | None = None
    #: pipeline text; None: the target's default pipeline
    pipeline: str | None = None
    #: output folder; None: nothing is written (the artifact is verified in memory)
    output: str | Path | None = None
    #: replace ``output`` if it holds a graphopt artifact (and nothing else)
    force: bool = False
    verify_each: bool = False
    #: ``--calib-data``: a .npy/.npz file, a folder of images or ``pkg.module:function``
    data: str | Path | None = None
    verify_samples: int = 8
    calib_samples: int = 32
    calib_size: str | None = None
    calib_normalize: str = "none"
    #: layers kept in fp32 by an int8 pipeline (module paths or node names; ``auto``)
    keep_fp32: Sequence[str] = ()
    #: options of the target's backend, by name (its ``options`` table; ``graphopt targets`` lists them)
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    #: intra-op CPU threads the artifact runs with (targets that run on the CPU); None: :func:`~graphopt.threads.default_threads`
    threads: int | None = None
    recover_steps: int = 0
    recover_lr: float = 1e-2
    #: recover after every approximate structural pass (iterative pruning), not once before quantization
    recover_every: bool = False
    #: quantization-aware fine-tuning steps after insert-quant-stubs (int8 targets)
    qat_steps: int = 0
    qat_lr: float = 1e-4
    #: ``--train-data``: recovery/QAT inputs (the --calib-data formats; ``.npz`` may add ``labels``)
    train_data: str | Path | None = None
    #: minibatch size of recovery/QAT on --train-data
    train_batch: int = 64
    seed: int = 0
    #: replaces the target precision's default tolerance (and is then enforced on approximate rewrites too)
    tolerance: Tolerance | None = None
    plugins: Sequence[str] = ()
    weights: str | Path | None = None
    trust_pickle: bool = False
    #: extra pass-manager instruments (``before_pass`` / ``after_pass`` hooks)
    instruments: Sequence[Instrument] = ()
    print_ir_after: Sequence[str] = ()
    ir_stream: TextIO | None = None
    measure: bool = True
    #: progress: ``on_stage(name)`` or ``on_stage(name, done, total)`` for long steps
    on_stage: Callable[..., None] | None = None
    #: a dict several compiles of the same source and data share (``graphopt.autotarget``): the capture,
    #: the data and each pipeline's passes (calibration included) run once; each compile lowers a copy
    shared: dict[Any, Any] | None = None

    def __post_init__(self) -> None:
        self.keep_fp32 = tuple(_names(self.keep_fp32))
        self.print_ir_after = tuple(_names(self.print_ir_after))
        self.plugins = (self.plugins,) if isinstance(self.plugins, str) else tuple(self.plugins or ())
        self.instruments = tuple(self.instruments or ())
        if self.backend_options is None:
            self.backend_options = {}
        self.validate()

    @classmethod
    def of(cls, options: CompileOptions | None = None, **overrides: Any) -> CompileOptions:
        """``options`` with ``overrides`` applied (or new options from them); unknown names list the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in overrides if k not in valid]
        if unknown:
            raise UsageError(f"compile(): unknown option(s) {choices(unknown)}; valid: {choices(valid)}")
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise UsageError(f"compile(): options must be a CompileOptions, got {type(options).__name__}")
        return replace(options, **overrides)

    def validate(self) -> None:
        """Check what the options alone decide (the target and pipeline are checked by :meth:`plan`)."""
        for flag, value, least in (("--verify-samples", self.verify_samples, 1), ("--calib-samples", self.calib_samples, 1),
                                   ("--recover-steps", self.recover_steps, 0), ("--qat-steps", self.qat_steps, 0),
                                   ("--train-batch", self.train_batch, 1)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise UsageError(f"{flag} must be an integer, got {value!r}")
            if value < least:
                raise UsageError(f"{flag} must be >= {least}, got {value}")
        for flag, lr in (("--recover-lr", self.recover_lr), ("--qat-lr", self.qat_lr)):
            if not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
                raise UsageError(f"{flag} must be > 0, got {lr!r}")
        if self.train_data is not None and not Path(self.train_data).exists() and not is_callable_source(str(self.train_data)):
            raise UsageError(f"--train-data '{self.train_data}' does not exist "
                             "(give a .npy/.npz file, a folder of images or pkg.module:function)")
        if self.calib_normalize not in NORMALIZATIONS:
            raise UsageError(f"--calib-normalize '{self.calib_normalize}': not one of {choices(NORMALIZATIONS)}")
        if self.data is not None and not Path(self.data).exists() and not is_callable_source(str(self.data)):
            raise UsageError(f"--calib-data '{self.data}' does not exist "
                             "(give a .npy/.npz file, a folder of images or pkg.module:function)")
        if self.calib_size and self.data is None:
            raise UsageError("--calib-size resizes the images of a --calib-data folder; give --calib-data too")
        if self.tolerance is not None and not isinstance(self.tolerance, Tolerance):
            raise UsageError(f"tolerance must be a graphopt.verify.Tolerance, got {type(self.tolerance).__name__}")
        if not isinstance(self.backend_options, Mapping):
            raise UsageError(f"backend_options must map option names to values, got {type(self.backend_options).__name__}")
        if "threads" in self.backend_options:
            raise UsageError("threads is no backend option: give it as threads=N (--threads N), for every CPU target")
        if self.threads is not None:
            self.threads = check_threads(self.threads, "--threads")

    def plan(self, host: PluginHost) -> Plan:
        """The target, its parsed pipeline, tolerance and backend options: checked against each other."""
        spec = host.targets.get(self.target)
        backend_options = spec.backend_options(self.backend_options, list(host.targets))
        spec.check_available(backend_options)
        if self.threads is not None and not uses_threads(spec.backend):
            cpu = [t.name for t in host.targets if uses_threads(t.backend)]
            raise UsageError(f"--threads does not apply to target '{spec.name}' (it does not run on the CPU); "
                             f"targets that take it: {', '.join(cpu)}")
        threads = (self.threads or default_threads()) if uses_threads(spec.backend) else None
        pipe = parse_pipeline(self.pipeline if self.pipeline is not None else spec.pipeline, host.passes)
        for name in self.print_ir_after:
            if name != "all" and name not in pipe.names():
                raise UsageError(f"--print-ir-after '{name}': not in the pipeline; choose from {choices([*pipe.names(), 'all'])}")
        quant_invs = [inv for inv in pipe if inv.name == QUANT_PASS]
        if self.qat_steps and not quant_invs:
            raise UsageError(f"--qat-steps needs a pipeline with '{QUANT_PASS}' (an int8 target); this one is: {pipe}")
        if self.keep_fp32 and not quant_invs:
            raise UsageError(f"--keep-fp32 needs a pipeline with '{QUANT_PASS}' (an int8 target); this one is: {pipe}")
        tolerance = self.tolerance or default_tolerance(spec.precision)
        names = [n for n in self.keep_fp32 if n != "none"]
        for inv in quant_invs:
            if names:
                inv.options["keep_fp32"] = [*inv.options.get("keep_fp32", []), *names]
            elif "keep_fp32" not in inv.options and "none" not in self.keep_fp32 and tolerance.min_cosine is not None:
                inv.options["keep_fp32"] = ["auto"]  # the fallback: a no-op when full int8 meets the tolerance
            if "auto" in inv.options.get("keep_fp32", []):  # keep layers in fp32 until the target's tolerance is met
                if tolerance.min_cosine is not None:
                    inv.options.setdefault("keep_fp32_cosine", auto_cosine(tolerance.min_cosine))
                if tolerance.min_top1 is not None:
                    inv.options.setdefault("keep_fp32_top1", tolerance.min_top1)
        return Plan(spec, pipe, bool(quant_invs), tolerance, self.tolerance is not None, backend_options, threads)


def auto_cosine(bound: float) -> float:
    """The cosine ``keep-fp32 auto`` aims for on the calibration inputs when verification holds ``bound``.

    Half the noise power the bound allows (3 dB of SQNR inside it): with noise orthogonal to
    the signal, cosine ``c`` is a noise-to-signal ratio of ``1/c² - 1``. The layers are chosen
    on the calibration inputs, so they just meet the aim there; verification runs on others
    (DenseNet-121 with random weights: 0.985 on the calibration inputs was 0.979 on the
    verification ones). 0.98 -> 0.9899, 0.9 -> 0.9461.
    """
    if bound >= 1.0:
        return 1.0
    if bound <= 0.0:  # asks nothing the pass can aim at (its aim is a cosine in (0, 1])
        return 1e-9
    return 1.0 / math.sqrt(1.0 + (1.0 / bound**2 - 1.0) / 2)


def _names(values: str | Iterable[str] | None) -> list[str]:
    """Names given as one comma-separated string or as a sequence of them."""
    values = [values] if isinstance(values, str) else list(values or ())
    return [n.strip() for v in values for n in str(v).split(",") if n.strip()]


@dataclass
class Plan:
    """What :meth:`CompileOptions.plan` resolved: the target, its pipeline, the tolerance, the backend's options."""

    spec: TargetSpec
    pipeline: Pipeline
    quantizes: bool
    tolerance: Tolerance
    explicit_tolerance: bool
    backend_options: dict[str, Any]
    #: intra-op CPU threads for a target that runs on the CPU; None for the others
    threads: int | None = None


def compile(source: Any, options: CompileOptions | None = None, /, **overrides: Any) -> CompileResult:
    """Compile ``source`` (an nn.Module, ``zoo:NAME``, ``pkg.mod:fn``, ``.pt2``, ``.pt``) for a target.

    ``options`` is a :class:`CompileOptions`; keywords build one (``compile(model,
    target="cpu-int8", data="calib.npz")``) or override fields of the one given. Steps:
    capture, split the data, run the passes, lower, stage (save and load back), verify,
    measure, rename into place. Raises a :class:`~graphopt.errors.GraphoptError` subclass
    on bad input, a failed pass or failed verification; nothing is written in that case.
    """
    opts = CompileOptions.of(options, **overrides)
    host = host_with(opts.plugins)
    plan = opts.plan(host)
    stage = opts.on_stage or (lambda *_a: None)
    clock = _Clock()
    with Output(opts.output, force=opts.force, inputs=_input_paths(source, opts)) as out:
        with clock("capture"):
            captured = _shared(opts, ("capture", plan.quantizes), lambda: _capture(source, opts, plan, stage))
        program, original, data, references = captured
        program = program.clone() if opts.shared is not None else program  # the shared one stays as captured
        stage("running passes")
        with clock("passes"):
            after, passes = _shared(opts, ("passes", str(plan.pipeline), plan.quantizes),
                                    lambda: (program, _run_passes(program, original, data, plan, opts, stage)))
        program = after.clone() if opts.shared is not None else program  # each lowering rewrites its own copy
        stage(f"lowering to {plan.spec.name}")
        with clock("lowering"):
            artifact = _lower(program, plan)
        artifact.threads_pinned = opts.threads is not None  # else: the loading machine's cores
        artifact.goldens = (data.samples, references)  # saved by backends that check themselves where they are finished
        report = _new_report(source, program, plan, data, passes)
        if "reference_runtime" in program.meta:  # verification compares with the original file in its own runtime
            report.extra["reference"] = program.meta["reference_runtime"]
        with clock("saving"):
            artifact = _stage(artifact, out, host, stage)
        report.extra.update(artifact.report_extra)
        stage("verifying")
        with clock("verification"):
            violations = _verify(report, passes.fp32_reference or original, program, artifact, data.samples, references, plan,
                                 passes.records)
            _measure_size(report, original, program, out.staging)
        if violations:
            raise VerificationError(f"verification failed for {plan.spec.name}: {violations} "
                                    f"(over {len(data.samples)} inputs); nothing was written", report)
        if opts.measure:
            stage("measuring latency")
            with clock("latency"):
                _measure_latency(report, original, artifact, data.samples[0], plan.threads)
        if program.meta.get("training_mode_was"):
            report.warnings.append("the model was in training mode; graphopt compiled it in eval mode")
        report.extra["compile_seconds"] = clock.seconds()
        if out.staging is not None:
            report.write(out.staging / REPORT)
        out.commit()
    return CompileResult(artifact, report, program, out.path)


class _Clock:
    """Wall seconds per compile phase (``report.json``: ``compile_seconds``, with their ``total``)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phases: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = round(self.phases.get(phase, 0.0) + time.perf_counter() - t0, 3)

    def seconds(self) -> dict[str, float]:
        return {**self.phases, "total": round(time.perf_counter() - self.start, 3)}


def _capture(source: Any, opts: CompileOptions, plan: Plan, stage: Callable[..., None]) -> tuple[Program, Program, SplitData, list[Any]]:
    """(program, the original, calibration/verification data, the original's outputs on the verification inputs)."""
    stage("capturing")
    program = capture(source, input_shapes=opts.input_shapes, example_inputs=opts.example_inputs,
                      weights=opts.weights, trust_pickle=opts.trust_pickle)
    original = program.clone()
    stage("loading data")
    data = _split_data(opts.data, program.input_specs, opts,
                       needs_calibration=plan.quantizes or (opts.recover_steps + opts.qat_steps > 0 and opts.train_data is None))
    if opts.train_data is not None and opts.recover_steps + opts.qat_steps > 0:
        data.training = training_data(program.input_specs, opts.train_data, image_size=opts.calib_size,
                                      normalize=opts.calib_normalize)
    references = run_all(original.run_reference, data.samples)
    check_finite(references)  # a NaN from the original is the model's, not a pass's or the lowering's
    return program, original, data, references


def _shared(opts: CompileOptions, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """``make()``, or what it returned for ``key`` in an earlier compile sharing ``opts.shared``."""
    if opts.shared is None:
        return make()
    if key not in opts.shared:
        opts.shared[key] = make()
    return opts.shared[key]


def _input_paths(source: Any, opts: CompileOptions) -> list[Path]:
    """The files a compile reads (source, data, weights, plugins): ``--force`` never replaces a folder holding one."""
    paths = [Path(p) for p in (source, opts.data, opts.train_data, opts.weights, *opts.plugins)
             if isinstance(p, (str, Path)) and Path(p).exists()]
    if isinstance(source, str) and is_callable_source(source):
        try:
            found = importlib.util.find_spec(source.split(":")[0])
        except (ImportError, ValueError):
            found = None
        if found is not None and found.origin and Path(found.origin).exists():
            paths.append(Path(found.origin))
    return paths


@dataclass
class _Passes:
    records: list[PassRecord]
    recovery: Recovery | None
    fp32_reference: Program | None  # the program just before quantization
    qat: QuantAwareTraining | None = None


def _run_passes(program: Program, original: Program, data: SplitData, plan: Plan, opts: CompileOptions,
                stage: Callable[..., None]) -> _Passes:
    """The pipeline with its instruments: recovery, the snapshot before quantization, the user's, --verify-each, IR dumps."""
    if data.calibration is not None:
        program.calibration = list(data.calibration.samples)
        program.meta["calibration_progress"] = lambda done, total: stage("calibrating", done, total)
    instruments: list[Instrument] = []
    recovery = qat = None
    train = data.training
    samples = train.samples if train is not None else program.calibration
    batching: dict[str, Any] = {"labels": train.labels, "batch_size": opts.train_batch} if train is not None else {}
    if opts.recover_steps > 0:
        recovery = Recovery(original.run, samples, opts.recover_steps, opts.recover_lr,
                            lambda done, total, loss: stage(f"recovering (loss {loss:.4g})", done, total),
                            every=opts.recover_every, **batching)
        instruments.append(recovery)
    if opts.qat_steps > 0:
        qat = QuantAwareTraining(original.run, samples, opts.qat_steps, opts.qat_lr,
                                 lambda done, total, loss: stage(f"quantization-aware training (loss {loss:.4g})", done, total),
                                 **batching)
        instruments.append(qat)
    before_quant = SnapshotBefore(QUANT_PASS)
    if plan.quantizes:
        instruments.append(before_quant)
    instruments += opts.instruments
    if opts.verify_each:
        instruments.append(VerifyEach(data.samples[:2], default_tolerance("fp32")))
    if opts.print_ir_after:
        instruments.append(PrintIR(opts.print_ir_after, opts.ir_stream or sys.stderr))
    records = PassManager(plan.pipeline, instruments).run(program)
    if recovery is not None:
        recovery.finish(program)
    program.meta.pop("calibration_progress", None)
    return _Passes(records, recovery, before_quant.program, qat)


def _lower(program: Program, plan: Plan) -> Artifact:
    if plan.backend_options:
        program.meta["backend_options"] = dict(plan.backend_options)
    if plan.threads is not None:
        program.meta["threads"] = plan.threads
    return plan.spec.backend.lower(program, plan.spec)


def _new_report(source: Any, program: Program, plan: Plan, data: SplitData, passes: _Passes) -> Report:
    """The report before verification: passes, where the data came from, recovery, quantization."""
    report = Report(source=program.meta.get("source", str(source)), target=plan.spec.name, pipeline=str(plan.pipeline),
                    passes=passes.records)
    cal = data.calibration
    trains = passes.recovery is not None or passes.qat is not None
    if cal is not None:
        report.extra["calibration"] = {"source": cal.source, "samples": len(cal.samples)}
        if cal.warning and plan.quantizes:
            report.warnings.append(cal.warning)
        if cal.warning and trains and data.training is None:
            report.warnings.append(RANDOM_TRAINING_WARNING)
    if data.training is not None and trains:
        report.extra["training_data"] = {"source": data.training.source, "labels": data.training.labels is not None}
    if data.overlap_note:
        report.warnings.append(data.overlap_note)
    if passes.recovery is not None and passes.recovery.result is not None:
        report.extra["recovery"] = {**passes.recovery.result.to_json(), "rounds": passes.recovery.rounds}
    if passes.qat is not None and passes.qat.result is not None:
        report.extra["qat"] = passes.qat.result
    if "quant" in program.meta:
        report.extra["quantization"] = program.meta["quant"].to_json()
    if plan.threads is not None:
        report.extra["threads"] = plan.threads
    return report


def _stage(artifact: Artifact, out: Output, host: PluginHost, stage: Callable[..., None]) -> Artifact:
    """Save into the staging folder and load it back: the artifact verified is the one on disk."""
    if out.staging is None:
        return artifact
    stage("saving")
    artifact.save(out.staging)
    return load_artifact(out.staging, host=host)


def _measure_size(report: Report, original: Program, program: Program, staging: Path | None) -> None:
    from graphopt.cost import count_macs
    from graphopt.quant import kernel_arithmetic_off

    with kernel_arithmetic_off(program.graph_module):  # shapes only: the exact int8 arithmetic is slow
        program.propagate_shapes()
    report.macs = {"original": count_macs(original.graph_module), "compiled": count_macs(program.graph_module)}
    report.size_bytes = {
        "original": _state_bytes(original.graph_module),
        "compiled": _dir_bytes(staging) if staging is not None else _state_bytes(program.graph_module),
    }


def _measure_latency(report: Report, original: Program, artifact: Artifact, sample: Sample, threads: int | None) -> None:
    with torch_threads(threads):  # the original on as many threads as the artifact
        report.latency_ms = {"original": measure_latency_ms(original.run_reference, sample),
                             "compiled": measure_latency_ms(artifact.run, sample)}
    o, c = report.latency_ms["original"], report.latency_ms["compiled"]
    if o and c and c > o * 1.05:
        report.warnings.append(f"the compiled model is SLOWER than the original on this machine: {c:.2f} ms vs {o:.2f} ms (p50)")

def _verify(report: Report, fp32_reference: Program, program: Program, artifact: Artifact,
            samples: Sequence[Sample], references: Sequence[Any], plan: Plan, records: Sequence[PassRecord]) -> str:
    """Fill ``report.verification`` (artifact vs original) and the lowering check; return what failed.

    ``fp32_reference`` is the program just before quantization (the original when no
    rewrite precedes it): the quantization error is measured against it, so pruning's
    error is not blamed on int8.
    """
    spec, tol = plan.spec, plan.tolerance
    outputs = run_all(artifact.run, samples)
    comparison = compare(references, outputs)
    end_to_end = tol.violations(comparison.metrics)
    report.verification = Verification(not end_to_end, comparison.metrics, tol, len(samples), end_to_end, comparison)
    structural = [r.name for r in records if r.contract == "approximate" and r.name != QUANT_PASS and r.changed]
    failures: list[str] = []
    if end_to_end and structural and not plan.explicit_tolerance:
        # The user asked for a rewrite that changes numerics and gave no bound: report, don't fail.
        report.verification.passed = True
        report.warnings.append(
            f"approximate pass(es) {', '.join(structural)} changed the outputs ({'; '.join(end_to_end)} vs the original); "
            "give --min-cosine/--max-rel-err/--min-top1 to hold them to a bound"
        )
    elif end_to_end:
        hint = ""
        if "quant" in program.meta:
            auto = program.meta["quant"].keep_fp32_auto is not None
            hint = (" (--keep-fp32 auto met the tolerance on the calibration inputs but not on these: calibrate on more, "
                    "representative --calib-data)" if auto else " (try --keep-fp32 auto or more --calib-data)")
        failures.append("; ".join(end_to_end) + hint)
    if "quant" in program.meta:
        from graphopt.quant import verify_int8

        split = verify_int8(fp32_reference.run, program, artifact, samples, artifact_outputs=outputs)
        report.extra["int8_verification"] = split
        failures += split["violations"]
    else:
        lowering = compare(run_all(program.run, samples), outputs)
        report.extra["lowering_error"] = lowering.metrics.to_json()
        # fp16/bf16 lowerings change numerics by design: held to their precision's tolerance, fp32 ones to fp32's
        bad = default_tolerance(spec.precision).violations(lowering.metrics)
        if bad:
            failures.append(f"lowering to {spec.name} changed the optimized program's outputs: {'; '.join(bad)}")
    if failures:
        report.verification.passed = False
        report.verification.violations = list(dict.fromkeys([*report.verification.violations, *failures]))
    return "; ".join(failures)


def load_artifact(directory: str | Path, *, host: PluginHost | None = None, threads: int | None = None) -> Artifact:
    """Load a compiled artifact folder; the backend named in its manifest reads it.

    ``threads``: run a CPU artifact on this many intra-op threads instead of those its manifest records.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if threads is not None:
        manifest["threads"] = check_threads(threads, "load_artifact(threads=)")
    host = host or default_host()
    spec = host.targets.get(manifest["target"])
    recorded = manifest.get("backend_options")
    spec.check_available(recorded if isinstance(recorded, dict) else None)
    try:
        return spec.backend.load(directory, manifest, spec)
    except GraphoptError:
        raise
    except Exception as exc:  # a damaged file (truncated model.pt2, ...): the artifact's fault, said in one line
        raise ArtifactError(f"artifact '{directory}' ({spec.name}) cannot be loaded: {first_line(exc)}") from None
