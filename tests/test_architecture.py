"""The engine's shape: public modules do not branch on structure names or on the backend they got."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "torchfim"
STRUCTURE_NAMES = {"full", "diag", "trace", "blocks", "layers"}
BACKEND_CLASSES = {"PerModuleBackend", "FunctionalBackend"}


def _compared_strings(tree: ast.AST) -> set[str]:
    """String constants that appear in ==, !=, in, not in comparisons or match cases."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                for sub in ast.walk(part):
                    if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                        found.add(sub.value)
        if isinstance(node, ast.MatchValue) and isinstance(node.value, ast.Constant):
            found.add(node.value.value)
    return found


def test_fisher_and_variance_do_not_branch_on_structure_names() -> None:
    for name in ("fisher.py", "variance.py", "bounds.py", "estimators.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        assert not (_compared_strings(tree) & STRUCTURE_NAMES), name


def test_nothing_outside_the_backends_asks_which_backend_it_has() -> None:
    backends = {PACKAGE / "engine" / "loop.py", PACKAGE / "engine" / "per_module.py", PACKAGE / "engine" / "functional.py"}
    for path in PACKAGE.rglob("*.py"):
        if path in backends:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                assert not (names & BACKEND_CLASSES), f"{path}: isinstance against a backend class"
        strings = _compared_strings(tree)
        assert not (strings & {"modules", "functional"}), f"{path}: compares a backend name"
