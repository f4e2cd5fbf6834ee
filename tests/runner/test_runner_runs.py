"""Trustworthy runs (issue 9): a run directory belongs to one run, resume refuses changed
settings, sweeps survive crashes and can be resumed after a kill."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsgd_cli.train import Schedule, Trainer, TrainSettings
from gsgd_cli.train.checkpoint import load

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["data=synthetic", "optimizer=sgd", "train.iterations=12", "train.batch_size=16",
         "train.eval_every=6"]


def summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file below `folder`: content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(code, out, err, expected_code=2):
    assert code == expected_code, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def env_for_subprocess(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR",
                                                            "GSGD_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def final_model(run_dir):
    return load(Path(run_dir) / "checkpoint.pt")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def iterations(run_dir):
    return [json.loads(line)["iteration"]
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# -- 1. resume refuses settings it was not trained with --------------------------------------

BASE = ["data=synthetic", "train.iterations=8", "train.batch_size=16", "train.eval_every=4",
        "dtype=float64", "train.checkpoint_every=4"]


@pytest.mark.parametrize("first, changed, expected", [
    (["optimizer=gsgd"], ["optimizer=path_sgd"],
     ["optimizer._target_: gsgd_cli.optim.gsgd.GSGD -> gsgd_cli.optim.path_sgd.PathSGD",
      "optimizer.skeleton_init: one -> (absent)", "optimizer.eps: (absent) -> 0.0"]),
    (["optimizer=gsgd"], ["optimizer=sgd"],     # today: KeyError: 'dampening'
     ["optimizer._target_: gsgd_cli.optim.gsgd.GSGD -> gsgd_cli.optim.sgd.make_sgd"]),
    (["optimizer=sgd", "optimizer.momentum=0.9"], ["optimizer=gsgd"],
     ["optimizer.momentum: 0.9 -> 0.0", "optimizer._target_: gsgd_cli.optim.sgd.make_sgd -> "]),
    (["optimizer=sgd"], ["optimizer=sgd", "optimizer.lr=0.05", "seed=7"],
     ["optimizer.lr: 0.01 -> 0.05", "seed: 0 -> 7"]),
    (["optimizer=sgd"], ["optimizer=sgd", "optimizer.momentum=0.9"],
     ["optimizer.momentum: 0.0 -> 0.9"]),
    (["optimizer=sgd"], ["optimizer=sgd", "schedule=multistep"],
     ["schedule.name: constant -> multistep", "schedule.milestones: (absent) -> [80, 120]"]),
    (["optimizer=sgd"], ["optimizer=sgd", "dtype=float32"], ["dtype: float64 -> float32"]),
])
def test_resume_refuses_changed_settings(gsgd_train_inproc, tmp_path, first, changed, expected):
    code, out, err = gsgd_train_inproc(*BASE, *first, "train.iterations=4")
    assert code == 0, err
    run = tmp_path / "run"
    before = snapshot(run)
    line = one_line(*gsgd_train_inproc(*BASE, *changed, "resume=true"))
    assert line.startswith(f"gsgd train: error: cannot resume {run}: these settings differ")
    for needle in expected:
        assert needle in line, line
    assert "train.iterations" not in line.split("(only")[0]   # budget changes are allowed
    assert snapshot(run) == before
    assert summary(run)["status"] == "completed"


def test_resume_may_extend_the_budget_and_change_bookkeeping(gsgd_train_inproc, tmp_path):
    """An epoch budget extended past a milestone equals a run started with the larger one."""
    from gsgd_cli.testing.fake_data import write_fake_idx

    write_fake_idx(tmp_path / "a" / "MNIST" / "raw", n_train=64, n_test=32)
    write_fake_idx(tmp_path / "b" / "MNIST" / "raw", n_train=64, n_test=32)   # a copy
    base = ["data=mnist", "model.width=8", "train.batch_size=16", "dtype=float64",
            "optimizer=sgd", "optimizer.momentum=0.9", "schedule=multistep",
            "schedule.milestones=[3,5]", "schedule.gamma=0.5", "train.iterations=null"]
    full = tmp_path / "full"
    assert gsgd_train_inproc(*base, "train.epochs=6", f"hydra.run.dir={full}",
                             f"data.root={tmp_path / 'a'}")[0] == 0
    part = tmp_path / "part"
    assert gsgd_train_inproc(*base, "train.epochs=4", f"hydra.run.dir={part}",
                             f"data.root={tmp_path / 'a'}")[0] == 0
    code, out, err = gsgd_train_inproc(
        *base, "train.epochs=6", f"hydra.run.dir={part}", "resume=true", "train.eval_every=2",
        "train.checkpoint_every=3", "progress=false", "cpu_threads=1", "device=cpu",
        f"data.root={tmp_path / 'b'}")
    assert code == 0, err
    assert "completed 24 iterations (6 epochs)" in out
    assert_same_weights(final_model(full), final_model(part))
    lrs = {m["iteration"]: m["lr"] for m in map(json.loads, (part / "metrics.jsonl").open())}
    assert lrs[24] == pytest.approx(0.01 * 0.25) and lrs[16] == pytest.approx(0.01 * 0.5)
    # the recorded config says what the run now is
    assert "epochs: 6" in (part / ".hydra" / "config.yaml").read_text()


def test_resume_with_a_smaller_budget_is_refused(gsgd_train_inproc, tmp_path):
    assert gsgd_train_inproc(*SYNTH)[0] == 0
    before = snapshot(tmp_path / "run")
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.iterations=6", "resume=true"))
    assert "is at iteration 12, beyond this budget of 6 iterations" in line
    assert snapshot(tmp_path / "run") == before


def test_resume_of_a_completed_run_changes_nothing(gsgd_train_inproc, tmp_path):
    assert gsgd_train_inproc(*SYNTH)[0] == 0
    before = snapshot(tmp_path / "run")
    code, out, err = gsgd_train_inproc(*SYNTH, "resume=true")
    assert code == 0, err
    # the first line names the overrides (issue 21); the result line follows it
    assert out.splitlines()[0].startswith("gsgd train: overrides: ")
    assert out.splitlines()[-1].startswith("gsgd train: already completed 12 iterations")
    assert len(out.splitlines()) == 2 and "nothing to do" in out
    assert snapshot(tmp_path / "run") == before


def test_resume_of_a_run_that_diverged_before_any_checkpoint_is_one_line(gsgd_train_inproc,
                                                                          tmp_path):
    args = (*SYNTH, "optimizer=sgd", "optimizer.lr=1e30", "train.checkpoint_every=100")
    code, out, err = gsgd_train_inproc(*args)
    assert code != 0 and summary(tmp_path / "run")["status"] == "diverged", out + err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    before = snapshot(tmp_path / "run")
    line = one_line(*gsgd_train_inproc(*args, "resume=true"))
    assert "diverged before its first checkpoint" in line and "smaller learning rate" in line
    assert "training diverged: loss=" in line          # says where, from its summary
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_checkpoint_is_one_line(gsgd_train_inproc, tmp_path, damage):
    assert gsgd_train_inproc(*SYNTH, "train.checkpoint_every=6", "train.iterations=6")[0] == 0
    ckpt = tmp_path / "run" / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                      "garbage": b"not a checkpoint" * 100}[damage])
    before = snapshot(tmp_path / "run")
    line = one_line(*gsgd_train_inproc(*SYNTH, "resume=true"))
    assert f"cannot read the checkpoint {ckpt}: the file is corrupt or truncated" in line
    assert "overwrite=true" in line
    assert snapshot(tmp_path / "run") == before


def test_partial_last_metrics_line_is_dropped_on_resume(gsgd_train_inproc, tmp_path):
    assert gsgd_train_inproc(*SYNTH, "train.iterations=6")[0] == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"iteration": 9, "epoch": 0.2, "lr": 0.0')      # killed mid-write
    code, out, err = gsgd_train_inproc(*SYNTH, "resume=true")
    assert code == 0, err
    assert "dropped the partial last line of" in err and "Traceback" not in err
    assert iterations(tmp_path / "run") == [6, 12]


def test_corrupt_metrics_line_in_the_middle_is_one_line(gsgd_train_inproc, tmp_path):
    assert gsgd_train_inproc(*SYNTH, "train.iterations=6", "train.eval_every=2")[0] == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    before = snapshot(tmp_path / "run")
    line = one_line(*gsgd_train_inproc(*SYNTH, "train.eval_every=2", "resume=true"))
    assert f"{metrics} line 2 is not a metrics record" in line
    assert snapshot(tmp_path / "run") == before


def test_resume_and_overwrite_together_are_refused(gsgd_train_inproc):
    line = one_line(*gsgd_train_inproc(*SYNTH, "resume=true", "overwrite=true"))
    assert "resume=true and overwrite=true contradict each other" in line


# -- 2. a run directory belongs to one run --------------------------------------------------

def test_a_new_run_refuses_a_directory_holding_a_run(gsgd_train_inproc, tmp_path):
    run = tmp_path / "run"
    assert gsgd_train_inproc(*SYNTH)[0] == 0
    before = snapshot(run)
    line = one_line(*gsgd_train_inproc(*SYNTH, "seed=3"))
    assert f"{run} already holds a run" in line
    for needle in ("resume=true", "hydra.run.dir", "overwrite=true"):
        assert needle in line
    assert snapshot(run) == before


def test_overwrite_removes_the_old_run_tensorboard_included(gsgd_train_inproc, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert gsgd_train_inproc(*SYNTH, "train.iterations=18")[0] == 0
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half")
    code, out, err = gsgd_train_inproc(*SYNTH, "seed=3", "overwrite=true")
    assert code == 0, err
    assert iterations(run) == [6, 12] and summary(run)["seed"] == 3
    assert len(list((run / "tb").iterdir())) == 1
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("test_acc")] == [6, 12]
    assert not (run / ".checkpoint.pt.k1ll3d.tmp").exists()
    assert "seed=3" in (run / ".hydra" / "overrides.yaml").read_text()


def test_failing_commands_never_change_an_existing_run(gsgd_train_inproc, tmp_path):
    from gsgd_cli.analysis.runs import load_run

    run = tmp_path / "run"
    assert gsgd_train_inproc(*SYNTH)[0] == 0
    before = snapshot(run)
    for overrides in (["optimizer.lr=abc", "resume=true"],   # a typo
                      ["optimizer.lr=0.5", "resume=true"],   # a refused resume
                      ["train.batch_size=0", "resume=true"],
                      ["model.width=0"],                       # a new run here: refused
                      ["device=tpu"]):
        code, out, err = gsgd_train_inproc(*SYNTH, *overrides)
        assert code == 2, (overrides, out, err)
        assert snapshot(run) == before, overrides
    assert load_run(run).status == "completed" and load_run(run).complete


def test_a_failed_first_attempt_does_not_block_the_fixed_command(gsgd_train_inproc, tmp_path):
    """A command that failed before training leaves only a `failed` summary; the same
    directory takes the corrected command without overwrite=true."""
    assert gsgd_train_inproc(*SYNTH, "model.width=0")[0] == 2
    assert summary(tmp_path / "run")["status"] == "failed"
    code, out, err = gsgd_train_inproc(*SYNTH)
    assert code == 0, err
    assert summary(tmp_path / "run")["status"] == "completed"


def _trainer(run_dir, iterations, **settings):
    from gsgd_cli.data import load_data
    from gsgd_cli.models import MLP
    from gsgd_cli.optim.sgd import make_sgd

    torch.manual_seed(0)
    data = load_data({"name": "synthetic", "shape": [1, 4, 4], "num_classes": 3,
                      "train_size": 64, "test_size": 32})
    net = MLP(16, 3, width=8).double()
    settings = TrainSettings(**{"iterations": iterations, "batch_size": 16, "eval_every": 3,
                                "dtype": torch.float64, "progress": False, **settings})
    return Trainer(net, make_sgd(net, lr=0.1, momentum=0.9), data, run_dir, settings, Schedule(),
                   log=lambda m: None)


def _tb_steps(run_dir, tag="test_acc"):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_shows_every_evaluation_once_after_resume(tmp_path):
    full = _trainer(tmp_path / "full", 15, checkpoint_every=6)
    full.fit()
    # killed after the evaluation at 9 but before its checkpoint: the checkpoint says 6
    part = _trainer(tmp_path / "part", 9, checkpoint_every=6)
    part.fit()
    ref6 = _trainer(tmp_path / "ref6", 6, checkpoint_every=6)
    ref6.fit()
    (tmp_path / "part" / "checkpoint.pt").write_bytes((tmp_path / "ref6" / "checkpoint.pt").read_bytes())
    _trainer(tmp_path / "part", 15, checkpoint_every=6).fit(resume=True)
    steps = _tb_steps(tmp_path / "part")
    assert [s for s, _ in steps] == [3, 6, 9, 12, 15]
    assert steps == _tb_steps(tmp_path / "full")   # the redone evaluation at 9 included
    # and a resume from the checkpoint at the last evaluation keeps that evaluation
    _trainer(tmp_path / "part", 21, checkpoint_every=6).fit(resume=True)
    assert [s for s, _ in _tb_steps(tmp_path / "part")] == [3, 6, 9, 12, 15, 18, 21]


def test_orphaned_checkpoint_tmp_files_are_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    orphans = [run / ".checkpoint.pt.a1b2c3.tmp", run / ".summary.json.tmp"]
    for orphan in orphans:
        orphan.write_bytes(b"left by a kill")
    _trainer(run, 6).fit()
    assert not any(o.exists() for o in orphans)
    for orphan in orphans:
        orphan.write_bytes(b"left by a kill")
    _trainer(run, 9).fit(resume=True)
    assert not any(o.exists() for o in orphans)


def test_concurrent_runs_get_their_own_directories(tmp_path):
    """Two `gsgd train` started together with the same time in their directory name (as two
    runs started in the same second would have) still get their own directories."""
    args = [sys.executable, "-m", "gsgd_cli", "train", *SYNTH, "train.iterations=30",
            "train.eval_every=3", "hydra.run.dir=outputs/same-second_${gsgd.run_id:}"]
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env_for_subprocess(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    runs = sorted(p.parent for p in (tmp_path / "outputs").glob("*/summary.json"))
    assert len(runs) == 2
    for run in runs:
        assert iterations(run) == list(range(3, 31, 3))
        assert summary(run)["status"] == "completed"
    assert {line.rsplit("run dir ", 1)[1] for out, _ in outs for line in out.splitlines()
            if "run dir" in line} == {str(r) for r in runs}


@pytest.mark.parametrize("preset", [None, "fig4", "fig4_cpu", "fig5", "fig7", "fig8", "table1"])
def test_default_run_and_sweep_directories_end_in_the_unique_suffix(preset):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import gsgd_cli.cli.train  # noqa: F401  (registers the resolver)

    overrides = [f"experiment={preset}"] if preset else []
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    for key in ("run", "sweep"):
        raw = OmegaConf.to_container(cfg.hydra[key], resolve=False)["dir"]
        assert raw.endswith("${now:%H-%M-%S}_${gsgd.run_id:}") or raw.endswith(
            "${now:%Y-%m-%d_%H-%M-%S}_${gsgd.run_id:}"), (key, raw)


def test_run_ids_differ_between_processes_and_calls(tmp_path):
    code = "from gsgd_cli.train.rundir import new_run_id; print(new_run_id(), new_run_id())"
    outs = [subprocess.run([sys.executable, "-c", code], env=env_for_subprocess(), text=True,
                           capture_output=True, check=True).stdout.split() for _ in range(2)]
    ids = [i for pair in outs for i in pair]
    assert len(set(ids)) == 4
    assert {i.split("-")[0] for i in outs[0]} != {i.split("-")[0] for i in outs[1]}  # pids


def test_run_id_can_be_set_for_processes_that_must_agree(tmp_path, monkeypatch):
    from gsgd_cli.__main__ import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GSGD_RUN_ID", "rank-agreed")
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["gsgd", "train", *SYNTH]) == 0
    (run,) = (tmp_path / "outputs").glob("*/*_rank-agreed")
    assert summary(run)["status"] == "completed"


# -- 3. sweeps ------------------------------------------------------------------------------

def test_sweep_end_line_survives_a_crashing_job(gsgd_train_inproc, tmp_path, monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    import gsgd_cli.runner.job as job   # loads the data of each job

    real = job.load_data

    def crash_for_seed_1(data_cfg, device):
        if HydraConfig.get().job.num == 1:
            raise RuntimeError("simulated crash")
        return real(data_cfg, device)

    monkeypatch.setattr(job, "load_data", crash_for_seed_1)
    sweep = tmp_path / "sweep"
    code, out, err = gsgd_train_inproc("-m", *SYNTH, "seed=0,1,2", f"hydra.sweep.dir={sweep}")
    assert code == 1
    assert f"gsgd train: 2 of 3 jobs completed in {sweep}" in out
    assert f"{sweep / '1'} (failed)" in out and "simulated crash" in err
    assert [summary(sweep / str(i))["status"] for i in range(3)] == ["completed", "failed",
                                                                     "completed"]


def test_sweep_counts_only_its_own_jobs(gsgd_train_inproc, tmp_path):
    sweep = tmp_path / "sweep"
    code, out, err = gsgd_train_inproc("-m", *SYNTH, "model.width=8,16,0",
                                       f"hydra.sweep.dir={sweep}")
    assert code == 1 and "2 of 3 jobs completed" in out
    code, out, err = gsgd_train_inproc("-m", *SYNTH, "model.width=8,16", "overwrite=true",
                                       f"hydra.sweep.dir={sweep}")
    assert code == 0, out + err
    assert f"gsgd train: 2 of 2 jobs completed in {sweep}" in out and "not completed" not in out


def test_a_sweep_resume_refused_for_a_job_names_it(gsgd_train_inproc, tmp_path):
    sweep = tmp_path / "sweep"
    assert gsgd_train_inproc("-m", *SYNTH, "seed=0,1", f"hydra.sweep.dir={sweep}")[0] == 0
    before = snapshot(sweep / "0")
    code, out, err = gsgd_train_inproc("-m", *SYNTH, "seed=0,1", "optimizer.lr=0.5",
                                       "resume=true", f"hydra.sweep.dir={sweep}")
    assert code == 1
    assert f"0 of 2 jobs completed in {sweep}" in out and f"{sweep / '0'} (refused)" in out
    assert snapshot(sweep / "0") == before


SWEEP = ["-m", "data=synthetic", "optimizer=sgd", "optimizer.momentum=0.9", "dtype=float64",
         "train.iterations=3000", "train.batch_size=16", "train.eval_every=1000",
         "train.checkpoint_every=50", "seed=0,1,2"]


def test_a_killed_sweep_resumes(tmp_path, gsgd_train_inproc):
    """Killed while job 1 trains: resuming skips job 0, continues job 1 from its checkpoint and
    starts job 2; every job ends with the weights of an uninterrupted sweep."""
    def sweep(where, *extra, wait=True):
        args = [sys.executable, "-m", "gsgd_cli", "train", *SWEEP, f"hydra.sweep.dir={where}",
                *extra]
        proc = subprocess.Popen(args, cwd=tmp_path, env=env_for_subprocess(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
        if wait:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
            return out
        return proc

    reference = tmp_path / "reference"
    assert gsgd_train_inproc(*SWEEP, f"hydra.sweep.dir={reference}")[0] == 0
    killed = tmp_path / "killed"
    proc = sweep(killed, wait=False)
    deadline = time.time() + 120
    while not (killed / "1" / "checkpoint.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended too early"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert load(killed / "1" / "checkpoint.pt")["iteration"] < 3000
    assert not (killed / "1" / "summary.json").exists()
    assert not (killed / "2" / "checkpoint.pt").exists()
    job0 = snapshot(killed / "0")

    out = sweep(killed, "resume=true")
    assert f"gsgd train: 3 of 3 jobs completed in {killed} (1 already before this command)" in out
    assert snapshot(killed / "0") == job0
    for job in ("0", "1", "2"):
        assert_same_weights(final_model(reference / job), final_model(killed / job))
        assert iterations(killed / job) == iterations(reference / job) == [1000, 2000, 3000]
        assert summary(killed / job)["status"] == "completed"
