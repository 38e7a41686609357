"""Latency of cpu-int8 against eager fp32 and torch.ao's (deprecated) FX int8 flow.

    python bench/measure_cpu_int8.py [--models resnet18,resnet50] [--runs 50] [--size 224]

The torch.ao FX flow (prepare_fx/convert_fx with the x86 and fbgemm default qconfig
mappings) is the reference to beat; it is used here only, never inside graphopt. Each
variant is timed at --batch (default 1) on the same input, interleaved round by round
(in a fresh random order each round) so that machine noise and cache state hit all alike; the
medians are printed (ms) and the ratios cpu-int8 / torch.ao, best of each and per engine.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
import warnings

import torch
import torch.fx

warnings.filterwarnings("ignore")


def build_int8(name: str, size: int, engine: str, calib: list[torch.Tensor]):
    from graphopt import zoo
    from graphopt.compiler import load_artifact
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.plugins import default_host
    from graphopt.program import Program

    host = default_host()
    spec = host.targets.get("cpu-int8")
    program = Program(torch.fx.symbolic_trace(zoo.build(name)), (calib[0],))
    program.propagate_shapes()
    program.calibration = [(c,) for c in calib]
    program.meta["backend_options"] = {"engine": engine}
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    with tempfile.TemporaryDirectory() as d:
        artifact.save(d)
        return load_artifact(d, host=host)  # time what a user loads


def build_reference(name: str, engine: str, calib: list[torch.Tensor]):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from graphopt import zoo

    torch.backends.quantized.engine = engine
    prepared = prepare_fx(copy.deepcopy(zoo.build(name)), get_default_qconfig_mapping(engine), (calib[0],))
    with torch.no_grad():
        for c in calib:
            prepared(c)
    return convert_fx(prepared)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50")
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    from graphopt import zoo

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, engines {torch.backends.quantized.supported_engines}")
    for name in args.models.split(","):
        x = torch.randn(args.batch, 3, args.size, args.size)
        calib = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(args.calib)]
        eager = zoo.build(name)
        variants: dict[str, tuple[object, str]] = {"eager fp32": (eager, torch.backends.quantized.engine)}
        for engine in ("x86", "fbgemm"):
            variants[f"cpu-int8 ({engine})"] = (build_int8(name, args.size, engine, calib), engine)
        for engine in ("x86", "fbgemm"):
            variants[f"torch.ao fx ({engine})"] = (build_reference(name, engine, calib), engine)
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.inference_mode():
            for fn, engine in variants.values():
                torch.backends.quantized.engine = engine
                for _ in range(5):
                    fn(x)
            keys, order = list(variants), random.Random(0)
            for _ in range(args.runs):
                # a fresh order each round: whatever runs right after eager fp32 finds the caches
                # full of its 47-100 MB of weights (a fixed or rotated order always puts the same
                # variant there, and cost cpu-int8 x86 7-10% on ResNet-18 in such runs)
                order.shuffle(keys)
                for key in keys:
                    fn, engine = variants[key]
                    torch.backends.quantized.engine = engine
                    t0 = time.perf_counter()
                    fn(x)
                    times[key].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\n{name} {args.batch}x3x{args.size}x{args.size}, median of {args.runs} runs (ms)")
        for k, v in med.items():
            print(f"  {k:22s} {v:8.2f}")
        best_ref = min(v for k, v in med.items() if k.startswith("torch.ao"))
        best_ours = min(v for k, v in med.items() if k.startswith("cpu-int8"))
        same = ", ".join(f"{e} {med[f'cpu-int8 ({e})'] / med[f'torch.ao fx ({e})']:.3f}" for e in ("x86", "fbgemm"))
        print(f"  cpu-int8 best / torch.ao best = {best_ours / best_ref:.3f} (same engine: {same}); "
              f"speed-up vs eager fp32 = {med['eager fp32'] / best_ours:.2f}x")


if __name__ == "__main__":
    main()
