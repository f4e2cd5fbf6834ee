"""Aggregating runs into rows: one row per (data, model, optimizer, swept values).

The columns beyond data/model/optimizer are the config keys that differ between runs that
share the same data, model and optimizer (e.g. `model.width` in Figure 4's sweep,
`optimizer.lr` in Figure 5's grid); the seed is what each row averages over. Only completed
runs enter the means; the others are returned separately so that the report lists them.

Test error is `100 * (1 - accuracy)` in percent. `std` is the sample standard deviation
(n - 1 in the denominator) over distinct seeds, empty for a single seed: runs that repeat a
seed (the same run twice) are averaged into one value for that seed first, and the report says
which seeds were repeated, so repeats never shrink the spread.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .paper import invariant_ratio, model_label, paper_reference
from .runs import Run

# Keys that never define a row: bookkeeping, paths, and the seed (rows average over seeds).
IGNORED_KEYS = {"seed", "device", "progress", "resume", "cpu_threads", "tags", "data.root",
                "data.system_dir", "data.download", "train.eval_batch_size",
                "train.checkpoint_every", "train.tensorboard", "train.eval_every"}
IGNORED_PREFIXES = ("hydra.",)
OPTIMIZER_ORDER = {"sgd": 0, "path_sgd": 1, "gsgd": 2, "adam": 3, "gadam": 4, "rmsprop": 5,
                   "grmsprop": 6}
METRICS = (("final_test_error", "final test error %"), ("best_test_error", "best test error %"),
           ("final_train_loss", "final train loss"))
# shown when the runs held out a validation split (data.val_size > 0): choose settings by it
VAL_METRICS = (("final_val_error", "final val error %"),)


def metrics_for(runs: Iterable[Run]) -> tuple[tuple[str, str], ...]:
    has_val = any((r.summary or {}).get("final_val_acc") is not None for r in runs)
    return VAL_METRICS + METRICS if has_val else METRICS


def data_label(run: Run) -> str:
    return run.choice("data")


def group_key(run: Run) -> tuple[str, str, str]:
    return (data_label(run), model_label(run.config, run.choice("model")), run.choice("optimizer"))


def _fmt_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def _sortable(value: Any) -> tuple:
    if isinstance(value, bool) or value is None:
        return (1, str(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


def swept_keys(runs: Iterable[Run]) -> list[str]:
    """Config keys whose values differ between runs of the same (data, model, optimizer).

    Keys in IGNORED_KEYS (bookkeeping, paths, the seed) never count."""
    by_group: dict[tuple, list[Run]] = defaultdict(list)
    for run in runs:
        by_group[group_key(run)].append(run)
    keys: set[str] = set()
    for members in by_group.values():
        names = set().union(*(r.config for r in members))
        for name in names:
            if name in IGNORED_KEYS or name.startswith(IGNORED_PREFIXES):
                continue
            # runs written before a key existed do not make it a swept key
            values = {repr(r.config[name]) for r in members if name in r.config}
            if len(values) > 1:
                keys.add(name)
    return sorted(keys)


GROUP_PREFIXES = ("data.", "model.", "optimizer.", "schedule.", "train.")


def drop_redundant(runs: list[Run], keys: list[str]) -> list[str]:
    """Drop swept keys that split no row further (e.g. a top-level `reg_lambda` copied into
    `optimizer.weight_decay`): keys of the config groups are kept in preference."""
    def n_rows(names):
        return len({(group_key(r), tuple(repr(r.config.get(k)) for k in names)) for r in runs})

    ordered = sorted(keys, key=lambda k: (not k.startswith(GROUP_PREFIXES), k))
    kept = list(ordered)
    target = n_rows(kept)
    for key in reversed(ordered):
        trial = [k for k in kept if k != key]
        if n_rows(trial) == target:
            kept = trial
    return kept


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


@dataclass
class Row:
    data: str
    model: str
    optimizer: str
    swept: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    stats: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    paper: str = ""
    paper_error: float | None = None

    @property
    def seeds(self) -> list[Any]:
        """Distinct seeds, in order."""
        return list(dict.fromkeys(r.seed for r in self.runs))

    @property
    def repeated_seeds(self) -> dict[Any, int]:
        """Seeds run more than once -> number of runs."""
        counts: dict[Any, int] = defaultdict(int)
        for run in self.runs:
            counts[run.seed] += 1
        return {seed: n for seed, n in counts.items() if n > 1}

    @property
    def ratio(self) -> tuple[int, int, float] | None:
        """(m, H, H/m) for MLPs without biases (`paper.invariant_ratio`)."""
        return invariant_ratio(self.model, self.runs[0].config, self.num_parameters)

    @property
    def num_parameters(self) -> Any:
        counts = {(r.summary or {}).get("num_parameters") for r in self.runs}
        return counts.pop() if len(counts) == 1 else None


def run_values(run: Run) -> dict[str, float | None]:
    val_acc = (run.summary or {}).get("final_val_acc")
    return {
        "final_test_error": 100.0 * (1.0 - run.final("final_test_acc")),
        "best_test_error": 100.0 * (1.0 - run.final("best_test_acc")),
        "final_train_loss": run.final("final_train_loss"),
        "final_val_error": None if val_acc is None else 100.0 * (1.0 - float(val_acc)),
    }


def build_rows(runs: list[Run]) -> tuple[list[Row], list[str], list[Run]]:
    """(rows over completed runs, swept key names, incomplete runs)."""
    complete = [r for r in runs if r.complete]
    incomplete = [r for r in runs if not r.complete]
    keys = drop_redundant(runs, swept_keys(runs))
    rows: dict[tuple, Row] = {}
    for run in complete:
        data, model, optimizer = group_key(run)
        swept = {k: run.config.get(k) for k in keys}
        ident = (data, model, optimizer, tuple(repr(v) for v in swept.values()))
        if ident not in rows:
            text, err = paper_reference(data, model, optimizer, run.config)
            rows[ident] = Row(data, model, optimizer, swept, paper=text, paper_error=err)
        rows[ident].runs.append(run)
    for row in rows.values():
        row.runs.sort(key=lambda r: _sortable(r.seed))
        per_seed: dict[str, list] = defaultdict(list)
        for r in row.runs:
            per_seed[repr(r.seed)].append(run_values(r))
        for name, _ in VAL_METRICS + METRICS:
            values = []
            for repeats in per_seed.values():   # one value per distinct seed
                found = [v[name] for v in repeats if v[name] is not None]
                if found:
                    values.append(sum(found) / len(found))
            row.stats[name] = mean_std(values)
    ordered = sorted(rows.values(), key=lambda r: (
        r.data, r.model, *[_sortable(r.swept[k]) for k in keys],
        OPTIMIZER_ORDER.get(r.optimizer, 9), r.optimizer))
    return ordered, keys, incomplete


def selection_metric(rows: list[Row]) -> str:
    """What chooses the best setting among `rows`: the mean final error on the held-out
    validation split when every row has one (data.val_size > 0), else the mean final training
    loss. The test set never chooses."""
    if rows and all(r.stats.get("final_val_error", (None, None))[0] is not None for r in rows):
        return "final_val_error"
    return "final_train_loss"


SELECTION_LABELS = {"final_val_error": "lowest mean final validation error (held-out training "
                                       "examples)",
                    "final_train_loss": "lowest mean final training loss"}


def best_lr_rows(rows: list[Row]) -> list[Row]:
    """Per (data, model, optimizer): the row with the best `selection_metric` of its group
    (ties: the lower final training loss)."""
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        groups[(row.data, row.model, row.optimizer)].append(row)
    best = []
    for members in groups.values():
        metric = selection_metric(members)
        best.append(min(members, key=lambda r: (r.stats[metric][0],
                                                r.stats["final_train_loss"][0])))
    return sorted(best, key=lambda r: (r.data, r.model, OPTIMIZER_ORDER.get(r.optimizer, 9)))


def _fmt_stat(stat: tuple[float | None, float | None], digits: int) -> str:
    mean, std = stat
    if mean is None:
        return ""
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def _digits(name: str) -> int:
    return 4 if name == "final_train_loss" else 2


def _seeds_cell(row: Row) -> str:
    repeated = row.repeated_seeds
    return str(len(row.seeds)) + (" (repeated: " + ", ".join(
        f"seed {seed} x{n}" for seed, n in repeated.items()) + ")" if repeated else "")


def _ratio_cell(row: Row) -> str:
    ratio = row.ratio
    return "" if ratio is None else f"{ratio[2]:.3e}"


def markdown(rows: list[Row], keys: list[str], incomplete: list[Run],
             hidden: int = 0) -> str:
    metrics = metrics_for(r for row in rows for r in row.runs)
    show_ratio = any(row.ratio for row in rows)
    head = ["data", "model", "optimizer", *keys, "seeds", "params",
            *(["H/m"] if show_ratio else []), *[label for _, label in metrics],
            "paper (test error %)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.data, row.model, row.optimizer, *[_fmt_value(row.swept[k]) for k in keys],
                 _seeds_cell(row), "" if row.num_parameters is None else str(row.num_parameters),
                 *([_ratio_cell(row)] if show_ratio else []),
                 *[_fmt_stat(row.stats[name], _digits(name)) for name, _ in metrics], row.paper]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["(no completed runs)"] + [""] * (len(head) - 1)) + " |")
    text = "\n".join(lines) + "\n"
    text += ("\nMeans over distinct seeds (± sample std; runs repeating a seed are averaged "
             "first); test error = 100 × (1 − test accuracy); train loss = mean cross-entropy "
             "over the last evaluation interval.\n")
    if show_ratio:
        text += ("H/m: the invariant ratio of each MLP (H hidden units over m weights; the "
                 "paper's Table 5 prints h/m, half of it for two hidden layers).\n")
    if metrics is not METRICS:
        text += ("Val error: on the examples held out of the training split (data.val_size); "
                 "choose hyperparameters by it, not by the test error.\n")
    if incomplete:
        text += f"\nLeft out of the means ({len(incomplete)} incomplete or failed runs):\n\n"
        for run in incomplete:
            text += f"- {shown_path(run.path)}: {run.problem}\n"
    if hidden:
        text += (f"\n({hidden} folders of commands refused before training are not listed; "
                 "--all lists them.)\n")
    return text


def refused_before_training(run: Run) -> bool:
    """A `failed` folder of a single command refused before it trained (a bad override): no
    metrics, no checkpoint, not a job of a sweep (a sweep's failed jobs are results of the
    sweep and always listed). `gsgd report` hides these unless --all."""
    path = Path(run.path)
    in_sweep = any(path.parent.glob(".gsgd_job.*.json")) or (path.parent / "multirun.yaml").exists()
    return (run.status == "failed" and not in_sweep and not (path / "metrics.jsonl").exists()
            and not (path / "checkpoint.pt").exists())


def shown_path(path) -> str:
    """`path` relative to the working directory when it lies below it (so a committed report
    does not carry the checkout's location), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def best_markdown(rows: list[Row], keys: list[str]) -> str:
    """The best row of every (data, model, optimizer), chosen by `selection_metric`: the
    setting to run at (e.g. the learning rate of Figure 5's protocol)."""
    chosen = best_lr_rows(rows)
    metrics = metrics_for(r for row in chosen for r in row.runs)
    head = ["data", "model", "optimizer", *keys, "chosen by", "seeds",
            *[label for _, label in metrics]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in chosen:
        group = [r for r in rows if (r.data, r.model, r.optimizer) ==
                 (row.data, row.model, row.optimizer)]
        metric = selection_metric(group)
        cells = [row.data, row.model, row.optimizer, *[_fmt_value(row.swept[k]) for k in keys],
                 f"{SELECTION_LABELS[metric]} of {len(group)}", _seeds_cell(row),
                 *[_fmt_stat(row.stats[name], _digits(name)) for name, _ in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = metrics_for(r for row in rows for r in row.runs)
    stat_cols = [f"{name}_{part}" for name, _ in metrics for part in ("mean", "std")]
    writer.writerow(["data", "model", "optimizer", *keys, "n_seeds", "seeds", "n_runs",
                     "num_parameters", "invariant_ratio_H_over_m", *stat_cols, "paper",
                     "paper_test_error"])

    def num(value):
        return "" if value is None else repr(float(value))

    for row in rows:
        stats = [num(part) for name, _ in metrics for part in row.stats[name]]
        writer.writerow([_cell(row.data), _cell(row.model), _cell(row.optimizer),
                         *[_cell(row.swept[k]) for k in keys], len(row.seeds),
                         _cell(" ".join(str(s) for s in row.seeds)), len(row.runs),
                         "" if row.num_parameters is None else row.num_parameters,
                         "" if row.ratio is None else repr(row.ratio[2]), *stats,
                         row.paper, num(row.paper_error)])
    return out.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A CSV cell from a value read from a run: text that a spreadsheet would take for a
    formula (`=`, `+`, `-`, `@` first) gets a leading `'`; numbers stay numbers."""
    text = _fmt_value(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return text
    return "'" + text if text.startswith(FORMULA_STARTS) else text
