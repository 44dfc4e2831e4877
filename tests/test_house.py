"""The import graph runs top to bottom: cli -> merge -> align -> eval -> archs -> symmetry, io -> core.

A package imports only packages below it (symmetry and io, side by side, not each other), and no
module imports itself back through others. Imports inside functions and under TYPE_CHECKING count
too: a cycle hidden in a function is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import rotfuse

ROOT = Path(rotfuse.__file__).parent
RANK = {"core": 0, "io": 1, "symmetry": 1, "archs": 2, "eval": 3, "align": 4, "merge": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every rotfuse module -> the rotfuse modules it imports (anywhere in its body)."""
    graph: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        if "configs" in path.parts:
            continue
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rotfuse"):
                targets.add(node.module)
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name.startswith("rotfuse")}
        graph[module_name(path)] = targets
    return graph


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_packages_import_only_downwards() -> None:
    upward = []
    for module, targets in imports().items():
        mine = package(module)
        for target in targets:
            theirs = package(target)
            if mine and theirs and theirs != mine and RANK[theirs] >= RANK[mine]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_back() -> None:
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target not in graph:
                continue
            if state.get(target) == 1:
                cycle = [*path[path.index(target) :], target] if target in path else [module, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_check_can_fail() -> None:
    """The rank rule flags an upward import (so the test above is not vacuous)."""
    assert RANK[package("rotfuse.cli.match")] > RANK[package("rotfuse.core.errors")]  # type: ignore[index]
    assert package("rotfuse.align.pair") == "align" and package("rotfuse") is None
