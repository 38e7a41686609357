"""Metrics, tolerances and golden files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from graphopt.errors import ArtifactError, UsageError
from graphopt.verify import Tolerance, compare, default_tolerance, load_golden, save_golden


def test_identical_outputs():
    x = torch.randn(2, 10, generator=torch.Generator().manual_seed(0))
    m = compare([x], [x.clone()]).metrics
    assert m.max_abs_err == 0 and m.max_rel_err == 0
    assert m.cosine == pytest.approx(1.0)
    assert math.isinf(m.sqnr_db)
    assert m.top1_agreement == 1.0
    assert m.to_json()["sqnr_db"] is None


def test_metrics_match_hand_computed_values():
    ref = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    cand = torch.tensor([[1.0, 2.0, 3.0, 4.4]])
    m = compare([ref], [cand]).metrics
    assert m.max_abs_err == pytest.approx(0.4)
    assert m.max_rel_err == pytest.approx(0.1)  # 0.4 / max|ref| = 0.4 / 4
    expected_cos = float(torch.dot(ref[0], cand[0]) / (ref.norm() * cand.norm()))
    assert m.cosine == pytest.approx(expected_cos)
    assert m.sqnr_db == pytest.approx(10 * math.log10(30 / 0.16))
    assert m.top1_agreement == 1.0


def test_top1_disagreement_and_worst():
    ref = torch.zeros(2, 10)
    ref[0, 1] = ref[1, 0] = 5.0
    cand = ref.clone()
    cand[0, 0], cand[0, 1] = 5.0, 0.0  # row 0 flips; the output's RMS error 1.12 x 4 < margin 5: it counts
    c = compare([ref, ref], [cand, ref])
    assert (c.metrics.top1_counted, c.metrics.top1_rows) == (4, 4)
    assert c.metrics.top1_agreement == pytest.approx(0.75)
    assert c.worst(1)[0].sample == 0


def test_nested_outputs_and_shape_mismatch():
    a = {"logits": torch.ones(1, 3), "aux": (torch.zeros(2),)}
    assert compare([a], [a]).metrics.max_abs_err == 0
    with pytest.raises(ValueError, match="shape"):
        compare([torch.ones(1, 3)], [torch.ones(1, 4)])
    with pytest.raises(ValueError, match="returns 1 tensors, the candidate 2"):
        compare([torch.ones(1)], [(torch.ones(1), torch.ones(1))])


def test_nan_in_candidate_fails_every_bound():
    ref = torch.ones(1, 4)
    cand = ref.clone()
    cand[0, 1] = float("nan")
    m = compare([ref], [cand]).metrics
    assert default_tolerance("fp32").violations(m)


def test_tolerance_checks_and_overrides():
    m = compare([torch.tensor([[1.0, 0.0]])], [torch.tensor([[1.0, 0.01]])]).metrics
    assert default_tolerance("fp32").violations(m)  # 1e-2 relative error
    loose = default_tolerance("fp32").with_overrides(max_rel_err=0.1, min_cosine=0.9)
    assert loose.violations(m) == []
    with pytest.raises(UsageError, match="unknown tolerance 'max_err'"):
        Tolerance().with_overrides(max_err=1.0)
    with pytest.raises(UsageError, match="unknown precision 'int3'"):
        default_tolerance("int3")


def test_golden_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(1, 3, generator=g),) for _ in range(3)]
    outputs = [(x[0] * 2, x[0].sum()) for x in inputs]
    path = tmp_path / "g.npz"
    save_golden(path, inputs, outputs, {"source": "test"})
    gold = load_golden(path)
    assert gold.meta["source"] == "test" and gold.meta["samples"] == 3
    assert len(gold.inputs) == 3 and len(gold.outputs[0]) == 2
    torch.testing.assert_close(gold.inputs[1][0], inputs[1][0])
    torch.testing.assert_close(gold.outputs[2][1], outputs[2][1])


def test_bad_golden_files(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_golden(tmp_path / "missing.npz")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match="not a graphopt golden file"):
        load_golden(junk)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(2))
    with pytest.raises(ArtifactError, match="not a graphopt golden file"):
        load_golden(other)


def test_near_tied_logits_are_not_counted_and_do_not_fail_top1():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(8, 1000, generator=g)
    ref[:, 0] = ref.max(dim=1).values + 1e-3  # reference top-1 ahead by a hair
    cand = ref + 0.05 * torch.randn(8, 1000, generator=g)  # int8-like noise, far above the margin
    cand[:, 1] = ref[:, 0] + 0.01  # and every argmax flips
    m = compare([ref], [cand]).metrics
    assert (m.top1_counted, m.top1_rows, m.top1_agreement) == (0, 8, None)
    assert default_tolerance("int8").violations(m) == []  # cosine still holds; top-1 is not judged on noise
    assert m.cosine > 0.99


def test_clear_margin_flip_is_counted_and_fails_top1():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(4, 1000, generator=g)
    ref[:, 7] = ref.max(dim=1).values + 3.0  # clear margin: 3 vs RMS noise ~0.01
    cand = ref + 0.01 * torch.randn(4, 1000, generator=g)
    cand[:2, 7] -= 4.0  # a real fault on the top class of two rows
    m = compare([ref], [cand]).metrics
    assert (m.top1_counted, m.top1_rows) == (4, 4)
    assert m.top1_agreement == pytest.approx(0.5)
    assert any(v.startswith("top1_agreement 0.500") for v in default_tolerance("int8").violations(m))


def test_top1_rule_is_in_report_json():
    from graphopt.report import Verification
    from graphopt.verify import TOP1_RULE

    ref = torch.tensor([[0.0, 5.0, 1.0]])
    c = compare([ref], [ref + 0.01])
    v = Verification(True, c.metrics, default_tolerance("int8"), 1, comparison=c).to_json()
    assert v["top1_rule"] == TOP1_RULE
    assert (v["metrics"]["top1_counted"], v["metrics"]["top1_rows"], v["metrics"]["top1_agreement"]) == (1, 1, 1.0)
