"""Numerical comparison of a compiled model against its original.

Metrics (over every output tensor of every verification input):

- ``max_abs_err``: max |candidate - reference|.
- ``max_rel_err``: max over outputs of max |candidate - reference| / max |reference|,
  i.e. the error relative to the output's range. (Element-wise relative error is
  meaningless next to zeros, which every ReLU network produces.)
- ``cosine``: the smallest cosine similarity between flattened output tensors.
- ``sqnr_db``: the smallest signal-to-quantization-noise ratio, 10·log10(Σref² / Σerr²);
  ``inf`` when the outputs are identical (``null`` in JSON).
- ``top1_agreement``: over the rows of 2-D ``[batch, classes]`` outputs that *count*, the
  fraction whose argmax agrees; ``None`` when no output looks like logits or no row counts.
  A row counts when the reference's top-1 margin (top-1 minus top-2 logit) exceeds
  ``TOP1_NOISE_FACTOR`` (4) times the candidate's noise on that output: the RMS error of that
  output over every verification input (see :data:`TOP1_RULE`). With noise of RMS sigma on each
  logit, the gap between two logits moves by noise of std sqrt(2)·sigma, so a counted row flips by
  chance with probability < 0.3%, while a near-tie (random-weight nets over 1000 classes) is not
  counted: its top-1 is noise, not a lowering fault. A real flip with a clear margin still counts
  and fails. (A per-row bound on the row's *own* error would be vacuous: a flipped row carries
  the error that flipped it, so it would never count.) ``top1_counted`` / ``top1_rows`` say how
  many rows counted out of how many; cosine and SQNR are held whatever the count.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from graphopt.errors import ArtifactError, DataError, GraphoptError, UsageError, VerificationError, choices
from graphopt.program import flatten_outputs

__all__ = [
    "Metrics",
    "Tolerance",
    "Comparison",
    "compare",
    "default_tolerance",
    "check_finite",
    "Golden",
    "save_golden",
    "load_golden",
    "check_golden_fits",
]


@dataclass
class Metrics:
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    cosine: float = 1.0
    sqnr_db: float = math.inf
    top1_agreement: float | None = None
    top1_counted: int = 0
    top1_rows: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(self).items()}


#: Each bound's valid range (inclusive): an error bound is >= 0, cosine and top-1 are bounded.
_BOUNDS = (
    ("max_abs_err", 0.0, math.inf),
    ("max_rel_err", 0.0, math.inf),
    ("min_cosine", -1.0, 1.0),
    ("min_sqnr_db", -math.inf, math.inf),
    ("min_top1", 0.0, 1.0),
)


#: A logits row counts toward top-1 agreement when the reference's top-1 margin exceeds this
#: many times the RMS error of the candidate on that row.
TOP1_NOISE_FACTOR = 4.0
TOP1_RULE = f"rows whose top-1 margin > {TOP1_NOISE_FACTOR:g} x the output's RMS error"


@dataclass(frozen=True)
class Tolerance:
    """Bounds a comparison must meet; ``None`` means the metric is not checked."""

    max_abs_err: float | None = None
    max_rel_err: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        for name, lo, hi in _BOUNDS:
            value = getattr(self, name)
            if value is None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
            if not ok:  # also refuses NaN, which no comparison can meet or fail
                valid = f"a number >= {lo:g}" if hi == math.inf else f"a number in [{lo:g}, {hi:g}]"
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: must be {valid}")

    def violations(self, m: Metrics) -> list[str]:
        out = []
        if self.max_abs_err is not None and not m.max_abs_err <= self.max_abs_err:
            out.append(f"max_abs_err {m.max_abs_err:.3g} > {self.max_abs_err:g}")
        if self.max_rel_err is not None and not m.max_rel_err <= self.max_rel_err:
            out.append(f"max_rel_err {m.max_rel_err:.3g} > {self.max_rel_err:g}")
        if self.min_cosine is not None and not m.cosine >= self.min_cosine:
            out.append(f"cosine {m.cosine:.6f} < {self.min_cosine:g}")
        if self.min_sqnr_db is not None and not m.sqnr_db >= self.min_sqnr_db:
            out.append(f"sqnr_db {m.sqnr_db:.1f} < {self.min_sqnr_db:g}")
        if self.min_top1 is not None and m.top1_agreement is not None and not m.top1_agreement >= self.min_top1:
            out.append(f"top1_agreement {m.top1_agreement:.3f} < {self.min_top1:g}")
        return out

    def with_overrides(self, **overrides: float | None) -> "Tolerance":
        valid = {f.name for f in fields(self)}
        for k in overrides:
            if k not in valid:
                raise UsageError(f"unknown tolerance '{k}'; valid: {choices(valid)}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Per-precision defaults. fp32 rewrites must be exact up to float rounding (the error of
# re-associating sums in folded weights is ~1e-6 of the output range on deep nets).
_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_rel_err=1e-4, min_cosine=0.9999),
    "fp16": Tolerance(max_rel_err=2e-2, min_cosine=0.999, min_top1=0.99),
    # bf16 keeps 8 mantissa bits (fp16: 11): judged by cosine, as the issue asks of ov-bf16
    "bf16": Tolerance(min_cosine=0.999),
    "int8": Tolerance(min_cosine=0.98, min_top1=0.8),
}


def default_tolerance(precision: str) -> Tolerance:
    try:
        return _TOLERANCES[precision]
    except KeyError:
        raise UsageError(f"unknown precision '{precision}'; valid: {choices(_TOLERANCES)}") from None


@dataclass
class OutputError:
    """The error of one output tensor of one verification input."""

    sample: int
    output: int
    shape: tuple[int, ...]
    metrics: Metrics


@dataclass
class Comparison:
    metrics: Metrics
    per_output: list[OutputError] = field(default_factory=list)

    def worst(self, n: int = 5) -> list[OutputError]:
        return sorted(self.per_output, key=lambda e: (-e.metrics.max_rel_err, e.metrics.cosine))[:n]


def _tensor_metrics(ref: torch.Tensor, cand: torch.Tensor) -> Metrics:
    r = ref.detach().double().flatten()
    c = cand.detach().double().flatten()
    diff = c - r
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    scale = float(r.abs().max()) if r.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    denom = float(r.norm() * c.norm())
    if denom > 0:
        cosine = float(torch.dot(r, c)) / denom
    else:
        cosine = 1.0 if max_abs == 0 else 0.0
    noise = float((diff * diff).sum())
    signal = float((r * r).sum())
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    if not torch.isfinite(c).all():
        max_abs, max_rel, cosine, sqnr = math.inf, math.inf, -1.0, -math.inf
    return Metrics(max_abs, max_rel, min(cosine, 1.0), sqnr, None)


def _top1(logits: list[tuple[OutputError, torch.Tensor, torch.Tensor]]) -> tuple[int, int]:
    """Fill the top-1 fields of each ``[batch, classes]`` output by :data:`TOP1_RULE`; (agreeing, counted) rows."""
    noise: dict[int, list[float]] = {}
    for e, r, c in logits:  # squared error sum and count per output index, over every input
        acc = noise.setdefault(e.output, [0.0, 0])
        acc[0] += float((c.double() - r.double()).pow(2).sum())
        acc[1] += r.numel()
    agree = counted = 0
    for e, r, c in logits:
        total, n = noise[e.output]
        top2 = r.double().topk(2, dim=1).values
        counts = (top2[:, 0] - top2[:, 1]) > TOP1_NOISE_FACTOR * math.sqrt(total / n)
        same = int(((r.argmax(dim=1) == c.argmax(dim=1)) & counts).sum())
        k = int(counts.sum())
        e.metrics.top1_agreement, e.metrics.top1_counted, e.metrics.top1_rows = (same / k if k else None), k, r.shape[0]
        agree, counted = agree + same, counted + k
    return agree, counted


def check_finite(outputs: Sequence[Any], who: str = "the original model", error: type[GraphoptError] = DataError) -> None:
    """``error`` (a DataError: bad input) naming the first input for which ``outputs`` hold NaN or Inf.

    Run on the original's outputs before anything is compared, so a broken model (NaN
    weights, an overflow) is not blamed on a pass or a lowering.
    """
    for i, out in enumerate(outputs):
        for k, t in enumerate(flatten_outputs(out)):
            if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
                which = f"output {k} " if len(flatten_outputs(out)) > 1 else ""
                raise error(f"{who} produces NaN/Inf ({which}for input {i}): check its weights and inputs; "
                                "there is nothing to verify against")


def compare(references: Sequence[Any], candidates: Sequence[Any]) -> Comparison:
    """Compare per-sample outputs (each a tensor or a nest of tensors).

    Raises :class:`~graphopt.errors.VerificationError` when a reference holds NaN/Inf
    or when there is nothing to compare (no samples, or outputs without values): a
    comparison never passes vacuously.
    """
    check_finite(references, "the reference", VerificationError)
    if len(references) != len(candidates):
        raise ValueError(f"{len(references)} reference outputs but {len(candidates)} candidate outputs")
    total = Metrics()
    per_output: list[OutputError] = []
    logits: list[tuple[OutputError, torch.Tensor, torch.Tensor]] = []
    for i, (ref, cand) in enumerate(zip(references, candidates)):
        refs, cands = flatten_outputs(ref), flatten_outputs(cand)
        if len(refs) != len(cands):
            raise ValueError(f"sample {i}: the original returns {len(refs)} tensors, the candidate {len(cands)}")
        for k, (r, c) in enumerate(zip(refs, cands)):
            if tuple(r.shape) != tuple(c.shape):
                raise ValueError(f"sample {i}, output {k}: shape {tuple(c.shape)} differs from the original's {tuple(r.shape)}")
            m = _tensor_metrics(r, c)
            per_output.append(OutputError(i, k, tuple(r.shape), m))
            if r.dim() == 2 and r.shape[1] > 1 and r.dtype.is_floating_point:
                logits.append((per_output[-1], r.detach(), c.detach()))
            total.max_abs_err = max(total.max_abs_err, m.max_abs_err)
            total.max_rel_err = max(total.max_rel_err, m.max_rel_err)
            total.cosine = min(total.cosine, m.cosine)
            total.sqnr_db = min(total.sqnr_db, m.sqnr_db)
    agree, counted = _top1(logits)
    total.top1_rows = sum(e.shape[0] for e, _, _ in logits)
    total.top1_agreement, total.top1_counted = (agree / counted if counted else None), counted
    if not sum(math.prod(e.shape) for e in per_output):
        raise VerificationError(f"nothing to compare: {len(references)} inputs, {len(per_output)} output tensors, "
                                "0 values; a check without values cannot pass")
    return Comparison(total, per_output)


# ---------------------------------------------------------------------------------------
# Golden files: inputs and the original's outputs, recorded once and checked later.


@dataclass
class Golden:
    inputs: list[tuple[torch.Tensor, ...]]
    outputs: list[list[torch.Tensor]]
    meta: dict[str, Any]


#: An artifact's own golden file (inputs + the original's outputs), where its backend saves one.
GOLDENS_FILE = "goldens.npz"


def save_golden(path: str | Path, inputs: Sequence[Sequence[torch.Tensor]], outputs: Sequence[Any], meta: dict[str, Any]) -> None:
    """Write ``.npz``: ``input_<sample>_<k>``, ``output_<sample>_<k>`` and a JSON ``meta``."""
    arrays: dict[str, np.ndarray] = {}
    for i, (inp, out) in enumerate(zip(inputs, outputs)):
        for k, t in enumerate(inp):
            arrays[f"input_{i}_{k}"] = t.detach().cpu().numpy()
        for k, t in enumerate(flatten_outputs(out)):
            arrays[f"output_{i}_{k}"] = t.detach().cpu().numpy()
    full = {"format": "graphopt-golden/1", "samples": len(inputs), **meta}
    arrays["meta"] = np.array(json.dumps(full))
    path = Path(path)
    if not path.parent.is_dir():
        raise ArtifactError(f"cannot write golden file '{path}': folder '{path.parent}' does not exist")
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"cannot write golden file '{path}': {exc.strerror or exc}") from None


def load_golden(path: str | Path) -> Golden:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"golden file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {k: data[k] for k in data.files if k != "meta"}
    except Exception as exc:
        raise ArtifactError(f"golden file '{path}' is not a graphopt golden file: {type(exc).__name__}: {exc}") from None
    if not isinstance(meta, dict):
        raise ArtifactError(f"golden file '{path}': its meta is a JSON {type(meta).__name__}, expected an object")
    if meta.get("format") != "graphopt-golden/1":
        raise ArtifactError(f"golden file '{path}' has format {meta.get('format')!r}, expected 'graphopt-golden/1'")
    n = meta.get("samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ArtifactError(f"golden file '{path}': 'samples' is {n!r}, expected a whole number >= 1")
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ArtifactError(f"golden file '{path}': array '{key}' has dtype {array.dtype}, expected numbers")

    def collect(prefix: str, i: int) -> list[torch.Tensor]:
        out, k = [], 0
        while f"{prefix}_{i}_{k}" in arrays:
            out.append(torch.from_numpy(arrays[f"{prefix}_{i}_{k}"]))
            k += 1
        if not out:
            raise ArtifactError(f"golden file '{path}' has no '{prefix}_{i}_0' array but says it holds {n} samples")
        return out

    return Golden([tuple(collect("input", i)) for i in range(n)], [collect("output", i) for i in range(n)], meta)


def check_golden_fits(golden: Golden, specs: Sequence[Any], what: str, model: str) -> None:
    """A DataError unless every golden input has the shapes and dtypes of ``specs`` (the model's InputSpecs)."""
    want = [(tuple(s.shape), s.dtype) for s in specs]
    for i, sample in enumerate(golden.inputs):
        got = [(tuple(t.shape), t.dtype) for t in sample]
        if got != want:
            text = ", ".join(f"{list(sh)} {str(dt).replace('torch.', '')}" for sh, dt in got)
            expected = ", ".join(f"{list(sh)} {str(dt).replace('torch.', '')}" for sh, dt in want)
            raise DataError(f"{what}: input {i} is {text} but {model} expects {expected}")
