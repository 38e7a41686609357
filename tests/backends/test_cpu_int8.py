"""cpu-int8: lowering to quantized CPU kernels, its error against the simulated program,
and the artifact's save/load round trip."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx
from torch import nn

from graphopt import zoo
from graphopt.errors import ArtifactError, UsageError
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.program import Program
from graphopt.quant import ActFakeQuant, check_lowering, check_lowering_local
from tests.backends.conftest import compile_zoo

QUANTIZED_LAYERS = (nnq.Conv2d, nnq.Linear, nniq.ConvReLU2d, nniq.LinearReLU)


def compile_int8(host, name: str, *, engine: str | None = None, pipeline: str | None = None, size: int = 48):
    """A zoo model through cpu-int8 (3 calibration batches of 2, of 8 for the digits CNN)."""
    return compile_zoo(host, name, "cpu-int8", pipeline=pipeline, size=size, calibration=(3, 8 if name == "digits_cnn" else 2),
                       backend_options={"engine": engine} if engine else None)


@pytest.fixture(scope="module")
def compiled(lowered_zoo):
    return lambda name: lowered_zoo(name, "cpu-int8", calibration=(3, 8 if name == "digits_cnn" else 2))


def test_target_is_registered(host):
    spec = host.targets.get("cpu-int8")
    assert spec.precision == "int8"
    assert spec.pipeline == "fuse-conv-bn-relu,insert-quant-stubs{activations=u8},dce"
    assert str(parse_pipeline(spec.pipeline, host.passes)) == spec.pipeline


@pytest.mark.parametrize("name", zoo.names())
def test_every_op_lowers_exactly(compiled, name):
    """Each quantized op of the lowering, fed the lowering's own inputs, gives exactly the
    simulated op's integers: the simulation reproduces the kernels' arithmetic."""
    _, program, artifact, samples = compiled(name)
    check = check_lowering_local(program, artifact.graph_module, artifact.points, samples[:1])
    assert check.ok, check.violations
    assert len(check.errors) == len(program.meta["quant"].activations)
    assert max(check.errors.values()) == 0, check.worst()


#: ops whose fbgemm rounding the simulation does not reproduce bit for bit: quantized BatchNorm
#: (DenseNet-121's pre-activation ones) and fp32 LayerNorm, which turns last-ulp differences
#: of dequantize into rounding ties at the next quantizer
NOT_BIT_EXACT = {"densenet121": {"BNReLU2d"}, "convnext": {"LayerNorm", "layer_norm"}}


@pytest.mark.parametrize("name", zoo.names())
def test_every_zoo_model_matches_the_simulation_end_to_end(compiled, name):
    """The issue's bound is two output quantization steps end to end on every zoo model;
    with the kernels' arithmetic simulated there is no rounding flip left to compound
    through depth, so the outputs are identical (plain fake-quantization drifted by up to
    18 steps on ShuffleNetV2)."""
    _, program, artifact, samples = compiled(name)
    if name in NOT_BIT_EXACT:  # held to the per-op bound (test_every_op_lowers_exactly) instead
        kinds = {type(artifact.graph_module.get_submodule(n.target)).__name__ if n.op == "call_module" else n.target.__name__
                 for n in artifact.graph_module.graph.nodes if n.name in artifact.stats["not_bit_exact"]}
        assert not artifact.exact_simulation and kinds == NOT_BIT_EXACT[name]
        return
    assert artifact.exact_simulation, artifact.stats["not_bit_exact"]
    assert isinstance(artifact.runner, torch.jit.ScriptModule)  # what is held to the simulation: the frozen module
    check = check_lowering(program, artifact.run, samples)
    assert check.ok, check.violations
    assert check.bounds[0] == pytest.approx(2 * program.meta["quant"].output_scales[0])
    assert check.max_abs_err == [0.0]


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_end_to_end_exact_at_batch_4_and_another_size(host, name):
    """Kernel paths change with the shape (oneDNN's implementation, pool vectorization)."""
    _, program, artifact, samples = compile_int8(host, name, size=72)
    batch = [(torch.cat([s[0] for s in samples] * 2),)]
    assert check_lowering(program, artifact.run, batch).max_abs_err == [0.0]


@pytest.mark.parametrize("name", zoo.names())
def test_lowered_graph_uses_quantized_kernels(compiled, name):
    _, program, artifact, _ = compiled(name)
    gm = artifact.graph_module
    float_layers = [n for n, m in gm.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert not float_layers
    n_quantized = sum(isinstance(m, QUANTIZED_LAYERS) for m in gm.modules())
    assert n_quantized == len(program.meta["quant"].weights)
    quantize = [n for n in gm.graph.nodes if n.target is torch.quantize_per_tensor]
    dequantize = [n for n in gm.graph.nodes if n.target is torch.dequantize]
    assert artifact.stats["quantize"] == len(quantize) and artifact.stats["dequantize"] == len(dequantize)
    float_ops = {f["op"] for f in program.meta["quant"].float_ops}
    if not float_ops:  # one region: quantize at entry, dequantize at exit, nothing between
        assert len(quantize) == 1 and len(dequantize) == 1
    else:  # fp32 islands only where no int8 kernel exists (se_resnet, efficientnet_b0, convnext)
        assert float_ops <= {"Sigmoid", "SiLU", "GELU", "LayerNorm", "layer_norm"}, float_ops
        assert len(quantize) > 1 and len(dequantize) > 1


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "se_resnet", "shufflenet_v2", "efficientnet_b0", "inception"])
def test_artifact_runs_a_frozen_torchscript_module(compiled, name, monkeypatch):
    """run() dispatches no op through Python: it calls the frozen TorchScript module of the
    lowered graph (weights inlined as constants, no attribute reads, no Python ops), which
    computes what the fx graph computes bit for bit, also once the profiling executor has
    optimized it (several runs) and at another batch size."""
    _, program, artifact, samples = compiled(name)
    samples = [*samples, (torch.cat([s[0] for s in samples] * 2),)]
    with torch.inference_mode():
        expected = [artifact.graph_module(*s) for s in samples]
    runner = artifact.runner
    assert isinstance(runner, torch.jit.ScriptModule)
    graph = str(runner.graph)
    assert "quantized::conv2d" in graph and "prim::GetAttr" not in graph and "prim::PythonOp" not in graph
    assert "prim::RaiseException" not in graph and "aten::len" not in graph  # no input-rank check before each kernel
    monkeypatch.setattr(artifact.graph_module, "forward", lambda *a: pytest.fail("run() went through the fx graph"))
    for _ in range(3):
        for s, e in zip(samples, expected):
            assert torch.equal(artifact.run(*s), e)


