"""The tune loop: an Optuna multi-objective study whose trials are ordinary compiles.

Objectives: the score (the user's ``--eval``, else top-1 agreement with the original, in
percent; maximized) and the cost (``latency`` ms, ``size`` bytes or ``macs``; minimized).
The study lives in an Optuna RDB storage: ``OUT/study.db`` (SQLite) by default, any
``--storage URL`` otherwise, so several machines (or processes) running the same command
share one study. Trials are asked and told one at a time (ask/tell); a heartbeat marks
the running one, so a trial whose process died (kill -9, a crash of the machine) is failed
by the next ``--resume`` and does not count. Ctrl-C ends the running trial's process, marks
it *interrupted* (not counted) and writes the report of what finished.

``--trials N`` is the number of counted trials (complete, pruned or failed) the study
holds: a resumed study runs what is missing; a worker that finds the study full stops.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.errors import UsageError, choices
from graphopt.tune.space import Space, parse_space
from graphopt.tune.worker import AGREEMENT, call_eval, load_eval, run_in_process

__all__ = ["TuneSettings", "OBJECTIVES", "SAMPLERS", "open_study", "run_study", "trial_rows", "baseline", "STUDY_NAME"]

OBJECTIVES = {"latency": ("latency_ms", "ms"), "size": ("size_bytes", "bytes"), "macs": ("macs", "MACs")}
SAMPLERS = ("tpe", "nsga2")
STUDY_NAME = "graphopt-tune"
#: seconds between heartbeats of a running trial (a trial silent for 4 of them is stale); GRAPHOPT_TUNE_HEARTBEAT overrides
HEARTBEAT_S = float(os.environ.get("GRAPHOPT_TUNE_HEARTBEAT", "5"))
#: trial states (user attr "status") that do not count towards --trials
UNCOUNTED = ("interrupted", "surplus")


@dataclass
class TuneSettings:
    """Everything ``graphopt tune`` takes (the CLI builds it; tests may too)."""

    source: str
    targets: Sequence[str]
    output: Path
    search: str = "prune,substitute,quant,recover"
    eval: str | None = None
    max_drop: float = 1.0
    trials: int = 30
    time_budget_s: float | None = None
    objective: str = "macs"
    resume: bool = False
    storage: str | None = None
    sampler: str = "tpe"
    seed: int = 0
    trial_timeout_s: float | None = 900.0
    #: a trial whose top-1 agreement with the original is below this (percent) is pruned before its eval
    prune_below: float | None = None
    #: compile options every trial shares (data, train_data, calib_samples, verify_samples, input_shapes, plugins, ...)
    compile: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.output = Path(self.output)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective '{self.objective}': not one of {choices(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler '{self.sampler}': not one of {choices(SAMPLERS)}")
        if self.trials < 1:
            raise UsageError(f"--trials must be >= 1, got {self.trials}")
        if not self.max_drop >= 0:
            raise UsageError(f"--max-drop must be >= 0, got {self.max_drop}")
        if self.prune_below is None:  # hopeless: more disagreement than four times the allowed drop, plus noise
            self.prune_below = 100.0 - (4 * self.max_drop + 5.0)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.output / 'study.db').resolve()}"

    def fingerprint(self) -> dict[str, Any]:
        """What must match between the runs (and machines) sharing one study."""
        return {"source": self.source, "targets": list(self.targets), "search": self.search, "eval": self.eval,
                "objective": self.objective}


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UsageError("graphopt tune needs Optuna: pip install 'graphopt[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # ask/tell with a heartbeat is what we do on purpose (our thread records it while a trial runs)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    return optuna


def baseline(settings: TuneSettings) -> dict[str, Any]:
    """The original's score: the eval on the original model (or 100: agreement with itself)."""
    if not settings.eval:
        return {"score": 100.0, "metric": "top-1 agreement with the original (%)", "eval": None}
    from graphopt.capture import capture

    fn = load_eval(settings.eval)
    c = settings.compile
    program = capture(settings.source, input_shapes=c.get("input_shapes"), weights=c.get("weights"),
                      trust_pickle=c.get("trust_pickle", False))
    return {"score": call_eval(fn, program, settings.eval), "metric": settings.eval, "eval": settings.eval}


