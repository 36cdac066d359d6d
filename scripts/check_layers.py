"""Check the import layering of graphs/ envs/ placer/: imports point down, modules form no cycle.

Layers, lowest first (docs/contracts.md): ``graphs`` < ``envs.hardware`` < ``envs.sim`` <
``envs.runtime`` < ``envs.gym`` < ``placer``. A module may import its own layer or any lower
one; function-local imports count, since a cycle hidden inside a function is still a cycle.
Prints each violation and exits 1 when there is any.

    python scripts/check_layers.py
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

LAYERS: tuple[str, ...] = ("graphs", "envs.hardware", "envs.sim", "envs.runtime", "envs.gym", "placer")
ROOT = Path(__file__).resolve().parent.parent


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of the layer holding ``module`` (``envs`` itself sits with ``envs.gym``)."""
    if module == "envs":
        return LAYERS.index("envs.gym")
    best = None
    for i, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            best = i
    return best


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the three packages, by dotted name."""
    found = {}
    for package in ("graphs", "envs", "placer"):
        for path in (root / package).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``path`` imports (a ``from m import x`` of a submodule counts as ``m.x``)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known)
    return out


def violations(root: Path = ROOT) -> list[str]:
    """Upward imports and import cycles, one line each."""
    known = modules(root)
    graph = nx.DiGraph()
    problems = []
    for name, path in sorted(known.items()):
        graph.add_node(name)
        for target in sorted(imports(path, known)):
            if target == name or name.startswith(target + "."):
                continue  # a package's own parent: imported by Python anyway
            if path.name == "__init__.py" and target.startswith(name + "."):
                continue  # a package re-exporting its own submodules
            graph.add_edge(name, target)
            src, dst = layer_of(name), layer_of(target)
            if src is not None and dst is not None and dst > src:
                problems.append(f"upward import: {name} ({LAYERS[src]}) imports {target} ({LAYERS[dst]})")
    for cycle in nx.strongly_connected_components(graph):
        if len(cycle) > 1:
            problems.append("import cycle: " + " <-> ".join(sorted(cycle)))
    return problems


def main() -> int:
    problems = violations()
    for line in problems:
        print(line)
    print(f"layers: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
