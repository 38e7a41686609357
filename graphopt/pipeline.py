"""Passes, their registry, textual pipelines and the pass manager.

A pass is a function ``fn(program, *, opt: T = default, ...) -> PassResult`` (or a class
whose ``__init__`` takes the keyword options and whose ``__call__`` takes the program)
decorated with :func:`register_pass`. The decorator does not touch any global state: it
wraps the function in a :class:`PassSpec`; a :class:`PassRegistry` collects specs when
a plugin module is loaded (see ``graphopt.plugins``).

Textual pipelines read like MLIR's::

    fuse-conv-bn-relu,prune-channels{ratio=0.3,importance=l1,skip=[fc]},dce

Option names may be written with ``-`` or ``_``. Values are scalars, ``[a,b]`` lists or
``{key:value}`` mappings, coerced to the option's annotated type.
"""

from __future__ import annotations

import inspect
import time
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from graphopt.errors import GraphoptError, PassError, PipelineError, PluginError, choices
from graphopt.program import Program
from graphopt.registry import Registry

__all__ = [
    "Contract",
    "PassResult",
    "PassSpec",
    "OptionSpec",
    "PassRegistry",
    "PassInvocation",
    "Pipeline",
    "PassRecord",
    "Instrument",
    "PassManager",
    "register_pass",
    "parse_pipeline",
]

Contract = Literal["exact", "approximate"]
CONTRACTS = ("exact", "approximate")


@dataclass
class PassResult:
    """What a pass reports: whether it changed anything, a one-line detail, and data."""

    changed: bool
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# Options


