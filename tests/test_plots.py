"""Placement pictures are written as real PNG files."""

import networkx as nx

from placer.report.plots import plot_memory, plot_placed_graph, plot_search_curves, topological_layout

PNG_MAGIC = b"\x89PNG"


def _chain(n=5):
    g = nx.DiGraph()
    for i in range(n):
        g.add_node(f"n{i}", time={"cpu": 1e-3 * (i + 1)})
        if i:
            g.add_edge(f"n{i-1}", f"n{i}", bytes=10)
    return g


def test_topological_layout_puts_successors_to_the_right():
    g = _chain()
    g.add_edge("n0", "n4")
    pos = topological_layout(g)
    assert all(pos[u][0] < pos[v][0] for u, v in g.edges)


def test_pictures_are_png_files(tmp_path):
    g = _chain()
    placement = {n: ("a" if i < 3 else "b") for i, n in enumerate(g.nodes)}
    paths = [
        plot_placed_graph(g, placement, ["a", "b"], tmp_path / "graph.png"),
        plot_memory(["a", "b"], [1e9, 3e9], [2e9, 2e9], tmp_path / "mem.png"),
        plot_search_curves({"agent": [(0.1, 10, 2e-3), (0.5, 100, 1e-3)], "empty": []}, tmp_path / "curve.png"),
    ]
    for p in paths:
        assert p.read_bytes()[:4] == PNG_MAGIC
