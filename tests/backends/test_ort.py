"""ort-fp32 / ort-int8: ONNX export, the QDQ lowering of the simulated-int8 program, its
error against the simulation, ONNX Runtime's fusions, artifacts on disk and the CLI."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from onnx import numpy_helper  # noqa: E402

from graphopt import zoo  # noqa: E402
from graphopt.errors import ArtifactError, BackendUnavailableError, UsageError  # noqa: E402
from graphopt.pipeline import parse_pipeline  # noqa: E402
from graphopt.program import Program, flatten_outputs  # noqa: E402
from graphopt.quant import (  # noqa: E402
    check_lowering,
    lowering_error,
    quantization_error,
    verify_int8,
)

ZOO_FP32 = ["resnet18", "mobilenet_v2", "shufflenet_v2", "densenet", "se_resnet", "inception", "digits_cnn"]
ZOO_INT8 = ZOO_FP32
U8_PIPELINE = "fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce"
S8_PIPELINE = "fuse-conv-bn-relu,insert-quant-stubs{activations=s8},dce"


@pytest.fixture(scope="module")
def lowered(lowered_zoo):
    """A zoo model lowered for an ORT target; one ORT thread: no idle pool threads spinning against
    torch's between the interleaved runs of the checks (on a busy 2-core machine that costs seconds)."""

    def get(name: str, target: str = "ort-int8", pipeline: str | None = None, size: int = 48):
        return lowered_zoo(name, target, pipeline=pipeline, size=size, threads=1)

    return get


