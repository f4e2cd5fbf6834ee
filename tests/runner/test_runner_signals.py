"""Issue 9, section 4: SIGTERM/SIGINT stop a run with a checkpoint, a full disk is one line."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsgd_cli.train.checkpoint import load

REPO = Path(__file__).resolve().parents[2]
BASE = ["data=synthetic", "optimizer=sgd", "optimizer.momentum=0.9", "dtype=float64",
        "train.batch_size=16", "train.eval_every=200"]


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_with_a_checkpoint_and_the_run_resumes_bit_exact(tmp_path, signum, code,
                                                                        gsgd_train_inproc):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "gsgd_cli", "train", *BASE,
                             "train.iterations=100000000", "train.checkpoint_every=100000000",
                             f"hydra.run.dir={run}"], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    assert not (run / "checkpoint.pt").exists()   # only the signal will write one
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [
        f"gsgd train: interrupted ({signal.Signals(signum).name}); continue with: gsgd train "
        f"resume=true hydra.run.dir={run} (plus the same overrides)"]
    s = summary(run)
    stopped = s["iterations"]
    assert s["status"] == "interrupted" and stopped >= 200
    assert load(run / "checkpoint.pt")["iteration"] == stopped
    assert f"the checkpoint has iteration {stopped}" in s["message"]

    budget = f"train.iterations={stopped + 37}"
    code, out, err = gsgd_train_inproc(*BASE, budget, "resume=true", f"hydra.run.dir={run}")
    assert code == 0, err
    assert gsgd_train_inproc(*BASE, budget, f"hydra.run.dir={tmp_path / 'ref'}")[0] == 0
    assert_same_weights(load(tmp_path / "ref" / "checkpoint.pt")["model"],
                        load(run / "checkpoint.pt")["model"])
    # the losses of the iterations before the stop that the host had not yet read (they stay
    # on the device until a sync point) are in the checkpoint's running sums too
    ref, resumed = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
                    for d in (tmp_path / "ref", run))
    for key in ("iteration", "train_loss", "train_acc", "test_loss", "test_acc"):
        assert resumed[key] == ref[key], key


@pytest.mark.parametrize("how, code, name", [("ctrl-c", 130, "SIGINT"),
                                             ("sigterm", 143, "SIGTERM")])
def test_no_resume_hint_without_a_checkpoint(gsgd_train_inproc, tmp_path, monkeypatch, how,
                                             code, name):
    import gsgd_cli.runner.job as job   # loads the data of each job

    def interrupted_while_loading(data_cfg, device):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise AssertionError("gsgd train does not handle SIGTERM")  # it would kill pytest
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)   # the handler raises before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(job, "load_data", interrupted_while_loading)
    before = signal.getsignal(signal.SIGTERM)
    got, out, err = gsgd_train_inproc(*BASE, "train.iterations=10")
    assert got == code
    assert err.strip().splitlines() == [
        f"gsgd train: interrupted ({name}) before a checkpoint was written in "
        f"{tmp_path / 'run'}; there is nothing to resume: run the command again"]
    assert signal.getsignal(signal.SIGTERM) == before   # the caller's handler is back


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_previous(
        gsgd_train_inproc, tmp_path, monkeypatch):
    import gsgd_cli.safe_files as checkpoint   # checkpoints are written through safe_files

    real_fsync, calls = checkpoint.os.fsync, []

    def fsync_on_a_full_disk(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    overrides = [*BASE, "train.iterations=12", "train.checkpoint_every=4",
                 "train.tensorboard=false"]
    monkeypatch.setattr(checkpoint.os, "fsync", fsync_on_a_full_disk)
    code, out, err = gsgd_train_inproc(*overrides)
    monkeypatch.undo()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"gsgd train: error: the disk is full: could not write {ckpt} (No space left on device); "
        "the previous checkpoint (iteration 4) is intact; free some space, then continue with "
        "resume=true."]
    assert load(ckpt)["iteration"] == 4
    assert not list((tmp_path / "run").glob(".*.tmp"))
    assert summary(tmp_path / "run")["status"] == "failed"
    # once there is space again, the run continues to the result of an uninterrupted one
    assert gsgd_train_inproc(*overrides, "resume=true")[0] == 0
    assert gsgd_train_inproc(*overrides, f"hydra.run.dir={tmp_path / 'ref'}")[0] == 0
    assert_same_weights(load(tmp_path / "ref" / "checkpoint.pt")["model"], load(ckpt)["model"])


@pytest.mark.slow   # about 20 s: loky workers
def test_a_parallel_sweep_stopped_by_sigterm_checkpoints_every_running_job(tmp_path):
    """joblib: SIGTERM to the process group (SLURM, `kill -- -PGID`): each running job stops
    with a checkpoint (no worker is killed mid-checkpoint), queued jobs do not start, the sweep
    ends with its end line and exit 143, and `resume=true` finishes it."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    args = [sys.executable, "-m", "gsgd_cli", "train", "-m", "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2", *BASE, "train.checkpoint_every=100000000", "seed=0,1,2",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([*args, "train.iterations=100000000"], cwd=tmp_path, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 180
    while not all((sweep / job / "metrics.jsonl").is_file() for job in "01"):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    stopped = {}
    for job in "01":
        s = summary(sweep / job)
        assert s["status"] == "interrupted"
        assert load(sweep / job / "checkpoint.pt")["iteration"] == s["iterations"] > 0
        stopped[job] = s["iterations"]
        assert (f"interrupted (SIGTERM) in job {sweep / job}; continue the sweep with the same "
                f"command plus resume=true hydra.sweep.dir={sweep}") in err
    assert json.loads((sweep / ".gsgd_job.2.json").read_text())["message"] == (
        "not started: the sweep was stopped (SIGTERM)")            # queued: never started
    assert f"gsgd train: 0 of 3 jobs completed in {sweep}" in out
    assert (f"gsgd train: stopped (SIGTERM); continue the sweep with the same command plus "
            f"resume=true hydra.sweep.dir={sweep}") in err
    budget = max(stopped.values()) + 10
    done = subprocess.run([*args, f"train.iterations={budget}", "resume=true"], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"3 of 3 jobs completed in {sweep}" in done.stdout
