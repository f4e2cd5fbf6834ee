"""`gsgd eval RUN_DIR [--checkpoint last|best] [--device D]`: a run's test metrics from a
checkpoint, without training.

Reads the run's composed config (`RUN_DIR/.hydra/config.yaml`), loads its data and model,
loads the weights of `checkpoint.pt` (last) or `best.pt` (the evaluation kept by
`train.keep_best=METRIC`) and evaluates them with the trainer's own evaluation, so the numbers
are those the run logged at that iteration. Prints one line (and `--json` the same as JSON);
bad input is one line on stderr, exit code 2. Nothing in the run directory is written.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gsgd_cli.cli.report import OneLineParser
from gsgd_cli.errors import UserError

CHECKPOINTS = {"last": "checkpoint.pt", "best": "best.pt"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(prog="gsgd eval",
                           description="Evaluate a gsgd train run's last or best checkpoint on "
                                       "its test split (and validation split, when it has one).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a gsgd train run directory")
    parser.add_argument("--checkpoint", choices=tuple(CHECKPOINTS), default="last",
                        help="last: checkpoint.pt; best: best.pt, kept by train.keep_best=METRIC")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser.parse_args(argv)


def evaluate_run(run_dir: Path, which: str = "last", device: str = "auto") -> dict:
    """{"iteration", "checkpoint", "test_loss", "test_acc"[, "val_loss", "val_acc"]}."""
    import torch
    from omegaconf import OmegaConf

    from gsgd_cli.data import load_data
    from gsgd_cli.models import build_model
    from gsgd_cli.runner.environment import resolve_device
    from gsgd_cli.runner.settings import DTYPES
    from gsgd_cli.train import Trainer, TrainSettings
    from gsgd_cli.train.checkpoint import load

    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"{run_dir} is not a gsgd train run directory (no .hydra/config.yaml); "
                        "pass the folder a run wrote (its summary.json says where).")
    path = run_dir / CHECKPOINTS[which]
    if not path.is_file():
        hint = ("the run kept none: train it with train.keep_best=METRIC, e.g. val_acc"
                if which == "best" else "the run never reached its first checkpoint")
        raise UserError(f"no {which} checkpoint at {path}: {hint}.")
    cfg = OmegaConf.load(config_file)
    dev = resolve_device(device)
    dtype = DTYPES.get(str(cfg.get("dtype", "float32")), torch.float32)
    state = load(path)
    data = load_data(cfg.data, dev)
    try:
        model = build_model(cfg.model, data.in_shape, data.num_classes)
        model = model.to(device=dev, dtype=dtype)
        model.load_state_dict(state["model"])
    except (ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise UserError(f"the weights in {path} do not fit the model its config builds "
                        f"({first}).") from None
    settings = TrainSettings(epochs=1, batch_size=min(len(data.train_y), 1),
                             eval_batch_size=int(cfg.train.eval_batch_size), dtype=dtype,
                             tensorboard=False)
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), data, run_dir,
                      settings)
    result = {"run_dir": str(run_dir), "checkpoint": which, "iteration": state["iteration"]}
    if which == "best":
        result[state["metric"] + "_recorded"] = state["value"]
    result["test_loss"], result["test_acc"] = trainer.evaluate("test")
    if data.has_val:
        result["val_loss"], result["val_acc"] = trainer.evaluate("val")
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        result = evaluate_run(Path(args.run_dir), args.checkpoint, args.device)
    except UserError as exc:
        print(f"gsgd eval: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        values = " ".join(f"{k} {result[k]:.4f}" for k in ("test_loss", "test_acc", "val_loss",
                                                            "val_acc") if k in result)
        print(f"gsgd eval: {result['run_dir']} {result['checkpoint']} checkpoint (iteration "
              f"{result['iteration']}): {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
