"""graphopt.compile() from Python: the report's contract, artifacts on disk, the user's model untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.errors import UsageError, VerificationError
from graphopt.verify import Tolerance

REPORT_KEYS = {"source", "target", "pipeline", "passes", "verification", "latency_ms", "size_bytes", "macs"}


def _digits_data(path, n=48, seed=0):
    """Real 8x8 digit images (scikit-learn's bundled set), shaped for the zoo digits CNN."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype("float32") / 16.0
    rng = np.random.default_rng(seed)
    rows = images[rng.permutation(len(images))[:n]][:, None]
    np.save(path, rows)
    return path


def test_compile_a_module_writes_a_loadable_artifact_and_leaves_the_model_alone(tmp_path):
    model = zoo.build("se_resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(zoo.get("se_resnet").input_shape, generator=torch.Generator().manual_seed(0))
    result = graphopt.compile(model, target="cpu-fp32", example_inputs=(x,), output=tmp_path / "out", verify_samples=2)

    # The user's module is not modified: same weights, same BatchNorm modules, same mode.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not model.training

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["verification"]["metrics"]) == {"max_abs_err", "max_rel_err", "cosine", "sqnr_db", "top1_agreement",
                                                        "top1_counted", "top1_rows"}
    assert report["verification"]["passed"] is True
    assert {"name", "seconds", "nodes_before", "nodes_after", "changed", "detail"} <= set(report["passes"][0])
    assert report["macs"]["compiled"] == report["macs"]["original"] > 0  # fusion does not change MACs
    assert report["latency_ms"]["original"] > 0 and report["latency_ms"]["compiled"] > 0
    took = report["compile_seconds"]  # wall seconds per phase, every phase that ran, and the whole compile
    assert list(took) == ["capture", "passes", "lowering", "saving", "verification", "latency", "total"]
    assert all(v >= 0 for v in took.values())
    assert sum(v for k, v in took.items() if k != "total") <= took["total"] + 0.01  # phases rounded to 1 ms
    assert any(line.startswith("compile time: ") for line in result.report.detail_lines())

    artifact = graphopt.load_artifact(tmp_path / "out")
    with torch.inference_mode():
        want = model(x)
    got = artifact.run(x)
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert result.output == tmp_path / "out"


def test_int8_compile_reports_quantization_and_lowering_error_separately(tmp_path):
    data = _digits_data(tmp_path / "digits.npy", n=48)
    result = graphopt.compile("zoo:digits_cnn", target="cpu-int8", data=data, calib_samples=32, verify_samples=16,
                              output=tmp_path / "out", measure=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    split = report["int8_verification"]
    assert split["lowering_local"]["ok"] and split["violations"] == []
    # The artifact's error against fp32 is the quantization error plus a lowering error that is much smaller.
    assert split["lowering_error"]["max_abs_err"] < split["quantization_error"]["max_abs_err"] + 1e-6 or \
        split["lowering_error"]["cosine"] > split["quantization_error"]["cosine"]
    assert report["calibration"] == {"source": f"file '{data}', 32 samples", "samples": 32}
    assert not any("RANDOM DATA" in w for w in report["warnings"])
    assert not any("overlap" in w for w in report["warnings"])  # 16 held-out samples remained
    assert report["verification"]["samples"] == 16
    # graph.json's fixed overhead weighs on a 25k-parameter model; the 30% bound on ResNet-18 is
    # tested in tests/backends/test_cpu_int8.py.
    assert report["size_bytes"]["compiled"] <= 0.4 * report["size_bytes"]["original"]
    assert result.artifact.precision == "int8"


def test_int8_without_calibration_data_warns_loudly(tmp_path):
    result = graphopt.compile("zoo:digits_cnn", target="cpu-int8", calib_samples=4, verify_samples=2, measure=False)
    assert any("CALIBRATION USED RANDOM DATA" in w for w in result.report.warnings)


def test_keep_fp32_auto_keeps_layers_until_the_tolerance_is_met(tmp_path):
    data = _digits_data(tmp_path / "digits.npy", n=40)
    tight = Tolerance(min_cosine=0.99999)
    with pytest.raises(VerificationError, match="--keep-fp32 auto"):  # 'none': every layer int8, no fallback
        graphopt.compile("zoo:digits_cnn", target="cpu-int8", data=data, calib_samples=32, verify_samples=8,
                         tolerance=tight, keep_fp32=["none"], measure=False)
    result = graphopt.compile("zoo:digits_cnn", target="cpu-int8", data=data, calib_samples=32, verify_samples=8,
                              keep_fp32=["auto"], tolerance=Tolerance(min_cosine=0.9999), measure=False)
    kept = result.report.extra["quantization"]["kept_fp32"]
    assert kept and all(k["reason"] == "auto" and k["sensitivity"] >= 0 for k in kept)
    auto = result.report.extra["quantization"]["keep_fp32_auto"]
    assert auto["met"] and auto["after"]["cosine"] >= 0.9999 > auto["before"]["cosine"]
    assert result.report.verification.passed and result.report.verification.metrics.cosine >= 0.9999


def test_auto_cosine_leaves_half_the_noise_the_bound_allows():
    from graphopt.compiler import auto_cosine

    assert auto_cosine(0.98) == pytest.approx(0.98985, abs=1e-5) and auto_cosine(0.9) == pytest.approx(0.94606, abs=1e-5)
    for c in (0.5, 0.9, 0.98, 0.9999):  # noise-to-signal ratio 1/c^2 - 1, halved
        assert (1 / auto_cosine(c) ** 2 - 1) == pytest.approx((1 / c**2 - 1) / 2)
    assert auto_cosine(1.0) == 1.0 and 0 < auto_cosine(-0.5) < 1e-6


def test_int8_fallback_is_the_default_and_a_no_op_when_full_int8_meets_the_tolerance():
    """Without --keep-fp32 an int8 compile checks full int8 on the calibration inputs; when it meets the
    target's bound (aimed 3 dB inside it) nothing changes: outputs are bit-identical to --keep-fp32 none."""
    kw = dict(target="cpu-int8", calib_samples=4, verify_samples=2, measure=False)
    default = graphopt.compile("zoo:digits_cnn", **kw)
    quant = default.report.extra["quantization"]
    auto = quant["keep_fp32_auto"]
    assert auto["tolerance"]["min_cosine"] == pytest.approx(0.98985, abs=1e-5) and auto["met"]
    assert auto["kept"] == [] and quant["kept_fp32"] == [] and auto["before"] == auto["after"]
    full = graphopt.compile("zoo:digits_cnn", keep_fp32=["none"], **kw)
    assert "keep_fp32_auto" not in full.report.extra["quantization"]
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(default.artifact.run(x), full.artifact.run(x))


def test_keep_fp32_needs_an_int8_pipeline():
    with pytest.raises(UsageError, match="--keep-fp32 needs a pipeline with 'insert-quant-stubs'"):
        graphopt.compile("zoo:digits_cnn", target="cpu-fp32", keep_fp32=["features.0.0"])


def test_pruning_pipeline_is_reported_not_failed_and_cuts_macs():
    result = graphopt.compile("zoo:resnet18", target="cpu-fp32", input_shapes=[(1, 3, 64, 64)],
                              pipeline="fuse-conv-bn-relu,prune-channels{ratio=0.3},dce", verify_samples=2, measure=False)
    report = result.report
    assert report.macs["compiled"] < 0.75 * report.macs["original"]
    assert any("approximate pass(es) prune-channels" in w for w in report.warnings)
    assert report.extra["lowering_error"]["max_rel_err"] <= 1e-4  # the lowering itself is exact
    # With an explicit bound the same rewrite fails verification.
    with pytest.raises(VerificationError):
        graphopt.compile("zoo:resnet18", target="cpu-fp32", input_shapes=[(1, 3, 64, 64)],
                         pipeline="fuse-conv-bn-relu,prune-channels{ratio=0.3},dce", verify_samples=2, measure=False,
                         tolerance=Tolerance(min_cosine=0.9999))


def test_recovery_runs_after_pruning_and_before_quantization(tmp_path):
    """--recover-steps with an int8 pipeline: recovery refuses quantized programs, so success proves the order."""
    result = graphopt.compile(
        "zoo:digits_cnn", target="cpu-int8", data="graphopt.datasets:digits", calib_samples=64, verify_samples=8,
        pipeline="fuse-conv-bn-relu,prune-channels{ratio=0.5},insert-quant-stubs,dce", recover_steps=60, measure=False,
        output=tmp_path / "out",
    )
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rec = report["recovery"]
    assert rec["steps"] == 60 and len(rec["loss_curve"]) == 60
    assert rec["last_loss"] < 0.5 * rec["first_loss"]
    assert report["calibration"]["source"].startswith("callable 'graphopt.datasets:digits'")
    assert result.report.extra["quantization"]["quantized_layers"]


def test_recover_steps_must_not_be_negative():
    with pytest.raises(UsageError, match="--recover-steps must be >= 0"):
        graphopt.compile("zoo:digits_cnn", recover_steps=-1)


def test_recovery_on_random_data_says_so():
    result = graphopt.compile("zoo:digits_cnn", pipeline="fuse-conv-bn-relu,prune-channels{ratio=0.5},dce",
                              recover_steps=5, verify_samples=2, measure=False)
    assert any(w.startswith("RECOVERY USED RANDOM DATA") for w in result.report.warnings)
    assert not any("int8 ranges" in w for w in result.report.warnings)  # no quantization in this pipeline
    assert result.report.extra["recovery"]["steps"] == 5


# ---------------------------------------------------------------------------------------
# CompileOptions: built once, validated in one place, one line per error


def test_unknown_keyword_lists_the_valid_options():
    with pytest.raises(UsageError) as info:
        graphopt.compile("zoo:digits_cnn", targte="cpu-int8")
    message = str(info.value)
    assert "unknown option(s) 'targte'" in message and "'target'" in message and "'calib_samples'" in message
    assert "\n" not in message


@pytest.mark.parametrize("overrides, phrase", [
    ({"calib_samples": 0}, "--calib-samples must be >= 1, got 0"),
    ({"verify_samples": 0}, "--verify-samples must be >= 1, got 0"),
    ({"verify_samples": 2.5}, "--verify-samples must be an integer, got 2.5"),
    ({"recover_steps": -1}, "--recover-steps must be >= 0, got -1"),
    ({"recover_lr": 0.0}, "--recover-lr must be > 0, got 0.0"),
    ({"recover_lr": float("nan")}, "--recover-lr must be > 0, got nan"),
    ({"calib_normalize": "imagenette"}, "--calib-normalize 'imagenette': not one of 'imagenet', 'none', 'unit'"),
    ({"data": "no/such.npy"}, "--calib-data 'no/such.npy' does not exist"),
    ({"tolerance": 0.99}, "tolerance must be a graphopt.verify.Tolerance, got float"),
])
def test_options_are_checked_on_construction(overrides, phrase):
    with pytest.raises(UsageError) as info:
        graphopt.CompileOptions(**overrides)
    assert phrase in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("overrides, phrases", [
    ({"print_ir_after": ["fold"]}, ["--print-ir-after 'fold'", "'dce'", "'all'"]),
    ({"keep_fp32": "auto"}, ["--keep-fp32 needs a pipeline with 'insert-quant-stubs'"]),
    ({"backend_options": {"engine": "x86"}}, ["--engine does not apply to target 'cpu-fp32' (its options: none)",
                                              "targets that take it: cpu-int8"]),
    ({"target": "cpu-int8", "backend_options": {"engine": "arm"}}, ["--engine 'arm' for target 'cpu-int8'",
                                                                    "not one of 'fbgemm', 'onednn', 'x86'"]),
    ({"target": "cpu-int8", "backend_options": {"threads": 2}}, ["threads is no backend option", "--threads N"]),
    ({"target": "ort-fp32", "threads": "two"}, ["--threads 'two': expected a positive number of threads"]),
    ({"threads": 0}, ["--threads 0: expected a positive number of threads"]),
])
def test_options_are_checked_against_the_target_before_capture(overrides, phrases, monkeypatch):
    import graphopt.compiler

    def no_capture(*a, **k):
        raise AssertionError("capture ran before the options were checked")

    monkeypatch.setattr(graphopt.compiler, "capture", no_capture)
    with pytest.raises(UsageError) as info:
        graphopt.compile("zoo:digits_cnn", **overrides)
    assert "\n" not in str(info.value)
    for phrase in phrases:
        assert phrase in str(info.value)


def test_options_object_with_keyword_overrides_and_names_as_text(tmp_path):
    from graphopt.compiler import CompileOptions

    options = CompileOptions(target="cpu-int8", calib_samples=4, verify_samples=2, measure=False,
                             backend_options={"engine": "fbgemm"}, keep_fp32="features.0.0, head.2")
    assert options.keep_fp32 == ("features.0.0", "head.2")  # comma-separated text, as on the command line
    result = graphopt.compile("zoo:digits_cnn", options, output=tmp_path / "out")
    assert options.output is None  # the overrides made a new options object
    manifest = json.loads((tmp_path / "out" / "artifact.json").read_text())
    assert manifest["engine"] == "fbgemm" and result.artifact.engine == "fbgemm"
    kept = {k["layer"] for k in result.report.extra["quantization"]["kept_fp32"]}
    assert kept == {"features.0.0", "head.2"}
    with pytest.raises(UsageError, match="options must be a CompileOptions, got dict"):
        graphopt.compile("zoo:digits_cnn", {"target": "cpu-int8"})
