"""Verification inputs from files: layouts and the errors for data that does not fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt.data import load_samples, random_samples, samples_for
from graphopt.errors import DataError
from graphopt.program import InputSpec

SPEC = [InputSpec("x", (2, 3, 4, 4))]


def test_random_samples_are_seeded():
    a, b = random_samples(SPEC, 2, seed=1), random_samples(SPEC, 2, seed=1)
    torch.testing.assert_close(a[1][0], b[1][0])
    assert not torch.equal(a[0][0], random_samples(SPEC, 1, seed=2)[0][0])


@pytest.mark.parametrize("shape, count", [((2, 3, 4, 4), 1), ((5, 2, 3, 4, 4), 5), ((6, 3, 4, 4), 3)])
def test_npy_layouts(tmp_path, shape, count):
    arr = np.random.default_rng(0).standard_normal(shape).astype(np.float64)
    np.save(tmp_path / "d.npy", arr)
    samples = load_samples(tmp_path / "d.npy", SPEC)
    assert len(samples) == count
    assert samples[0][0].shape == (2, 3, 4, 4) and samples[0][0].dtype == torch.float32
    np.testing.assert_allclose(samples[-1][0].numpy().ravel(), arr.reshape(-1)[-samples[-1][0].numel():], rtol=1e-6)


def test_npz_by_input_name(tmp_path):
    specs = [InputSpec("a", (1, 2)), InputSpec("b", (1, 3))]
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 2), np.float32), b=np.ones((4, 3), np.float32))
    samples = load_samples(tmp_path / "d.npz", specs)
    assert len(samples) == 4 and samples[0][1].sum() == 3
    assert len(samples_for(specs, n=2, path=tmp_path / "d.npz")) == 2


@pytest.mark.parametrize(
    "array, phrase",
    [
        (np.zeros((2, 3, 5, 5), np.float32), "does not fit input 'x' of shape (2, 3, 4, 4)"),
        (np.zeros((2, 3, 4, 4), np.int64), "is not a float type"),
        (np.full((2, 3, 4, 4), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((0, 2, 3, 4, 4), np.float32), "holds no samples"),
    ],
)
def test_bad_data(tmp_path, array, phrase):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError) as err:
        load_samples(tmp_path / "bad.npy", SPEC)
    assert phrase in str(err.value) and "bad.npy" in str(err.value)


def test_missing_and_wrong_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_samples(tmp_path / "nope.npz", SPEC)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(DataError, match="unknown format '.csv'"):
        load_samples(tmp_path / "d.csv", SPEC)
    (tmp_path / "corrupt.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="unreadable"):
        load_samples(tmp_path / "corrupt.npy", SPEC)
    specs = [InputSpec("a", (1, 2)), InputSpec("b", (1, 3))]
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match="no array for input 'b'; it has 'a'"):
        load_samples(tmp_path / "d.npz", specs)