def _initializers(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _optimized_ops(model_bytes: bytes, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime actually runs (ORT_ENABLE_ALL)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


# ---------------------------------------------------------------------------------------
# Registration and availability


def test_targets_are_registered(host):
    fp32, int8 = host.targets.get("ort-fp32"), host.targets.get("ort-int8")
    assert (fp32.precision, fp32.pipeline) == ("fp32", "fuse-conv-bn-relu,dce")
    assert (int8.precision, int8.pipeline) == ("int8", U8_PIPELINE)
    for spec in (fp32, int8):
        assert str(parse_pipeline(spec.pipeline, host.passes)) == spec.pipeline
        assert spec.backend.name == "onnxruntime"
        assert spec.backend.unavailable_reason() is None
        spec.check_available()


def test_unavailable_without_onnxruntime_or_graphsurgeon(host, monkeypatch):
    fp32, int8 = host.targets.get("ort-fp32"), host.targets.get("ort-int8")
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)  # import raises ImportError
    assert fp32.backend.unavailable_reason() is None  # fp32 does not need graphsurgeon
    assert "onnx_graphsurgeon" in int8.backend.unavailable_reason()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    reason = fp32.backend.unavailable_reason()
    assert "onnxruntime" in reason and "pip install" in reason
    with pytest.raises(BackendUnavailableError, match="ort-fp32.*onnxruntime") as info:
        fp32.check_available()
    assert info.value.exit_code == 3


def test_module_imports_without_onnx_installed():
    script = textwrap.dedent("""
        import sys
        for name in ("onnx", "onnxruntime", "onnx_graphsurgeon", "onnxscript"):
            sys.modules[name] = None
        import graphopt.backends.ort as m
        print(m.ort_fp32.name, m.ort_int8.name, "|", m.ort_int8.backend.unavailable_reason())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ort-fp32 ort-int8 | onnx, onnxruntime, onnx_graphsurgeon are not installed" in out.stdout


# ---------------------------------------------------------------------------------------
# ort-fp32


@pytest.mark.parametrize("name", ZOO_FP32)
def test_fp32_matches_the_original_and_round_trips(host, lowered, name, tmp_path):
    from graphopt.compiler import load_artifact

    model, program, artifact, samples = lowered(name, "ort-fp32", size=64)
    onnx.checker.check_model(artifact.model)
    assert artifact.fields["opset"] >= 17 and artifact.fields["exporter"] == "torchscript"
    with torch.inference_mode():
        for (x,) in samples:
            want, got = model(x), artifact.run(x)
            assert isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype == torch.float32
            rel = float((got - want).abs().max() / want.abs().max())
            assert rel <= 1e-4, rel
    artifact.save(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "artifact.json").read_text())
    assert manifest["target"] == "ort-fp32" and manifest["backend"] == "onnxruntime" and manifest["files"] == ["model.onnx"]
    loaded = load_artifact(tmp_path / "art", host=host)
    assert loaded.input_specs == artifact.input_specs
    for (x,) in samples:
        torch.testing.assert_close(loaded.run(x), artifact.run(x), rtol=0, atol=1e-6)


class _Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, y):
        a = self.conv(x)
        b = self.fc(torch.flatten(a.mean((2, 3)), 1))
        return {"features": a, "pair": (b, [y * 2, b.relu()])}


def test_fp32_keeps_the_output_structure_and_several_inputs(host, tmp_path):
    from graphopt.compiler import load_artifact

    torch.manual_seed(0)
    model = _Structured().eval()
    x, y = torch.randn(1, 3, 8, 8), torch.randn(2, 5)
    program = Program(torch.fx.symbolic_trace(model), (x, y))
    spec = host.targets.get("ort-fp32")
    artifact = spec.backend.lower(program, spec)
    want = model(x, y)
    for art in (artifact, load_artifact(artifact.save(tmp_path), host=host)):
        got = art.run(x, y)
        assert set(got) == {"features", "pair"} and isinstance(got["pair"], tuple) and isinstance(got["pair"][1], list)
        for a, b in zip(flatten_outputs(got), flatten_outputs(want)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert [s.name for s in artifact.input_specs] == ["x", "y"]


class _Cummax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.cummax(self.conv(x), 1)[0]


def test_export_failure_names_the_node(host):
    from graphopt.backends.ort import OnnxExportError

    program = Program(torch.fx.symbolic_trace(_Cummax().eval()), (torch.randn(1, 3, 8, 8),))
    spec = host.targets.get("ort-fp32")
    with pytest.raises(OnnxExportError, match=r"ort-fp32: cannot export node 'cummax' \(call to torch.cummax\).*aten::cummax") as info:
        spec.backend.lower(program, spec)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_backend_options_are_checked(host):
    program = Program(torch.fx.symbolic_trace(zoo.build("digits_cnn")), (torch.randn(1, 1, 8, 8),))
    spec = host.targets.get("ort-fp32")
    program.meta["backend_options"] = {"engine": "x86"}
    with pytest.raises(UsageError, match=r"unknown backend option.*'engine'.*it takes none \(threads: --threads\)"):
        spec.backend.lower(program, spec)
    program.meta["backend_options"] = {}
    program.meta["threads"] = 1
    assert spec.backend.lower(program, spec).threads == 1


# ---------------------------------------------------------------------------------------
# ort-int8: numerics against the simulated program


@pytest.mark.parametrize("name", ZOO_INT8)
def test_int8_every_quantized_op_is_within_one_step_of_the_simulation(lowered, name):
    """Every quantizer of the simulated program is matched to the ONNX tensor holding the
    same 8-bit value; fed the lowering's own inputs, each op is within 2 (in practice 1:
    rounding ties, the int32 bias) of its output steps. This is the gate verify_int8 uses."""
    model, program, artifact, samples = lowered(name)
    result = verify_int8(model, program, artifact, samples)
    assert result["violations"] == []
    local = result["lowering_local"]
    assert local["ok"] and local["compared"] == len(program.meta["quant"].activations)
    assert max(e for _, e in local["worst"]) <= 1.01


@pytest.mark.parametrize("name", ZOO_INT8)
def test_int8_end_to_end_error_is_below_the_quantization_error(lowered, name):
    """End to end, one-step rounding differences compound through depth in these random
    (chaotic) nets; the lowering stays closer to the simulation than int8 is to fp32."""
    model, program, artifact, samples = lowered(name)
    low = lowering_error(program.run, artifact.run, samples).metrics
    quant = quantization_error(model, program.run, samples).metrics
    assert low.sqnr_db > quant.sqnr_db, (low, quant)
    assert low.cosine > 0.98


@pytest.mark.parametrize("name", [n for n in ZOO_INT8 if n != "se_resnet"])
def test_int8_matches_the_simulation_exactly_where_every_op_is_modelled(lowered, name):
    """The lowering makes the simulation round as ONNX Runtime's QLinearConv/QGemm,
    pools, QuantizeLinear, QLinearConcat and QLinearAdd do: models made of those match it
    bit for bit end to end, and the compile holds them to 2 output steps end to end."""
    _, program, artifact, samples = lowered(name)
    assert artifact.exact_simulation, artifact.fields["not_bit_exact"]
    check = check_lowering(program, artifact.run, samples)
    assert check.bounds[0] == pytest.approx(2 * program.meta["quant"].output_scales[0])
    assert check.max_abs_err == [0.0]


def test_int8_unmodelled_ops_are_listed_and_not_claimed_exact(lowered):
    """QLinearMul and fp32 ops ONNX Runtime fuses into lookup tables (the SE gate's
    sigmoid) keep their own arithmetic: that compile keeps the per-op gate and says which."""
    artifact = lowered("se_resnet")[2]
    assert not artifact.exact_simulation
    unmodelled = artifact.fields["not_bit_exact"]
    assert any(n.endswith("se_gate") for n in unmodelled) and any(n.startswith("mul") for n in unmodelled)


def test_qlinear_add_is_computed_from_the_operands_integers():
    """MLAS QLinearAdd on every pair of input integers, 20 qparam sets (half with ties):
    the simulation's QLinearAdd equals it; adding the dequantized values does not."""
    from onnx import TensorProto, helper

    from graphopt.backends.ort import OrtRounding, QLinearAdd
    from graphopt.quant import ActFakeQuant, QParams
    from tests.conftest import binary_qparams

    ia, ib = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    a8, b8 = ia.to(torch.uint8).reshape(1, 256, 16, 16).numpy(), ib.to(torch.uint8).reshape(1, 256, 16, 16).numpy()
    exact = plain = 0
    for seed in range(20):
        (sa, za), (sb, zb), (sc, zc) = binary_qparams(seed)
        inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v]) for n, v in (("sa", sa), ("sb", sb), ("sc", sc))]
        inits += [helper.make_tensor(n, TensorProto.UINT8, [], [v]) for n, v in (("za", za), ("zb", zb), ("zc", zc))]
        node = helper.make_node("QLinearAdd", ["A", "sa", "za", "B", "sb", "zb", "sc", "zc"], ["C"], domain="com.microsoft")
        io = [helper.make_tensor_value_info(n, TensorProto.UINT8, [1, 256, 16, 16]) for n in "ABC"]
        model = helper.make_model(helper.make_graph([node], "add", io[:2], io[2:], inits),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        k = torch.from_numpy(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
                             .run(None, {"A": a8, "B": b8})[0].astype(np.int64))
        fqs = [ActFakeQuant(n) for n in "abc"]
        for fq, qp in zip(fqs, ((sa, za), (sb, zb), (sc, zc))):
            fq.set_qparams(QParams(qp[0], qp[1], 0, 255))
        x = fqs[0].dequantize(torch.from_numpy(a8).float()) + fqs[1].dequantize(torch.from_numpy(b8).float())
        plain += int(((torch.round(fqs[2](x) / sc) + zc).long() != k).sum())
        for fq, q in zip(fqs, (a8, b8)):
            fq.rounding = OrtRounding(keep_integers=True)
            fq.dequantize(torch.from_numpy(q).float())
        fqs[2].rounding = QLinearAdd(a=fqs[0], b=fqs[1])
        exact += int(((torch.round(fqs[2](x) / sc) + zc).long() != k).sum())
    assert exact == 0
    assert plain > 0


def test_onnx_quantize_linear_divides_by_the_scale():
    """QuantizeLinear rounds x / scale (fake-quantization multiplies by 1/scale): on exact
    and near ties the "onnx" rounding matches ONNX Runtime, the plain one does not."""
    from onnx import TensorProto, helper

    from graphopt.backends.ort import OrtRounding
    from graphopt.quant import ActFakeQuant, QParams

    g = torch.Generator().manual_seed(0)
    scale, zp = float(torch.tensor(0.0273, dtype=torch.float32)), 117
    k = torch.randint(-100, 100, (1 << 16,), generator=g).float()
    ties = (k + 0.5) * scale
    x = torch.cat([torch.randn(1 << 16, generator=g) * 2, ties, torch.nextafter(ties, torch.tensor(0.0))])
    node = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [x.numel()])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, [x.numel()])],
                              [helper.make_tensor("s", TensorProto.FLOAT, [], [scale]), helper.make_tensor("z", TensorProto.UINT8, [], [zp])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    fq = ActFakeQuant("x")
    fq.set_qparams(QParams(scale, zp, 0, 255))
    to_int = lambda t: (torch.round(t / scale) + zp).long()
    plain = to_int(fq(x))
    fq.rounding = OrtRounding(divide=True)
    assert torch.equal(to_int(fq(x)), torch.from_numpy(y.astype(np.int64)))
    assert not torch.equal(plain, torch.from_numpy(y.astype(np.int64)))


# ---------------------------------------------------------------------------------------
# ort-int8: the QDQ graph


def test_int8_graph_has_qdq_pairs_and_int8_weights(lowered):
    _, program, artifact, _ = lowered("resnet18")
    model = artifact.model
    onnx.checker.check_model(model)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    inits = _initializers(model)
    n_act = len(program.meta["quant"].activations)
    n_layers = len(program.meta["quant"].weights)
    assert ops["QuantizeLinear"] >= n_act and ops["DequantizeLinear"] >= n_act + n_layers
    producers = {o: n for n in model.graph.node for o in n.output}
    weighted = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weighted) == n_layers == 21
    for n in weighted:
        dq = producers[n.input[1]]  # every weight is read through DequantizeLinear ...
        assert dq.op_type == "DequantizeLinear"
        q, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert q.dtype == np.int8 and q.ndim >= 2  # ... of an int8 initializer
        assert scale.shape == (q.shape[0],) and {a.name: a.i for a in dq.attribute}.get("axis", 1) == 0
        assert not (n.op_type == "Conv" and len(n.input) > 2 and inits[n.input[2]].dtype != np.float32)  # fp32 bias
    assert not [k for k, v in inits.items() if v.dtype == np.float32 and v.ndim >= 2]  # no fp32 weight left
    for n in model.graph.node:  # u8 activations
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.uint8
    assert artifact.fields["activations"] == "u8"
    assert artifact.fields["qdq"]["int8_weights"] == n_layers


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "shufflenet_v2", "inception", "densenet", "se_resnet"])
def test_int8_onnxruntime_fuses_the_whole_graph(lowered, name, tmp_path):
    """The placement lets ORT fuse every DQ -> op -> Q group: QLinearConv for every conv,
    QLinearAdd/Concat/Mul, pools on 8-bit values; one quantize at the input, one
    dequantize at the output, no fp32 Conv/Add/Relu/Clip left."""
    _, program, artifact, _ = lowered(name)
    ops = _optimized_ops(artifact.model_bytes, tmp_path)
    convs = sum(1 for w in program.meta["quant"].weights.values() if "Conv" in w["type"])
    assert ops["QLinearConv"] == convs
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops
    assert not {"Conv", "FusedConv", "Add", "Relu", "Clip", "Concat", "MaxPool", "Mul", "Gemm"} & set(ops), ops


