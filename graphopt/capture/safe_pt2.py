"""Read a ``torch.export`` archive (``.pt2``) without letting it run code.

``torch.export.load`` trusts its file: it unpickles weights and constants marked
``use_pickle`` with ``weights_only=False``, falls back to ``weights_only=False`` for
sample inputs, ``pickle.loads`` opaque constants, resolves node targets by ``getattr``
from ``torch`` (``torch.serialization.os.system`` is a valid target), hands symbolic
expressions to ``sympy.sympify`` (an ``eval``) and ``exec``s the archive's guard code
in ``ExportedProgram.module()``. So the archive is checked first, in memory, and only
the same bytes are then loaded:

- every member is one ``torch.export.save`` writes (no AOTInductor libraries, no custom
  or opaque objects, no legacy pickles), every payload is a raw tensor;
- every node calls an ATen operator without file or text arguments, or an
  ``operator`` arithmetic function; every symbolic expression is plain arithmetic over
  sympy constructors; guards compare input sizes only;
- the sample inputs load with ``weights_only=True``; torch is held to weights-only
  loads while it reads the archive; the module is built with ``check_guards=False``.

Anything else is refused with one line naming the member, node or expression.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import operator
import os
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.fx

from graphopt.capture.common import first_line
from graphopt.errors import GraphoptError

__all__ = ["load_pt2", "module_of", "allowed_target"]

_MEMBERS = re.compile(
    r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|extra/[^/]+"
    r"|models/\w+\.json|data/sample_inputs/\w+\.pt"
    r"|data/weights/weight_\d+|data/weights/\w+_weights_config\.json"
    r"|data/constants/tensor_\d+|data/constants/\w+_constants_config\.json"
)
_PAYLOAD = re.compile(r"(weight|tensor)_\d+")

#: ``_operator`` functions an export graph uses for getitem and symbolic-size arithmetic.
OPERATOR_FUNCTIONS = frozenset("getitem add sub mul floordiv truediv mod neg pow eq ne lt le gt ge".split())
#: ATen string arguments that select a variant; any other string argument (a file name,
#: a message to print) keeps the operator out.
_STR_ARGS = frozenset(
    "rounding_mode approximate padding padding_mode reduce reduction side equation norm pad_mode indexing interpolation "
    "mode assert_msg padding_side".split()
)
_ATEN = re.compile(r"torch\.ops\.aten\.([a-z_][a-z0-9_]*)\.([A-Za-z0-9_]+)")

_SYMPY_CALLS = frozenset(
    "Symbol Integer Float Rational Add Mul Pow Mod Max Min Abs Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan "
    "StrictGreaterThan LessThan GreaterThan And Or Not floor ceiling FloorDiv ModularIndexing Where PythonMod CleanDiv "
    "CeilToInt FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat Identity".split()
)
_SYMPY_NAMES = frozenset("oo zoo nan true false".split())
_SYMBOL = re.compile(r"[a-z]{1,3}\d+")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXPR_NODES = (ast.Expression, ast.Call, ast.Name, ast.Load, ast.Constant, ast.keyword, ast.BinOp, ast.UnaryOp,
               ast.Compare, ast.BoolOp, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub,
               ast.UAdd, ast.Not, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.And, ast.Or)
_GUARD = re.compile(r"(?:\s+|L\['[A-Za-z_]\w*'\](?:\.size\(\)\[\d+\])?|\d+|==|!=|>=|<=|<|>|\+|-|\*|//|%|\(|\)|and|or|not)+")


def _aten_allowed(name: str, overload: str) -> bool:
    if name.startswith("__"):
        return False
    wanted = "" if overload == "default" else overload
    for schema in torch._C._jit_get_schemas_for_operator(f"aten::{name}"):
        if schema.overload_name == wanted:
            return all(str(a.type) not in ("str", "Optional[str]", "str?") or a.name in _STR_ARGS for a in schema.arguments)
    return False


def allowed_target(text: str) -> bool:
    """Whether an export graph's serialized node target is one graphopt will load."""
    found = _ATEN.fullmatch(text)
    if found is not None:
        return _aten_allowed(found.group(1), found.group(2))
    prefix, _, name = text.partition(".")
    return prefix == "_operator" and name in OPERATOR_FUNCTIONS


