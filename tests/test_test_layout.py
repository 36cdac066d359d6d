"""The test suite's own layout: test modules share code through tests/helpers and conftest, never each other."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_no_test_module_imports_another_test_module():
    offenders = {
        path.name: sorted(m for m in _imported_modules(path) if m.startswith("tests.") and
                          not m.startswith(("tests.helpers", "tests.conftest")))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_helpers_import_no_test_module():
    for path in sorted((TESTS / "helpers").glob("*.py")):
        assert not [m for m in _imported_modules(path) if m.startswith("tests.test_")], path.name
