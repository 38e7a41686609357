"""Textual pipelines, typed options, the registry and the pass manager."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from graphopt.errors import PassError, PipelineError, PluginError
from graphopt.pipeline import PassManager, PassRegistry, PassResult, parse_pipeline, register_pass
from tests.conftest import program_of


@register_pass("knobs", contract="exact")
def knobs(program, *, ratio: float = 0.5, count: int = 1, flag: bool = False,
          mode: Literal["l1", "l2"] = "l1", skip: list[str] = [], per_layer: float | dict[str, float] = 0.3):
    """A pass with one option of every kind."""
    return PassResult(changed=False, detail=f"ratio={ratio}")


@register_pass("noop", contract="exact")
def noop(program):
    """Does nothing."""
    return PassResult(changed=False)


@register_pass("boom", contract="exact")
def boom(program):
    """Raises."""
    raise RuntimeError("kaboom")


@register_pass("break-graph", contract="exact")
def break_graph(program):
    """Leaves a graph whose output refers to an erased node's replacement of the wrong shape."""
    gm = program.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with gm.graph.inserting_before(out):
        bad = gm.graph.call_function(torch.matmul, (x, x))  # [1,4] @ [1,4] fails
    out.args = (bad,)
    return PassResult(changed=True)


@pytest.fixture
def registry():
    r = PassRegistry()
    for spec in (knobs, noop, boom, break_graph):
        r.register(spec, "tests")
    return r


def test_parse_options_are_typed(registry):
    p = parse_pipeline("noop, knobs{ratio=0.25,count=3,flag=true,mode=l2,skip=[a.b,c],per-layer={fc:0.1}},noop", registry)
    assert p.names() == ["noop", "knobs", "noop"]
    opts = p.passes[1].options
    assert opts == {"ratio": 0.25, "count": 3, "flag": True, "mode": "l2", "skip": ["a.b", "c"], "per_layer": {"fc": 0.1}}
    assert type(opts["count"]) is int and type(opts["ratio"]) is float


def test_union_prefers_number_over_mapping(registry):
    assert parse_pipeline("knobs{per-layer=0.4}", registry).passes[0].options["per_layer"] == 0.4


def test_pipeline_text_round_trips(registry):
    text = "knobs{ratio=0.25,flag=true,skip=[a,b],per-layer={fc:0.1}},noop"
    p = parse_pipeline(text, registry)
    assert str(p) == text
    assert str(parse_pipeline(str(p), registry)) == text


def test_empty_pipeline(registry):
    assert len(parse_pipeline("", registry)) == 0


@pytest.mark.parametrize(
    "text, phrases",
    [
        ("noop,fuse", ["unknown pass 'fuse'", "column 6", "'knobs'", "'noop'"]),
        ("knobs{rate=1}", ["unknown option 'rate'", "'ratio'", "'per-layer'"]),
        ("knobs{count=1.5}", ["option 'count' expects int", "1.5"]),
        ("knobs{ratio=abc}", ["option 'ratio' expects float"]),
        ("knobs{flag=maybe}", ["option 'flag' expects bool", "true or false"]),
        ("knobs{mode=l3}", ["option 'mode' expects one of l1|l2", "'l1', 'l2'"]),
        ("knobs{ratio=0.1,ratio=0.2}", ["given twice"]),
        ("knobs{ratio=0.1", ["expected '}'", "end of text"]),
        ("noop,,noop", ["expected a pass name", "column 6"]),
        ("knobs{=1}", ["expected an option name"]),
    ],
)
def test_parse_errors_name_token_pass_and_choices(registry, text, phrases):
    with pytest.raises(PipelineError) as err:
        parse_pipeline(text, registry)
    msg = str(err.value)
    assert "\n" not in msg
    for phrase in phrases:
        assert phrase in msg, msg


def test_registry_refuses_duplicates_naming_both_sources(registry):
    @register_pass("noop", contract="exact")
    def other_noop(program):
        return PassResult(changed=False)

    registry.register(noop, "tests")  # the very same spec again: fine
    with pytest.raises(PluginError, match=r"registered twice: by tests .*test_pipeline\.noop.* and by elsewhere .*other_noop"):
        registry.register(other_noop, "elsewhere")


def test_bad_pass_declarations_are_refused():
    with pytest.raises(PluginError, match="contract"):
        register_pass("x", contract="roughly")(lambda p: None)
    with pytest.raises(PluginError, match="keyword-only"):
        @register_pass("y", contract="exact")
        def y(program, ratio=0.3):
            return PassResult(False)
    with pytest.raises(PluginError, match="needs a default"):
        @register_pass("z", contract="exact")
        def z(program, *, ratio: float):
            return PassResult(False)


def test_class_based_pass(registry):
    @register_pass("scale-nothing", contract="exact")
    class ScaleNothing:
        """A class pass: options on __init__."""

        def __init__(self, *, factor: int = 2) -> None:
            self.factor = factor

        def __call__(self, program):
            return PassResult(changed=False, detail=f"factor {self.factor}")

    registry.register(ScaleNothing, "tests")
    p = parse_pipeline("scale-nothing{factor=5}", registry)
    program = program_of(nn.Sequential(nn.Linear(4, 4)), (1, 4))
    (rec,) = PassManager(p).run(program)
    assert rec.detail == "factor 5"


def test_manager_records_and_instruments(registry):
    program = program_of(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (1, 4))
    calls = []

    class Spy:
        def before_pass(self, inv, prog):
            calls.append(("before", inv.name))

        def after_pass(self, inv, prog, record):
            calls.append(("after", inv.name, record.nodes_before, record.nodes_after))

    records = PassManager(parse_pipeline("noop,knobs{ratio=0.7}", registry), [Spy()]).run(program)
    assert [r.name for r in records] == ["noop", "knobs"]
    assert records[1].detail == "ratio=0.7"
    assert all(r.seconds >= 0 for r in records)
    assert calls == [("before", "noop"), ("after", "noop", 2, 2), ("before", "knobs"), ("after", "knobs", 2, 2)]
    assert program.meta["passes_run"] == ["noop", "knobs{ratio=0.7}"]


def test_pass_error_names_the_pass_and_the_ones_before(registry):
    program = program_of(nn.Sequential(nn.Linear(4, 4)), (1, 4))
    with pytest.raises(PassError) as err:
        PassManager(parse_pipeline("noop,knobs,boom,noop", registry)).run(program)
    msg = str(err.value)
    assert "pass 'boom' failed" in msg and "[noop, knobs]" in msg and "kaboom" in msg
    assert err.value.exit_code == 4


def test_broken_graph_is_caught_after_the_pass(registry):
    program = program_of(nn.Sequential(nn.Linear(4, 4)), (1, 4))
    with pytest.raises(PassError, match="pass 'break-graph' failed .*no longer runs"):
        PassManager(parse_pipeline("noop,break-graph", registry)).run(program)
