"""trt-int8 / trt-fp16 on a machine without a GPU: the TensorRT-ready ONNX read back and held to
TensorRT's Q/DQ rules on every zoo model, its numerics on ONNX Runtime, and the fp16 form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")
pytest.importorskip("onnxconverter_common")

from onnx import TensorProto, numpy_helper  # noqa: E402

from graphopt import zoo  # noqa: E402
from graphopt.backends._trt_placement import MOVES  # noqa: E402
from graphopt.program import Program  # noqa: E402
from graphopt.quant import verify_int8  # noqa: E402
from graphopt.verify import compare  # noqa: E402
from tests.backends.conftest import compile_zoo  # noqa: E402

DEFER = {"defer_engine": True}
REJECTED = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul", "QLinearAdd"}


class Rules:
    """An ONNX model's graph, indexed for checking TensorRT's Q/DQ rules."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.nodes = list(model.graph.node)
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.init_types = {i.name: i.data_type for i in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_io = {i.name for i in model.graph.input} | {o.name for o in model.graph.output}

    def attr(self, node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def activation_dqs(self):
        return [n for n in self.nodes if n.op_type == "DequantizeLinear" and n.input[0] not in self.inits]

    def weight_dqs(self):
        return [n for n in self.nodes if n.op_type == "DequantizeLinear" and n.input[0] in self.inits]

    def through_moves(self, tensor: str):
        """Consumers of ``tensor``, looking through data-movement ops: (node, input index)."""
        for c in self.consumers.get(tensor, []):
            if c.op_type in MOVES:
                for o in c.output:
                    yield from self.through_moves(o)
            else:
                yield c, list(c.input).index(tensor)

    def from_dq(self, tensor: str) -> bool:
        """``tensor`` is a DequantizeLinear output, directly or through data-movement ops."""
        p = self.producer.get(tensor)
        while p is not None and p.op_type in MOVES:
            p = self.producer.get(p.input[0])
        return p is not None and p.op_type == "DequantizeLinear"

    def conv_output(self, tensor: str) -> bool:
        p = self.producer.get(tensor)
        return p is not None and p.op_type in ("Conv", "Gemm")


def check_tensorrt_rules(model: onnx.ModelProto) -> dict[str, int]:
    """Assert every TensorRT Q/DQ rule on ``model``; return counts of what was checked."""
    r = Rules(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= 13
    assert not REJECTED & {n.op_type for n in r.nodes}
    # symmetric int8: every zero point is int8 and 0
    for n in r.nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3 and r.init_types[n.input[2]] == TensorProto.INT8, n.name
            assert not r.inits[n.input[2]].any(), n.name
    # weights: int8, per output channel (axis 0; 1 for ConvTranspose and MatMul's [in, out]), read straight by the layer
    for dq in r.weight_dqs():
        consumers = r.consumers[dq.output[0]]
        assert all(c.op_type in ("Conv", "Gemm", "ConvTranspose", "MatMul") and list(c.input).index(dq.output[0]) == 1
                   for c in consumers), [c.op_type for c in consumers]
        assert all(r.attr(c, "transB", 1) == 1 for c in consumers if c.op_type == "Gemm")
        scale = r.inits[dq.input[1]]
        if scale.size > 1:
            want = 1 if consumers[0].op_type in ("ConvTranspose", "MatMul") else 0
            assert r.attr(dq, "axis", 1) == want
            assert scale.size == r.inits[dq.input[0]].shape[want]
    # activations: per tensor, read by a Conv/Gemm input or a residual identity branch; never after a data-movement op
    residual = 0
    for dq in r.activation_dqs():
        assert r.inits[dq.input[1]].size == 1, dq.name
        uses = list(r.through_moves(dq.output[0]))
        assert any(c.op_type in ("Conv", "Gemm", "ConvTranspose", "MatMul") and i == 0 for c, i in uses) or any(
            c.op_type == "Add" and r.conv_output(c.input[1 - i]) for c, i in uses), f"{dq.name}: no int8 op reads it"
        q = r.producer[dq.input[0]]
        assert q.op_type == "QuantizeLinear"
        src = r.producer.get(q.input[0])
        assert src is None or src.op_type not in MOVES, f"Q/DQ after {src.op_type} ({src.name})"
    for n in r.nodes:
        # nothing between a conv and its BatchNorm/ReLU
        if n.op_type in ("Relu", "BatchNormalization"):
            p = r.producer.get(n.input[0])
            if p is not None and p.op_type == "DequantizeLinear":
                q = r.producer.get(p.input[0])
                assert q is None or not r.conv_output(q.input[0]), f"Q/DQ between a conv and {n.name}"
        # residual Add: the conv branch unquantized (fused), the identity branch quantized
        if n.op_type == "Add" and len(n.input) == 2 and any(r.conv_output(t) for t in n.input):
            residual += 1
            assert any(r.from_dq(t) for t in n.input), f"identity branch of {n.name} not quantized"
        # concat inputs that are quantized share one scale
        if n.op_type == "Concat":
            scales = {float(r.inits[r.producer[t].input[1]]) for t in n.input
                      if t in r.producer and r.producer[t].op_type == "DequantizeLinear"}
            assert len(scales) <= 1, f"{n.name} reads quantized inputs on {len(scales)} scales"
    _check_fp16(r)
    return {"activation_pairs": len(r.activation_dqs()), "int8_weights": len(r.weight_dqs()), "residual_adds": residual}


def _check_fp16(r: Rules) -> None:
    """Everything not quantized is fp16: float initializers are fp16, casts only at the graph's inputs and outputs."""
    floats = {k: t for k, t in r.init_types.items() if t in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)}
    assert floats and all(t == TensorProto.FLOAT16 for t in floats.values()), "fp32 initializers left"
    for n in r.nodes:
        if n.op_type == "Cast":
            assert n.input[0] in r.graph_io or n.output[0] in r.graph_io, f"{n.name} casts inside the graph"
    for vi in r.model.graph.input:
        assert vi.type.tensor_type.elem_type == TensorProto.FLOAT  # keep_io_types: the caller's fp32


def _run(model_bytes: bytes, x: torch.Tensor) -> np.ndarray:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("name", zoo.names())
def test_trt_int8_onnx_obeys_every_qdq_rule(host, name):
    _, program, artifact, samples = compile_zoo(host, name, "trt-int8", size=32, calibration=(2, 1), backend_options=DEFER)
    counts = check_tensorrt_rules(artifact.model)
    qdq = artifact.fields["qdq"]
    assert counts["activation_pairs"] == qdq["kept_pairs"] > 0
    assert counts["int8_weights"] == qdq["int8_layers"] == qdq["int8_weights"]
    assert qdq["kept_pairs"] + qdq["dropped_pairs"] == qdq["activation_quantizers"]
    if name in ("resnet18", "resnet50", "se_resnet", "mobilenet_v2"):
        assert counts["residual_adds"] == qdq["residual_adds_fused"] > 0
    assert artifact.engine is None and artifact.fields["backend_options"] == DEFER


@pytest.mark.parametrize("name", ["resnet18", "inception", "mobilenet_v2"])
def test_trt_int8_onnx_on_onnxruntime_matches_the_mirrored_simulation(lowered_zoo, name):
    """The simulated program loses the quantizers the placement dropped: every kept one is then within
    2 of its own steps on ONNX Runtime (fp16 in between), and the whole model is as accurate as the simulation."""
    model, program, artifact, samples = lowered_zoo(name, "trt-int8", backend_options=DEFER)
    live = {n.name for n in program.graph_module.graph.nodes}
    assert set(artifact.probe_points) <= live and len(artifact.probe_points) == artifact.fields["qdq"]["kept_pairs"]
    split = verify_int8(model, program, artifact, samples)
    assert not split["violations"], split["violations"]
    assert split["lowering_local"]["compared"] == len(artifact.probe_points)
    with torch.no_grad():  # the lowering loses next to nothing beyond quantization (4 random calibration batches)
        cosine = compare([model(*s) for s in samples], [artifact.run(*s) for s in samples]).metrics.cosine
    assert cosine >= split["quantization_error"]["cosine"] - 0.005 and cosine >= 0.95


class _SharedConcat(nn.Module):
    """Two branches each read by a conv of their own and by one concat: their scales differ."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.ca, self.cb, self.cc = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 4, 1), nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.b.weight.mul_(5.0)

    def forward(self, x):
        a, b = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.ca(a) + self.cb(b) + self.cc(torch.cat([a, b], 1))


def test_concat_of_differently_scaled_inputs_reads_them_unquantized(host):
    torch.manual_seed(0)
    model = _SharedConcat().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 16, 16, generator=g)
    program = Program(torch.fx.symbolic_trace(model), (x,))
    program.propagate_shapes()
    program.calibration = [(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(4)]
    from graphopt.pipeline import PassManager, parse_pipeline

    spec = host.targets.get("trt-int8")
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    program.meta["backend_options"] = DEFER
    art = spec.backend.lower(program, spec)
    assert art.fields["qdq"]["concat_bypassed"] == 2
    check_tensorrt_rules(art.model)
    cats = [n for n in program.graph_module.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    assert cats and not any(program.graph_module.get_submodule(str(a.target)).__class__.__name__ == "ActFakeQuant"
                            for a in cats[0].args[0] if a.op == "call_module")
    samples = [(torch.randn(1, 3, 16, 16, generator=g),) for _ in range(2)]
    split = verify_int8(model, program, art, samples)
    assert not split["violations"], split["violations"]


def test_trt_fp16_onnx_is_fp16_and_close_to_fp32(lowered_zoo):
    model, program, artifact, samples = lowered_zoo("resnet18", "trt-fp16", backend_options=DEFER)
    r = Rules(artifact.model)
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in r.nodes}
    assert artifact.model.opset_import[0].version >= 13
    _check_fp16(r)
    with torch.no_grad():
        ref = [model(*s) for s in samples]
    m = compare(ref, [torch.from_numpy(_run(artifact.model_bytes, s[0])) for s in samples]).metrics
    assert m.cosine >= 0.999 and m.max_rel_err < 2e-2


def test_trt_int8_refuses_u8_and_reduced_range(host):
    from graphopt.errors import UsageError

    for pipeline, words in (("fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce", "activations=u8"),
                            ("fuse-conv-bn-relu,insert-quant-stubs{activations=s8,reduce_range=true},dce", "reduce_range")):
        with pytest.raises(UsageError, match=words):
            compile_zoo(host, "digits_cnn", "trt-int8", pipeline=pipeline, backend_options=DEFER)


def test_max_batch_makes_the_batch_dim_dynamic_for_the_optimization_profile(host):
    _, program, artifact, samples = compile_zoo(host, "resnet18", "trt-fp16", size=32,
                                                backend_options={**DEFER, "max_batch": 4})
    for value in [*artifact.model.graph.input, *artifact.model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert artifact.fields["engine_options"] == {"max_batch": 4}
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batched = artifact.run(x)
    assert batched.shape == (3, 1000)
    assert torch.allclose(batched[1:2], artifact.run(x[1:2]), rtol=1e-2, atol=1e-2)


def test_max_batch_refuses_a_graph_that_fixes_its_batch():
    import io

    from graphopt.backends.tensorrt import dynamic_batch
    from graphopt.errors import UsageError

    class Fixed(nn.Module):
        def forward(self, x):
            return torch.relu(x).reshape(1, -1)

    buf = io.BytesIO()
    torch.onnx.export(Fixed(), (torch.randn(1, 3, 4, 4),), buf, dynamo=False, input_names=["x"])
    with pytest.raises(UsageError, match="--max-batch 4: the exported graph fixes its batch dim"):
        dynamic_batch(buf.getvalue(), 4, "trt-fp16")
