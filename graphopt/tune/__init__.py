"""``graphopt tune``: search pipelines and options for the best accuracy/cost trade-off.

:func:`tune` runs the study (:mod:`graphopt.tune.study`; every trial an ordinary,
verified compile in a process of its own, :mod:`graphopt.tune.worker`, over the search
space of :mod:`graphopt.tune.space`), writes the reports (:mod:`graphopt.tune.report`) and
compiles the best trial within ``max_drop`` of the original's score into ``OUT/best/``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graphopt.tune.report import best_within, write_reports
from graphopt.tune.space import Candidate, parse_space
from graphopt.tune.study import TuneSettings, open_study, run_study, settings_json, trial_rows

__all__ = ["tune", "TuneSettings", "TuneResult", "parse_space", "summarize"]

NO_EVAL_NOTE = ("No --eval was given: the score is the top-1 agreement (%) with the original on the verification "
                "inputs (cosine in tune.json), not accuracy on labelled data")


@dataclass
class TuneResult:
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    paths: dict[str, Path]
    best: dict[str, Any] | None
    best_output: Path | None


def summarize(study: Any, settings: TuneSettings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The summary (tune.json's head) and every trial's row, from the study as it is now."""
    rows = trial_rows(study)
    base = study.user_attrs.get("baseline") or {"score": 100.0, "metric": "top-1 agreement with the original (%)"}
    best = best_within(rows, settings.objective, base["score"], settings.max_drop)
    summary = {"source": settings.source, "targets": list(settings.targets), "objective": settings.objective,
               "metric": base["metric"], "baseline": base["score"], "max_drop": settings.max_drop,
               "counts": dict(Counter(r["status"] for r in rows)), "note": None if settings.eval else NO_EVAL_NOTE,
               "best": {"number": best["number"], "pipeline": best["pipeline"], "command": best["command"],
                        "score": best["metrics"]["score"]} if best else None,
               "settings": settings_json(settings)}
    return summary, rows


def tune(settings: TuneSettings, *, host: Any = None, on_trial: Callable[[dict[str, Any]], None] | None = None,
         compile_best: bool = True) -> TuneResult:
    """Run (or resume) the study, write the reports, compile the best trial into ``OUT/best/``.

    On Ctrl-C the reports of what finished are written, then the KeyboardInterrupt goes on.
    """
    from graphopt.compiler import host_with

    host = host or host_with(settings.compile.get("plugins", ()))
    study, space = open_study(settings, host)
    try:
        run_study(settings, study, space, host, on_trial)
    finally:  # Ctrl-C included: the reports show every trial that finished
        summary, rows = summarize(study, settings)
        paths = write_reports(settings.output, summary, rows, settings.objective)
    best = next((r for r in rows if summary["best"] and r["number"] == summary["best"]["number"]), None)
    best_output = _compile_best(settings, best) if best is not None and compile_best else None
    return TuneResult(summary, rows, paths, best, best_output)


def _compile_best(settings: TuneSettings, best: dict[str, Any]) -> Path:
    """The best trial compiled again as a normal artifact in ``OUT/best/``, in a process set up as the trial's was."""
    from graphopt.errors import GraphoptError
    from graphopt.tune.study import _job
    from graphopt.tune.worker import run_in_process

    cand = Candidate(best["target"], best["pipeline"], best["options"])
    out = settings.output / "best"
    job = {**_job(settings, cand, settings.output), "output": str(out), "keep": True}
    outcome = run_in_process(job, settings.output / "trials" / "best", settings.trial_timeout_s)
    if outcome.get("status") != "complete":
        raise GraphoptError(f"compiling the best trial #{best['number']} into {out} failed: {outcome.get('error')}")
    return out
