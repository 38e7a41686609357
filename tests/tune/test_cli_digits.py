"""The worked example through the real CLI: a trained digits CNN tuned for cpu-int8 with the user's eval (few trials)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from graphopt.compiler import load_artifact
from graphopt.datasets import digits_accuracy, digits_cnn, write_digits_npz

ROOT = Path(__file__).resolve().parents[2]


def test_tune_digits_cnn_for_cpu_int8(tmp_path):
    base = digits_accuracy(digits_cnn())  # also trains and caches the model once, before the trials' processes need it
    write_digits_npz(tmp_path / "train.npz")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "graphopt.cli", "tune", "graphopt.datasets:digits_cnn", "--target", "cpu-int8",
           "--eval", "graphopt.datasets:digits_accuracy", "--max-drop", "1.0", "--trials", "2", "--no-latency",
           "--search", "prune{ratio=0.3..0.5,rounds=1,importance=[l1]},quant{qat-steps=[0,20],keep-fp32=none},recover{steps=150}",
           "--calib-data", "graphopt.datasets:digits", "--train-data", "train.npz", "-o", "out"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "tune.json").read_text())
    assert doc["baseline"] == base and doc["metric"] == "graphopt.datasets:digits_accuracy" and doc["note"] is None
    assert [t["status"] for t in doc["trials"]] == ["complete", "complete"]
    for t in doc["trials"]:
        m = t["metrics"]
        assert m["macs"]["compiled"] < 0.75 * m["macs"]["original"]  # 30-50% of the channels pruned
        assert "prune-channels{ratio=" in t["pipeline"] and "insert-quant-stubs{activations=u8,observer=" in t["pipeline"]
        assert t["options"]["recover_steps"] == 150
        report = json.loads((out / "trials" / f"{t['number']:04d}" / "artifact" / "report.json").read_text())
        assert report["verification"]["passed"] and report["training_data"]["labels"] is True
        assert ("qat" in report) == ("qat_steps" in t["options"])
    best = doc["best"]
    assert best is not None, result.stdout  # 150 distillation steps keep a 30-50% pruned digits CNN within a point
    assert f"pipeline: {best['pipeline']}" in result.stdout and "rerun it with: graphopt compile" in result.stdout
    # OUT/best is an ordinary artifact: loaded back, it scores what the trial scored
    artifact = load_artifact(out / "best")
    assert artifact.target == "cpu-int8"
    torch.manual_seed(0)
    assert abs(digits_accuracy(artifact) - best["score"]) < 1e-6
    assert best["score"] >= base - 1.0
    # the report shows the pipeline that ran: the trial's, plus the default int8 fallback's options the compiler adds
    ran = json.loads((out / "best" / "report.json").read_text())["pipeline"]
    assert re.sub(r",keep-fp32=\[auto\],keep-fp32-cosine=[0-9.]+,keep-fp32-top1=[0-9.]+", "", ran) == best["pipeline"]
    assert (out / "report.html").exists() and (out / "pareto_macs.png").exists()
