"""Search budgets parse to seconds and placements, malformed ones are refused, and there is one default."""

import ast
from pathlib import Path

import pytest

from placer.options import OptionError
from placer.search.budget import DEFAULT_BUDGET, Budget, parse_budget

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "text, seconds, placements",
    [("90s", 90.0, None), ("5m", 300.0, None), ("1h", 3600.0, None), ("1.5min", 90.0, None),
     ("20000", None, 20000), ("20k", None, 20000), ("5m,20k", 300.0, 20000), (500, None, 500), (2.5, 2.5, None)],
)
def test_budget_forms_parse_to_seconds_and_placements(text, seconds, placements):
    assert parse_budget(text) == Budget(seconds=seconds, placements=placements)


@pytest.mark.parametrize("text", ["", "five minutes", "5x", "-3", "5m,,", "0"])
def test_malformed_budget_is_refused_with_the_accepted_forms(text):
    with pytest.raises(OptionError, match="budget"):
        parse_budget(text)


def test_the_default_budget_is_two_minutes():
    assert parse_budget(DEFAULT_BUDGET) == Budget(seconds=120.0)


def _budget_defaults(path: Path) -> list[tuple[int, str]]:
    """(line, what) for every budget default in ``path`` that is not DEFAULT_BUDGET by name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            positional = node.args.posonlyargs + node.args.args
            pairs = list(zip(positional[len(positional) - len(node.args.defaults):], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            for arg, default in pairs:
                named = isinstance(default, ast.Name) and default.id == "DEFAULT_BUDGET"
                if arg.arg == "budget" and not named and not (isinstance(default, ast.Constant) and default.value is None):
                    found.append((node.lineno, f"{node.name}(budget=...)"))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and "BUDGET" in target.id:
                    found.append((node.lineno, target.id))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and node.args[0].value == "--budget":
            for k in node.keywords:
                if k.arg == "default" and isinstance(k.value, ast.Constant) and k.value.value is not None:
                    found.append((node.lineno, "--budget default"))
    return found


def test_the_default_budget_is_defined_once_and_used_by_name():
    # A literal such as budget="30s" in a signature, or a second *_BUDGET constant, would be a
    # default that disagrees with the one the README states.
    offenders = [
        f"{path.relative_to(ROOT)}:{line} {what}"
        for path in sorted((ROOT / "placer").rglob("*.py"))
        for line, what in _budget_defaults(path)
        if not (path.name == "budget.py" and what == "DEFAULT_BUDGET")
    ]
    assert offenders == []


def test_the_readme_states_the_default_budget():
    readme = (ROOT / "README.md").read_text()
    assert "2-minute default budget" in readme
