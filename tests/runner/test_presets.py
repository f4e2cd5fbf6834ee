"""The paper presets in conf/experiment/: they hold the paper's settings, and each one runs as
documented (`gsgd train experiment=NAME`) in a smoke mode on generated data."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gsgd_cli.testing.fake_data import write_fake_cifar, write_fake_idx

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "conf" / "experiment"
PRESETS = ["fig4", "fig4_cpu", "fig5", "fig5_fmnist", "fig7", "fig8", "smoke", "table1",
           "table1_he"]
README = {"fig4": "fig4", "fig4_cpu": "fig4", "fig5": "fig5", "fig5_fmnist": "fig5",
          "fig7": "fig7_fig8",
          "fig8": "fig7_fig8", "table1": "table1", "table1_he": "table1"}  # smoke: no paper result
LAMBDA_GRID = sorted(m * 10.0 ** -a for m in (0.1, 0.2, 0.5) for a in (3, 4, 5, 6))


def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides),
                             return_hydra_config=True)


def sweep_params(cfg) -> dict[str, list[str]]:
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_every_preset_is_listed_here():
    assert sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")) == PRESETS


@pytest.mark.parametrize("name", PRESETS)
def test_header_names_the_command_and_package(name):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# @package _global_"
    assert re.search(rf"^#.*gsgd train experiment={name}(\s|$)", text, re.M), text[:400]
    if name in README:
        readme = REPO / "experiments" / README[name] / "README.md"
        assert f"gsgd train experiment={name}" in readme.read_text()


def test_table1_is_the_papers_setting():
    cfg = compose("experiment=table1")
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert sweep_params(cfg) == {"seed": ["0", "1", "2", "3", "4"], "data": ["cifar10", "cifar100"],
                                 "model": ["plain34", "resnet34"], "optimizer": ["sgd", "gsgd"]}
    assert cfg.optimizer.lr == 1.0 and cfg.train.iterations == 64000 and cfg.train.batch_size == 128
    assert (cfg.schedule.name, cfg.schedule.unit, list(cfg.schedule.milestones), cfg.schedule.gamma) \
        == ("multistep", "iteration", [32000, 48000], 0.1)
    for optimizer in ("sgd", "gsgd"):  # what each job of the sweep gets
        for data in ("cifar10", "cifar100"):
            job = compose("experiment=table1", f"optimizer={optimizer}", f"data={data}")
            assert job.optimizer.lr == 1.0 and job.optimizer.momentum == 0.0
            assert job.optimizer.weight_decay == 0.0 and job.data.augment is True
            # appendix 11.4: "normalize each pixel value to [0,1]"; colour (Figure 5 is grey)
            assert job.data.normalize == "unit" and job.data.grayscale is False
    assert list(compose("experiment=table1", "model=plain34").model.blocks) == [6, 8, 12, 6]


def test_table1_he_is_table1_with_he_et_al_momentum_and_weight_decay():
    cfg, table1 = compose("experiment=table1_he"), compose("experiment=table1")
    assert sweep_params(cfg) == sweep_params(table1)
    for optimizer in ("sgd", "gsgd"):
        job = compose("experiment=table1_he", f"optimizer={optimizer}", "data=cifar10")
        ref = compose("experiment=table1", f"optimizer={optimizer}", "data=cifar10")
        assert (job.optimizer.lr, job.optimizer.momentum, job.optimizer.weight_decay) == \
            (1.0, 0.9, 1e-4)                        # the paper's lr; He et al.'s other two
        for key in ("data", "model", "schedule", "train"):
            assert job[key] == ref[key], key
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]
    assert sweep_dir.startswith("multirun/table1_he/")

def test_fig4_is_the_papers_setting():
    cfg = compose("experiment=fig4")
    assert sweep_params(cfg) == {"seed": ["0", "1", "2", "3", "4"],
                                 "model.width": [str(2 ** k) for k in range(3, 11)],
                                 "optimizer": ["sgd", "gsgd"]}
    assert (cfg.data.name, cfg.data.size, cfg.model.name, cfg.model.depth, cfg.model.bias) == \
        ("fashion_mnist", 7, "mlp", 2, False)
    assert cfg.train.epochs == 100 and cfg.train.iterations is None and cfg.train.batch_size == 64
    for optimizer in ("sgd", "gsgd"):
        assert compose("experiment=fig4", f"optimizer={optimizer}").optimizer.lr == 0.01
    cpu = compose("experiment=fig4_cpu")
    assert cpu.train.epochs == 15 and sweep_params(cpu)["seed"] == ["0", "1", "2"]
    assert sweep_params(cpu)["model.width"] == sweep_params(cfg)["model.width"]


def test_fig5_is_the_papers_setting():
    cfg = compose("experiment=fig5")
    params = sweep_params(cfg)
    assert params["data"] == ["mnist", "cifar10"] and params["optimizer"] == ["sgd", "path_sgd", "gsgd"]
    assert [float(x) for x in params["optimizer.lr"]] == [10.0 ** -a for a in range(11)]
    assert (cfg.model.width, cfg.model.depth, cfg.train.batch_size) == (64, 5, 64)
    assert params["seed"] == ["0", "1", "2", "3", "4"]      # section 5: 5 trials
    from gsgd_cli.data.pipeline import describe

    for data, shape in (("mnist", (1, 28, 28)), ("cifar10", (1, 32, 32))):
        job = compose("experiment=fig5", f"data={data}")
        # appendix 11.7: "the input images of gray scale are normalized to [0, 1]"
        assert job.data.normalize == "unit" and job.data.grayscale is True
        assert describe(job.data)[0] == shape


def test_fig5_fmnist_is_the_fig5_protocol_on_fashion_mnist_28():
    cfg, paper = compose("experiment=fig5_fmnist"), compose("experiment=fig5")
    params = sweep_params(cfg)
    assert params == {"seed": ["0"], "optimizer": ["sgd", "path_sgd", "gsgd"],
                      "optimizer.lr": sweep_params(paper)["optimizer.lr"]}
    assert (cfg.data.name, cfg.data.size, cfg.data.normalize) == ("fashion_mnist", 28, "unit")
    assert cfg.data.val_size == 10000            # the rate is chosen on held-out images
    for key in ("model", "train.batch_size", "train.epochs", "data.augment"):
        assert OmegaConf.select(cfg, key) == OmegaConf.select(paper, key), key


def test_fig7_fig8_arms_and_lambda_grid():
    params = sweep_params(compose("experiment=fig7"))
    assert params["+experiment/reg"] == ["sgd_wd", "gsgd_bpr"]
    assert params["model"] == ["plain34", "resnet34"]     # the figures' two rows
    assert "seed" not in params                           # one seed: this stage only chooses
    assert sorted(float(x) for x in params["reg_lambda"]) == pytest.approx(LAMBDA_GRID)
    sgd = compose("experiment=fig7", "+experiment/reg=sgd_wd", "reg_lambda=2e-5")
    gsgd = compose("experiment=fig7", "+experiment/reg=gsgd_bpr", "reg_lambda=2e-5")
    assert sgd.optimizer._target_.endswith("make_sgd") and sgd.optimizer.weight_decay == 2e-5
    assert gsgd.optimizer._target_.endswith("GSGD") and gsgd.optimizer.bpr == 2e-5
    assert gsgd.optimizer.weight_decay == 0.0 and "bpr" not in sgd.optimizer
    for cfg in (sgd, gsgd):
        assert cfg.data.val_size == 5000          # lambda is chosen on held-out images
        assert cfg.optimizer.lr == 1.0 and cfg.train.iterations == 64000
        assert (cfg.data.name, list(cfg.model.blocks)) == ("cifar10", [3, 4, 6, 3])
        assert cfg.data.normalize == "unit"
    fig8 = compose("experiment=fig8", "+experiment/reg=gsgd_bpr", "lambda_bpr=5e-6", "lambda_wd=1e-4")
    assert fig8.data.name == "cifar100" and fig8.optimizer.bpr == 5e-6
    assert fig8.data.normalize == "unit" and fig8.data.val_size == 0
    # the four curves of Figures 7/8, 5 seeds each
    assert sweep_params(fig8) == {"seed": ["0", "1", "2", "3", "4"],
                                  "+experiment/reg": ["sgd", "sgd_wd", "gsgd", "gsgd_bpr"]}
    lam = ("lambda_wd=1e-4", "lambda_bpr=5e-6")
    plain_sgd = compose("experiment=fig8", "+experiment/reg=sgd", *lam)
    plain_gsgd = compose("experiment=fig8", "+experiment/reg=gsgd", *lam)
    assert plain_sgd.optimizer._target_.endswith("make_sgd")
    assert plain_sgd.optimizer.weight_decay == 0.0 and plain_sgd.optimizer.momentum == 0.0
    assert plain_gsgd.optimizer._target_.endswith("GSGD")
    assert (plain_gsgd.optimizer.bpr, plain_gsgd.optimizer.weight_decay) == (0.0, 0.0)


def test_fig8_without_lambdas_is_one_clear_error(tmp_path):
    from gsgd_cli.runner.job import run
    from gsgd_cli.train import UserError

    cfg = compose("experiment=fig8", "+experiment/reg=sgd_wd")
    with pytest.raises(UserError, match=r"No value for lambda_wd .*lambda_wd=VALUE"):
        run(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), tmp_path)


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root, "cifar10", n_per_batch=8, n_test=16)
    write_fake_cifar(root, "cifar100", n_per_batch=8, n_test=16)
    write_fake_idx(root / "MNIST" / "raw", n_train=32, n_test=16)
    write_fake_idx(root / "fmnist_gz", n_train=32, n_test=16, gz=True)
    return root


# (preset, smoke overrides, jobs expected): the paper's sweep narrowed on the command line, tiny
# models where the paper's would be slow, a couple of iterations on generated files.
SMOKE = {
    "table1": (["model=plain_tiny,resnet_tiny", "seed=0", "train.iterations=2"], 8),
    "fig4": (["model.width=8,16", "seed=0", "train.epochs=1"], 4),
    "fig4_cpu": (["model.width=8", "train.epochs=1"], 6),
    "fig5": (["optimizer.lr=0.01", "seed=0", "train.iterations=2"], 6),
    # stage 2 of the protocol: one optimizer at its chosen rate, three seeds (the command line
    # wins over the preset's sweep of optimizers and rates)
    "fig5_fmnist": (["optimizer=gsgd", "optimizer.lr=0.05", "seed=0,1,2", "train.iterations=2",
                     "data.val_size=8"], 3),
    "fig7": (["model=resnet_tiny", "reg_lambda=1e-4", "train.iterations=2", "data.val_size=8"],
             2),
    "fig8": (["model=resnet_tiny", "lambda_wd=1e-4", "lambda_bpr=1e-5", "seed=0",
              "train.iterations=2"], 4),
    "table1_he": (["model=resnet_tiny", "data=cifar10", "seed=0", "train.iterations=2"], 2),
    "smoke": ([], 0),  # a single run, not a sweep
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_in_smoke_mode(name, fake_data, tmp_path):
    overrides, jobs = SMOKE[name]
    data = [] if name == "smoke" else [f"data.root={fake_data}"]  # smoke: synthetic data
    if name.startswith("fig4") or name == "fig5_fmnist":  # Fashion-MNIST: the gzip files as
        # the Debian package has them
        data.append(f"data.system_dir={fake_data / 'fmnist_gz'}")
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "gsgd_cli", "train", f"experiment={name}", *overrides, *data,
         "train.batch_size=8", "train.tensorboard=false", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if jobs == 0:
        run_dirs = [tmp_path / "run"]
    else:
        assert f"{jobs} of {jobs} jobs completed" in proc.stdout
        run_dirs = [tmp_path / "sweep" / str(job) for job in range(jobs)]
    for run_dir in run_dirs:
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed"
        if name == "fig7":
            assert summary["val_size"] == 8 and summary["final_val_acc"] is not None
        assert summary["config"]["experiment"] == name
        if name == "fig5_fmnist":
            assert summary["config"]["optimizer"] == "gsgd" and summary["optimizer"]["lr"] == 0.05
            assert summary["val_size"] == 8
        if name == "fig5":   # MLP [784 or 1024 (CIFAR-10 in grey), 64 x 5, 10], no biases
            inputs = {"mnist": 784, "cifar10": 1024}[summary["config"]["data"]]
            assert summary["num_parameters"] == inputs * 64 + 4 * 64 * 64 + 64 * 10
    if jobs:
        cfg = OmegaConf.load(run_dirs[0] / ".hydra" / "config.yaml")
        assert name.split("_")[0] in cfg.tags


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "smoke"])
def test_long_presets_checkpoint_during_each_job(name):
    # a killed sweep resumes its running jobs from their last checkpoint instead of from zero
    cfg = compose(f"experiment={name}")
    every = cfg.train.checkpoint_every
    assert every and every > 0, f"{name}: checkpoints only at the end of each job"
    total = cfg.train.iterations or cfg.train.epochs * (50000 // cfg.train.batch_size)
    assert every < total / 2, (name, every, total)


def sweep_size(name: str) -> int:
    size = 1
    for values in sweep_params(compose(f"experiment={name}")).values():
        size *= len(values)
    return size


@pytest.mark.parametrize("name", [p for p in PRESETS if p not in ("smoke", "fig4_cpu")])
def test_job_counts_in_header_and_readme_are_the_sweeps(name):
    """The number of jobs the preset's header and the README's reproduction table give is the
    number its sweep composes to (seeds x data x models x ...)."""
    header = (EXPERIMENTS / f"{name}.yaml").read_text()
    stated = re.search(r"(\d+) jobs", header)
    assert stated, f"{name}: the header gives no job count"
    assert int(stated.group(1)) == sweep_size(name)
    rows = [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("| ") and f"`gsgd train experiment={name}" in line
            and re.search(rf"experiment={name}[` ]", line)]
    assert rows, f"{name}: no row in the README's reproduction table"
    jobs = rows[0].strip().strip("|").split("|")[2].strip()   # paper result | command | jobs
    assert int(re.match(r"\d+", jobs).group()) == sweep_size(name), rows[0]
    readme = (REPO / "experiments" / README[name] / "README.md").read_text()
    assert re.search(rf"(= {sweep_size(name)}\b|\b{sweep_size(name)} jobs)", readme), name


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "smoke"])
def test_docs_name_the_dropped_partial_batch(name):
    # D8: the last partial batch of every epoch is dropped; the preset and its README say so
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    parent = re.search(r"^defaults:\n  - (\w+)$", text, re.M)   # fig4_cpu, table1_he
    if parent and parent.group(1) in PRESETS:
        text = (EXPERIMENTS / f"{parent.group(1)}.yaml").read_text()
    assert "partial batch" in text, name
    assert "partial batch" in (REPO / "experiments" / README[name] / "README.md").read_text()
