"""cpu-int8 vs torch.ao's frozen module, several independent instances of each (issue 13's noise floor).

    python bench/measure_instances.py [--model resnet18] [--batch 1] [--instances 3] [--rounds 12]

Both run the same kernel calls with the same packed weights, yet one ratio measured in one
process moved between 0.99 and 1.04 from run to run (``bench/cpu_peers.py``). Two copies of one
model can differ by a few percent for reasons outside the graph (where their weights and buffers
land in memory). This builds ``--instances`` cpu-int8 artifacts (separate compiles) and as many
torch.ao FX x86 + trace + freeze modules, times them all interleaved with
:func:`bench.cpu_peers.time_interleaved`, and prints each instance against the first torch.ao
one (median of per-round ratios) and the ratio of the two families' mean latencies.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/measure_instances.py` from anywhere
from bench.cpu_peers import time_interleaved, torch_ao_frozen  # noqa: E402

warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> None:
    import graphopt

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--instances", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.batch, 3, args.size, args.size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    calib = [torch.randn(shape, generator=g) for _ in range(8)]
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.instances):
            variants[f"cpu-int8 #{i}"] = graphopt.compile(
                f"zoo:{args.model}", target="cpu-int8", input_shapes=[shape], output=Path(tmp) / str(i), calib_samples=8,
                verify_samples=2, measure=False, threads=args.threads).artifact.run
            variants[f"torch.ao #{i}"] = torch_ao_frozen(args.model, calib, x)
        med, rounds = time_interleaved(variants, x, args.rounds, args.runs)
    base = "torch.ao #0"
    print(f"{args.model} b{args.batch} {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds")
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(rounds[name], rounds[base]))
        print(f"  {name:12s} {med[name]:8.3f} ms  {ratio:.3f}x {base}")
    ours = statistics.mean(med[k] for k in variants if k.startswith("cpu-int8"))
    theirs = statistics.mean(med[k] for k in variants if k.startswith("torch.ao"))
    print(f"  mean cpu-int8 / mean torch.ao = {ours / theirs:.3f}")


if __name__ == "__main__":
    main()
