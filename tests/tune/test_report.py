"""The Pareto set on a synthetic objective, the best trial under --max-drop, and the reports (HTML parsed, PNG decoded)."""

from __future__ import annotations

import base64
import io
import json
import random
from html.parser import HTMLParser

import numpy as np
import optuna
import pytest

from graphopt.tune.report import best_within, pareto, write_reports

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _row(number, score, macs, status="complete"):
    return {"number": number, "status": status, "error": None, "target": "cpu-int8", "pipeline": f"p{number}", "options": {},
            "command": f"graphopt compile x --pipeline p{number}",
            "metrics": {"score": score, "macs": {"original": 1000, "compiled": macs},
                        "size_bytes": {"original": 4000, "compiled": macs * 4}, "latency_ms": {"original": 1.0, "compiled": macs / 1000}}}


def _synthetic(n=200, seed=0):
    """Score = a noisy saturating function of cost: a few points per cost level, many dominated."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        macs = rng.randint(1, 40) * 25
        score = round(100 - 3000 / (macs + 20) + rng.uniform(-5, 0), 1)
        rows.append(_row(i, score, macs))
    rows.append(_row(n, 99.0, 10, status="failed"))  # never on the front, however good it looks
    return rows


def test_pareto_set_on_a_synthetic_objective():
    rows = _synthetic()
    front = pareto(rows, "macs")
    done = [r for r in rows if r["status"] == "complete"]
    points = {(r["metrics"]["score"], r["metrics"]["macs"]["compiled"]) for r in done}
    brute = {(s, c) for s, c in points if not any(s2 >= s and c2 <= c and (s2, c2) != (s, c) for s2, c2 in points)}
    assert {(r["metrics"]["score"], r["metrics"]["macs"]["compiled"]) for r in front} == brute
    assert len(front) >= 5
    costs = [r["metrics"]["macs"]["compiled"] for r in front]
    scores = [r["metrics"]["score"] for r in front]
    assert costs == sorted(costs) and scores == sorted(scores)  # cheaper is worse along the front
    assert all(r["status"] == "complete" for r in front)

    # Optuna's own front of the same values agrees
    study = optuna.create_study(directions=["maximize", "minimize"])
    for r in done:
        study.add_trial(optuna.trial.create_trial(values=[r["metrics"]["score"], r["metrics"]["macs"]["compiled"]]))
    assert {tuple(t.values) for t in study.best_trials} == brute


def test_best_within_max_drop():
    rows = [_row(0, 98.0, 500), _row(1, 97.5, 300), _row(2, 96.0, 100), _row(3, 97.2, 300), _row(4, 99.0, 50, "pruned")]
    assert best_within(rows, "macs", 98.5, 1.0)["number"] == 1  # cheapest within 1.0; ties go to the higher score
    assert best_within(rows, "macs", 98.5, 3.0)["number"] == 2
    assert best_within(rows, "macs", 98.5, 0.1) is None


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.in_td, self.external = [], [], False, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag in ("script", "link") or (tag == "img" and not attrs["src"].startswith("data:")):
            self.external.append(tag)
        self.in_td = tag == "td"

    def handle_data(self, data):
        if self.in_td:
            self.cells.append(data)


def test_html_report_holds_the_table_and_real_plots(tmp_path):
    from PIL import Image

    rows = _synthetic(60)
    summary = {"source": "zoo:x", "metric": "accuracy (%)", "baseline": 98.0, "max_drop": 1.0, "counts": {"complete": 60},
               "note": None, "best": None}
    paths = write_reports(tmp_path, summary, rows, "macs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto_latency.png", "pareto_macs.png", "pareto_size.png",
                                                          "report.html", "tune.json"]
    doc = json.loads(paths["json"].read_text())
    assert [t["number"] for t in doc["trials"]] == list(range(61)) and doc["trials"][-1]["status"] == "failed"

    parser = _Collect()
    parser.feed(paths["html"].read_text())
    assert not parser.external  # self-contained: no script, stylesheet link or image from elsewhere
    front = pareto(rows, "macs")
    assert [c for c in parser.cells if c.startswith("#")] == [f"#{r['number']}" for r in front]
    assert len(parser.images) == 3
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB")
        assert image.size == (700, 450)
        pixels = np.asarray(image)
        colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
        assert len(colours) > 50  # a drawn plot, not a blank canvas
        # the Pareto front's red (#d1495b) and the trials' grey (#9aa5b1) are both drawn
        for rgb in ((0xd1, 0x49, 0x5b), (0x9a, 0xa5, 0xb1)):
            assert (np.abs(pixels.astype(int) - rgb).sum(axis=2) < 12).sum() > 30, rgb
    assert paths["png_macs"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("status", ["failed", "pruned"])
def test_reports_without_a_complete_trial(tmp_path, status):
    rows = [_row(0, 0.0, 10, status)]
    summary = {"source": "zoo:x", "metric": "m", "baseline": 1.0, "max_drop": 1.0, "counts": {status: 1}, "note": "n", "best": None}
    paths = write_reports(tmp_path, summary, rows, "macs")
    assert "png_macs" not in paths and "No trial stayed within the max drop" in paths["html"].read_text()