def _open_study(settings: TuneSettings) -> Any:
    optuna = _optuna()
    db = settings.output / "study.db"
    if settings.storage is None and db.exists() and not settings.resume:
        raise UsageError(f"'{settings.output}' already holds a study ({db}); pass --resume to continue it, or another -o")
    sampler = (optuna.samplers.TPESampler(seed=settings.seed, multivariate=True, constant_liar=True)
               if settings.sampler == "tpe" else optuna.samplers.NSGAIISampler(seed=settings.seed))

    def create() -> Any:
        storage = optuna.storages.RDBStorage(settings.storage_url, heartbeat_interval=max(1, round(HEARTBEAT_S)),
                                             grace_period=max(1, round(4 * HEARTBEAT_S)))
        return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                                   directions=["maximize", "minimize"], load_if_exists=True)

    made = not settings.output.exists()
    settings.output.mkdir(parents=True, exist_ok=True)
    try:
        study = _opened(create, settings.storage_url if settings.storage is None else f"--storage '{_shown(settings.storage)}'")
        theirs = study.user_attrs.get("settings")
        if theirs is None:
            study.set_user_attr("settings", settings.fingerprint())
        elif theirs != settings.fingerprint():
            diff = [k for k in theirs if theirs[k] != settings.fingerprint().get(k)]
            raise UsageError(f"the study in {_shown(settings.storage_url)} was made with other settings ({', '.join(diff)}: "
                             f"{', '.join(repr(theirs[k]) for k in diff)}); use another -o/--storage")
    except BaseException:
        if made:  # a study that cannot be opened or joined leaves no output folder behind
            shutil.rmtree(settings.output, ignore_errors=True)
        raise
    optuna.storages.fail_stale_trials(study)  # trials of a process that died: failed, not counted
    return study


#: how long a worker retries opening a storage that another worker is creating at the same moment
OPEN_RETRY_S = 30.0


def _shown(url: str) -> str:
    """A storage URL as messages show it: the password masked."""
    import sqlalchemy.engine

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: shown as given (it holds no parsed password)
        return url


def _racing(exc: BaseException) -> bool:
    """An error of opening a storage whose schema another worker is creating right now.

    Optuna creates the tables, the version row and the alembic stamp on first open without a
    lock: workers that start together on a fresh database collide (a UNIQUE constraint,
    "table ... already exists", "database is locked", or the schema check reading a stamp not
    written yet). Opened again a moment later, the storage is whole.
    """
    import sqlalchemy.exc

    if isinstance(exc, sqlalchemy.exc.IntegrityError):
        return True
    if isinstance(exc, RuntimeError):  # check_table_schema_compatibility before the winner stamped alembic
        # (a storage made by an older Optuna asks for `optuna storage upgrade`: that one is no race)
        return "compatible with the table schema" in str(exc) and "storage upgrade" not in str(exc)
    if isinstance(exc, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.ProgrammingError)):
        text = str(exc).lower()
        return any(word in text for word in ("already exists", "locked", "duplicate"))
    return False


def _opened(create: Callable[[], Any], where: str) -> Any:
    """``create()`` (open or create the study), retried while another worker creates the same storage.

    A storage that cannot be opened at all (no such URL scheme, a missing database driver, a
    folder that does not exist) is a usage error naming it, not an internal one.
    """
    import random

    import sqlalchemy.exc

    deadline = time.monotonic() + OPEN_RETRY_S
    wait = 0.05
    while True:
        try:
            return create()
        except ImportError as exc:  # optuna's message: the DB driver for the URL's dialect is not installed
            raise UsageError(f"{where}: {exc} (for example pip install psycopg2-binary or pymysql)") from None
        except sqlalchemy.exc.ArgumentError as exc:
            raise UsageError(f"{where}: not a database URL ({exc}); examples: sqlite:///study.db, "
                             "postgresql://user:password@host/db, mysql+pymysql://user:password@host/db") from None
        except (sqlalchemy.exc.SQLAlchemyError, RuntimeError) as exc:
            if not _racing(exc) or time.monotonic() > deadline:
                detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise UsageError(f"{where}: cannot open the study's database: {type(exc).__name__}: {detail}") from None
            time.sleep(wait * (1 + random.random()))  # jitter: racing workers do not retry in step
            wait = min(2 * wait, 1.0)


def counted(trial: Any) -> bool:
    """A trial that counts towards --trials: it has a recorded status other than interrupted/surplus, or is running."""
    status = trial.user_attrs.get("status")
    if trial.state.name == "RUNNING":
        return True
    return status is not None and status not in UNCOUNTED


