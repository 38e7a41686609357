"""Verification support: quantization and lowering error, lowering checks, ``verify_int8``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx import GraphModule, Node

from graphopt.fx_util import run_all
from graphopt.program import Program, flatten_outputs
from graphopt.quant.place import output_scales

# ---------------------------------------------------------------------------------------
# Verification support


def quantization_error(reference: Callable[..., Any], simulated: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]):
    """Error of the simulated-int8 program against the fp32 original (``verify.Comparison``)."""
    from graphopt.verify import compare

    return compare(run_all(reference, samples), run_all(simulated, samples))


def lowering_error(simulated: Callable[..., Any], artifact: Callable[..., Any], samples: Sequence[Sequence[torch.Tensor]]):
    """Error of a backend's artifact against the simulated-int8 program (``verify.Comparison``)."""
    from graphopt.verify import compare

    return compare(run_all(simulated, samples), run_all(artifact, samples))


@dataclass
class LoweringCheck:
    """Lowering error held to ``steps`` output quantization steps per output tensor."""

    ok: bool
    steps: float
    max_abs_err: list[float]
    bounds: list[float | None]
    violations: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": self.steps, "max_abs_err": self.max_abs_err, "bounds": self.bounds,
                "violations": self.violations}


def check_lowering(
    simulated: Program,
    artifact: Callable[..., Any],
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
    fallback_rel: float = 1e-2,
    outputs: tuple[list[Any], list[Any]] | None = None,
) -> LoweringCheck:
    """Max |artifact - simulated| per output must be <= ``steps`` x that output's scale.

    Outputs with no quantizer right before them (computed in fp32 after the last one)
    are held to ``fallback_rel`` of their range instead. ``outputs``: the simulated
    program's and the artifact's outputs on ``samples``, when already computed.
    """
    scales = output_scales(simulated.graph_module)
    sims, arts = outputs if outputs is not None else (run_all(simulated.run, samples), run_all(artifact, samples))
    errs: list[float] = []
    ranges: list[float] = []
    for s, a in zip(sims, arts):
        for k, (x, y) in enumerate(zip(flatten_outputs(s), flatten_outputs(a))):
            e = float((x.double() - y.double()).abs().max()) if x.numel() else 0.0
            r = float(x.double().abs().max()) if x.numel() else 0.0
            if k < len(errs):
                errs[k], ranges[k] = max(errs[k], e), max(ranges[k], r)
            else:
                errs.append(e)
                ranges.append(r)
    bounds: list[float | None] = []
    violations = []
    for k, e in enumerate(errs):
        scale = scales[k] if k < len(scales) else None
        bound = steps * scale if scale is not None else fallback_rel * ranges[k]
        bounds.append(scale * steps if scale is not None else None)
        if not e <= bound + 1e-7:
            what = f"{steps:g} output steps ({bound:.4g})" if scale is not None else f"{fallback_rel:g} of the output range"
            violations.append(f"output {k}: lowering error {e:.4g} exceeds {what}")
    return LoweringCheck(not violations, steps, errs, bounds, violations)


@dataclass
class LocalLoweringCheck:
    """Per-quantizer lowering error with the backend's own values fed forward.

    Every quantized activation of the lowered graph is compared with the simulated op
    applied to the *lowered* inputs, so rounding flips cannot accumulate through depth:
    each entry is that one op's error, in its own output quantization steps.
    """

    ok: bool
    steps: float
    errors: dict[str, float]  # quantizer -> max error in steps
    violations: list[str]

    def worst(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.errors.items(), key=lambda kv: -kv[1])[:n]

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "steps": self.steps, "worst": self.worst(), "compared": len(self.errors),
                "violations": self.violations}


