"""Shared fixtures. Runner fixtures: `compose_train` (the real conf/) and `gsgd_train` (CLI)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compose_train():
    """Compose the real `conf/train.yaml` with overrides (Compose API, no output dir)."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


@pytest.fixture
def gsgd_train(tmp_path):
    """Run `python -m gsgd_cli train ARGS` in a subprocess from `tmp_path`.

    Adds `hydra.run.dir` / `hydra.sweep.dir` under tmp_path unless given, quiet progress,
    one CPU thread. Returns the CompletedProcess (text mode).
    """

    def _run(*args: str, timeout: float = 120, env: dict | None = None):
        args = list(args)
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={tmp_path / 'run'}")
        if not any(a.startswith("hydra.sweep.dir=") for a in args):
            args.append(f"hydra.sweep.dir={tmp_path / 'sweep'}")
        full_env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
        full_env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **(env or {}))
        return subprocess.run([sys.executable, "-m", "gsgd_cli", "train", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=timeout, env=full_env)

    return _run


@pytest.fixture
def gsgd_train_inproc(tmp_path, capsys, monkeypatch):
    """Run `gsgd train ARGS` in this process (fast: no imports); returns (exit code, out, err)."""
    from gsgd_cli.__main__ import main

    monkeypatch.delenv("COMP_LINE", raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    def _run(*args: str):
        args = list(args)
        if not any(a.startswith("hydra.run.dir=") for a in args):
            args.append(f"hydra.run.dir={tmp_path / 'run'}")
        capsys.readouterr()
        try:
            code = main(["gsgd", "train", *args])
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture(params=["fused", "eager"])
def step_path(request, monkeypatch):
    """Run a G-SGD / Path-SGD test twice: with the fused CPU kernels and with the eager
    reference steps (sets the default of `fused=`), and check that the intended path was taken
    by every step on the CPU."""
    from gsgd_cli.optim.native import build as fused_cpu
    from gsgd_cli.optim.gsgd import GSGD
    from gsgd_cli.optim.path_sgd import PathSGD

    fused = request.param == "fused"
    if fused and fused_cpu.library() is None:
        pytest.skip("the fused CPU step cannot be built here (no C++ compiler)")
    used = []
    for cls in (GSGD, PathSGD):
        monkeypatch.setitem(cls.__init__.__kwdefaults__, "fused", fused)
        original = cls._fused_step

        def spy(self, *args, original=original):
            result = original(self, *args)
            if self._step_record.device.type == "cpu":
                used.append(result)
            return result

        monkeypatch.setattr(cls, "_fused_step", spy)
    yield request.param
    assert all(used) if fused else not any(used), f"the {request.param} step path was not taken"