def _heartbeat(storage: Any, trial_id: int, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        storage.record_heartbeat(trial_id)


def _job(settings: TuneSettings, candidate: Any, directory: Path) -> dict[str, Any]:
    return {"source": settings.source, "candidate": candidate.to_json(), "compile": settings.compile,
            "eval": settings.eval, "prune_below": settings.prune_below, "seed": settings.seed,
            "output": str(directory / "artifact")}


def _tell(study: Any, trial: Any, outcome: dict[str, Any], objective: str) -> None:
    optuna = _optuna()
    status = outcome.get("status", "failed")
    for key in ("status", "error", "macs", "size_bytes", "latency_ms", "cosine", AGREEMENT, "score", "seconds"):
        if key in outcome and outcome[key] is not None:
            trial.set_user_attr(key, outcome[key])
    if status == "complete":
        cost = (outcome.get(OBJECTIVES[objective][0]) or {}).get("compiled")
        if cost is None or not math.isfinite(float(cost)):
            trial.set_user_attr("status", "failed")
            trial.set_user_attr("error", f"no {objective} measured")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        study.tell(trial, [float(outcome["score"]), float(cost)])
    elif status == "pruned":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)


def open_study(settings: TuneSettings, host: Any) -> tuple[Any, Space]:
    """The study (created, or loaded to resume or share) and the parsed search space; checks both first."""
    space = parse_space(settings.search, settings.targets)
    for target in space.targets:
        host.targets.get(target).check_available()
    base = baseline(settings)  # the eval is loaded and run once before the study exists: a bad --eval leaves nothing
    study = _open_study(settings)
    if "baseline" not in study.user_attrs:
        study.set_user_attr("baseline", base)
    return study, space


def run_study(settings: TuneSettings, study: Any, space: Space, host: Any,
              on_trial: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Run trials until the study holds ``settings.trials`` counted ones or the time budget is spent."""
    optuna = _optuna()
    deadline = time.monotonic() + settings.time_budget_s if settings.time_budget_s else math.inf
    while time.monotonic() < deadline:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        if sum(counted(t) for t in trials) >= settings.trials:
            if not any(t.state.name == "RUNNING" for t in trials):
                break
            time.sleep(HEARTBEAT_S)  # the study is full once the running trials (maybe of a dead process) settle
            continue
        trial = study.ask()
        others = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and counted(t)]
        if len(others) >= settings.trials:  # another worker filled the study meanwhile
            trial.set_user_attr("status", "surplus")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            break
        outcome = _run_one(settings, space, host, study, trial)
        if on_trial is not None:
            on_trial({"number": trial.number, **outcome})
    return study


def _run_one(settings: TuneSettings, space: Space, host: Any, study: Any, trial: Any) -> dict[str, Any]:
    optuna = _optuna()
    try:
        point = space.suggest(trial)
        candidate = space.build(point, host)
    except Exception as exc:  # noqa: BLE001 - a point that makes no pipeline is a failed trial
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        _tell(study, trial, outcome, settings.objective)
        return outcome
    trial.set_user_attr("candidate", candidate.to_json())
    trial.set_user_attr("command", candidate.command(settings.source, settings.compile))
    directory = settings.output / "trials" / f"{trial.number:04d}"
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(study._storage, trial._trial_id, stop), daemon=True)
    study._storage.record_heartbeat(trial._trial_id)
    beat.start()
    try:
        outcome = dict(run_in_process(_job(settings, candidate, directory), directory, settings.trial_timeout_s))
    except KeyboardInterrupt:
        trial.set_user_attr("status", "interrupted")
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    finally:
        stop.set()
        beat.join()
    (directory / "outcome.json").write_text(json.dumps(outcome, indent=1))
    _tell(study, trial, outcome, settings.objective)
    return outcome


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """Every trial of the study as a plain dict (tune.json's ``trials``), in number order."""
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = dict(t.user_attrs)
        status = attrs.pop("status", None) or ("running" if t.state.name == "RUNNING" else "failed")
        if t.state.name == "FAIL" and status == "running":
            status = "failed"
        error = attrs.pop("error", None)
        if status == "failed" and error is None and t.state.name == "FAIL":
            error = "its process stopped without a result (killed or the machine went down); failed by --resume"
        cand = attrs.pop("candidate", None) or {}
        rows.append({"number": t.number, "status": status, "error": error, "params": dict(t.params),
                     "target": cand.get("target"), "pipeline": cand.get("pipeline"), "options": cand.get("options", {}),
                     "command": attrs.pop("command", None), "metrics": attrs,
                     "values": list(t.values) if t.values is not None else None,
                     "started": t.datetime_start.isoformat() if t.datetime_start else None,
                     "finished": t.datetime_complete.isoformat() if t.datetime_complete else None})
    return rows


def settings_json(settings: TuneSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["output"] = str(settings.output)
    d["storage"] = settings.storage_url if settings.storage is None else "(given with --storage)"
    return d
