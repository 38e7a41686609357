"""Every bad input a hostile but realistic user tried (issue 9, items 8-14): one line on
stderr, the stated exit code, no output folder, never exit 5.

The table runs in-process through ``graphopt.cli.main`` (the function ``python -m
graphopt.cli`` and the ``graphopt`` script call; it is what parses the arguments,
formats click's errors and picks the exit code), so ~40 rows cost seconds, not a
subprocess each. ``test_the_table_matches_the_real_process`` runs a few rows as a
real subprocess to show the two agree.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from graphopt.cli import main
from tests.test_cli import MODELS_PY, assert_fails, graphopt

BAD_MODELS_PY = MODELS_PY + textwrap.dedent(
    '''
    import torch.nn.functional as F


    class Noisy(Tiny):
        """Adds a draw of fixed shape: tracing would freeze it into a constant."""

        def forward(self, x):
            return super().forward(x) + torch.randn(1, 5)


    class Dropping(Tiny):
        def forward(self, x):
            return F.dropout(super().forward(x), 0.5, training=True)


    class Nothing(Tiny):
        def forward(self, x):
            super().forward(x)
            return None


    class Empty(Tiny):
        def forward(self, x):
            return super().forward(x)[:, :0]


    class Overflows(Tiny):
        def forward(self, x):
            return super().forward(x) * 1e38 * 1e38


    def noisy():
        return Noisy().eval()


    def dropping():
        return Dropping().eval()


    def nothing():
        return Nothing().eval()


    def empty():
        return Empty().eval()


    def overflows():
        return Overflows().eval()


    def nan_weights():
        m = tiny()
        with torch.no_grad():
            m.fc.weight[0, 0] = float("nan")
        return m
    '''
)

PLUGIN_PY = textwrap.dedent(
    '''
    import sys

    import torch
    from graphopt import PassResult, register_pass


    @register_pass("break-shapes", contract="exact")
    def break_shapes(program, *, changed: bool = True):
        """Swaps the first conv's weight for one of the wrong shape."""
        conv = next(m for m in program.graph_module.modules() if isinstance(m, torch.nn.Conv2d))
        conv.weight = torch.nn.Parameter(torch.randn(conv.out_channels, conv.in_channels + 1, *conv.kernel_size))
        return PassResult(changed=changed)


    @register_pass("quit", contract="exact")
    def quit_pass(program, *, code: int = 0):
        """Ends the process, as a careless plugin might."""
        sys.exit(code)
    '''
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict[str, Path]:
    """A compiled cpu-fp32 and cpu-int8 artifact and a golden file, made once and copied per row."""
    from graphopt import compile as graphopt_compile
    from graphopt.capture import capture
    from graphopt.compiler import run_all
    from graphopt.data import random_samples
    from graphopt.verify import save_golden

    root = tmp_path_factory.mktemp("artifacts")
    for target in ("cpu-fp32", "cpu-int8"):
        graphopt_compile("zoo:digits_cnn", target=target, output=root / target, measure=False, calib_samples=4,
                         verify_samples=2)
    program = capture("zoo:digits_cnn")
    inputs = random_samples(program.input_specs, 2)
    save_golden(root / "golden.npz", inputs, run_all(program.run, inputs), {"source": "zoo:digits_cnn"})
    return {"cpu-fp32": root / "cpu-fp32", "cpu-int8": root / "cpu-int8", "golden": root / "golden.npz"}


def _manifest(work: Path, artifacts: dict[str, Path], edit) -> None:
    shutil.copytree(artifacts["cpu-fp32"], work / "art")
    path = work / "art" / "artifact.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def _golden(work: Path, artifacts: dict[str, Path], edit) -> None:
    with np.load(artifacts["golden"]) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(str(arrays["meta"]))
    meta = edit(arrays, meta)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(work / "bad.npz", **arrays)


def _truncate_model(work: Path, artifacts: dict[str, Path]) -> None:
    shutil.copytree(artifacts["cpu-fp32"], work / "art")
    model = work / "art" / "model.pt2"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])


def _graph_json_list(work: Path, artifacts: dict[str, Path]) -> None:
    shutil.copytree(artifacts["cpu-int8"], work / "art")
    (work / "art" / "graph.json").write_text("[]")


def _images(work: Path, artifacts: dict[str, Path]) -> None:
    from PIL import Image

    (work / "imgs").mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8), "L").save(work / "imgs" / f"{i}.png")
    np.save(work / "calib.npy", np.zeros((4, 1, 8, 8), np.float32))


def _setattr(key, value):
    def edit(arrays, meta):
        meta[key] = value
        return meta
    return edit


def _float64_inputs(arrays, meta):
    for k in [k for k in arrays if k.startswith("input_")]:
        arrays[k] = arrays[k].astype(np.float64)
    return meta


def _nan_outputs(arrays, meta):
    arrays["output_1_0"] = np.full_like(arrays["output_1_0"], np.nan)
    return meta


SETUPS = {
    "plugin": lambda work, arts: (work / "plug.py").write_text(PLUGIN_PY),
    "unknown-dtype": lambda work, arts: _manifest(work, arts, lambda m: {**m, "inputs": [{**m["inputs"][0], "dtype": "load"}]}),
    "no-inputs": lambda work, arts: _manifest(work, arts, lambda m: {k: v for k, v in m.items() if k != "inputs"}),
    "manifest-list": lambda work, arts: _manifest(work, arts, lambda m: [m]),
    "huge-input": lambda work, arts: _manifest(work, arts, lambda m: {**m, "inputs": [{**m["inputs"][0], "shape": [10**6] * 4}]}),
    "truncated-model": _truncate_model,
    "graph-json-list": _graph_json_list,
    "samples-abc": lambda work, arts: (_golden(work, arts, _setattr("samples", "abc")), _manifest(work, arts, lambda m: m)),
    "samples-0": lambda work, arts: (_golden(work, arts, _setattr("samples", 0)), _manifest(work, arts, lambda m: m)),
    "meta-list": lambda work, arts: (_golden(work, arts, lambda a, m: [m]), _manifest(work, arts, lambda m: m)),
    "float64": lambda work, arts: (_golden(work, arts, _float64_inputs), _manifest(work, arts, lambda m: m)),
    "nan-golden": lambda work, arts: (_golden(work, arts, _nan_outputs), _manifest(work, arts, lambda m: m)),
    "images": _images,
    "artifact": lambda work, arts: _manifest(work, arts, lambda m: m),
}

VERIFY = ["verify", "art", "--golden", "g.npz"]
VERIFY_BAD = ["verify", "art", "--golden", "bad.npz"]
COMPILE = ["compile", "zoo:digits_cnn", "-o", "out", "--no-latency"]
TINY = ["compile", "mymodels:tiny", "-o", "out", "--no-latency"]
SHAPE = "--input-shape"

ROWS = [
    # item 12: shapes that cannot be allocated, absurd dims
    pytest.param(None, [*TINY, SHAPE, "1x1x100000x100000"], 2, ["1x1x100000x100000", "37.3 GiB", "2 GiB"], id="shape-40GB"),
    pytest.param(None, [*TINY, SHAPE, "1000000000000x3x8x8"], 2, ["698 TiB", "2 GiB"], id="shape-1e12-dim"),
    pytest.param(None, [*TINY, SHAPE, "0x3x8x8"], 2, ["'0x3x8x8'", "positive integers"], id="shape-zero"),
    pytest.param(None, [*TINY, SHAPE, "-1x3x8x8"], 2, ["'-1x3x8x8'", "positive integers"], id="shape-negative"),
    pytest.param(None, [*TINY, SHAPE, "1e12x3x8x8"], 2, ["'1e12x3x8x8'", "positive integers"], id="shape-float"),
    # item 12: damaged artifacts and goldens
    pytest.param("unknown-dtype", VERIFY, 2, ["artifact.json", "dtype 'load'", "'float32'"],
                 id="manifest-unknown-dtype"),
    pytest.param("no-inputs", VERIFY, 2, ["artifact.json", "'inputs' is None"], id="manifest-no-inputs"),
    pytest.param("manifest-list", VERIFY, 2, ["artifact.json", "JSON list"], id="manifest-a-list"),
    pytest.param("huge-input", VERIFY, 2, ["artifact.json", "limit per input"], id="manifest-huge-shape"),
    pytest.param("graph-json-list", VERIFY, 2, ["graph.json", "holds a JSON list, not a graphopt cpu-int8 graph"], id="graph-json-a-list"),
    pytest.param("samples-abc", VERIFY_BAD, 2, ["bad.npz", "'samples' is 'abc'"], id="golden-samples-abc"),
    pytest.param("meta-list", VERIFY_BAD, 2, ["bad.npz", "JSON list"], id="golden-meta-list"),
    pytest.param("float64", VERIFY_BAD, 2, ["bad.npz", "float64", "expects [1, 1, 8, 8] float32"],
                 id="golden-float64-inputs"),
    pytest.param(None, ["golden", "record", "zoo:digits_cnn", "-o", "missing/dir/g.npz"], 2, ["'missing/dir' does not exist"],
                 id="golden-record-missing-dir"),
    # item 8: nothing compared is never a pass
    pytest.param("samples-0", VERIFY_BAD, 2, ["bad.npz", "'samples' is 0", ">= 1"], id="golden-samples-0"),
    pytest.param(None, [*TINY.copy(), SHAPE, "1x3x8x8"], 0, [], id="control-tiny-compiles"),
    pytest.param(None, ["compile", "mymodels:nothing", "-o", "out", SHAPE, "1x3x8x8"], 2,
                 ["returns no tensor values", "NoneType"],
                 id="model-returns-none"),
    pytest.param(None, ["compile", "mymodels:empty", "-o", "out", SHAPE, "1x3x8x8"], 2, ["returns no tensor values"],
                 id="model-returns-empty-tensor"),
    pytest.param("nan-golden", VERIFY_BAD, 1, ["NaN/Inf", "input 1"], id="golden-with-nan-outputs"),
    # item 10: nondeterminism
    pytest.param(None, ["compile", "mymodels:noisy", "-o", "out", SHAPE, "1x3x8x8"], 2, ["mymodels:noisy", "nondeterministic",
                 "eval mode"], id="model-draws-randn"),
    pytest.param(None, ["compile", "mymodels:dropping", "-o", "out", SHAPE, "1x3x8x8"], 2, ["nondeterministic", "dropout"],
                 id="model-dropout-in-train-mode"),
    # item 11: NaN/Inf from the original
    pytest.param(None, ["compile", "mymodels:nan_weights", "-o", "out", SHAPE, "1x3x8x8"], 2,
                 ["the original model produces NaN/Inf (for input 0)"], id="nan-weights"),
    pytest.param(None, ["compile", "mymodels:overflows", "-o", "out", SHAPE, "1x3x8x8"], 2,
                 ["the original model produces NaN/Inf (for input 0)"], id="outputs-overflow"),
    # item 13: one line, never a traceback
    pytest.param("truncated-model", VERIFY, 2, ["art", "model.pt2"],
                 id="truncated-model-pt2"),
    pytest.param("plugin", [*COMPILE, "--plugin", "plug.py", "--pipeline", "break-shapes"], 4,
                 ["pass 'break-shapes'", "no longer runs", "features_0_0"], id="pass-breaks-shapes"),
    pytest.param("plugin", [*COMPILE, "--plugin", "plug.py", "--pipeline", "fuse-conv-bn-relu,break-shapes{changed=false}"], 4,
                 ["pass 'break-shapes'", "[fuse-conv-bn-relu]", "no longer runs"], id="pass-breaks-shapes-says-unchanged"),
    pytest.param(None, [*COMPILE, "--calib-samples", "0"], 2,
                 ["'--calib-samples'", "0 is not in the range", "graphopt compile --help"],
                 id="click-range"),
    pytest.param(None, [*COMPILE, "-t", "cpu-int8", "--engine", "arm"], 2, ["--engine 'arm'", "not one of 'fbgemm', 'onednn', 'x86'"],
                 id="click-choice"),
    pytest.param(None, [*COMPILE, "--frobnicate"], 2, ["No such option", "--frobnicate"], id="click-unknown-flag"),
    pytest.param(None, ["verify"], 2, ["Missing argument", "graphopt verify --help"], id="click-missing-argument"),
    pytest.param(None, ["frobnicate"], 2, ["No such command", "frobnicate"], id="click-unknown-command"),
    # item 14: tolerances, --calib-size, sys.exit in a pass
    pytest.param(None, [*COMPILE, "--min-cosine", "nan"], 2, ["--min-cosine nan", "[-1, 1]"], id="min-cosine-nan"),
    pytest.param(None, [*COMPILE, "--max-rel-err", "-1"], 2, ["--max-rel-err -1", ">= 0"], id="max-rel-err-negative"),
    pytest.param(None, [*COMPILE, "--min-top1", "2"], 2, ["--min-top1 2", "[0, 1]"], id="min-top1-over-1"),
    pytest.param("artifact", [*VERIFY, "--max-abs-err", "inf", "--min-cosine", "-2"], 2,
                 ["--min-cosine -2"], id="verify-tolerance"),
    pytest.param("images", [*COMPILE, "-t", "cpu-int8", "--calib-data", "imgs", "--calib-size", "100000x100000"], 2,
                 ["--calib-size 100000x100000", "(1, 1, 8, 8)", "8x8"], id="calib-size-huge"),
    pytest.param("images", [*COMPILE, "-t", "cpu-int8", "--calib-data", "imgs", "--calib-size", "16x16"], 2,
                 ["--calib-size 16x16", "8x8"], id="calib-size-mismatch"),
    pytest.param("images", [*COMPILE, "-t", "cpu-int8", "--calib-data", "calib.npy", "--calib-size", "8x8"], 2,
                 ["--calib-size applies to a folder of images", "calib.npy"], id="calib-size-with-npy"),
    pytest.param(None, [*COMPILE, "--calib-size", "8x8"], 2, ["--calib-size", "give --calib-data"], id="calib-size-without-data"),
    pytest.param("plugin", [*COMPILE, "--plugin", "plug.py", "--pipeline", "fuse-conv-bn-relu,quit"], 4,
                 ["pass 'quit'", "sys.exit(0)", "[fuse-conv-bn-relu]"], id="pass-calls-sys-exit"),
]


@pytest.fixture
def work(tmp_path, monkeypatch, artifacts):
    (tmp_path / "mymodels.py").write_text(BAD_MODELS_PY)
    shutil.copy(artifacts["golden"], tmp_path / "g.npz")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mymodels", None)
    yield tmp_path
    sys.modules.pop("mymodels", None)


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = code, stdout, stderr


def run_main(capfd, *args: str) -> Result:
    code = main(list(args))
    out, err = capfd.readouterr()
    return Result(code, out, err)


@pytest.mark.parametrize("setup, args, code, phrases", ROWS)
def test_bad_input_exits_with_one_line_and_writes_nothing(work, artifacts, capfd, setup, args, code, phrases):
    if setup:
        SETUPS[setup](work, artifacts)
    before = set(work.iterdir())
    result = run_main(capfd, *args)
    if code == 0:
        assert result.returncode == 0, result.stderr
        assert (work / "out" / "artifact.json").is_file()
        return
    assert_fails(result, code, *phrases)
    assert set(work.iterdir()) == before  # no output folder, no staging folder, no golden
    assert not (work / "missing").exists()


def test_the_table_matches_the_real_process(tmp_path):
    """main() in a real process: click's errors in one line, --debug after the subcommand shows the traceback."""
    (tmp_path / "mymodels.py").write_text(BAD_MODELS_PY)
    assert_fails(graphopt("compile", "zoo:digits_cnn", "--calib-samples", "0", cwd=tmp_path), 2, "--calib-samples", "0")
    result = graphopt("compile", "mymodels:noisy", SHAPE, "1x3x8x8", "-o", "out", "--debug", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("graphopt: capture error: 'mymodels:noisy' is nondeterministic")
    assert not (tmp_path / "out").exists()


def test_debug_is_accepted_before_and_after_the_subcommand(work, capfd):
    for args in (["--debug", "compile", *TINY[1:]], [*TINY, "--debug"]):
        shutil.rmtree(work / "out", ignore_errors=True)
        result = run_main(capfd, *args, SHAPE, "1x3x8x8", "-q")
        assert result.returncode == 0, result.stderr
        assert (work / "out" / "artifact.json").is_file()
    result = run_main(capfd, "compile", "mymodels:tiny", SHAPE, "1x3x8", "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr and "conv" in result.stderr.splitlines()[-1]


def test_a_model_that_writes_into_its_input_compiles_and_verifies(work):
    """Every run gets fresh copies of the inputs: an in-place model is not blamed on lowering."""
    from graphopt import compile as graphopt_compile

    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            x.mul_(2.0)
            x.add_(1.0)
            return self.fc(x)

    torch.manual_seed(0)
    model = InPlace()
    x = torch.randn(2, 4)
    kept = x.clone()
    result = graphopt_compile(model, example_inputs=(x,), output=work / "out", measure=True, verify_samples=3)
    assert torch.equal(x, kept)  # the caller's example input is untouched
    assert result.report.verification.passed
    assert result.report.verification.metrics.max_abs_err == 0.0
    assert result.report.latency_ms["original"] > 0


def test_a_factory_model_from_a_shared_cache_is_not_modified(work):
    """Capture works on a copy for factory sources too: the cached model keeps its mode and weights."""
    from graphopt import compile as graphopt_compile

    (work / "cached.py").write_text(textwrap.dedent(
        '''
        import torch
        from torch import nn

        torch.manual_seed(0)
        CACHE = {"model": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2))}


        def shared():
            return CACHE["model"]
        '''
    ))
    sys.modules.pop("cached", None)
    import cached

    model = cached.CACHE["model"]
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt_compile("cached:shared", input_shapes=[(1, 3, 8, 8)], output=work / "out", measure=False)
    assert model.training is True
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # fuse-conv-bn-relu folded a copy
    sys.modules.pop("cached", None)
