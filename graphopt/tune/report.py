"""What ``graphopt tune`` writes: tune.json, the Pareto table, PNG plots and a self-contained HTML report.

- :func:`pareto`: the rows no other row beats on both score (higher) and cost (lower);
- :func:`best_within`: the cheapest complete trial whose score is within ``max_drop`` of the original's;
- :func:`write_reports`: ``tune.json`` (every trial: pipeline, options, metrics, status, error),
  ``pareto_<cost>.png`` per cost (latency, size, MACs vs score) and ``report.html`` with the
  table and the plots inlined as base64 (no network needed to view it);
- :func:`render_table`: the Pareto front as a rich table for the terminal.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COSTS", "pareto", "best_within", "cost_of", "write_reports", "render_table", "plot"]

#: cost name -> (metric key, axis label, display scale)
COSTS = {"latency": ("latency_ms", "latency p50 (ms)", 1.0), "size": ("size_bytes", "size (KB)", 1 / 1024),
         "macs": ("macs", "MACs (millions)", 1e-6)}


def cost_of(row: dict[str, Any], cost: str, which: str = "compiled") -> float | None:
    value = (row.get("metrics", {}).get(COSTS[cost][0]) or {}).get(which)
    return float(value) if value is not None else None


def _complete(rows: Sequence[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "complete" and "score" in r["metrics"] and cost_of(r, cost) is not None]


def pareto(rows: Sequence[dict[str, Any]], cost: str) -> list[dict[str, Any]]:
    """The complete rows on the front of (score ↑, cost ↓), cheapest first (ties: one row per point)."""
    done = _complete(rows, cost)
    front = []
    for r in done:
        s, c = r["metrics"]["score"], cost_of(r, cost)
        dominated = any(o["metrics"]["score"] >= s and cost_of(o, cost) <= c and
                        (o["metrics"]["score"] > s or cost_of(o, cost) < c) for o in done)
        if not dominated and not any(f["metrics"]["score"] == s and cost_of(f, cost) == c for f in front):
            front.append(r)
    return sorted(front, key=lambda r: (cost_of(r, cost), -r["metrics"]["score"]))


def best_within(rows: Sequence[dict[str, Any]], cost: str, baseline: float, max_drop: float) -> dict[str, Any] | None:
    """The cheapest complete row scoring at least ``baseline - max_drop`` (ties: the higher score, then the first)."""
    ok = [r for r in _complete(rows, cost) if r["metrics"]["score"] >= baseline - max_drop - 1e-9]
    return min(ok, key=lambda r: (cost_of(r, cost), -r["metrics"]["score"], r["number"])) if ok else None


def _original_cost(rows: Sequence[dict[str, Any]], cost: str) -> float | None:
    return next((cost_of(r, cost, "original") for r in _complete(rows, cost)), None)


def plot(rows: Sequence[dict[str, Any]], cost: str, baseline: float, max_drop: float, metric: str, path: Path) -> Path:
    """Score vs cost of every complete trial, the Pareto front as a step line, the original and the max-drop line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    _, label, scale = COSTS[cost]
    done, front = _complete(rows, cost), pareto(rows, cost)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        ax.scatter([cost_of(r, cost) * scale for r in done], [r["metrics"]["score"] for r in done], s=28,
                   color="#9aa5b1", label="trials", zorder=2)
        ax.step([cost_of(r, cost) * scale for r in front], [r["metrics"]["score"] for r in front], where="post",
                color="#d1495b", marker="o", label="Pareto front", zorder=3)
        original = _original_cost(rows, cost)
        if original is not None:
            ax.scatter([original * scale], [baseline], marker="*", s=160, color="#2e4057", label="original", zorder=4)
        ax.axhline(baseline - max_drop, color="#edae49", linestyle="--", label=f"max drop ({max_drop:g})")
        for r in front:
            ax.annotate(f"#{r['number']}", (cost_of(r, cost) * scale, r["metrics"]["score"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel(metric)
        ax.set_title(f"score vs {cost}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path


def _table_rows(rows: Sequence[dict[str, Any]], cost: str, baseline: float) -> list[list[str]]:
    out = []
    for r in pareto(rows, cost):
        m = r["metrics"]
        ratio = cost_of(r, cost) / (cost_of(r, cost, "original") or 1)
        out.append([f"#{r['number']}", f"{m['score']:.2f}", f"{m['score'] - baseline:+.2f}",
                    f"{(m.get('macs') or {}).get('compiled', 0) / 1e6:.3f}", f"{(m.get('size_bytes') or {}).get('compiled', 0) / 1024:.1f}",
                    f"{(m.get('latency_ms') or {}).get('compiled') or float('nan'):.3f}", f"×{ratio:.2f}", r["target"] or "",
                    r["pipeline"] or ""])
    return out


HEADER = ["trial", "score", "Δ score", "MMACs", "size KB", "latency ms", "cost vs original", "target", "pipeline"]


def render_table(console: Any, rows: Sequence[dict[str, Any]], cost: str, baseline: float, metric: str) -> None:
    from rich.table import Table

    table = Table(title=f"Pareto front: {metric} vs {cost} (original: {baseline:.2f})")
    for col in HEADER[:-1]:
        table.add_column(col)
    lines = _table_rows(rows, cost, baseline)
    for row in lines:
        table.add_row(*row[:-1])
    console.print(table)
    for row in lines:  # pipelines are long: one line each, under the table
        console.print(f"{row[0]}: {row[-1]}")


def _html(summary: dict[str, Any], rows: Sequence[dict[str, Any]], cost: str, plots: dict[str, Path]) -> str:
    esc = html.escape
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in _table_rows(rows, cost, summary["baseline"]))
    counts = ", ".join(f"{n} {s}" for s, n in summary["counts"].items())
    imgs = "".join(f'<h2>score vs {esc(name)}</h2><img alt="Pareto front, score vs {esc(name)}" '
                   f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">' for name, p in plots.items())
    best = summary.get("best")
    best_html = (f"<p>Best within the max drop: trial #{best['number']} — <code>{esc(best['command'] or '')}</code></p>"
                 if best else "<p>No trial stayed within the max drop.</p>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>graphopt tune: {esc(summary['source'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;
font-size:13px}}code{{background:#f4f4f4}}</style></head><body>
<h1>graphopt tune: {esc(summary['source'])}</h1>
<p>Score: {esc(summary['metric'])}. Original: {summary['baseline']:.2f}; max drop {summary['max_drop']:g};
objective: {esc(cost)}. Trials: {esc(counts)}.</p>
{"<p><b>" + esc(summary["note"]) + "</b></p>" if summary.get("note") else ""}
{best_html}
<table id="pareto"><thead><tr>{"".join(f"<th>{esc(h)}</th>" for h in HEADER)}</tr></thead><tbody>{body}</tbody></table>
{imgs}
</body></html>
"""


def _atomic_write(path: Path, data: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_reports(out: Path, summary: dict[str, Any], rows: Sequence[dict[str, Any]], cost: str) -> dict[str, Path]:
    """tune.json, one PNG per cost with data, report.html: the paths written, by kind."""
    paths: dict[str, Path] = {"json": out / "tune.json"}
    _atomic_write(paths["json"], json.dumps({**summary, "trials": list(rows)}, indent=1, default=str))
    plots: dict[str, Path] = {}
    for name in (cost, *(c for c in COSTS if c != cost)):
        if _complete(rows, name):
            tmp = out / f".pareto_{name}.{os.getpid()}.png"
            plot(rows, name, summary["baseline"], summary["max_drop"], summary["metric"], tmp)
            plots[name] = out / f"pareto_{name}.png"
            os.replace(tmp, plots[name])
    paths.update({f"png_{k}": p for k, p in plots.items()})
    paths["html"] = out / "report.html"
    _atomic_write(paths["html"], _html(summary, rows, cost, plots))
    return paths
