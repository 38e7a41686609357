"""``--threads``: one intra-op thread count for every target that runs on the CPU, recorded in
the manifest, honoured inside ``run`` (without leaking torch's global setting) and
replaceable at load time (``load_artifact(dir, threads=N)``)."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

import graphopt
from graphopt.cli import main
from graphopt.compiler import load_artifact
from graphopt.errors import ArtifactError, UsageError
from graphopt.threads import ENV, default_threads, torch_threads


def test_default_is_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert default_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv(ENV, "3")
    assert default_threads() == 3
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(UsageError, match="GRAPHOPT_THREADS 'lots': expected a positive number of threads"):
        default_threads()


def test_torch_threads_is_scoped():
    before = torch.get_num_threads()
    with torch_threads(before + 2):
        assert torch.get_num_threads() == before + 2
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


class _Recorder:
    """Stands in for what an artifact's ``run`` calls; remembers torch's thread count during the call."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __call__(self, *inputs):
        self.seen.append(torch.get_num_threads())
        return self.inner(*inputs)


def _compile(tmp_path, target: str, **options):
    return graphopt.compile("zoo:digits_cnn", target=target, output=tmp_path / target, verify_samples=2, calib_samples=4,
                            measure=False, **options)


@pytest.mark.parametrize("target, field", [("cpu-fp32", "module"), ("cpu-int8", "_runner")])
def test_torch_targets_record_and_honour_threads(tmp_path, target, field):
    result = _compile(tmp_path, target, threads=3)
    manifest = json.loads((tmp_path / target / "artifact.json").read_text())
    assert manifest["threads"] == 3 and result.report.extra["threads"] == 3
    before = torch.get_num_threads()
    for art, want in ((load_artifact(tmp_path / target), 3), (load_artifact(tmp_path / target, threads=2), 2)):
        assert art.threads == want
        x = torch.randn(art.input_specs[0].shape)
        expected = art.run(x)  # builds cpu-int8's frozen runner first
        recorder = _Recorder(getattr(art, field))
        setattr(art, field, recorder)
        assert torch.equal(art.run(x), expected)
        assert recorder.seen == [want] and torch.get_num_threads() == before
    assert json.loads((tmp_path / target / "artifact.json").read_text())["threads"] == 3  # loading rewrites nothing


def test_cpu_int8_fast_path_keeps_the_engine_and_threads_right(tmp_path):
    """In a serving loop (inference mode, threads and engine already set) cpu-int8 calls its frozen
    module directly; a changed engine or thread count still takes the checked path."""
    _compile(tmp_path, "cpu-int8", threads=2)
    art = load_artifact(tmp_path / "cpu-int8")
    x = torch.randn(art.input_specs[0].shape, generator=torch.Generator().manual_seed(0))
    expected = art.run(x)
    other = next(e for e in ("fbgemm", "onednn", "x86") if e != art.engine and e in torch.backends.quantized.supported_engines)
    recorder = _Recorder(art._runner)
    art._runner = recorder
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    try:
        torch.set_num_threads(2)
        with torch.inference_mode():
            assert torch.equal(art.run(x), expected)  # the direct call
            torch.backends.quantized.engine = other
            assert torch.equal(art.run(x), expected)
            assert torch.backends.quantized.engine == art.engine  # put back by the checked path
            torch.set_num_threads(1)
            assert torch.equal(art.run(x), expected)
            assert torch.get_num_threads() == 1  # restored after the run
        assert torch.equal(art.run(x), expected)  # outside inference mode: checked path, no autograd graph
        assert recorder.seen == [2, 2, 2, 2]
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = engine


@pytest.mark.parametrize("target", ["ort-fp32", "ort-int8"])
def test_ort_session_gets_the_threads(tmp_path, target):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx_graphsurgeon")
    _compile(tmp_path, target, threads=2)
    assert json.loads((tmp_path / target / "artifact.json").read_text())["threads"] == 2
    for threads, want in ((None, 2), (1, 1)):
        art = load_artifact(tmp_path / target, threads=threads)
        assert art.threads == want
        assert art.session.get_session_options().intra_op_num_threads == want


