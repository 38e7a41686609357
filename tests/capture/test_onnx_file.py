"""ONNX files as sources: zoo exports at several opsets and hand-made graphs per op family,
captured to module-level fx, compiled and verified against ONNX Runtime on the original file;
bad files through the real CLI.

The default run covers representative (model, opset, target) cells; ``GRAPHOPT_ONNX_FULL=1``
runs every zoo model x opsets 11/13/17/dynamo x cpu-fp32/cpu-int8/ort-int8.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import graphopt
from graphopt import zoo
from graphopt.capture import capture
from graphopt.capture.onnx_file import OrtReference, convert
from graphopt.cost import count_macs
from graphopt.errors import CaptureError, VerificationError
from graphopt.pipeline import PassManager, parse_pipeline
from tests.test_cli import assert_fails
from tests.test_cli import graphopt as run_cli

SIZE = 32
OPSETS = (11, 13, 17, "dynamo")
TARGETS = ("cpu-fp32", "cpu-int8", "ort-int8")
FULL = os.environ.get("GRAPHOPT_ONNX_FULL") == "1"
DEFAULT_CELLS = [
    ("resnet18", 11, "cpu-fp32"), ("resnet18", 13, "ort-int8"), ("resnet18", "dynamo", "cpu-int8"),
    ("mobilenet_v2", 17, "cpu-int8"), ("shufflenet_v2", 13, "cpu-fp32"), ("se_resnet", 17, "ort-int8"),
    ("digits_cnn", "dynamo", "cpu-fp32"),
]
CELLS = list(itertools.product(zoo.names(), OPSETS, TARGETS)) if FULL else DEFAULT_CELLS


def zoo_input(name: str, size: int = SIZE) -> torch.Tensor:
    shape = zoo.get(name).input_shape if name == "digits_cnn" else (1, 3, size, size)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path, opset: int | str, **kwargs) -> Path:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        if opset == "dynamo":
            torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, **kwargs)
        else:
            torch.onnx.export(model.eval(), (x,), str(path), opset_version=opset, dynamo=False, input_names=["input"],
                              dynamic_axes={"input": {0: "N"}}, **kwargs)
    return path


@pytest.fixture(scope="module")
def zoo_onnx(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx")
    cache: dict[tuple, Path] = {}

    def get(name: str, opset: int | str, size: int = SIZE, **kwargs) -> Path:
        key = (name, opset, size, repr(sorted(kwargs.items())))
        if key not in cache:
            path = folder / f"{name}_{opset}_{size}_{len(cache)}.onnx"
            cache[key] = export_onnx(zoo.build(name), zoo_input(name, size), path, opset, **kwargs)
        return cache[key]

    return get


# --------------------------------------------------------------------------- zoo exports


@pytest.mark.parametrize("name, opset, target", CELLS)
def test_zoo_onnx_compiles_and_verifies_against_onnxruntime(zoo_onnx, tmp_path, name, opset, target):
    path = zoo_onnx(name, opset)
    result = graphopt.compile(str(path), target=target, verify_samples=2, calib_samples=16, measure=False,
                              output=tmp_path / "out")  # written and loaded back: what the artifact holds must save
    assert (tmp_path / "out" / "artifact.json").is_file()
    assert result.program.meta["source_kind"] == "onnx"
    assert "ONNX Runtime" in result.report.extra["reference"]
    assert result.report.verification, result.report.verification


def test_capture_matches_onnxruntime_and_the_torch_model(zoo_onnx):
    path = zoo_onnx("resnet18", 13)
    program = capture(str(path))
    x = program.example_inputs[0]
    assert tuple(x.shape) == (1, 3, SIZE, SIZE)  # the symbolic batch N defaulted to 1
    assert [n.target for n in program.graph.nodes if n.op == "placeholder"] == ["input"]
    assert isinstance(program.reference, OrtReference)
    ours, ort_out = program.run(x), program.run_reference(x)
    torch.testing.assert_close(ours, ort_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours, zoo.build("resnet18").eval()(x), atol=1e-4, rtol=1e-4)
    kinds = {type(m) for m in program.modules().values()}
    assert {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear, nn.AdaptiveAvgPool2d} <= kinds


def test_input_shape_overrides_the_symbolic_batch(zoo_onnx):
    program = capture(str(zoo_onnx("resnet18", 13)), input_shapes=[(3, 3, SIZE, SIZE)])
    assert tuple(program.example_inputs[0].shape) == (3, 3, SIZE, SIZE)
    torch.testing.assert_close(program.run(*program.example_inputs), program.run_reference(*program.example_inputs),
                               atol=1e-4, rtol=1e-4)


def test_input_shape_cannot_change_a_fixed_dim(zoo_onnx):
    with pytest.raises(CaptureError, match="dim 2 is fixed to 32 in the file; only symbolic dims can be set"):
        capture(str(zoo_onnx("resnet18", 13)), input_shapes=[(1, 3, 40, 40)])


def test_fuse_conv_bn_relu_folds_onnx_batchnorm(zoo_onnx):
    path = zoo_onnx("resnet18", 13, do_constant_folding=False)  # keeps BatchNormalization nodes in the file
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    result = graphopt.compile(str(path), target="cpu-fp32", pipeline="fuse-conv-bn-relu", verify_samples=2, measure=False,
                              verify_each=True)
    record = result.report.passes[0]
    assert record.name == "fuse-conv-bn-relu" and record.nodes_after < record.nodes_before
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.program.modules().values())


def test_prune_channels_cuts_onnx_resnet50_macs(zoo_onnx, host):
    program = capture(str(zoo_onnx("resnet50", 13)))
    before = count_macs(program.graph_module)
    PassManager(parse_pipeline("fuse-conv-bn-relu,prune-channels{ratio=0.3}", host.passes)).run(program)
    after = count_macs(program.graph_module)
    assert after <= 0.75 * before, (before, after)


def test_a_conversion_bug_fails_verification(zoo_onnx, monkeypatch):
    """The reference is ONNX Runtime on the file, so a wrong conversion cannot verify against itself."""
    monkeypatch.setitem(convert.CONVERTERS, "Relu", lambda b: [b.x(0)])  # drop every ReLU
    with pytest.raises(VerificationError, match="verification failed"):
        graphopt.compile(str(zoo_onnx("resnet18", 13)), target="cpu-fp32", verify_samples=2, measure=False)
    with pytest.raises(VerificationError, match="the captured graph differs from ONNX Runtime .* before any pass"):
        graphopt.compile(str(zoo_onnx("resnet18", 13)), target="cpu-fp32", verify_samples=2, measure=False, verify_each=True)


# --------------------------------------------------------------------------- hand-made graphs

_RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return (_RNG.standard_normal(shape) * 0.3).astype(np.float32)


def _model(nodes, inputs, outputs, inits=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _vi(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _conv_net(pads=None, auto_pad=None, group=1, cin=4) -> onnx.ModelProto:
    attrs = {"group": group, "strides": [2, 1]}
    attrs.update({"pads": pads} if pads else {"auto_pad": auto_pad} if auto_pad else {})
    return _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", **attrs),
                   helper.make_node("Relu", ["y"], ["out"], name="relu")],
                  [_vi("x", ["N", cin, 9, 10])], [_vi("out", None)],
                  [("w", _w(8, cin // group, 3, 3)), ("b", _w(8))])


def _pool_net(op: str, **attrs) -> onnx.ModelProto:
    return _model([helper.make_node(op, ["x"], ["out"], name="pool", kernel_shape=[3, 3], strides=[2, 2], **attrs)],
                  [_vi("x", [1, 2, 10, 11])], [_vi("out", None)])


def _const_of_shape_weight() -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([6, 3, 1, 1], np.int64), "wshape")
    return _model([helper.make_node("Constant", [], ["ws"], value=shape),
                   helper.make_node("ConstantOfShape", ["ws"], ["ones"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])),
                   helper.make_node("Mul", ["ones", "scale"], ["w"]),
                   helper.make_node("Conv", ["x", "w"], ["out"], name="conv")],
                  [_vi("x", [1, 3, 5, 5])], [_vi("out", None)], [("scale", _w(6, 3, 1, 1))])


def _channel_shuffle() -> onnx.ModelProto:
    """Shape -> Gather -> Div -> Concat -> Reshape -> Transpose -> Reshape, as ShuffleNet exports it."""
    i64 = lambda name, v: (name, np.array(v, np.int64))  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Shape", ["c"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["ch"], axis=0),
             helper.make_node("Div", ["ch", "two"], ["half"]),
             helper.make_node("Unsqueeze", ["half", "ax0"], ["half1"]),
             helper.make_node("Concat", ["lead", "half1", "tail"], ["shape5"], axis=0),
             helper.make_node("Reshape", ["c", "shape5"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "back"], ["out"])]
    inits = [("w", _w(8, 3, 1, 1)), i64("one", 1), i64("two", 2), i64("ax0", [0]), i64("lead", [1, 2]),
             i64("tail", [6, 6]), i64("back", [1, 8, 6, 6])]
    return _model(nodes, [_vi("x", [1, 3, 6, 6])], [_vi("out", None)], inits)


def _se_gate() -> onnx.ModelProto:
    nodes = [helper.make_node("GlobalAveragePool", ["x"], ["g"]),
             helper.make_node("Conv", ["g", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Conv", ["hr", "w2", "b2"], ["s"], name="fc2"),
             helper.make_node("HardSigmoid", ["s"], ["gate"], alpha=1 / 6, beta=0.5),
             helper.make_node("Mul", ["x", "gate"], ["out"])]
    return _model(nodes, [_vi("x", [1, 8, 5, 5])], [_vi("out", None)],
                  [("w1", _w(2, 8, 1, 1)), ("b1", _w(2)), ("w2", _w(8, 2, 1, 1)), ("b2", _w(8))])


def _resize(mode: str, coord: str, use_sizes: bool) -> onnx.ModelProto:
    inputs, inits = ["x", "", "scales"], [("scales", np.array([1, 1, 2, 2], np.float32))]
    if use_sizes:
        inputs, inits = ["x", "", "", "sizes"], [("sizes", np.array([1, 3, 8, 12], np.int64))]
    extra = {"nearest_mode": "floor"} if mode == "nearest" else {}
    return _model([helper.make_node("Resize", inputs, ["out"], mode=mode, coordinate_transformation_mode=coord, **extra)],
                  [_vi("x", [1, 3, 4, 6])], [_vi("out", None)], inits)


def _misc() -> onnx.ModelProto:
    """Split/Slice/Concat, Pad, Squeeze/Unsqueeze, Clip(0,6), LeakyRelu, Softmax, Flatten, MatMul+Add, Gemm, BN, LRN."""
    i64 = lambda name, v: (name, np.array(v, np.int64))  # noqa: E731
    nodes = [helper.make_node("BatchNormalization", ["x", "g", "b", "m", "v"], ["bn"], name="bn", epsilon=1e-3),
             helper.make_node("LRN", ["bn"], ["lrn"], size=3),
             helper.make_node("Split", ["lrn", "split"], ["a", "c"], axis=1),
             helper.make_node("Slice", ["a", "st", "en", "axes"], ["a2"]),
             helper.make_node("Pad", ["a2", "pads"], ["a3"], mode="reflect"),
             helper.make_node("Clip", ["c", "lo", "hi"], ["c2"]),
             helper.make_node("LeakyRelu", ["a3"], ["a4"], alpha=0.2),
             helper.make_node("Concat", ["a4", "c2"], ["cat"], axis=1),
             helper.make_node("ReduceMean", ["cat"], ["pooled"], axes=[2, 3], keepdims=1),
             helper.make_node("Squeeze", ["pooled", "sq"], ["sqz"]),
             helper.make_node("MatMul", ["sqz", "mw"], ["mm"]),
             helper.make_node("Add", ["mm", "mb"], ["mmb"]),
             helper.make_node("Gemm", ["mmb", "gw", "gb"], ["gm"], transB=1, alpha=0.5),
             helper.make_node("Unsqueeze", ["gm", "sq0"], ["u"]),
             helper.make_node("Flatten", ["u"], ["f"], axis=1),
             helper.make_node("Softmax", ["f"], ["out"], axis=-1)]
    inits = [("g", _w(6) + 1), ("b", _w(6)), ("m", _w(6)), ("v", np.abs(_w(6)) + 0.5), i64("split", [2, 4]),
             i64("st", [1]), i64("en", [7]), i64("axes", [3]), i64("pads", [0, 0, 0, 2, 0, 0, 0, 0]),
             ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32)), i64("sq", [2, 3]),
             ("mw", _w(6, 5)), ("mb", _w(5)), ("gw", _w(4, 5)), ("gb", _w(4)), i64("sq0", [0])]
    return _model(nodes, [_vi("x", [2, 6, 7, 8])], [_vi("out", None)], inits)


def _layer_norm(with_bias: bool) -> onnx.ModelProto:
    """Channels-last LayerNormalization (opset 17) between two Transposes, as ConvNeXt exports it."""
    inputs, inits = ["t", "scale"], [("scale", _w(6) + 1)]
    if with_bias:
        inputs, inits = [*inputs, "bias"], [*inits, ("bias", _w(6))]
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", inputs, ["n"], name="ln", axis=-1, epsilon=1e-6),
             helper.make_node("Transpose", ["n"], ["out"], perm=[0, 3, 1, 2])]
    return _model(nodes, [_vi("x", ["N", 6, 5, 4])], [_vi("out", None)], inits, opset=17)


def _gather() -> onnx.ModelProto:
    """Gather with rank-2 indices on a flattened tensor (the dynamo exporter's as_strided), and negative 1-d indices."""
    i64 = lambda name, v: (name, np.array(v, np.int64))  # noqa: E731
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]),
             helper.make_node("Gather", ["f", "idx2"], ["strided"], axis=0),
             helper.make_node("Gather", ["x", "neg"], ["picked"], axis=1)]
    return _model(nodes, [_vi("x", [1, 3, 4, 5])], [_vi("strided", None), _vi("picked", None)],
                  [i64("flat", [-1]), i64("idx2", [[0, 5, 7], [59, -1, 30]]), i64("neg", [-1, 0])])


