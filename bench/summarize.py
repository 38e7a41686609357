"""Markdown tables of medians and ratios from pytest-benchmark JSON files.

    python -m pytest bench/test_bench_int8.py --benchmark-only --benchmark-json=int8.json
    python bench/summarize.py int8.json [more.json ...]

One table per benchmark group: each row's median (ms), its ratio to the group's first
row in the suite's parameter order (the baseline: eager fp32, the unpruned model, the
original), and ``extra_info`` (MACs) where a row has it.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def _variant(bench: dict) -> str:
    params = bench.get("params") or {}
    for key in ("variant", "blocks"):
        if key in params:
            return str(params[key])
    return bench["name"]


def summarize(paths: list[str]) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    machine = ""
    for path in paths:
        data = json.loads(open(path).read())
        info = data.get("machine_info", {})
        cpu = info.get("cpu", {})
        machine = f"{cpu.get('brand_raw', '?')}, {cpu.get('count', '?')} cores, python {info.get('python_version', '?')}"
        for bench in data["benchmarks"]:
            groups[bench["group"] or bench["name"]].append(bench)
    out = [f"_{machine}_", ""]
    for group, rows in groups.items():
        base = rows[0]["stats"]["median"]
        has_macs = any("macs" in r.get("extra_info", {}) for r in rows)
        out.append(f"**{group}**\n")
        out.append("| variant | median (ms) | min (ms) | rounds | × first row |" + (" MACs (M) |" if has_macs else ""))
        out.append("|---|---:|---:|---:|---:|" + ("---:|" if has_macs else ""))
        for r in rows:
            s = r["stats"]
            line = f"| {_variant(r)} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {s['rounds']} | {s['median'] / base:.2f} |"
            if has_macs:
                macs = r.get("extra_info", {}).get("macs")
                line += f" {macs / 1e6:.0f} |" if macs else " – |"
            out.append(line)
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1:]))
