"""The tune study: failed and killed trials, Ctrl-C and kill -9 then --resume, two workers on one SQLite study."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from graphopt.errors import UsageError
from graphopt.tune import TuneSettings, tune
from graphopt.tune.study import STUDY_NAME

ROOT = Path(__file__).resolve().parents[2]
SEARCH = "prune{ratio=0.1..0.4,rounds=1,importance=[l1]}"
FAST = {"measure": False, "verify_samples": 4}


@pytest.fixture(autouse=True)
def _importable_tests(monkeypatch):
    """The trials' processes import tests.tune.evals; a heartbeat of 1 s makes a dead run's trial stale in 4 s."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("GRAPHOPT_TUNE_HEARTBEAT", "1")


def _settings(out, **kw):
    base = dict(source="zoo:digits_cnn", targets=["cpu-fp32"], output=out, search=SEARCH, trials=4, compile=dict(FAST))
    return TuneSettings(**{**base, **kw})


def test_a_trial_that_raises_or_is_killed_is_recorded_and_the_study_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNE_TEST_COUNTER", str(tmp_path / "calls"))
    seen = []
    result = tune(_settings(tmp_path / "out", eval="tests.tune.evals:flaky"), on_trial=seen.append, compile_best=False)
    rows = result.rows
    assert [r["status"] for r in rows] == ["failed", "failed", "complete", "complete"]
    assert "ValueError: the eval broke on purpose" in rows[0]["error"]
    assert "killed by SIGKILL" in rows[1]["error"]
    assert [r["metrics"]["score"] for r in rows[2:]] == [90.0, 90.0]
    assert all(r["pipeline"].startswith("fuse-conv-bn-relu,prune-channels{") for r in rows)
    assert [s["number"] for s in seen] == [0, 1, 2, 3]
    assert result.summary["counts"] == {"failed": 2, "complete": 2} and result.summary["baseline"] == 100.0
    # no trial within 1 point of 100: nothing is "best"
    assert result.best is None and result.summary["best"] is None
    assert (tmp_path / "out" / "report.html").exists()


def test_an_existing_study_needs_resume_and_the_same_settings(tmp_path):
    out = tmp_path / "out"
    tune(_settings(out, trials=1), compile_best=False)
    with pytest.raises(UsageError, match="already holds a study.*--resume"):
        tune(_settings(out, trials=1), compile_best=False)
    with pytest.raises(UsageError, match="other settings .*search"):
        tune(_settings(out, trials=2, resume=True, search="prune"), compile_best=False)
    # a resumed study that is already full runs nothing and keeps its trial
    again = tune(_settings(out, trials=1, resume=True))
    assert [r["status"] for r in again.rows] == ["complete"]
    assert again.best["number"] == 0 and (out / "best" / "artifact.json").exists()  # no --eval: agreement 100 is in


def _cli(out, *extra, trials=3):
    return [sys.executable, "-m", "graphopt.cli", "tune", "zoo:digits_cnn", "--target", "cpu-fp32", "--search", SEARCH,
            "--trials", str(trials), "--verify-samples", "4", "--no-latency", "-o", str(out), *extra]


def _study(url):
    return optuna.load_study(study_name=STUDY_NAME, storage=url)


