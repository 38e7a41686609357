"""No file graphopt reads may run code: crafted payloads for every file kind it reads.

Every payload writes a marker file when it runs. Each test asserts the marker never
appears and that graphopt refuses with exit 2 and one line, through the real CLI entry
point (``graphopt.cli.main``, what the ``graphopt`` command runs; two cases also in a
subprocess). Controls show the .pt2 payloads are live: plain ``torch.export.load`` runs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import graphopt
from graphopt.capture import capture
from graphopt.cli import main
from graphopt.verify import save_golden
from tests.security.payloads import (
    DYNAMIC,
    PT2_PAYLOADS,
    SHAPE,
    Reduce,
    Tiny,
    export_tiny,
    python_code,
    rewrite_zip,
    shell,
    torch_save_bytes,
)


def cli(capsys, *args: Any) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def assert_refused(code: int, err: str, marker: Path, *phrases: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert code == 2, (code, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("graphopt: "), err
    for p in phrases:
        assert p in lines[0], lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A genuine .pt2 (static and dynamic), cpu-fp32 and cpu-int8 artifacts and a golden for them."""
    root = tmp_path_factory.mktemp("genuine")
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    model = Tiny().eval()
    paths = {"pt2": export_tiny(root / "tiny.pt2"), "pt2-dynamic": export_tiny(root / "dyn.pt2", dynamic=True)}
    for target in ("cpu-fp32", "cpu-int8"):
        paths[target] = root / target
        graphopt.compile(model, target=target, example_inputs=(x,), output=paths[target], measure=False,
                         verify_samples=2, calib_samples=8, tolerance=graphopt.Tolerance(min_cosine=0.9))
    with torch.no_grad():
        save_golden(root / "golden.npz", [(x,)], [model(x)], {"source": "tiny"})
    paths["golden"] = root / "golden.npz"
    return paths


def _evil_pt2(built: dict[str, Path], name: str, marker: Path, dst: Path) -> Path:
    src = built["pt2-dynamic" if name in DYNAMIC else "pt2"]
    return rewrite_zip(src, dst, PT2_PAYLOADS[name](marker))


def test_genuine_files_load_and_verify(built, capsys):
    code, err = cli(capsys, "verify", built["cpu-fp32"], "--golden", built["golden"])
    assert code == 0, err
    code, err = cli(capsys, "verify", built["cpu-int8"], "--golden", built["golden"], "--min-cosine", "0.9")
    assert code == 0, err
    program = capture(str(built["pt2-dynamic"]), input_shapes=[SHAPE])
    assert program.input_specs[0].shape == SHAPE


@pytest.mark.parametrize("name", sorted(set(PT2_PAYLOADS) - {"legacy-pickles", "os-system-target"}))
def test_pt2_payloads_are_live_in_plain_torch(built, tmp_path, name):
    """Control: torch.export.load (and .module()) runs each payload; graphopt must not."""
    marker = tmp_path / "PWNED"
    evil = _evil_pt2(built, name, marker, tmp_path / "evil.pt2")
    try:
        torch.export.load(evil).module()(torch.randn(2 if name in DYNAMIC else 1, *SHAPE[1:]))
    except Exception:  # noqa: BLE001 - what matters is whether the code ran
        pass
    assert marker.exists()


@pytest.mark.parametrize("name", sorted(PT2_PAYLOADS))
def test_crafted_pt2_source_never_runs(built, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    evil = _evil_pt2(built, name, marker, tmp_path / "evil.pt2")
    code, err = cli(capsys, "compile", evil, "--input-shape", "x".join(map(str, SHAPE)), "-o", tmp_path / "out", "--no-latency")
    assert_refused(code, err, marker, "evil.pt2")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["pickled-weight", "guard-code", "os-system-target"])
