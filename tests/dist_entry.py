"""`gsgd train` as torchrun starts it in the data-parallel tests (tests/runner/test_distributed.py),
plus test probes that only observe, recorded in `$GSGD_TEST_DUMP` (never under the run):

* every write this process makes below `$GSGD_TEST_WATCH` (Python's audit hooks: `open` for
  writing, `mkdir`, `rename`, `replace`, `remove`, `rmdir`, `rmtree`), as
  `writes.rank<R>.json`;
* each rank's model weights when `Trainer.fit` ends, as `<run dir name>.rank<R>.pt`;
* how often each rank loaded the data set, as `loads.rank<R>.json`.

`GSGD_TEST_MUTATION=no_allreduce` breaks data-parallel training on purpose (no
DistributedDataParallel: each rank trains on its own share alone), for the mutation check.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

DUMP = Path(os.environ["GSGD_TEST_DUMP"]).resolve()
WATCH = Path(os.environ["GSGD_TEST_WATCH"]).resolve()
RANK = int(os.environ["RANK"])
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PATH_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree",
               "os.truncate", "os.symlink", "os.link"}
writes: list[str] = []
loads: list[str] = []


def _watched(path) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        full = Path(os.fsdecode(path)).resolve()
    except (TypeError, ValueError, OSError):
        return None
    if full == DUMP or DUMP in full.parents:
        return None
    return str(full) if (full == WATCH or WATCH in full.parents) else None


def audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & WRITE_FLAGS)
        if writing and (found := _watched(path)):
            writes.append(f"open {found}")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if (found := _watched(path)):
                writes.append(f"{event} {found}")


def save_records() -> None:
    DUMP.mkdir(parents=True, exist_ok=True)
    (DUMP / f"writes.rank{RANK}.json").write_text(json.dumps(writes))
    (DUMP / f"loads.rank{RANK}.json").write_text(json.dumps(loads))


def install_probes() -> None:
    import torch

    import gsgd_cli.runner.job as job   # loads the data of each job
    from gsgd_cli.train import distributed
    from gsgd_cli.train.trainer import Trainer

    original_fit, original_load = Trainer.fit, job.load_data

    def fit(self, *args, **kwargs):
        try:
            return original_fit(self, *args, **kwargs)
        finally:
            weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            torch.save(weights, DUMP / f"{self.run_dir.name}.rank{RANK}.pt")

    def load_data(data_cfg, device="cpu"):
        loads.append(str(data_cfg.name))
        return original_load(data_cfg, device)

    Trainer.fit = fit
    job.load_data = load_data
    if os.environ.get("GSGD_TEST_MUTATION") == "no_allreduce":
        distributed.Ranks.wrap = lambda self, model, device: model


if __name__ == "__main__":
    DUMP.mkdir(parents=True, exist_ok=True)
    sys.addaudithook(audit)
    atexit.register(save_records)
    install_probes()
    from gsgd_cli.__main__ import main

    sys.exit(main(["gsgd", "train", *sys.argv[1:]]))
