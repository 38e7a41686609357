"""The compile report: a terminal table and ``report.json``."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphopt.pipeline import PassRecord
from graphopt.verify import TOP1_RULE, Comparison, Metrics, Tolerance

__all__ = ["Report", "Verification"]


@dataclass
class Verification:
    passed: bool
    metrics: Metrics
    tolerance: Tolerance
    samples: int
    violations: list[str] = field(default_factory=list)
    comparison: Comparison | None = None

    def to_json(self) -> dict[str, Any]:
        worst = []
        if self.comparison is not None:
            worst = [
                {"sample": w.sample, "output": w.output, "shape": list(w.shape), **w.metrics.to_json()}
                for w in self.comparison.worst()
            ]
        return {
            "passed": self.passed,
            "metrics": self.metrics.to_json(),
            "tolerance": self.tolerance.to_json(),
            "samples": self.samples,
            "top1_rule": TOP1_RULE,
            "violations": self.violations,
            "worst": worst,
        }


@dataclass
class Report:
    source: str
    target: str
    pipeline: str
    passes: list[PassRecord] = field(default_factory=list)
    verification: Verification | None = None
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    size_bytes: dict[str, int | None] = field(default_factory=dict)
    macs: dict[str, int | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "pipeline": self.pipeline,
            "passes": [p.to_json() for p in self.passes],
            "verification": self.verification.to_json() if self.verification else None,
            "latency_ms": self.latency_ms,
            "size_bytes": self.size_bytes,
            "macs": self.macs,
            "warnings": self.warnings,
            **self.extra,
        }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def render(self, console: Any) -> None:
        """Print the tables to a rich Console."""
        from rich.table import Table

        passes = Table(title=f"{self.source} → {self.target}", title_justify="left")
        for col in ("pass", "time (ms)", "nodes", "detail"):
            passes.add_column(col, justify="right" if col in ("time (ms)", "nodes") else "left")
        for p in self.passes:
            passes.add_row(p.name, f"{p.seconds * 1e3:.1f}", f"{p.nodes_before} → {p.nodes_after}", p.detail)
        console.print(passes)
        for p in self.passes:
            layers = [row for row in p.data.get("layers", []) if isinstance(row, dict) and "weight_error" in row]
            if layers:  # per-layer decisions of a rewrite (depthwise-substitution): r, error, MACs
                table = Table(title=f"{p.name}: per layer", title_justify="left")
                for col in ("layer", "status", "r", "weight error", "MACs before", "MACs after"):
                    table.add_column(col, justify="left" if col in ("layer", "status") else "right")
                for row in layers:
                    table.add_row(row["name"], row["status"], f"{row['r']}/{row.get('max_r', '?')}", f"{row['weight_error']:.4f}",
                                  f"{row['macs_before']:,}", f"{row['macs_after']:,}")
                console.print(table)

        summary = Table(show_header=True)
        summary.add_column("")
        summary.add_column("original", justify="right")
        summary.add_column("compiled", justify="right")
        summary.add_column("ratio", justify="right")

        def row(label: str, d: dict[str, Any], fmt: str) -> None:
            o, c = d.get("original"), d.get("compiled")
            ratio = f"{c / o:.2f}×" if o and c is not None else ""
            summary.add_row(label, fmt.format(o) if o is not None else "–", fmt.format(c) if c is not None else "–", ratio)

        row("latency p50 (ms)", self.latency_ms, "{:.2f}")
        row("size (MB)", {k: (v / 1e6 if v is not None else None) for k, v in self.size_bytes.items()}, "{:.2f}")
        row("MMACs", {k: (v / 1e6 if v is not None else None) for k, v in self.macs.items()}, "{:.1f}")
        console.print(summary)

        if self.verification is not None:
            v = self.verification
            m = v.metrics
            top1 = "n/a" if m.top1_agreement is None else f"{m.top1_agreement:.3f}"
            if m.top1_rows:
                top1 += f" ({m.top1_counted} of {m.top1_rows} rows counted: {TOP1_RULE})"
            status = "[green]PASSED[/green]" if v.passed else "[red]FAILED[/red]"
            against = f" against {self.extra['reference']}" if self.extra.get("reference") else ""
            console.print(
                f"verification {status} on {v.samples} inputs{against}: max_abs_err {m.max_abs_err:.3g}, "
                f"max_rel_err {m.max_rel_err:.3g}, cosine {m.cosine:.6f}, sqnr {m.sqnr_db:.1f} dB, top1 {top1}"
            )
            if not v.passed:
                worst = Table(title="worst outputs", title_justify="left")
                for col in ("input", "output", "shape", "max_abs_err", "max_rel_err", "cosine"):
                    worst.add_column(col)
                for w in (v.comparison.worst() if v.comparison else []):
                    worst.add_row(str(w.sample), str(w.output), "x".join(map(str, w.shape)),
                                  f"{w.metrics.max_abs_err:.3g}", f"{w.metrics.max_rel_err:.3g}", f"{w.metrics.cosine:.6f}")
                console.print(worst)
        for line in self.detail_lines():
            console.print(line)
        for w in self.warnings:
            console.print(f"[yellow]warning:[/yellow] {w}")

    def detail_lines(self) -> list[str]:
        """One line each for the error split, the layers kept out of int8, calibration and recovery."""
        lines = []
        split = self.extra.get("int8_verification")
        if split:
            q, lo = split["quantization_error"], split["lowering_error"]
            local = split.get("lowering_local") or {}
            worst = max((w[1] for w in local.get("worst", [])), default=None)
            per_op = f", worst op {worst:g} quantization steps" if worst is not None else ""
            e2e = split.get("lowering_check") or {}
            steps = [e / b * e2e["steps"] for e, b in zip(e2e.get("max_abs_err", []), e2e.get("bounds", [])) if b]
            if steps:
                per_op += f", output {max(steps):g} steps"
            if split.get("exact_simulation"):
                per_op += " (bit-exact simulation)" if lo["max_abs_err"] == 0 else " (simulation mirrors the kernels)"
            lines.append(
                f"  quantization error (simulated int8 vs the fp32 program before it): cosine {q['cosine']:.6f}, sqnr {q['sqnr_db']:.1f} dB, "
                f"max_abs_err {q['max_abs_err']:.3g}"
            )
            lines.append(
                f"  lowering error ({self.target} vs simulated int8): max_abs_err {lo['max_abs_err']:.3g}, "
                f"cosine {lo['cosine']:.6f}{per_op}"
            )
        elif "lowering_error" in self.extra:
            lo = self.extra["lowering_error"]
            lines.append(f"  lowering error ({self.target} vs optimized program): max_rel_err {lo['max_rel_err']:.3g}")
        quant = self.extra.get("quantization") or {}
        # what the part left out of int8 runs in: fp32, or bf16 under ov-int8 --float-precision bf16
        fl = (self.extra.get("openvino") or {}).get("float_precision", "fp32")
        kept = quant.get("kept_fp32") or []
        if kept:
            why = ", ".join(
                f"{k['layer']} ({k['reason']}" + (f", sensitivity {k['sensitivity']:.3g})" if "sensitivity" in k else ")")
                for k in kept
            )
            lines.append(f"kept in {fl}: {why}")
        floats = quant.get("float_ops") or []
        if floats:
            counts = Counter(f["op"] for f in floats)
            ops = ", ".join(f"{op} x{k}" for op, k in counts.items())
            lines.append(f"{fl} ops (no int8 kernel, between dequantize and quantize): {ops}")
        trt = self.extra.get("tensorrt")
        if trt:
            layers = trt.get("layer_precisions")
            per_layer = f"; engine layers by precision: {', '.join(f'{k} {v}' for k, v in layers.items())}" if layers else ""
            lines.append(f"tensorrt: {trt['runtime']}{per_layer}")
        ov = self.extra.get("openvino")
        if ov:
            layers = ", ".join(f"{k} {v}" for k, v in ov["layer_precisions"].items())
            bound = (split or {}).get("lowering_local", {}).get("steps")
            held = f"; each quantized op held to {bound:g} output steps" if bound is not None else ""
            lines.append(f"openvino: float part (--float-precision) in {ov['float_precision']}{held}; "
                         f"layers by precision: {layers}")
        cal = self.extra.get("calibration")
        if cal:
            lines.append(f"calibration: {cal['source']}")
        rec = self.extra.get("recovery")
        if rec:
            lines.append(
                f"recovery: {rec['steps']} distillation steps in {rec['seconds']:.1f} s, "
                f"loss {rec['first_loss']:.4g} → {rec['last_loss']:.4g}"
            )
        took = self.extra.get("compile_seconds")
        if took:  # the compiler's clock: phases, then their total
            phases = ", ".join(f"{k} {v:.1f}" for k, v in took.items() if k != "total")
            lines.append(f"compile time: {took['total']:.1f} s ({phases})")
        return lines
