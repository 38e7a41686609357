"""Where a compile writes: a staging folder beside the destination, renamed into place.

- The staging folder is ``.NAME.tmp-PID-TOKEN`` in the destination's parent (created
  with the umask, like any folder). It is removed on any failure, on SIGINT, SIGTERM
  and SIGHUP; one left by a process that died anyway (SIGKILL, power loss) is removed
  by the next compile into the same parent, once its PID is gone.
- Parent folders the compile had to create are removed again if it fails.
- ``force`` replaces only a folder that holds a graphopt artifact and nothing else, never
  the working folder, one of its parents or a folder holding an input. The old artifact
  is renamed aside (``.NAME.old-PID-TOKEN``), the new one renamed in, then the old one
  deleted: a crash in between leaves the old artifact aside, and the next compile into
  that parent puts it back.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from graphopt.errors import ArtifactError, Terminated, UsageError, choices
from graphopt.targets import MANIFEST, read_manifest

__all__ = ["Output", "REPORT"]

REPORT = "report.json"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _holds(folder: Path, path: Path) -> bool:
    return folder == path or folder in path.parents


class Output:
    """The destination folder of a compile (``path`` None: write nothing); a context manager.

    Construction checks the destination without touching the disk (UsageError naming
    why it cannot be used); ``with`` creates the staging folder; :meth:`commit` renames
    it into place; leaving the block without a commit removes what it created.
    """

    def __init__(self, path: str | Path | None, *, force: bool = False, inputs: Sequence[str | Path] = ()) -> None:
        self.path = Path(path) if path is not None else None
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self.staging: Path | None = None
        self._created: list[Path] = []
        self._signals: dict[int, Any] = {}
        if self.path is not None:
            self._check()

    # -- checks --------------------------------------------------------------------------

    def _check(self) -> None:
        path = self.path
        assert path is not None
        if not (path.exists() or path.is_symlink()):
            ancestor = path.parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                raise UsageError(f"output '{path}': '{ancestor}' is not a folder")
            return
        if not self.force:
            raise UsageError(f"output folder '{path}' already exists; pass --force to replace it")
        self._check_replaceable()

    def _check_replaceable(self) -> None:
        """``--force``: the existing destination must be a graphopt artifact and nothing else."""
        path = self.path
        assert path is not None
        refuse = f"--force will not replace '{path}'"
        if path.is_symlink():
            raise UsageError(f"{refuse}: it is a symbolic link")
        if not path.is_dir():
            raise UsageError(f"output '{path}' exists and is not a folder")
        resolved, cwd = path.resolve(), Path.cwd().resolve()
        if _holds(resolved, cwd):
            raise UsageError(f"{refuse}: it is the working folder or one of its parents")
        for p in self.inputs:
            if _holds(resolved, p.resolve()):
                raise UsageError(f"{refuse}: it holds the input '{p}'")
        try:
            manifest = read_manifest(path)
        except ArtifactError:
            raise UsageError(f"{refuse}: it is not a graphopt artifact (no readable {MANIFEST})") from None
        files = manifest.get("files")
        known = {MANIFEST, REPORT, *(f for f in files if isinstance(f, str))} if isinstance(files, list) else {MANIFEST, REPORT}
        foreign = sorted(e.name for e in path.iterdir() if e.name not in known)
        if foreign:
            more = " ..." if len(foreign) > 5 else ""
            raise UsageError(f"{refuse}: besides the artifact it holds {choices(foreign[:5])}{more}")

    # -- staging -------------------------------------------------------------------------

    def __enter__(self) -> Output:
        if self.path is None:
            return self
        self._catch_signals()
        parent = self.path.parent
        try:
            missing = []
            while not parent.exists():
                missing.append(parent)
                parent = parent.parent
            for folder in reversed(missing):
                folder.mkdir()
                self._created.insert(0, folder)
            _clean_stale(self.path.parent)
            self.staging = self._sibling("tmp")
            self.staging.mkdir()  # mode 0o777 & ~umask
        except OSError as exc:
            self.__exit__(None, None, None)
            raise UsageError(f"output '{self.path}': cannot create a folder in '{parent}': {exc.strerror or exc}") from None
        return self

    def _sibling(self, kind: str) -> Path:
        assert self.path is not None
        return self.path.parent / f".{self.path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"

    def commit(self) -> None:
        """Rename the staging folder into place (replacing the old artifact: aside, in, delete)."""
        if self.path is None or self.staging is None:
            return
        try:
            if self.path.exists() or self.path.is_symlink():
                self._check_replaceable()  # it may have changed while we compiled
                aside = self._sibling("old")
                os.rename(self.path, aside)
                os.rename(self.staging, self.path)
                self.staging = None
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.rename(self.staging, self.path)
                self.staging = None
        except OSError as exc:
            raise UsageError(f"output '{self.path}': cannot move the artifact into place: {exc.strerror or exc}") from None
        self._created = []

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self.staging is not None:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            for folder in self._created:  # deepest first; stops at one that is not empty any more
                try:
                    folder.rmdir()
                except OSError:
                    break
            self._created = []
        finally:
            self._restore_signals()

    # -- signals -------------------------------------------------------------------------

    def _catch_signals(self) -> None:
        """SIGTERM/SIGHUP leave like SIGINT does (an exception, so the cleanup runs), where their action is the default."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                self._signals[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._restore_signals()  # a second signal acts at once
        raise Terminated(signum)

    def _restore_signals(self) -> None:
        while self._signals:
            sig, previous = self._signals.popitem()
            signal.signal(sig, previous)


def _clean_stale(parent: Path) -> None:
    """Remove staging folders of dead processes in ``parent``; put back an old artifact a dead process left aside."""
    for entry in parent.iterdir():
        m = _TEMP.match(entry.name)
        if m is None or not entry.is_dir() or entry.is_symlink() or _alive(int(m["pid"])):
            continue
        destination = parent / m["name"]
        if m["kind"] == "old" and not (destination.exists() or destination.is_symlink()):
            os.rename(entry, destination)
        else:
            shutil.rmtree(entry, ignore_errors=True)
