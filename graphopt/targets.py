"""Targets: a name that picks a backend, a precision and a default pipeline.

Backends declare their targets with :func:`register_target` at module level; the module
is loaded as a plugin (entry-point group ``graphopt.plugins``), exactly like a third-party
one. A backend turns a Program into an :class:`Artifact` and loads saved artifacts back.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import torch

from graphopt.errors import ArtifactError, BackendUnavailableError, UsageError, choices, first_line
from graphopt.program import MAX_INPUT_BYTES, InputSpec, Program, input_bytes, size_text
from graphopt.registry import Registry

if TYPE_CHECKING:
    from torch.fx import GraphModule

__all__ = [
    "Artifact",
    "Backend",
    "BackendOption",
    "options_of",
    "TargetSpec",
    "TargetRegistry",
    "register_target",
    "MANIFEST",
    "read_manifest",
    "manifest_inputs",
]

MANIFEST = "artifact.json"
ARTIFACT_FORMAT = "graphopt-artifact/1"


class Artifact(ABC):
    """A lowered model: callable, saveable, loadable again by its backend.

    A backend sets ``target``, ``precision`` and ``input_specs``. The three attributes
    after them are optional: the defaults say "not known", and an int8 backend that can
    tell more overrides them (plain attributes or properties) so that
    :func:`graphopt.quant.verify_int8` holds it to a tighter check.
    """

    target: str
    precision: str
    input_specs: list[InputSpec]

    #: True when the simulated-int8 program this artifact was lowered from computes what
    #: its kernels compute, bit for bit (the backend modelled every quantized op's
    #: arithmetic): the compile then also holds the end-to-end outputs to 2 quantization
    #: steps, not only each op. False: only the per-op check gates (where ``points`` exist).
    exact_simulation: bool = False

    #: An fx graph that runs the artifact with intermediate quantized values exposed (the
    #: lowered graph itself for cpu-int8, a probe around the session for ONNX Runtime);
    #: None when the backend cannot expose them. Used with :attr:`points`.
    graph_module: GraphModule | None = None

    #: Simulated quantizer node name -> the node of :attr:`graph_module` that holds the
    #: same quantized value. With both set, every quantized op is checked against its own
    #: output steps, fed the artifact's own inputs (``check_lowering_local``). Empty: only
    #: the end-to-end check applies.
    points: Mapping[str, str] = MappingProxyType({})

    #: Output steps added to the per-op bound of every quantized op (``verify_int8``), where the
    #: backend runs the arithmetic around its int8 ops in a lower float precision on purpose
    #: (OpenVINO's ``--float-precision bf16``: its module doc has the measurements). 0: the usual bound.
    extra_steps: float = 0.0

    #: The intra-op CPU threads it runs with (``--threads``; :mod:`graphopt.threads`); None for
    #: an artifact that does not run on the CPU.
    threads: int | None = None
    #: Whether the manifest records :attr:`threads`. The compiler clears it when no
    #: ``--threads`` was given: the artifact then runs on the cores of whichever machine loads
    #: it, not on the build machine's count.
    threads_pinned: bool = True

    #: (verification inputs, the original's outputs on them), set by the compiler before the
    #: artifact is saved. A backend whose artifact is finished on another machine (TensorRT's
    #: engine) saves them and checks itself against them there; others ignore them.
    goldens: tuple[Sequence[Any], Sequence[Any]] | None = None

    @property
    def report_extra(self) -> dict[str, Any]:
        """What the backend adds to the compile report (``report.extra``), e.g. TensorRT's per-layer precision."""
        return {}

    @abstractmethod
    def run(self, *inputs: torch.Tensor) -> Any:
        """Run on CPU tensors; returns what the original model returns."""

    def __call__(self, *inputs: torch.Tensor) -> Any:
        return self.run(*inputs)

    @abstractmethod
    def save_files(self, directory: Path) -> dict[str, Any]:
        """Write the backend's files into ``directory``; return extra manifest fields.

        Name every file or folder written in ``"files"`` (the manifest's list): ``--force``
        replaces a folder only when it holds nothing else.
        """

    def save(self, directory: str | Path) -> Path:
        """Write the artifact and its manifest (``artifact.json``) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        extra = self.save_files(directory)
        manifest = {
            "format": ARTIFACT_FORMAT,
            "target": self.target,
            "precision": self.precision,
            "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).replace("torch.", "")} for s in self.input_specs],
            **({"threads": self.threads} if self.threads is not None and self.threads_pinned else {}),
            **extra,
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return directory


@dataclass(frozen=True)
class BackendOption:
    """An option a backend takes: ``--NAME VALUE`` on the command line, ``backend_options={NAME: VALUE}`` in Python.

    ``choices`` (a closed set of strings) or ``type`` (``str``, ``int``, ``float``, or ``bool``:
    a flag without a value) says what is valid; ``default`` None means the backend decides
    (say how in ``help``).
    """

    name: str
    help: str
    type: type = str
    choices: tuple[str, ...] = ()
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def is_flag(self) -> bool:
        return self.type is bool

    def type_text(self) -> str:
        return "|".join(self.choices) if self.choices else ("flag" if self.is_flag else self.type.__name__)

    def convert(self, value: Any, target: str) -> Any:
        """``value`` (text from the command line, or a Python value) checked and converted; UsageError if invalid."""
        if self.choices:
            if value not in self.choices:
                raise UsageError(f"{self.flag} {value!r} for target '{target}': not one of {choices(self.choices)}")
            return value
        if self.is_flag:
            if not isinstance(value, bool):
                raise UsageError(f"{self.flag} {value!r} for target '{target}': a flag takes no value (True or False in Python)")
            return value
        if isinstance(value, str) and self.type is not str:
            try:
                value = self.type(value)
            except ValueError:
                raise UsageError(f"{self.flag} {value!r} for target '{target}': expected {self.type.__name__}") from None
        if not isinstance(value, self.type) or isinstance(value, bool):
            raise UsageError(f"{self.flag} {value!r} for target '{target}': expected {self.type.__name__}")
        return value

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "flag": self.flag, "type": self.type_text(), "default": self.default, "help": self.help}


class Backend(Protocol):
    name: str
    #: the options this backend takes (``BackendOption``); a backend without the attribute takes none
    options: Sequence[BackendOption]
    #: True: it runs on the CPU and honours ``--threads`` (:mod:`graphopt.threads`); absent means False
    cpu_threads: bool

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the backend, else why not (one line).

        A backend that can do part of its work without its hardware may also define
        ``unavailable_reason_for(options)``: the same question for a compile with these
        backend options, or for loading an artifact whose manifest recorded them
        (``"backend_options"``), e.g. TensorRT's ``defer_engine``.
        """

    def lower(self, program: Program, target: "TargetSpec") -> Artifact:
        """Turn an optimized program into an artifact."""

    def load(self, directory: Path, manifest: dict[str, Any], target: "TargetSpec") -> Artifact:
        """Load an artifact saved by this backend."""


