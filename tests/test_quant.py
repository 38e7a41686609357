"""graphopt.quant: qparams, observers and range selection, verification helpers, mixed precision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from graphopt.passes.insert_quant_stubs import keep_fp32_auto
from graphopt.program import Program
from graphopt.quant import (
    META_KEY,
    Observer,
    QuantConfig,
    QuantInfo,
    QuantLayer,
    activation_qparams,
    check_lowering,
    check_lowering_local,
    quantization_error,
    quantize_program,
    select_range,
)
from graphopt.quant.calibrate import _quantiles, weight_qparams
from graphopt.verify import Tolerance


def test_u8_qparams_make_zero_exact():
    qp = activation_qparams(-1.0, 3.0, "u8")
    assert (qp.quant_min, qp.quant_max, qp.dtype) == (0, 255, torch.quint8)
    assert qp.scale == pytest.approx(4.0 / 255, rel=1e-6)
    x = torch.tensor([0.0, -1.0, 3.0])
    q = torch.fake_quantize_per_tensor_affine(x, qp.scale, qp.zero_point, 0, 255)
    assert q[0] == 0.0
    assert torch.allclose(q, x, atol=qp.scale / 2)
    assert activation_qparams(0.5, 2.0, "u8").zero_point == 0  # range stretched to include 0
    assert activation_qparams(0.0, 2.0, "u8", reduce_range=True).quant_max == 127


def test_s8_qparams_are_symmetric():
    qp = activation_qparams(-1.0, 3.0, "s8")
    assert (qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype) == (0, -128, 127, torch.qint8)
    assert qp.scale == pytest.approx(3.0 / 127, rel=1e-6)
    with pytest.raises(ValueError, match="unknown activation scheme"):
        activation_qparams(0, 1, "u4")


def test_weight_qparams_per_channel():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 10
    scale, zp = weight_qparams(w)
    assert scale.shape == (4,) and zp.dtype == torch.int32 and not zp.any()
    assert torch.allclose(scale, w.abs().amax(dim=(1, 2, 3)) / 127)
    (one,), _ = weight_qparams(w, per_channel=False)
    assert one == pytest.approx(float(w.abs().max() / 127))


def test_observer_range_grows_without_losing_mass():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20000, generator=g), torch.randn(20000, generator=g) * 3 + 2
    grown, once = Observer(), Observer()
    grown.update(a)
    grown.update(b)
    once.update(torch.cat([a, b]))
    assert grown.count == once.count == 40000
    assert grown.hist.sum() == pytest.approx(40000, rel=1e-9)
    assert (grown.min, grown.max) == (once.min, once.max)
    probs = np.array([0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999])
    np.testing.assert_allclose(_quantiles(grown.edges(), grown.hist, probs), _quantiles(once.edges(), once.hist, probs), atol=0.05)
    merged = Observer()
    merged.merge(Observer())
    first, second = Observer(), Observer()
    first.update(a)
    second.update(b)
    first.merge(second)
    assert first.count == 40000 and first.hist.sum() == pytest.approx(40000)


def test_range_methods():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1_000_000, generator=g)
    x[0] = 40.0  # one outlier: L2-optimal clipping drops it
    obs = Observer()
    obs.update(x)
    assert select_range(obs, "minmax", "u8") == (obs.min, 40.0)
    lo, hi = select_range(obs, "histogram", "u8")
    assert 3.0 < hi < 10.0 and -6.0 < lo < -3.0  # the outlier is clipped
    lo, hi = select_range(obs, "histogram", "s8")
    assert lo == -hi and 3.0 < hi < 10.0
    relu = Observer()
    relu.update(torch.relu(torch.randn(100000, generator=g)))
    lo, hi = select_range(relu, "entropy", "u8")
    assert lo == 0.0 and 2.5 < hi <= relu.max  # the spike of zeros does not drag it down
    with pytest.raises(ValueError, match="unknown range method"):
        select_range(obs, "mse", "u8")
    state = Observer.from_tensors(*obs.to_tensors())
    assert (state.min, state.max, state.count) == (obs.min, obs.max, obs.count)


def test_observer_rejects_non_finite():
    from graphopt.errors import DataError

    with pytest.raises(DataError, match="NaN or infinite"):
        Observer().update(torch.tensor([1.0, math.nan]))


class Sensitive(nn.Module):
    """conv1 has one output channel 1000x larger than the rest: per-tensor weights wreck it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv1.weight[0] *= 1000
            self.conv2.weight[:, 0] /= 1000

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def sensitive_program() -> tuple[nn.Module, Program]:
    model = Sensitive().eval()
    g = torch.Generator().manual_seed(0)
    program = Program(torch.fx.symbolic_trace(model), (torch.randn(2, 3, 8, 8, generator=g),))
    program.propagate_shapes()
    program.calibration = [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(3)]
    return model, program


