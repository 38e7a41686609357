"""insert-quant-stubs: calibrate on ``program.calibration`` and leave the program as
*simulated int8* — the reference every int8 backend lowers and is verified against.

Quantized regions are conv/linear (fused ConvReLU/LinearReLU too), add, mul, cat and
BatchNorm2d, with ReLU/ReLU6 absorbed, and the pooling/flatten/reshape ops between them
(the rules are in :mod:`graphopt.quant`). At every quantized activation an
:class:`~graphopt.quant.ActFakeQuant` quantize-dequantizes in fp32; conv/linear weights
are fake-quantized symmetric int8, per output channel. Qparams go on those modules and
into ``program.meta['quant']`` (JSON-able); the calibration itself (histograms of every
tensor) stays in ``program.meta['quant_calibration']`` so that another activation scheme
(``graphopt.quant.rederive``) or other fp32 layers (``keep_fp32``) never need the data
again.

Options:

- ``activations``: ``u8`` (asymmetric quint8: fbgemm, ONNX Runtime CPU) or ``s8``
  (symmetric qint8, zero point 0: TensorRT).
- ``observer``: ``minmax``, ``histogram`` (L2-optimal clipping range) or ``entropy``
  (TensorRT's KL-divergence calibration).
- ``per_channel``: per-output-channel weight scales (else one per tensor).
- ``reduce_range``: 7-bit activations, for x86 CPUs without VNNI (fbgemm's 16-bit
  accumulation can saturate with full-range u8).
- ``skip`` / ``keep_fp32``: layers kept in fp32, by module path (a prefix such as
  ``layer4`` names all layers below it) or node name (``add_3``). ``keep_fp32`` may also
  hold ``auto``: the most sensitive layers are kept in fp32 until the simulated output
  reaches cosine ``keep_fp32_cosine`` (and top-1 agreement ``keep_fp32_top1``, when
  above 0) against fp32 on the calibration samples.

The calibration samples are the compiler's business: it fills ``program.calibration``
from ``--calib-data`` or with random samples and a warning. A callable in
``program.meta['calibration_progress']`` is called as ``fn(done, total)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from graphopt import PassResult, Program, register_pass
from graphopt.errors import DataError, PipelineError
from graphopt.fx_util import run_all
from graphopt.quant import META_KEY, QuantConfig, QuantInfo, quantization_error, quantize_program
from graphopt.quant.place import CALIBRATION_KEY, Placement, place, strip, summary
from graphopt.quant.regions import anchors, resolve_names
from graphopt.verify import Tolerance

#: At most this many calibration samples are used to choose layers for ``keep_fp32=[auto]``.
AUTO_SAMPLES = 8
#: ... and the first this many of them to rank the layers (one simulated run per layer: DenseNet-121 has 250).
RANK_SAMPLES = 2


@register_pass("insert-quant-stubs", contract="approximate")
def insert_quant_stubs(
    program: Program,
    *,
    activations: Literal["u8", "s8"] = "u8",
    observer: Literal["minmax", "histogram", "entropy"] = "histogram",
    per_channel: bool = True,
    reduce_range: bool = False,
    skip: list[str] = [],  # noqa: B006 - options are read, never mutated
    keep_fp32: list[str] = [],  # noqa: B006
    keep_fp32_cosine: float = 0.99,
    keep_fp32_top1: float = 0.0,
) -> PassResult:
    """Calibrate, then quantize-dequantize activations and weights (simulated int8)."""
    if META_KEY in program.meta:
        raise PipelineError("insert-quant-stubs: the program is already quantized (the pass appears twice in the pipeline)")
    if not program.calibration:
        raise DataError(
            "insert-quant-stubs needs calibration data: pass --calib-data FILE_OR_FOLDER "
            "(or set program.calibration to a list of input tuples)"
        )
    if not 0.0 < keep_fp32_cosine <= 1.0:
        raise PipelineError(f"insert-quant-stubs: keep-fp32-cosine must be in (0, 1], got {keep_fp32_cosine}")
    if not 0.0 <= keep_fp32_top1 <= 1.0:
        raise PipelineError(f"insert-quant-stubs: keep-fp32-top1 must be in [0, 1], got {keep_fp32_top1}")
    auto = "auto" in keep_fp32
    names = [n for n in keep_fp32 if n != "auto"]
    float_gm = program.graph_module
    chosen = resolve_names(float_gm, skip, "skip") | resolve_names(float_gm, names, "keep-fp32")

    config = QuantConfig(activations, observer, per_channel, reduce_range, frozenset(chosen))
    progress = program.meta.get("calibration_progress")
    placement = quantize_program(program, config, progress=progress if callable(progress) else None)

    samples = program.calibration[:AUTO_SAMPLES]
    auto_kept: list[tuple[str, float]] = []
    if auto:
        target = Tolerance(min_cosine=keep_fp32_cosine, min_top1=keep_fp32_top1 or None)
        auto_kept = keep_fp32_auto(program, float_gm, samples, target)

    info: QuantInfo = program.meta[META_KEY]
    error = quantization_error(float_gm, program.graph_module, samples[:2]).metrics
    n_layers = len(info.quantized_layers)
    n_acts = len(info.activations)
    kept = info.kept_fp32
    detail = (
        f"{n_layers} layers int8 ({activations}, {observer}, weights {'per-channel' if per_channel else 'per-tensor'}), "
        f"{n_acts} activation quantizers, {len(kept)} kept fp32"
        + (f" ({len(auto_kept)} by auto)" if auto else "")
        + f"; cosine vs fp32 {error.cosine:.4f} on {min(2, len(samples))} calibration samples"
    )
    return PassResult(
        changed=bool(placement.quantized),
        detail=detail,
        data={
            "config": info.config.to_json(),
            "calibration_samples": info.calibration_samples,
            "quantized_layers": n_layers,
            "activation_quantizers": n_acts,
            "kept_fp32": kept,
            "quantization_error": error.to_json(),
        },
    )


@dataclass
class Sensitivity:
    layer: str
    sensitivity: float  # 1 - cosine of the output when only this layer is quantized


def _as_tolerance(tolerance: Any):
    from graphopt.verify import Tolerance

    if isinstance(tolerance, Tolerance):
        return tolerance
    return Tolerance(min_cosine=float(tolerance))


def keep_fp32_auto(
    program: Program,
    reference_fn: Callable[..., Any],
    samples: Sequence[Sequence[torch.Tensor]],
    tolerance: Any = 0.99,
) -> list[tuple[str, float]]:
    """Keep the most sensitive layers of a simulated program in fp32 until it meets ``tolerance``.

    ``tolerance`` is a :class:`graphopt.verify.Tolerance` (min cosine / min top-1 are used)
    or a float minimum cosine. A program that meets it on ``samples`` is left exactly as it
    is. Otherwise a layer's sensitivity is ``1 - cosine`` of the output against
    ``reference_fn`` on the first :data:`RANK_SAMPLES` samples when only that layer is
    quantized, and the worst layers are kept in fp32 (the fewest that meet the tolerance on
    all ``samples``, found by a doubling then binary search over the sensitivity order).
    Rewrites ``program`` in place (no new calibration) and
    returns ``[(layer, sensitivity)]`` for the layers kept; ``program.meta['quant']``
    records them with their reason.
    """
    from graphopt.verify import compare

    info = program.meta.get(META_KEY)
    observers = program.meta.get(CALIBRATION_KEY)
    if info is None or observers is None:
        raise ValueError("keep_fp32_auto needs a program that went through insert-quant-stubs")
    tol = _as_tolerance(tolerance)
    base_skip = info.config.skip
    float_gm = strip(program.graph_module)
    refs = run_all(reference_fn, samples)
    candidates = [a for a in anchors(float_gm) if a not in base_skip]

    def simulate(skip: frozenset[str], n: int = len(samples)) -> tuple[Placement, Any]:
        p = place(float_gm, observers, replace(info.config, skip=skip))
        return p, compare(refs[:n], run_all(p.graph_module, samples[:n])).metrics

    metrics = before = compare(refs, run_all(program.graph_module, samples)).metrics
    kept: list[Sensitivity] = []
    if tol.violations(metrics):  # else the program is left exactly as it is
        all_names = frozenset(candidates)
        sens = []
        for name in candidates:
            _, m = simulate(base_skip | (all_names - {name}), RANK_SAMPLES)
            sens.append(Sensitivity(name, max(0.0, 1.0 - m.cosine)))
        sens.sort(key=lambda s: -s.sensitivity)
        cache: dict[int, tuple[Placement, Any]] = {}

        def trial(k: int) -> bool:
            if k not in cache:
                cache[k] = simulate(base_skip | {s.layer for s in sens[:k]})
            return not tol.violations(cache[k][1])

        lo, hi = 0, 1
        while hi < len(sens) and not trial(hi):
            lo, hi = hi, min(2 * hi, len(sens))
        if not trial(hi):
            hi = len(sens)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if trial(mid):
                hi = mid
            else:
                lo = mid
        trial(hi)
        kept = sens[:hi]
        chosen, metrics = cache[hi]
        program.graph_module = chosen.graph_module
    config = replace(info.config, skip=base_skip | {s.layer for s in kept})
    reasons = [r for r in info.kept_fp32 if r.get("reason") == "skip"]
    reasons += [{"layer": s.layer, "reason": "auto", "sensitivity": s.sensitivity} for s in kept]
    program.meta[META_KEY] = summary(program.graph_module, config, reasons, info.calibration_samples)
    program.meta[META_KEY].keep_fp32_auto = {
        "tolerance": tol.to_json(),
        "before": before.to_json(),
        "after": metrics.to_json(),
        "kept": [[s.layer, s.sensitivity] for s in kept],
        "met": not tol.violations(metrics),
    }
    return [(s.layer, s.sensitivity) for s in kept]
