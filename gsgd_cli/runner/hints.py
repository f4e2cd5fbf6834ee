"""Hints for `gsgd train` before and at the start of training: overrides that Hydra would refuse
with a generic error, the note that says which setting runs when a paper model is trained
outside its paper preset, and the commit of the checkout (`gsgd --version`).

Nothing here imports torch or Hydra: `check_train_overrides` runs before the application.
"""
from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path
from typing import Any

from .conf import CONF_DIR

SCHEDULE_KEYS = {"constant": {"name"}, "multistep": {"name", "unit", "milestones", "gamma"},
                 "exponential": {"name", "unit", "gamma"}}
# model presets of the paper -> the preset that runs the paper's setting with them
PAPER_MODELS = {"plain34": "table1", "resnet34": "table1"}


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                              capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() or None


def _choice(args: list[str], group: str) -> str | None:
    value = None
    for arg in args:
        if arg.startswith(f"{group}="):
            value = arg.split("=", 1)[1]
    return value


def _preset_schedule(experiment: str) -> str | None:
    """The schedule an experiment preset selects (`override /schedule: NAME`), if any."""
    seen: set[str] = set()
    while experiment and experiment not in seen:
        seen.add(experiment)
        path = CONF_DIR / "experiment" / f"{experiment}.yaml"
        if not path.is_file():
            return None
        text = path.read_text()
        found = re.search(r"override /schedule:\s*(\w+)", text)
        if found:
            return found.group(1)
        parent = re.search(r"^defaults:\s*\n\s*-\s*([\w/]+)\s*$", text, re.M)
        name = parent.group(1) if parent else ""
        if name.startswith("/experiment/"):
            name = name[len("/experiment/"):]
        elif name.startswith("/"):
            name = ""
        elif "/" in experiment:   # relative to the preset's own folder
            name = experiment.rsplit("/", 1)[0] + "/" + name
        experiment = name
    return None


def check_train_overrides(args: list[str]) -> str | None:
    """One line saying what is wrong with `gsgd train ARGS` that Hydra would only report with
    its generic error, or None. Today: a `schedule.KEY=` the chosen schedule does not have."""
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    schedule = _choice(overrides, "schedule")
    if schedule is None:
        experiment = _choice(overrides, "experiment")
        schedule = (_preset_schedule(experiment) if experiment else None) or "constant"
    known = SCHEDULE_KEYS.get(schedule)
    if known is None or "," in schedule:
        return None
    for arg in overrides:
        key = arg.split("=", 1)[0]
        if key.startswith("schedule.") and key.split(".", 2)[1] not in known:
            owners = [name for name, keys in SCHEDULE_KEYS.items()
                      if key.split(".", 2)[1] in keys]
            fix = (" or ".join(f"schedule={name}" for name in owners) if owners else
                   "a schedule that has it")
            return (f"{key} is not a setting of schedule={schedule} (it has: "
                    f"{', '.join(sorted(known))}); add {fix} to the command, e.g. "
                    f"gsgd train schedule={owners[0] if owners else 'multistep'} {arg}.")
    return None


def setting_note(choices: dict[str, Any], cfg: Any) -> str | None:
    """For a paper model trained outside its paper preset: one line saying which setting runs
    and how to get the paper's (and its small-budget variant)."""
    model = choices.get("model")
    if model not in PAPER_MODELS or choices.get("experiment"):
        return None
    preset = PAPER_MODELS[model]
    budget = (f"{cfg.train.iterations} iterations" if cfg.train.get("iterations") is not None
              else f"{cfg.train.epochs} epochs")
    return (f"model={model} is the paper's Table 1 network, here on data={choices.get('data')} "
            f"with optimizer={choices.get('optimizer')} lr {cfg.optimizer.lr}, "
            f"schedule={choices.get('schedule')}, batch {cfg.train.batch_size}, {budget}: not the "
            f"paper's setting. The paper's: gsgd train experiment={preset} (CIFAR-10/100, 64k "
            f"iterations, lr 1.0); in minutes on a CPU: gsgd train experiment=small/{preset}")
