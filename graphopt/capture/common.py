"""What every frontend shares: one-line error text, the user's code location, input
shapes, the archive sniffer, and ``finish()`` which checks the inputs against the graph
and turns a traced ``GraphModule`` into a shape-propagated :class:`Program`.
"""

from __future__ import annotations

import contextlib
import keyword
import os
import re
import sys
import traceback
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.capture.leaves import resolve_leaf_functions
from graphopt.errors import CaptureError, choices, first_line
from graphopt.fx_util import describe
from graphopt.program import MAX_INPUT_BYTES, InputSpec, Program, ShapeProp, flatten_outputs, input_bytes, size_text

__all__ = [
    "KNOWN_FORMATS",
    "first_line",
    "user_frame",
    "where",
    "shape_text",
    "check_shapes",
    "too_big",
    "model_input_shapes",
    "cwd_on_path",
    "state_dict_of",
    "sniff_archive",
    "sanitize_name",
    "choices_of_callables",
    "finish",
    "Reference",
]

#: How the unknown-format message lists what graphopt reads.
KNOWN_FORMATS = "graphopt reads .pt2 (torch.export), .pt/.pth (PyTorch, TorchScript), .onnx, pkg.module:callable, zoo:NAME"

_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_CAPTURE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
def _display_path(filename: str) -> str:
    rel = os.path.relpath(filename) if os.path.isabs(filename) else filename
    return filename if rel.startswith("..") else rel


def user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    """The innermost traceback frame of ``exc`` in the user's code.

    Frames inside torch, inside graphopt's capture package, and in generated code
    (``<eval_with_key>``, ``<frozen importlib...>``) are skipped.
    """
    found = None
    for frame in traceback.extract_tb(exc.__traceback__):
        name = os.path.abspath(frame.filename) if not frame.filename.startswith("<") else frame.filename
        if name.startswith("<") or name.startswith(_TORCH_DIR) or name.startswith(_CAPTURE_DIR):
            continue
        found = frame
    return found


def where(exc: BaseException) -> str:
    """``" at models.py:12 (`if x.sum() > 0:`)"`` for the user's frame, or ``""``."""
    frame = user_frame(exc)
    if frame is None:
        return ""
    code = f" (`{frame.line.strip()}`)" if frame.line and frame.line.strip() else ""
    return f" at {_display_path(frame.filename)}:{frame.lineno}{code}"


def shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def too_big(shape: Sequence[int]) -> str | None:
    """Why an input of ``shape`` (float32) is refused before allocation, or None when it fits."""
    size = input_bytes(shape)
    if size <= MAX_INPUT_BYTES:
        return None
    return (f"an input of shape {shape_text(shape)} would take {size_text(size)} as float32; "
            f"graphopt refuses inputs over {size_text(MAX_INPUT_BYTES)} each")


def check_shapes(shapes: Sequence[Any], label: str) -> list[tuple[int, ...]]:
    """Validate user-given input shapes (tuples of positive ints, or '1x3x8x8' text)."""
    from graphopt.capture import parse_shape  # the package's public parser

    out: list[tuple[int, ...]] = []
    if isinstance(shapes, str) or (isinstance(shapes, Sequence) and shapes and isinstance(shapes[0], int)):
        shapes = [shapes]  # a single shape given bare
    for shape in shapes:
        if isinstance(shape, str):
            out.append(parse_shape(shape))
            continue
        try:
            dims = tuple(int(d) for d in shape)
            ok = bool(dims) and all(d > 0 and d == e for d, e in zip(dims, shape))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise CaptureError(f"input shape {shape!r} for {label} is invalid: expected a tuple of positive ints, like (1, 3, 224, 224)")
        if too_big(dims):
            raise CaptureError(f"input shape {shape_text(dims)} for {label}: {too_big(dims)}")
        out.append(dims)
    if not out:
        raise CaptureError(f"no input shapes were given for {label}; pass at least one, like (1, 3, 224, 224)")
    return out


