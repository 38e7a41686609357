"""``--weights FILE``: load a state dict (safely, ``weights_only=True``) into a model
graphopt built, strictly, naming the keys that do not match."""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from graphopt.capture.common import first_line, shape_text, sniff_archive, state_dict_of
from graphopt.errors import CaptureError

__all__ = ["read_state_dict", "load_weights"]

_SHOW = 5


def _listed(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOW])
    return shown + (f" (+{len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def read_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The state dict in ``path`` (a bare one or wrapped in ``{"state_dict": ...}``)."""
    p = Path(path)
    if not p.exists():
        raise CaptureError(f"--weights '{path}' does not exist")
    if p.is_dir():
        raise CaptureError(f"--weights '{path}' is a folder, not a state_dict file")
    kind = sniff_archive(p)
    if kind in ("torchscript", "export"):
        what = "a TorchScript archive" if kind == "torchscript" else "a torch.export archive"
        raise CaptureError(f"--weights '{path}' is {what}, not a state_dict saved with torch.save(model.state_dict(), ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(p, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):
            raise CaptureError(
                f"--weights '{path}' holds pickled Python objects, not just a state_dict; "
                "save the weights with torch.save(model.state_dict(), path)"
            ) from exc
        raise CaptureError(f"--weights '{path}' is not a readable PyTorch file: {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"--weights '{path}' is not a readable PyTorch file: {first_line(exc)}") from exc
    state = state_dict_of(obj)
    if state is None:
        raise CaptureError(
            f"--weights '{path}' holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    return state


def load_weights(model: nn.Module, path: str | os.PathLike[str], label: str) -> None:
    """Load the state dict in ``path`` into ``model`` with ``strict=True``."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listed(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listed(unexpected)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in state):
            hint = " (every key in the file starts with 'module.': it was saved from a DataParallel wrapper; save model.module.state_dict() instead)"
        raise CaptureError(f"--weights '{path}' does not fit {label}: {'; '.join(parts)}{hint}")
    wrong = [
        f"{k!r} is {shape_text(state[k].shape) or 'a scalar'} in the file but {shape_text(v.shape) or 'a scalar'} in the model"
        for k, v in expected.items()
        if isinstance(v, torch.Tensor) and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if wrong:
        more = f" (+{len(wrong) - _SHOW} more)" if len(wrong) > _SHOW else ""
        raise CaptureError(f"--weights '{path}' does not fit {label}: shape mismatch: {'; '.join(wrong[:_SHOW])}{more}")
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001
        raise CaptureError(f"--weights '{path}' does not fit {label}: {first_line(exc)}") from exc
