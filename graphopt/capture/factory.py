"""``pkg.module:callable`` sources: import the module (the current directory is
importable), call the factory with no arguments, and trace the model it returns."""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from graphopt.capture.common import choices_of_callables, cwd_on_path, first_line, where
from graphopt.capture.module import copy_for_inference, program_from_module
from graphopt.errors import CaptureError
from graphopt.program import Program

__all__ = ["FACTORY_PATTERN", "is_factory_spec", "build_from_factory", "from_factory"]

#: ``pkg.module:callable`` (the callable may be a dotted attribute path, ``mod:Class.build``)
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_factory_spec(text: str) -> bool:
    return bool(FACTORY_PATTERN.match(text))


def _import(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):
        stem = module_name[:-3].replace(os.sep, ".").replace("/", ".")
        raise CaptureError(f"'{spec}': name the module, not the file: '{stem}:{spec.split(':', 1)[1]}'")
    with cwd_on_path():
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise CaptureError(
                    f"'{spec}': no module named '{exc.name}' (looked in the current directory "
                    f"{os.getcwd()} and on sys.path)"
                ) from exc
            raise CaptureError(f"'{spec}': importing '{module_name}' failed{where(exc)}: ModuleNotFoundError: {first_line(exc)}") from exc
        except SyntaxError as exc:
            loc = f" at {exc.filename}:{exc.lineno}" if exc.filename else ""
            raise CaptureError(f"'{spec}': importing '{module_name}' failed{loc}: SyntaxError: {exc.msg}") from exc
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"'{spec}': importing '{module_name}' failed{where(exc)}: {type(exc).__name__}: {first_line(exc)}") from exc


def build_from_factory(spec: str) -> tuple[nn.Module, bool]:
    """Import ``pkg.module`` and call ``callable()``; the result must be an nn.Module.

    Returns the model and whether the factory made it (False when ``spec`` names a model
    object held by the module, which must then not be modified).
    """
    module_name, _, attr_path = spec.partition(":")
    module = _import(spec, module_name)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            defined = choices_of_callables(module)
            raise CaptureError(
                f"'{spec}': module '{module_name}' ({getattr(module, '__file__', '?')}) has no attribute "
                f"'{attr_path}'; callables defined there: {defined}"
            ) from exc
    if isinstance(obj, nn.Module):
        return obj, False
    if not callable(obj):
        raise CaptureError(f"'{spec}' is a {type(obj).__name__}, not a callable that returns a torch.nn.Module")
    with cwd_on_path():
        try:
            model = obj()
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(f"'{spec}' raised {type(exc).__name__}{where(exc)}: {first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise CaptureError(f"{spec} returned {type(model).__name__}, expected a torch.nn.Module")
    return model, True


def from_factory(
    spec: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
    weights: str | os.PathLike[str] | None,
) -> Program:
    """Capture ``pkg.module:callable``; ``weights`` is a state_dict file to load first."""
    label = f"'{spec}'"
    built, _ = build_from_factory(spec)
    # always a copy: a factory may hand out a model it keeps (a cache, a module-level singleton)
    model = copy_for_inference(built, label)[0]
    if weights is not None:
        from graphopt.capture.weights import load_weights

        load_weights(model, weights, label)
    meta: dict[str, Any] = {"source": spec, "source_kind": "factory"}
    return program_from_module(
        model, label, meta, input_shapes=input_shapes, example_inputs=example_inputs,
        missing_hint="pass --input-shape, e.g. --input-shape 1x3x224x224",
    )
