"""Capture time of an ONNX ResNet-50 (torch.onnx.export, opset 17, 1x3x224x224): load, fold, convert, finish.

Prints the median of 5 captures (wall time, and the process's CPU time, which a busy shared machine
inflates less) and where the wall time of one goes. ``python bench/measure_onnx_capture.py``
"""

from __future__ import annotations

import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from graphopt import zoo
from graphopt.capture import capture
from graphopt.capture.common import finish
from graphopt.capture.onnx_file.convert import build_graph_module
from graphopt.capture.onnx_file.load import load, prepare


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(zoo.build("resnet50").eval(), (torch.randn(1, 3, 224, 224),), str(path), opset_version=17,
                              dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "N"}})
        capture(str(path))  # warm imports
        times, cpu = [], []
        for _ in range(5):
            start, start_cpu = time.perf_counter(), time.process_time()
            capture(str(path))
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        t0 = time.perf_counter()
        model = load(path, "m")
        t1 = time.perf_counter()
        prepared = prepare(model, "m", None)
        t2 = time.perf_counter()
        gm = build_graph_module(prepared, "m")
        t3 = time.perf_counter()
        finish(gm, "m", {}, shapes=[(1, 3, 224, 224)], deterministic_ops=True)  # as from_onnx calls it
        t4 = time.perf_counter()
        print(f"ONNX ResNet-50 capture: median {statistics.median(times) * 1000:.0f} ms over 5 "
              f"(CPU time {statistics.median(cpu) * 1000:.0f} ms) "
              f"(load {1000 * (t1 - t0):.0f}, fold {1000 * (t2 - t1):.0f}, convert {1000 * (t3 - t2):.0f}, "
              f"finish {1000 * (t4 - t3):.0f} ms)")


if __name__ == "__main__":
    main()
