"""Data flows one way through the package: data -> models -> methods -> pipeline ->
encoding -> index / evaluation -> serving / table -> cli. An import against that flow
(even one inside a function) is what made the encoding -> index -> pipeline -> encoding
circle; this test keeps such imports out."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fashionhash"
#: unit -> the units it must never import (its consumers)
ABOVE = {
    "data": {"models", "losses", "methods", "pipeline", "encoding", "index", "evaluation", "training",
             "serving", "table", "cli"},
    "models": {"methods", "pipeline", "encoding", "index", "evaluation", "training", "serving", "table", "cli"},
    "methods": {"pipeline", "encoding", "index", "evaluation", "training", "serving", "table", "cli"},
    "pipeline": {"encoding", "index", "evaluation", "training", "serving", "table", "cli"},
    "encoding": {"index", "evaluation", "training", "serving", "table", "cli"},
    "index": {"evaluation", "training", "serving", "table", "cli"},
    "evaluation": {"training", "serving", "table", "cli"},
    "training": {"serving", "table", "cli"},
    "table": {"serving", "cli"},
}


def _imports(path: Path) -> set[str]:
    """The ``fashionhash.<unit>`` names a module imports, at any depth, except under
    ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        out |= {n.split(".")[1] for n in names if n.startswith("fashionhash.")}
    return out


def test_no_import_against_the_data_flow():
    wrong = []
    for unit, above in ABOVE.items():
        files = [PACKAGE / f"{unit}.py"] if (PACKAGE / f"{unit}.py").is_file() else sorted((PACKAGE / unit).rglob("*.py"))
        assert files, unit
        for f in files:
            wrong += [f"{f.relative_to(PACKAGE)} imports fashionhash.{u}" for u in _imports(f) & above]
    assert not wrong, wrong
