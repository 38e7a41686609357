"""The search-space text: parsing, its errors, and every sampled point building a valid pipeline."""

from __future__ import annotations

import math

import optuna
import pytest

from graphopt.errors import UsageError
from graphopt.pipeline import parse_pipeline
from graphopt.tune.space import DEFAULTS, QUANT_PASS, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_text_parses_into_dimensions():
    space = parse_space("prune{ratio=0.1..0.6,importance=[l1,l2],rounds=2,ratio@features.0=0..0.3},recover{steps=10..50}",
                        "cpu-int8,cpu-fp32")
    dims = {d.name: d for d in space.dimensions()}
    assert dims["target"].options == ("cpu-int8", "cpu-fp32")
    ratio = dims["prune.ratio"]
    assert (ratio.low, ratio.high, ratio.integer) == (0.1, 0.6, False)
    assert dims["prune.importance"].options == ("l1", "l2")
    assert dims["prune.rounds"].constant == 2 and not dims["prune.rounds"].searched
    assert (dims["prune.ratio@features.0"].low, dims["prune.ratio@features.0"].high) == (0, 0.3)
    steps = dims["recover.steps"]
    assert (steps.low, steps.high, steps.integer) == (10, 50, True)
    assert dims["recover.lr"].options == (0.001, 0.003, 0.01)  # the default domain
    assert "quant.observer" not in dims  # parts not named are not searched


@pytest.mark.parametrize("text, words", [
    ("prune,shrink", ["unknown part 'shrink'", "'prune'", "'substitute'"]),
    ("prune{speed=1..2}", ["part 'prune' has no dimension 'speed'", "'ratio'", "'ratio@STAGE'"]),
    ("recover{steps@x=1..2}", ["has no dimension 'steps@x'"]),
    ("prune{ratio=0.7..0.1}", ["'prune.ratio=0.7..0.1'", "lo <= hi"]),
    ("prune{ratio=a..b}", ["needs numbers"]),
    ("prune{ratio=[]}", ["empty choice"]),
    ("prune,prune", ["given twice"]),
    ("prune{ratio=0.1", ["search space 'prune{ratio=0.1'", "expected '}'"]),
    ("", ["--search is empty"]),
])
def test_bad_text_says_what_is_wrong(text, words):
    with pytest.raises(UsageError) as info:
        parse_space(text, "cpu-int8")
    assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("targets", ["cpu-int8", "cpu-int8,cpu-fp32,ort-int8"])
def test_every_sampled_point_is_a_valid_pipeline(host, targets):
    space = parse_space("prune{ratio@features.1=0..0.5},substitute,quant,recover", targets)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=1))
    seen_rounds, seen_targets = set(), set()
    for _ in range(60):
        trial = study.ask()
        point = space.suggest(trial)
        cand = space.build(point, host)
        pipe = parse_pipeline(cand.pipeline, host.passes)  # the ordinary parser accepts it
        names = pipe.names()
        seen_targets.add(cand.target)
        assert names[0] == "fuse-conv-bn-relu" and names[-1] == "dce"
        prunes = [inv for inv in pipe if inv.name == "prune-channels"]
        if point["prune.ratio"] < 0.02:
            assert not prunes
        else:
            seen_rounds.add(len(prunes))
            assert len(prunes) == point["prune.rounds"]
            per_round = prunes[0].options["ratio"]["*"]  # k rounds keep (1 - ratio) of the channels in all
            assert math.isclose(1 - (1 - per_round) ** len(prunes), point["prune.ratio"], abs_tol=1e-3)
            assert math.isclose(1 - (1 - prunes[0].options["ratio"]["features.1"]) ** len(prunes),
                                point["prune.ratio@features.1"], abs_tol=1e-3)
            assert prunes[0].options["importance"] == point["prune.importance"]
        assert ("depthwise-substitution" in names) == point["substitute.on"]
        quant = [inv for inv in pipe if inv.name == QUANT_PASS]
        assert bool(quant) == cand.target.endswith("int8")
        if quant:
            assert quant[0].options["observer"] == point["quant.observer"]
            assert quant[0].options["activations"] == "u8"  # the target's own options stay
            assert cand.options.get("qat_steps", 0) == point["quant.qat-steps"]
            assert cand.options.get("keep_fp32", ["none"]) == [point["quant.keep-fp32"]]
        else:
            assert "qat_steps" not in cand.options and "keep_fp32" not in cand.options
        structural = bool(prunes) or point["substitute.on"]
        assert cand.options.get("recover_steps", 0) == (point["recover.steps"] if structural else 0)
        assert cand.options.get("recover_every", False) == (len(prunes) > 1 and point["recover.steps"] > 0)
        for dim in space.dimensions():
            assert dim.contains(point[dim.name])
        study.tell(trial, [0.0, 0.0])
    assert seen_rounds == {1, 2, 3}
    assert seen_targets == set(targets.split(","))


def test_default_parts_cover_the_issue():
    assert set(DEFAULTS) == {"prune", "substitute", "quant", "recover"}
    assert {"ratio", "importance", "rounds", "round-to"} <= set(DEFAULTS["prune"])
    assert {"observer", "keep-fp32", "qat-steps"} <= set(DEFAULTS["quant"])
