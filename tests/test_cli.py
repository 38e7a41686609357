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


# ---------------------------------------------------------------------------------------
# Backend options: declared by the backend, shown by `graphopt targets`

TOY_BACKEND_PLUGIN = textwrap.dedent(
    '''
    from graphopt.backends.cpu_fp32 import TorchEagerBackend
    from graphopt.targets import BackendOption, register_target


    class ToyBackend(TorchEagerBackend):
        name = "toy"
        options = (BackendOption("toy_level", "how much toy", type=int, default=1),)

        def lower(self, program, target):
            artifact = super().lower(program, target)
            level = (program.meta.get("backend_options") or {}).get("toy_level", 1)
            save_files = artifact.save_files
            artifact.save_files = lambda directory: {**save_files(directory), "toy_level": level}
            return artifact


    toy = register_target("toy-fp32", backend=ToyBackend(), precision="fp32", pipeline="dce", doc="a toy")
    '''
)


def test_targets_show_each_backends_own_options(work):
    rows = {r["name"]: r for r in json.loads(graphopt("targets", "--json", cwd=work).stdout)}
    (threads,) = rows["cpu-fp32"]["options"]  # --threads: a compile option every CPU target honours
    assert threads["flag"] == "--threads" and threads["type"] == "int"
    threads, engine = rows["cpu-int8"]["options"]
    assert engine["flag"] == "--engine" and engine["type"] == "x86|fbgemm|onednn" and engine["default"] is None
    assert [o["name"] for o in rows["ort-int8"]["options"]] == ["threads"] and rows["ort-int8"]["options"][0]["type"] == "int"
    table = graphopt("targets", cwd=work).stdout
    assert "--engine" in table and "--threads" in table

    (work / "toy.py").write_text(TOY_BACKEND_PLUGIN)
    rows = {r["name"]: r for r in json.loads(graphopt("targets", "--plugin", "toy.py", "--json", cwd=work).stdout)}
    threads, *own = rows["toy-fp32"]["options"]  # a torch-eager subclass: it runs on the CPU
    assert threads["name"] == "threads" and own == [{"name": "toy_level", "flag": "--toy-level", "type": "int", "default": 1,
                                                     "help": "how much toy"}]


def test_a_plugin_backends_option_reaches_its_backend(work):
    (work / "toy.py").write_text(TOY_BACKEND_PLUGIN)
    ok = graphopt("compile", "zoo:digits_cnn", "--plugin", "toy.py", "-t", "toy-fp32", "--toy-level", "3", "--no-latency", "-q",
                  "-o", "out", cwd=work)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((work / "out" / "artifact.json").read_text())["toy_level"] == 3
    assert_fails(graphopt("compile", "zoo:digits_cnn", "--plugin", "toy.py", "-t", "toy-fp32", "--toy-level", "lots", "-o", "o2",
                          cwd=work), 2, "--toy-level 'lots' for target 'toy-fp32': expected int")
    assert_fails(graphopt("compile", "zoo:digits_cnn", "--plugin", "toy.py", "--toy-level", "3", "-o", "o2", cwd=work),
                 2, "--toy-level does not apply to target 'cpu-fp32'", "targets that take it: toy-fp32")
    assert_fails(graphopt("compile", "zoo:digits_cnn", "-t", "cpu-int8", "--engine", "arm", "-o", "o2", cwd=work),
                 2, "--engine 'arm'", "'fbgemm', 'onednn', 'x86'")
    assert not (work / "o2").exists()


# ---------------------------------------------------------------------------------------
# Data safety: --force replaces only an artifact, atomically; nothing is left behind


def _compile_tiny(work: Path, out: str, *extra: str, source: str = "mymodels:tiny") -> subprocess.CompletedProcess[str]:
    return graphopt("compile", source, "--input-shape", "1x3x16x16", "--no-latency", "-q", "-o", out, *extra, cwd=work)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("out, phrase", [
    (".", "it is the working folder or one of its parents"),
    ("..", "it is the working folder or one of its parents"),
    ("keep", "it is not a graphopt artifact (no readable artifact.json)"),
])
def test_force_never_replaces_the_working_folder_or_a_foreign_folder(work, out, phrase):
    (work / "keep").mkdir()
    (work / "keep" / "notes.txt").write_text("mine")
    before = _tree(work)
    assert_fails(_compile_tiny(work, out, "--force"), 2, f"--force will not replace '{out}'", phrase)
    assert _tree(work) == before
    assert not any(".tmp-" in p.name for p in work.rglob("*"))


