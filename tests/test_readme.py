"""The README's commands are true: its quickstart and examples run, its test command is CI's."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _indented_commands() -> list[str]:
    """Indented (4-space) shell lines of the README, in order."""
    return [line[4:] for line in README.splitlines() if re.match(r"^    (pip|python3?|graphopt) ", line)]


def test_the_test_command_is_what_ci_runs():
    commands = _indented_commands()
    test_cmd = next(c for c in commands if "pytest" in c)
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_cmd
    setup = next(c for c in commands if c.startswith("pip install"))
    # CI installs the way the set-up line does: torch pinned first, then the project with the same extras.
    assert "pip install torch==2.13.0" in setup and any("torch==2.13.0" in line for line in ci)
    extras = re.search(r'pip install -e "(\.\[[^\]]*\])"', setup).group(1)
    assert any(extras in line for line in ci)


def _graphopt_commands() -> list[str]:
    commands = _indented_commands()
    setup = next(c for c in commands if c.startswith("pip install"))
    return [setup.split("&&")[-1].strip()] + [c for c in commands if c.startswith("graphopt ")]


def _groups() -> list[list[str]]:
    """Commands in independent groups (run in parallel); a command that names earlier outputs joins their groups."""
    commands = _graphopt_commands()
    group_of = list(range(len(commands)))  # union-find over command indices
    outputs: dict[str, int] = {}

    def root(i: int) -> int:
        while group_of[i] != i:
            i = group_of[i]
        return i

    for i, cmd in enumerate(commands):
        argv = shlex.split(cmd)
        for out, j in outputs.items():
            if any(a == out or a.startswith(out + "/") for a in argv[1:]):
                group_of[root(j)] = root(i)
        if "-o" in argv:
            outputs[argv[argv.index("-o") + 1].rstrip("/")] = i
    groups: dict[int, list[str]] = {}
    for i, cmd in enumerate(commands):
        groups.setdefault(root(i), []).append(cmd)
    return list(groups.values())


def test_the_readme_has_its_examples():
    commands = _graphopt_commands()
    assert len(commands) >= 10
    assert any(c.startswith("graphopt verify") for c in commands) and any("--recover-steps" in c for c in commands)


@pytest.mark.parametrize("group", _groups(), ids=lambda g: shlex.split(g[0])[1] + ":" + shlex.split(g[0])[2])
@pytest.mark.slow
def test_quickstart_and_examples_run(tmp_path, group):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    for cmd in group:
        argv = shlex.split(cmd)
        result = subprocess.run([sys.executable, "-m", "graphopt.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, (cmd, result.stderr[-3000:])
    # What the commands promise is there.
    for out in tmp_path.glob("out/*/report.json"):
        report = json.loads(out.read_text())
        assert report["verification"]["passed"], out
        if report["target"] == "cpu-int8":
            assert report["int8_verification"]["violations"] == []
        if "prune-channels" in report["pipeline"]:
            assert report["macs"]["compiled"] < 0.75 * report["macs"]["original"]
        if "recovery" in report:
            assert report["recovery"]["last_loss"] < report["recovery"]["first_loss"]
    if "graphopt compile zoo:resnet18 --target cpu-fp32" in group:
        assert (tmp_path / "resnet18.cpu-fp32" / "report.json").is_file()