def _safe_expr(text: str) -> bool:
    """A sympy expression as torch.export prints it (``srepr``): constructors, numbers, arithmetic."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
            return False
        if isinstance(node, ast.Name) and not (node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or _SYMBOL.fullmatch(node.id)):
            return False
        if isinstance(node, ast.keyword) and (node.arg is None or not isinstance(node.value, ast.Constant)):
            return False
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _IDENT.fullmatch(node.value):
            return False
        if isinstance(node, ast.Constant) and not isinstance(node.value, (str, int, float, bool)):
            return False
    return True


def _walk(obj: Any, key: str | None = None) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)
    elif key is not None:
        yield key, obj


class _Checker:
    def __init__(self, zf: zipfile.ZipFile, label: str, error: type[GraphoptError]) -> None:
        self.zf, self.label, self.error = zf, label, error

    def refuse(self, why: str) -> GraphoptError:
        return self.error(f"{self.label}: {why}; graphopt loads only what torch.export.save writes for plain tensor programs")

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.zf.read(name))
        except ValueError as exc:
            raise self.refuse(f"'{name}' is not valid JSON ({first_line(exc)})") from None

    def check(self) -> None:
        names = self.zf.namelist()
        if len(set(names)) != len(names):
            raise self.refuse("the archive holds the same member twice")
        prefixes = {n.split("/", 1)[0] for n in names}
        if len(prefixes) != 1 or any("/" not in n for n in names):
            raise self.refuse("the archive is not one torch.export folder")
        for name in names:
            rel = name.split("/", 1)[1]
            if not _MEMBERS.fullmatch(rel):
                raise self.refuse(f"it holds '{rel}', which is no part of a plain torch.export archive")
            if rel.endswith(("_weights_config.json", "_constants_config.json")):
                self.check_payloads(name)
            elif rel.startswith("models/"):
                self.check_model(name)
            elif rel.startswith("data/sample_inputs/"):
                self.check_tensors(name)

    def check_payloads(self, name: str) -> None:
        config = self.json(name).get("config")
        if not isinstance(config, dict):
            raise self.refuse(f"'{name}' has no payload table")
        for fqn, meta in config.items():
            if not isinstance(meta, dict) or meta.get("use_pickle") or not _PAYLOAD.fullmatch(str(meta.get("path_name"))):
                raise self.refuse(f"'{fqn}' in '{name}' is a pickled object, not a raw tensor")

    def check_model(self, name: str) -> None:
        doc = self.json(name)
        for guard in doc.get("guards_code") or []:
            if not (isinstance(guard, str) and _GUARD.fullmatch(guard)):
                raise self.refuse(f"its guard {str(guard)[:80]!r} is not a comparison of input sizes")
        for key, value in _walk(doc):
            if key == "target" and isinstance(value, str) and not allowed_target(value):
                raise self.refuse(f"a node calls {value[:80]!r}, which is not an ATen operator graphopt allows")
            if key == "expr_str" and not (isinstance(value, str) and _safe_expr(value)):
                raise self.refuse(f"the symbolic expression {str(value)[:80]!r} is not plain arithmetic")

    def check_tensors(self, name: str) -> None:
        try:
            torch.load(io.BytesIO(self.zf.read(name)), weights_only=True)
        except Exception as exc:  # noqa: BLE001 - weights-only unpickling refuses anything but tensors
            raise self.refuse(f"'{name}' holds pickled objects, not just tensors ({first_line(exc)})") from None


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every torch.load inside torch.export.load is weights-only, whatever it asks for."""
    saved = {k: os.environ.pop(k, None) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def _check_graph(exported: torch.export.ExportedProgram, label: str, error: type[GraphoptError]) -> None:
    """After loading: every call is an ATen OpOverload or an allowed operator function."""
    for gm in exported.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            t = node.target
            ok = node.op == "call_function" and (
                (isinstance(t, torch._ops.OpOverload) and t.namespace == "aten")
                or any(t is getattr(operator, n) for n in OPERATOR_FUNCTIONS)
            )
            if not ok:
                raise error(f"{label}: node '{node.name}' calls {t!r}, which is not an ATen operator graphopt allows")


def load_pt2(path: Path, label: str, error: type[GraphoptError]) -> torch.export.ExportedProgram:
    """The ExportedProgram in ``path``, checked so that loading and running it cannot run other code."""
    try:
        data = Path(path).read_bytes()
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise error(f"{label} is not a readable torch.export archive: not a complete zip archive (truncated or corrupt)") \
            from None
    except OSError as exc:
        raise error(f"{label} cannot be read: {first_line(exc)}") from None
    with zf:
        _Checker(zf, label, error).check()
    try:
        with _weights_only_loads():
            exported = torch.export.load(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001
        raise error(f"{label} is not a readable torch.export archive: {first_line(exc)}") from None
    _check_graph(exported, label, error)
    return exported


def module_of(exported: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``exported.module()`` without the guard function torch builds by ``exec``-ing archive text."""
    return exported.module(check_guards=False)
