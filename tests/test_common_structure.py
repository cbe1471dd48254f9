"""common/ is a library of blocks: no import cycles between its modules, and no module that reaches
into an experiment folder."""
from __future__ import annotations

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "common"


def _imports(path: Path) -> set[str]:
    """The common modules (and other top-level modules) a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name.removeprefix("common.") for name in found}


def test_no_import_cycles_in_common():
    modules = {p.stem for p in COMMON.glob("*.py")}
    graph = {p.stem: _imports(p) & modules for p in COMMON.glob("*.py")}
    cycles = []

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                cycles.append(path + [start])
            elif nxt not in path:
                visit(start, nxt, path + [nxt])

    for module in sorted(graph):
        visit(module, module, [module])
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)


def test_common_imports_no_experiment_module():
    experiment_modules = {"cifar", "imagenet", "mnist"}
    for path in COMMON.glob("*.py"):
        assert not (_imports(path) & experiment_modules), path.name