def test_int8_artifact_is_small_and_round_trips(host, lowered, tmp_path):
    from graphopt.compiler import load_artifact

    _, program, artifact, samples = lowered("resnet18")
    _, _, fp32, _ = lowered("resnet18", "ort-fp32", size=48)
    artifact.save(tmp_path / "int8")
    fp32.save(tmp_path / "fp32")
    int8_size = (tmp_path / "int8" / "model.onnx").stat().st_size
    fp32_size = (tmp_path / "fp32" / "model.onnx").stat().st_size
    assert int8_size <= 0.30 * fp32_size, (int8_size, fp32_size)
    manifest = json.loads((tmp_path / "int8" / "artifact.json").read_text())
    assert manifest["target"] == "ort-int8" and manifest["precision"] == "int8"
    assert manifest["activations"] == "u8" and manifest["opset"] >= 17
    assert manifest["qdq"]["int8_weights"] == 21 and len(manifest["points"]) == len(program.meta["quant"].activations)
    loaded = load_artifact(tmp_path / "int8", host=host)
    assert loaded.points.keys() == artifact.points.keys()
    for (x,) in samples:
        assert torch.equal(loaded.run(x), artifact.run(x))
    assert verify_int8(program.run, program, loaded, samples[:1])["violations"] == []


def test_s8_activations_have_int8_zero_points(lowered):
    model, program, artifact, samples = lowered("mobilenet_v2", pipeline=S8_PIPELINE)
    assert program.meta["quant"].config.activations == "s8"  # the reference is not re-derived
    assert artifact.fields["activations"] == "s8"
    m = artifact.model
    inits = _initializers(m)
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    zero_points = [inits[n.input[2]] for n in qdq]
    assert qdq and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    assert verify_int8(model, program, artifact, samples)["violations"] == []
    # ReLUs stay before symmetric quantizers and ONNX Runtime does not fuse them: not modelled
    assert not artifact.exact_simulation and artifact.fields["not_bit_exact"] == ["activations=s8"]


