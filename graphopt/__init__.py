"""graphopt: capture a trained model as a graph, optimize it with an ordered pipeline of
passes, lower it to a backend, and prove numerically that it still computes what the
original did.

Public names are imported lazily so that ``graphopt --help`` does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Program",
    "InputSpec",
    "PassResult",
    "register_pass",
    "register_target",
    "Artifact",
    "BackendOption",
    "compile",
    "CompileOptions",
    "CompileResult",
    "load_artifact",
    "capture",
    "GraphoptError",
    "Tolerance",
    "__version__",
]

_LAZY = {
    "Program": "graphopt.program",
    "InputSpec": "graphopt.program",
    "PassResult": "graphopt.pipeline",
    "register_pass": "graphopt.pipeline",
    "register_target": "graphopt.targets",
    "Artifact": "graphopt.targets",
    "BackendOption": "graphopt.targets",
    "compile": "graphopt.compiler",
    "CompileOptions": "graphopt.compiler",
    "CompileResult": "graphopt.compiler",
    "load_artifact": "graphopt.compiler",
    "capture": "graphopt.capture",
    "GraphoptError": "graphopt.errors",
    "Tolerance": "graphopt.verify",
}

if TYPE_CHECKING:
    from graphopt.capture import capture
    from graphopt.compiler import CompileOptions, CompileResult, compile, load_artifact
    from graphopt.errors import GraphoptError
    from graphopt.pipeline import PassResult, register_pass
    from graphopt.program import InputSpec, Program
    from graphopt.targets import Artifact, BackendOption, register_target
    from graphopt.verify import Tolerance


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graphopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
