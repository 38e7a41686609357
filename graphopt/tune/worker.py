"""One tune trial, in a process of its own: an ordinary compile, then the user's eval.

The study runs ``python -m graphopt.tune JOB.json RESULT.json``: JOB holds the
source, the candidate (target, pipeline text, options) and the shared compile options;
the worker compiles (verified like any compile), takes a cheap first estimate (top-1
agreement with the original on the verification inputs, in percent) and stops there when
it is hopeless (below ``prune_below``: the trial is *pruned*), else runs the eval and
writes the metrics. A crash, a kill (out of memory) or a timeout leaves no RESULT: the
study records the trial as failed, with the last line the worker wrote to stderr.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from graphopt.errors import DataError, UsageError, first_line

__all__ = ["load_eval", "run_trial", "run_in_process", "TrialOutcome"]

#: metric keys every finished trial has (tune.json, the report)
AGREEMENT = "agreement"


def load_eval(ref: str) -> Callable[[Any], float]:
    """``pkg.module:fn`` → the function (UsageError naming what is missing)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise UsageError(f"--eval '{ref}' is not pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module: one line naming it
        raise UsageError(f"--eval '{ref}': cannot import '{module_name}': {type(exc).__name__}: {first_line(exc)}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--eval '{ref}': '{module_name}' has no function '{attr}'")
    return fn


def call_eval(fn: Callable[[Any], float], model: Any, ref: str) -> float:
    value = fn(model)
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DataError(f"--eval '{ref}' returned {type(value).__name__}, not a number") from None
    if value != value:
        raise DataError(f"--eval '{ref}' returned NaN")
    return value


def run_trial(job: dict[str, Any]) -> dict[str, Any]:
    """Compile the job's candidate, estimate, evaluate: the result (JSON-able); raises on a failed compile."""
    import torch

    from graphopt.compiler import CompileOptions, compile

    torch.manual_seed(job.get("seed", 0))
    cand = job["candidate"]
    base = dict(job["compile"])
    if base.get("input_shapes"):
        base["input_shapes"] = [tuple(s) for s in base["input_shapes"]]
    out = Path(job["output"])  # a fresh folder per trial (compile refuses to replace anything else)
    options = CompileOptions(target=cand["target"], pipeline=cand["pipeline"], output=out, force=True,
                             **base, **cand["options"])
    start = time.perf_counter()
    result = compile(job["source"], options)
    report = result.report
    metrics = report.verification.metrics
    agreement = 100.0 * (metrics.top1_agreement if metrics.top1_agreement is not None else 1.0)
    res: dict[str, Any] = {
        "macs": report.macs, "size_bytes": report.size_bytes, "latency_ms": report.latency_ms,
        "cosine": metrics.cosine, AGREEMENT: agreement, "warnings": list(report.warnings),
    }
    if agreement < job.get("prune_below", -1.0) and not job.get("keep"):
        res.update(status="pruned", error=f"first estimate: top-1 agreement {agreement:.1f}% < {job['prune_below']:.1f}%")
    else:
        ref = job.get("eval")
        res["score"] = call_eval(load_eval(ref), result.artifact, ref) if ref else agreement
        res["status"] = "complete"
    res["seconds"] = time.perf_counter() - start
    if job.get("keep"):  # OUT/best: the whole artifact stays
        return res
    for f in out.iterdir():  # keep the trial's report.json; the artifact itself is rebuilt for the best trial only
        if f.name != "report.json":
            shutil.rmtree(f) if f.is_dir() else f.unlink()
    return res


class TrialOutcome(dict):
    """The worker's result, or ``{"status": "failed", "error": ...}``."""


def run_in_process(job: dict[str, Any], directory: Path, timeout_s: float | None,
                   on_start: Callable[[subprocess.Popen], None] | None = None) -> TrialOutcome:
    """Run ``job`` in a fresh Python process; a crash, kill or timeout is a failed outcome, never an exception."""
    directory.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = directory / "job.json", directory / "result.json", directory / "worker.log"
    result_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "graphopt.tune", str(job_file), str(result_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        if on_start is not None:
            on_start(proc)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return TrialOutcome(status="failed", error=f"timed out after {timeout_s:.0f} s (killed)")
        except BaseException:  # Ctrl-C in the study: the trial's process goes with it
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    if result_file.exists():
        return TrialOutcome(json.loads(result_file.read_text()))
    lines = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    why = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
    return TrialOutcome(status="failed", error=f"the trial's process died ({why})" + (f": {lines[-1]}" if lines else ""))


def main(argv: list[str]) -> int:
    job = json.loads(Path(argv[0]).read_text())
    try:
        result = run_trial(job)
    except Exception as exc:  # noqa: BLE001 - a failed trial is recorded, not fatal
        kind = getattr(exc, "kind", type(exc).__name__)
        result = {"status": "failed", "error": f"{kind}: {first_line(exc)}"}
    tmp = Path(argv[1]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, argv[1])
    return 0
