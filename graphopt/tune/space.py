"""The search space of ``graphopt tune``: text → Optuna distributions → trial points.

The text has the pipeline syntax: parts, each with its dimensions in braces::

    prune{ratio=0.1..0.6,importance=[l1,l2],rounds=1..3},substitute,quant{observer=[minmax,histogram]},recover

A value is a range ``lo..hi`` (integers when both ends are, floats otherwise), a choice
``[a,b,c]`` or a constant. A part given without braces (or a dimension not given) takes
the defaults of :data:`DEFAULTS`. ``ratio@NAME=lo..hi`` adds a per-stage prune ratio for
the modules under ``NAME`` (the global ``ratio`` covers the rest).

:meth:`Space.suggest` asks an Optuna trial for one point; :meth:`Space.build` turns a
point into a :class:`Candidate`: the pipeline text (checked by the ordinary pipeline
parser against the registered passes) and the compile options that go with it. Every
trial is therefore an ordinary ``graphopt compile``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from graphopt.errors import PipelineError, UsageError, choices
from graphopt.pipeline import _Parser, parse_pipeline
from graphopt.plugins import PluginHost

__all__ = ["DEFAULTS", "PARTS", "Dimension", "Space", "Candidate", "parse_space"]

#: every part, its dimensions and their default domains (text)
DEFAULTS: dict[str, dict[str, str]] = {
    "prune": {"ratio": "0.0..0.7", "importance": "[l1,l2,bn-gamma]", "rounds": "1..3", "round-to": "1"},
    "substitute": {"on": "[false,true]", "max-error": "0.0..0.2"},
    "quant": {"observer": "[minmax,histogram,entropy]", "keep-fp32": "[none,auto]", "qat-steps": "0..200"},
    "recover": {"steps": "0..400", "lr": "[0.001,0.003,0.01]"},
}
PARTS = tuple(DEFAULTS)
#: below this total ratio no prune pass is added
MIN_RATIO = 0.02
QUANT_PASS = "insert-quant-stubs"


def _scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class Dimension:
    """One searched (or fixed) value: ``name`` is ``part.key`` (the Optuna parameter name)."""

    name: str
    low: float | None = None
    high: float | None = None
    integer: bool = False
    options: tuple[Any, ...] = ()
    constant: Any = None

    @classmethod
    def parse(cls, name: str, raw: Any) -> Dimension:
        if isinstance(raw, list):
            if not raw:
                raise UsageError(f"search space: '{name}' has an empty choice []")
            return cls(name, options=tuple(_scalar(str(v)) for v in raw))
        if isinstance(raw, dict):
            raise UsageError(f"search space: '{name}' takes lo..hi, [a,b,...] or a value, not a mapping")
        text = str(raw)
        if ".." in text:
            lo_text, _, hi_text = text.partition("..")
            lo, hi = _scalar(lo_text), _scalar(hi_text)
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
                raise UsageError(f"search space: '{name}={text}': a range needs numbers, lo..hi")
            if not lo <= hi or not all(math.isfinite(v) for v in (lo, hi)):
                raise UsageError(f"search space: '{name}={text}': the range must have lo <= hi")
            integer = isinstance(lo, int) and isinstance(hi, int)
            return cls(name, low=lo, high=hi, integer=integer)
        return cls(name, constant=_scalar(text))

    @property
    def searched(self) -> bool:
        return self.constant is None and not (self.low is not None and self.low == self.high) and len(self.options) != 1

    def suggest(self, trial: Any) -> Any:
        """The value for ``trial`` (an ``optuna.Trial``); fixed dimensions ask nothing."""
        if self.constant is not None:
            return self.constant
        if len(self.options) == 1:
            return self.options[0]
        if self.options:
            return trial.suggest_categorical(self.name, list(self.options))
        if self.low == self.high:
            return self.low
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, float(self.low), float(self.high))

    def contains(self, value: Any) -> bool:
        if self.constant is not None:
            return value == self.constant
        if self.options:
            return value in self.options
        return self.low <= value <= self.high and (not self.integer or float(value).is_integer())


@dataclass
class Candidate:
    """One trial's compile: the target, the pipeline text, and the other compile options."""

    target: str
    pipeline: str
    options: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "pipeline": self.pipeline, "options": dict(self.options)}

    def command(self, source: str, shared: Mapping[str, Any] = {}) -> str:  # noqa: B006 - read only
        """The ``graphopt compile`` command line that reproduces this trial (``shared``: the options every trial has)."""
        flags = [f"--target {self.target}", f"--pipeline '{self.pipeline}'"]
        for key, value in {**shared, **self.options}.items():
            if key == "input_shapes":
                flags += [f"--input-shape {'x'.join(map(str, s))}" for s in value or ()]
                continue
            if key in ("plugins",):
                flags += [f"--plugin {p}" for p in value or ()]
                continue
            if key == "measure":
                flags += [] if value else ["--no-latency"]
                continue
            key = {"data": "calib_data"}.get(key, key)
            if key == "keep_fp32":
                flags.append(f"--keep-fp32 {','.join(value)}")
            elif value is True:
                flags.append(f"--{key.replace('_', '-')}")
            elif value not in (False, None, 0):
                flags.append(f"--{key.replace('_', '-')} {value}")
        return f"graphopt compile {source} " + " ".join(flags)


