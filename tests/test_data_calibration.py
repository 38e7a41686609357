"""Calibration sources: files, image folders, callables, and random data with its warning."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from graphopt.data import RANDOM_CALIBRATION_WARNING, calibration_samples, load_callable, load_image_folder
from graphopt.errors import DataError
from graphopt.program import InputSpec

IMG = [InputSpec("x", (2, 3, 6, 8))]


def write_images(folder, n: int, mode: str = "RGB", size=(10, 12)) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arrays = []
    rng = np.random.default_rng(0)
    for i in range(n):
        shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
        arr = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(arr, mode).save(folder / f"img{i:02d}.png")
        arrays.append(arr)
    return arrays


def test_random_calibration_warns_loudly():
    data = calibration_samples(IMG, n=3, seed=1)
    assert len(data.samples) == 3 and data.samples[0][0].shape == (2, 3, 6, 8)
    assert data.warning == RANDOM_CALIBRATION_WARNING and "RANDOM" in data.warning and "--calib-data" in data.warning
    assert "random" in data.source


def test_npy_file(tmp_path):
    np.save(tmp_path / "c.npy", np.zeros((10, 3, 6, 8), np.float32))
    data = calibration_samples(IMG, source=tmp_path / "c.npy", n=2)
    assert len(data.samples) == 2 and data.warning is None and data.source.startswith("file")


def test_image_folder_resizes_normalizes_and_batches(tmp_path):
    write_images(tmp_path / "imgs" / "sub", 5)
    samples = load_image_folder(tmp_path / "imgs", IMG, normalize="imagenet")
    assert len(samples) == 2  # 5 images in batches of 2; the odd one is dropped
    x = samples[0][0]
    assert x.shape == (2, 3, 6, 8) and x.dtype == torch.float32
    raw = load_image_folder(tmp_path / "imgs", IMG)[0][0]
    assert 0.0 <= float(raw.min()) and float(raw.max()) <= 1.0
    mean = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    custom = load_image_folder(tmp_path / "imgs", IMG, size="6x8", mean=[0.5], std=[0.25])[0][0]
    torch.testing.assert_close(custom, (raw - 0.5) / 0.25)
    data = calibration_samples(IMG, source=tmp_path / "imgs", n=1)
    assert len(data.samples) == 1 and data.source.startswith("images")


def test_grayscale_images(tmp_path):
    write_images(tmp_path, 2, mode="L")
    (x,) = load_image_folder(tmp_path, [InputSpec("x", (1, 1, 8, 8))])[0]
    assert x.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("kwargs, phrase", [
    ({}, "holds no images"),
    ({"normalize": "zscore"}, "unknown normalization 'zscore'"),
    ({"size": "big"}, "is not HxW"),
])
def test_image_folder_errors(tmp_path, kwargs, phrase):
    if "normalize" in kwargs or "size" in kwargs:
        write_images(tmp_path, 2)
    with pytest.raises(DataError, match=phrase):
        load_image_folder(tmp_path, IMG, **kwargs)


def test_image_folder_needs_an_image_input(tmp_path):
    write_images(tmp_path, 1)
    with pytest.raises(DataError, match="is not \\(N, 1\\|3, H, W\\)"):
        load_image_folder(tmp_path, [InputSpec("x", (1, 10))])


@pytest.fixture
def calib_module(tmp_path, monkeypatch):
    (tmp_path / "my_calib.py").write_text(textwrap.dedent("""
        import numpy as np
        import torch

        def batches():
            for i in range(3):
                yield torch.full((3, 3, 6, 8), float(i))

        def arrays():
            return [np.zeros((2, 3, 6, 8), np.float32)]

        def wrong():
            return [torch.zeros(2, 3, 5, 5)]

        def broken():
            raise RuntimeError("no data today")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_calib"
    sys.modules.pop("my_calib", None)


def test_callable_batches_are_regrouped(calib_module):
    samples = load_callable(f"{calib_module}:batches", IMG)
    assert len(samples) == 4  # 9 rows in batches of 2
    assert all(s[0].shape == (2, 3, 6, 8) for s in samples)
    assert float(samples[1][0][1, 0, 0, 0]) == 1.0  # row 3 is the first of the second yield
    data = calibration_samples(IMG, source=f"{calib_module}:arrays")
    assert len(data.samples) == 1 and data.source.startswith("callable") and data.warning is None


@pytest.mark.parametrize("target, phrase", [
    ("my_calib:wrong", "does not fit input 'x'"),
    ("my_calib:broken", "raised RuntimeError: no data today"),
    ("my_calib:missing", "has no function 'missing'"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
])
def test_callable_errors(calib_module, target, phrase):
    with pytest.raises(DataError, match=phrase):
        load_callable(target, IMG)


def test_unknown_source():
    with pytest.raises(DataError, match="neither a file, a folder of images nor pkg.module:function"):
        calibration_samples(IMG, source="missing.bin")