def test_crafted_cpu_fp32_artifact_never_runs(built, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    art = shutil.copytree(built["cpu-fp32"], tmp_path / "art")
    _evil_pt2(built, name, marker, tmp_path / "evil.pt2").replace(art / "model.pt2")
    code, err = cli(capsys, "verify", art, "--golden", built["golden"])
    assert_refused(code, err, marker, "model.pt2")
    with pytest.raises(graphopt.GraphoptError):
        graphopt.load_artifact(art)
    assert not marker.exists()


def test_crafted_pt2_in_a_real_process(built, tmp_path):
    marker = tmp_path / "PWNED"
    evil = _evil_pt2(built, "pickled-weight", marker, tmp_path / "evil.pt2")
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", str(evil), "--input-shape", "1x3x8x8",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert_refused(result.returncode, result.stderr.strip(), marker, "pickled object")


# ---- cpu-int8 graph.json / weights.pt ------------------------------------------------------


def _node(doc: dict[str, Any], op: str) -> dict[str, Any]:
    return next(n for n in doc["nodes"] if n["op"] == op)


def _call(doc: dict[str, Any], target: str, args: list[Any], op: str = "call_function") -> None:
    """Insert a call right after the first placeholder; the output keeps depending on the graph."""
    x = _node(doc, "placeholder")["name"]
    i = doc["nodes"].index(_node(doc, "placeholder"))
    doc["nodes"].insert(i + 1, {"name": "evil", "op": op, "target": target,
                                "args": {"tuple": [a if a != "$x" else {"node": x} for a in args]}, "kwargs": {"dict": {}}})


def _getattr_chain(marker: Path):
    # x.__class__.__init__.__globals__['os'].system(cmd), spelled as graph nodes
    def edit(doc: dict[str, Any]) -> None:
        x = _node(doc, "placeholder")["name"]
        i = doc["nodes"].index(_node(doc, "placeholder"))
        chain = [("c", "builtins.getattr", [{"node": x}, "__class__"]), ("g", "builtins.getattr", [{"node": "c"}, "__init__"]),
                 ("h", "builtins.getattr", [{"node": "g"}, "__globals__"]), ("o", "operator.getitem", [{"node": "h"}, "os"]),
                 ("s", "builtins.getattr", [{"node": "o"}, "system"])]
        for k, (name, target, args) in enumerate(chain):
            doc["nodes"].insert(i + 1 + k, {"name": name, "op": "call_function", "target": target,
                                            "args": {"tuple": args}, "kwargs": {"dict": {}}})
        doc["nodes"].insert(i + 1 + len(chain), {"name": "run", "op": "call_method", "target": "__call__",
                                                 "args": {"tuple": [{"node": "s"}, shell(marker)]}, "kwargs": {"dict": {}}})
    return edit


def _module_entry(cls: str, kind: str = "float"):
    def edit(doc: dict[str, Any]) -> None:
        name = next(iter(doc["modules"]))
        doc["modules"][name] = {"kind": kind, "type": cls, "args": {}, "children": []}
    return edit


INT8_PAYLOADS = {
    "getattr-chain": (_getattr_chain, "__class__"),
    "torch.load": (lambda m: lambda d: _call(d, "torch.load", [str(m)]), "'torch.load'"),
    "os.system": (lambda m: lambda d: _call(d, "os.system", [shell(m)]), "'os.system'"),
    "torch.serialization.os.system": (lambda m: lambda d: _call(d, "torch.serialization.os.system", [shell(m)]),
                                      "torch.serialization.os.system"),
    "functional-prefix-walk": (lambda m: lambda d: _call(d, "torch.nn.functional.torch.os.system", [shell(m)]), "functional"),
    "builtins.eval": (lambda m: lambda d: _call(d, "builtins.eval", [python_code(m)]), "'builtins.eval'"),
    "builtins.exec": (lambda m: lambda d: _call(d, "builtins.exec", [python_code(m)]), "'builtins.exec'"),
    "torch.ops.aten-not-emitted": (lambda m: lambda d: _call(d, "torch.ops.aten.save", ["$x", str(m)]), "torch.ops.aten.save"),
    "torch.ops-other-namespace": (lambda m: lambda d: _call(d, "torch.ops.os.system", [shell(m)]), "torch.ops.os.system"),
    "method-dunder": (lambda m: lambda d: _call(d, "__reduce_ex__", ["$x", 2], op="call_method"), "__reduce_ex__"),
    "method-on-constant": (lambda m: lambda d: _call(d, "split", [python_code(m)], op="call_method"), "'split'"),
    "module-os": (lambda m: _module_entry("os.system"), "'os.system'"),
    "module-base-class": (lambda m: _module_entry("torch.nn.Module"), "'torch.nn.Module'"),
    "module-fused-plain": (lambda m: _module_entry("torch.nn.Conv2d", kind="fused"), "fused"),
    "module-quantized-unknown": (lambda m: _module_entry("Embedding", kind="quantized"), "'Embedding'"),
    "placeholder-codegen": (lambda m: lambda d: _node(d, "placeholder").__setitem__("target", f"x={python_code(m)}"),
                            "not a dotted Python identifier"),
    "kwarg-codegen": (lambda m: lambda d: _node(d, "call_module")["kwargs"]["dict"].__setitem__(f"x={python_code(m)} or y", 1),
                      "keyword"),
    "attr-codegen": (lambda m: lambda d: d["attrs"].append(f'a"), {python_code(m)}, getattr(self, "b'),
                     "not a dotted Python identifier"),
}


@pytest.mark.parametrize("name", sorted(INT8_PAYLOADS))
def test_crafted_cpu_int8_graph_never_runs(built, tmp_path, capsys, name):
    marker = tmp_path / "PWNED"
    craft, phrase = INT8_PAYLOADS[name]
    art = shutil.copytree(built["cpu-int8"], tmp_path / "art")
    doc = json.loads((art / "graph.json").read_text())
    craft(marker)(doc)
    (art / "graph.json").write_text(json.dumps(doc))
    code, err = cli(capsys, "verify", art, "--golden", built["golden"], "--min-cosine", "0.9")
    assert_refused(code, err, marker, "graph.json", phrase)


def test_crafted_cpu_int8_weights_never_run(built, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    art = shutil.copytree(built["cpu-int8"], tmp_path / "art")
    (art / "weights.pt").write_bytes(torch_save_bytes({"w": Reduce(marker)}))
    code, err = cli(capsys, "verify", art, "--golden", built["golden"])
    assert_refused(code, err, marker, "weights.pt")


def test_crafted_cpu_int8_graph_in_a_real_process(built, tmp_path):
    marker = tmp_path / "PWNED"
    art = shutil.copytree(built["cpu-int8"], tmp_path / "art")
    doc = json.loads((art / "graph.json").read_text())
    _getattr_chain(marker)(doc)
    (art / "graph.json").write_text(json.dumps(doc))
    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "verify", str(art), "--golden", str(built["golden"])],
                            capture_output=True, text=True, timeout=300)
    assert_refused(result.returncode, result.stderr.strip(), marker, "__class__")


