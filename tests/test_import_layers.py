"""The import structure of `gsgd_cli`: no circle between modules, no import from a lower floor up.

Every `import` / `from ... import` in every module counts, including imports inside functions
(a lazy import is still an arrow). Packages sit on the floors of `FLOORS`; a module may import
only from its own package or from a package on a lower floor.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gsgd_cli"

# floor of each top-level part of gsgd_cli (a subpackage, or a module directly under gsgd_cli)
FLOORS = {
    "gsgd_cli": 0, "errors": 0, "safe_files": 0, "config_tree": 0,  # plain helpers, no torch
    "graph": 1, "data": 1, "models": 1,                              # what the network and data are
    "gspace": 2, "pathnorm": 2,                                      # the math of each optimizer
    "optim": 3,                                                      # the torch.optim classes
    "train": 4, "testing": 4,                                        # one training run; references
    "runner": 5,                                                     # a configured job
    "analysis": 6,                                                   # reading finished runs
    "cli": 7,                                                        # the commands
    "__main__": 8,                                                   # the dispatcher
}


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gsgd_cli modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:          # `from pkg import name`: the module
                target = target.rpartition(".")[0]
            # a module's own package __init__ is where Python finds it, not an arrow
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def floor_part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_arrows(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for source, targets in edges.items():
        for target in targets:
            a, b = floor_part(source), floor_part(target)
            if a != b and FLOORS[b] >= FLOORS[a]:
                wrong.append(f"{source} (floor {FLOORS[a]}) imports {target} (floor {FLOORS[b]})")
    return sorted(wrong)


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_every_part_of_the_package_has_a_floor():
    assert {floor_part(name) for name in module_names()} <= set(FLOORS)


def test_no_import_runs_up_a_floor():
    assert upward_arrows(graph()) == []


def test_no_import_circle():
    assert circles(graph()) == []


def test_inspect_does_not_import_the_train_entry():
    assert "gsgd_cli.cli.train" not in graph()["gsgd_cli.cli.inspect"]


@pytest.mark.parametrize("edges, expected", [
    ({"gsgd_cli.data.a": {"gsgd_cli.train.b"}, "gsgd_cli.train.b": set()}, 1),
    ({"gsgd_cli.train.b": {"gsgd_cli.data.a"}, "gsgd_cli.data.a": set()}, 0),
    ({"gsgd_cli.data.a": {"gsgd_cli.models.b"}, "gsgd_cli.models.b": set()}, 1),   # same floor
])
def test_upward_arrows_are_found(edges, expected):
    assert len(upward_arrows(edges)) == expected


def test_circles_are_found():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(edges) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []
