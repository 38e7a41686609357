"""Zoo coverage matrix: every zoo model compiled on cpu-fp32, cpu-int8 and ort-int8, printed as markdown.

    python bench/zoo_matrix.py [--size 48] [--names a,b] > table.md

Per cell: verified (✓/✗, or the error's first words); for the int8 targets the cosine against
fp32, top-1 agreed/counted (see graphopt.verify.TOP1_RULE) and how many layers the default
fallback (``--keep-fp32 auto``) kept in fp32, if any. The last column is the MACs
``prune-channels{ratio=0.3}`` cuts (the pass as it is). 4 random calibration batches,
8 verification samples, default tolerances; nothing is written.
"""

from __future__ import annotations

import argparse
import sys

import graphopt
from graphopt import zoo
from graphopt.errors import GraphoptError, VerificationError

TARGETS = ("cpu-fp32", "cpu-int8", "ort-int8")


def _shape(name: str, size: int) -> tuple[int, ...]:
    return zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, size, size)


def _compile(name: str, size: int, **options):
    return graphopt.compile(zoo.build(name), input_shapes=[_shape(name, size)], calib_samples=4, verify_samples=8,
                            measure=False, **options)


def cell(name: str, target: str, size: int) -> str:
    try:
        result = _compile(name, size, target=target)
    except VerificationError as exc:
        return f"✗ ({str(exc).split(':', 1)[-1].strip()[:60]})"
    except GraphoptError as exc:
        return f"✗ exit {exc.exit_code}"
    except Exception as exc:  # noqa: BLE001 - an internal error is a cell too
        return f"✗ exit 5 ({type(exc).__name__})"
    m = result.report.verification.metrics
    if target.endswith("fp32"):
        return "✓"
    kept = len(result.report.extra["quantization"]["kept_fp32"])
    fallback = f", {kept} layers fp32" if kept else ""
    return f"✓ cos {m.cosine:.4f}, top-1 {round((m.top1_agreement or 0) * m.top1_counted)}/{m.top1_counted}{fallback}"


def pruned(name: str, size: int) -> str:
    try:
        result = _compile(name, size, target="cpu-fp32", pipeline="prune-channels{ratio=0.3},dce")
    except GraphoptError as exc:
        return f"✗ exit {exc.exit_code}"
    macs = result.report.macs
    return f"{1 - macs['compiled'] / macs['original']:.0%}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=48)
    parser.add_argument("--names", default=",".join(zoo.names()))
    args = parser.parse_args(argv)
    print(f"| model | {' | '.join(TARGETS)} | prune-channels{{ratio=0.3}} MACs cut |")
    print("|---" * (len(TARGETS) + 2) + "|")
    for name in args.names.split(","):
        cells = [cell(name, t, args.size) for t in TARGETS]
        print(f"| {name} | {' | '.join(cells)} | {pruned(name, args.size)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
