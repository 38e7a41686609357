"""Typed errors. The library raises them; only ``graphopt.cli`` prints and exits.

Every error is one line that names the thing at fault (file, node, pass, option) and,
where there is a choice, the valid choices. ``exit_code`` is what the CLI returns.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "GraphoptError",
    "UsageError",
    "CaptureError",
    "PipelineError",
    "PluginError",
    "PassError",
    "BackendUnavailableError",
    "VerificationError",
    "DataError",
    "ArtifactError",
    "LoweringError",
    "Terminated",
    "choices",
    "first_line",
]

EXIT_VERIFICATION = 1
EXIT_BAD_INPUT = 2
EXIT_BACKEND_UNAVAILABLE = 3
EXIT_PASS_FAILED = 4


class GraphoptError(Exception):
    """Base of every error graphopt raises on purpose."""

    exit_code: int = EXIT_BAD_INPUT
    kind: str = "error"

    def __init_subclass__(cls, kind: str | None = None, exit_code: int | None = None, **kwargs: object) -> None:
        """``class UsageError(GraphoptError, kind="usage error")``: the kind and exit code where the class is named."""
        super().__init_subclass__(**kwargs)
        if kind is not None:
            cls.kind = kind
        if exit_code is not None:
            cls.exit_code = exit_code

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(GraphoptError, kind="usage error"):
    """A bad option or argument."""


class CaptureError(GraphoptError, kind="capture error"):
    """The model source could not be turned into a Program."""


class PipelineError(GraphoptError, kind="pipeline error"):
    """A pipeline text or a pass option is wrong, or a pass name is unknown."""


class PluginError(GraphoptError, kind="plugin error"):
    """A plugin could not be loaded or registers something twice."""


class DataError(GraphoptError, kind="data error"):
    """Calibration or verification data is missing or does not fit the model."""


class ArtifactError(GraphoptError, kind="artifact error"):
    """A saved artifact or golden file is missing or unreadable."""


class LoweringError(GraphoptError, kind="lowering error"):
    """A backend cannot express the optimized program (names the node or layer at fault)."""


class PassError(GraphoptError, kind="pass error", exit_code=EXIT_PASS_FAILED):
    """A pass raised or left a broken graph; names the pass and the ones before it."""

    def __init__(self, pass_name: str, before: list[str], cause: BaseException | str) -> None:
        self.pass_name = pass_name
        self.before = list(before)
        self.cause = cause
        reason = cause if isinstance(cause, str) else f"{type(cause).__name__}: {cause}"
        after = ", ".join(self.before) if self.before else "none"
        super().__init__(
            f"pass '{pass_name}' failed (passes run before it: [{after}]): {reason}"
        )


class BackendUnavailableError(GraphoptError, kind="backend unavailable", exit_code=EXIT_BACKEND_UNAVAILABLE):
    """The target's backend cannot run on this machine (missing library or device)."""


class VerificationError(GraphoptError, kind="verification failed", exit_code=EXIT_VERIFICATION):
    """The compiled model does not compute what the original did, within tolerance."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class Terminated(KeyboardInterrupt):
    """SIGTERM/SIGHUP during a compile: unwinds like Ctrl-C (cleanup runs, no pass is blamed).

    The CLI exits with ``128 + signum``, as a shell reports a process the signal killed.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_MAX_REASON = 300


def first_line(exc: BaseException | str) -> str:
    """The first non-empty line of an error message, trimmed to a readable length."""
    text = str(exc)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line and isinstance(exc, BaseException):
        line = type(exc).__name__
    # torch's zip reader appends a paragraph of advice after the actual reason
    line = line.split(". This is an internal miniz error")[0]
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 1] + "…"


def choices(items: Iterable[str]) -> str:
    """Format candidates the same way everywhere: ``'a', 'b', 'c'``."""
    listed = sorted(set(items))
    return ", ".join(repr(i) for i in listed) if listed else "(none)"