def test_default_threads_follow_the_loading_machine_and_given_ones_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "2")
    result = _compile(tmp_path, "cpu-fp32")
    assert "threads" not in json.loads((tmp_path / "cpu-fp32" / "artifact.json").read_text())  # not the build box's count
    assert result.artifact.threads == 2 and json.loads((tmp_path / "cpu-fp32" / "report.json").read_text())["threads"] == 2
    monkeypatch.setenv(ENV, "3")  # another machine
    assert load_artifact(tmp_path / "cpu-fp32").threads == 3
    _compile(tmp_path / "pinned", "cpu-fp32", threads=1)
    assert json.loads((tmp_path / "pinned" / "cpu-fp32" / "artifact.json").read_text())["threads"] == 1
    assert load_artifact(tmp_path / "pinned" / "cpu-fp32").threads == 1


def test_bad_threads(tmp_path):
    with pytest.raises(UsageError, match=r"--threads 0: expected a positive number of threads"):
        graphopt.compile("zoo:digits_cnn", threads=0)
    with pytest.raises(UsageError, match=r"threads is no backend option: give it as threads=N \(--threads N\)"):
        graphopt.compile("zoo:digits_cnn", target="ort-fp32", backend_options={"threads": 2})
    _compile(tmp_path, "cpu-fp32", threads=1)
    with pytest.raises(UsageError, match=r"load_artifact\(threads=\) -1: expected a positive number"):
        load_artifact(tmp_path / "cpu-fp32", threads=-1)
    path = tmp_path / "cpu-fp32" / "artifact.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), threads="many")))
    with pytest.raises(ArtifactError, match="'threads' is 'many', expected a positive integer"):
        load_artifact(tmp_path / "cpu-fp32")


@pytest.mark.parametrize("value, phrase", [("0", "0 is not in the range x>=1"), ("two", "'two' is not a valid integer")])
def test_cli_bad_threads_exits_2_with_one_line(tmp_path, capsys, value, phrase):
    code = main(["compile", "zoo:digits_cnn", "-o", str(tmp_path / "out"), "--threads", value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("graphopt: usage error:") and "--threads" in err and phrase in err
    assert not (tmp_path / "out").exists()


def test_cli_threads_reach_the_manifest(tmp_path):
    out = tmp_path / "out"
    assert main(["compile", "zoo:digits_cnn", "-o", str(out), "--threads", "2", "--no-latency", "-q",
                 "--verify-samples", "2"]) == 0
    assert json.loads((out / "artifact.json").read_text())["threads"] == 2


GPU_PLUGIN = textwrap.dedent('''
    from graphopt.backends.cpu_fp32 import TorchEagerBackend
    from graphopt.targets import register_target

    class NotOnTheCpu(TorchEagerBackend):
        name = "elsewhere"
        cpu_threads = False

    elsewhere = register_target("elsewhere-fp32", backend=NotOnTheCpu(), precision="fp32", pipeline="dce", doc="not a CPU")
''')


def test_threads_refused_where_the_target_does_not_run_on_the_cpu(tmp_path):
    (tmp_path / "elsewhere.py").write_text(GPU_PLUGIN)
    with pytest.raises(UsageError, match="--threads does not apply to target 'elsewhere-fp32'.*take it: cpu-fp32, cpu-int8"):
        graphopt.compile("zoo:digits_cnn", target="elsewhere-fp32", plugins=[str(tmp_path / "elsewhere.py")], threads=2)
    result = graphopt.compile("zoo:digits_cnn", target="elsewhere-fp32", plugins=[str(tmp_path / "elsewhere.py")],
                              verify_samples=2, measure=False)
    assert "threads" not in result.report.extra
