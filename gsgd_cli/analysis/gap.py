"""Figure 4's comparison of SGD with G-SGD per MLP width: pairs of rows, the gap of their means
with its standard error over distinct seeds, and a verdict that respects that error."""
from __future__ import annotations

import math
from collections import defaultdict

from .table import Row, _digits, _fmt_value, _sortable


GAP_TEST_ERRORS = {"final": "final_test_error", "best": "best_test_error"}


def width_gap_markdown(rows: list[Row], test_error: str = "final") -> str:
    """Figure 4's comparison as a table: for every data set and MLP width h run with both SGD
    and G-SGD, the gap SGD - G-SGD of the mean final training loss and test error (positive:
    G-SGD lower) with its standard error `sqrt(s_sgd^2/n_sgd + s_gsgd^2/n_gsgd)` over seeds, and
    the gap in units of that error. Empty when no width was run with both.

    `test_error="best"`: the test error is each run's best over its evaluations (every epoch)
    instead of its last one; that epoch is chosen on the test set itself."""
    by_key, others = width_pairs(rows)
    pairs = sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][2], _sortable(kv[0][1])))
    if not pairs:
        return ""
    head = ["data", *(["setting"] if others else []), "h", "seeds (SGD/G-SGD)",
            "Δ final train loss", "Δ/se", f"Δ {test_error} test error %", "Δ/se", "G-SGD lower loss?",
            "G-SGD lower error?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (data, width, setting), pair in pairs:
        sgd, gsgd = pair["sgd"], pair["gsgd"]
        cells = [data, *([setting or "-"] if others else []), _fmt_value(width),
                 f"{len(sgd.seeds)}/{len(gsgd.seeds)}"]
        lower = []
        for name in ("final_train_loss", GAP_TEST_ERRORS[test_error]):
            (m1, s1), (m2, s2) = sgd.stats[name], gsgd.stats[name]
            gap = m1 - m2
            se = gap_se(sgd, gsgd, name)
            digits = _digits(name)
            cells += [f"{gap:+.{digits}f}" + ("" if se is None else f" ± {se:.{digits}f}"),
                      "" if not se else f"{gap / se:+.1f}"]
            lower.append(lower_verdict(gap, se))
        lines.append("| " + " | ".join(cells + lower) + " |")
    note = ("\n\nΔ = SGD − G-SGD of the means over seeds (positive: G-SGD lower) ± its standard "
            "error; \"within 2 se\": |Δ| < 2 se, no difference the seeds can tell apart; "
            "\"no se\": a single seed, no spread to judge by.\n")
    if others:
        note += ("setting: the other settings that differ between these runs (" +
                 ", ".join(others) + "); each is compared on its own.\n")
    return "\n".join(lines) + note


def gap_se(sgd: Row, gsgd: Row, name: str) -> float | None:
    """Standard error of the difference of two means over distinct seeds."""
    (_, s1), (_, s2) = sgd.stats[name], gsgd.stats[name]
    if s1 is None or s2 is None:
        return None
    return math.sqrt(s1 ** 2 / len(sgd.seeds) + s2 ** 2 / len(gsgd.seeds))


def lower_verdict(gap: float, se: float | None) -> str:
    if se is None:
        return ("yes" if gap > 0 else "no") + " (no se)"
    if abs(gap) < 2 * se:
        return "within 2 se"
    return "yes" if gap > 0 else "no"


def width_pairs(rows: list[Row]) -> tuple[dict[tuple, dict[str, Row]], list[str]]:
    """MLP rows by (data, width, the other differing settings as text) -> {optimizer: row},
    only where both SGD and G-SGD ran; and the names of those other settings. Nothing is
    dropped: runs that differ in anything but the optimizer and seed are compared apart."""
    mlp = [r for r in rows if r.model == "mlp" and r.swept.get("model.width") is not None]
    others = sorted({k for r in mlp for k in r.swept if k != "model.width"
                     and len({repr(x.swept.get(k)) for x in mlp}) > 1})
    by_key: dict[tuple, dict[str, Row]] = defaultdict(dict)
    for row in mlp:
        setting = " ".join(f"{k}={_fmt_value(row.swept.get(k))}" for k in others)
        by_key[(row.data, row.swept["model.width"], setting)][row.optimizer] = row
    return {k: v for k, v in by_key.items() if {"sgd", "gsgd"} <= set(v)}, others
