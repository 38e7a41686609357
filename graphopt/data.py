"""Inputs for verification and calibration.

A *sample* is one tuple of input tensors, shaped like the model's example inputs.
Sources:

- ``.npy``: one array for a single-input model, ``[S, *sample_shape]`` or
  ``[S*B, *sample_shape[1:]]`` (rows are grouped into batches of the example batch size);
- ``.npz``: one array per input, named like the model's inputs (or ``x``/``input`` or the
  only array for a single-input model), laid out as for ``.npy``;
- random: standard normal with a fixed seed.

Every array is checked: shape, a floating dtype, finite values, at least one sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from graphopt.errors import DataError, choices
from graphopt.program import InputSpec

__all__ = ["Sample", "random_samples", "load_samples", "samples_for"]

Sample = tuple[torch.Tensor, ...]


def random_samples(specs: Sequence[InputSpec], n: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(s.random(g) for s in specs) for _ in range(n)]


def _batches(path: Path, key: str, array: np.ndarray, spec: InputSpec) -> list[torch.Tensor]:
    where = f"'{path}'" + (f", array '{key}'" if key else "")
    if array.dtype.kind not in "fiu":
        raise DataError(f"{where}: dtype {array.dtype} is not numeric; input '{spec.name}' expects {spec.dtype}")
    if spec.dtype.is_floating_point and array.dtype.kind != "f":
        raise DataError(f"{where}: dtype {array.dtype} is not a float type; input '{spec.name}' expects float32 values (convert and normalize first)")
    shape = tuple(array.shape)
    want = spec.shape
    if shape == want:
        rows = [array]
    elif len(shape) == len(want) + 1 and shape[1:] == want:
        rows = list(array)
    elif len(shape) == len(want) and shape[1:] == want[1:] and shape[0] % want[0] == 0:
        b = want[0]
        rows = [array[i : i + b] for i in range(0, shape[0], b)]
    else:
        raise DataError(
            f"{where}: shape {shape} does not fit input '{spec.name}' of shape {want}; "
            f"expected {want}, (S, {', '.join(map(str, want))}) or (S*{want[0]}, {', '.join(map(str, want[1:]))})"
        )
    if not rows:
        raise DataError(f"{where}: holds no samples")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(f"{where}: {bad} values are NaN or infinite")
    return [torch.from_numpy(np.ascontiguousarray(r)).to(spec.dtype) for r in rows]


def load_samples(path: str | Path, specs: Sequence[InputSpec]) -> list[Sample]:
    """Read samples from ``.npy``/``.npz``; errors name the file, array and expected shape."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arrays = {"": np.load(path, allow_pickle=False)}
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        else:
            raise DataError(f"data file '{path}': unknown format '{suffix}'; use .npy or .npz")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"data file '{path}' is unreadable: {type(exc).__name__}: {exc}") from None

    if len(specs) == 1 and len(arrays) == 1:
        chosen = {specs[0].name: next(iter(arrays.items()))}
    else:
        chosen = {}
        for spec in specs:
            for key in (spec.name, *(("x", "input", "inputs") if len(specs) == 1 else ())):
                if key in arrays:
                    chosen[spec.name] = (key, arrays[key])
                    break
            else:
                raise DataError(
                    f"data file '{path}' has no array for input '{spec.name}'; it has {choices(arrays)}"
                )
    per_input = [_batches(path, *chosen[s.name], s) for s in specs]
    counts = {len(b) for b in per_input}
    if len(counts) != 1:
        raise DataError(f"data file '{path}': inputs have different sample counts {sorted(counts)}")
    return [tuple(b[i] for b in per_input) for i in range(counts.pop())]


def samples_for(specs: Sequence[InputSpec], *, n: int, seed: int = 0, path: str | Path | None = None) -> list[Sample]:
    """``n`` samples from ``path`` (the first n) or random ones."""
    if path is None:
        return random_samples(specs, n, seed)
    samples = load_samples(path, specs)
    return samples[:n] if n > 0 else samples
