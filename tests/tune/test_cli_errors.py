"""`graphopt tune` refuses bad input in one line, exit 2, before any trial runs."""

from __future__ import annotations

import pytest

from graphopt.cli import main


@pytest.mark.parametrize("extra, words", [
    (["--time-budget", "soon"], ["--time-budget 'soon'", "20m"]),
    (["--time-budget", "-5m"], ["must be > 0"]),
    (["--search", "prune,shrink"], ["unknown part 'shrink'", "'quant'"]),
    (["--objective", "latency", "--no-latency"], ["--no-latency cannot go with --objective latency"]),
    (["--trials", "0"], ["--trials must be >= 1"]),
    (["--eval", "nowhere"], ["--eval 'nowhere' is not pkg.module:function"]),
    (["--eval", "graphopt.datasets:nope"], ["'graphopt.datasets' has no function 'nope'"]),
    (["--target", "tpu-int4"], ["unknown target 'tpu-int4'"]),
    (["--storage", "notaurl"], ["--storage 'notaurl': not a database URL", "sqlite:///study.db"]),
    (["--storage", "mysql://bob:secret@localhost/db"], ["--storage 'mysql://bob:***@localhost/db'", "pip install"]),
    (["--storage", "sqlite:////no/such/folder/study.db"], ["cannot open the study's database", "unable to open"]),
])
def test_bad_tune_arguments(tmp_path, capsys, extra, words):
    args = ["tune", "zoo:digits_cnn", "-o", str(tmp_path / "out"), "--target", "cpu-fp32", *extra]
    if extra[0] == "--target":
        args = args[:4] + extra
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "secret" not in err  # a storage URL's password is never printed
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "out").exists()  # no study was created