@dataclass
class Space:
    """The parsed search space: dimensions by name, the targets to choose from."""

    parts: dict[str, dict[str, Dimension]]
    targets: tuple[str, ...]
    text: str = ""

    def dimensions(self) -> list[Dimension]:
        dims = [Dimension("target", options=self.targets)] if len(self.targets) > 1 else []
        return dims + [d for part in self.parts.values() for d in part.values()]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One point: ``{"target": ..., "part.key": value, ...}`` (values of fixed dimensions included)."""
        point: dict[str, Any] = {"target": self.targets[0] if len(self.targets) == 1 else
                                 trial.suggest_categorical("target", list(self.targets))}
        for part in self.parts.values():
            for dim in part.values():
                point[dim.name] = dim.suggest(trial)
        return point

    def build(self, point: Mapping[str, Any], host: PluginHost) -> Candidate:
        """The candidate compile of a point; its pipeline parses against ``host``'s passes (else PipelineError)."""
        target = str(point["target"])
        spec = host.targets.get(target)
        invocations = [str(inv) for inv in parse_pipeline(spec.pipeline, host.passes)]
        names = [text.split("{", 1)[0] for text in invocations]
        # structural rewrites go right after BatchNorm folding (or first), before quantization and DCE
        at = names.index("fuse-conv-bn-relu") + 1 if "fuse-conv-bn-relu" in names else 0
        options: dict[str, Any] = {}
        inserted = self._substitute(point) + self._prune(point)
        if "recover" in self.parts and int(point["recover.steps"]) > 0 and inserted:
            options.update(recover_steps=int(point["recover.steps"]), recover_lr=float(point["recover.lr"]))
            if sum(1 for p in inserted if p.startswith("prune-channels")) > 1:
                options["recover_every"] = True
        invocations[at:at] = inserted
        if "quant" in self.parts and QUANT_PASS in names:
            i = invocations.index(next(t for t in invocations if t.startswith(QUANT_PASS)))
            invocations[i] = self._quant_pass(invocations[i], point)
            keep = str(point["quant.keep-fp32"])
            if keep != "none":
                options["keep_fp32"] = [keep]
            if int(point["quant.qat-steps"]) > 0:
                options["qat_steps"] = int(point["quant.qat-steps"])
        text = ",".join(invocations)
        parse_pipeline(text, host.passes)  # every point is a valid pipeline, or an error naming it
        return Candidate(target, text, options)

    def _prune(self, point: Mapping[str, Any]) -> list[str]:
        if "prune" not in self.parts or float(point["prune.ratio"]) < MIN_RATIO:
            return []
        rounds = max(1, int(point["prune.rounds"]))
        stages = {k.split("@", 1)[1]: float(v) for k, v in point.items() if k.startswith("prune.ratio@")}

        def per_round(total: float) -> str:  # k rounds that keep (1 - total) of the channels in all
            return f"{1 - (1 - total) ** (1 / rounds):.4f}"

        total = float(point["prune.ratio"])
        ratio = ("{" + ",".join([f"{k}:{per_round(v)}" for k, v in stages.items()] + [f"*:{per_round(total)}"]) + "}"
                 if stages else per_round(total))
        text = (f"prune-channels{{ratio={ratio},importance={point['prune.importance']},"
                f"round-to={int(point['prune.round-to'])}}}")
        return [text] * rounds

    def _substitute(self, point: Mapping[str, Any]) -> list[str]:
        if "substitute" not in self.parts or not point["substitute.on"]:
            return []
        return [f"depthwise-substitution{{max-error={float(point['substitute.max-error']):.4f}}}"]

    def _quant_pass(self, text: str, point: Mapping[str, Any]) -> str:
        body = text[len(QUANT_PASS) + 1 : -1] if "{" in text else ""
        kept = [kv for kv in body.split(",") if kv and not kv.startswith("observer=")]
        observer = f"observer={point['quant.observer']}"
        return f"{QUANT_PASS}{{{','.join([*kept, observer])}}}"


def parse_space(text: str, targets: Sequence[str] | str) -> Space:
    """Parse the search-space text (part names or ``part{key=domain}``); errors name the part, key and choices."""
    parser = _Parser(text)
    try:
        items = parser.items()
    except PipelineError as exc:
        raise UsageError(f"--search: {str(exc).replace('pipeline ', 'search space ', 1)}") from None
    if not items:
        raise UsageError(f"--search is empty; choose parts from {choices(PARTS)}")
    targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip())
    if not targets:
        raise UsageError("--target: give at least one target")
    parts: dict[str, dict[str, Dimension]] = {}
    for name, opts, _pos in items:
        if name not in DEFAULTS:
            raise UsageError(f"--search: unknown part '{name}'; choose from {choices(PARTS)}")
        if name in parts:
            raise UsageError(f"--search: part '{name}' given twice")
        given: dict[str, Any] = {}
        for key, raw, _ in opts:
            base = key.split("@", 1)[0]
            if base not in DEFAULTS[name] or ("@" in key and (name, base) != ("prune", "ratio")):
                valid = [*DEFAULTS[name], *(["ratio@STAGE"] if name == "prune" else [])]
                raise UsageError(f"--search: part '{name}' has no dimension '{key}'; valid: {choices(valid)}")
            given[key] = raw
        dims = {key: Dimension.parse(f"{name}.{key}", given[key] if key in given else _Parser(default).value())
                for key, default in DEFAULTS[name].items()}
        dims.update({key: Dimension.parse(f"{name}.{key}", raw) for key, raw in given.items() if "@" in key})
        parts[name] = dims
    return Space(parts, targets, text)
