"""Crafted hostile files: each would write a marker file if graphopt let it run code."""

from __future__ import annotations

import io
import json
import os
import pickle
import shlex
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


SHAPE = (1, 3, 8, 8)


def shell(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def python_code(marker: Path) -> str:
    return f"__import__('os').system({shell(marker)!r})"


class Reduce:
    """Unpickling this calls os.system: the classic pickle payload."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (shell(self.marker),))


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps(Reduce(marker))


def torch_save_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def export_tiny(path: Path, dynamic: bool = False) -> Path:
    model = Tiny().eval()
    shapes = ({0: torch.export.Dim("b", min=1, max=8)},) if dynamic else None
    ep = torch.export.export(model, (torch.randn(2 if dynamic else 1, *SHAPE[1:]),), dynamic_shapes=shapes)
    torch.export.save(ep, path)
    return path


def rewrite_zip(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a zip archive, letting ``edit`` change, add or drop members (name -> bytes)."""
    with zipfile.ZipFile(src) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return dst


def member(members: dict[str, bytes], suffix: str) -> str:
    return next(n for n in members if n.endswith(suffix))


def edit_json(members: dict[str, bytes], suffix: str, fn: Callable[[Any], None]) -> None:
    name = member(members, suffix)
    doc = json.loads(members[name])
    fn(doc)
    members[name] = json.dumps(doc).encode()


# ---- .pt2 payloads: name -> edit of the archive members ------------------------------


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        def flag(doc: Any) -> None:
            first = next(iter(doc["config"].values()))
            first["use_pickle"] = True
        edit_json(m, "_weights_config.json", flag)
        name = next(iter(json.loads(m[member(m, "_weights_config.json")])["config"].values()))["path_name"]
        m[member(m, f"data/weights/{name}")] = pickle_bytes(marker)
    return edit


def _pickled_sample_inputs(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        m[member(m, "data/sample_inputs/model.pt")] = torch_save_bytes(Reduce(marker))
    return edit


def _guard_code(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        edit_json(m, "models/model.json", lambda d: d.__setitem__("guards_code", [f"{python_code(marker)} == 0"]))
    return edit


def _sympy_expr(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        def inject(doc: Any) -> None:
            def walk(o: Any) -> bool:
                if isinstance(o, dict):
                    if isinstance(o.get("expr_str"), str):
                        o["expr_str"] = python_code(marker)
                        return True
                    return any(walk(v) for v in o.values())
                return isinstance(o, list) and any(walk(v) for v in o)
            assert walk(doc), "no symbolic expression to replace"
        edit_json(m, "models/model.json", inject)
    return edit


def _os_system_target(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        def inject(doc: Any) -> None:
            node = doc["graph_module"]["graph"]["nodes"][0]
            node["target"] = "torch.serialization.os.system"
            node["inputs"] = [{"name": "command", "arg": {"as_string": shell(marker)}, "kind": 1}]
        edit_json(m, "models/model.json", inject)
    return edit


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        prefix = member(m, "archive_format").split("/")[0]
        m[f"{prefix}/data/constants/opaque_obj_0"] = pickle_bytes(marker)
        edit_json(m, "_constants_config.json", lambda d: d["config"].__setitem__(
            "evil", {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": True, "tensor_meta": None}))
    return edit


def _legacy_format(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        m.clear()
        m["version"] = b"8.0"
        m["serialized_exported_program.json"] = b"{}"
        m["serialized_state_dict.pt"] = pickle_bytes(marker)
        m["serialized_constants.pt"] = pickle_bytes(marker)
    return edit


PT2_PAYLOADS: dict[str, Callable[[Path], Callable[[dict[str, bytes]], None]]] = {
    "pickled-weight": _pickled_weight,
    "pickled-sample-inputs": _pickled_sample_inputs,
    "guard-code": _guard_code,
    "sympy-expr": _sympy_expr,
    "os-system-target": _os_system_target,
    "opaque-constant": _opaque_constant,
    "legacy-pickles": _legacy_format,
}
#: payloads that need a dynamic-shape archive (they replace a symbolic expression)
DYNAMIC = {"sympy-expr"}
