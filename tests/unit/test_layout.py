"""The house rules of the source tree (issue 37), read from the files, not by importing them:

* the evaluation protocol knows no embedded world: nothing under ``cuig_lightning/evaluation/`` imports
  ``cuig_lightning.canvas_mini`` (in any form, at any depth: inside functions too);
* no source file under ``cuig_lightning/`` or ``callbacks/`` is over :data:`MAX_LINES` lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 350
WORLD = "cuig_lightning.canvas_mini"
#: Temporary allowance for files still being split (issue 37): none left; add a path here only while it is split.
OVER_LIMIT_FOR_NOW: set[str] = set()


def imported_modules(source: str, package: str) -> list[str]:
    """Every module a file of ``package`` imports, fully qualified: ``import a.b``, ``from a.b import c`` (as
    ``a.b`` and ``a.b.c``: c may be a module), relative imports resolved against ``package``; at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - (node.level - 1)], *([base] if base else [])])
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def file_imports(path: Path) -> list[str]:
    return imported_modules(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1]))


def names_world(module: str) -> bool:
    return module == WORLD or module.startswith(WORLD + ".")


def source_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def test_the_import_reader_sees_every_form():
    source = ("import cuig_lightning.canvas_mini.world as w\n"
              "from cuig_lightning.canvas_mini import world\n"
              "from cuig_lightning import canvas_mini\n"
              "from .. import canvas_mini as cm\n"
              "def f():\n    from ..canvas_mini.classifiers import load_classifier\n"
              "import torch\n")
    found = imported_modules(source, "cuig_lightning.evaluation")
    assert [m for m in found if names_world(m)] == [
        "cuig_lightning.canvas_mini.world", "cuig_lightning.canvas_mini", "cuig_lightning.canvas_mini.world",
        "cuig_lightning.canvas_mini", "cuig_lightning.canvas_mini", "cuig_lightning.canvas_mini.classifiers",
        "cuig_lightning.canvas_mini.classifiers.load_classifier"]
    assert not any(names_world(m) for m in imported_modules("from cuig_lightning import evaluation\n", "x"))


def test_the_evaluation_protocol_does_not_import_the_embedded_world():
    files = source_files("cuig_lightning/evaluation")
    assert files
    offenders = {str(p.relative_to(ROOT)): [m for m in file_imports(p) if names_world(m)] for p in files}
    assert not {p: m for p, m in offenders.items() if m}, offenders


@pytest.mark.parametrize("folder", ["cuig_lightning", "callbacks"])
def test_no_source_file_is_over_the_line_limit(folder):
    long = {}
    for path in source_files(folder):
        name = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and name not in OVER_LIMIT_FOR_NOW:
            long[name] = lines
    assert not long, f"over {MAX_LINES} lines (split by job): {long}"
