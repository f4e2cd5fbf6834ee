"""The paper's figure forms, drawn from completed runs with matplotlib (Agg backend).

* `plot_curves`       Figure 3 (and 7-8): training loss (log scale) and test accuracy against
                      epochs, one row per data set, one line per (model, optimizer, swept
                      values): the mean over seeds with a band from the lowest to the highest
                      seed.
* `plot_width_sweep`  Figure 4: final training loss and final test error against the hidden
                      width h (log2 axis) for each optimizer (mean ± std over seeds), and the
                      gap Delta = SGD - G-SGD of both.
* `plot_best_lr`      Figure 5: for each data set and optimizer, the curves at the learning
                      rate with the lowest mean final *validation* error when the runs held out a
                      validation split (data.val_size > 0), else the lowest mean final
                      *training* loss (the choice never looks at the test set).

Each function writes `<out>/<name>.png` and `.pdf` and returns the paths.
"""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

from gsgd_cli import safe_files

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Labels carry values read from run directories: `$` in them is text, not TeX math (a value
# with an odd number of `$` would otherwise stop the drawing).
plt.rcParams["text.parse_math"] = False
from matplotlib.ticker import LogFormatter  # noqa: E402

from .gap import gap_se, width_pairs  # noqa: E402
from .table import (OPTIMIZER_ORDER, SELECTION_LABELS, Row, _fmt_value, best_lr_rows,  # noqa: E402
                    mean_std, run_values, selection_metric)

OPTIMIZER_NAMES = {"sgd": "SGD", "gsgd": "G-SGD", "path_sgd": "Path-SGD", "adam": "Adam",
                   "gadam": "G-Adam", "rmsprop": "RMSprop", "grmsprop": "G-RMSprop"}
MODEL_NAMES = {"plain34": "Plain-34", "resnet34": "ResNet-34", "mlp": "MLP"}
DATA_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "mnist": "MNIST",
              "fashion_mnist": "Fashion-MNIST", "synthetic": "synthetic"}
LINESTYLES = {"gsgd": "-", "sgd": "--", "path_sgd": ":", "gadam": "-", "adam": "--",
              "grmsprop": "-", "rmsprop": "--"}
OPTIMIZER_COLOURS = {"sgd": "tab:blue", "gsgd": "tab:red", "path_sgd": "tab:green",
                     "adam": "tab:orange", "gadam": "tab:brown", "rmsprop": "tab:olive",
                     "grmsprop": "tab:pink"}
SHORT_KEYS = {"model.width": "h", "optimizer.lr": "lr", "optimizer.weight_decay": "wd",
              "optimizer.bpr": "bpr"}


def _save(fig, out: Path, name: str) -> list[Path]:
    """`<out>/<name>.png` and `.pdf`, each written atomically and never through a link."""
    safe_files.make_dir(out)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight")
        safe_files.write_atomic(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


def row_label(row: Row, keys: list[str], with_model: bool = True) -> str:
    parts = [MODEL_NAMES.get(row.model, row.model)] if with_model else []
    parts.append(OPTIMIZER_NAMES.get(row.optimizer, row.optimizer))
    for key in keys:
        if row.swept.get(key) is not None:
            parts.append(f"{SHORT_KEYS.get(key, key)}={_fmt_value(row.swept[key])}")
    return " ".join(parts)


def seed_curves(row: Row) -> tuple[list[float], dict[str, list[list[float]]]]:
    """(epochs, {metric: [per-seed values]}) on the evaluations that every seed has."""
    common = None
    for run in row.runs:
        its = {m["iteration"] for m in run.metrics}
        common = its if common is None else common & its
    iterations = sorted(common or ())
    per_run = [{m["iteration"]: m for m in run.metrics} for run in row.runs]
    epochs = [per_run[0][it]["epoch"] for it in iterations]
    curves = {key: [[metrics[it][key] for it in iterations] for metrics in per_run]
              for key in ("train_loss", "test_acc")}
    return epochs, curves


def _band(ax, x, per_seed, label, color, style="-"):
    mean = [sum(vals) / len(vals) for vals in zip(*per_seed)]
    ax.plot(x, mean, label=label, color=color, lw=1.5, ls=style,
            marker="o" if len(x) <= 20 else None, ms=3)
    if len(per_seed) > 1:
        ax.fill_between(x, [min(v) for v in zip(*per_seed)], [max(v) for v in zip(*per_seed)],
                        color=color, alpha=0.2, lw=0)


def distinct_colours(n: int) -> list[Any]:
    """`n` colours, no two alike: tab10 / tab20 up to 20, else evenly spaced on turbo."""
    if n <= 10:
        return [plt.get_cmap("tab10")(k) for k in range(n)]
    if n <= 20:
        return [plt.get_cmap("tab20")(k) for k in range(n)]
    return [plt.get_cmap("turbo")(k / (n - 1)) for k in range(n)]


def _legend(ax, entries: int) -> None:
    """Inside where matplotlib finds the emptiest corner for a few entries; beside the axes
    (never over the data) for many."""
    if entries > 6:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0,
                  ncol=2 if entries > 24 else 1)
    else:
        ax.legend(fontsize=8, loc="best")


