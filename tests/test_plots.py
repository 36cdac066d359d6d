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


def test_memory_bars_are_shares_of_capacity_labelled_with_the_figures(tmp_path, monkeypatch):
    import matplotlib.axes

    texts, widths = [], []
    real_text, real_barh = matplotlib.axes.Axes.text, matplotlib.axes.Axes.barh

    def text(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return real_text(self, x, y, s, *args, **kwargs)

    def barh(self, y, width, *args, **kwargs):
        widths.append(list(width))
        return real_barh(self, y, width, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", text)
    monkeypatch.setattr(matplotlib.axes.Axes, "barh", barh)
    gib, mib = 2**30, 2**20
    plot_memory(["gpu0", "gpu1", "gpu2"], [129 * mib, 40 * gib, 0], [130 * gib, 80 * gib, 12 * gib], tmp_path / "m.png")
    assert widths[0][1] == 50.0  # per cent of gpu1's own capacity
    assert "129 MiB of 130 GiB (< 0.1 %)" in texts and "40 GiB of 80 GiB (50.0 %)" in texts
    assert "0 B of 12 GiB (unused)" in texts
