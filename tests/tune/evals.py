"""Eval functions the tune tests name with --eval (imported by the trials' processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from graphopt.program import Program


def flaky(model) -> float:
    """The original (a Program): 100. Trials: the 1st raises, the 2nd kills its own process, the others score 90."""
    if isinstance(model, Program):
        return 100.0
    counter = Path(os.environ["TUNE_TEST_COUNTER"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == 1:
        raise ValueError("the eval broke on purpose")
    if calls == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would
    return 90.0


def slow(model) -> float:
    """Score 95 after a pause (so a test can kill the study while a trial runs)."""
    import time

    if not isinstance(model, Program):
        time.sleep(float(os.environ.get("TUNE_TEST_SLEEP", "0")))
    return 95.0