def test_reduce_range_is_kept_by_a_clip(lowered):
    """ONNX saturates at the full 8-bit range: a 7-bit simulation needs a Clip before Q."""
    model, program, artifact, samples = lowered("digits_cnn", pipeline="fuse-conv-bn-relu,insert-quant-stubs{reduce_range=true},dce")
    ops = collections.Counter(n.op_type for n in artifact.model.graph.node)
    assert ops["Clip"] >= len(program.meta["quant"].activations) - 1
    assert verify_int8(model, program, artifact, samples)["violations"] == []
    assert check_lowering(program, artifact.run, samples).ok


def test_layers_kept_in_fp32_stay_fp32_in_onnxruntime(lowered, tmp_path):
    """ORT would quantize the float weights of a conv/gemm reading a DequantizeLinear (per
    tensor, on its own); layers the user kept in fp32 are pinned and run in fp32."""
    model, program, artifact, samples = lowered("resnet18", pipeline="fuse-conv-bn-relu,insert-quant-stubs{skip=[layers.3,fc]},dce")
    # layers.3.0.conv1/downsample, layers.3.1.conv1 and fc read a dequantized value (the
    # residual adds stay int8); layers.3.*.conv2 read fp32 values anyway
    assert artifact.fields["qdq"]["pinned_fp32_layers"] == 4
    ops = _optimized_ops(artifact.model_bytes, tmp_path)
    assert ops["QLinearConv"] == 15 and ops["Conv"] == 5 and ops["Gemm"] == 1 and "QGemm" not in ops, ops
    result = verify_int8(model, program, artifact, samples)
    assert result["violations"] == [] and max(e for _, e in result["lowering_local"]["worst"]) <= 1.01


