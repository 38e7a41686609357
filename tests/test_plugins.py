"""Plugin discovery: entry points (a real dist-info on sys.path), files and modules."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from graphopt.errors import PluginError
from graphopt.plugins import PluginHost

REPO = Path(__file__).resolve().parents[1]

PLUGIN_SOURCE = textwrap.dedent(
    '''
    from graphopt import PassResult, register_pass

    @register_pass("count-nodes", contract="exact")
    def count_nodes(program, *, verbose: bool = False):
        """Counts nodes; changes nothing."""
        return PassResult(changed=False, detail=f"{program.node_count()} nodes")
    '''
)


def make_distribution(root: Path, module: str, source: str, entry_name: str) -> None:
    """Lay out an installed distribution: the module and its .dist-info with entry_points.txt."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}_dist-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}-dist\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[graphopt.plugins]\n{entry_name} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("gp_test_")]:
        del sys.modules[name]


def test_builtins_come_through_entry_points():
    host = PluginHost()
    host.load_entry_points()
    assert {"fuse-conv-bn-relu", "dce"} <= set(host.passes.names())
    assert "cpu-fp32" in host.targets
    assert host.passes.origin("dce").startswith("entry point 'dce' of package 'graphopt'")


def test_entry_point_discovery_from_a_real_dist_info(site):
    make_distribution(site, "gp_test_plugin", PLUGIN_SOURCE, "count")
    host = PluginHost()
    host.load_entry_points()
    assert "count-nodes" in host.passes
    assert "gp_test_plugin-dist" in host.passes.origin("count-nodes")
    assert host.passes.get("count-nodes").options["verbose"].default is False


def test_entry_point_that_fails_to_import_is_named(site):
    make_distribution(site, "gp_test_broken", "x = 1 / 0\n", "broken")
    with pytest.raises(PluginError, match=r"plugin 'broken' \(gp_test_broken\) from package 'gp_test_broken-dist' "
                                          r"failed to import: ZeroDivisionError"):
        PluginHost().load_entry_points()


def test_entry_point_duplicate_names_both_sources(site):
    dup = PLUGIN_SOURCE.replace("count-nodes", "dce")
    make_distribution(site, "gp_test_dup", dup, "dup")
    with pytest.raises(PluginError) as err:
        PluginHost().load_entry_points()
    msg = str(err.value)
    assert "pass 'dce' is registered twice" in msg
    assert "graphopt.passes.dce" in msg and "gp_test_dup" in msg


def test_plugin_file(tmp_path):
    f = tmp_path / "myplugin.py"
    f.write_text(PLUGIN_SOURCE)
    host = PluginHost()
    host.load(str(f))
    assert "count-nodes" in host.passes


def test_plugin_module_name(site):
    (site / "gp_test_mod.py").write_text(PLUGIN_SOURCE)
    host = PluginHost()
    host.load("gp_test_mod")
    assert "count-nodes" in host.passes


def test_example_plugin_loads():
    host = PluginHost()
    host.load(str(REPO / "examples" / "remove_dropout.py"))
    assert host.passes.get("remove-dropout").contract == "exact"


@pytest.mark.parametrize(
    "content, phrase",
    [
        ("import nonexistent_pkg_xyz\n", "ModuleNotFoundError"),
        ("def f(:\n", "SyntaxError"),
        ("raise RuntimeError('bad plugin')\n", "RuntimeError: bad plugin (at "),
        ("x = 1\n", "defines no pass or target"),
    ],
)
def test_bad_plugin_files(tmp_path, content, phrase):
    f = tmp_path / "bad.py"
    f.write_text(content)
    with pytest.raises(PluginError) as err:
        PluginHost().load(str(f))
    assert phrase in str(err.value)
    assert "bad.py" in str(err.value)


def test_missing_plugin():
    with pytest.raises(PluginError, match="does not exist"):
        PluginHost().load("no/such/plugin.py")
    with pytest.raises(PluginError, match="no such module"):
        PluginHost().load("no_such_module_xyz")
