"""`gsgd figures`: PNG and PDF files in the paper's forms from runs made here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from gsgd_cli.__main__ import main as gsgd_main
from gsgd_cli.analysis import build_rows, load_runs
from gsgd_cli.analysis.plots import best_lr_rows, seed_curves
from test_report import make_run

REPO = Path(__file__).resolve().parents[2]


def figures(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = gsgd_main(["gsgd", "figures", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_image(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 10_000, path
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 300
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05, f"{path} looks blank"
    # the data are drawn in colour; axes, grid and text are grey: count coloured pixels
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.3
    assert coloured.mean() > 0.002, f"{path} has axes but no curves"


def assert_pdf(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:5] == b"%PDF-" and path.stat().st_size > 5_000


@pytest.fixture(scope="module")
def width_sweep(tmp_path_factory):
    """`gsgd train -m` over 2 optimizers x 2 widths x 2 seeds on synthetic data, plus a failed job."""
    root = tmp_path_factory.mktemp("figures")
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", "-m", "data=synthetic",
                           "train.iterations=8", "train.eval_every=2", "train.batch_size=16",
                           "train.tensorboard=false", "optimizer=sgd,gsgd", "model.width=8,16",
                           "seed=0,1", f"hydra.sweep.dir={root / 'sweep'}"],
                          cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    make_run(root / "crashed", data="synthetic", model="mlp", summary=False)
    return root


def test_width_sweep_and_curves(width_sweep, capsys):
    out_dir = width_sweep / "figs"
    code, out, err = figures(str(width_sweep / "sweep"), str(width_sweep / "crashed"),
                             "--out", str(out_dir), capsys=capsys)
    assert code == 0, err
    names = sorted(Path(line).name for line in out.split())
    assert names == ["fig3_curves.pdf", "fig3_curves.png", "fig4_width_sweep.pdf",
                     "fig4_width_sweep.png"]
    for stem in ("fig3_curves", "fig4_width_sweep"):
        assert_image(out_dir / f"{stem}.png")
        assert_pdf(out_dir / f"{stem}.pdf")
    assert "left out 1 incomplete runs" in err


def test_curves_are_the_seed_mean_of_the_metrics(width_sweep):
    rows, keys, _ = build_rows(load_runs([width_sweep / "sweep"]))
    row = rows[0]
    epochs, curves = seed_curves(row)
    files = [[json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
             for run in row.runs]
    assert epochs == [m["epoch"] for m in files[0]] and len(epochs) == 4
    assert curves["train_loss"] == [[m["train_loss"] for m in f] for f in files]
    assert curves["test_acc"] == [[m["test_acc"] for m in f] for f in files]


def test_learning_rate_sweep_picks_by_training_loss(tmp_path, capsys):
    # at lr 0.1 the test error is lower but the training loss higher: the training loss decides
    for opt in ("sgd", "path_sgd", "gsgd"):
        for seed in (0, 1):
            make_run(tmp_path / f"{opt}-a-{seed}", data="mnist", model="mlp", optimizer=opt,
                     seed=seed, test_accs=(0.5, 0.9), train_losses=(1.0, 0.8),
                     config_extra={"optimizer.lr": 0.1})
            make_run(tmp_path / f"{opt}-b-{seed}", data="mnist", model="mlp", optimizer=opt,
                     seed=seed, test_accs=(0.5, 0.7), train_losses=(1.0, 0.3 + 0.01 * seed),
                     config_extra={"optimizer.lr": 0.01})
    rows, keys, _ = build_rows(load_runs([tmp_path]))
    assert keys == ["optimizer.lr"] and len(rows) == 6
    best = best_lr_rows(rows)
    assert [(r.optimizer, r.swept["optimizer.lr"]) for r in best] == [
        ("sgd", 0.01), ("path_sgd", 0.01), ("gsgd", 0.01)]
    code, out, err = figures(str(tmp_path), "--out", str(tmp_path / "figs"), "--only", "lr",
                             capsys=capsys)
    assert code == 0, err
    assert sorted(Path(p).name for p in out.split()) == ["fig5_best_lr.pdf", "fig5_best_lr.png"]
    assert_image(tmp_path / "figs" / "fig5_best_lr.png")


def test_learning_rate_sweep_picks_by_validation_error_when_held_out(tmp_path, capsys):
    # lr 0.01 has the lower training loss, lr 0.1 the lower validation error: with a held-out
    # split the validation error decides; the test accuracy (best at 0.01) never does
    for opt in ("sgd", "path_sgd", "gsgd"):
        make_run(tmp_path / f"{opt}-a", data="fashion_mnist", model="mlp", optimizer=opt,
                 test_accs=(0.5, 0.7), train_losses=(1.0, 0.8), val_acc=0.9,
                 config_extra={"optimizer.lr": 0.1})
        make_run(tmp_path / f"{opt}-b", data="fashion_mnist", model="mlp", optimizer=opt,
                 test_accs=(0.5, 0.9), train_losses=(1.0, 0.3), val_acc=0.6,
                 config_extra={"optimizer.lr": 0.01})
    rows, _, _ = build_rows(load_runs([tmp_path]))
    assert [(r.optimizer, r.swept["optimizer.lr"]) for r in best_lr_rows(rows)] == [
        ("sgd", 0.1), ("path_sgd", 0.1), ("gsgd", 0.1)]
    capsys.readouterr()
    assert gsgd_main(["gsgd", "report", str(tmp_path), "--csv", "-", "--best"]) == 0
    out = capsys.readouterr().out
    best = out.split("Best setting per data set, model and optimizer:")[1]
    chosen = [line.split(" | ")[2:4] for line in best.strip().splitlines()[2:]]
    assert chosen == [["sgd", "0.1"], ["path_sgd", "0.1"], ["gsgd", "0.1"]]
    assert "lowest mean final validation error" in best and "10.00" in best


@pytest.mark.parametrize("setup, args, needle", [
    (lambda p: make_run(p / "r", summary=False), [], "none of the 1 runs found completed"),
    (lambda p: make_run(p / "r"), ["--only", "width"], "--only width needs MLP runs"),
    (lambda p: make_run(p / "r"), ["--only", "lr"], "--only lr needs runs that sweep"),
    (lambda p: p.mkdir(), [], "no run directories found"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, args, needle):
    target = tmp_path / "in"
    setup(target)
    code, out, err = figures(str(target), "--out", str(tmp_path / "figs"), *args, capsys=capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("gsgd figures: error: ") and needle in lines[0]
    assert not (tmp_path / "figs").exists() or not any((tmp_path / "figs").iterdir())


def test_figure5_form_gives_each_optimizer_its_own_colour(tmp_path, monkeypatch):
    # SGD and Path-SGD chosen at the same rate: colour by setting would draw both in one colour
    from gsgd_cli.analysis import plots
    for opt, lr in (("sgd", 0.1), ("path_sgd", 0.1), ("gsgd", 0.01)):
        for j, rate in enumerate((lr, lr / 100)):
            make_run(tmp_path / f"{opt}-{j}", data="fashion_mnist", model="mlp", optimizer=opt,
                     test_accs=(0.5, 0.7), train_losses=(1.0, 0.3 + j), val_acc=0.9 - 0.1 * j,
                     config_extra={"optimizer.lr": rate})
    rows, keys, _ = build_rows(load_runs([tmp_path]))
    drawn = {}

    def keep(fig, out, name):
        drawn[name] = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
        return []
    monkeypatch.setattr(plots, "_save", keep)
    plots.plot_best_lr(rows, keys, tmp_path)
    colours = drawn["fig5_best_lr"]
    assert sorted(colours) == ["G-SGD lr=0.01", "Path-SGD lr=0.1", "SGD lr=0.1"]
    assert len(set(colours.values())) == 3, colours
    # Figure 3's form keeps one colour per setting (SGD and Path-SGD at lr 0.1 share it)
    plots.plot_curves(rows, keys, tmp_path)
    colours = drawn["fig3_curves"]
    assert colours["SGD lr=0.1"] == colours["Path-SGD lr=0.1"] != colours["G-SGD lr=0.01"]


def test_log_axes_label_their_ticks_as_plain_numbers(width_sweep, monkeypatch, tmp_path):
    """TeX parsing is off for labels read from runs, so the log axes must not fall back to TeX
    tick labels (they showed as `$\\mathdefault{10^{-1}}$`)."""
    from gsgd_cli.analysis import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, name: drawn.append(fig) or [])
    rows, keys, _ = build_rows(load_runs([width_sweep / "sweep"]))
    plots.plot_curves(rows, keys, tmp_path)
    plots.plot_width_sweep(rows, tmp_path)
    labels = []
    for fig in drawn:
        fig.canvas.draw()
        for ax in fig.axes:
            for axis in (ax.xaxis, ax.yaxis):
                labels += [t.get_text() for t in axis.get_ticklabels(which="both")]
    assert labels and any(labels)
    assert not [text for text in labels if "$" in text or "mathdefault" in text]
