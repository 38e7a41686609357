"""Real data shipped with a dependency, for examples, accuracy tests and benchmarks.

scikit-learn bundles 1,797 handwritten digits as 8x8 images (``load_digits``): small
enough to train the zoo's ``digits_cnn`` in seconds, real enough that an accuracy drop
means something. Nothing is downloaded.

- :func:`digits_split`: a fixed, stratified train/test split, pixels scaled to [0, 1];
- :func:`train_digits_cnn`: the zoo digits CNN trained with Adam on that split;
- :func:`accuracy`: top-1 accuracy in percent;
- :func:`digits`: the training images as a calibration source
  (``--calib-data graphopt.datasets:digits``);
- :func:`digits_cnn`: a model source (``graphopt.datasets:digits_cnn``): the digits CNN
  trained on the training split (seed 0; cached on disk, weights only);
- :func:`digits_accuracy`: ``fn(model) -> float``, test-split accuracy of any callable
  (``graphopt tune --eval graphopt.datasets:digits_accuracy``);
- :func:`write_digits_npz`: the training split as ``.npz`` with ``x`` and ``labels``
  (``--train-data``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from graphopt.errors import DataError

__all__ = ["digits_split", "train_digits_cnn", "accuracy", "digits", "digits_cnn", "digits_accuracy", "write_digits_npz"]


def digits_split(seed: int = 0, test_size: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``; images ``[N, 1, 8, 8]`` in [0, 1]."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    x = torch.tensor(data.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return x_train, y_train, x_test, y_test


def train_digits_cnn(x: torch.Tensor, y: torch.Tensor, *, seed: int = 0, epochs: int = 10, lr: float = 3e-3,
                     batch: int = 64) -> nn.Module:
    """The zoo ``digits_cnn`` (initialized with ``seed``) trained with Adam; returned in eval mode."""
    from graphopt import zoo

    model = zoo.build("digits_cnn", seed=seed).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch):
            idx = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def accuracy(fn: Callable[..., Any], x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """Top-1 accuracy of ``fn`` in percent (``batch``: run in chunks of this many, for fixed-shape artifacts)."""
    with torch.inference_mode():
        if batch is None:
            logits = fn(x)
        else:
            logits = torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)])
    return float((logits.argmax(1) == y).float().mean()) * 100


def digits() -> list[torch.Tensor]:
    """The training split's images: a calibration source for ``digits_cnn`` (``graphopt.datasets:digits``)."""
    return [digits_split()[0]]


def _cache_dir() -> Path:
    return Path(os.environ.get("GRAPHOPT_CACHE") or Path.home() / ".cache" / "graphopt")


def digits_cnn() -> nn.Module:
    """The zoo digits CNN trained 10 epochs on the training split (seed 0), in eval mode.

    Training takes seconds; the weights are cached (``$GRAPHOPT_CACHE``, else
    ``~/.cache/graphopt``) and read back weights-only, so every tune trial starts from the
    same model without training it again.
    """
    from graphopt import zoo

    path = _cache_dir() / f"digits_cnn-seed0-torch{torch.__version__.split('+')[0]}.pt"
    model = zoo.build("digits_cnn", seed=0).eval()
    model.example_input_shape = (1, 1, 8, 8)
    if path.exists():
        try:
            model.load_state_dict(torch.load(path, weights_only=True))
            return model
        except Exception:  # noqa: BLE001 - a damaged cache file: train again and replace it
            pass
    x, y, _, _ = digits_split()
    model = train_digits_cnn(x, y, seed=0, epochs=10)
    model.example_input_shape = (1, 1, 8, 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    return model


def digits_accuracy(model: Callable[..., Any]) -> float:
    """Top-1 accuracy (percent) on the held-out test split of any callable: a module, a Program, an artifact.

    The example's ``--eval`` function. Models traced with batch 1 and artifacts with fixed
    shapes are run one image at a time when a whole batch does not fit them.
    """
    _, _, x, y = digits_split()
    fn = getattr(model, "run", model)
    try:
        return accuracy(fn, x, y)
    except Exception:  # noqa: BLE001 - a fixed-batch artifact
        return accuracy(fn, x, y, batch=1)


def write_digits_npz(path: str | Path) -> Path:
    """The training split as ``.npz``: ``x`` ``[N, 1, 8, 8]`` float32 and ``labels`` ``[N]`` (``--train-data``)."""
    x, y, _, _ = digits_split()
    path = Path(path)
    np.savez(path, x=x.numpy(), labels=y.numpy())
    return path
