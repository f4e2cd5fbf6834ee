"""Data-parallel training (issue 11): 2 processes with torchrun and gloo on the CPU reproduce the
single-process run with the same global batch, only rank 0 writes, resume needs the same
number of processes, and the placement of sweep jobs on GPUs and CPU threads.

The torchrun runs go through `tests/dist_entry.py` (gsgd's own entry point plus probes that
record each rank's writes, weights and data loads) and run in their own process group, killed
on failure or timeout.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gsgd_cli.train.checkpoint import load

REPO = Path(__file__).resolve().parents[2]
ENTRY = REPO / "tests" / "dist_entry.py"
TOL = 1e-10
# 20 steps of a global batch of 16 (8 per rank), float64; the tiny ResNet without batch norm
RUN = ["experiment=smoke", "dtype=float64", "train.iterations=20", "train.eval_every=10",
       "optimizer.lr=0.001", "train.tensorboard=false"]
JOBS = ["model=mlp,resnet_nobn", "optimizer=gsgd,path_sgd"]


def env_for_subprocess(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("COMP_LINE", "HYDRA_FULL_ERROR", "GSGD_RUN_ID", "RANK", "WORLD_SIZE",
                        "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "SUBMITIT_EXECUTOR")
           and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(REPO), OMP_WAIT_POLICY="PASSIVE", **extra)
    return env


def searchpath(tmp: Path) -> str:
    """A config folder with `model=resnet_nobn`: the tiny ResNet without batch norm."""
    folder = tmp / "conf" / "model"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resnet_nobn.yaml").write_text("defaults:\n  - resnet_tiny\n  - _self_\nbn: false\n")
    return f"hydra.searchpath=[file://{tmp / 'conf'}]"


def start_torchrun(args, cwd: Path, dump: Path, *, nproc: int = 2, **env) -> subprocess.Popen:
    """`torchrun --standalone` (a free port of its own) with `nproc` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ENTRY), *args]
    return subprocess.Popen(cmd, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=env_for_subprocess(GSGD_TEST_DUMP=str(dump),
                                                   GSGD_TEST_WATCH=str(cwd), **env))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun starts its workers in sessions of their own, so
    killing its process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(pid: int) -> None:
    for target in [pid, *descendants(pid)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    """Wait for `proc`; it and every process below it are killed on a timeout (nothing stays
    behind)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{err[-3000:]}")
    return proc.returncode, out, err


def torchrun(args, cwd: Path, dump: Path, *, expect: int = 0, **kwargs) -> str:
    code, out, err = finish(start_torchrun(args, cwd, dump, **kwargs))
    assert code == expect, f"exit {code}\n{out[-2000:]}\n{err[-4000:]}"
    return out


def rank_weights(dump: Path, job: str, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(dump / f"{job}.rank{rank}.pt", weights_only=True)


def assert_same_weights(a, b, tol: float | None = None) -> None:
    """Equal key by key: bitwise (tol None) or within `tol` (absolute and relative)."""
    assert a.keys() == b.keys()
    for key in a:
        if tol is None:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=tol, atol=tol, msg=key)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: Path, b: Path) -> None:
    for x, y in zip(metrics(a), metrics(b), strict=True):
        assert x.keys() == y.keys()
        for key in x:
            if key == "elapsed_s":
                continue
            if "loss" in key:
                assert abs(x[key] - y[key]) <= TOL * max(1.0, abs(y[key])), (key, x, y)
            else:
                assert x[key] == y[key], (key, x, y)


@pytest.fixture(scope="module")
def sweep2(tmp_path_factory):
    """The 4 jobs (MLP and BN-free tiny ResNet x G-SGD and Path-SGD) on 2 processes, and the
    same sweep in one process (the reference)."""
    tmp = tmp_path_factory.mktemp("dist")
    extra = [searchpath(tmp), *RUN]
    dump = tmp / "dump"
    torchrun(["-m", *extra, *JOBS, f"hydra.sweep.dir={tmp / 'two'}"], tmp, dump)
    ref = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", "-m", *extra, *JOBS,
                          f"hydra.sweep.dir={tmp / 'one'}"], cwd=tmp, capture_output=True,
                         text=True, timeout=240, env=env_for_subprocess(OMP_NUM_THREADS="1"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    return tmp, dump


@pytest.mark.parametrize("job", ["0", "1", "2", "3"])
def test_two_processes_reproduce_one_process(sweep2, job):
    """Both ranks hold the same weights after 20 steps (bitwise), and they equal the
    single-process run with the same global batch (float64, 1e-10); so do the metrics."""
    tmp, dump = sweep2
    rank0, rank1 = rank_weights(dump, job, 0), rank_weights(dump, job, 1)
    assert_same_weights(rank0, rank1)
    reference = load(tmp / "one" / job / "checkpoint.pt")["model"]
    assert_same_weights(rank0, reference, TOL)
    assert_same_weights(load(tmp / "two" / job / "checkpoint.pt")["model"], rank0)
    assert_same_metrics(tmp / "two" / job, tmp / "one" / job)
    summary = json.loads((tmp / "two" / job / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2


def test_only_rank_0_writes_and_reads_the_data(sweep2):
    tmp, dump = sweep2
    rank0 = json.loads((dump / "writes.rank0.json").read_text())
    rank1 = json.loads((dump / "writes.rank1.json").read_text())
    assert any(w.endswith("checkpoint.pt") for w in rank0)   # the probe sees writes
    assert rank1 == []
    assert sorted(p.name for p in (tmp / "two" / "0").iterdir()) == sorted(
        p.name for p in (tmp / "one" / "0").iterdir())
    assert json.loads((dump / "loads.rank0.json").read_text()) == ["synthetic"] * 4
    assert json.loads((dump / "loads.rank1.json").read_text()) == []


def test_resume_on_another_number_of_processes_is_refused(sweep2, gsgd_train_inproc, tmp_path):
    tmp, _ = sweep2
    run = tmp_path / "copy"
    shutil.copytree(tmp / "two" / "0", run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = gsgd_train_inproc(searchpath(tmp_path), *RUN, "model=mlp", "optimizer=gsgd",
                                       "train.iterations=30", "resume=true",
                                       f"hydra.run.dir={run}")
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "written by a run on 2 processes; resume it on 2" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_two_processes_resume_and_extend_a_run(sweep2, tmp_path):
    """Job 0 of the 2-process sweep continued to 30 iterations on 2 processes equals a
    30-iteration single-process run."""
    tmp, _ = sweep2
    run = tmp_path / "run"
    shutil.copytree(tmp / "two" / "0", run)
    extra = [searchpath(tmp_path), *RUN, "model=mlp", "optimizer=gsgd", "train.iterations=30"]
    torchrun([*extra, "resume=true", f"hydra.run.dir={run}"], tmp_path, tmp_path / "dump")
    ref = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", *extra,
                          f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=120,
                         env=env_for_subprocess(OMP_NUM_THREADS="1"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert_same_weights(load(run / "checkpoint.pt")["model"],
                        load(tmp_path / "one" / "checkpoint.pt")["model"], TOL)
    assert [m["iteration"] for m in metrics(run)] == [10, 20, 30]
    assert_same_metrics(run, tmp_path / "one")


def test_mutation_without_allreduce_fails(tmp_path):
    """Mutation check: each rank trains on its own share without all-reducing the gradients.
    The ranks' weights differ, and differ from the single-process run; the run itself stops at
    its first checkpoint, naming the problem."""
    dump = tmp_path / "dump"
    extra = [*RUN, "model=mlp", "optimizer=gsgd", f"hydra.run.dir={tmp_path / 'run'}"]
    torchrun(extra, tmp_path, dump, expect=1, GSGD_TEST_MUTATION="no_allreduce")
    rank0, rank1 = rank_weights(dump, "run", 0), rank_weights(dump, "run", 1)
    with pytest.raises(AssertionError):
        assert_same_weights(rank0, rank1, TOL)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "processes of this data-parallel run hold different weights" in summary["message"]
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# -- without a process group ---------------------------------------------------------------

def test_batch_size_must_divide_among_the_processes():
    from gsgd_cli.data.pipeline import DeviceData
    from gsgd_cli.train import Trainer, TrainSettings, UserError
    from gsgd_cli.train.distributed import Ranks

    data = DeviceData("t", torch.zeros(40, 1, 2, 2, dtype=torch.uint8), torch.zeros(40).long(),
                      torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.zeros(4).long(),
                      (1, 2, 2), 2, torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), False)
    model = torch.nn.Linear(4, 2)
    with pytest.raises(UserError, match=r"train.batch_size=10 for 3 processes.*multiple of 3"):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, "unused",
                TrainSettings(iterations=1, batch_size=10), ranks=Ranks(world_size=3))


@pytest.mark.parametrize("spec, job, rank, gpus, expected", [
    ("auto", None, None, 0, "cpu"),
    ("auto", None, None, 4, "cuda"),
    ("auto", 0, None, 4, "cuda:0"),
    ("auto", 5, None, 4, "cuda:1"),
    ("cuda", 7, None, 4, "cuda:3"),
    ("auto", 6, None, 3, "cuda:0"),
    ("cuda:2", 5, None, 4, "cuda:2"),
    ("cpu", 5, None, 4, "cpu"),
    ("auto", 5, 3, 4, "cuda:3"),      # a data-parallel rank: its local rank, not the job
    ("auto", None, 5, 2, "cuda:1"),
])
def test_jobs_and_ranks_get_gpus_in_turn(spec, job, rank, gpus, expected):
    """Job i of a sweep on GPU i mod (number of GPUs); rank k of a data-parallel run on GPU
    k mod (number of GPUs); the number of GPUs is given (no GPU here)."""
    from gsgd_cli.runner.environment import resolve_device
    from gsgd_cli.train.distributed import SINGLE, Ranks

    ranks = SINGLE if rank is None else Ranks(rank=rank, world_size=8, local_rank=rank,
                                              local_world_size=8, distributed=True)
    assert resolve_device(spec, ranks=ranks, job_num=job, gpus=gpus) == torch.device(expected)


def test_device_errors_are_one_line():
    from gsgd_cli.runner.environment import resolve_device
    from gsgd_cli.train import UserError
    from gsgd_cli.train.distributed import Ranks

    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda", gpus=0)
    shared = Ranks(rank=1, world_size=2, local_rank=1, local_world_size=2, distributed=True)
    with pytest.raises(UserError, match="all 2 processes of this node on one GPU"):
        resolve_device("cuda:1", ranks=shared, gpus=2)


@pytest.mark.parametrize("device, params, parallel, cores, omp, expected", [
    ("cpu", 10, 1, 16, None, 1),             # small model on the CPU: one thread
    ("cpu", 10**7, 1, 16, None, None),       # torch's default
    ("cpu", 10**7, 4, 16, None, 4),          # 4 jobs or ranks on 16 cores
    ("cuda", 10, 3, 16, None, 5),
    ("cuda", 10, 32, 16, None, 1),
    ("cpu", 10**7, 4, 16, "2", None),        # OMP_NUM_THREADS set by the launcher or the user
])
def test_cpu_threads_are_divided_between_parallel_jobs(device, params, parallel, cores, omp,
                                                       expected):
    from gsgd_cli.runner.environment import auto_threads

    env = {} if omp is None else {"OMP_NUM_THREADS": omp}
    assert auto_threads(torch.device(device), params, parallel=parallel, cores=cores,
                        environ=env) == expected


@pytest.mark.parametrize("launcher, expected", [
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": 3}, 3),
    ({"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
      "n_jobs": -1}, os.cpu_count()),
    ({"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}, 1),
])
def test_parallel_jobs_of_a_launcher(launcher, expected):
    from gsgd_cli.runner.environment import parallel_jobs

    assert parallel_jobs(launcher) == expected


def test_sweep_jobs_pass_their_number_and_parallelism(gsgd_train_inproc, tmp_path, monkeypatch):
    """What `run()` gets in each job of a sweep: the job number (its GPU) and how many jobs run
    at once (its CPU threads)."""
    import gsgd_cli.runner.session as session   # hands each job to `run()`

    seen = []
    real = session.run

    def spy(cfg, run_dir, **kwargs):
        seen.append((kwargs["job_num"], kwargs["parallel"]))
        return real(cfg, run_dir, **kwargs)

    monkeypatch.setattr(session, "run", spy)
    code, out, err = gsgd_train_inproc("-m", "experiment=smoke", "seed=0,1,2",
                                       f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert code == 0, out + err
    assert seen == [(0, 1), (1, 1), (2, 1)]


@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
      "GROUP_RANK": "0"}, (1, 2, 0, "env://", "torchrun")),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, None),   # sbatch script
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_NODEID": "1",
      "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n[3-4]",
      "MASTER_PORT": "1234"}, (3, 4, 1, "tcp://n3:1234", "slurm")),
])
def test_launch_from_environment(env, expected, tmp_path, monkeypatch):
    """torchrun's variables, or a SLURM job step's (the rendezvous host from a fake
    `scontrol show hostnames`); an sbatch script or a one-task step is a single process."""
    from gsgd_cli.train.distributed import from_environment

    scontrol = tmp_path / "scontrol"
    scontrol.write_text("#!/bin/sh\n[ \"$3\" = 'n[3-4]' ] && printf 'n3\\nn4\\n'\n")
    scontrol.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    launch = from_environment(env)
    assert (None if launch is None else (launch.rank, launch.world_size, launch.node,
                                         launch.init_method, launch.launcher)) == expected


def test_slurm_step_without_master_port_derives_one_port_for_all_tasks(tmp_path, monkeypatch):
    from gsgd_cli.train.distributed import from_environment

    (tmp_path / "scontrol").write_text("#!/bin/sh\necho node7\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    base = {"SLURM_STEP_NUM_TASKS": "2", "SLURM_JOB_ID": "99", "SLURM_STEP_ID": "1",
            "SLURM_STEP_NODELIST": "node7"}
    methods = {from_environment({**base, "SLURM_PROCID": str(r)}).init_method for r in (0, 1)}
    assert len(methods) == 1 and methods.pop().startswith("tcp://node7:")


def test_sync_bn_on_the_cpu_is_one_line(gsgd_train_inproc):
    code, out, err = gsgd_train_inproc("experiment=smoke", "device=cpu", "distributed.sync_bn=true")
    assert code == 2
    assert "distributed.sync_bn=true needs CUDA" in err and "Traceback" not in err


def test_augmentation_of_shares_equals_the_whole_batch():
    """Each rank's share of a batch gets the crops and flips a single process gives those rows."""
    from gsgd_cli.data.pipeline import random_crop_flip

    x = torch.rand(12, 3, 8, 8, dtype=torch.float64)
    whole = random_crop_flip(x, torch.Generator().manual_seed(3))
    parts = [random_crop_flip(x[k * 4:(k + 1) * 4], torch.Generator().manual_seed(3),
                              share=(k, 3)) for k in range(3)]
    assert torch.equal(torch.cat(parts), whole)
    wrong = random_crop_flip(x[4:8], torch.Generator().manual_seed(3))   # mutation: no share
    assert not torch.equal(wrong, whole[4:8])


# -- preemption through Hydra's submitit launcher --------------------------------------------

PREEMPT = ["data=synthetic", "optimizer=sgd", "optimizer.momentum=0.9", "dtype=float64",
           "train.iterations=6000", "train.batch_size=16", "train.eval_every=1500",
           "train.checkpoint_every=100", "train.tensorboard=false"]


def submitit_tasks(sweep: Path) -> list[int]:
    """Process ids of the submitit tasks running jobs of `sweep`."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "submitit.core._submit" in cmd and str(sweep) in cmd:
            found.append(int(proc.name))
    return found


def preempt_first_job(tmp_path: Path, sweep: Path, extra: list[str]) -> tuple[str, str]:
    """Start a one-job submitit_local sweep, send submitit's preemption signal (SIGUSR2) to
    its task(s) once the job has a checkpoint, and wait for the sweep to end."""
    cmd = [sys.executable, "-m", "gsgd_cli", "train", "-m", "hydra/launcher=submitit_local",
           *PREEMPT, *extra, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env=env_for_subprocess(OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not (sweep / "0" / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        tasks = submitit_tasks(sweep)
        assert tasks, "no submitit task found"
        for pid in tasks:
            os.kill(pid, signal.SIGUSR2)
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
            proc.communicate()
        for pid in submitit_tasks(sweep):   # submitit's tasks live in sessions of their own
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    logs = "".join(p.read_text() for p in sorted(sweep.glob(".submitit/*/*_log.*")))
    return out, logs


def test_a_preempted_submitit_job_is_requeued_and_ends_as_an_uninterrupted_one(
        tmp_path, gsgd_train_inproc):
    """submitit_local: SIGUSR2 (what SLURM sends through submitit before a time limit or on
    preemption) stops the job at the end of an iteration with a checkpoint; submitit requeues
    it; the requeued job continues the run and ends with the uninterrupted run's weights and
    metrics, bit for bit."""
    sweep = tmp_path / "sweep"
    out, logs = preempt_first_job(tmp_path, sweep, ["seed=0"])
    assert "gsgd train: 1 of 1 jobs completed" in out
    assert "SIGUSR2 from the scheduler in job" in logs and "Requeued job" in logs
    stopped_at = int(logs.split("interrupted (SIGUSR2) at iteration ")[1].split(";")[0])
    assert f"the checkpoint has iteration {stopped_at};" in logs   # written at the signal
    resumed_at = int(logs.split("from its checkpoint at iteration ")[1].split()[0])
    assert 0 < resumed_at == stopped_at < 6000
    code, ref_out, ref_err = gsgd_train_inproc(*PREEMPT, "seed=0",
                                               f"hydra.run.dir={tmp_path / 'ref'}")
    assert code == 0, ref_err
    assert_same_weights(load(sweep / "0" / "checkpoint.pt")["model"],
                        load(tmp_path / "ref" / "checkpoint.pt")["model"])
    assert metrics(sweep / "0") == [{**m, "elapsed_s": n["elapsed_s"]} for m, n in
                                    zip(metrics(tmp_path / "ref"), metrics(sweep / "0"),
                                        strict=True)]
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_a_preempted_two_task_submitit_job_resumes_on_two_processes(tmp_path,
                                                                     gsgd_train_inproc):
    """The same with `tasks_per_node=2`: a data-parallel job of two processes; both get the
    signal, stop at the same iteration, rank 0 checkpoints, and the requeued job ends with the
    single-process run's weights (1e-10)."""
    sweep = tmp_path / "sweep"
    out, logs = preempt_first_job(tmp_path, sweep, ["seed=0",
                                                    "hydra.launcher.tasks_per_node=2"])
    assert "gsgd train: 1 of 1 jobs completed" in out
    assert "Requeued job" in logs and "from its checkpoint at iteration" in logs
    assert json.loads((sweep / "0" / "summary.json").read_text())["world_size"] == 2
    code, _, ref_err = gsgd_train_inproc(*PREEMPT, "seed=0", f"hydra.run.dir={tmp_path / 'ref'}")
    assert code == 0, ref_err
    assert_same_weights(load(sweep / "0" / "checkpoint.pt")["model"],
                        load(tmp_path / "ref" / "checkpoint.pt")["model"], TOL)


# -- killed and stopped 2-process runs (slow) ------------------------------------------------

LONG = ["data=synthetic", "model=mlp", "optimizer=gsgd", "dtype=float64",
        "train.iterations=1500", "train.batch_size=16", "train.eval_every=500",
        "train.checkpoint_every=50", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def long_two(tmp_path_factory):
    """The LONG run, uninterrupted, on 2 processes."""
    tmp = tmp_path_factory.mktemp("long")
    torchrun([*LONG, f"hydra.run.dir={tmp / 'run'}"], tmp, tmp / "dump")
    return tmp / "run"


def rank_pid(agent: int, rank: int) -> int:
    """The process of `rank` below torchrun's agent."""
    for pid in descendants(agent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"GSGD_TEST_DUMP" in b" ".join(environ):
            return pid
    raise AssertionError(f"rank {rank} not found")


def interrupt_after_first_checkpoint(tmp_path: Path, run: Path, how: int) -> tuple[int, str]:
    proc = start_torchrun([*LONG, f"hydra.run.dir={run}"], tmp_path, tmp_path / "dump")
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.01)
        if how == signal.SIGKILL:
            kill_tree(proc.pid)          # the agent and both ranks, at once
        else:
            os.kill(rank_pid(proc.pid, 1), how)   # rank 1 alone
        code, out, err = finish(proc, timeout=120)
    finally:
        kill_tree(proc.pid)
    return code, err


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_same_weights(long_two, tmp_path):
    run = tmp_path / "run"
    interrupt_after_first_checkpoint(tmp_path, run, signal.SIGKILL)
    assert load(run / "checkpoint.pt")["iteration"] < 1500
    assert not (run / "summary.json").exists()
    torchrun([*LONG, "resume=true", f"hydra.run.dir={run}"], tmp_path, tmp_path / "dump2")
    assert_same_weights(load(run / "checkpoint.pt")["model"],
                        load(long_two / "checkpoint.pt")["model"])
    assert metrics(run)[-1] | {"elapsed_s": 0} == metrics(long_two)[-1] | {"elapsed_s": 0}


@pytest.mark.slow
def test_sigterm_stops_both_processes_at_one_iteration_with_a_checkpoint(long_two, tmp_path):
    """SIGTERM to rank 1 alone: both ranks agree on the iteration to stop at, rank 0
    checkpoints there, and the resumed run ends bit for bit as the uninterrupted one."""
    run = tmp_path / "run"
    code, err = interrupt_after_first_checkpoint(tmp_path, run, signal.SIGTERM)
    assert code != 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted", summary
    stopped = load(run / "checkpoint.pt")["iteration"]
    assert f"at iteration {stopped}; the checkpoint has iteration {stopped}" in summary["message"]
    torchrun([*LONG, "resume=true", f"hydra.run.dir={run}"], tmp_path, tmp_path / "dump2")
    assert_same_weights(load(run / "checkpoint.pt")["model"],
                        load(long_two / "checkpoint.pt")["model"])


def test_scaling_out_commands_in_the_readme_compose():
    """Every `gsgd train` command of the README's "Scaling out" section (torchrun, srun,
    joblib and submitit sweeps) composes with the real configs and launchers."""
    import re
    import shlex

    from hydra import compose, initialize_config_dir

    text = (REPO / "README.md").read_text()
    section = text.split("### Scaling out", 1)[1].split("\n### ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command.split("#", 1)[0])
            if "train" in words and ("gsgd" in words or "gsgd_cli" in words):
                commands.append([w for w in words[words.index("train") + 1:] if w != "-m"])
    assert len(commands) == 6
    for overrides in commands:
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", return_hydra_config=True,
                          overrides=[o.split(",")[0] if "=" in o and not o.startswith("hydra")
                                     else o for o in overrides])
        assert cfg.train.batch_size > 0, overrides


def test_runs_recorded_before_the_new_settings_resume_with_their_defaults():
    """A checkpoint written before `distributed.sync_bn` (or `train.cuda_graphs`) existed was
    trained with their defaults: resuming it with them is no change; with another value it is."""
    from gsgd_cli.train.rundir import config_differences

    old = {"train": {"epochs": 1}}
    new = {"train": {"epochs": 1, "cuda_graphs": False}, "distributed": {"sync_bn": False}}
    assert config_differences(old, new) == []
    changed = {"train": {"epochs": 1, "cuda_graphs": False}, "distributed": {"sync_bn": True}}
    assert config_differences(old, changed) == ["distributed.sync_bn: false -> true"]