def test_resnet_graph_shape(compiled):
    _, _, artifact, _ = compiled("resnet18")
    gm = artifact.graph_module
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.quantized.add_relu) == 8  # residual add + relu, fused
    assert sum(isinstance(m, nniq.ConvReLU2d) for m in gm.modules()) == 9
    assert isinstance(gm.get_submodule("fc"), nnq.Linear)


def test_se_resnet_islands_and_mobilenet_relu6(compiled):
    _, _, artifact, _ = compiled("se_resnet")
    gm = artifact.graph_module
    sigmoid = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Sigmoid)]
    assert sigmoid and all(n.args[0].target is torch.dequantize for n in sigmoid)  # fp32 island
    assert torch.ops.quantized.mul in [n.target for n in gm.graph.nodes]
    _, _, artifact, _ = compiled("mobilenet_v2")
    assert not any(isinstance(m, nn.ReLU6) for m in artifact.graph_module.modules())  # absorbed into ConvReLU2d


def test_skipped_layer_is_an_fp32_island(host):
    model, program, artifact, samples = compile_int8(host, "resnet18", pipeline="fuse-conv-bn-relu,insert-quant-stubs{skip=[fc]},dce")
    gm = artifact.graph_module
    assert type(gm.get_submodule("fc")) is nn.Linear
    (fc,) = [n for n in gm.graph.nodes if n.target == "fc"]
    assert fc.args[0].target is torch.dequantize
    assert check_lowering_local(program, gm, artifact.points, samples[:1]).ok
    assert program.meta["quant"].output_scales == [None]  # no quantizer right before the output


def test_layer_called_twice_is_not_claimed_exact(host):
    """One conv module called on two differently quantized inputs: a single kernel
    arithmetic cannot describe both calls, so the lowering does not claim a bit-exact
    simulation (and the compile falls back to the per-op gate)."""
    from tests.conftest import program_of

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x):
            return self.conv(torch.relu(self.conv(x)) * 3.0)

    torch.manual_seed(0)
    program = program_of(Twice(), (1, 8, 12, 12))
    g = torch.Generator().manual_seed(1)
    program.calibration = [(torch.randn(2, 8, 12, 12, generator=g),) for _ in range(2)]
    spec = host.targets.get("cpu-int8")
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    assert artifact.exact_simulation is False
    assert program.graph_module.get_submodule("conv").arithmetic is None
    samples = [(torch.randn(1, 8, 12, 12, generator=g),)]
    assert check_lowering_local(program, artifact.graph_module, artifact.points, samples).ok


