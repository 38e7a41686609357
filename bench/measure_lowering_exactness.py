"""How far each int8 lowering lands from the simulated-int8 program, end to end.

    python bench/measure_lowering_exactness.py [--models resnet18,...] [--size 224] [--samples 4]

For every zoo model (random weights, 8 random calibration batches, ``--samples`` random
verification inputs), compile cpu-int8 with the x86 and fbgemm engines and ort-int8,
and print the largest |artifact - simulation| over the outputs in output quantization
steps, each measured twice on the same artifact: against the simulation as lowered (the
kernels' arithmetic reproduced: the backends' ``quant.Rounding``/``LayerArithmetic`` strategies) and against
plain fake-quantization (``quant.clear_kernel_arithmetic``), the simulation before that
existed. ``*`` marks an ort-int8 artifact that does not claim an exact simulation (it
has ops whose arithmetic is not modelled). The issue's bound is 2 steps.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.fx

warnings.filterwarnings("ignore")


def steps(program, artifact, samples) -> float:
    from graphopt.quant import check_lowering

    check = check_lowering(program, artifact.run, samples)
    return max(e / b * check.steps for e, b in zip(check.max_abs_err, check.bounds) if b)


def lower(name: str, target: str, engine: str | None, size: int, n_samples: int):
    from graphopt import zoo
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.plugins import default_host
    from graphopt.program import Program

    host = default_host()
    spec = host.targets.get(target)
    g = torch.Generator().manual_seed(0)
    shape = zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, size, size)
    program = Program(torch.fx.symbolic_trace(zoo.build(name)), (torch.randn(shape, generator=g),))
    program.propagate_shapes()
    program.calibration = [(torch.randn(shape, generator=g),) for _ in range(8)]
    if engine:
        program.meta["backend_options"] = {"engine": engine}
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    samples = [(torch.randn(shape, generator=g),) for _ in range(n_samples)]
    return program, artifact, samples


def main() -> None:
    from graphopt import zoo
    from graphopt.quant import clear_kernel_arithmetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    print(f"output steps, {args.size}x{args.size}, {args.samples} inputs (digits_cnn: 8x8)")
    print("| model | cpu-int8 x86 | plain fake-quant | cpu-int8 fbgemm | plain fake-quant | ort-int8 | plain fake-quant |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        row = []
        for target, engine in (("cpu-int8", "x86"), ("cpu-int8", "fbgemm"), ("ort-int8", None)):
            program, artifact, samples = lower(name, target, engine, args.size, args.samples)
            mark = "" if artifact.exact_simulation else "*"
            row.append(f"{steps(program, artifact, samples):.0f}{mark}")
            clear_kernel_arithmetic(program.graph_module)
            row.append(f"{steps(program, artifact, samples):.0f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
