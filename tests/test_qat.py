"""Quantization-aware fine-tuning (--qat-steps) and recovery data (--train-data, labels from .npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from graphopt import compile
from graphopt.capture import capture
from graphopt.data import RANDOM_TRAINING_WARNING
from graphopt.datasets import digits_accuracy, digits_split, write_digits_npz
from graphopt.errors import DataError, UsageError
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.quant.calibrate import weight_qparams
from graphopt.quant.qat import qat
from graphopt.quant.simulate import QuantLayer
from graphopt.recover import recover

SOURCE = "graphopt.datasets:digits_cnn"


@pytest.fixture(scope="module")
def train_npz(tmp_path_factory):
    return write_digits_npz(tmp_path_factory.mktemp("data") / "train.npz")


def _simulated_int8(host):
    program = capture(SOURCE)
    x = digits_split()[0]
    program.calibration = [(x[i : i + 1],) for i in range(32)]
    PassManager(parse_pipeline("fuse-conv-bn-relu,insert-quant-stubs", host.passes)).run(program)
    return program, capture(SOURCE), x


def test_qat_trains_through_fake_quant_and_freezes_weight_scales_after_warmup(host):
    program, teacher, x = _simulated_int8(host)
    layers = [m for m in program.graph_module.modules() if isinstance(m, QuantLayer)]
    weights0 = [m.base.weight.detach().clone() for m in layers]
    scales = []
    result = qat(program, teacher.run, [(x,)], steps=12, lr=1e-4, warmup=4, batch_size=64,
                 progress=lambda done, total, loss: scales.append([m.weight_fq.scale.clone() for m in layers]))
    assert result["steps"] == 12 and result["warmup"] == 4 and program.meta["qat"] is result
    assert result["last_loss"] < result["first_loss"]
    # straight-through: every quantized layer's float weights moved
    assert all(not torch.equal(w, m.base.weight) for w, m in zip(weights0, layers))
    # during the warm-up the scales follow the weights; then they stay put
    assert any(not torch.equal(a, b) for a, b in zip(scales[0], scales[3]))
    for step in range(4, 12):
        assert all(torch.equal(a, b) for a, b in zip(scales[3], scales[step]))
    final = [weight_qparams(m.base.weight.detach(), per_channel=True)[0] for m in layers]
    assert any(not torch.allclose(f.to(s.dtype), s) for f, s in zip(final, scales[-1]))  # frozen: not re-derived


def test_qat_refuses_a_float_program(host):
    program = capture(SOURCE)
    with pytest.raises(UsageError, match="not quantized"):
        qat(program, program.run, [(torch.zeros(1, 1, 8, 8),)], steps=2)


def test_labels_add_cross_entropy(host):
    x, y = digits_split()[:2]
    trained = []
    for labels in (None, y):
        student = capture(SOURCE)
        with torch.no_grad():  # a student that differs from its teacher, so both losses pull
            student.graph_module.get_submodule("head.2").weight.mul_(0.5)
        recover(student, capture(SOURCE).run, [(x,)], steps=5, lr=1e-3, batch_size=64, labels=labels)
        trained.append(student.graph_module.get_submodule("head.2").weight.detach())
    assert not torch.allclose(trained[0], trained[1])
    with pytest.raises(UsageError, match="labels need a batch_size"):
        recover(capture(SOURCE), capture(SOURCE).run, [(x,)], steps=1, labels=y)


def test_compile_with_qat_and_train_data(train_npz):
    result = compile(SOURCE, target="cpu-int8", data="graphopt.datasets:digits", train_data=train_npz, qat_steps=30,
                     recover_steps=0, measure=False, verify_samples=16)
    report = result.report
    assert report.extra["qat"]["steps"] == 30 and report.extra["qat"]["batch_size"] == 64
    assert report.extra["training_data"] == {"source": f"file '{train_npz}', 1257 samples for training", "labels": True}
    assert report.verification.passed  # the int8 artifact still computes what the QAT'd simulation does
    assert RANDOM_TRAINING_WARNING not in report.warnings
    assert digits_accuracy(result.artifact) > 95.0


def test_recovery_and_qat_on_random_data_say_so_loudly():
    result = compile(SOURCE, target="cpu-int8", qat_steps=3, measure=False, calib_samples=4, verify_samples=2)
    assert RANDOM_TRAINING_WARNING in result.report.warnings


def test_train_data_errors(tmp_path, train_npz):
    with pytest.raises(UsageError, match="--qat-steps needs a pipeline with 'insert-quant-stubs'"):
        compile(SOURCE, target="cpu-fp32", qat_steps=3)
    with pytest.raises(UsageError, match="--train-data 'nope.npz' does not exist"):
        compile(SOURCE, target="cpu-int8", train_data="nope.npz", qat_steps=3)
    bad = tmp_path / "bad.npz"
    with np.load(train_npz) as z:
        np.savez(bad, x=z["x"], labels=z["labels"][:-3])
    with pytest.raises(DataError, match=r"1254 labels for 1257 sample rows"):
        compile(SOURCE, target="cpu-int8", data="graphopt.datasets:digits", train_data=bad, qat_steps=3, measure=False)