@dataclass(frozen=True)
class OptionSpec:
    """One keyword-only option of a pass, from its signature."""

    name: str
    annotation: Any
    default: Any

    @property
    def text_name(self) -> str:
        return self.name.replace("_", "-")

    def type_text(self) -> str:
        return _type_text(self.annotation)

    def coerce(self, value: Any, where: str) -> Any:
        try:
            return _coerce(value, self.annotation)
        except ValueError as exc:
            raise PipelineError(
                f"{where}: option '{self.text_name}' expects {self.type_text()}, got {_show(value)} ({exc})"
            ) from None


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _type_text(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args if a is not type(None))
    if origin in (list, tuple, Sequence):
        return f"a list of {_type_text(args[0]) if args else 'values'}"
    if origin in (dict,):
        return f"a mapping of name:{_type_text(args[1]) if len(args) > 1 else 'value'}"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(value: Any, tp: Any) -> Any:
    """Coerce a parsed value (str, list or dict of them) to the annotated type."""
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        # Try structured alternatives first so "0.3" does not become a str by accident.
        for alt in sorted(args, key=lambda a: a is str):
            if alt is type(None):
                if isinstance(value, str) and value.lower() in ("none", "null"):
                    return None
                continue
            try:
                return _coerce(value, alt)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        for a in args:
            if str(a) == str(value):
                return a
        raise ValueError(f"valid choices: {choices(str(a) for a in args)}")
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        items = value if isinstance(value, list) else [value]
        inner = args[0] if args else Any
        coerced = [_coerce(v, inner) for v in items]
        return tuple(coerced) if origin is tuple or tp is tuple else coerced
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ValueError("expected {name:value,...}")
        inner = args[1] if len(args) > 1 else Any
        return {str(k): _coerce(v, inner) for k, v in value.items()}
    if isinstance(value, (list, dict)):
        raise ValueError("expected a single value")
    text = str(value)
    if tp is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError("use true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("not an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("not a number") from None
    if tp is str:
        return text
    raise ValueError(f"unsupported option type {tp!r}")


# ---------------------------------------------------------------------------------------
# Pass specs and the registry


class PassSpec:
    """A registered pass: name, numerical contract, options and the callable."""

    def __init__(self, fn: Callable[..., PassResult], name: str, contract: Contract) -> None:
        if contract not in CONTRACTS:
            raise PluginError(
                f"pass '{name}': contract must be one of {choices(CONTRACTS)}, got {contract!r}"
            )
        self.fn = fn
        self.name = name
        self.contract: Contract = contract
        self.is_class = inspect.isclass(fn)
        target = fn.__init__ if self.is_class else fn  # type: ignore[misc]
        self.options = _options_of(target, name, takes_program=not self.is_class)
        doc = inspect.getdoc(fn) or ""
        self.doc = doc.strip().splitlines()[0] if doc.strip() else ""
        self.source = f"{fn.__module__}.{fn.__qualname__}"
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__module__ = fn.__module__

    def __repr__(self) -> str:
        return f"<pass {self.name} ({self.contract}) from {self.source}>"

    def __call__(self, program: Program, **options: Any) -> PassResult:
        if self.is_class:
            result = self.fn(**options)(program)
        else:
            result = self.fn(program, **options)
        if not isinstance(result, PassResult):
            raise TypeError(f"returned {type(result).__name__}, expected PassResult")
        return result

    def option(self, text_name: str, where: str) -> OptionSpec:
        key = text_name.replace("-", "_")
        if key not in self.options:
            raise PipelineError(
                f"{where}: unknown option '{text_name}' for pass '{self.name}'; "
                f"valid options: {choices(o.text_name for o in self.options.values())}"
            )
        return self.options[key]


def _options_of(fn: Callable[..., Any], name: str, takes_program: bool) -> dict[str, OptionSpec]:
    """Keyword-only parameters with defaults; a function's first parameter is the program."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolved forward refs: fall back to raw annotations
        hints = {}
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    usage = f"pass '{name}': the signature must be fn(program, *, option=default, ...)"
    if takes_program:
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            raise PluginError(f"{usage}; it takes no program parameter")
        params = params[1:]
    opts: dict[str, OptionSpec] = {}
    for p in params:
        if p.kind is not p.KEYWORD_ONLY:
            raise PluginError(f"{usage}; parameter '{p.name}' is not keyword-only")
        if p.default is p.empty:
            raise PluginError(f"pass '{name}': option '{p.name}' needs a default value")
        opts[p.name] = OptionSpec(p.name, hints.get(p.name, p.annotation), p.default)
    return opts


def register_pass(name: str, *, contract: Contract) -> Callable[[Callable[..., PassResult]], PassSpec]:
    """Declare a pass. The module it lives in is registered as a plugin.

    >>> @register_pass("my-pass", contract="exact")
    ... def my_pass(program, *, verbose: bool = False):
    ...     return PassResult(changed=False)
    """
    if not name or any(c in name for c in ",{}=[] "):
        raise PluginError(f"invalid pass name {name!r}: use letters, digits, '-' and '_'")

    def wrap(fn: Callable[..., PassResult]) -> PassSpec:
        return PassSpec(fn, name, contract)

    return wrap


class PassRegistry(Registry[PassSpec]):
    """Name -> PassSpec; refuses duplicates naming both sources, lists candidates."""

    def __init__(self) -> None:
        super().__init__("pass", PipelineError)


# ---------------------------------------------------------------------------------------
# Textual pipelines


@dataclass(frozen=True)
class PassInvocation:
    """A pass with its (coerced) options."""

    spec: PassSpec
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def __str__(self) -> str:
        if not self.options:
            return self.name
        body = ",".join(f"{k.replace('_', '-')}={_show_option(v)}" for k, v in self.options.items())
        return f"{self.name}{{{body}}}"


def _show_option(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_show_option(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{_show_option(x)}" for k, x in v.items()) + "}"
    return str(v)


@dataclass(frozen=True)
class Pipeline:
    """An ordered list of pass invocations; ``str()`` gives the text that parses back."""

    passes: tuple[PassInvocation, ...]

    def __str__(self) -> str:
        return ",".join(str(p) for p in self.passes)

    def __iter__(self) -> Iterator[PassInvocation]:
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def names(self) -> list[str]:
        return [p.name for p in self.passes]


class _Parser:
    SPECIAL = ",{}[]=:"

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, msg: str, pos: int | None = None) -> PipelineError:
        p = self.pos if pos is None else pos
        return PipelineError(f"pipeline '{self.text}': {msg} at column {p + 1}")

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected '{ch}', found {found}")
        self.pos += 1

    def word(self, what: str) -> str:
        self.peek()
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in self.SPECIAL:
            self.pos += 1
        w = self.text[start : self.pos].strip()
        if not w:
            found = repr(self.peek()) if self.peek() else "end of text"
            raise self.error(f"expected {what}, found {found}", start)
        return w

    def value(self) -> Any:
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        if ch == "{":
            self.pos += 1
            mapping: dict[str, Any] = {}
            while True:
                key = self.word("a name")
                self.expect(":")
                mapping[key] = self.value()
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("}")
                return mapping
        return self.word("a value")

    def items(self) -> list[tuple[str, list[tuple[str, Any, int]], int]]:
        out = []
        if not self.peek():
            return out
        while True:
            start = self.pos
            name = self.word("a pass name")
            opts: list[tuple[str, Any, int]] = []
            if self.peek() == "{":
                self.pos += 1
                while True:
                    opt_pos = self.pos
                    key = self.word("an option name")
                    self.expect("=")
                    opts.append((key, self.value(), opt_pos))
                    if self.peek() == ",":
                        self.pos += 1
                        continue
                    self.expect("}")
                    break
            out.append((name, opts, start))
            if not self.peek():
                return out
            self.expect(",")


def parse_pipeline(text: str, registry: PassRegistry) -> Pipeline:
    """Parse ``a,b{opt=1},c`` against a registry; errors name the token, pass and options."""
    parser = _Parser(text)
    invocations = []
    for name, opts, pos in parser.items():
        if name not in registry:
            raise PipelineError(
                f"pipeline '{text}': unknown pass '{name}' at column {pos + 1}; "
                f"registered passes: {choices(registry.names())}"
            )
        spec = registry.get(name)
        values: dict[str, Any] = {}
        for key, raw, opt_pos in opts:
            where = f"pipeline '{text}', pass '{name}' (column {opt_pos + 1})"
            option = spec.option(key, where)
            if option.name in values:
                raise PipelineError(f"{where}: option '{key}' given twice")
            values[option.name] = option.coerce(raw, where)
        invocations.append(PassInvocation(spec, values))
    return Pipeline(tuple(invocations))


# ---------------------------------------------------------------------------------------
# The pass manager


@dataclass
class PassRecord:
    """What the manager measured around one pass."""

    name: str
    options: dict[str, Any]
    contract: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "contract": self.contract,
            "seconds": self.seconds,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "changed": self.changed,
            "detail": self.detail,
            "data": {k: _jsonable(v) for k, v in self.data.items()},
        }


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


class Instrument(Protocol):
    """Hooks the manager calls around every pass. Either method may be omitted."""

    def before_pass(self, invocation: PassInvocation, program: Program) -> None: ...

    def after_pass(self, invocation: PassInvocation, program: Program, record: PassRecord) -> None: ...


def _fingerprint(program: Program) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """The graph's text and every parameter's and buffer's shape: what a pass must not change silently."""
    gm = program.graph_module
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return str(program.graph), tuple((name, tuple(t.shape)) for name, t in tensors)


def _one_line(exc: BaseException, typed: bool = True) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}); a pass must return a PassResult or raise"
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {line}" if typed or not line else line


