"""CPU threads: how many intra-op threads a CPU target's artifact runs with (``--threads``).

One number for every target that runs on the CPU. A backend says it honours it with a
class attribute ``cpu_threads = True``; the compiler then puts the number in
``program.meta["threads"]`` before ``lower`` (:func:`program_threads` reads it), the
artifact keeps it in its ``threads`` attribute, :meth:`Artifact.save` records it in the
manifest and ``load_artifact(dir, threads=N)`` replaces the recorded one before the
backend's ``load`` reads it (:func:`manifest_threads`). Torch backends run inside
:func:`torch_threads`; a runtime with its own pool gets the number as its session option.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from graphopt.errors import ArtifactError, UsageError
from graphopt.targets import BackendOption

if TYPE_CHECKING:
    from graphopt.program import Program

__all__ = ["ENV", "THREADS_OPTION", "default_threads", "check_threads", "program_threads", "manifest_threads", "torch_threads",
           "uses_threads"]

#: how ``graphopt targets`` lists ``--threads`` for the targets that honour it (a compile option, not a backend's)
THREADS_OPTION = BackendOption("threads", "intra-op CPU threads [default: the cores this process may use]", type=int)

#: overrides the default (not an explicit ``--threads``): a test run or a container sets it once
ENV = "GRAPHOPT_THREADS"


def check_threads(value: Any, where: str) -> int:
    """``value`` as a positive int; otherwise a one-line UsageError naming ``where``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UsageError(f"{where} {value!r}: expected a positive number of threads")
    return value


def default_threads() -> int:
    """``$GRAPHOPT_THREADS`` if set, else the cores this process may run on (``os.sched_getaffinity``)."""
    env = os.environ.get(ENV)
    if env:
        return check_threads(env, ENV)
    try:
        return len(os.sched_getaffinity(0)) or (os.cpu_count() or 1)
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def uses_threads(backend: Any) -> bool:
    """True for a backend that runs on the CPU and honours ``--threads`` (``cpu_threads = True``)."""
    return bool(getattr(backend, "cpu_threads", False))


def program_threads(program: Program) -> int:
    """The threads a lowering was asked for (``program.meta["threads"]``), else the default."""
    value = program.meta.get("threads")
    return default_threads() if value is None else check_threads(value, "program.meta['threads']")


def manifest_threads(manifest: Mapping[str, Any]) -> int:
    """The threads a manifest records (or ``load_artifact(threads=)`` put there); the default when absent."""
    value = manifest.get("threads")
    if value is None:
        return default_threads()
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ArtifactError(f"artifact.json: 'threads' is {value!r}, expected a positive integer")
    return value


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run torch's intra-op work on ``threads`` threads inside the block; the global setting is restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
