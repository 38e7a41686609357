"""Inputs for verification and calibration.

A *sample* is one tuple of input tensors, shaped like the model's example inputs.
Sources:

- ``.npy``: one array for a single-input model, ``[S, *sample_shape]`` or
  ``[S*B, *sample_shape[1:]]`` (rows are grouped into batches of the example batch size);
- ``.npz``: one array per input, named like the model's inputs (or ``x``/``input`` or the
  only array for a single-input model), laid out as for ``.npy``;
- random: standard normal with a fixed seed.

Calibration (:func:`calibration_samples`) also reads a folder of images (Pillow; resized
and normalized) and ``pkg.module:function`` callables that yield batches; random
calibration data comes with a loud warning for the report.

Every array is checked: shape, a floating dtype, finite values, at least one sample.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graphopt.errors import DataError, choices
from graphopt.program import InputSpec, input_bytes, size_text

__all__ = [
    "Sample",
    "fresh",
    "random_samples",
    "load_samples",
    "samples_for",
    "CalibrationData",
    "calibration_samples",
    "load_image_folder",
    "load_callable",
    "is_callable_source",
    "available_memory",
    "NORMALIZATIONS",
    "RANDOM_CALIBRATION_WARNING",
    "RANDOM_TRAINING_WARNING",
    "TrainingData",
    "training_data",
]

Sample = tuple[torch.Tensor, ...]


def available_memory() -> int | None:
    """Bytes of memory available now (Linux ``MemAvailable``, else ``os.sysconf``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def fresh(sample: Sample) -> Sample:
    """Copies of a sample's tensors: what every run of a model gets, so it cannot change the inputs."""
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in sample)


def random_samples(specs: Sequence[InputSpec], n: int, seed: int = 0) -> list[Sample]:
    """``n`` seeded random samples; refused (DataError) before allocation when they would not fit in memory."""
    need = n * sum(input_bytes(s.shape, s.dtype) for s in specs)
    free = available_memory()
    if free is not None and need > free:
        shapes = ", ".join(s.shape_text() for s in specs)
        raise DataError(f"{n} random samples of input shape {shapes} need {size_text(need)} but only {size_text(free)} "
                        "of memory is available; use a smaller --input-shape or fewer --calib-samples/--verify-samples")
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


# ---------------------------------------------------------------------------------------
# Calibration sources: .npy/.npz, a folder of images, a Python callable, or random data

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".gif", ".tif", ".tiff")
#: ``mean``/``std`` presets for :func:`load_image_folder` (per channel, on [0, 1] pixels).
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "none": ((0.0,), (1.0,)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "unit": ((0.5,), (0.5,)),  # [-1, 1]
}
RANDOM_CALIBRATION_WARNING = (
    "CALIBRATION USED RANDOM DATA: int8 ranges were fitted to N(0,1) noise, not to real inputs, "
    "so accuracy on real data is unknown; pass --calib-data (a .npy/.npz file, a folder of images "
    "or pkg.module:function) to calibrate on representative inputs"
)


@dataclass
class CalibrationData:
    """Calibration samples, where they came from, and a warning when they are random."""

    samples: list[Sample]
    source: str
    warning: str | None = None


def _rebatch(rows: list[torch.Tensor], spec: InputSpec, where: str) -> list[torch.Tensor]:
    """Rows ``[k, *spec.shape[1:]]`` regrouped into batches of the spec's batch size."""
    for r in rows:
        if tuple(r.shape[1:]) != tuple(spec.shape[1:]):
            raise DataError(
                f"{where}: a batch of shape {tuple(r.shape)} does not fit input '{spec.name}' of shape {spec.shape}; "
                f"expected (B, {', '.join(map(str, spec.shape[1:]))})"
            )
        if r.dtype.is_floating_point and not torch.isfinite(r).all():
            raise DataError(f"{where}: a batch holds NaN or infinite values")
    flat = torch.cat(rows) if rows else torch.empty(0)
    if flat.shape[0] == 0:
        raise DataError(f"{where}: holds no samples")
    b = spec.shape[0] if spec.shape else 1
    batches = [flat[i : i + b] for i in range(0, flat.shape[0] - b + 1, b)] if flat.shape[0] >= b else [flat]
    return [t.to(spec.dtype).contiguous() for t in batches]


