"""The floors of the package (README, "The library"): a module imports only from its own floor or below, and no
two modules import each other, directly or around a loop. Every import counts — at the top of a module or
inside a function (a deferred import climbs all the same) — except those under `if TYPE_CHECKING:` (types
only, never run).

    0  errors, fileio, seeding, metric_names   the words everything uses
    1  core/                                    pure tensor math
    2  models/, tasks/, metrics                 loading and scoring models; tasks and rewards; metric files
    3  rollout/                                 engines
    4  eval                                     the evaluation kernel
    5  train/                                   config, rollout source, prepare, update, loop, checkpoints
    6  integrations/, cli, eval_cli, plot, simulate, __main__   entry points and adapters
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jackpot"
FLOORS = {  # the longest matching prefix names a module's floor
    "jackpot": 0, "jackpot.errors": 0, "jackpot.fileio": 0, "jackpot.seeding": 0, "jackpot.metric_names": 0,
    "jackpot.configs": 0,
    "jackpot.core": 1,
    "jackpot.models": 2, "jackpot.tasks": 2, "jackpot.metrics": 2,
    "jackpot.rollout": 3,
    "jackpot.eval": 4,
    "jackpot.train": 5,
    "jackpot.integrations": 6, "jackpot.cli": 6, "jackpot.eval_cli": 6, "jackpot.plot": 6, "jackpot.simulate": 6,
    "jackpot.__main__": 6,
}


def floor(module: str) -> int:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in FLOORS:
            return FLOORS[".".join(parts[:n])]
    raise KeyError(f"{module}: no floor in tests/test_imports.py FLOORS (add it, and to the README's module map)")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str) -> set[str]:
    """The jackpot modules (and `module.name` candidates) `source` imports at run time."""
    tree = ast.parse(source)
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("jackpot"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("jackpot")}
    return found


def graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (not counting its own parent packages, which every import of
    a submodule runs first)."""
    sources = {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports(src) if t in sources and t != m and not m.startswith(t + ".")}
            for m, src in sources.items()}


def climbing(edges: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
                  for m, targets in edges.items() for t in targets if floor(t) > floor(m))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import loop, each once (a depth-first search; loops through a package's __init__ count too)."""
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for t in sorted(edges.get(m, ())):
            if state.get(t) == "open":
                found.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t, path + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    return found


def test_no_import_climbs_a_floor():
    assert climbing(graph()) == []


def test_no_two_modules_import_each_other():
    assert cycles(graph()) == []


def test_every_module_has_a_floor():
    for m in graph():
        floor(m)


@pytest.mark.parametrize(("edges", "climbs", "loops"), [
    ({"jackpot.rollout.weights": {"jackpot.train.distributed"}, "jackpot.train.distributed": set()}, 1, 0),
    ({"jackpot.train.config": {"jackpot.train.config_checks"},
      "jackpot.train.config_checks": {"jackpot.train.config"}}, 0, 1),
    ({"jackpot.train.loop": {"jackpot.rollout", "jackpot.core.obrs"}}, 0, 0),
])
def test_the_checks_see_a_climb_and_a_loop(edges, climbs, loops):
    """The two import faults this file guards against, as they once were in the package."""
    assert len(climbing(edges)) == climbs and len(cycles(edges)) == loops


def test_a_deferred_import_counts_and_a_typing_one_does_not():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from jackpot.train.config import Config\n"
              "def f():\n    from jackpot.train.distributed import is_sharded\n")
    assert imports(source) == {"jackpot.train.distributed", "jackpot.train.distributed.is_sharded"}
