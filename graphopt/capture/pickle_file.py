"""``.pt`` / ``.pth`` files (``torch.save``): a whole pickled ``nn.Module`` is traced;
everything else gets an error that says what the file is and what to do instead.

Nothing is unpickled with ``weights_only=False`` unless the caller passed
``trust_pickle=True``: unpickling runs code chosen by whoever wrote the file.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graphopt.capture.common import cwd_on_path, first_line, sniff_archive, state_dict_of, where
from graphopt.capture.module import program_from_module
from graphopt.errors import CaptureError
from graphopt.program import Program

__all__ = ["torchscript_error", "state_dict_error", "load_pickled_module", "from_pickle"]

_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def torchscript_error(name: str) -> CaptureError:
    return CaptureError(
        f"'{name}' is a TorchScript archive, not a pickled nn.Module; compile it as a source: "
        f"graphopt compile {name} --input-shape 1x3x224x224"
    )


def state_dict_error(name: str, n_tensors: int) -> CaptureError:
    return CaptureError(
        f"'{name}' holds only weights (a state_dict with {n_tensors} tensors), not a model; build the model "
        f"with a factory and load them: graphopt compile pkg.module:build_model --weights {name} "
        "--input-shape 1x3x224x224"
    )


def _unreadable(name: str, exc: BaseException | str) -> CaptureError:
    text = str(exc)
    reason = first_line(exc)
    if "WeightsUnpickler error:" in text:  # torch's message buries the reason
        tail = first_line(text.split("WeightsUnpickler error:", 1)[1])
        reason = f"not a torch.save file (unpickling failed: {tail})" if tail else reason
    elif reason.startswith("Weights only load failed"):
        reason = "not a PyTorch file (it could not be unpickled)"
    return CaptureError(f"'{name}' is not a readable PyTorch file: {reason}")


def load_pickled_module(path: Path, name: str, trust_pickle: bool) -> tuple[nn.Module, str]:
    """The nn.Module pickled in ``path`` and its class name; refuses unless ``trust_pickle``."""
    kind = sniff_archive(path)
    if kind == "torchscript":
        raise torchscript_error(name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        if found is None:
            raise _unreadable(name, exc) from exc
        if not trust_pickle:
            raise CaptureError(
                f"'{name}' holds a pickled nn.Module or other Python object (it needs class {found.group(1)}); "
                "unpickling it runs code from the file, so graphopt refuses by default. If you trust the file, "
                "pass --trust-pickle (or, better, save a .pt2 with torch.export)"
            ) from exc
        obj = _load_trusted(path, name, found.group(1))
    except Exception as exc:  # noqa: BLE001
        if "TorchScript" in str(exc):
            raise torchscript_error(name) from exc
        raise _unreadable(name, exc) from exc

    state = state_dict_of(obj)
    if state is not None:
        raise state_dict_error(name, sum(1 for v in state.values() if isinstance(v, torch.Tensor)))
    if not isinstance(obj, nn.Module):
        raise CaptureError(f"'{name}' holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj, f"{type(obj).__module__}.{type(obj).__qualname__}"


def _load_trusted(path: Path, name: str, needed: str) -> Any:
    with cwd_on_path():
        try:
            return torch.load(path, weights_only=False, map_location="cpu")
        except (ImportError, AttributeError) as exc:
            raise CaptureError(
                f"'{name}' holds a pickled nn.Module whose class {needed} cannot be imported "
                f"({type(exc).__name__}: {first_line(exc)}); run graphopt from the folder that holds the "
                "model's code, or add that folder to PYTHONPATH"
            ) from exc
        except Exception as exc:  # noqa: BLE001
            raise CaptureError(
                f"'{name}': unpickling failed{where(exc)}: {type(exc).__name__}: {first_line(exc)}"
            ) from exc


def from_pickle(
    path: Path,
    name: str,
    *,
    input_shapes: Sequence[tuple[int, ...]] | None,
    example_inputs: Sequence[torch.Tensor] | None,
    trust_pickle: bool,
) -> Program:
    """Capture the nn.Module pickled in a .pt/.pth file (only with ``trust_pickle``)."""
    loaded, cls = load_pickled_module(path, name, trust_pickle)
    label = f"'{name}'"
    was_training = loaded.training  # a fresh object unpickled here: no need to copy it
    model = loaded.eval()
    meta: dict[str, Any] = {"source": name, "source_kind": "pickle", "model_class": cls}
    if was_training:
        meta["training_mode_was"] = True
    return program_from_module(
        model, label, meta, input_shapes=input_shapes, example_inputs=example_inputs,
        missing_hint="pass --input-shape, e.g. --input-shape 1x3x224x224",
    )