def _parse_size(size: str | Sequence[int] | None, spec: InputSpec) -> tuple[int, int]:
    if size is None:
        if len(spec.shape) != 4:
            raise DataError(f"input '{spec.name}' of shape {spec.shape} is not an image batch (N, C, H, W)")
        return spec.shape[2], spec.shape[3]
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise DataError(f"image size '{size}' is not HxW (for example 224x224)")
        h, w = int(parts[0]), int(parts[1])
    else:
        h, w = (int(d) for d in size)
    # checked before any image is resized: any other size could not feed the input anyway
    if len(spec.shape) == 4 and (h, w) != tuple(spec.shape[2:]):
        text = size if isinstance(size, str) else f"{h}x{w}"
        raise DataError(f"--calib-size {text} does not fit input '{spec.name}' of shape {spec.shape}: "
                        f"images must be resized to its {spec.shape[2]}x{spec.shape[3]} (the default)")
    return h, w


def load_image_folder(
    path: str | Path,
    specs: Sequence[InputSpec],
    *,
    size: str | Sequence[int] | None = None,
    normalize: str = "none",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> list[Sample]:
    """Images under ``path`` (sorted, recursive) as samples for a single image input.

    Each image is converted to RGB (3 channels) or L (1 channel), resized to ``size``
    (``HxW``; default the input's H and W), scaled to [0, 1], then normalized with
    ``(x - mean) / std`` (a preset from :data:`NORMALIZATIONS`, or explicit values).
    Images are grouped into batches of the input's batch size.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency of the image path only
        raise DataError("reading a folder of images needs Pillow: pip install pillow") from None
    path = Path(path)
    if len(specs) != 1:
        raise DataError(f"image folder '{path}': the model has {len(specs)} inputs; images calibrate single-input models")
    spec = specs[0]
    if len(spec.shape) != 4 or spec.shape[1] not in (1, 3):
        raise DataError(f"image folder '{path}': input '{spec.name}' of shape {spec.shape} is not (N, 1|3, H, W)")
    if normalize not in NORMALIZATIONS:
        raise DataError(f"unknown normalization '{normalize}'; valid: {choices(NORMALIZATIONS)}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"image folder '{path}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    h, w = _parse_size(size, spec)
    channels = spec.shape[1]
    m = torch.tensor(mean if mean is not None else NORMALIZATIONS[normalize][0], dtype=torch.float32)
    s = torch.tensor(std if std is not None else NORMALIZATIONS[normalize][1], dtype=torch.float32)
    for name, t in (("mean", m), ("std", s)):
        if t.numel() not in (1, channels):
            raise DataError(f"image folder '{path}': {name} has {t.numel()} values; the input has {channels} channels")
    if (s == 0).any():
        raise DataError(f"image folder '{path}': std must not be 0")
    rows = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert("RGB" if channels == 3 else "L").resize((w, h), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except Exception as exc:
            raise DataError(f"image '{f}' is unreadable: {type(exc).__name__}: {exc}") from None
        t = torch.from_numpy(arr.copy())
        t = t.permute(2, 0, 1) if t.dim() == 3 else t.unsqueeze(0)
        t = (t - m.reshape(-1, 1, 1)) / s.reshape(-1, 1, 1)
        rows.append(t.unsqueeze(0))
    return [(b,) for b in _rebatch(rows, spec, f"image folder '{path}'")]


def load_callable(target: str, specs: Sequence[InputSpec]) -> list[Sample]:
    """Samples from ``pkg.module:function``: called with no arguments, it returns or yields
    batches — a tensor/array (single-input models), a tuple/list of them in input order,
    or a dict by input name. Batches of any size are regrouped to the inputs' batch size."""
    import importlib

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise DataError(f"calibration source '{target}' is not pkg.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise DataError(f"calibration source '{target}': cannot import '{module_name}': {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"calibration source '{target}': '{module_name}' has no function '{attr}'")
    try:
        batches = list(fn())
    except Exception as exc:
        raise DataError(f"calibration source '{target}' raised {type(exc).__name__}: {exc}") from None
    per_input: list[list[torch.Tensor]] = [[] for _ in specs]
    for i, batch in enumerate(batches):
        if isinstance(batch, dict):
            missing = [s.name for s in specs if s.name not in batch]
            if missing:
                raise DataError(f"calibration source '{target}': batch {i} has no '{missing[0]}'; it has {choices(batch)}")
            items = [batch[s.name] for s in specs]
        elif isinstance(batch, (tuple, list)):
            items = list(batch)
        else:
            items = [batch]
        if len(items) != len(specs):
            raise DataError(f"calibration source '{target}': batch {i} has {len(items)} tensors; the model has {len(specs)} inputs")
        for k, item in enumerate(items):
            t = torch.as_tensor(np.asarray(item)) if not isinstance(item, torch.Tensor) else item.detach()
            if specs[k].dtype.is_floating_point and not t.dtype.is_floating_point:
                raise DataError(f"calibration source '{target}': batch {i}, input '{specs[k].name}' has dtype {t.dtype}, expected floats")
            per_input[k].append(t.cpu())
    if not batches:
        raise DataError(f"calibration source '{target}' returned no batches")
    grouped = [_rebatch(rows, spec, f"calibration source '{target}'") for rows, spec in zip(per_input, specs)]
    n = min(len(g) for g in grouped)
    return [tuple(g[i] for g in grouped) for i in range(n)]


def is_callable_source(text: str) -> bool:
    """``pkg.module:function`` (and not a file name such as ``C:data.npy``)."""
    return re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", text) is not None and not Path(text).exists()


def calibration_samples(
    specs: Sequence[InputSpec],
    *,
    source: str | Path | None = None,
    n: int = 32,
    seed: int = 0,
    image_size: str | Sequence[int] | None = None,
    normalize: str = "none",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> CalibrationData:
    """Up to ``n`` calibration samples (``n <= 0``: all) from ``source``.

    ``source`` is a ``.npy``/``.npz`` file, a folder of images, ``pkg.module:function``,
    or None: then ``n`` random samples, with :data:`RANDOM_CALIBRATION_WARNING` for the
    compile report.
    """
    if source is None:
        count = n if n > 0 else 32
        return CalibrationData(random_samples(specs, count, seed), f"random N(0,1), {count} samples, seed {seed}",
                               RANDOM_CALIBRATION_WARNING)
    text = str(source)
    path = Path(text)
    if image_size is not None and not path.is_dir():
        raise DataError(f"--calib-size applies to a folder of images; --calib-data '{text}' is not a folder")
    if path.is_dir():
        samples = load_image_folder(path, specs, size=image_size, normalize=normalize, mean=mean, std=std)
        kind = "images"
    elif path.exists() or path.suffix.lower() in (".npy", ".npz"):
        samples = load_samples(path, specs)
        kind = "file"
    elif is_callable_source(text):
        samples = load_callable(text, specs)
        kind = "callable"
    else:
        raise DataError(f"calibration data '{text}' is neither a file, a folder of images nor pkg.module:function")
    if n > 0:
        samples = samples[:n]
    return CalibrationData(samples, f"{kind} '{text}', {len(samples)} samples")


RANDOM_TRAINING_WARNING = (
    "RECOVERY USED RANDOM DATA: the fine-tuning (--recover-steps/--qat-steps) matched the original on N(0,1) noise, "
    "not on real inputs; pass --train-data (or --calib-data): a .npy/.npz file, a folder of images or pkg.module:function"
)


@dataclass
class TrainingData:
    """``--train-data``: every sample of the source, and one label per sample row when the ``.npz`` has ``labels``."""

    samples: list[Sample]
    labels: torch.Tensor | None
    source: str


def training_data(specs: Sequence[InputSpec], source: str | Path, *, image_size: str | None = None,
                  normalize: str = "none") -> TrainingData:
    """All samples of ``source`` (the ``--calib-data`` formats); labels from an ``.npz`` array ``labels``."""
    cal = calibration_samples(specs, source=source, n=0, image_size=image_size, normalize=normalize)
    labels = None
    path = Path(str(source))
    if path.suffix.lower() == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if "labels" in z.files:
                array = z["labels"]
                if array.dtype.kind not in "iu" or array.ndim != 1:
                    raise DataError(f"--train-data '{source}': 'labels' must be a 1-D integer array, got {array.dtype} "
                                    f"of shape {tuple(array.shape)}")
                rows = sum(int(s[0].shape[0]) for s in cal.samples)
                if len(array) != rows:
                    raise DataError(f"--train-data '{source}': {len(array)} labels for {rows} sample rows")
                labels = torch.from_numpy(array.astype(np.int64))
    return TrainingData(cal.samples, labels, cal.source.replace(" samples", " samples for training"))