def model_input_shapes(model: torch.nn.Module, label: str) -> list[tuple[int, ...]] | None:
    """Shapes from an ``example_input_shape`` attribute (one shape, or a tuple of shapes)."""
    shape = getattr(model, "example_input_shape", None)
    if shape is None:
        return None
    if isinstance(shape, Sequence) and shape and all(isinstance(s, Sequence) and not isinstance(s, str) for s in shape):
        return check_shapes(list(shape), f"{label} (its example_input_shape attribute)")
    return check_shapes([shape], f"{label} (its example_input_shape attribute)")


@contextlib.contextmanager
def cwd_on_path() -> Iterator[None]:
    """Make the current working directory importable for the duration of the block."""
    import importlib

    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for k, v in obj.items() if not k.endswith("_extra_state"))
    )


def state_dict_of(obj: Any) -> Mapping[str, torch.Tensor] | None:
    """``obj`` if it is a state dict, the one it wraps (``{"state_dict": ...}``,
    ``{"model": ...}``), or None."""
    if _is_tensor_mapping(obj) and obj:
        return obj
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and _is_tensor_mapping(obj[key]):
                return obj[key]
    if _is_tensor_mapping(obj):  # empty
        return obj
    return None


def sniff_archive(path: Path) -> str:
    """What a file is, judged cheaply from its zip directory without unpickling anything.

    One of ``"torchscript"``, ``"export"`` (a torch.export .pt2), ``"torch-save"`` (a
    torch.save zip), ``"zip"`` (some other zip) or ``"not-zip"`` (legacy torch.save,
    truncated or corrupt).
    """
    try:
        if not zipfile.is_zipfile(path):
            return "not-zip"
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return "not-zip"
    if any("/code/" in n or n.endswith("constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or ("/models/" in n and n.endswith(".json")) for n in names):
        return "export"
    if any(n.endswith("data.pkl") for n in names):
        return "torch-save"
    return "zip"


def sanitize_name(name: str) -> str:
    """A dotted module path whose parts are usable attribute names."""
    parts = []
    for part in name.split("."):
        part = re.sub(r"\W", "_", part)
        if not part:
            continue
        if keyword.iskeyword(part):
            part += "_"
        parts.append(part)
    return ".".join(parts)


def choices_of_callables(module: Any) -> str:
    """The public functions and classes a module defines, formatted as choices."""
    name = getattr(module, "__name__", None)
    return choices(
        n for n, v in vars(module).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == name
    )


class Reference:
    """Runs the original of a file source in its own runtime (``Program.reference``); ``runtime`` names it.

    Shared, never copied, by ``Program.clone()``: it holds a session or a ScriptModule, not graph state.
    """

    runtime = "the captured graph"

    def __deepcopy__(self, memo: dict) -> "Reference":
        return self


# --------------------------------------------------------------------------- finishing


class _NodeRecorder(ShapeProp):
    """Runs the graph, filling ``tensor_meta`` as it goes, and remembers which node it is on, to name the one that fails."""

    current: torch.fx.Node | None = None

    def run_node(self, n: torch.fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def _shapes_phrase(inputs: Sequence[torch.Tensor]) -> str:
    texts = [shape_text(t.shape) for t in inputs]
    if len(texts) == 1:
        return f"input shape {texts[0]} does not fit"
    return f"input shapes {', '.join(texts)} do not fit"


def _run(model: torch.nn.Module, inputs: Sequence[torch.Tensor], label: str, times: int) -> list[list[torch.Tensor]]:
    runs = []
    try:
        with torch.no_grad():
            for _ in range(times):
                runs.append(flatten_outputs(model(*(t.clone() for t in inputs))))
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"{label} failed when run on its example inputs{where(exc)}: {type(exc).__name__}: {first_line(exc)}") from exc
    return runs


def check_deterministic(model: torch.nn.Module, inputs: Sequence[torch.Tensor], label: str,
                        first: list[torch.Tensor] | None = None) -> None:
    """Run ``model`` twice on copies of the same inputs; a CaptureError when the outputs differ.

    ``first``: the (flattened) outputs of a run of ``model`` on these inputs already made; then
    it runs once more only. A model that draws random numbers in ``forward`` (``torch.randn``,
    dropout with ``training=True``) cannot be verified: the comparison would measure the noise,
    or the trace would freeze one draw and "verify" something the model never computes.
    """
    a, b = [first, *_run(model, inputs, label, 1)] if first is not None else _run(model, inputs, label, 2)
    same = len(a) == len(b) and all(
        x.shape == y.shape and torch.allclose(x.double(), y.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
        for x, y in zip(a, b)
    )
    if not same:
        raise CaptureError(
            f"{label} is nondeterministic: two runs on the same input give different outputs; graphopt can only "
            "verify a deterministic model: put it in eval mode and remove randomness from forward "
            "(torch.randn/rand, dropout with training=True)"
        )


def finish(
    gm: torch.fx.GraphModule,
    label: str,
    meta: dict[str, Any],
    *,
    shapes: Sequence[tuple[int, ...]] | None = None,
    example_inputs: Sequence[torch.Tensor] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    given_as: str = "--input-shape",  # or "example input"
    original: torch.nn.Module | None = None,
    deterministic_ops: bool = False,
) -> Program:
    """Check the inputs against the graph's placeholders, run the graph once at those
    shapes (naming the node that fails), check that the model returns tensors and is
    deterministic, and return the Program with shapes propagated.

    ``shapes`` become seeded random inputs (``dtypes`` per input, float32 by default);
    ``example_inputs`` are used as given (copied). ``original`` is the eager module the
    graph was traced from: it is the one run twice for the determinism check (tracing
    freezes ``torch.randn(2, 3)``-style noise into a constant, so the graph would look
    deterministic).

    ``deterministic_ops``: the graph was built by a converter none of whose ops draws random
    numbers (the ONNX importer), so the determinism check has nothing to find and is skipped.
    """
    gm.eval()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # placeholders without a default
    given = len(example_inputs) if example_inputs is not None else len(shapes or ())
    if not len(required) <= given <= len(placeholders):
        want = len(required) if given < len(required) else len(placeholders)
        names = ", ".join(str(n.target) for n in (required if given < len(required) else placeholders))
        plural = "input" if want == 1 else "inputs"
        verb = "was" if given == 1 else "were"
        noun = given_as if given == 1 or given_as.startswith("--") else given_as + "s"
        raise CaptureError(f"{label} takes {want} {plural} ({names}) but {given} {noun} {verb} given")

    if example_inputs is not None:
        inputs = tuple(t.detach().clone() for t in example_inputs)
    else:
        generator = torch.Generator().manual_seed(0)
        kinds = list(dtypes) if dtypes is not None else [torch.float32] * given
        inputs = tuple(
            InputSpec(str(p.target), tuple(s), d).random(generator)
            for p, s, d in zip(placeholders, shapes or (), kinds)
        )

    leaves = resolve_leaf_functions(gm, inputs, label)
    recorder = _NodeRecorder(gm)
    try:
        with torch.no_grad():
            first = recorder.run(*(t.clone() for t in inputs))
    except Exception as exc:  # noqa: BLE001 - any failure here is the input's fault or the model's
        node = recorder.current
        at = f"{describe(gm, node, brief=True)} failed" if node is not None else "it failed"
        raise CaptureError(f"{_shapes_phrase(inputs)} {label}: {at}: {first_line(exc.__cause__ or exc)}") from exc
    if not flatten_outputs(first) or not any(t.numel() for t in flatten_outputs(first)):
        raise CaptureError(f"{label} returns no tensor values (it returned {type(first).__name__}); "
                           "graphopt verifies a model by comparing its outputs, so forward must return tensors")
    if not deterministic_ops:  # the graph's run above is the first of the two the check needs (an eager original runs twice)
        check_deterministic(original if original is not None else gm, inputs, label,
                            first=None if original is not None else flatten_outputs(first))

    meta = dict(meta)
    if leaves:
        meta["leaf_functions"] = leaves
    meta["input_shapes"] = [list(t.shape) for t in inputs]
    return Program(gm, inputs, meta)  # shapes were propagated by the run above
