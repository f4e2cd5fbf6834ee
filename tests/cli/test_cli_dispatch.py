"""The `gsgd` dispatcher, and optimizer wiring in `gsgd train` that crosses issues."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def gsgd(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "gsgd_cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=cwd)


def test_help_and_unknown_command():
    assert "commands:" in gsgd("--help").stdout
    result = gsgd("tarin")
    assert result.returncode == 2
    assert result.stderr.strip() == ("gsgd: unknown command 'tarin'. Choose one of: train, "
                                     "inspect, report, figures, eval (see `gsgd --help`).")


def test_shell_completion_without_the_subcommand_word():
    """Hydra's installed bash completion calls `gsgd -sc query=bash` with no `train`."""
    env = dict(os.environ, COMP_LINE="gsgd train optimizer=", COMP_POINT="21")
    result = gsgd("-sc", "query=bash", env=env)
    assert result.returncode == 0, result.stderr
    assert {"optimizer=gsgd", "optimizer=sgd", "optimizer=path_sgd"} <= set(result.stdout.split())


def test_path_sgd_on_a_conv_net_gets_the_input_shape_from_the_data(tmp_path):
    result = gsgd("train", "model=plain_tiny", "model.bn=false", "data=synthetic",
                  "data.shape=[3,8,8]", "optimizer=path_sgd", "train.iterations=2",
                  f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_git_commit_is_read_once_and_marks_uncommitted_changes(monkeypatch):
    import subprocess as sp

    from gsgd_cli.runner import environment

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        out = "abc123\n" if cmd[1] == "rev-parse" else " M gsgd_cli/optim/gsgd.py\n"
        return sp.CompletedProcess(cmd, 0, stdout=out, stderr="")

    environment.git_commit.cache_clear()
    monkeypatch.setattr(environment.subprocess, "run", fake_run)
    try:
        assert environment.git_commit() == "abc123-dirty"
        assert environment.git_commit() == "abc123-dirty"
        assert len(calls) == 2                      # one rev-parse, one status: cached after
    finally:
        environment.git_commit.cache_clear()


def test_multirun_through_submitit_local(tmp_path):
    """The launcher used for clusters (submitit), run locally: one directory per job."""
    result = gsgd("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
                  "data=synthetic", "optimizer=sgd,gsgd", "train.iterations=3",
                  f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for job in ("0", "1"):
        assert json.loads((tmp_path / job / "summary.json").read_text())["status"] == "completed"
