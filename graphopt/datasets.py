"""Real data shipped with a dependency, for examples, accuracy tests and benchmarks.

scikit-learn bundles 1,797 handwritten digits as 8x8 images (``load_digits``): small
enough to train the zoo's ``digits_cnn`` in seconds, real enough that an accuracy drop
means something. Nothing is downloaded.

- :func:`digits_split`: a fixed, stratified train/test split, pixels scaled to [0, 1];
- :func:`train_digits_cnn`: the zoo digits CNN trained with Adam on that split;
- :func:`accuracy`: top-1 accuracy in percent;
- :func:`digits`: the training images as a calibration source
  (``--calib-data graphopt.datasets:digits``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from graphopt.errors import DataError

__all__ = ["digits_split", "train_digits_cnn", "accuracy", "digits"]


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