def test_int8_needs_a_quantized_program(host):
    program = Program(torch.fx.symbolic_trace(zoo.build("digits_cnn")), (torch.randn(1, 1, 8, 8),))
    spec = host.targets.get("ort-int8")
    with pytest.raises(UsageError, match="insert-quant-stubs"):
        spec.backend.lower(program, spec)


# ---------------------------------------------------------------------------------------
# Artifacts on disk and the real CLI


def test_corrupt_or_missing_model_is_an_artifact_error(host, lowered, tmp_path):
    from graphopt.compiler import load_artifact

    _, _, artifact, _ = lowered("digits_cnn", "ort-fp32")
    artifact.save(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(ArtifactError, match="model.onnx"):
        load_artifact(tmp_path, host=host)
    (tmp_path / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match="missing model.onnx"):
        load_artifact(tmp_path, host=host)


def test_cli_compile_ort_int8_then_verify(tmp_path, capsys):
    from graphopt.cli import main

    rows = np.random.default_rng(0).standard_normal((6, 3, 64, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=rows)
    out = tmp_path / "out"
    code = main(["compile", "zoo:resnet18", "--target", "ort-int8", "--input-shape", "1x3x64x64",
                 "--calib-data", str(tmp_path / "calib.npz"), "-o", str(out), "--no-latency", "-q"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "ort-int8"
    assert json.loads((out / "artifact.json").read_text())["activations"] == "u8"
    split = report["int8_verification"]  # quantization vs lowering error; every op held to its own steps
    assert split["violations"] == [] and split["lowering_local"]["ok"]
    assert split["lowering_local"]["compared"] == 31  # resnet18's activation quantizers

    golden = tmp_path / "golden.npz"
    assert main(["golden", "record", "zoo:resnet18", "--input-shape", "1x3x64x64", "--samples", "2", "-o", str(golden)]) == 0
    assert main(["verify", str(out), "--golden", str(golden), "--min-top1", "0"]) == 0
    capsys.readouterr()
    (out / "model.onnx").write_bytes(b"not an onnx model")
    assert main(["verify", str(out), "--golden", str(golden)]) == 2
    err = capsys.readouterr().err
    assert "artifact error" in err and "model.onnx" in err


def test_cli_lists_the_targets(capsys):
    from graphopt.cli import main

    assert main(["targets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ort-fp32"]["available"] and rows["ort-int8"]["available"]
    assert rows["ort-int8"]["pipeline"] == U8_PIPELINE


def test_fp32_falls_back_to_the_torch_export_based_exporter(host, monkeypatch):
    import graphopt.backends._onnx_export as ort_backend

    def refuse(*args, **kwargs):
        raise RuntimeError("TorchScript exporter unavailable")

    monkeypatch.setattr(ort_backend, "_torchscript_export", refuse)
    model = zoo.build("digits_cnn")
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    program = Program(torch.fx.symbolic_trace(model), (x,))
    spec = host.targets.get("ort-fp32")
    artifact = spec.backend.lower(program, spec)
    assert artifact.fields["exporter"] == "dynamo" and artifact.fields["opset"] >= 18
    torch.testing.assert_close(artifact.run(x), model(x), rtol=1e-4, atol=1e-5)
