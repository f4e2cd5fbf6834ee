"""The runner with the adaptive optimizers: `optimizer=adam|gadam|rmsprop|grmsprop` train, the
Figure 4 and Figure 5 presets compose and run with them, and `gsgd report` / `gsgd figures`
name and colour every optimizer in conf/optimizer/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.colors import to_rgb

from gsgd_cli.analysis.plots import LINESTYLES, OPTIMIZER_COLOURS, OPTIMIZER_NAMES
from gsgd_cli.analysis.table import OPTIMIZER_ORDER
from gsgd_cli.testing.fake_data import write_fake_idx

REPO = Path(__file__).resolve().parents[2]
ADAPTIVE = {"adam": "torch.optim.adam.Adam", "gadam": "gsgd_cli.optim.gadam.GAdam",
            "rmsprop": "torch.optim.rmsprop.RMSprop",
            "grmsprop": "gsgd_cli.optim.gadam.GRMSprop"}


@pytest.mark.parametrize("name", ADAPTIVE)
def test_each_adaptive_optimizer_trains_on_the_smoke_preset(name, gsgd_train_inproc, tmp_path,
                                                            monkeypatch):
    built = []
    from gsgd_cli.train import trainer as trainer_module

    original = trainer_module.Trainer.__init__

    def spy(self, model, optimizer, *args, **kwargs):
        built.append(type(optimizer))
        original(self, model, optimizer, *args, **kwargs)

    monkeypatch.setattr(trainer_module.Trainer, "__init__", spy)
    code, out, err = gsgd_train_inproc("experiment=smoke", f"optimizer={name}",
                                       "train.iterations=6", "train.eval_every=3")
    assert code in (0, None), err
    assert [f"{c.__module__}.{c.__name__}" for c in built] == [ADAPTIVE[name]]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["optimizer"] == name
    metrics = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [3, 6]
    assert metrics[0]["train_loss"] != metrics[1]["train_loss"]


def test_a_bad_adaptive_option_is_one_line(gsgd_train_inproc):
    code, out, err = gsgd_train_inproc("experiment=smoke", "optimizer=gadam",
                                       "optimizer.betas=[0.9,1.5]")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "Invalid betas=" in lines[0] and "[0, 1)" in lines[0]


@pytest.fixture(scope="module")
def fmnist_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("fmnist")
    write_fake_idx(root, n_train=32, n_test=16, gz=True)
    return root


def _sweep(tmp_path, fmnist_files, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "gsgd_cli", "train", *overrides, f"data.system_dir={fmnist_files}",
         "train.batch_size=8", "train.tensorboard=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_fig4_with_adam_and_gadam_composes_and_runs(tmp_path, fmnist_files, capsys):
    """`experiment=fig4 optimizer=adam,gadam`, narrowed to one seed and two widths, a few
    iterations on generated Fashion-MNIST files; then report and figures over the sweep."""
    proc = _sweep(tmp_path, fmnist_files, "experiment=fig4", "optimizer=adam,gadam",
                  "seed=0", "model.width=8,16", "train.iterations=3")
    assert "4 of 4 jobs completed" in proc.stdout
    chosen = sorted(json.loads((tmp_path / "sweep" / str(k) / "summary.json").read_text())
                    ["config"]["optimizer"] for k in range(4))
    assert chosen == ["adam", "adam", "gadam", "gadam"]
    from gsgd_cli.__main__ import main as gsgd_main

    capsys.readouterr()
    assert gsgd_main(["gsgd", "report", str(tmp_path / "sweep")]) in (0, None)
    report = capsys.readouterr().out
    assert "| gadam |" in report and "| adam |" in report
    out_dir = tmp_path / "figs"
    assert gsgd_main(["gsgd", "figures", str(tmp_path / "sweep"), "--out",
                      str(out_dir)]) in (0, None)
    assert list(out_dir.glob("*.png"))


def test_fig5_fmnist_with_the_four_adaptive_optimizers_composes_and_runs(tmp_path,
                                                                         fmnist_files, capsys):
    """Stage 1 of Figure 5's protocol with Adam, G-Adam, RMSprop and G-RMSprop, two rates."""
    proc = _sweep(tmp_path, fmnist_files, "experiment=fig5_fmnist",
                  "optimizer=adam,gadam,rmsprop,grmsprop", "optimizer.lr=1e-2,1e-3",
                  "train.iterations=2", "data.val_size=8")
    assert "8 of 8 jobs completed" in proc.stdout
    runs = [json.loads((tmp_path / "sweep" / str(k) / "summary.json").read_text())
            for k in range(8)]
    assert sorted({r["config"]["optimizer"] for r in runs}) == ["adam", "gadam", "grmsprop",
                                                                "rmsprop"]
    assert all(r["status"] == "completed" and r["val_size"] == 8 for r in runs)
    from gsgd_cli.__main__ import main as gsgd_main     # stage 1's choice of rate

    capsys.readouterr()
    assert gsgd_main(["gsgd", "report", str(tmp_path / "sweep"), "--best"]) in (0, None)
    best = capsys.readouterr().out
    for name in ("adam", "gadam", "rmsprop", "grmsprop"):
        assert f"| {name} |" in best, best


def test_report_and_figures_name_and_colour_every_optimizer():
    names = sorted(p.stem for p in (REPO / "conf" / "optimizer").glob("*.yaml"))
    for table in (OPTIMIZER_NAMES, OPTIMIZER_COLOURS, LINESTYLES, OPTIMIZER_ORDER):
        assert sorted(table) == names
    colours = [to_rgb(OPTIMIZER_COLOURS[n]) for n in names]
    assert len(set(colours)) == len(colours)
    assert len(set(OPTIMIZER_NAMES.values())) == len(names)


@pytest.mark.parametrize("name", ["gadam", "grmsprop"])
def test_inspect_reads_the_structural_options_of_the_adaptive_optimizers(name, capsys):
    """`gsgd inspect optimizer=gadam optimizer.block_split=stage` shows the blocks GAdam would
    step with that option (the same structure code as GSGD)."""
    from gsgd_cli.__main__ import main as gsgd_main

    capsys.readouterr()
    assert gsgd_main(["gsgd", "inspect", "model=plain_tiny", "model.bn=false", "data=synthetic",
                      f"optimizer={name}", "optimizer.block_split=stage"]) in (0, None)
    assert "block_split='stage'" in capsys.readouterr().out
