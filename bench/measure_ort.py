"""Latency of ort-fp32 and ort-int8 against eager fp32 and ONNX Runtime's own quantizer.

    python bench/measure_ort.py [--models resnet18,resnet50,mobilenet_v2] [--runs 50] [--size 224]

ONNX Runtime's ``quantize_static`` (QDQ format, QUInt8 activations, QInt8 weights,
per_channel=True, MinMax calibration on the same samples) applied to the ort-fp32
model is the reference to beat; it is used here only, never inside graphopt. Every
variant is timed at batch 1 on the same input, interleaved round by round so that
machine noise hits all alike (in blocks of consecutive runs: ONNX Runtime's
threads spin after a run and would slow the next variant); medians and minimums are
printed (ms), with ort-int8 / ort-fp32 and ort-int8 / quantize_static (medians), and
each model's cosine against eager fp32 on that input.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.fx

warnings.filterwarnings("ignore")


def _host():
    from graphopt.plugins import default_host

    return default_host()  # built-in passes and targets come from the installed entry points


def build(host, name: str, target: str, calib: list[torch.Tensor], directory: Path):
    """Compile zoo ``name`` for ``target``, save it, load it back (what a user runs)."""
    from graphopt import zoo
    from graphopt.compiler import load_artifact
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.program import Program

    spec = host.targets.get(target)
    program = Program(torch.fx.symbolic_trace(zoo.build(name)), (calib[0],))
    program.propagate_shapes()
    program.calibration = [(c,) for c in calib]
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    out = directory / target
    artifact.save(out)
    return load_artifact(out, host=host), out / "model.onnx"


def build_reference(fp32_onnx: Path, calib: list[torch.Tensor], directory: Path):
    """ONNX Runtime's quantize_static on the ort-fp32 model; returns a run(x) callable and the file."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    from graphopt.backends.ort import default_threads

    input_name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: c.numpy()} for c in calib])

        def get_next(self):
            return next(self.items, None)

    out = directory / "ort_quantize_static.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing": the ort-fp32 model is already optimized
    quantize_static(str(fp32_onnx), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = default_threads()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(out), so, providers=["CPUExecutionProvider"])
    return (lambda x: torch.from_numpy(sess.run(None, {input_name: x.numpy()})[0])), out


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5, help="Blocks of runs per variant, interleaved.")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="Keep the .onnx files here (to compare graphs).")
    args = ap.parse_args()
    import onnxruntime

    from graphopt import zoo
    from graphopt.backends.ort import default_threads

    host = _host()
    torch.manual_seed(0)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__} "
          f"({default_threads()} intra-op threads), cpu: {os.cpu_count()} cores")
    rows = []
    for name in args.models.split(","):
        x = torch.randn(1, 3, args.size, args.size)
        calib = [torch.randn(1, 3, args.size, args.size) for _ in range(args.calib)]
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(args.keep / name) if args.keep else Path(tmp)
            d.mkdir(parents=True, exist_ok=True)
            eager = zoo.build(name)
            fp32, fp32_file = build(host, name, "ort-fp32", calib, d)
            int8, int8_file = build(host, name, "ort-int8", calib, d)
            ref, ref_file = build_reference(fp32_file, calib, d)
            variants = {"eager fp32": eager, "ort-fp32": fp32.run, "ort-int8 (ours, u8)": int8.run,
                        "ort quantize_static": ref}
            sizes = {"ort-fp32": fp32_file.stat().st_size, "ort-int8 (ours, u8)": int8_file.stat().st_size,
                     "ort quantize_static": ref_file.stat().st_size}
            times: dict[str, list[float]] = {k: [] for k in variants}
            with torch.inference_mode():
                want = eager(x)
                cos = {k: _cos(want, fn(x)) for k, fn in variants.items()}
                for fn in variants.values():
                    for _ in range(5):
                        fn(x)
                # Blocks of consecutive runs, blocks interleaved: ONNX Runtime's idle threads
                # spin for a while after a run and would slow whatever runs right after them.
                block = max(1, args.runs // args.rounds)
                for _ in range(args.rounds):
                    for key, fn in variants.items():
                        fn(x)  # not timed: the previous variant's threads may still spin
                        for _ in range(block):
                            t0 = time.perf_counter()
                            fn(x)
                            times[key].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        best = {k: min(v) for k, v in times.items()}
        print(f"\n{name} 1x3x{args.size}x{args.size}, {len(times['ort-fp32'])} runs each")
        print(f"  {'variant':22s} {'median ms':>10s} {'min ms':>8s} {'cos vs fp32':>12s} {'model MB':>9s}")
        for k, v in med.items():
            size = f"{sizes[k] / 2**20:9.1f}" if k in sizes else f"{'':9s}"
            print(f"  {k:22s} {v:10.2f} {best[k]:8.2f} {cos[k]:12.6f} {size}")
        ours, ofp32, theirs = med["ort-int8 (ours, u8)"], med["ort-fp32"], med["ort quantize_static"]
        print(f"  ort-int8 / ort-fp32 = {ours / ofp32:.3f}; ort-int8 / quantize_static = {ours / theirs:.3f}; "
              f"speed-up vs eager fp32 = {med['eager fp32'] / ours:.2f}x")
        rows.append((name, med, best))
    print("\nmedian (min) ms")
    print("| model | eager fp32 | ort-fp32 | ort-int8 (ours) | ORT quantize_static |")
    print("|---|---|---|---|---|")
    keys = ["eager fp32", "ort-fp32", "ort-int8 (ours, u8)", "ort quantize_static"]
    for name, med, best in rows:
        print(f"| {name} | " + " | ".join(f"{med[k]:.2f} ({best[k]:.2f})" for k in keys) + " |")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