def test_linear_relu_lowers_to_fused_kernel(host, tmp_path):
    """Linear followed by ReLU becomes quantized LinearReLU (and survives save/load)."""
    from graphopt.compiler import load_artifact
    from tests.conftest import program_of

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    program = program_of(model, (4, 32))
    g = torch.Generator().manual_seed(1)
    program.calibration = [(torch.randn(16, 32, generator=g),) for _ in range(2)]
    spec = host.targets.get("cpu-int8")
    PassManager(parse_pipeline(spec.pipeline, host.passes)).run(program)
    artifact = spec.backend.lower(program, spec)
    assert any(isinstance(m, nniq.LinearReLU) for m in artifact.graph_module.modules())
    samples = [(torch.randn(4, 32, generator=g),) for _ in range(3)]
    assert check_lowering(program, artifact.run, samples).max_abs_err == [0.0]
    artifact.save(tmp_path / "a")
    loaded = load_artifact(tmp_path / "a", host=host)
    assert torch.equal(loaded.run(*samples[0]), artifact.run(*samples[0]))


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_artifact_round_trip_in_a_fresh_process(compiled, tmp_path):
    _, program, artifact, samples = compiled("resnet18")
    artifact.save(tmp_path / "art")
    manifest = json.loads((tmp_path / "art" / "artifact.json").read_text())
    assert manifest["target"] == "cpu-int8" and manifest["precision"] == "int8" and manifest["engine"] == artifact.engine
    # the weights are plain tensors: they load without unpickling code
    tensors = torch.load(tmp_path / "art" / "weights.pt", weights_only=True)
    assert tensors["fc.weight"].dtype == torch.qint8 and tensors["fc.weight"].qscheme() == torch.per_channel_affine
    torch.save({"x": samples[0][0], "y": artifact.run(*samples[0])}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        from graphopt.compiler import load_artifact
        from graphopt.plugins import PluginHost
        h = PluginHost(); h.load_entry_points(); h.load("graphopt.backends.cpu_int8")
        art = load_artifact({str(tmp_path / 'art')!r}, host=h)
        io = torch.load({str(tmp_path / 'io.pt')!r}, weights_only=True)
        assert torch.equal(art.run(io["x"]), io["y"]), "outputs differ"
        print("ok", type(art).__name__, type(art.runner).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ok QuantizedArtifact RecursiveScriptModule" in out.stdout  # frozen at load, from graph.json


def test_loaded_artifact_keeps_the_lowering_points(host, compiled, tmp_path):
    from graphopt.compiler import load_artifact

    _, program, artifact, samples = compiled("mobilenet_v2")
    artifact.save(tmp_path)
    loaded = load_artifact(tmp_path, host=host)
    assert loaded.points == artifact.points
    assert loaded.exact_simulation and artifact.exact_simulation  # the manifest keeps the claim
    for s in samples:
        assert torch.equal(loaded.run(*s), artifact.run(*s))
    assert check_lowering_local(program, loaded.graph_module, loaded.points, samples[:1]).ok


def test_lowering_starts_from_plain_fake_quantization(host):
    """Flags another lowering left on the program (ort-int8's QLinearAdd, its rounding)
    are cleared: the cpu-int8 simulation is the same as on a fresh program."""
    from graphopt.backends.ort import OrtRounding

    _, program, artifact, samples = compile_int8(host, "resnet18")
    fresh = [program.run(*s) for s in samples]
    for m in program.graph_module.modules():
        if isinstance(m, ActFakeQuant):
            m.rounding = OrtRounding(divide=True, keep_integers=True)
    spec = host.targets.get("cpu-int8")
    artifact = spec.backend.lower(program, spec)
    assert all(torch.equal(program.run(*s), f) for s, f in zip(samples, fresh))
    assert check_lowering(program, artifact.run, samples).max_abs_err == [0.0]


def test_int8_artifact_is_small(compiled, tmp_path):
    model, _, artifact, _ = compiled("resnet18")
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    artifact.save(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.iterdir() if f.name != "artifact.json")
    assert size <= 0.30 * buf.tell(), (size, buf.tell())


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "onednn"])
def test_engines(host, engine):
    if engine not in torch.backends.quantized.supported_engines:
        pytest.skip(f"{engine} not in this torch build")
    _, program, artifact, samples = compile_int8(host, "digits_cnn", engine=engine)
    assert artifact.engine == engine
    assert check_lowering(program, artifact.run, samples).max_abs_err == [0.0]
    assert check_lowering_local(program, artifact.graph_module, artifact.points, samples[:1]).ok


