"""Accuracy recovered by distillation after pruning, on scikit-learn's 8x8 digits.

    python bench/bench_digits_recovery.py [--seeds 3] [--epochs 10] [--ratio 0.5] [--steps 300,600] [--lr 1e-2]

For each seed: the zoo digits CNN (``zoo.build("digits_cnn", seed)``) is trained with
Adam (``--epochs`` over a stratified 70/30 split drawn with ``random_state=seed``), then
captured, pruned with ``prune-channels{ratio=R}``, and recovered with
:func:`graphopt.recover.recover` (the original model as teacher, the training images as
samples, no labels). Prints a markdown table: test accuracy (mean over the seeds, and
the range), the change against the original, MACs (``graphopt.cost.count_macs``) and
parameters. The issue's goal: pruned 50% + recovery within 1.5 points of the original.

This is a script, not a test (``bench/`` collects only ``test_*.py``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    from graphopt.capture import capture
    from graphopt.cost import count_macs, count_params
    from graphopt.datasets import accuracy, digits_split, train_digits_cnn
    from graphopt.pipeline import PassManager, parse_pipeline
    from graphopt.plugins import default_host
    from graphopt.recover import recover

    x_train, y_train, x_test, y_test = digits_split(seed)
    model = train_digits_cnn(x_train, y_train, seed=seed, epochs=args.epochs)
    original = capture(model, input_shapes=[(1, 1, 8, 8)])
    pruned = original.clone()
    PassManager(parse_pipeline(f"prune-channels{{ratio={args.ratio}}}", default_host().passes)).run(pruned)
    samples = [(x_train[i : i + args.batch_size],) for i in range(0, len(x_train), args.batch_size)]
    rows = {}
    for key, program in (("original", original), ("pruned", pruned)):
        gm = program.graph_module
        rows[key] = {"acc": accuracy(program.run, x_test, y_test), "macs": count_macs(gm), "params": count_params(gm)}
    for steps in args.steps:
        recovered = pruned.clone()
        result = recover(recovered, model, samples, steps=steps, lr=args.lr, temperature=args.temperature,
                         batch_size=args.batch_size, seed=seed)
        gm = recovered.graph_module
        rows[steps] = {"acc": accuracy(recovered.run, x_test, y_test), "macs": count_macs(gm), "params": count_params(gm),
                       "seconds": result.seconds, "first_loss": result.first_loss, "last_loss": result.last_loss}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (model init, split, batches)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=lambda t: [int(v) for v in t.split(",")], default=[300, 600],
                        help="recovery steps, comma-separated: one row each")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    per_seed = [run_seed(s, args) for s in range(args.seeds)]
    labels: dict[object, str] = {"original": "original", "pruned": f"pruned {args.ratio:.0%} (no recovery)"}
    for steps in args.steps:
        labels[steps] = f"pruned {args.ratio:.0%} + recovery ({steps} steps, lr {args.lr:g})"
    base = statistics.mean(r["original"]["acc"] for r in per_seed)
    print(f"digits CNN, {args.seeds} seeds, {args.epochs} epochs, test split 30%, {args.threads} thread(s) "
          f"(total {time.perf_counter() - start:.1f} s)\n")
    print("| model | test acc % (mean) | min-max | Δ vs original | MACs | params | recovery s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, label in labels.items():
        accs = [r[key]["acc"] for r in per_seed]
        mean = statistics.mean(accs)
        secs = f"{statistics.mean(r[key]['seconds'] for r in per_seed):.2f}" if "seconds" in per_seed[0][key] else "-"
        first = per_seed[0][key]
        print(f"| {label} | {mean:.2f} | {min(accs):.2f}-{max(accs):.2f} | {mean - base:+.2f} | "
              f"{first['macs']:,} | {first['params']:,} | {secs} |")
    print()
    for steps in args.steps:
        losses = ", ".join(f"{r[steps]['first_loss']:.2f} -> {r[steps]['last_loss']:.3f}" for r in per_seed)
        gap = base - statistics.mean(r[steps]["acc"] for r in per_seed)
        verdict = "met" if gap <= 1.5 else "NOT met"
        print(f"{steps} steps: goal (within 1.5 points of original) {verdict}, {gap:.2f} points; "
              f"distillation loss per seed (before -> after): {losses}")


if __name__ == "__main__":
    main()
