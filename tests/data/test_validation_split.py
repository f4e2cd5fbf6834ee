"""A validation split held out of the training data (data.val_size): the split itself, the
trainer's val metrics through the CLI, and the report's val column."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gsgd_cli.analysis import build_rows, load_runs
from gsgd_cli.analysis.table import markdown
from gsgd_cli.data.pipeline import hold_out
from gsgd_cli.errors import UserError


def _toy(n=50):
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return x, torch.arange(n) % 7


def test_hold_out_splits_disjointly_and_reproducibly():
    x, y = _toy()
    tx, ty, vx, vy = hold_out(x, y, 12, split_seed=3)
    assert len(vy) == 12 and len(ty) == 38
    train_ids, val_ids = set(tx.flatten().tolist()), set(vx.flatten().tolist())
    assert not train_ids & val_ids and train_ids | val_ids == set(range(50))
    assert torch.equal(ty, y[tx.flatten().long()]) and torch.equal(vy, y[vx.flatten().long()])
    torch.manual_seed(123)      # the run's seed does not move the split
    again = hold_out(x, y, 12, split_seed=3)
    assert torch.equal(again[2], vx)
    assert not torch.equal(hold_out(x, y, 12, split_seed=4)[2], vx)
    tx0, ty0, vx0, _ = hold_out(x, y, 0)
    assert torch.equal(tx0, x) and torch.equal(ty0, y) and len(vx0) == 0


@pytest.mark.parametrize("value", [-1, 50, 2.5, True, "10"])
def test_bad_val_size_is_one_clear_error(value):
    x, y = _toy()
    with pytest.raises(UserError, match=r"^Invalid data.val_size=.*Must be an integer from 0 "
                                        r"to 49 \(training examples held out"):
        hold_out(x, y, value)


def test_training_reports_validation_metrics(tmp_path):
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "gsgd_cli", "train", "data=synthetic", "data.val_size=112",
         "train.epochs=2", "train.batch_size=50", "optimizer=gsgd", "model.width=8",
         f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val_acc" in m and "val_loss" in m for m in lines)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_size"] == 112
    assert summary["final_val_acc"] == lines[-1]["val_acc"]
    assert summary["best_val_acc"] == max(m["val_acc"] for m in lines)
    assert summary["iterations_per_epoch"] == 8            # (512 - 112) / 50, rounded up
    # the report shows the val column and computes it from the summaries
    rows, keys, _ = build_rows(load_runs([run]))
    table = markdown(rows, keys, [])
    assert "final val error %" in table.splitlines()[0]
    expected = 100 * (1 - summary["final_val_acc"])
    assert rows[0].stats["final_val_error"][0] == pytest.approx(expected)
