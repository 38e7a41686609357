"""Every zoo model's compiled outputs, bit for bit, against outputs recorded by an earlier code path.

The files under ``tests/data/outputs/`` were written by the compiler as it stood before
the core reshape (issue 10: quant package, rounding strategies, one Q/DQ exporter,
``CompileOptions``); a refactor that changes any compiled number fails here. Each
compile goes through the CLI (the interface that the reshape keeps), then the saved
artifact is loaded back and run on fixed inputs.

Bit-exactness holds on the CPU the files were recorded on (oneDNN and the pools pick
their arithmetic per CPU); elsewhere the outputs are held to the target's own lowering
bound instead, and the test says so. Re-record (only when a change is *meant* to move
numbers) with ``GRAPHOPT_RECORD_OUTPUTS=1 pytest tests/backends/test_outputs_unchanged.py``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from graphopt import zoo
from graphopt.cli import cli
from graphopt.compiler import load_artifact

DATA = Path(__file__).resolve().parent.parent / "data" / "outputs"
TARGETS = ["cpu-fp32", "cpu-int8", "ort-fp32", "ort-int8"]
RECORD = os.environ.get("GRAPHOPT_RECORD_OUTPUTS") == "1"


def _cpu_signature() -> str:
    """The CPU model and its SIMD features: what the int8 kernels' arithmetic depends on."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    simd = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")))
    return f"{model} | {' '.join(simd)}"


def _shape(name: str) -> tuple[int, ...]:
    return zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, 48, 48)


def _compiled_outputs(name: str, target: str, out: Path) -> list[np.ndarray]:
    shape = _shape(name)
    args = ["compile", f"zoo:{name}", "--target", target, "-o", str(out), "--input-shape", "x".join(map(str, shape)),
            "--calib-samples", "4", "--verify-samples", "2", "--seed", "0", "--no-latency", "-q",
            # random weights and calibration: what is checked here is that numbers do not move, not int8 quality
            "--min-top1", "0", "--min-cosine", "0.9"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)
    g = torch.Generator().manual_seed(1234)
    outputs = []
    with torch.inference_mode():
        for _ in range(2):
            y = artifact.run(torch.randn(shape, generator=g))
            outputs.append(y.detach().float().numpy().copy())
    return outputs


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", zoo.names())
def test_compiled_outputs_unchanged(name: str, target: str, tmp_path: Path) -> None:
    outputs = _compiled_outputs(name, target, tmp_path / "out")
    path = DATA / f"{name}.{target}.npz"
    signature = _cpu_signature()
    if RECORD:
        DATA.mkdir(parents=True, exist_ok=True)
        np.savez(path, meta=np.array(json.dumps({"cpu": signature, "torch": torch.__version__})),
                 **{f"out{i}": o for i, o in enumerate(outputs)})
        return
    assert path.is_file(), f"{path} is missing: record it with GRAPHOPT_RECORD_OUTPUTS=1"
    recorded = np.load(path, allow_pickle=False)
    meta = json.loads(str(recorded["meta"]))
    expected = [recorded[f"out{i}"] for i in range(len(outputs))]
    if meta["cpu"] == signature:
        for i, (got, want) in enumerate(zip(outputs, expected)):
            assert np.array_equal(got, want), (
                f"{name} on {target}, input {i}: outputs moved (max abs diff {np.abs(got - want).max():.3g}) "
                "since they were recorded"
            )
    else:
        # Another CPU: int8 kernels may round ties another way; hold the outputs to a
        # few quantization steps of the logits' range instead of bit-exactness.
        for got, want in zip(outputs, expected):
            span = float(np.abs(want).max()) or 1.0
            bound = 1e-4 * span if target.endswith("fp32") else 0.1 * span
            assert np.abs(got - want).max() <= bound, f"{name} on {target} (recorded on another CPU: {meta['cpu']})"
