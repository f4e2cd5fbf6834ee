"""Issue 21, a researcher's first hour and daily use: what runs say while they run, paper
models outside their preset, small-budget presets, custom models, `gsgd eval` and the best
checkpoint, and the small things (`--version`, `train --help`, schedule hints)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gsgd_cli.testing.fake_data import write_fake_cifar, write_fake_idx
from gsgd_cli.train.progress import EarlyEstimate, duration, eval_line

REPO = Path(__file__).resolve().parents[2]
SYNTH = ["data=synthetic", "train.iterations=24", "train.batch_size=16", "train.eval_every=12",
         "train.tensorboard=false"]


class TinyNet(nn.Module):
    """A model a user writes: takes the input shape and class count, and its own width."""

    def __init__(self, input_shape, num_classes, width=8):
        super().__init__()
        self.width = width
        c, h, w = input_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, width, bias=False), nn.ReLU(),
                                 nn.Linear(width, num_classes, bias=False))

    def forward(self, x):
        return self.net(x)


def not_a_model(input_shape, num_classes):
    return 3


def ok(result):
    code, out, err = result
    assert code in (0, None), err[-3000:]
    return out, err


# -- point 2: runs talk while they run ---------------------------------------------------------

def test_one_line_per_evaluation_and_the_overrides_at_the_start(gsgd_train_inproc, tmp_path):
    out, _ = ok(gsgd_train_inproc(*SYNTH, "optimizer=sgd"))
    lines = out.splitlines()
    assert lines[0].startswith("gsgd train: overrides: ") and "optimizer=sgd" in lines[0]
    evals = [line for line in lines if line.startswith("gsgd train: epoch ")]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(evals) == len(metrics) == 2
    for line, m in zip(evals, metrics):
        assert f"(iteration {m['iteration']}/24)" in line
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert f"{key} {m[key]:.4g}" in line
        assert "elapsed " in line
    assert "ETA " in evals[0] and "ETA" not in evals[1]   # nothing left after the last one
    # the early estimate: measured over iterations 2..11, printed once, before evaluation 1
    estimate = [k for k, line in enumerate(lines) if "s per iteration over iterations 2-11" in line]
    assert len(estimate) == 1 and "the 13 left take about" in lines[estimate[0]]


def test_eval_line_and_estimate_units():
    line = eval_line({"iteration": 5, "epoch": 0.5, "lr": 0.01, "train_loss": 1.0,
                      "train_acc": 0.5, "test_loss": 2.0, "test_acc": 0.25, "elapsed_s": 3.0},
                     total=20, iterations_per_epoch=10, seconds_per_iteration=2.0)
    assert line == ("epoch 0.5/2 (iteration 5/20): train_loss 1 train_acc 0.5 test_loss 2 "
                    "test_acc 0.25 lr 0.01 elapsed 3.0s ETA 30.0s")
    assert (duration(59), duration(125), duration(7500)) == ("59.0s", "2m05s", "2h05m")
    now = [0.0]
    est = EarlyEstimate(start=100, total=1000, clock=lambda: now[0], after=10)
    seen = []
    for it in range(101, 115):
        now[0] += 0.5 if it > 101 else 7.0          # a slow first iteration is not counted
        seen.append(est.tick(it))
    lines = [s for s in seen if s]
    assert len(lines) == 1 and "measured 0.5 s per iteration over iterations 102-111" in lines[0]
    assert "the 889 left take about 7m24s" in lines[0]


def test_progress_bar_stays_at_the_end(gsgd_train):
    proc = gsgd_train(*SYNTH, "progress=true")
    assert proc.returncode == 0, proc.stderr
    last = proc.stderr.rstrip("\n").split("\r")[-1]
    assert "24/24" in last, repr(proc.stderr[-300:])     # not wiped at the end


def test_sweep_prints_jobs_done(gsgd_train, tmp_path):
    proc = gsgd_train("-m", *SYNTH, "optimizer=sgd", "seed=0,1", "train.iterations=4",
                      "train.eval_every=4")
    assert proc.returncode == 0, proc.stderr
    done = [line for line in proc.stdout.splitlines() if " jobs done in " in line]
    assert [line.split(": ", 1)[1].split(" jobs")[0] for line in done] == ["1 of 2", "2 of 2"]
    assert "gsgd train: job 1: epoch " in proc.stdout   # per-job progress lines say whose


def test_sweep_size_counts_preset_and_command_line():
    from gsgd_cli.runner.console import sweep_size

    assert sweep_size(["seed=0,1,2"], {"seed": "0,1", "optimizer": "sgd,gsgd"}) == 6
    assert sweep_size(["model.width=64"], {"model.width": "8,16", "seed": "0,1"}) == 2


# -- point 1: paper models outside their preset; small-budget presets --------------------------

def test_paper_model_outside_its_preset_says_so(gsgd_train_inproc):
    out, _ = ok(gsgd_train_inproc("model=plain34", "model.widths=[4,4,4,4]", "data=synthetic",
                                  "data.shape=[3,8,8]", "train.iterations=2",
                                  "train.batch_size=8", "train.tensorboard=false"))
    note = [line for line in out.splitlines() if "note: model=plain34" in line]
    assert len(note) == 1
    assert "not the paper's setting" in note[0] and "experiment=table1" in note[0]
    assert "experiment=small/table1" in note[0]


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_fake_cifar(root, "cifar10", n_per_batch=8, n_test=16)
    write_fake_cifar(root, "cifar100", n_per_batch=8, n_test=16)
    write_fake_idx(root / "fmnist_gz", n_train=48, n_test=16, gz=True)
    return root


SMALL = {"table1": 8, "fig4": 12, "fig5": 9, "fig7": 8, "fig8": 4}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_preset_runs_its_whole_sweep(name, fake_data, tmp_path):
    """Every small variant runs its sweep as written (here on generated files, 2 iterations a
    job); its header names its command and says which data it needs."""
    text = (REPO / "conf" / "experiment" / "small" / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# @package _global_"
    assert f"gsgd train experiment=small/{name}" in text
    if name in ("table1", "fig7", "fig8"):
        assert "Needs CIFAR-10" in text or "Needs CIFAR-100" in text
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    extra = ["data.val_size=8"] if name in ("fig5", "fig7") else []
    # Fashion-MNIST as the Debian package has it (gzip files), for the presets that use it
    fmnist = [f"data.system_dir={fake_data / 'fmnist_gz'}"] if name in ("fig4", "fig5") else []
    proc = subprocess.run(
        [sys.executable, "-m", "gsgd_cli", "train", f"experiment=small/{name}",
         f"data.root={fake_data}", *fmnist,
         "train.iterations=2", "train.batch_size=8", "train.tensorboard=false", *extra,
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    jobs = SMALL[name]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"{jobs} of {jobs} jobs completed" in proc.stdout
    assert f"{jobs} of {jobs} jobs done" in proc.stdout


def test_small_presets_keep_the_papers_protocol():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        def get(*o):
            return compose(config_name="train", overrides=list(o), return_hydra_config=True)

        for name in ("table1", "fig7", "fig8"):
            data = ["data=cifar10"] if name == "table1" else []   # table1 sweeps the data
            small, paper = get(f"experiment=small/{name}", *data), get(f"experiment={name}", *data)
            assert (small.optimizer.lr, small.train.batch_size, small.schedule.name,
                    small.schedule.gamma, small.data.augment) == \
                (paper.optimizer.lr, paper.train.batch_size, paper.schedule.name,
                 paper.schedule.gamma, paper.data.augment)
            its = small.train.iterations
            assert list(small.schedule.milestones) == [its // 2, its * 3 // 4]
        fig4 = get("experiment=small/fig4")
        assert (fig4.data.size, fig4.model.depth, fig4.model.bias, fig4.optimizer.lr) == (7, 2, False, 0.01)
        fig5 = get("experiment=small/fig5")
        assert (fig5.model.depth, fig5.model.width, fig5.data.normalize, fig5.data.val_size) == \
            (5, 64, "unit", 10000)


# -- point 3: your own model -------------------------------------------------------------------

def test_custom_model_by_import_path(gsgd_train_inproc, tmp_path):
    out, _ = ok(gsgd_train_inproc("model=custom", "model._target_=test_daily_use.TinyNet",
                                  "+model.width=12", *SYNTH))
    # synthetic data: inputs (1, 8, 8), 4 classes; width 12 from +model.width
    assert "G-SGD steps 100.0% of the 816 trainable parameters of TinyNet" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["num_parameters"] == 12 * 64 + 12 * 4


def test_custom_model_passes_only_what_the_constructor_takes():
    from gsgd_cli.models import build_model

    model = build_model({"name": "custom", "_target_": "torch.nn.Linear", "out_features": 3},
                        (1, 2, 2), 10)
    assert (model.in_features, model.out_features) == (4, 3)   # given values win
    net = build_model({"name": "custom", "_target_": "test_daily_use.TinyNet"}, (1, 3, 3), 5)
    assert net.width == 8 and net.net[-1].out_features == 5


@pytest.mark.parametrize("target, needle", [
    ("no_such_pkg.Net", "cannot import no_such_pkg"),
    ("test_daily_use.Missing", "has no 'Missing'"),
    ("test_daily_use.SYNTH", "not a class or function"),
    ("test_daily_use.not_a_model", "returned a int, not a torch.nn.Module"),
])
def test_custom_model_errors_are_one_line(gsgd_train_inproc, target, needle):
    code, out, err = gsgd_train_inproc("model=custom", f"model._target_={target}", *SYNTH)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and needle in lines[0], err


def test_custom_model_without_target_is_one_line(gsgd_train_inproc):
    code, _, err = gsgd_train_inproc("model=custom", *SYNTH)
    assert code == 2 and "model._target_" in err and "Traceback" not in err


# -- point 6: small things ---------------------------------------------------------------------

def gsgd(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gsgd_cli", *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_version():
    import gsgd_cli

    proc = gsgd("--version")
    assert proc.returncode == 0 and proc.stdout.startswith(f"gsgd {gsgd_cli.__version__}")


def test_train_help_names_groups_and_paper_presets():
    proc = gsgd("train", "--help")
    assert proc.returncode == 0
    for needle in ("experiment=table1", "experiment=fig4", "experiment=fig5", "experiment=fig7",
                   "experiment=fig8", "small/table1", "schedule: constant, exponential, multistep",
                   "model=custom"):
        assert needle in proc.stdout, needle


def test_single_milestone_number_is_one_milestone(gsgd_train_inproc, tmp_path):
    ok(gsgd_train_inproc(*SYNTH, "schedule=multistep", "schedule.unit=iteration",
                         "schedule.milestones=12", "schedule.gamma=0.5"))
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert lrs == [0.01, 0.005]   # the lr of the 12th step (index 11), then after milestone 12


@pytest.mark.parametrize("overrides, fix", [
    (["schedule.gamma=0.5"], "schedule=multistep or schedule=exponential"),
    (["schedule.milestones=[10]"], "schedule=multistep"),
    (["schedule=exponential", "schedule.milestones=[10]"], "schedule=multistep"),
])
def test_schedule_key_of_another_schedule_is_one_line(gsgd_train_inproc, overrides, fix):
    code, _, err = gsgd_train_inproc(*overrides, *SYNTH)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fix in lines[0], err


def test_schedule_keys_of_a_presets_schedule_pass():
    from gsgd_cli.runner.hints import check_train_overrides

    assert check_train_overrides(["experiment=table1", "schedule.gamma=0.2"]) is None
    assert check_train_overrides(["experiment=small/fig7", "schedule.milestones=[5]"]) is None
    assert check_train_overrides(["schedule=multistep", "schedule.gamma=0.2"]) is None


# -- point 7: evaluate a checkpoint; keep the best one -----------------------------------------

def test_eval_last_checkpoint_reproduces_the_logged_metrics(gsgd_train_inproc, tmp_path, capsys):
    from gsgd_cli.cli import eval as eval_cli

    ok(gsgd_train_inproc(*SYNTH, "data.val_size=32"))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert eval_cli.main([str(tmp_path / "run"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iteration"] == 24
    for key in ("test_loss", "test_acc", "val_loss", "val_acc"):
        assert result[key] == last[key], key


def test_keep_best_keeps_the_best_evaluation(gsgd_train_inproc, tmp_path, capsys):
    from gsgd_cli.cli import eval as eval_cli

    ok(gsgd_train_inproc(*SYNTH, "train.eval_every=4", "train.keep_best=test_loss",
                         "optimizer.lr=0.05"))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    best = min(metrics, key=lambda m: m["test_loss"])
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert (state["iteration"], state["metric"], state["value"]) == \
        (best["iteration"], "test_loss", best["test_loss"])
    assert eval_cli.main([str(tmp_path / "run"), "--checkpoint", "best", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["iteration"] == best["iteration"]
    assert result["test_loss"] == pytest.approx(best["test_loss"], abs=1e-6)


def test_eval_errors_are_one_line(gsgd_train_inproc, tmp_path, capsys):
    from gsgd_cli.cli import eval as eval_cli

    assert eval_cli.main([str(tmp_path)]) == 2
    assert "not a gsgd train run directory" in capsys.readouterr().err
    ok(gsgd_train_inproc(*SYNTH))
    assert eval_cli.main([str(tmp_path / "run"), "--checkpoint", "best"]) == 2
    assert "train.keep_best=METRIC" in capsys.readouterr().err
    code, _, err = gsgd_train_inproc(*SYNTH, "train.keep_best=val_acc", "overwrite=true")
    assert code == 2 and "data.val_size" in err


# -- point 8: TensorBoard ----------------------------------------------------------------------

def test_tensorboard_has_per_iteration_loss_lr_coverage_and_config(gsgd_train_inproc, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = [a for a in SYNTH if not a.startswith("train.tensorboard")]
    ok(gsgd_train_inproc(*args, "train.tensorboard=true", "train.sync_every=5",
                         "schedule=multistep", "schedule.unit=iteration",
                         "schedule.milestones=[10]", "schedule.gamma=0.5"))
    events = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0}).Reload()
    losses = events.Scalars("train_loss_iteration")
    assert [e.step for e in losses] == list(range(1, 25))
    rates = {e.step: e.value for e in events.Scalars("lr_iteration")}
    assert sorted(rates) == list(range(1, 25))
    assert rates[10] == pytest.approx(0.01) and rates[11] == pytest.approx(0.005)  # 11th step: index 10
    assert [e.step for e in events.Scalars("lr")] == [12, 24]
    assert events.Scalars("gsgd_coverage_share")[0].value == 1.0
    texts = events.Tensors("config/text_summary") + events.Tensors("gsgd_coverage/text_summary")
    assert len(texts) == 2
    assert b"chain block 1" in texts[1].tensor_proto.string_val[0]


def test_figure_4_and_5_presets_keep_tensorboard_on(compose_train):
    for name in ("fig4", "fig5", "fig5_fmnist", "small/fig4", "small/fig5"):
        assert compose_train(f"experiment={name}").train.tensorboard is True, name
    assert compose_train("experiment=fig4", "train.tensorboard=false").train.tensorboard is False


# -- points 4 and 5: reports and figures that never mislead ------------------------------------

def _report(*args, capsys):
    from gsgd_cli.cli.report import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_report_counts_distinct_seeds_and_says_which_repeat(tmp_path, capsys):
    from test_report import make_run, read_csv

    make_run(tmp_path / "a", seed=0, test_accs=(0.9,), train_losses=(0.1,))
    make_run(tmp_path / "a2", seed=0, test_accs=(0.8,), train_losses=(0.3,))   # seed 0 again
    make_run(tmp_path / "b", seed=1, test_accs=(0.6,), train_losses=(0.5,))
    code, out, err = _report(str(tmp_path), "--csv", str(tmp_path / "r.csv"), capsys=capsys)
    assert code == 0, err
    (row,) = read_csv(tmp_path / "r.csv")
    assert (row["n_seeds"], row["seeds"], row["n_runs"]) == ("2", "0 1", "3")
    # seed 0 averaged first (error 15%), then the mean and std over the two seeds
    assert float(row["final_test_error_mean"]) == pytest.approx((15.0 + 40.0) / 2)
    assert float(row["final_test_error_std"]) == pytest.approx(abs(40.0 - 15.0) / 2 ** 0.5)
    assert "2 (repeated: seed 0 x2)" in out


def _width_runs(root, epochs, losses):
    from test_report import make_run

    for (opt, seed), loss in losses.items():
        make_run(root / f"{opt}-{seed}-{epochs}", data="fashion_mnist", model="mlp",
                 optimizer=opt, seed=seed, train_losses=(1.0, loss),
                 test_accs=(0.5, 0.8 if opt == "sgd" else 0.81),
                 config_extra={"model.width": 16, "train.epochs": epochs})


def test_gap_table_keeps_every_setting_and_judges_significance(tmp_path, capsys):
    _width_runs(tmp_path, 15, {("sgd", 0): 0.50, ("sgd", 1): 0.54, ("gsgd", 0): 0.40,
                               ("gsgd", 1): 0.42})
    _width_runs(tmp_path, 100, {("sgd", 0): 0.30, ("sgd", 1): 0.10, ("gsgd", 0): 0.25,
                                ("gsgd", 1): 0.12})
    from test_report import make_run

    make_run(tmp_path / "lone", data="fashion_mnist", model="mlp", optimizer="sgd",
             config_extra={"model.width": 32, "train.epochs": 15})   # makes the width a key
    code, out, err = _report(str(tmp_path), "--csv", "-", "--gap", capsys=capsys)
    assert code == 0, err
    gap = out.split("SGD against G-SGD per width (Figure 4):")[1]
    rows = [line.split(" | ") for line in gap.splitlines() if line.startswith("| fashion_mnist")]
    by_setting = {r[1]: r for r in rows}
    assert sorted(by_setting) == ["train.epochs=100", "train.epochs=15"]
    # 15 epochs: loss gap 0.11 with se 0.0158 -> yes; 100 epochs: 0.015 with se 0.08 -> within
    assert by_setting["train.epochs=15"][-2] == "yes"
    assert by_setting["train.epochs=100"][-2] == "within 2 se"
    assert "each is compared on its own" in gap


def test_width_figure_draws_every_setting_with_gap_error_bars(tmp_path):
    from gsgd_cli.analysis import build_rows, load_runs, plots

    for width in (8, 16):
        for epochs in (15, 100):
            from test_report import make_run

            for opt in ("sgd", "gsgd"):
                for seed in (0, 1):
                    make_run(tmp_path / f"{opt}-{seed}-{epochs}-{width}", data="fashion_mnist",
                             model="mlp", optimizer=opt, seed=seed,
                             train_losses=(1.0, 0.5 - 0.1 * seed - (opt == "gsgd") * 0.05),
                             config_extra={"model.width": width, "train.epochs": epochs})
    rows, keys, _ = build_rows(load_runs([tmp_path]))
    drawn = []
    original = plots._save

    def keep(fig, out, name):
        drawn.append(fig)
        return original(fig, out, name)

    plots._save = keep
    try:
        plots.plot_width_sweep(rows, tmp_path / "out")
    finally:
        plots._save = original
    top_left, gap_left = drawn[0].axes[0], drawn[0].axes[2]
    labels = top_left.get_legend_handles_labels()[1]
    assert sorted(labels) == ["G-SGD (train.epochs=100)", "G-SGD (train.epochs=15)",
                              "SGD (train.epochs=100)", "SGD (train.epochs=15)"]
    gap_bars = [c for c in gap_left.containers if c.has_yerr]
    assert len(gap_bars) == 2          # one gap curve per setting, each with its error bars


def test_no_two_curves_share_a_colour():
    from gsgd_cli.analysis.plots import distinct_colours

    for n in (3, 10, 11, 20, 33):
        colours = distinct_colours(n)
        assert len(colours) == n and len(set(map(tuple, colours))) == n


def test_report_hides_folders_of_refused_commands(gsgd_train_inproc, tmp_path, capsys):
    code, _, _ = gsgd_train_inproc(*SYNTH, "train.batch_size=0")   # refused before training
    assert code == 2 and (tmp_path / "run" / "summary.json").is_file()
    ok(gsgd_train_inproc(*SYNTH, f"hydra.run.dir={tmp_path / 'good'}"))
    code, out, err = _report(str(tmp_path), "--csv", "-", capsys=capsys)
    assert code == 0 and "Left out of the means" not in out
    assert "1 folders of commands refused before training are not listed" in out
    code, out, err = _report(str(tmp_path), "--csv", "-", "--all", capsys=capsys)
    assert "Left out of the means (1 incomplete or failed runs)" in out
