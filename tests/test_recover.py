"""Recovery by distillation: a pruned digits CNN trained on real data gets its accuracy
back; no-op, refusals, determinism, and the bookkeeping (requires_grad, progress, curve).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from graphopt.capture import capture
from graphopt.datasets import accuracy, digits_split, train_digits_cnn
from graphopt.errors import DataError, UsageError
from graphopt.passes.insert_quant_stubs import insert_quant_stubs
from graphopt.pipeline import PassManager, parse_pipeline
from graphopt.plugins import default_host
from graphopt.program import Program
from graphopt.recover import CURVE_POINTS, RecoveryResult, recover
from tests.conftest import program_of

# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=None)
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The zoo digits CNN trained briefly on scikit-learn's digits (fixed split and seeds)."""
    x_train, y_train, x_test, y_test = digits_split(seed=0)
    return train_digits_cnn(x_train, y_train, seed=0, epochs=6), x_train, y_train, x_test, y_test


def pruned_digits() -> Program:
    model = digits()[0]
    program = capture(model, input_shapes=[(1, 1, 8, 8)])
    PassManager(parse_pipeline("prune-channels{ratio=0.5}", default_host().passes)).run(program)
    return program


def train_samples(batch: int = 64) -> list[tuple[torch.Tensor]]:
    x_train = digits()[1]
    return [(x_train[i : i + batch],) for i in range(0, len(x_train), batch)]


def test_recovery_brings_pruned_digits_back():
    model, _, _, x_test, y_test = digits()
    original = accuracy(model, x_test, y_test)
    program = pruned_digits()
    assert program.graph_module.get_submodule("features.0.0").out_channels == 8  # really pruned
    pruned = accuracy(program.run, x_test, y_test)
    calls = []
    result = recover(program, model, train_samples(), steps=200, lr=1e-2, batch_size=64,
                     progress=lambda done, total, loss: calls.append((done, total, loss)))
    recovered = accuracy(program.run, x_test, y_test)
    # measured (seed 0): original 98.5, pruned 9.6, recovered 97.2; KD loss 7.0 -> 0.30
    assert original > 95
    assert recovered >= pruned
    assert recovered >= original - 4.0, (original, pruned, recovered)
    assert result.last_loss < result.first_loss / 5
    assert len(result.loss_curve) == 200 and result.loss_curve[-1] < result.loss_curve[0] / 5
    assert [c[0] for c in calls] == list(range(1, 201)) and {c[1] for c in calls} == {200}
    assert calls[-1][2] == pytest.approx(result.loss_curve[-1])
    assert not program.graph_module.training
    assert program.meta["recovery"]["steps"] == 200
    json.dumps(result.to_json())


# --------------------------------------------------------------------------- small models


class Tiny(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


def tiny_pair(seed: int = 0) -> tuple[nn.Module, Program]:
    torch.manual_seed(seed)
    teacher = Tiny().eval()
    student = program_of(Tiny(), (2, 3, 8, 8))
    with torch.no_grad():
        student.graph_module.bn.running_mean.normal_()
    return teacher, student


def tiny_samples(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g),) for _ in range(n)]


def state(program: Program) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in program.graph_module.state_dict().items()}


def test_zero_steps_is_a_no_op():
    teacher, student = tiny_pair()
    x = torch.randn(3, 3, 8, 8)
    before, weights = student.run(x), state(student)
    result = recover(student, teacher, tiny_samples(), steps=0)
    assert torch.equal(student.run(x), before)
    assert all(torch.equal(v, weights[k]) for k, v in state(student).items())
    assert result.steps == 0 and result.loss_curve == [] and result.first_loss == result.last_loss > 0