class PassManager:
    """Runs a pipeline in order: time, node counts, lint, recompile, shapes, instruments."""

    def __init__(self, pipeline: Pipeline, instruments: Iterable[Instrument] = ()) -> None:
        self.pipeline = pipeline
        self.instruments = list(instruments)

    def run(self, program: Program) -> list[PassRecord]:
        records: list[PassRecord] = []
        done: list[str] = []
        for inv in self.pipeline:
            for inst in self.instruments:
                hook = getattr(inst, "before_pass", None)
                if hook:
                    hook(inv, program)
            before = program.node_count()
            fingerprint = _fingerprint(program)
            start = time.perf_counter()
            try:
                result = inv.spec(program, **inv.options)
                program.recompile()  # graph.lint() + regenerate code
            except PassError:
                raise
            except GraphoptError as exc:  # bad options or data: the user's to fix, keep its exit code
                if inv.name not in exc.message:
                    exc.message = f"pass '{inv.name}': {exc.message}"
                    exc.args = (exc.message,)
                raise
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # the pass's bug (even sys.exit), reported with its name
                raise PassError(inv.name, done, _one_line(exc)) from exc
            seconds = time.perf_counter() - start
            # a pass that says it changed nothing but did (graph or weight shapes) is checked all the same
            if result.changed or _fingerprint(program) != fingerprint:
                try:
                    program.propagate_shapes()
                except Exception as exc:
                    raise PassError(inv.name, done, f"the rewritten graph no longer runs: {_one_line(exc, typed=False)}") from exc
            record = PassRecord(
                name=inv.name,
                options=dict(inv.options),
                contract=inv.spec.contract,
                seconds=seconds,
                nodes_before=before,
                nodes_after=program.node_count(),
                changed=result.changed,
                detail=result.detail,
                data=dict(result.data),
            )
            records.append(record)
            done.append(inv.name)
            program.meta.setdefault("passes_run", []).append(str(inv))
            for inst in self.instruments:
                hook = getattr(inst, "after_pass", None)
                if hook:
                    hook(inv, program, record)
        return records
