"""Before/after check for behaviour-preserving changes: a fixed set of `gsgd train` runs, each
reduced to a hash of its metrics (every logged value but the wall-clock `elapsed_s`) and a hash
of its final weights and optimizer state (checkpoint.pt).

    python scripts/bit_identical.py --save before.json      # on the old commit
    python scripts/bit_identical.py --check before.json     # on the new one: exit 1 on a difference

Runs (each in a fresh temporary directory, one CPU thread):
  default      `gsgd train` (the root config: G-SGD on the MLP, Fashion-MNIST 7x7, 10 epochs)
  smoke        `gsgd train experiment=smoke`
  fig4_job     one Figure 4 job (G-SGD, h = 256) for one epoch
  path_sgd     `gsgd train optimizer=path_sgd` for one epoch
  resnet18     torchvision ResNet-18 under G-SGD, 3 iterations on synthetic 3x32x32 data
  momentum     experiment=smoke with momentum 0.9 and weight decay (optimizer state hashed too)
  resumed      experiment=smoke for 10 iterations, then resume=true to 20 (compared with smoke)
Needs Fashion-MNIST (`python -m gsgd_cli.data.fetch fashion_mnist`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RUNS: dict[str, list[list[str]]] = {
    "default": [[]],
    "smoke": [["experiment=smoke"]],
    "fig4_job": [["experiment=fig4", "hydra.mode=RUN", "model.width=256", "optimizer=gsgd",
                  "train.epochs=1"]],
    "path_sgd": [["optimizer=path_sgd", "train.epochs=1"]],
    "resnet18": [["model=torchvision", "model.arch=resnet18", "data=synthetic",
                  "data.shape=[3,32,32]", "data.num_classes=10", "train.iterations=3",
                  "train.batch_size=8", "data.train_size=64", "data.test_size=16"]],
    "momentum": [["experiment=smoke", "optimizer.momentum=0.9", "optimizer.weight_decay=1e-4"]],
    "resumed": [["experiment=smoke", "train.iterations=10"],
                ["experiment=smoke", "train.iterations=20", "resume=true"]],
}


def run(name: str, tmp: Path) -> dict[str, str]:
    run_dir = tmp / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for args in RUNS[name]:
        proc = subprocess.run([sys.executable, "-m", "gsgd_cli", "train", *args, "progress=false",
                               f"hydra.run.dir={run_dir}"], cwd=tmp, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{name}: gsgd train {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("elapsed_s", None)
    metrics = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]
    import torch

    state = torch.load(run_dir / "checkpoint.pt", weights_only=True, map_location="cpu")
    digest = hashlib.sha256()

    def feed(key: str, value) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                          if value.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(f"{key}.{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{key}[{i}]", v)

    feed("model", state["model"])
    weights = digest.hexdigest()[:16]
    feed("optimizer.state", state["optimizer"].get("state", {}))
    return {"metrics": metrics, "weights": weights, "weights+optimizer_state": digest.hexdigest()[:16],
            "rows": str(len(rows))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", type=Path, help="write the hashes to this JSON file")
    parser.add_argument("--check", type=Path, help="compare with hashes saved by --save")
    parser.add_argument("--only", nargs="*", choices=sorted(RUNS), help="a subset of the runs")
    opts = parser.parse_args()
    names = opts.only or list(RUNS)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            result[name] = run(name, Path(tmp))
            print(f"{name:10s} metrics {result[name]['metrics']}  weights {result[name]['weights']}  "
                  f"weights+state {result[name]['weights+optimizer_state']}  ({result[name]['rows']} rows)",
                  flush=True)
    if opts.save:
        opts.save.write_text(json.dumps({"commit": commit, "runs": result}, indent=1) + "\n")
    if opts.check:
        saved = json.loads(opts.check.read_text())
        bad = [n for n in names if saved["runs"].get(n) != result[n]]
        print(f"at {commit} against {saved['commit']}: "
              + ("bit-identical" if not bad else f"DIFFERENT: {', '.join(bad)}"))
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