def check_lowering_local(
    simulated: Program | GraphModule,
    lowered: GraphModule,
    points: dict[str, str],
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
) -> LocalLoweringCheck:
    """Hold every quantized op of an fx lowering to ``steps`` steps of its output scale.

    ``points`` maps a quantizer node of the simulated graph to the lowered node that
    computes the same quantized value (cpu-int8 records it). The lowered graph runs
    first; then the simulated graph runs with each quantizer's output replaced by the
    lowered value after comparing the two.
    """
    sim = simulated.graph_module if isinstance(simulated, Program) else simulated
    errors: dict[str, float] = {}

    for sample in samples:
        recorded: dict[str, Any] = {}

        class _Record(torch.fx.Interpreter):
            def run_node(self, n: Node) -> Any:
                out = super().run_node(n)
                recorded[n.name] = out
                return out

        class _Forced(torch.fx.Interpreter):
            def run_node(self, n: Node) -> Any:
                out = super().run_node(n)
                low = recorded.get(points.get(n.name, ""))
                if isinstance(low, torch.Tensor) and low.is_quantized and isinstance(out, torch.Tensor):
                    fq = sim.get_submodule(str(n.target))
                    low = fq.dequantize(low.int_repr().float())  # in the form the simulated op hands on
                    err = float((out - low).abs().max()) / fq.qparams.scale if out.numel() else 0.0
                    errors[n.name] = max(errors.get(n.name, 0.0), err)
                    return low
                return out

        with torch.inference_mode():
            _Record(lowered).run(*sample)
            _Forced(sim).run(*sample)
    violations = [f"{name}: {e:.2f} steps > {steps:g}" for name, e in errors.items() if not e <= steps + 1e-3]
    if not errors:
        violations.append("no quantized value of the lowering could be matched to the simulated program")
    return LocalLoweringCheck(not violations, steps, errors, violations)


def verify_int8(
    reference: Callable[..., Any],
    simulated: Program,
    artifact: Any,
    samples: Sequence[Sequence[torch.Tensor]],
    *,
    steps: float = 2.0,
    reference_outputs: list[Any] | None = None,
    artifact_outputs: list[Any] | None = None,
) -> dict[str, Any]:
    """Both halves of an int8 compile's error, for the report.

    ``quantization_error`` (simulated vs fp32: reported, held to the target's tolerance
    by the caller's usual check of artifact vs original) and ``lowering_error`` (artifact
    vs simulated). ``lowering_check`` holds the lowering to ``steps`` output steps end to
    end; where the artifact is an fx lowering that records its points (cpu-int8),
    ``lowering_local`` holds every quantized op to ``steps`` of its own steps (plus the
    artifact's ``extra_steps``), fed the lowering's own inputs. ``violations`` lists what
    failed the gate: the per-op check, plus the end-to-end one where the simulation reproduces the backend's arithmetic
    (``artifact.exact_simulation``: cpu-int8). Without that, one-step rounding ties
    compound through a deep net into several output steps, so only the per-op bound is
    a fair gate (ort-int8). ``reference_outputs``/``artifact_outputs``: those programs'
    outputs on ``samples``, when the caller has them already.
    """
    from graphopt.verify import compare

    # each program runs once (the kernel-exact simulation costs float64 convolutions)
    refs = list(reference_outputs) if reference_outputs is not None else run_all(reference, samples)
    arts = list(artifact_outputs) if artifact_outputs is not None else run_all(artifact.run, samples)
    sims = run_all(simulated.run, samples)
    quant, low = compare(refs, sims), compare(sims, arts)
    end_to_end = check_lowering(simulated, artifact.run, samples, steps=steps, outputs=(sims, arts))
    exact = artifact.exact_simulation
    result: dict[str, Any] = {
        "quantization_error": quant.metrics.to_json(),
        "lowering_error": low.metrics.to_json(),
        "lowering_check": end_to_end.to_json(),
        "exact_simulation": exact,
        "violations": [],
    }
    gm, points = artifact.graph_module, artifact.points  # declared on Artifact
    violations: list[str] = []
    if isinstance(gm, GraphModule) and points:
        local = check_lowering_local(simulated, gm, points, samples[:2], steps=steps + getattr(artifact, "extra_steps", 0.0))
        result["lowering_local"] = local.to_json()
        violations += local.violations
        if exact:
            violations += end_to_end.violations
    else:
        violations += end_to_end.violations
    result["violations"] = [f"lowering: {v}" for v in violations]
    return result