def plot_curves(rows: list[Row], keys: list[str], out: Path, name: str = "fig3_curves",
                title: str | None = None, colour_by_optimizer: bool = False) -> list[Path]:
    """Line style: the optimizer. Colour: the model and swept values, so that SGD and G-SGD of
    one setting share it; the optimizer (as in Figure 4) when `colour_by_optimizer` or when the
    lines of a data set differ only by optimizer."""
    datasets = sorted({r.data for r in rows})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False)
    for i, data in enumerate(datasets):
        members = [r for r in rows if r.data == data]
        multi_model = len({r.model for r in members}) > 1
        variants = list(dict.fromkeys((r.model, tuple(repr(r.swept[k]) for k in keys))
                                      for r in members))
        by_optimizer = colour_by_optimizer or len(variants) == 1
        colours = distinct_colours(len(variants))
        for row in members:
            epochs, curves = seed_curves(row)
            label = row_label(row, keys, with_model=multi_model)
            variant = variants.index((row.model, tuple(repr(row.swept[k]) for k in keys)))
            color = (OPTIMIZER_COLOURS.get(row.optimizer, "k") if by_optimizer
                     else colours[variant])
            style = LINESTYLES.get(row.optimizer, "-.")
            _band(axes[i][0], epochs, curves["train_loss"], label, color, style)
            _band(axes[i][1], epochs, curves["test_acc"], label, color, style)
        name_d = DATA_NAMES.get(data, data)
        _log_scale(axes[i][0], "y")
        axes[i][0].set_ylabel(f"{name_d}\ntraining loss (log scale)")
        axes[i][1].set_ylabel("test accuracy")
        for ax in axes[i]:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3, which="both")
        axes[i][0].set_title(f"{name_d}: training loss")
        axes[i][1].set_title(f"{name_d}: test accuracy")
        _legend(axes[i][1], len(members))
    n_seeds = sorted({len(r.seeds) for r in rows})
    fig.suptitle(title or "Training loss and test accuracy per epoch (mean over "
                 f"{'/'.join(map(str, n_seeds))} seeds, band: min to max; "
                 "solid G-SGD, dashed SGD, dotted Path-SGD)")
    fig.tight_layout()
    return _save(fig, out, name)


def width_sweep_ready(rows: list[Row], keys: list[str]) -> bool:
    if "model.width" not in keys:
        return False
    optimizers = {r.optimizer for r in rows if r.model == "mlp"}
    widths = {r.swept["model.width"] for r in rows if r.model == "mlp"}
    return {"sgd", "gsgd"} <= optimizers and len(widths) >= 2


