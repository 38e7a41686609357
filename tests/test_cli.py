"""The real `graphopt` command: exit codes, one-line errors, nothing written on failure."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

MODELS_PY = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.pool(self.relu(self.bn(self.conv(x))))
            return self.fc(torch.flatten(x, 1))


    class Branchy(Tiny):
        def forward(self, x):
            if x.sum() > 0:
                x = x * 2
            return super().forward(x)


    def tiny():
        torch.manual_seed(0)
        return Tiny().eval()


    def tiny_with_shape():
        m = tiny()
        m.example_input_shape = (1, 3, 16, 16)
        return m


    def branchy():
        return Branchy().eval()


    def not_a_module():
        return 42
    '''
)

PERTURB_PLUGIN = textwrap.dedent(
    '''
    import torch
    from graphopt import PassResult, register_pass


    @register_pass("perturb", contract="{contract}")
    def perturb(program, *, amount: float = 0.5):
        """Adds noise to every weight: a deliberately wrong pass."""
        with torch.no_grad():
            for p in program.graph_module.parameters():
                p.add_(amount * torch.randn_like(p))
        return PassResult(changed=True, detail="perturbed")
    '''
)


def graphopt(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "graphopt.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def work(tmp_path):
    (tmp_path / "mymodels.py").write_text(MODELS_PY)
    return tmp_path


def assert_fails(result, code: int, *phrases: str) -> str:
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err)
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    assert lines[0].startswith("graphopt: ")
    for p in phrases:
        assert p in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "setup, args, phrases",
    [
        (None, ["compile", "missing.pt2"], ["'missing.pt2' does not exist"]),
        ("corrupt", ["compile", "bad.pt2"], ["bad.pt2", "not a readable torch.export archive"]),
        ("corrupt", ["compile", "bad.pt"], ["bad.pt", "not a readable PyTorch file"]),
        ("h5", ["compile", "model.h5"], ["model.h5", "unknown model format '.h5'"]),
        (None, ["compile", "zoo:digits_cnn", "--target", "tpu-int4"], ["unknown target 'tpu-int4'", "'cpu-fp32'"]),
        (None, ["compile", "zoo:nope"], ["nope", "digits_cnn"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "fuse,dce"], ["unknown pass 'fuse'", "'fuse-conv-bn-relu'"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "dce{aggressive=true}"], ["unknown option 'aggressive' for pass 'dce'"]),
        ("plugin-exact", ["compile", "zoo:digits_cnn", "--plugin", "perturb.py", "--pipeline", "perturb{amount=lots}"],
         ["option 'amount' expects float", "lots"]),
        (None, ["compile", "mymodels:tiny", "--input-shape", "1x3x16"], ["1x3x16", "conv"]),
        (None, ["compile", "mymodels:tiny", "--input-shape", "1x3xabc"], ["1x3xabc", "1x3x224x224"]),
        (None, ["compile", "mymodels:tiny"], ["--input-shape"]),
        ("raising-plugin", ["compile", "zoo:digits_cnn", "--plugin", "raising.py"], ["raising.py", "failed to import", "ZeroDivisionError"]),
        (None, ["compile", "mymodels:not_a_module", "--input-shape", "1x3x16x16"], ["mymodels:not_a_module", "int", "nn.Module"]),
        (None, ["compile", "mymodels:branchy", "--input-shape", "1x3x16x16"], ["mymodels.py:", "if x.sum() > 0", "torch.export"]),
        (None, ["compile", "mymodels:nothere", "--input-shape", "1x3x16x16"], ["nothere"]),
        (None, ["compile", "zoo:digits_cnn", "--print-ir-after", "fold"], ["--print-ir-after 'fold'", "'dce'"]),
        # int8 calibration data and mixed precision
        ("calib", ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--calib-data", "shape.npy"], ["shape.npy", "(10, 1, 7, 7)", "(1, 1, 8, 8)"]),
        ("calib", ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--calib-data", "ints.npy"], ["ints.npy", "int64", "float"]),
        ("calib", ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--calib-data", "empty.npy"], ["empty.npy", "no samples"]),
        ("calib", ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--calib-data", "nan.npy"], ["nan.npy", "NaN"]),
        ("calib", ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--calib-data", "emptydir"], ["emptydir", "holds no images"]),
        (None, ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--keep-fp32", "features.99"], ["keep-fp32", "'features.99'", "'features.0.0'"]),
        (None, ["compile", "zoo:digits_cnn", "--keep-fp32", "auto"], ["--keep-fp32", "insert-quant-stubs"]),
        (None, ["compile", "zoo:digits_cnn", "--engine", "x86"], ["--engine", "cpu-int8"]),
        (None, ["compile", "zoo:digits_cnn", "-t", "cpu-int8", "--pipeline", "insert-quant-stubs{keep-fp32-top1=2}"],
         ["insert-quant-stubs", "keep-fp32-top1 must be in [0, 1]"]),
        # prune-channels options
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{ratio=1.5}"], ["prune-channels", "0 <= ratio < 1", "1.5"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{ratio=-0.1}"], ["prune-channels", "0 <= ratio < 1", "-0.1"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{importance=magic}"], ["'magic'", "'bn-gamma', 'l1', 'l2'"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{ratio={nope:0.3}}"], ["prune-channels", "unknown module 'nope'"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{skip=[nope]}"], ["prune-channels", "unknown module 'nope'"]),
        (None, ["compile", "zoo:digits_cnn", "--pipeline", "prune-channels{round-to=0}"], ["prune-channels", "round-to", ">= 1"]),
        (None, ["compile", "zoo:digits_cnn", "--recover-steps", "-3"], ["--recover-steps", ">= 0"]),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_output(work, setup, args, phrases):
    if setup == "corrupt":
        (work / "bad.pt2").write_bytes(b"PK\x03\x04 this is not a zip")
        (work / "bad.pt").write_bytes(np.random.default_rng(0).bytes(300))
    elif setup == "h5":
        (work / "model.h5").write_bytes(b"\x89HDF")
    elif setup == "plugin-exact":
        (work / "perturb.py").write_text(PERTURB_PLUGIN.format(contract="exact"))
    elif setup == "raising-plugin":
        (work / "raising.py").write_text("VALUE = 1 / 0\n")
    elif setup == "calib":
        rng = np.random.default_rng(0)
        np.save(work / "shape.npy", rng.standard_normal((10, 1, 7, 7)).astype("float32"))
        np.save(work / "ints.npy", rng.integers(0, 5, (10, 1, 8, 8)))
        np.save(work / "empty.npy", np.zeros((0, 1, 8, 8), "float32"))
        nan = rng.standard_normal((10, 1, 8, 8)).astype("float32")
        nan[3, 0, 2, 2] = np.nan
        np.save(work / "nan.npy", nan)
        (work / "emptydir").mkdir()
    result = graphopt(*args, "-o", "out", cwd=work)
    assert_fails(result, 2, *phrases)
    assert not (work / "out").exists()
    assert not any(p.name.startswith(".out.tmp") for p in work.iterdir())


def test_failed_verification_exits_1_and_writes_nothing(work):
    (work / "perturb.py").write_text(PERTURB_PLUGIN.format(contract="approximate"))
    result = graphopt("compile", "mymodels:tiny", "--input-shape", "1x3x16x16", "--plugin", "perturb.py",
                      "--pipeline", "fuse-conv-bn-relu,perturb,dce", "--max-rel-err", "1e-4", "-o", "out", "-q", cwd=work)
    line = assert_fails(result, 1, "verification failed for cpu-fp32", "max_rel_err", "nothing was written")
    assert "cosine" in line or "max_rel_err" in line
    assert not (work / "out").exists()


def test_approximate_pass_without_a_bound_is_reported_not_enforced(work):
    """An approximate rewrite the user asked for, with no tolerance flag: a loud warning, exit 0."""
    (work / "perturb.py").write_text(PERTURB_PLUGIN.format(contract="approximate"))
    result = graphopt("compile", "mymodels:tiny", "--input-shape", "1x3x16x16", "--plugin", "perturb.py",
                      "--pipeline", "fuse-conv-bn-relu,perturb,dce", "--no-latency", "-o", "out", "-q", cwd=work)
    assert result.returncode == 0, result.stderr
    report = json.loads((work / "out" / "report.json").read_text())
    assert any("approximate pass(es) perturb changed the outputs" in w for w in report["warnings"]), report["warnings"]
    assert report["verification"]["metrics"]["max_rel_err"] > 1e-2
    # The lowering itself is still held exactly: artifact vs the perturbed program.
    assert report["lowering_error"]["max_rel_err"] <= 1e-4


def test_verify_each_names_the_pass_that_broke_its_contract(work):
    (work / "perturb.py").write_text(PERTURB_PLUGIN.format(contract="exact"))
    result = graphopt("compile", "mymodels:tiny", "--input-shape", "1x3x16x16", "--plugin", "perturb.py",
                      "--pipeline", "fuse-conv-bn-relu,perturb,dce", "--verify-each", "-o", "out", "-q", cwd=work)
    assert_fails(result, 1, "pass 'perturb' broke its 'exact' contract", "passes before it: [fuse-conv-bn-relu]")
    assert not (work / "out").exists()


def test_existing_output_is_not_overwritten_without_force(work):
    (work / "out").mkdir()
    (work / "out" / "keep.txt").write_text("mine")
    result = graphopt("compile", "zoo:digits_cnn", "-o", "out", cwd=work)
    assert_fails(result, 2, "'out' already exists", "--force")
    assert (work / "out" / "keep.txt").read_text() == "mine"


def test_compile_verify_and_golden_round_trip(work):
    result = graphopt("compile", "mymodels:tiny", "--input-shape", "1x3x16x16", "--verify-each",
                      "--print-ir-after", "fuse-conv-bn-relu", "-o", "out", cwd=work)
    assert result.returncode == 0, result.stderr
    assert "IR after fuse-conv-bn-relu" in result.stderr
    assert "verification PASSED" in result.stdout
    out = work / "out"
    assert {"artifact.json", "model.pt2", "report.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "cpu-fp32" and report["pipeline"] == "fuse-conv-bn-relu,dce"
    assert [p["name"] for p in report["passes"]] == ["fuse-conv-bn-relu", "dce"]
    for key in ("seconds", "nodes_before", "nodes_after", "changed", "detail"):
        assert key in report["passes"][0]
    assert report["passes"][0]["nodes_after"] < report["passes"][0]["nodes_before"]
    v = report["verification"]
    assert v["passed"] is True and v["metrics"]["max_rel_err"] <= 1e-4
    assert set(v["metrics"]) >= {"max_abs_err", "max_rel_err", "cosine", "sqnr_db", "top1_agreement"}
    assert report["latency_ms"]["original"] > 0 and report["latency_ms"]["compiled"] > 0
    assert report["size_bytes"]["compiled"] > 0 and report["macs"]["original"] == report["macs"]["compiled"] > 0

    assert graphopt("golden", "record", "mymodels:tiny_with_shape", "-o", "golden.npz", cwd=work).returncode == 0
    ok = graphopt("verify", "out", "--golden", "golden.npz", cwd=work)
    assert ok.returncode == 0, ok.stderr

    gold = dict(np.load(work / "golden.npz"))
    gold["output_0_0"] = gold["output_0_0"] + 1.0
    np.savez(work / "tampered.npz", **gold)
    assert_fails(graphopt("verify", "out", "--golden", "tampered.npz", cwd=work), 1, "does not match golden")
    assert_fails(graphopt("verify", "nowhere", "--golden", "golden.npz", cwd=work), 2, "'nowhere' does not exist")


def test_weights_and_model_option(work):
    script = "import torch, mymodels; torch.save(mymodels.tiny().state_dict(), 'w.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True)
    state_only = graphopt("compile", "w.pt", "-o", "out", cwd=work)
    assert_fails(state_only, 2, "holds only weights", "--weights w.pt")
    ok = graphopt("compile", "--model", "mymodels:tiny", "--weights", "w.pt", "--input-shape", "1x3x16x16",
                  "--no-latency", "-q", "-o", "out", cwd=work)
    assert ok.returncode == 0, ok.stderr and (work / "out" / "model.pt2").exists()


def test_listing_commands(work):
    passes = graphopt("passes", "--json", cwd=work)
    rows = {r["name"]: r for r in json.loads(passes.stdout)}
    assert rows["fuse-conv-bn-relu"]["contract"] == "exact"
    targets = json.loads(graphopt("targets", "--json", cwd=work).stdout)
    cpu = next(t for t in targets if t["name"] == "cpu-fp32")
    assert cpu["available"] is True and cpu["pipeline"] == "fuse-conv-bn-relu,dce"
    (work / "perturb.py").write_text(PERTURB_PLUGIN.format(contract="approximate"))
    listed = graphopt("passes", "--plugin", "perturb.py", cwd=work)
    assert "perturb" in listed.stdout and "amount" in listed.stdout


def test_profile_lists_every_conv_with_macs_that_add_up(work):
    from graphopt.capture import capture
    from graphopt.cost import count_macs

    result = graphopt("profile", "zoo:digits_cnn", "--json", "--runs", "2", cwd=work)
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout)
    program = capture("zoo:digits_cnn")
    convs = {n.name for n in program.graph.nodes if n.op == "call_module" and "Conv" in type(program.graph_module.get_submodule(n.target)).__name__}
    assert convs and convs <= {row["name"] for row in profile["nodes"]}
    assert sum(row["macs"] for row in profile["nodes"]) == profile["total_macs"] == count_macs(program.graph_module)
    times = [row["ms"] for row in profile["nodes"]]
    assert times == sorted(times, reverse=True) and all(t > 0 for t in times)
