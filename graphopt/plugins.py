"""Plugin discovery: built-ins and third-party plugins go through the same door.

A plugin is a Python module. Loading it imports it and registers every
:class:`~graphopt.pipeline.PassSpec` (made by ``@register_pass``) and
:class:`~graphopt.targets.TargetSpec` (made by ``register_target``) found in its
namespace. Plugins come from the entry-point group ``graphopt.plugins`` (graphopt's own
passes and backends are declared there too) and from ``--plugin FILE_OR_MODULE``.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from graphopt.errors import PluginError
from graphopt.pipeline import PassRegistry, PassSpec
from graphopt.targets import TargetRegistry, TargetSpec

__all__ = ["PluginHost", "default_host", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "graphopt.plugins"


def _where(exc: BaseException, near: str | None = None) -> str:
    """The innermost traceback frame in the plugin's own file (or the innermost one)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if near:
        mine = [f for f in frames if Path(f.filename).resolve() == Path(near).resolve()]
        frames = mine or frames
    if not frames:
        return ""
    f = frames[-1]
    return f" (at {f.filename}:{f.lineno})"


class PluginHost:
    """The passes and targets one compile can see."""

    def __init__(self) -> None:
        self.passes = PassRegistry()
        self.targets = TargetRegistry()
        self.loaded: list[str] = []

    def register_module(self, module: ModuleType, origin: str) -> int:
        """Register every pass and target a module defines; returns how many."""
        count = 0
        for value in list(vars(module).values()):
            if isinstance(value, PassSpec):
                self.passes.register(value, origin)
                count += 1
            elif isinstance(value, TargetSpec):
                self.targets.register(value, origin)
                count += 1
        self.loaded.append(origin)
        return count

    def load(self, spec: str) -> ModuleType:
        """Load ``path/to/file.py`` or an importable ``package.module``."""
        looks_like_path = spec.endswith(".py") or "/" in spec or "\\" in spec
        if looks_like_path:
            return self._load_file(Path(spec))
        try:
            module = importlib.import_module(spec)
        except ModuleNotFoundError as exc:
            if exc.name and spec.startswith(exc.name):
                raise PluginError(f"plugin '{spec}': no such module or file") from None
            raise PluginError(f"plugin '{spec}' failed to import: {type(exc).__name__}: {exc}{_where(exc)}") from None
        except Exception as exc:
            raise PluginError(f"plugin '{spec}' failed to import: {type(exc).__name__}: {exc}{_where(exc)}") from None
        self._register(module, f"plugin module '{spec}'")
        return module

    def _load_file(self, path: Path) -> ModuleType:
        if not path.is_file():
            raise PluginError(f"plugin file '{path}' does not exist")
        name = f"graphopt_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise PluginError(f"plugin file '{path}' is not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise PluginError(
                f"plugin '{path}' failed to import: {type(exc).__name__}: {exc}{_where(exc, str(path))}"
            ) from None
        self._register(module, f"plugin file '{path}'")
        return module

    def _register(self, module: ModuleType, origin: str) -> None:
        if self.register_module(module, origin) == 0:
            raise PluginError(
                f"{origin} defines no pass or target (decorate a function with @graphopt.register_pass "
                f"or assign graphopt.register_target(...) to a module-level name)"
            )

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every plugin declared in the entry-point group (built-ins included)."""
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                module = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin '{ep.name}' ({ep.value}) from package '{dist}' failed to import: "
                    f"{type(exc).__name__}: {exc}{_where(exc)}"
                ) from None
            if not isinstance(module, ModuleType):
                raise PluginError(f"entry point '{ep.name}' ({ep.value}) from package '{dist}' must name a module")
            self._register(module, f"entry point '{ep.name}' of package '{dist}'")


_DEFAULT: PluginHost | None = None


def default_host() -> PluginHost:
    """The host with every installed plugin loaded (built on first use, then cached)."""
    global _DEFAULT
    if _DEFAULT is None:
        host = PluginHost()
        host.load_entry_points()
        _DEFAULT = host
    return _DEFAULT