def plot_width_sweep(rows: list[Row], out: Path, name: str = "fig4_width_sweep") -> list[Path]:
    """Figure 4: final train loss and test error against h (top, mean ± std over seeds), the
    gap SGD - G-SGD with its standard error (below). Runs that differ in another setting (e.g.
    the number of epochs) are drawn as separate curves (line style), never dropped."""
    mlp = [r for r in rows if r.model == "mlp" and r.swept.get("model.width") is not None]
    pairs, others = width_pairs(mlp)
    datasets = sorted({r.data for r in mlp})
    fig, axes = plt.subplots(2 * len(datasets), 2, figsize=(11, 7.5 * len(datasets)), squeeze=False)
    styles = {"sgd": ("tab:blue", "o"), "gsgd": ("tab:red", "s"), "path_sgd": ("tab:green", "^"),
              "adam": ("tab:orange", "v"), "gadam": ("tab:brown", "D"),
              "rmsprop": ("tab:olive", "<"), "grmsprop": ("tab:pink", ">")}
    dashes = ["-", "--", ":", "-."]
    metrics = (("final_train_loss", "final training loss"), ("final_test_error", "final test error (%)"))

    def setting_of(row: Row) -> str:
        return " ".join(f"{k}={_fmt_value(row.swept.get(k))}" for k in others)

    settings = sorted({setting_of(r) for r in mlp})
    for i, data in enumerate(datasets):
        top, bottom = axes[2 * i], axes[2 * i + 1]
        name_d = DATA_NAMES.get(data, data)
        curves: dict[tuple[str, str], dict[Any, Row]] = defaultdict(dict)
        for row in (r for r in mlp if r.data == data):
            curves[(row.optimizer, setting_of(row))][row.swept["model.width"]] = row
        for (opt, setting) in sorted(curves, key=lambda k: (OPTIMIZER_ORDER.get(k[0], 9), k[1])):
            color, marker = styles.get(opt, ("k", "x"))
            style = dashes[settings.index(setting) % len(dashes)]
            widths = sorted(curves[(opt, setting)])
            label = OPTIMIZER_NAMES.get(opt, opt) + (f" ({setting})" if setting else "")
            for ax, (metric, _) in zip(top, metrics):
                means = [curves[(opt, setting)][w].stats[metric][0] for w in widths]
                stds = [curves[(opt, setting)][w].stats[metric][1] or 0.0 for w in widths]
                ax.errorbar(widths, means, yerr=stds, color=color, marker=marker, capsize=3,
                            ls=style, label=label)
        for ax, (metric, label) in zip(bottom, metrics):
            for setting in settings:
                shared = sorted((w, pair) for (d, w, s_), pair in pairs.items()
                                if d == data and s_ == setting)
                if not shared:
                    continue
                widths = [w for w, _ in shared]
                gaps = [p["sgd"].stats[metric][0] - p["gsgd"].stats[metric][0] for _, p in shared]
                errors = [gap_se(p["sgd"], p["gsgd"], metric) or 0.0 for _, p in shared]
                ax.errorbar(widths, gaps, yerr=errors, color="tab:purple", marker="D", capsize=3,
                            ls=dashes[settings.index(setting) % len(dashes)],
                            label="Δ = SGD − G-SGD ± se" + (f" ({setting})" if setting else ""))
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(f"Δ {label}")
            ax.set_title(f"{name_d}: gap in {label.replace('final ', '')} "
                         "(above 0: G-SGD lower)")
            _legend(ax, len(settings))
        for ax, (metric, label) in zip(top, metrics):
            ax.set_ylabel(label)
            ax.set_title(f"{name_d}: {label}")
            _legend(ax, len(curves))
        _log_scale(top[0], "y")
        for ax in (*top, *bottom):
            _log_scale(ax, "x", base=2)
            ax.set_xlabel("hidden nodes per layer h  (MLP [in:h:h:10], H = 2h)")
            ax.grid(alpha=0.3, which="both")
    n_seeds = sorted({len(r.seeds) for r in mlp})
    epochs = sorted({r.runs[0].summary.get("epochs") for r in mlp if r.runs[0].summary})
    fig.suptitle("Figure 4 form: SGD vs G-SGD against width h\n(mean ± std over "
                 f"{'/'.join(map(str, n_seeds))} seeds, {'/'.join(f'{e:g}' for e in epochs)} "
                 "epochs; gap ± its standard error"
                 + (f"; line style: {', '.join(others)}" if others else "") + ")")
    fig.tight_layout()
    return _save(fig, out, name)


def plot_best_lr(rows: list[Row], keys: list[str], out: Path,
                 name: str = "fig5_best_lr") -> list[Path]:
    chosen = best_lr_rows(rows)
    criteria = sorted({SELECTION_LABELS[selection_metric(
        [r for r in rows if (r.data, r.model, r.optimizer) == (c.data, c.model, c.optimizer)])]
        for c in chosen})
    return plot_curves(chosen, keys, out, name=name, colour_by_optimizer=True,
                       title="Figure 5 form: each optimizer at its best learning rate "
                             f"({'; '.join(criteria)}; mean over seeds, band: min to max)")


__all__ = ["plot_curves", "plot_width_sweep", "plot_best_lr", "best_lr_rows",
           "selection_metric", "width_sweep_ready",
           "seed_curves", "mean_std", "run_values"]


def _log_scale(ax, which: str, base: int = 10) -> None:
    """A log-scale axis whose tick labels are plain text (`1e-01`, `2e-01`, `64`): with TeX
    parsing off (above), the default labels would show their TeX source."""
    (ax.set_yscale if which == "y" else ax.set_xscale)("log", base=base)
    axis = ax.yaxis if which == "y" else ax.xaxis
    axis.set_major_formatter(LogFormatter(base=base, labelOnlyBase=False))
    axis.set_minor_formatter(LogFormatter(base=base, labelOnlyBase=False))
