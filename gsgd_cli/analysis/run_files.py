"""Reading the files of a run directory as plain, bounded data.

Run directories travel between people, so what is read from them is data only:

* sizes are bounded and only regular files are read (no link, FIFO or device: `safe_files`);
* JSON and YAML are parsed to plain values; YAML aliases (`*name`, the "billion laughs") are
  refused, and nesting deeper than `MAX_DEPTH` is refused;
* `.hydra/config.yaml` keeps Hydra's interpolations as written. `resolve_references` replaces
  only a reference to another key of the same file (`${reg_lambda}`, `${model.width}`) by that
  key's plain value; nothing else is ever evaluated: no OmegaConf resolver (`oc.env`,
  `oc.decode`, ...) runs, whatever the spelling, so the reader's environment never enters a
  report.

Every problem is a `RunFileError` whose message is one line naming the file and the reason.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from gsgd_cli import safe_files

JSON_LIMIT = 1 << 20        # bytes of summary.json
YAML_LIMIT = 1 << 20        # bytes of a .hydra/*.yaml file
METRICS_LIMIT = 1 << 28     # bytes of metrics.jsonl (a line is ~300 bytes)
MAX_DEPTH = 32              # nesting of any value read (a config is ~4 deep)
NUMBER_LIMIT = 1e300        # larger numbers are not a metric


class RunFileError(ValueError):
    """A run file that cannot be used as it is; the message is one line."""


def read_text(path: Path, limit: int) -> str:
    try:
        return safe_files.read_text(path, limit)
    except safe_files.UnsafeFileError as exc:
        raise RunFileError(str(exc)) from None
    except UnicodeDecodeError:
        raise RunFileError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise RunFileError(f"cannot read {path}: {exc.strerror or exc}") from None


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `value` nests, counted up to `limit + 1` (without recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if deepest > limit:
            break
        if isinstance(node, dict):
            stack.extend((v, level + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, level + 1) for v in node)
    return deepest


def _shallow(value: Any, path: Path) -> Any:
    if depth(value) > MAX_DEPTH:
        raise RunFileError(f"{path} nests deeper than {MAX_DEPTH} levels; no run file does")
    return value


def parse_json(text: str, path: Path, where: str = "") -> Any:
    """`text` as JSON (`json.JSONDecodeError` for invalid JSON, as the caller reports it)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise RunFileError(f"{path}{where} nests deeper than {MAX_DEPTH} levels; no run "
                           "file does") from None
    return _shallow(value, path)


class _PlainLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` without aliases: a run's YAML never has them, and a nest of aliases
    expands into billions of values."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise RunFileError("uses a YAML alias (*name), which a config written by gsgd "
                               "train never has")
        return super().compose_node(parent, index)


def read_yaml(path: Path) -> Any:
    text = read_text(path, YAML_LIMIT)
    try:
        value = yaml.load(text, Loader=_PlainLoader)   # noqa: S506 (a safe loader)
    except RunFileError as exc:
        raise RunFileError(f"{path} {exc}") from None
    except RecursionError:
        raise RunFileError(f"{path} nests deeper than {MAX_DEPTH} levels; no run file "
                           "does") from None
    except yaml.YAMLError as exc:
        raise RunFileError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return _shallow(value, path)


def number_problem(value: Any) -> str | None:
    """Why `value` is not a metric (a number or null), or None."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {type(value).__name__} {str(value)[:40]!r}, not a number"
    if isinstance(value, int) and abs(value) > NUMBER_LIMIT:
        return "is a number too large for a metric"
    if isinstance(value, float) and math.isfinite(value) and abs(value) > NUMBER_LIMIT:
        return "is a number too large for a metric"
    return None


_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\}")


def resolve_references(flat: dict[str, Any], rounds: int = 8) -> dict[str, Any]:
    """`flat` (a flattened config) with every `${key}` that names another plain value of it
    replaced by that value (typed when it is the whole string); anything else, resolvers
    included, stays as its text."""
    out = dict(flat)
    for _ in range(rounds):
        changed = False
        for key, value in out.items():
            if not isinstance(value, str) or "${" not in value:
                continue
            whole = _REFERENCE.fullmatch(value)
            if whole:
                target = out.get(whole.group(1), value)
                if target is not value and _plain(target) and target != value:
                    out[key], changed = target, True
                continue

            def substitute(match: re.Match) -> str:
                if match.group(1) not in out:
                    return match.group(0)
                target = out[match.group(1)]
                if not _plain(target) or isinstance(target, str) and "${" in target:
                    return match.group(0)
                return str(target)

            new = _REFERENCE.sub(substitute, value)
            if new != value:
                out[key], changed = new, True
        if not changed:
            break
    return out


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
