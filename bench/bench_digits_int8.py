"""Real accuracy of the int8 targets: the zoo digits CNN on scikit-learn's 8x8 digits.

    python bench/bench_digits_int8.py [--seed 0] [--epochs 10] [--calib 256] [--targets cpu-int8,ort-int8]

Trains the zoo ``digits_cnn`` on a fixed stratified 70/30 split (``graphopt.datasets``),
compiles it for cpu-fp32 and each int8 target through ``graphopt.compile`` with the
training split as calibration data, and prints model | latency | size | accuracy: test
accuracy over the 540 held-out images, batch-1 median latency of the saved-and-reloaded
artifact, and the artifact's size on disk. The issue's goal: each int8 target within
1 point of fp32 test accuracy.

A script, not a test (``bench/`` collects only ``test_*.py``).
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.iterdir() if f.name not in ("report.json", "artifact.json"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--calib", type=int, default=256, help="Calibration images (from the training split).")
    ap.add_argument("--targets", default="ort-fp32,cpu-int8,ort-int8")
    args = ap.parse_args()

    import graphopt
    from graphopt.compiler import measure_latency_ms
    from graphopt.datasets import accuracy, digits_split, train_digits_cnn

    x_train, y_train, x_test, y_test = digits_split(args.seed)
    model = train_digits_cnn(x_train, y_train, seed=args.seed, epochs=args.epochs)
    rows: list[tuple[str, float, float, int | None]] = []
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "train.npy"
        np.save(calib, x_train.numpy())
        for target in ["cpu-fp32", *args.targets.split(",")]:
            out = Path(tmp) / target
            graphopt.compile(model, target=target, example_inputs=(x_test[:1],), data=calib, calib_samples=args.calib,
                             verify_samples=64, output=out, measure=False)
            artifact = graphopt.load_artifact(out)
            acc = accuracy(artifact.run, x_test, y_test, batch=1)
            rows.append((target, acc, measure_latency_ms(artifact.run, (x_test[:1],)), _size(out)))
    rows.insert(0, ("eager fp32 (trained)", accuracy(model, x_test, y_test), measure_latency_ms(model, (x_test[:1],)), None))

    fp32 = rows[1][1]
    print(f"digits CNN, seed {args.seed}, {len(x_train)} train / {len(x_test)} test images, "
          f"calibration: {args.calib} training images, torch {torch.__version__}")
    print("\n| model | latency p50 (ms, batch 1) | size (KB) | test accuracy % | Δ vs cpu-fp32 |")
    print("|---|---:|---:|---:|---:|")
    for name, acc, ms, size in rows:
        kb = f"{size / 1024:.1f}" if size is not None else "–"
        print(f"| {name} | {ms:.3f} | {kb} | {acc:.2f} | {acc - fp32:+.2f} |")
    worst = min(acc - fp32 for name, acc, _, _ in rows if "int8" in name)
    print(f"\nworst int8 drop: {max(0.0, -worst):.2f} points (goal: within 1 point): {'met' if worst >= -1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
