"""`gsgd train` end to end in subprocesses, with the real conf/ and real loaders."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsgd_cli.testing.fake_data import write_fake_cifar, write_fake_idx

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["data=synthetic", "train.iterations=12", "train.batch_size=16", "train.eval_every=6"]
METRIC_KEYS = {"iteration", "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
               "elapsed_s"}


def needs_gsgd():
    return pytest.importorskip("gsgd_cli.optim.gsgd", reason="G-SGD is not in yet")


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def one_error_line(proc, code=2):
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_default_config_is_the_paper_setting(compose_train):
    cfg = compose_train()
    assert cfg.data.name == "fashion_mnist" and cfg.data.size == 7
    assert cfg.model.name == "mlp" and (cfg.model.width, cfg.model.depth, cfg.model.bias) == (64, 2, False)
    assert cfg.optimizer._target_ == "gsgd_cli.optim.gsgd.GSGD" and cfg.optimizer.lr == 0.01
    assert cfg.train.batch_size == 64 and cfg.schedule.name == "constant"


def test_synthetic_end_to_end(gsgd_train, tmp_path):
    needs_gsgd()  # the default optimizer
    proc = ok(gsgd_train(*SYNTH))
    run = tmp_path / "run"
    out = proc.stdout.strip().splitlines()
    assert out[-1].startswith("gsgd train: completed 12 iterations")
    assert "test_acc=" in out[-1] and "train_loss=" in out[-1] and str(run) in out[-1]
    assert "it/s" not in proc.stderr  # no progress bar without a terminal
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [6, 12] and set(metrics[0]) == METRIC_KEYS
    s = summary(run)
    assert s["status"] == "completed" and s["final_test_acc"] == metrics[-1]["test_acc"]
    assert s["config"] == {"data": "synthetic", "model": "mlp", "optimizer": "gsgd",
                           "schedule": "constant"}
    for key in ("best_test_acc", "final_train_loss", "wall_time_s", "seed", "git_commit",
                "torch_version", "device"):
        assert key in s
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 12 and {"model", "optimizer", "data_rng", "torch_rng"} <= set(state)
    assert (run / ".hydra" / "config.yaml").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert METRIC_KEYS - {"iteration"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("test_acc")] == [6, 12]
    assert acc.Scalars("test_acc")[-1].value == pytest.approx(metrics[-1]["test_acc"])


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_in_root(gsgd_train, tmp_path, name):
    folder = "MNIST" if name == "mnist" else "FashionMNIST"
    write_fake_idx(tmp_path / "data" / folder / "raw", n_train=64, n_test=32)
    system = [] if name == "mnist" else ["data.system_dir=null"]
    proc = ok(gsgd_train(f"data={name}", f"data.root={tmp_path / 'data'}", *system,
                         "optimizer=sgd", "train.iterations=4", "train.batch_size=16"))
    assert "completed 4 iterations" in proc.stdout
    s = summary(tmp_path / "run")
    assert s["num_parameters"] == (49 if name == "fashion_mnist" else 784) * 64 + 64 * 64 + 64 * 10


def test_fashion_mnist_from_debian_gz_dir(gsgd_train, tmp_path):
    needs_gsgd()
    system = write_fake_idx(tmp_path / "debian", n_train=64, n_test=32, gz=True)
    proc = ok(gsgd_train(f"data.root={tmp_path / 'nothing'}", f"data.system_dir={system}",
                         "train.epochs=2"))
    s = summary(tmp_path / "run")
    assert s["iterations"] == 2 and "completed 2 iterations (2 epochs)" in proc.stdout


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_generated_cifar_root(gsgd_train, tmp_path, name):
    write_fake_cifar(tmp_path / "data", name, n_per_batch=8, n_test=16)
    ok(gsgd_train(f"data={name}", f"data.root={tmp_path / 'data'}", "model=resnet_tiny",
                  "optimizer=sgd", "train.iterations=3", "train.batch_size=8"))
    s = summary(tmp_path / "run")
    assert s["status"] == "completed" and s["config"]["data"] == name
    assert s["num_parameters"] > 0 and s["iterations"] == 3


def test_resume_through_cli_matches_uninterrupted(gsgd_train, tmp_path):
    try:
        import gsgd_cli.optim.gsgd  # noqa: F401
        optimizer = ["optimizer=gsgd"]
    except ImportError:
        optimizer = ["optimizer=sgd", "optimizer.momentum=0.9"]
    base = ["data=synthetic", *optimizer, "train.batch_size=16", "dtype=float64",
            "data.augment=true", "data.shape=[3,8,8]", "train.checkpoint_every=4"]
    ok(gsgd_train(*base, "train.iterations=15", f"hydra.run.dir={tmp_path / 'full'}"))
    ok(gsgd_train(*base, "train.iterations=7", f"hydra.run.dir={tmp_path / 'part'}"))
    proc = ok(gsgd_train(*base, "train.iterations=15", "resume=true",
                         f"hydra.run.dir={tmp_path / 'part'}"))
    assert "completed 15 iterations" in proc.stdout
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for key in full:
        assert torch.equal(full[key], part[key]), key


def one_line(code, out, err, expected_code=2):
    assert code == expected_code, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_user_error_in_a_real_process_is_one_line_exit_2(gsgd_train):
    line = one_error_line(gsgd_train("data=synthetic", "device=gpu"))
    assert line == "gsgd train: error: Invalid device='gpu'. Must be auto, cpu, cuda or cuda:N."


def test_divergence_is_one_line(gsgd_train_inproc, tmp_path):
    line = one_line(*gsgd_train_inproc(*SYNTH, "optimizer=sgd", "optimizer.lr=1e12",
                                       "train.checkpoint_every=1"), expected_code=1)
    assert line.startswith("gsgd train: training diverged:") and "last good checkpoint" in line
    assert summary(tmp_path / "run")["status"] == "diverged"


@pytest.mark.parametrize("overrides, needle", [
    (["device=tpu"], "Invalid device='tpu'. Must be auto, cpu, cuda or cuda:N."),
    (["train.batch_size=0"], "Invalid train.batch_size=0. Must be a positive integer."),
    (["train.iterations=null", "train.epochs=-1"], "Invalid train.epochs=-1. Must be a positive integer."),
    (["model.width=0"], "model: Invalid MLP width=0. Must be a positive integer."),
    (["data=fashion_mnist", "data.size=10"], "Invalid data.size=10 for fashion_mnist. Must divide 28"),
    (["optimizer=sgd", "optimizer.lr=-1"], "optimizer: "),
    (["schedule=multistep", "schedule.milestones=[5,2]"], "Invalid schedule.milestones=[5, 2]"),
    (["dtype=float16"], "Invalid dtype='float16'. Must be float32 or float64."),
    (["resume=true"], "resume=true but there is no checkpoint at"),
])
def test_bad_values_give_one_line(gsgd_train_inproc, overrides, needle):
    base = [] if any(o.startswith("data=") for o in overrides) else ["data=synthetic"]
    line = one_line(*gsgd_train_inproc(*base, "train.iterations=2", "train.batch_size=16",
                                       *overrides))
    assert line.startswith("gsgd train: error: ") and needle in line, line


def test_missing_data_names_path_and_fix(gsgd_train_inproc, tmp_path):
    line = one_line(*gsgd_train_inproc("data=mnist", f"data.root={tmp_path / 'nowhere'}"))
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in line
    assert f"gsgd train data=mnist data.root={tmp_path / 'nowhere'} data.download=true" in line
    line = one_line(*gsgd_train_inproc(f"data.root={tmp_path / 'x'}",
                                       f"data.system_dir={tmp_path / 'y'}"))
    assert "Fashion-MNIST not found" in line and "apt-get install -y dataset-fashion-mnist" in line


def test_cuda_unavailable_message(gsgd_train_inproc):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    line = one_line(*gsgd_train_inproc("data=synthetic", "device=cuda"))
    assert "device=cuda but CUDA is not available" in line and "device=cpu" in line


def test_multirun_one_dir_per_job(gsgd_train, tmp_path):
    try:
        import gsgd_cli.optim.gsgd  # noqa: F401
        optimizers = "sgd,gsgd"  # the example sweep
    except ImportError:
        optimizers = "sgd"
    n = 4 * len(optimizers.split(","))
    proc = ok(gsgd_train("-m", *SYNTH, f"optimizer={optimizers}", "model.width=8,16", "seed=0,1",
                         "train.iterations=3"))
    jobs = sorted((p for p in (tmp_path / "sweep").iterdir() if p.is_dir()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == [str(i) for i in range(n)]
    seen = set()
    for job in jobs:
        s = summary(job)
        assert s["status"] == "completed" and s["run_dir"] == str(job)
        cfg = (job / ".hydra" / "overrides.yaml").read_text()
        seen.add(cfg)
        assert (job / "metrics.jsonl").is_file() and (job / "checkpoint.pt").is_file()
    assert len(seen) == n
    assert f"{n} of {n} jobs completed" in proc.stdout


def test_failing_job_does_not_damage_others(gsgd_train, tmp_path):
    proc = gsgd_train("-m", *SYNTH, "optimizer=sgd", "model.width=8,0,16")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "Invalid MLP width=0" in proc.stderr
    statuses = [summary(tmp_path / "sweep" / str(i))["status"] for i in range(3)]
    assert statuses == ["completed", "failed", "completed"]
    assert "2 of 3 jobs completed" in proc.stdout and "(failed)" in proc.stdout


def test_joblib_launcher(gsgd_train, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    ok(gsgd_train("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *SYNTH,
                  "optimizer=sgd", "seed=0,1"))
    results = [summary(tmp_path / "sweep" / str(i)) for i in range(2)]
    assert [r["seed"] for r in results] == [0, 1]
    assert all(r["status"] == "completed" for r in results)


def test_cfg_job_prints_config(gsgd_train):
    proc = ok(gsgd_train("--cfg", "job", "optimizer=sgd"))
    assert "_target_: gsgd_cli.optim.sgd.make_sgd" in proc.stdout and "batch_size: 64" in proc.stdout


def test_console_script_from_another_directory(tmp_path):
    """The installed `gsgd` entry point finds conf/ wherever it is started."""
    exe = shutil.which("gsgd", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("gsgd console script not installed")
    env = {k: v for k, v in os.environ.items() if k != "COMP_LINE"}
    proc = subprocess.run([exe, "train", "--cfg", "job", "model=resnet34"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "blocks:" in proc.stdout and "- 3" in proc.stdout


def test_shell_completion_sees_the_config_groups(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(COMP_LINE="gsgd train optimizer=", COMP_POINT="21", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", "-sc", "query=bash"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {"optimizer=sgd", "optimizer=gsgd"} <= set(proc.stdout.split())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_resume(gsgd_train, tmp_path):
    write_fake_cifar(tmp_path / "data", "cifar10", n_per_batch=16, n_test=32)
    base = ["data=cifar10", f"data.root={tmp_path / 'data'}", "model=resnet_tiny", "optimizer=sgd",
            "optimizer.momentum=0.9", "train.batch_size=16", "device=cuda", "dtype=float64"]
    ok(gsgd_train(*base, "train.iterations=9", f"hydra.run.dir={tmp_path / 'full'}"))
    ok(gsgd_train(*base, "train.iterations=4", f"hydra.run.dir={tmp_path / 'part'}"))
    ok(gsgd_train(*base, "train.iterations=9", "resume=true", f"hydra.run.dir={tmp_path / 'part'}"))
    assert summary(tmp_path / "full")["device"].startswith("cuda")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)["model"]
    part = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["model"]
    for key in full:  # cuDNN may pick different kernels: compare closely, not bitwise
        torch.testing.assert_close(full[key], part[key], rtol=1e-9, atol=1e-9)


def test_conf_found_from_a_plain_clone(tmp_path):
    """Without any install: a copy of the tree uses its own conf/ (found next to the package)."""
    clone = tmp_path / "clone"
    shutil.copytree(REPO / "gsgd_cli", clone / "gsgd_cli",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "conf", clone / "conf")
    train_yaml = clone / "conf" / "train.yaml"
    train_yaml.write_text(train_yaml.read_text().replace("\nseed: 0 ", "\nseed: 4321 "))
    env = {k: v for k, v in os.environ.items() if k != "COMP_LINE"}
    env["PYTHONPATH"] = str(clone)
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", "--cfg", "job"],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "seed: 4321" in proc.stdout


def test_diverged_job_in_a_sweep_is_reported_not_an_error(gsgd_train, tmp_path):
    proc = ok(gsgd_train("-m", *SYNTH, "optimizer=sgd", "optimizer.lr=0.01,1e12"))
    assert [summary(tmp_path / "sweep" / str(i))["status"] for i in range(2)] == ["completed", "diverged"]
    assert "1 of 2 jobs completed" in proc.stdout and "diverged: " in proc.stdout
    assert "training diverged" in proc.stderr


@pytest.mark.slow
def test_default_experiment_on_real_fashion_mnist(tmp_path):
    """`gsgd train` with no overrides: the paper's MLP on Fashion-MNIST 7x7, under 2 minutes."""
    needs_gsgd()
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    env = {k: v for k, v in os.environ.items() if k != "COMP_LINE"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    s = summary(tmp_path / "run")
    assert s["status"] == "completed" and s["wall_time_s"] < 120
    assert s["num_parameters"] == 49 * 64 + 64 * 64 + 64 * 10
    assert s["final_test_acc"] > 0.8


def test_smoke_experiment_preset(gsgd_train_inproc, tmp_path):
    code, out, err = gsgd_train_inproc("experiment=smoke", "optimizer=sgd")
    assert code == 0 and "completed 20 iterations" in out, err
    assert summary(tmp_path / "run")["config"]["experiment"] == "smoke"
