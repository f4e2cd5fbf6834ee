"""Aggregating runs into rows: one row per (data, model, optimizer, swept values).

The columns beyond data/model/optimizer are the config keys that differ between runs that
share the same data, model and optimizer (e.g. `model.width` in Figure 4's sweep,
`optimizer.lr` in Figure 5's grid); the seed is what each row averages over. Only completed
runs enter the means; the others are returned separately so that the report lists them.

Test error is `100 * (1 - accuracy)` in percent. `std` is the sample standard deviation
(n - 1 in the denominator), empty for a single seed.
"""
from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .paper import model_label, paper_reference
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
        return [r.seed for r in self.runs]

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
        values = [run_values(r) for r in row.runs]
        for name, _ in VAL_METRICS + METRICS:
            row.stats[name] = mean_std([v[name] for v in values if v[name] is not None])
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


def markdown(rows: list[Row], keys: list[str], incomplete: list[Run]) -> str:
    metrics = metrics_for(r for row in rows for r in row.runs)
    head = ["data", "model", "optimizer", *keys, "seeds", "params",
            *[label for _, label in metrics], "paper (test error %)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.data, row.model, row.optimizer, *[_fmt_value(row.swept[k]) for k in keys],
                 str(len(row.runs)), "" if row.num_parameters is None else str(row.num_parameters),
                 *[_fmt_stat(row.stats[name], _digits(name)) for name, _ in metrics], row.paper]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["(no completed runs)"] + [""] * (len(head) - 1)) + " |")
    text = "\n".join(lines) + "\n"
    text += ("\nMeans over seeds (± sample std); test error = 100 × (1 − test accuracy); train "
             "loss = mean cross-entropy over the last evaluation interval.\n")
    if metrics is not METRICS:
        text += ("Val error: on the examples held out of the training split (data.val_size); "
                 "choose hyperparameters by it, not by the test error.\n")
    if incomplete:
        text += f"\nLeft out of the means ({len(incomplete)} incomplete or failed runs):\n\n"
        for run in incomplete:
            text += f"- {shown_path(run.path)}: {run.problem}\n"
    return text


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
                 f"{SELECTION_LABELS[metric]} of {len(group)}", str(len(row.runs)),
                 *[_fmt_stat(row.stats[name], _digits(name)) for name, _ in metrics]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def width_gap_markdown(rows: list[Row]) -> str:
    """Figure 4's comparison as a table: for every data set and MLP width h run with both SGD
    and G-SGD, the gap SGD - G-SGD of the mean final training loss and test error (positive:
    G-SGD lower) with its standard error `sqrt(s_sgd^2/n_sgd + s_gsgd^2/n_gsgd)` over seeds, and
    the gap in units of that error. Empty when no width was run with both."""
    by_key: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in rows:
        width = row.swept.get("model.width")
        if row.model == "mlp" and width is not None:
            by_key[(row.data, width)][row.optimizer] = row
    pairs = sorted((k, v) for k, v in by_key.items() if {"sgd", "gsgd"} <= set(v))
    if not pairs:
        return ""
    head = ["data", "h", "seeds (SGD/G-SGD)", "Δ final train loss", "Δ/se", "Δ final test error %",
            "Δ/se", "G-SGD lower loss?", "G-SGD lower error?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (data, width), pair in pairs:
        sgd, gsgd = pair["sgd"], pair["gsgd"]
        cells = [data, _fmt_value(width), f"{len(sgd.runs)}/{len(gsgd.runs)}"]
        lower = []
        for name in ("final_train_loss", "final_test_error"):
            (m1, s1), (m2, s2) = sgd.stats[name], gsgd.stats[name]
            gap = m1 - m2
            se = (math.sqrt((s1 or 0.0) ** 2 / len(sgd.runs) + (s2 or 0.0) ** 2 / len(gsgd.runs))
                  if s1 is not None and s2 is not None else None)
            digits = _digits(name)
            cells += [f"{gap:+.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}"),
                      "" if not se else f"{gap / se:+.1f}"]
            lower.append("yes" if gap > 0 else "no")
        lines.append("| " + " | ".join(cells + lower) + " |")
    return ("\n".join(lines) + "\n\nΔ = SGD − G-SGD of the means over seeds (positive: G-SGD "
            "lower) ± its standard error; Δ/se beyond about ±2 is a gap larger than the seeds' "
            "spread.\n")


def to_csv(rows: list[Row], keys: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    metrics = metrics_for(r for row in rows for r in row.runs)
    stat_cols = [f"{name}_{part}" for name, _ in metrics for part in ("mean", "std")]
    writer.writerow(["data", "model", "optimizer", *keys, "n_seeds", "seeds", "num_parameters",
                     *stat_cols, "paper", "paper_test_error"])

    def num(value):
        return "" if value is None else repr(float(value))

    for row in rows:
        stats = [num(part) for name, _ in metrics for part in row.stats[name]]
        writer.writerow([row.data, row.model, row.optimizer,
                         *[_fmt_value(row.swept[k]) for k in keys], len(row.runs),
                         " ".join(str(s) for s in row.seeds),
                         "" if row.num_parameters is None else row.num_parameters, *stats,
                         row.paper, num(row.paper_error)])
    return out.getvalue()
