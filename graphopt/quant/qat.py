"""Quantization-aware fine-tuning (QAT) of a simulated-int8 Program.

After ``insert-quant-stubs`` (BatchNorm already folded by ``fuse-conv-bn-relu``) the
program computes with fake-quantized weights and activations. :func:`qat` trains it for
``steps`` optimizer steps with the distillation loop of :func:`graphopt.recover.recover`
(the original is the teacher; labels add a cross-entropy term when given):

* **Straight-through estimator.** ``torch.fake_quantize_per_*_affine`` pass the gradient
  through unchanged inside the quantization range and zero it outside, so the float
  weights under the fake quantizers learn to sit well on the int8 grid.
* **Observers.** Activation qparams stay the ones calibration fitted. Weight scales
  follow the weights (re-derived, symmetric per channel, every step) during the first
  ``warmup`` steps, then are frozen: the last steps train against fixed grids, and the
  int8 kernels use exactly those scales.
* Any lowering strategy (``rounding`` / ``arithmetic``) is cleared first: training runs on
  plain fake quantization; the lowering installs its kernels' arithmetic afterwards.

The result is recorded in ``program.meta['qat']`` (the :class:`~graphopt.recover.RecoveryResult`
fields plus ``warmup``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from graphopt.errors import UsageError
from graphopt.program import Program
from graphopt.quant.calibrate import weight_qparams
from graphopt.quant.simulate import QuantLayer, clear_kernel_arithmetic

__all__ = ["qat", "META_KEY"]

META_KEY = "qat"


def _refresh_weight_scales(layers: Sequence[QuantLayer]) -> None:
    with torch.no_grad():
        for layer in layers:
            fq = layer.weight_fq
            scale, zp = weight_qparams(layer.base.weight.detach(), per_channel=fq.per_channel)
            fq.scale.copy_(scale.to(fq.scale.dtype).reshape(fq.scale.shape))
            fq.zero_point.copy_(zp.to(fq.zero_point.dtype).reshape(fq.zero_point.shape))


def qat(program: Program, teacher: Callable[..., Any], samples: Sequence[tuple[Tensor, ...]], *, steps: int,
        lr: float = 1e-3, warmup: int | None = None, labels: Tensor | None = None, batch_size: int | None = None,
        seed: int = 0, progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune the simulated-int8 ``program`` in place for ``steps`` steps; return what was done (JSON-able).

    ``warmup`` (default: a fifth of the steps) is the number of steps during which weight
    scales follow the weights; after it they are frozen.
    """
    from graphopt.recover import recover

    if "quant" not in program.meta:
        raise UsageError("--qat-steps: the program is not quantized; QAT runs after insert-quant-stubs (an int8 target)")
    gm = program.graph_module
    layers = [m for m in gm.modules() if isinstance(m, QuantLayer)]
    if not layers:
        raise UsageError("--qat-steps: the program has no quantized conv/linear layer to train")
    warmup = max(steps // 5, 1) if warmup is None else warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise UsageError(f"--qat-steps: warmup must be an integer >= 0, got {warmup!r}")
    clear_kernel_arithmetic(gm)

    def before_step(step: int) -> None:
        if step <= warmup:
            _refresh_weight_scales(layers)

    result = recover(program, teacher, samples, steps=steps, lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                     labels=labels, quantized=True, before_step=before_step, meta_key=META_KEY)
    if steps and warmup >= steps:  # never frozen during training: the scales match the final weights
        _refresh_weight_scales(layers)
    program.meta[META_KEY] = {**result.to_json(), "warmup": warmup}
    return program.meta[META_KEY]