@dataclass(frozen=True)
class TargetSpec:
    name: str
    backend: Backend
    precision: str
    pipeline: str
    doc: str
    source: str = field(default="", compare=False)

    def check_available(self, options: Mapping[str, Any] | None = None) -> None:
        """BackendUnavailableError unless this machine can compile with (or load an artifact made with) ``options``."""
        for_options = getattr(self.backend, "unavailable_reason_for", None)
        reason = for_options(dict(options or {})) if for_options is not None else self.backend.unavailable_reason()
        if reason:
            raise BackendUnavailableError(f"target '{self.name}' cannot run here: {reason}")

    def backend_options(self, given: Mapping[str, Any], registry: Sequence["TargetSpec"] = ()) -> dict[str, Any]:
        """``given`` checked against the options this target's backend declares, converted.

        An option it does not declare is a UsageError naming its valid options (and, from
        ``registry``, the targets that do take it).
        """
        declared = {o.name: o for o in options_of(self.backend)}
        for name in given:
            if name not in declared:
                flag = BackendOption(name, "").flag
                takers = [t.name for t in registry if any(o.name == name for o in options_of(t.backend))]
                where = f"; targets that take it: {', '.join(takers)}" if takers else ""
                valid = ", ".join(o.flag for o in declared.values()) or "none"
                raise UsageError(f"{flag} does not apply to target '{self.name}' (its options: {valid}){where}")
        return {name: declared[name].convert(value, self.name) for name, value in given.items() if value is not None}