def _wait_for(predicate, timeout=240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def _complete(url):
    try:
        return [t for t in _study(url).get_trials() if t.state.name == "COMPLETE"]
    except Exception:  # noqa: BLE001 - the study is not created yet
        return []


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_resume_after_the_process_died_loses_and_repeats_no_trial(tmp_path, sig):
    out = tmp_path / "out"
    url = f"sqlite:///{out / 'study.db'}"
    env = {**os.environ, "TUNE_TEST_SLEEP": "3"}
    proc = subprocess.Popen(_cli(out, "--eval", "tests.tune.evals:slow"), cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # kill it while the second trial runs
    _wait_for(lambda: len(_complete(url)) >= 1 and any(t.state.name == "RUNNING" for t in _study(url).get_trials()))
    before = {t.number: (t.params, t.values) for t in _complete(url)}
    proc.send_signal(sig)
    log = proc.communicate(timeout=120)[0]
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "rerun with --resume" in log, log
        assert (out / "tune.json").exists()  # the reports of what finished were written
    else:
        assert proc.returncode == -signal.SIGKILL
    again = subprocess.run(_cli(out, "--eval", "tests.tune.evals:slow", "--resume"), cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    trials = _study(url).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3
    for number, (params, values) in before.items():  # every finished trial kept, as it was
        kept = next(t for t in trials if t.number == number)
        assert (kept.state.name, kept.params, kept.values) == ("COMPLETE", params, values)
    left = [t for t in trials if t.state.name != "COMPLETE"]  # the trial that was running: failed, not counted
    assert len(left) == 1 and left[0].state.name == "FAIL"
    assert left[0].user_attrs.get("status") == ("interrupted" if sig == signal.SIGINT else None)
    # each complete trial ran once: its own folder, one outcome
    assert sorted(p.name for p in (out / "trials").iterdir() if (p / "outcome.json").exists()) == \
        [f"{t.number:04d}" for t in sorted(complete, key=lambda t: t.number)]
    assert "best within --max-drop 1" in again.stdout


@pytest.mark.slow
def test_two_workers_on_one_sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    procs = [subprocess.Popen(_cli(tmp_path / f"w{i}", "--storage", url, trials=4), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    trials = _study(url).get_trials()
    counted = [t for t in trials if t.user_attrs.get("status") != "surplus"]
    assert len(counted) == 4 and all(t.state.name == "COMPLETE" for t in counted)
    ran = {}
    for i in range(2):  # which worker ran which trial: a folder per trial, in exactly one worker's output
        for d in (tmp_path / f"w{i}" / "trials").iterdir():
            if d.name != "best":  # where the best trial was compiled again into OUT/best
                ran.setdefault(int(d.name), []).append(i)
    assert sorted(ran) == sorted(t.number for t in counted) and all(len(w) == 1 for w in ran.values())
    assert {w for ws in ran.values() for w in ws} == {0, 1}  # both workers did some of the work


def test_opening_retries_while_another_worker_creates_the_storage(tmp_path, monkeypatch):
    """Optuna creates a fresh storage's schema without a lock: the worker that loses the race opens it again."""
    import sqlalchemy.exc

    from graphopt.tune import study as study_mod

    real, calls, error = optuna.storages.RDBStorage, [], []

    class Racing(real):  # what the losing worker sees, as measured with two workers on one fresh database
        def __init__(self, *args, **kw):
            calls.append(1)
            if len(calls) <= len(error):
                raise error[len(calls) - 1]
            super().__init__(*args, **kw)

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racing)
    race = sqlalchemy.exc.IntegrityError("INSERT INTO alembic_version", {},
                                         Exception("UNIQUE constraint failed: alembic_version.version_num"))
    error[:] = [race, race]
    settings = _settings(tmp_path / "out", storage=f"sqlite:///{tmp_path / 'shared.db'}")
    study = study_mod._open_study(settings)
    assert len(calls) == 3 and study.user_attrs["settings"] == settings.fingerprint()
    # an error that is not a race is not retried: one try, a usage error naming the storage, no output folder
    calls.clear()
    error[:] = [sqlalchemy.exc.OperationalError("SELECT", {}, Exception("disk I/O error"))]
    with pytest.raises(UsageError, match=r"--storage 'sqlite:///.*other\.db': cannot open .*disk I/O error"):
        study_mod._open_study(_settings(tmp_path / "fresh", storage=f"sqlite:///{tmp_path / 'other.db'}"))
    assert calls == [1] and not (tmp_path / "fresh").exists()


_OPEN_AT = """
import sys, time
from graphopt.tune.study import TuneSettings, _open_study
start, folder, worker = float(sys.argv[1]), sys.argv[2], sys.argv[3]
failed = []
for k in range(8):  # eight fresh databases, each opened by every worker at the same instant
    time.sleep(max(0.0, start + 0.5 * k - time.time()))
    try:
        _open_study(TuneSettings(source="zoo:digits_cnn", targets=["cpu-fp32"], output=f"{folder}/w{worker}-{k}",
                                 storage=f"sqlite:///{folder}/db{k}.db"))
    except Exception as exc:
        failed.append(f"db{k}: {exc}")
print(failed)
sys.exit(1 if failed else 0)
"""


def test_workers_that_start_together_on_a_fresh_database_all_open_it(tmp_path):
    """Before the retry, most starts lost a worker (UNIQUE constraint failed: alembic_version.version_num)."""
    start = time.time() + 5  # past the imports, so the workers open each database at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(start), str(tmp_path), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert all(optuna.get_all_study_names(f"sqlite:///{tmp_path / f'db{k}.db'}") == [STUDY_NAME] for k in range(8))
