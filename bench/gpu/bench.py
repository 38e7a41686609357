"""GPU latency: eager CUDA fp32, cuda-fp32, cuda-fp16, trt-fp16, trt-int8, and two anchors.

    python bench/gpu/bench.py [--models resnet18,resnet50,mobilenet_v2] [--batches 1,8] [--rounds 20] [--runs 20]
                              [--size 224] [--json out.json]

Every graphopt variant is compiled by ``graphopt.compile`` (verified, saved, loaded back:
what a user runs). Anchors: ``torch.compile(mode="max-autotune")`` of the eager fp32
model, and ONNX Runtime's CUDA execution provider on the trt-fp16 artifact's fp16 ONNX
(when onnxruntime-gpu is installed). Variants run interleaved: each round times ``--runs``
consecutive calls of every variant in turn (CUDA events on the current stream, inputs
already on the GPU, outputs left there), so clock and thermal drift hit all alike; the
median over rounds of the per-call mean is printed (ms), with speed-ups against eager fp32
and the issue's targets (ResNet-50 b8: trt-int8 >= 1.5x trt-fp16, trt-fp16 >= 2x eager;
cuda-fp16 >= 1.5x eager at b1). Written for a GPU machine; nothing here ran on one yet.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

warnings.filterwarnings("ignore")

TARGETS = ("cuda-fp32", "cuda-fp16", "trt-fp16", "trt-int8")


def variants(name: str, batch: int, size: int, workdir: Path) -> tuple[dict[str, Callable[[torch.Tensor], Any]], dict[str, str]]:
    """{variant: fn(cuda input)} and {variant: why it is missing}."""
    import graphopt
    from graphopt import zoo

    shape = (batch, 3, size, size)
    model = zoo.build(name).eval()
    eager = model.cuda()
    fns: dict[str, Callable[[torch.Tensor], Any]] = {"eager-fp32": lambda x: eager(x)}
    missing: dict[str, str] = {}
    for target in TARGETS:
        try:
            result = graphopt.compile(zoo.build(name), target=target, input_shapes=[shape], calib_samples=8,
                                      verify_samples=4, measure=False, output=workdir / f"{name}-b{batch}.{target}")
        except Exception as exc:  # report and keep measuring the others
            missing[target] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            continue
        art = graphopt.load_artifact(result.output)
        fns[target] = art.run_cuda
    try:
        compiled = torch.compile(model, mode="max-autotune")
        fns["torch.compile max-autotune"] = lambda x: compiled(x)
    except Exception as exc:
        missing["torch.compile max-autotune"] = str(exc).splitlines()[0][:160]
    onnx_path = workdir / f"{name}-b{batch}.trt-fp16" / "model.onnx"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
        if not onnx_path.is_file():
            raise RuntimeError("no trt-fp16 ONNX to run")
        sess = ort.InferenceSession(str(onnx_path), providers=["CUDAExecutionProvider"])
        binding = sess.io_binding()

        def run_ort(x: torch.Tensor) -> None:
            binding.bind_input(sess.get_inputs()[0].name, "cuda", 0, __import__("numpy").float32, tuple(x.shape), x.data_ptr())
            binding.bind_output(sess.get_outputs()[0].name, "cuda")
            sess.run_with_iobinding(binding)

        fns["ORT CUDA EP fp16"] = run_ort
    except Exception as exc:
        missing["ORT CUDA EP fp16"] = str(exc).splitlines()[0][:160]
    return fns, missing


def time_interleaved(fns: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, rounds: int, runs: int) -> dict[str, float]:
    """Median over rounds of the mean ms per call, variants interleaved round by round."""
    per: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up (autotuning, CUDA graph capture, lazy init)
            for _ in range(5):
                fn(x)
        torch.cuda.synchronize()
        for _ in range(rounds):
            for k, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(runs):
                    fn(x)
                end.record()
                end.synchronize()
                per[k].append(start.elapsed_time(end) / runs)
    return {k: statistics.median(v) for k, v in per.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,resnet50,mobilenet_v2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu/bench.py needs a CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 3
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        for name in args.models.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                fns, missing = variants(name, batch, args.size, Path(tmp))
                x = torch.randn(batch, 3, args.size, args.size, device="cuda")
                ms = time_interleaved(fns, x, args.rounds, args.runs)
                eager = ms["eager-fp32"]
                print(f"\n{name} batch {batch} ({args.size}x{args.size}), median ms per call:")
                for k, v in ms.items():
                    print(f"  {k:28s} {v:8.3f}  {eager / v:5.2f}x eager fp32")
                for k, why in missing.items():
                    print(f"  {k:28s} missing: {why}")
                results.append({"model": name, "batch": batch, "size": args.size, "gpu": gpu, "ms": ms, "missing": missing})
    _targets(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _targets(results: list[dict[str, Any]]) -> None:
    """The issue's speed-up targets, met or not."""
    def ms(model: str, batch: int, variant: str) -> float | None:
        return next((r["ms"].get(variant) for r in results if r["model"] == model and r["batch"] == batch), None)

    checks = [("resnet50", 8, "trt-int8", "trt-fp16", 1.5), ("resnet50", 8, "trt-fp16", "eager-fp32", 2.0),
              ("resnet50", 1, "cuda-fp16", "eager-fp32", 1.5)]
    print("\ntargets:")
    for model, batch, fast, slow, want in checks:
        a, b = ms(model, batch, fast), ms(model, batch, slow)
        if a is None or b is None:
            print(f"  {model} b{batch}: {fast} vs {slow}: not measured")
            continue
        print(f"  {model} b{batch}: {fast} {b / a:.2f}x {slow} (target {want}x): {'met' if b / a >= want else 'MISSED'}")


if __name__ == "__main__":
    sys.exit(main())