def options_of(backend: Backend) -> tuple[BackendOption, ...]:
    """The options a backend declares (none when it has no ``options`` attribute)."""
    return tuple(getattr(backend, "options", ()))


def register_target(name: str, *, backend: Backend, precision: str, pipeline: str, doc: str) -> TargetSpec:
    """Declare a target; assign it to a module-level name in a plugin module."""
    source = f"{type(backend).__module__}.{type(backend).__qualname__}"
    return TargetSpec(name, backend, precision, pipeline, doc, source=source)


class TargetRegistry(Registry[TargetSpec]):
    def __init__(self) -> None:
        super().__init__("target", UsageError)


def read_json_document(path: Path, fmt: str, what: str) -> dict[str, Any]:
    """A JSON object whose ``format`` is ``fmt`` (a manifest, a graph file); otherwise one-line ArtifactError."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"'{path}' is unreadable: {first_line(exc)}") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"'{path}' holds a JSON {type(doc).__name__}, not {what}")
    if doc.get("format") != fmt:
        raise ArtifactError(f"'{path}' has format {doc.get('format')!r}, expected '{fmt}'")
    return doc


def read_manifest(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise ArtifactError(f"artifact folder '{directory}' does not exist")
    if not path.is_file():
        raise ArtifactError(f"'{directory}' is not a graphopt artifact: {MANIFEST} is missing")
    manifest = read_json_document(path, ARTIFACT_FORMAT, "a graphopt artifact manifest")
    for key in ("target", "precision"):
        if not isinstance(manifest.get(key), str):
            raise ArtifactError(f"'{path}': '{key}' is {manifest.get(key)!r}, expected a name")
    _check_inputs(manifest.get("inputs"), path)
    return manifest


def manifest_inputs(manifest: dict[str, Any]) -> list[InputSpec]:
    """The input specs of a manifest that :func:`read_manifest` checked."""
    return [InputSpec(i["name"], tuple(i["shape"]), getattr(torch, i["dtype"])) for i in manifest["inputs"]]


#: The input dtypes a manifest may name (what ``Artifact.save`` writes for the inputs graphopt captures).
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")


def _check_inputs(inputs: Any, path: Path) -> None:
    """The manifest's ``inputs``: a non-empty list of {name, shape, dtype}, checked before any backend reads them."""
    if not isinstance(inputs, list) or not inputs:
        raise ArtifactError(f"'{path}': 'inputs' is {inputs!r}, expected a list of {{name, shape, dtype}}")
    for i, item in enumerate(inputs):
        where = f"'{path}': input {i}"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ArtifactError(f"{where} is {item!r}, expected {{name, shape, dtype}}")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ArtifactError(f"{where} ('{item['name']}') has shape {shape!r}, expected a list of positive ints")
        if input_bytes(shape) > MAX_INPUT_BYTES:
            raise ArtifactError(f"{where} ('{item['name']}') has shape {shape}: {size_text(input_bytes(shape))}, "
                                f"over graphopt's {size_text(MAX_INPUT_BYTES)} limit per input")
        if item.get("dtype") not in INPUT_DTYPES:
            raise ArtifactError(f"{where} ('{item['name']}') has dtype {item.get('dtype')!r}; valid: {choices(INPUT_DTYPES)}")
