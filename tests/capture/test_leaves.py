"""Leaf functions (``torch.fx.wrap``) at capture: removed when the identity in eval mode, lowered
when their body traces into torch ops, refused up front (CaptureError, one line) otherwise."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt import zoo
from graphopt.capture import capture
from graphopt.capture.leaves import is_leaf_function
from graphopt.errors import CaptureError


def scaled_gelu(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.nn.functional.gelu(x) * alpha


def sign_flip(x: torch.Tensor) -> torch.Tensor:
    if x.sum() > 0:  # data-dependent control flow: cannot be traced
        return x
    return -x


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return x * 2.0  # named like a regularizer, but not the identity: must be lowered, not removed


torch.fx.wrap("scaled_gelu")
torch.fx.wrap("sign_flip")
torch.fx.wrap("drop_path")


class _Net(nn.Module):
    def __init__(self, fn, *extra) -> None:
        super().__init__()
        self.conv, self.fn, self.extra = nn.Conv2d(3, 4, 3), fn, extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.conv(x), *self.extra)


class Lowerable(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return scaled_gelu(self.conv(x), 0.5)


class Untraceable(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sign_flip(self.conv(x))


class Misnamed(_Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(self.conv(x), 0.1, self.training)


def _build(cls: type[_Net]) -> nn.Module:
    torch.manual_seed(0)
    return cls(None).eval()


def _leaves(program) -> list[str]:
    return [n.name for n in program.graph_module.graph.nodes if is_leaf_function(n)]


def test_stochastic_depth_is_removed_from_efficientnet():
    model = zoo.build("efficientnet_b0")
    program = capture(model, input_shapes=[(1, 3, 48, 48)])
    done = program.meta["leaf_functions"]
    # 16 MBConv blocks, 9 of them with a residual (stride 1, same width): one stochastic_depth each
    assert len(done) == 9 and all(d.startswith("removed graphopt.zoo.stochastic_depth at node") for d in done)
    assert _leaves(program) == []
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    assert torch.equal(program.graph_module(x), model(x))


def test_convnext_leaf_removed_and_graph_keeps_layer_scale():
    program = capture(zoo.build("convnext"), input_shapes=[(1, 3, 48, 48)])
    assert len(program.meta["leaf_functions"]) == 5  # one per block
    assert _leaves(program) == []
    assert sum(n.op == "get_attr" and str(n.target).endswith("layer_scale") for n in program.graph_module.graph.nodes) == 5


@pytest.mark.parametrize("cls, expected", [(Lowerable, ["gelu", "mul"]), (Misnamed, ["mul"])])
def test_other_leaf_functions_are_lowered(cls, expected):
    model = _build(cls)
    program = capture(model, input_shapes=[(1, 3, 8, 8)])
    assert program.meta["leaf_functions"][0].startswith("lowered ")
    calls = [getattr(n.target, "__name__", "") for n in program.graph_module.graph.nodes if n.op == "call_function"]
    assert calls == expected
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(program.graph_module(x), model(x), rtol=0, atol=0)


def test_untraceable_leaf_function_is_refused_at_capture():
    with pytest.raises(CaptureError) as info:
        capture(_build(Untraceable), input_shapes=[(1, 3, 8, 8)])
    text = str(info.value)
    assert "\n" not in text
    assert "test_leaves.sign_flip" in text and "node 'sign_flip'" in text and "cannot be traced" in text


def test_untraceable_leaf_exits_2_before_calibration(tmp_path, monkeypatch):
    from graphopt.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n"
        "def odd(x):\n    return x if x.sum() > 0 else -x\n"
        "torch.fx.wrap('odd')\n"
        "class M(nn.Module):\n    def __init__(self):\n        super().__init__(); self.c = nn.Conv2d(3, 4, 3)\n"
        "    def forward(self, x):\n        return odd(self.c(x))\n"
        "def build():\n    return M().eval()\n"
    )
    rc = main(["compile", "m:build", "--target", "cpu-int8", "--input-shape", "1x3x8x8", "-o", str(tmp_path / "out")])
    assert rc == 2
    assert not (tmp_path / "out").exists()