def test_keep_fp32_auto_keeps_the_sensitive_layer_and_reduces_error():
    model, program = sensitive_program()
    quantize_program(program, QuantConfig(per_channel=False))
    samples = program.calibration[:2]
    before = quantization_error(model, program.run, samples).metrics
    assert before.cosine < 0.99
    kept = keep_fp32_auto(program, model, samples, Tolerance(min_cosine=0.999))
    assert isinstance(kept, list) and kept and all(isinstance(n, str) and isinstance(s, float) for n, s in kept)
    assert kept[0][0] == "conv1"
    assert not isinstance(program.graph_module.get_submodule("conv1"), QuantLayer)
    after = quantization_error(model, program.run, samples).metrics
    assert after.cosine >= 0.999 > before.cosine
    info = program.meta[META_KEY]
    assert info.keep_fp32_auto["met"] and info.keep_fp32_auto["kept"][0][0] == "conv1"
    assert {"layer": "conv1", "reason": "auto", "sensitivity": kept[0][1]} in info.kept_fp32


def test_quant_info_is_typed_and_round_trips_through_json():
    """program.meta[META_KEY] is one typed record; its JSON (the report's "quantization")
    keeps the pass's option names and reads back to an equal record."""
    model, program = sensitive_program()
    quantize_program(program, QuantConfig(activations="s8", observer="minmax", skip=frozenset({"fc"})))
    keep_fp32_auto(program, model, program.calibration[:1], 0.9)
    info = program.meta[META_KEY]
    assert isinstance(info, QuantInfo) and isinstance(info.config, QuantConfig)
    data = json.loads(json.dumps(info.to_json()))
    assert list(data) == ["config", "calibration_samples", "activations", "weights", "quantized_layers", "kept_fp32",
                          "output_scales", "keep_fp32_auto", "float_ops"]
    assert data["config"] == {"activations": "s8", "observer": "minmax", "per_channel": True, "reduce_range": False,
                              "skip": ["fc"]}
    assert data["quantized_layers"] == sorted(info.weights) and data["calibration_samples"] == 3
    assert QuantInfo.from_json(data) == info
    assert QuantConfig.from_json(data["config"]) == info.config


def test_keep_fp32_auto_keeps_nothing_when_already_within_tolerance():
    model, program = sensitive_program()
    quantize_program(program, QuantConfig(per_channel=True))
    assert keep_fp32_auto(program, model, program.calibration[:1], 0.9) == []


def test_lowering_checks_catch_a_planted_bug():
    """A lowering that gets one zero point wrong is caught, and named, by the local check."""
    pytest.importorskip("graphopt.backends.cpu_int8")
    from graphopt.backends.cpu_int8 import lower_quantized

    model, program = sensitive_program()
    quantize_program(program, QuantConfig(per_channel=True))
    lowered, stats = lower_quantized(program)
    samples = program.calibration[:1]
    good = check_lowering_local(program, lowered, stats["points"], samples)
    assert good.ok and max(good.errors.values()) <= 1.01
    assert check_lowering(program, lambda x: lowered(x), samples).ok
    conv2 = lowered.get_submodule("conv2")  # plant a bias off by 5 output steps
    conv2.set_weight_bias(conv2.weight(), conv2.bias() + 5 * conv2.scale)
    bad = check_lowering_local(program, lowered, stats["points"], samples)
    assert not bad.ok
    assert bad.worst(1)[0][0] == "fq_relu_1"  # conv2's output (after its absorbed ReLU)
    assert "steps > 2" in bad.violations[0]