def test_refusals():
    teacher, student = tiny_pair()
    samples = tiny_samples()
    with pytest.raises(UsageError, match="steps must be an integer >= 0"):
        recover(student, teacher, samples, steps=-1)
    with pytest.raises(DataError, match="no samples"):
        recover(student, teacher, [], steps=5)
    with pytest.raises(UsageError, match="lr must be a positive number"):
        recover(student, teacher, samples, steps=5, lr=0)
    with pytest.raises(UsageError, match="batch_size"):
        recover(student, teacher, samples, steps=5, batch_size=0)
    with pytest.raises(UsageError, match=r"outputs \(4x5\) differ from the teacher's \(4x7\)"):
        recover(student, Tiny(classes=7).eval(), samples, steps=5)
    with pytest.raises(DataError, match="sample 0 has 2 tensors but the program takes 1"):
        recover(student, teacher, [(samples[0][0], samples[0][0])], steps=5)
    weights = state(student)
    marked = student.clone()
    marked.meta["quant"] = {}
    with pytest.raises(UsageError, match="already quantized.*before quantization"):
        recover(marked, teacher, samples, steps=5)
    assert all(torch.equal(v, weights[k]) for k, v in state(student).items())


def test_quantized_program_is_refused():
    teacher, student = tiny_pair()
    student.calibration = tiny_samples(2)
    insert_quant_stubs(student)
    student.recompile()
    with pytest.raises(UsageError, match="already quantized"):
        recover(student, teacher, tiny_samples(), steps=3)


def test_same_seed_same_weights_and_requires_grad_restored():
    runs = []
    for seed in (0, 0, 1):
        teacher, student = tiny_pair()
        student.graph_module.conv.weight.requires_grad_(False)
        before = student.graph_module.conv.weight.clone()
        recover(student, teacher, tiny_samples(), steps=20, lr=1e-2, batch_size=3, seed=seed)
        gm = student.graph_module
        assert not gm.conv.weight.requires_grad and gm.fc.weight.requires_grad  # as they were
        assert not torch.equal(gm.conv.weight, before)  # trained anyway
        assert all(p.grad is None for p in gm.parameters())
        runs.append(state(student))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_batchnorm_statistics_stay_frozen_and_teacher_untouched():
    teacher, student = tiny_pair()
    teacher.train()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    mean = student.graph_module.bn.running_mean.clone()
    recover(student, teacher, tiny_samples(), steps=10, lr=1e-2)
    assert torch.equal(student.graph_module.bn.running_mean, mean)
    assert teacher.training  # its mode restored
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())


class Dense(nn.Module):
    """A 4-D output (no logits): recovered with MSE."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.conv1(x)))


def test_non_logit_outputs_use_mse_and_long_runs_thin_the_curve():
    torch.manual_seed(0)
    teacher = Dense().eval()
    student = program_of(Dense(), (1, 3, 8, 8))
    with torch.inference_mode():  # inference tensors as samples are fine
        samples = [(torch.randn(2, 3, 8, 8),) for _ in range(3)]
    with torch.no_grad():
        start = sum(nn.functional.mse_loss(student.run(x), teacher(x)) for (x,) in samples) / len(samples)
    result = recover(student, teacher, samples, steps=CURVE_POINTS + 50, lr=1e-2)
    assert isinstance(result, RecoveryResult)
    assert result.first_loss == pytest.approx(float(start), rel=1e-4)  # it is the MSE
    assert result.last_loss < result.first_loss / 5
    assert result.curve_stride == 2 and len(result.loss_curve) == (CURVE_POINTS + 50 + 1) // 2


def test_feature_weight_adds_logit_mse():
    teacher, student = tiny_pair()
    plain = recover(student.clone(), teacher, tiny_samples(), steps=0)
    weighted = recover(student.clone(), teacher, tiny_samples(), steps=0, feature_weight=1.0)
    assert weighted.first_loss > plain.first_loss


def test_diverging_loss_restores_weights():
    teacher, student = tiny_pair()
    weights = state(student)
    with pytest.raises(UsageError, match="smaller lr"):
        recover(student, teacher, tiny_samples(), steps=50, lr=1e30)
    assert all(torch.equal(v, weights[k]) for k, v in state(student).items())


def test_teacher_may_be_the_original_program():
    teacher, student = tiny_pair()
    original = program_of(teacher, (2, 3, 8, 8))  # Program.run answers inference tensors
    result = recover(student, original, tiny_samples(), steps=30, lr=1e-2)
    assert result.last_loss < result.first_loss