def test_depthwise_convs_are_packed_for_onednn(compiled):
    """fbgemm's depthwise kernel saturates 16-bit pair sums with full-range u8 inputs."""
    _, _, artifact, _ = compiled("mobilenet_v2")
    depthwise = [m for m in artifact.graph_module.modules() if isinstance(m, nnq.Conv2d) and m.groups > 1]
    assert depthwise and all(m.pack_engine == "onednn" for m in depthwise)


def test_s8_program_is_rederived_for_the_cpu(host):
    _, program, artifact, samples = compile_int8(host, "digits_cnn", pipeline="fuse-conv-bn-relu,insert-quant-stubs{activations=s8}")
    assert program.meta["quant"].config.activations == "u8"
    assert any("re-derived" in r for r in artifact.stats["rederived"])
    assert check_lowering(program, artifact.run, samples).ok


def test_cpus_without_vnni_get_7_bit_activations(host, monkeypatch):
    """Without VNNI, fbgemm sums u8*s8 pairs in 16 bits: activations are re-derived 7-bit."""
    import graphopt.backends.cpu_int8 as backend

    monkeypatch.setattr(backend, "cpu_has_vnni", lambda: False)
    _, program, artifact, samples = compile_int8(host, "digits_cnn", engine="fbgemm")
    assert program.meta["quant"].config.reduce_range is True
    assert all(e["quant_max"] == 127 for e in program.meta["quant"].activations.values())
    assert check_lowering_local(program, artifact.graph_module, artifact.points, samples[:1]).ok


def test_errors(host, tmp_path):
    spec = host.targets.get("cpu-int8")
    plain = Program(torch.fx.symbolic_trace(zoo.build("digits_cnn")), (torch.randn(1, 1, 8, 8),))
    with pytest.raises(UsageError, match="put insert-quant-stubs in the pipeline"):
        spec.backend.lower(plain, spec)
    _, program, artifact, _ = compile_int8(host, "digits_cnn")
    program.meta["backend_options"] = {"engine": "avx9000"}
    with pytest.raises(UsageError, match="unknown quantized engine 'avx9000'"):
        spec.backend.lower(program, spec)
    program.meta["backend_options"] = {"threads": 4}
    with pytest.raises(UsageError, match="unknown backend option"):
        spec.backend.lower(program, spec)

    from graphopt.compiler import load_artifact

    artifact.save(tmp_path)
    doc = json.loads((tmp_path / "graph.json").read_text())
    doc["nodes"][1]["target"] = "os.system"
    (tmp_path / "graph.json").write_text(json.dumps(doc))
    with pytest.raises(ArtifactError, match="calls 'os.system', which is not an op the cpu-int8 lowering emits"):
        load_artifact(tmp_path, host=host)
    (tmp_path / "weights.pt").unlink()
    with pytest.raises(ArtifactError, match="missing weights.pt"):
        load_artifact(tmp_path, host=host)


@pytest.mark.parametrize("exact", [True, False])
def test_end_to_end_gate_applies_only_to_an_exact_simulation(compiled, exact):
    """verify_int8 fails an artifact 3 output steps off end to end when the simulation
    mirrors the kernels; without that claim only the per-op check (which passes here:
    the lowered graph itself is untouched) gates, and the drift is only reported."""
    from graphopt.quant import verify_int8

    model, program, artifact, samples = compiled("digits_cnn")
    step = program.meta["quant"].output_scales[0]

    class Shifted:
        graph_module, points, exact_simulation = artifact.graph_module, artifact.points, exact

        def run(self, *inputs):
            return artifact.run(*inputs) + 3 * step

    split = verify_int8(model, program, Shifted(), samples)
    assert split["lowering_local"]["ok"]
    assert not split["lowering_check"]["ok"]
    assert bool(split["violations"]) is exact
    if exact:
        assert "exceeds 2 output steps" in split["violations"][0]