# ---- goldens, calibration data, --weights, pickled .pt ---------------------------------------


def _object_array(marker: Path) -> np.ndarray:
    arr = np.empty(1, dtype=object)
    arr[0] = Reduce(marker)
    return arr


def test_crafted_golden_never_runs(built, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    gold = dict(np.load(built["golden"]))
    gold["input_0_0"] = _object_array(marker)
    np.savez(tmp_path / "evil.npz", **gold)
    code, err = cli(capsys, "verify", built["cpu-fp32"], "--golden", tmp_path / "evil.npz")
    assert_refused(code, err, marker, "evil.npz")


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_crafted_calibration_data_never_runs(tmp_path, capsys, suffix):
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{suffix}"
    if suffix == ".npy":
        np.save(evil, _object_array(marker), allow_pickle=True)
    else:
        np.savez(evil, x=_object_array(marker))
    code, err = cli(capsys, "compile", "zoo:digits_cnn", "--target", "cpu-int8", "--calib-data", evil, "-o", tmp_path / "out",
                    "--no-latency")
    assert_refused(code, err, marker, "evil")


def test_crafted_state_dict_and_pickled_module_never_run(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    (tmp_path / "evil_sd.pt").write_bytes(torch_save_bytes({"conv.weight": Reduce(marker)}))
    code, err = cli(capsys, "compile", "zoo:digits_cnn", "--weights", tmp_path / "evil_sd.pt", "-o", tmp_path / "out")
    assert_refused(code, err, marker, "evil_sd.pt")
    (tmp_path / "evil.pt").write_bytes(torch_save_bytes(Reduce(marker)))
    code, err = cli(capsys, "compile", tmp_path / "evil.pt", "--input-shape", "1x3x8x8", "-o", tmp_path / "out")
    assert_refused(code, err, marker, "evil.pt")
