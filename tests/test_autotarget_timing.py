"""`--target cpu` times each candidate in its own settled block (graphopt.autotarget.time_candidates)."""

from __future__ import annotations

import time

import torch

from graphopt.autotarget import time_candidates


class _Fake:
    """An artifact whose run() sleeps ``ms`` and logs (name, start time) into a shared list."""

    def __init__(self, name: str, ms: float, log: list[tuple[str, float]]) -> None:
        self.name, self.ms, self.log = name, ms, log

    def run(self, *inputs: torch.Tensor) -> torch.Tensor:
        self.log.append((self.name, time.perf_counter()))
        time.sleep(self.ms / 1e3)
        return inputs[0]


def _blocks(log: list[tuple[str, float]]) -> list[tuple[str, list[float]]]:
    """The log cut into runs of calls of one name: (name, their start times)."""
    out: list[tuple[str, list[float]]] = []
    for name, t in log:
        if out and out[-1][0] == name:
            out[-1][1].append(t)
        else:
            out.append((name, [t]))
    return out


def test_each_candidate_is_timed_in_one_settled_block_per_pass() -> None:
    log: list[tuple[str, float]] = []
    arts = {"a": _Fake("a", 0.2, log), "b": _Fake("b", 4.0, log), "c": _Fake("c", 1.0, log)}
    warmup, settle_ms, runs = 2, 40.0, 5
    got = time_candidates(arts, (torch.zeros(1),), warmup=warmup, settle_ms=settle_ms, runs=runs, rounds=2)

    blocks = _blocks(log)
    # round 1 a, b, c; round 2 c, b, a (c's two blocks meet): no call of one candidate between another's
    assert [name for name, _ in blocks] == ["a", "b", "c", "b", "a"]
    for name, starts in blocks[:2] + blocks[3:]:
        first_timed = starts[-runs]
        assert len(starts) >= warmup + runs, name
        # untimed calls for at least settle_ms before the first timed one, whatever the call's length
        assert (first_timed - starts[0]) * 1e3 >= settle_ms, name
    assert got["a"] < got["c"] < got["b"]
    assert 0.2 <= got["a"] < 1.0 <= got["c"] < 4.0 <= got["b"]  # a sleep wakes late, never early: wide margins


def test_rounds_alternate_the_order_and_the_median_round_counts() -> None:
    log: list[tuple[str, float]] = []
    slow_once = {"n": 0}

    class _Spell(_Fake):
        """'a' hits one slow spell (its second round): one round of four must not move its latency."""

        def run(self, *inputs: torch.Tensor) -> torch.Tensor:
            self.log.append((self.name, time.perf_counter()))
            slow_once["n"] += 1
            time.sleep((self.ms * (20 if 9 <= slow_once["n"] <= 16 else 1)) / 1e3)  # all of round 2
            return inputs[0]

    arts = {"a": _Spell("a", 1.0, log), "b": _Fake("b", 3.0, log)}
    got = time_candidates(arts, (torch.zeros(1),), warmup=3, settle_ms=0.0, runs=5, rounds=4)
    assert [name for name, _ in _blocks(log)] == ["a", "b", "a", "b", "a"]  # a b | b a | a b | b a (neighbours merge)
    assert 1.0 <= got["a"] < 3.0 <= got["b"] < 20.0  # a's slow round (20 ms a call) is outvoted
