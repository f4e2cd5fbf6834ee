"""Compare a committed run with a rerun of it, evaluation by evaluation.

    python scripts/compare_runs.py COMMITTED_RUN_DIR RERUN_DIR [COMMITTED RERUN ...]

For every pair: the commit each run came from (`git_commit` in summary.json) and, for each
evaluation the rerun has (e.g. a two-epoch rerun with `train.epochs=2`), the committed and rerun
test accuracy, and the largest absolute difference over the logged values (training loss and
accuracy, test loss and accuracy, validation values when present; the wall-clock `elapsed_s`
is left out). `identical` means every logged value is bit for bit the same.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

SKIP = {"elapsed_s"}


def read(run_dir: Path) -> tuple[dict, list[dict]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    return summary, rows


def compare(committed: Path, rerun: Path) -> list[str]:
    (s_old, old), (s_new, new) = read(committed), read(rerun)
    lines = [f"{committed} ({s_old.get('git_commit', '?')[:12]}) vs {rerun} "
             f"({s_new.get('git_commit', '?')[:12]})"]
    by_epoch = {row.get("epoch"): row for row in old}
    for row in new:
        ref = by_epoch.get(row.get("epoch"))
        if ref is None:
            lines.append(f"  epoch {row.get('epoch')}: no committed evaluation at this epoch")
            continue
        keys = sorted(k for k in row if k not in SKIP and isinstance(row[k], (int, float)))
        diffs = {k: abs(float(row[k]) - float(ref[k])) for k in keys if k in ref}
        same = all(row[k] == ref[k] for k in keys if k in ref)
        worst = max(diffs, key=diffs.get)
        lines.append(f"  epoch {row['epoch']:g}: test_acc {ref['test_acc']:.4f} -> "
                     f"{row['test_acc']:.4f}, train_loss {ref['train_loss']:.6f} -> "
                     f"{row['train_loss']:.6f}; "
                     + ("identical" if same else f"largest |diff| {diffs[worst]:.2e} ({worst})"))
    return lines


def main(argv: list[str]) -> int:
    if not argv or len(argv) % 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    for committed, rerun in zip(argv[::2], argv[1::2]):
        print("\n".join(compare(Path(committed), Path(rerun))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
