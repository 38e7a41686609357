"""Recovery by knowledge distillation: fine-tune a rewritten Program against the original.

Structural passes (``prune-channels``, ``depthwise-substitution``) change what a Program
computes. A short distillation run of the rewritten Program (the *student*) against the
original model (the *teacher*) on the calibration samples recovers most of the accuracy
they cost, without labels.

What :func:`recover` does, precisely:

* **Loss.** For every float output pair (teacher, student), flattened with
  :func:`graphopt.program.flatten_outputs`: a 2-D output ``[batch, classes]`` is treated
  as logits and gets the softened-logit KL divergence
  ``T^2 * KL(softmax(t/T) || softmax(s/T))`` (``batchmean``); any other output gets the
  mean squared error. ``feature_weight > 0`` adds ``feature_weight * MSE(s, t)`` on the
  2-D outputs too (the raw logits). Intermediate activations are not matched: after
  pruning, the student's feature maps have fewer channels than the teacher's. The
  losses of several outputs are summed.
* **Optimizer.** AdamW (weight decay on weight matrices and conv kernels only, not on
  biases and BatchNorm affine parameters) with a cosine schedule
  (``CosineAnnealingLR``, ``T_max=steps``) from ``lr`` down to 0.
* **Data.** Without ``batch_size`` the sample batches are used in turn, cycling; with
  it, the samples are concatenated along the batch dimension and every step draws a
  minibatch from a seeded permutation (a new permutation every epoch). The teacher runs
  once per sample, before training (its outputs are fixed).
* **Mode.** The student's GraphModule stays in eval mode the whole time: BatchNorm keeps
  its running statistics (calibration sets are small, and a changed statistic would be
  folded into the deployed weights) and Dropout is off, so the run is deterministic for
  a seed. Every parameter trains (pruning leaves ``requires_grad=False`` parameters in
  some Programs); each parameter's ``requires_grad`` is restored afterwards.
* **Result.** The student is updated in place, left in eval mode, and
  ``student.meta['recovery']`` holds :meth:`RecoveryResult.to_json`. ``first_loss`` and
  ``last_loss`` are the distillation loss over *all* samples before and after training
  (no gradient, same weighting), so they compare; ``loss_curve`` holds the training loss
  of every step, or the mean of consecutive windows of steps when there are more than
  :data:`CURVE_POINTS` steps.

Recovery runs before quantization: a Program that carries ``meta['quant']`` is refused
(quantization-aware training, :mod:`graphopt.quant.qat`, runs this same loop on the
simulated-int8 program with ``quantized=True``). With ``labels`` (one per sample row,
``batch_size`` required) the training loss adds the cross-entropy of the first 2-D output
against them; ``first_loss``/``last_loss`` stay the distillation loss.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graphopt.errors import DataError, UsageError
from graphopt.program import Program, flatten_outputs

__all__ = ["RecoveryResult", "recover", "distillation_loss", "CURVE_POINTS"]

#: At most this many points in ``RecoveryResult.loss_curve``.
CURVE_POINTS = 200
#: Program.meta key where the result is recorded.
META_KEY = "recovery"

_QUANT_MODULES = ("QuantLayer", "ActFakeQuant", "WeightFakeQuant")


@dataclass
class RecoveryResult:
    """What a recovery run did: its settings, its loss curve and how long it took."""

    steps: int
    seconds: float
    lr: float
    temperature: float
    loss_curve: list[float]  # per step, or window means when steps > CURVE_POINTS
    first_loss: float  # distillation loss over all samples before training
    last_loss: float  # ... and after
    batch_size: int | None = None
    feature_weight: float = 0.0
    curve_stride: int = 1  # steps per loss_curve point

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- loss


def distillation_loss(
    student_out: Sequence[Tensor], teacher_out: Sequence[Tensor], temperature: float, feature_weight: float = 0.0
) -> Tensor:
    """Summed loss over the float outputs: softened-logit KL for 2-D outputs, MSE otherwise."""
    total: Tensor | None = None
    for s, t in zip(student_out, teacher_out):
        if not s.is_floating_point():
            continue
        t = t.to(s.dtype)
        if s.dim() == 2:
            T = temperature
            loss = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean", log_target=True)
            loss = loss * (T * T)
            if feature_weight > 0:
                loss = loss + feature_weight * F.mse_loss(s, t)
        else:
            loss = F.mse_loss(s, t)
        total = loss if total is None else total + loss
    assert total is not None  # checked by _float_outputs
    return total


# --------------------------------------------------------------------------- checks


def _check_options(student: Program, steps: int, lr: float, temperature: float, feature_weight: float,
                   batch_size: int | None, weight_decay: float, quantized: bool = False) -> None:
    if not isinstance(student, Program):
        raise UsageError(f"recover: the student must be a graphopt Program, got {type(student).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"recover: steps must be an integer >= 0, got {steps!r}")
    for name, value in (("lr", lr), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise UsageError(f"recover: {name} must be a positive number, got {value!r}")
    for name, value in (("feature_weight", feature_weight), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UsageError(f"recover: {name} must be a number >= 0, got {value!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"recover: batch_size must be an integer >= 1 (or None), got {batch_size!r}")
    quant = [n for n, m in student.graph_module.named_modules() if type(m).__name__ in _QUANT_MODULES]
    if ("quant" in student.meta or quant) and not quantized:
        raise UsageError(
            "recover: the program is already quantized (insert-quant-stubs ran); "
            "recovery fine-tunes float weights and must run before quantization"
        )
    if not any(True for _ in student.graph_module.parameters()):
        raise UsageError("recover: the program has no parameters to train")


def _check_samples(samples: Any, n_inputs: int) -> list[tuple[Tensor, ...]]:
    if samples is None or isinstance(samples, Tensor):
        raise DataError("recover: samples must be a sequence of input tuples, e.g. [(x1,), (x2,)]")
    items = list(samples)
    if not items:
        raise DataError("recover: no samples: distillation needs input batches (calibration data)")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            item = (item,)
        if not isinstance(item, (tuple, list)) or not all(isinstance(t, Tensor) for t in item):
            raise DataError(f"recover: sample {i} is a {type(item).__name__}, not a tuple of tensors")
        if len(item) != n_inputs:
            raise DataError(f"recover: sample {i} has {len(item)} tensors but the program takes {n_inputs} inputs")
        # inference-mode tensors cannot be saved for backward: take ordinary copies
        out.append(tuple(t.clone() if t.is_inference() else t for t in item))
    return out


def _shapes(outs: Sequence[Tensor]) -> str:
    return ", ".join("x".join(map(str, t.shape)) or "scalar" for t in outs)


def _teacher_outputs(teacher: Callable[..., Any] | nn.Module, samples: list[tuple[Tensor, ...]]) -> list[list[Tensor]]:
    was_training = teacher.training if isinstance(teacher, nn.Module) else None
    if isinstance(teacher, nn.Module):
        teacher.eval()
    try:
        results = []
        with torch.no_grad():
            for i, sample in enumerate(samples):
                try:
                    out = teacher(*sample)
                except Exception as exc:  # noqa: BLE001
                    raise DataError(f"recover: the teacher cannot run sample {i} ({_shapes(sample)}): {type(exc).__name__}: {exc}") from exc
                # ordinary (non-inference) detached copies: they are loss targets
                results.append([t.detach().clone() for t in flatten_outputs(out)])
        return results
    finally:
        if was_training:
            teacher.train()


# --------------------------------------------------------------------------- batches


class _Batches:
    """Yields (inputs, teacher outputs) per step: the samples in turn, or seeded minibatches."""

    def __init__(self, samples: list[tuple[Tensor, ...]], targets: list[list[Tensor]], batch_size: int | None,
                 seed: int, device: torch.device, labels: Tensor | None = None) -> None:
        self.batch_size = batch_size
        self.labels = labels.to(device) if labels is not None else None
        self.generator = torch.Generator().manual_seed(seed)
        if batch_size is None:
            self.samples = [tuple(t.to(device) for t in s) for s in samples]
            self.targets = [[t.to(device) for t in o] for o in targets]
            self.count = len(samples)
        else:
            try:
                self.inputs = [torch.cat([s[i] for s in samples]).to(device) for i in range(len(samples[0]))]
                self.outputs = [torch.cat([o[i] for o in targets]).to(device) for i in range(len(targets[0]))]
            except RuntimeError as exc:
                raise DataError(f"recover: batch_size needs samples that concatenate along the batch dimension: {exc}") from exc
            self.count = self.inputs[0].shape[0]
            if any(t.shape[0] != self.count for t in self.outputs):
                raise DataError("recover: batch_size needs outputs whose first dimension is the batch")
            if self.labels is not None and self.labels.shape[0] != self.count:
                raise DataError(f"recover: {self.labels.shape[0]} labels for {self.count} sample rows")
        self.position = 0
        self.order: Tensor | None = None

    def next(self) -> tuple[tuple[Tensor, ...], list[Tensor], Tensor | None]:
        if self.batch_size is None:
            i = self.position % self.count
            self.position += 1
            return self.samples[i], self.targets[i], None
        size = min(self.batch_size, self.count)
        if self.order is None or self.position + size > self.count:
            self.order = torch.randperm(self.count, generator=self.generator)
            self.position = 0
        idx = self.order[self.position : self.position + size]
        self.position += size
        labels = self.labels[idx] if self.labels is not None else None
        return tuple(t[idx] for t in self.inputs), [t[idx] for t in self.outputs], labels

    def all(self, chunk: int) -> list[tuple[tuple[Tensor, ...], list[Tensor]]]:
        """Every sample once (for the before/after loss), in chunks."""
        if self.batch_size is None:
            return list(zip(self.samples, self.targets))
        return [
            (tuple(t[i : i + chunk] for t in self.inputs), [t[i : i + chunk] for t in self.outputs])
            for i in range(0, self.count, chunk)
        ]


# --------------------------------------------------------------------------- recover


def _step_loss(outs: list[Tensor], target: list[Tensor], labels: Tensor | None, temperature: float,
               feature_weight: float) -> Tensor:
    loss = distillation_loss(outs, target, temperature, feature_weight)
    if labels is not None:
        logits = next(o for o in outs if o.is_floating_point() and o.dim() == 2)
        loss = loss + F.cross_entropy(logits, labels.long())
    return loss


def _full_loss(gm: nn.Module, batches: _Batches, temperature: float, feature_weight: float) -> float:
    """The distillation loss over every sample, weighted by batch size."""
    total, n = 0.0, 0
    with torch.no_grad():
        for inputs, targets in batches.all(batches.batch_size or 1):
            outs = flatten_outputs(gm(*inputs))
            k = int(inputs[0].shape[0]) if inputs[0].dim() else 1
            total += float(distillation_loss(outs, targets, temperature, feature_weight)) * k
            n += k
    return total / max(n, 1)


def recover(
    student: Program,
    teacher: Callable[..., Any] | nn.Module,
    samples: Sequence[tuple[Tensor, ...]],
    *,
    steps: int,
    lr: float = 1e-3,
    temperature: float = 4.0,
    feature_weight: float = 0.0,
    batch_size: int | None = None,
    weight_decay: float = 1e-4,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    labels: Tensor | None = None,
    quantized: bool = False,
    before_step: Callable[[int], None] | None = None,
    meta_key: str = META_KEY,
) -> RecoveryResult:
    """Distill ``teacher`` into ``student`` for ``steps`` optimizer steps, in place.

    ``teacher`` is the original model (an ``nn.Module``, a Program, or any callable
    taking the sample tensors); ``samples`` are input tuples (calibration batches).
    ``progress(done, total, loss)`` is called after every step, ``before_step(step)``
    before it (QAT freezes its observers there). ``labels``: one class index per sample
    row (needs ``batch_size``). ``quantized``: accept a simulated-int8 student (QAT).

    Raises :class:`~graphopt.errors.UsageError` for bad options, a quantized student,
    or outputs that differ from the teacher's in number or shape, and
    :class:`~graphopt.errors.DataError` for missing or unusable samples. If the loss
    stops being finite the student's weights are restored and a UsageError names ``lr``.
    """
    _check_options(student, steps, lr, temperature, feature_weight, batch_size, weight_decay, quantized)
    if labels is not None and batch_size is None:
        raise UsageError("recover: labels need a batch_size (they are matched to sample rows)")
    gm = student.graph_module
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    data = _check_samples(samples, n_inputs)
    targets = _teacher_outputs(teacher, data)

    params = list(gm.parameters())
    device = params[0].device
    gm.eval()
    # the student's outputs must match the teacher's, sample 0 stands for all
    with torch.no_grad():
        try:
            first = flatten_outputs(gm(*(t.to(device) for t in data[0])))
        except Exception as exc:  # noqa: BLE001
            raise DataError(f"recover: the program cannot run sample 0 ({_shapes(data[0])}): {type(exc).__name__}: {exc}") from exc
    if len(first) != len(targets[0]) or any(s.shape != t.shape for s, t in zip(first, targets[0])):
        raise UsageError(
            f"recover: the program's outputs ({_shapes(first)}) differ from the teacher's ({_shapes(targets[0])}); "
            "distillation needs outputs of the same shapes"
        )
    if not any(s.is_floating_point() for s in first):
        raise UsageError("recover: the program has no floating-point output to distill")

    batches = _Batches(data, targets, batch_size, seed, device, labels)
    first_loss = _full_loss(gm, batches, temperature, feature_weight)
    curve: list[float] = []
    stride = max(1, math.ceil(steps / CURVE_POINTS))
    start = time.perf_counter()
    if steps > 0:
        grad_state = [p.requires_grad for p in params]
        backup = {k: v.detach().clone() for k, v in gm.state_dict().items()}
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        window: list[float] = []
        try:
            for p in params:
                p.requires_grad_(True)
            with torch.enable_grad():
                for step in range(1, steps + 1):
                    if before_step is not None:
                        before_step(step)
                    inputs, target, step_labels = batches.next()
                    loss = _step_loss(flatten_outputs(gm(*inputs)), target, step_labels, temperature, feature_weight)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        gm.load_state_dict(backup)
                        raise UsageError(
                            f"recover: the distillation loss became {value} at step {step}; "
                            f"the weights were restored; try a smaller lr (was {lr:g})"
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    window.append(value)
                    if len(window) == stride or step == steps:
                        curve.append(sum(window) / len(window))
                        window = []
                    if progress is not None:
                        progress(step, steps, value)
        finally:
            for p, flag in zip(params, grad_state):
                p.requires_grad_(flag)
                p.grad = None
            gm.eval()
    seconds = time.perf_counter() - start
    last_loss = _full_loss(gm, batches, temperature, feature_weight) if steps > 0 else first_loss
    gm.eval()
    result = RecoveryResult(
        steps=steps,
        seconds=seconds,
        lr=float(lr),
        temperature=float(temperature),
        loss_curve=curve,
        first_loss=first_loss,
        last_loss=last_loss,
        batch_size=batch_size,
        feature_weight=float(feature_weight),
        curve_stride=stride,
    )
    student.meta[meta_key] = result.to_json()
    return result