HAND_MADE = {
    "gather-rank2-and-negative": (_gather, None),
    "layer-norm": (lambda: _layer_norm(True), nn.LayerNorm),
    "layer-norm-no-bias": (lambda: _layer_norm(False), nn.LayerNorm),
    "conv-asymmetric-pads": (lambda: _conv_net(pads=[0, 1, 2, 0]), nn.Conv2d),
    "conv-same-upper": (lambda: _conv_net(auto_pad="SAME_UPPER"), nn.Conv2d),
    "conv-same-lower": (lambda: _conv_net(auto_pad="SAME_LOWER"), nn.Conv2d),
    "conv-grouped": (lambda: _conv_net(pads=[1, 1, 1, 1], group=2), nn.Conv2d),
    "conv-depthwise": (lambda: _conv_net(pads=[1, 1, 1, 1], group=4), nn.Conv2d),
    "maxpool-ceil-pads": (lambda: _pool_net("MaxPool", ceil_mode=1, pads=[1, 1, 1, 1]), nn.MaxPool2d),
    "maxpool-asymmetric": (lambda: _pool_net("MaxPool", pads=[0, 1, 1, 0]), nn.MaxPool2d),
    "avgpool-ceil": (lambda: _pool_net("AveragePool", ceil_mode=1), nn.AvgPool2d),
    "avgpool-include-pad": (lambda: _pool_net("AveragePool", pads=[1, 1, 1, 1], count_include_pad=1), nn.AvgPool2d),
    "avgpool-exclude-pad": (lambda: _pool_net("AveragePool", pads=[1, 1, 1, 1], count_include_pad=0), nn.AvgPool2d),
    "constant-of-shape-weight": (_const_of_shape_weight, nn.Conv2d),
    "channel-shuffle": (_channel_shuffle, nn.Conv2d),
    "se-gating": (_se_gate, nn.Hardsigmoid),
    "resize-nearest": (lambda: _resize("nearest", "asymmetric", False), None),
    "resize-bilinear-sizes": (lambda: _resize("linear", "half_pixel", True), None),
    "resize-bilinear-align": (lambda: _resize("linear", "align_corners", True), None),
    "misc": (_misc, nn.Linear),
}


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_hand_made_graph_matches_onnxruntime(tmp_path, case):
    make, module_kind = HAND_MADE[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(make(), str(path))
    program = capture(str(path))
    assert not [n for n in program.graph.nodes if n.op == "call_function" and "Shape" in str(n.target)]
    if module_kind is not None:
        assert any(isinstance(m, module_kind) for m in program.modules().values()), program.graph_module.code
    for seed in range(2):
        x = torch.randn(program.example_inputs[0].shape, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(program.run(x), program.run_reference(x), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", sorted(HAND_MADE))
def test_every_imported_op_saves_in_a_cpu_int8_graph(tmp_path, case):
    """What the importer emits can stay fp32 in a cpu-int8 artifact: its graph.json allow-lists name every such op."""
    from graphopt.backends._cpu_int8_graph import load_graph, save_graph

    onnx.save(HAND_MADE[case][0](), str(tmp_path / "m.onnx"))
    program = capture(str(tmp_path / "m.onnx"))
    save_graph(program.graph_module, tmp_path, "x86")
    loaded, _points = load_graph(tmp_path, "x86")
    x = torch.randn(program.example_inputs[0].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(loaded(x), program.run(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("case", ["channel-shuffle", "se-gating", "misc", "layer-norm"])
def test_hand_made_graph_compiles_on_cpu_fp32(tmp_path, case):
    path = tmp_path / f"{case}.onnx"
    onnx.save(HAND_MADE[case][0](), str(path))
    result = graphopt.compile(str(path), target="cpu-fp32", verify_samples=2, measure=False)
    assert result.report.extra["reference"].startswith("ONNX Runtime")


# --------------------------------------------------------------------------- bad files, through the CLI


def _bad(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "bad.onnx"
    good = _conv_net(pads=[1, 1, 1, 1])
    if kind == "truncated":
        path.write_bytes(good.SerializeToString()[:40])
    elif kind == "unsupported-op":
        onnx.save(_model([helper.make_node("NonZero", ["x"], ["out"], name="nz")], [_vi("x", [2, 3])],
                         [helper.make_tensor_value_info("out", TensorProto.INT64, None)]), str(path))
    elif kind == "custom-domain":
        model = _model([helper.make_node("MyOp", ["x"], ["out"], name="mine", domain="com.acme")], [_vi("x", [2, 3])],
                       [_vi("out", None)])
        model.opset_import.append(helper.make_opsetid("com.acme", 1))
        onnx.save(model, str(path))
    elif kind == "opset-too-new":
        good.opset_import[0].version = 999
        onnx.save(good, str(path))
    elif kind == "no-rank":
        onnx.save(_model([helper.make_node("Relu", ["x"], ["out"])], [_vi("x", None)], [_vi("out", None)]), str(path))
    elif kind in ("missing-external", "escaping-external"):
        onnx.save(good, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
        if kind == "missing-external":
            (tmp_path / "weights.bin").unlink()
        else:
            raw = path.read_bytes().replace(b"weights.bin", b"../secret.b")
            path.write_bytes(raw)
    return path


BAD = {
    "truncated": ("not a readable ONNX file",),
    "unsupported-op": ("node 'nz' (NonZero) is not supported", "graphopt imports: Abs, Add"),
    "custom-domain": ("node 'mine' (MyOp)", "custom domain 'com.acme'"),
    "opset-too-new": ("opset 999", "graphopt reads opsets 7 to"),
    "no-rank": ("input 'x' has no static rank",),
    "missing-external": ("external data file", "weights.bin", "is missing"),
    "escaping-external": ("outside the model's folder",),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_onnx_exits_2_with_one_line_and_writes_nothing(tmp_path, kind):
    path = _bad(tmp_path, kind)
    out = tmp_path / "out"
    result = run_cli("compile", str(path), "--target", "cpu-fp32", "-o", str(out), cwd=tmp_path)
    assert_fails(result, 2, *BAD[kind])
    assert not out.exists()


def test_an_onnx_file_is_recognised_by_content(tmp_path):
    path = tmp_path / "model.bin"
    onnx.save(_se_gate(), str(path))
    program = capture(str(path))
    assert program.meta["source_kind"] == "onnx" and program.meta["opset"] == 13


def test_profile_of_an_onnx_file_times_the_original_on_onnxruntime(tmp_path):
    import json

    path = export_onnx(zoo.build("digits_cnn"), zoo_input("digits_cnn"), tmp_path / "digits.onnx", 13)
    result = run_cli("profile", str(path), "--json", "--runs", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(result.stdout)
    assert profile["original_runtime"] == OrtReference.runtime
    assert profile["original_runtime"].startswith("ONNX Runtime") and "on the original file" in profile["original_runtime"]
    assert 0 < profile["original_ms"] < 1000
    convs = [row for row in profile["nodes"] if row["target"] == "Conv2d"]
    assert len(convs) == sum(isinstance(m, nn.Conv2d) for m in zoo.build("digits_cnn").modules()) and convs[0]["macs"] > 0

    text = run_cli("profile", str(path), "--runs", "2", cwd=tmp_path)
    assert text.returncode == 0, text.stderr[-2000:]
    assert "original latency:" in text.stdout and "ONNX Runtime" in text.stdout and "on the original file" in text.stdout
    zoo_profile = json.loads(run_cli("profile", "zoo:digits_cnn", "--json", "--runs", "2", cwd=tmp_path).stdout)
    assert zoo_profile["original_ms"] is None and zoo_profile["original_runtime"] is None  # the graph is its own original