def test_force_never_replaces_a_folder_holding_an_input_or_foreign_files(work):
    assert _compile_tiny(work, "models").returncode == 0
    script = "import torch, mymodels; torch.save(mymodels.tiny().state_dict(), 'models/w.pt')"
    subprocess.run([sys.executable, "-c", script], cwd=work, check=True)
    before = _tree(work)
    # models/ is an artifact, but it holds the weights this compile reads (w.pt is foreign too: the input check comes first)
    result = graphopt("compile", "--model", "mymodels:tiny", "--weights", "models/w.pt", "--input-shape", "1x3x16x16",
                      "-o", "models", "--force", cwd=work)
    assert_fails(result, 2, "--force will not replace 'models'", "it holds the input 'models/w.pt'")
    (work / "data").mkdir()
    np.save(work / "data" / "calib.npy", np.random.default_rng(0).standard_normal((8, 1, 3, 16, 16)).astype("float32"))
    result = _compile_tiny(work, "data", "--calib-data", "data/calib.npy", "--force")
    assert_fails(result, 2, "it holds the input 'data/calib.npy'")
    # the source module itself (pkg.module:factory) is an input too
    (work / "pkg").mkdir()
    (work / "pkg" / "artifact.json").write_text("{}")
    (work / "pkg" / "nets.py").write_text(MODELS_PY)
    assert_fails(_compile_tiny(work, "pkg", "--force", source="pkg.nets:tiny"), 2, "it holds the input", "nets.py")
    assert _tree(work / "models") == {k[len("models/"):]: v for k, v in before.items() if k.startswith("models/")}
    # an artifact with something foreign beside it
    before = _tree(work)
    assert_fails(_compile_tiny(work, "models", "--force"), 2, "besides the artifact it holds 'w.pt'")
    assert _tree(work) == before


def test_force_replaces_an_artifact_atomically(work):
    assert _compile_tiny(work, "out").returncode == 0
    assert json.loads((work / "out" / "artifact.json").read_text())["target"] == "cpu-fp32"
    result = _compile_tiny(work, "out", "--force", "-t", "cpu-int8", "--calib-samples", "4")
    assert result.returncode == 0, result.stderr
    assert json.loads((work / "out" / "artifact.json").read_text())["target"] == "cpu-int8"
    assert not (work / "out" / "model.pt2").exists()  # the old artifact's files went with it
    assert sorted(p.name for p in work.iterdir()) == ["mymodels.py", "out"]  # nothing aside, nothing staged


def test_a_failed_compile_removes_the_parent_folders_it_created(work):
    (work / "a").mkdir()
    assert_fails(graphopt("compile", "zoo:nope", "-o", "a/b/c/out", cwd=work), 2, "nope")
    assert sorted(p.name for p in work.iterdir()) == ["a", "mymodels.py"] and not any((work / "a").iterdir())
    ok = _compile_tiny(work, "x/y/out")
    assert ok.returncode == 0, ok.stderr
    assert (work / "x" / "y" / "out" / "artifact.json").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folders_honour_the_umask(work, umask):
    import os

    result = subprocess.run([sys.executable, "-m", "graphopt.cli", "compile", "mymodels:tiny", "--input-shape", "1x3x16x16",
                             "--no-latency", "-q", "-o", "new/out"], cwd=work, capture_output=True, text=True, timeout=600,
                            preexec_fn=lambda: os.umask(umask))
    assert result.returncode == 0, result.stderr
    for folder in (work / "new", work / "new" / "out"):
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert (work / "new" / "out" / "artifact.json").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("out, phrase", [("/proc/x", "cannot create a folder in '/proc'"),
                                         ("/dev/null/x", "'/dev/null' is not a folder")])
def test_an_impossible_output_folder_is_a_usage_error(work, out, phrase):
    assert_fails(graphopt("compile", "zoo:digits_cnn", "-o", out, cwd=work), 2, f"output '{out}'", phrase)


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT", 130)])
def test_a_signal_during_compile_leaves_nothing(work, signame, code):
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "graphopt.cli", "compile", "zoo:resnet18", "-o", "sub/out"], cwd=work,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(work.glob("sub/.out.tmp-*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the compile ended before its staging folder appeared"
        time.sleep(0.01)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    # SIGINT: the process printed "aborted" and yet once ended by re-raising SIGINT (-2) on a
    # loaded machine (cause not pinned down); either way it was interrupted and must leave nothing
    assert proc.returncode in ((code, -signal.SIGINT) if signame == "SIGINT" else (code,)), err
    assert sorted(p.name for p in work.iterdir()) == ["mymodels.py"], err  # no staging folder, no sub/


def test_stale_staging_folders_of_dead_processes_are_removed(work):
    import os

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name in (f".out.tmp-{dead.pid}-0badf00d", f".other.tmp-{dead.pid}-12345678", f".out.tmp-{os.getpid()}-0badf00d"):
        (work / name).mkdir()
        (work / name / "weights.pt").write_bytes(b"x" * 100)
    (work / ".out.tmp-notapid").mkdir()  # not graphopt's naming: left alone
    # an old artifact a dead process had renamed aside, with no artifact in its place: put back
    (work / f".prev.old-{dead.pid}-00c0ffee").mkdir()
    (work / f".prev.old-{dead.pid}-00c0ffee" / "artifact.json").write_text("{}")
    result = _compile_tiny(work, "out")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [".out.tmp-notapid", f".out.tmp-{os.getpid()}-0badf00d", "mymodels.py", "out", "prev"])
    assert (work / "prev" / "artifact.json").read_text() == "{}"
