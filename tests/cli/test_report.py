"""`gsgd report`: run dirs made here (a real multirun with failed jobs, a killed run, and
hand-written run dirs), rows and numbers checked against the files they came from."""
from __future__ import annotations

import csv
import io
import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from gsgd_cli.__main__ import main as gsgd_main
from gsgd_cli.analysis import build_rows, find_run_dirs, load_runs
from gsgd_cli.analysis.paper import TABLE1, TABLE5

SWEEP = ["data=synthetic", "train.iterations=6", "train.eval_every=3", "train.batch_size=16",
         "train.tensorboard=false"]


def make_run(path: Path, *, data="cifar10", model="resnet34", optimizer="sgd", seed=0,
             test_accs=(0.5, 0.6), train_losses=(1.0, 0.5), status="completed",
             config_extra: dict | None = None, summary=True, val_acc: float | None = None) -> Path:
    """A run directory in the runner's format, written by hand."""
    model_cfg = {"mlp": {"name": "mlp", "width": 64, "depth": 2, "bias": False},
                 "resnet34": {"name": "resnet", "blocks": [3, 4, 6, 3],
                              "widths": [64, 128, 256, 512], "bn": True},
                 "plain34": {"name": "plain", "blocks": [6, 8, 12, 6],
                             "widths": [64, 128, 256, 512], "bn": True}}[model]
    config = {"data": {"name": data, "root": "${oc.env:GSGD_DATA,data}"}, "model": model_cfg,
              "optimizer": {"lr": 0.1, "weight_decay": 0.0}, "seed": seed,
              "train": {"batch_size": 64}}
    if data == "fashion_mnist":
        config["data"]["size"] = 7
    for key, value in (config_extra or {}).items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"seed={seed}"]))
    lines = [{"iteration": 10 * (i + 1), "epoch": i + 1.0, "lr": 0.1, "train_loss": loss,
              "train_acc": 0.5, "test_loss": 1.0, "test_acc": acc, "elapsed_s": 1.0}
             for i, (acc, loss) in enumerate(zip(test_accs, train_losses))]
    (path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    if summary:
        (path / "summary.json").write_text(json.dumps({
            "status": status, "message": None if status == "completed" else "boom",
            "final_test_acc": test_accs[-1], "best_test_acc": max(test_accs),
            "final_train_loss": train_losses[-1], "seed": seed, "num_parameters": 123,
            "epochs": float(len(test_accs)),
            "config": {"data": data, "model": model, "optimizer": optimizer},
            **({} if val_acc is None else {"final_val_acc": val_acc})}))
    return path


def report(*args: str, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    code = gsgd_main(["gsgd", "report", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def read_csv(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real `gsgd train -m` sweep: 2 optimizers x widths 8,0,16 x 2 seeds; width 0 fails.
    Plus a copy of one finished job without its summary.json (a killed run)."""
    import os
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("report")
    env = {k: v for k, v in os.environ.items() if k not in ("COMP_LINE", "HYDRA_FULL_ERROR")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", "-m", *SWEEP,
                           "optimizer=sgd,gsgd", "model.width=8,0,16", "seed=0,1",
                           f"hydra.sweep.dir={root / 'sweep'}"], cwd=root, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]  # the width-0 jobs fail
    assert "8 of 12 jobs completed" in proc.stdout
    shutil.copytree(root / "sweep" / "0", root / "killed")
    (root / "killed" / "summary.json").unlink()
    return root


def test_multirun_rows_and_numbers_match_the_files(sweep, capsys):
    code, out, err = report(str(sweep), "--csv", str(sweep / "r.csv"), capsys=capsys)
    assert code == 0, err
    rows = read_csv(sweep / "r.csv")
    assert [(r["optimizer"], r["model.width"]) for r in rows] == [
        ("sgd", "8"), ("gsgd", "8"), ("sgd", "16"), ("gsgd", "16")]
    assert all(r["n_seeds"] == "2" and r["seeds"] == "0 1" for r in rows)
    # recompute every number from metrics.jsonl of the jobs it came from
    jobs = [p for p in (sweep / "sweep").iterdir() if p.is_dir()]
    for row in rows:
        metrics = []
        for job in jobs:
            cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
            summary = json.loads((job / "summary.json").read_text())
            if (cfg["model"]["width"] == int(row["model.width"])
                    and summary["config"]["optimizer"] == row["optimizer"]):
                metrics.append([json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()])
        assert len(metrics) == 2
        final = [100 * (1 - m[-1]["test_acc"]) for m in metrics]
        best = [100 * (1 - max(x["test_acc"] for x in m)) for m in metrics]
        loss = [m[-1]["train_loss"] for m in metrics]
        for name, values in (("final_test_error", final), ("best_test_error", best),
                             ("final_train_loss", loss)):
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.mean(values), abs=1e-9)
            assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
    # the markdown shows the same rows, and the failed and killed runs separately
    table = [line for line in out.splitlines() if line.startswith("| synthetic")]
    assert len(table) == 4
    mean, std = float(rows[0]["final_test_error_mean"]), float(rows[0]["final_test_error_std"])
    assert f"| {mean:.2f} ± {std:.2f} |" in table[0]
    left_out = out.split("Left out of the means", 1)[1]
    assert "(5 incomplete or failed runs)" in left_out
    assert left_out.count("status failed: model: Invalid MLP width=0") == 4
    assert f"{sweep / 'killed'}: no summary.json" in left_out
    assert "5 incomplete" in out and "8 of 13 runs completed, 4 rows" in err


def test_failed_runs_are_never_averaged(tmp_path):
    make_run(tmp_path / "a", seed=0, test_accs=(0.95, 0.9), train_losses=(0.3, 0.1))
    make_run(tmp_path / "b", seed=1, test_accs=(0.7, 0.8), train_losses=(0.4, 0.2))
    make_run(tmp_path / "c", seed=2, test_accs=(0.1,), train_losses=(9.0,), status="diverged")
    make_run(tmp_path / "d", seed=3, test_accs=(0.1,), train_losses=(9.0,), summary=False)
    rows, keys, incomplete = build_rows(load_runs([tmp_path]))
    assert len(rows) == 1 and keys == []
    assert rows[0].seeds == [0, 1]
    assert rows[0].stats["final_test_error"][0] == pytest.approx(15.0)
    assert rows[0].stats["final_test_error"][1] == pytest.approx(statistics.stdev([10.0, 20.0]))
    assert rows[0].stats["best_test_error"][0] == pytest.approx(12.5)  # 5 and 20
    assert rows[0].stats["final_train_loss"][0] == pytest.approx(0.15)
    assert sorted(r.path.name for r in incomplete) == ["c", "d"]
    assert [r.problem for r in sorted(incomplete, key=lambda r: r.path.name)] == [
        "status diverged: boom", "no summary.json (still running, or killed)"]


def test_paper_figures_beside_ours(tmp_path, capsys):
    make_run(tmp_path / "r1", data="cifar10", model="resnet34", optimizer="gsgd")
    make_run(tmp_path / "r2", data="cifar100", model="plain34", optimizer="sgd")
    make_run(tmp_path / "r3", data="cifar10", model="resnet34", optimizer="sgd",
             config_extra={"optimizer.weight_decay": 5e-4})
    make_run(tmp_path / "r4", data="cifar10", model="resnet34", optimizer="sgd")
    make_run(tmp_path / "m64", data="fashion_mnist", model="mlp", optimizer="sgd")
    code, out, err = report(str(tmp_path), capsys=capsys)
    assert code == 0, err
    rows = {(r["data"], r["model"], r["optimizer"], r["optimizer.weight_decay"]): r
            for r in read_csv(tmp_path / "report.csv")}  # default CSV: in the first RUN_DIR
    assert rows[("cifar10", "resnet34", "gsgd", "0")]["paper"] == "Table 1: 6.66 ± 0.13"
    assert float(rows[("cifar10", "resnet34", "gsgd", "0")]["paper_test_error"]) == TABLE1[
        ("cifar10", "resnet34", "gsgd")][0]
    assert rows[("cifar100", "plain34", "sgd", "0")]["paper"] == "Table 1: 36.41 ± 0.54"
    assert rows[("cifar10", "resnet34", "sgd", "0")]["paper"] == "Table 1: 7.13 ± 0.22"
    assert rows[("cifar10", "resnet34", "sgd", "0.0005")]["paper"] == "App. 11.5 (best λ): 5.71"
    # MLPs: the paper has no test error for them, so the paper column stays empty; the
    # invariant ratio H/m (H = width x depth hidden units, m = the run's weights) has its own
    mlp = rows[("fashion_mnist", "mlp", "sgd", "0")]
    assert mlp["paper"] == "" and mlp["paper_test_error"] == ""
    assert float(mlp["invariant_ratio_H_over_m"]) == 64 * 2 / 123
    assert "| H/m |" in out.splitlines()[0] + " |" or " H/m " in out.splitlines()[0]
    assert "| Table 1: 6.66 ± 0.13 |" in out


def test_interpolated_keys_are_resolved_and_copies_dropped(tmp_path):
    for i, lam in enumerate([1e-4, 2e-4]):
        make_run(tmp_path / str(i), config_extra={"reg_lambda": lam,
                                                  "optimizer.weight_decay": "${reg_lambda}"})
    rows, keys, _ = build_rows(load_runs([tmp_path]))
    assert keys == ["optimizer.weight_decay"]  # reg_lambda splits no row further
    assert [r.swept["optimizer.weight_decay"] for r in rows] == [1e-4, 2e-4]


def test_find_run_dirs_recurses_and_skips_inside_runs(tmp_path):
    make_run(tmp_path / "sweep" / "10")
    make_run(tmp_path / "sweep" / "2")
    make_run(tmp_path / "single")
    (tmp_path / "sweep" / "2" / "tb").mkdir()
    found = find_run_dirs([tmp_path / "sweep", tmp_path / "single", tmp_path / "sweep" / "2"])
    assert [p.name for p in found] == ["single", "2", "10"]


@pytest.mark.parametrize("setup, needle", [
    (lambda p: None, "does not exist; pass a run directory"),
    (lambda p: p.mkdir(), "no run directories found under"),
    (lambda p: (make_run(p / "r"), (p / "r" / "summary.json").write_text("{oops")),
     "summary.json: invalid JSON"),
    (lambda p: (make_run(p / "r"), (p / "r" / "metrics.jsonl").write_text("{\"a\": 1}\n{bro")),
     "metrics.jsonl line 2"),
    (lambda p: (make_run(p / "r"), (p / "r" / ".hydra" / "config.yaml").write_text("a: [")),
     "config.yaml"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, setup, needle):
    target = tmp_path / "in"
    setup(target)
    code, out, err = report(str(target), "--csv", "-", capsys=capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gsgd report: error: ") and needle in lines[0], err


def test_truncated_metrics_of_a_killed_run_only_list_it(tmp_path, capsys):
    make_run(tmp_path / "ok")
    make_run(tmp_path / "killed", summary=False)
    with open(tmp_path / "killed" / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 30, "epo')
    code, out, err = report(str(tmp_path), "--csv", "-", capsys=capsys)
    assert code == 0, err
    assert f"{tmp_path / 'killed'}: no summary.json" in out


@pytest.mark.parametrize("command, args, needle", [
    ("report", [], "the following arguments are required: RUN_DIR"),
    ("figures", ["some_dir"], "the following arguments are required: --out"),
    ("report", ["x", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_mistakes_are_one_line_exit_2(capsys, command, args, needle):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        gsgd_main(["gsgd", command, *args])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"gsgd {command}: error: ") and needle in err
    assert f"see `gsgd {command} --help`" in err


def test_gap_table_is_sgd_minus_gsgd_with_its_standard_error(tmp_path, capsys):
    losses = {("sgd", 0): 0.50, ("sgd", 1): 0.54, ("gsgd", 0): 0.40, ("gsgd", 1): 0.42}
    for (opt, seed), loss in losses.items():
        make_run(tmp_path / f"{opt}-{seed}", data="fashion_mnist", model="mlp", optimizer=opt,
                 seed=seed, train_losses=(1.0, loss), test_accs=(0.5, 0.8 if opt == "sgd" else 0.9),
                 config_extra={"model.width": 16})
    make_run(tmp_path / "lone", data="fashion_mnist", model="mlp", optimizer="sgd",
             config_extra={"model.width": 32})      # no G-SGD partner: no row
    code, out, err = report(str(tmp_path), "--csv", "-", "--gap", capsys=capsys)
    assert code == 0, err
    table = out.split("SGD against G-SGD per width (Figure 4):")[1].strip().splitlines()
    rows = [line.split(" | ") for line in table if line.startswith("| fashion_mnist")]
    assert len(rows) == 1
    _, h, seeds, loss_gap, loss_z, err_gap, err_z, lower_loss, lower_err = rows[0]
    se = (statistics.stdev([0.50, 0.54]) ** 2 / 2 + statistics.stdev([0.40, 0.42]) ** 2 / 2) ** 0.5
    assert (h, seeds) == ("16", "2/2")
    assert loss_gap == f"{0.52 - 0.41:+.4f} ± {se:.4f}" and loss_z == f"{0.11 / se:+.1f}"
    assert err_gap.startswith("+10.00 ± 0.00") and lower_loss == "yes" and lower_err.startswith("yes")
    assert report(str(tmp_path / "lone"), "--csv", "-", "--gap", capsys=capsys)[0] == 2


def test_gap_on_best_test_error_uses_each_runs_best_epoch(tmp_path, capsys):
    # G-SGD peaks early and ends worse; SGD ends at its best: the two readings disagree in sign
    accs = {("sgd", 0): (0.70, 0.80), ("sgd", 1): (0.72, 0.82),
            ("gsgd", 0): (0.90, 0.75), ("gsgd", 1): (0.86, 0.77)}
    for (opt, seed), test_accs in accs.items():
        make_run(tmp_path / f"{opt}-{seed}", data="fashion_mnist", model="mlp", optimizer=opt,
                 seed=seed, test_accs=test_accs, config_extra={"model.width": 16})
    make_run(tmp_path / "lone", data="fashion_mnist", model="mlp", optimizer="sgd",
             config_extra={"model.width": 32})      # (a second width makes model.width a column)

    def gap_row(*flags):
        code, out, err = report(str(tmp_path), "--csv", "-", *flags, capsys=capsys)
        assert code == 0, err
        row = next(line for line in out.split("per width (Figure 4)")[1].splitlines()
                   if line.startswith("| fashion_mnist"))
        return out, row.split(" | ")

    out, final = gap_row("--gap")
    assert "| Δ final test error % |" in out
    assert final[5].startswith(f"{100 * (0.76 - 0.81):+.2f}") and final[8].startswith("no")
    for flags in (("--gap", "--gap-error", "best"), ("--gap-error", "best")):  # implies --gap
        out, best = gap_row(*flags)
        assert "| Δ best test error % |" in out and "(best test error over the evaluations)" in out
        se = (statistics.stdev([100 * 0.20, 100 * 0.18]) ** 2 / 2
              + statistics.stdev([100 * 0.10, 100 * 0.14]) ** 2 / 2) ** 0.5
        assert best[5] == f"{100 * (0.19 - 0.12):+.2f} ± {se:.2f}" and best[8].startswith("yes")
        assert best[3] == final[3]                  # the training loss stays the final one
    with pytest.raises(SystemExit) as exc:
        report(str(tmp_path), "--csv", "-", "--gap-error", "top", capsys=capsys)
    assert exc.value.code == 2


def test_epoch_reports_every_run_as_it_stood_then(tmp_path, capsys):
    make_run(tmp_path / "a", data="mnist", model="mlp", test_accs=(0.5, 0.7, 0.6),
             train_losses=(1.0, 0.6, 0.4), val_acc=0.9)
    make_run(tmp_path / "b", data="mnist", model="mlp", seed=1, test_accs=(0.4,),
             train_losses=(1.2,))                   # stopped after one epoch: no epoch 2
    runs = load_runs([tmp_path])
    two = [run.at_epoch(2) for run in runs]
    assert [r.complete for r in two] == [True, False]
    assert "no evaluation at epoch 2 (its last is at epoch 1.0)" in two[1].problem
    assert (two[0].final("final_test_acc"), two[0].final("best_test_acc"),
            two[0].final("final_train_loss")) == (0.7, 0.7, 0.6)
    assert len(two[0].metrics) == 2 and runs[0].final("final_test_acc") == 0.6   # unchanged
    code, out, err = report(str(tmp_path), "--csv", "-", "--epoch", "2", capsys=capsys)
    assert code == 0 and "| 1 |" in out and "30.00" in out and "no evaluation at epoch 2" in out
    code, out, err = report(str(tmp_path), "--csv", "-", "--epoch", "0", capsys=capsys)
    assert code == 2 and "--epoch 0: must be a number of epochs > 0" in err


def test_left_out_runs_are_shown_relative_to_the_working_directory(tmp_path, capsys, monkeypatch):
    # a report committed next to its runs must not carry the checkout's absolute location
    make_run(tmp_path / "sweep" / "ok")
    make_run(tmp_path / "sweep" / "killed", summary=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = report("sweep", "--csv", "-", capsys=capsys)
    assert code == 0, err
    assert f"- {Path('sweep') / 'killed'}: no summary.json" in out
    assert str(tmp_path) not in out.split("Left out of the means", 1)[1]
