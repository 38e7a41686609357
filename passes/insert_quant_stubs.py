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

from typing import Literal

from graphopt import PassResult, Program, register_pass
from graphopt.errors import DataError, PipelineError
from graphopt.quant import (
    META_KEY,
    QuantConfig,
    keep_fp32_auto,
    quantization_error,
    quantize_program,
    resolve_names,
)
from graphopt.verify import Tolerance

#: At most this many calibration samples are used to rank layers for ``keep_fp32=[auto]``.
AUTO_SAMPLES = 8


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

    info = program.meta[META_KEY]
    error = quantization_error(float_gm, program.graph_module, samples[:2]).metrics
    n_layers = len(info["quantized_layers"])
    n_acts = len(info["activations"])
    kept = info["kept_fp32"]
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
            "config": info["config"],
            "calibration_samples": info["calibration_samples"],
            "quantized_layers": n_layers,
            "activation_quantizers": n_acts,
            "kept_fp32": kept,
            "quantization_error": error.to_json(),
        },
    )
