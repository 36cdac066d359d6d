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


def test_search_curve_by_phase_colours_each_stretch_by_the_phase_that_found_the_best(tmp_path, monkeypatch):
    import matplotlib.axes

    from placer.report.plots import PHASE_COLOURS, plot_search_by_phase
    from placer.search.tracker import Improvement

    stretches, labels = [], []
    real_hlines = matplotlib.axes.Axes.hlines
    real_legend = matplotlib.axes.Axes.legend

    def hlines(self, y, xmin, xmax, *args, color=None, **kwargs):
        stretches.append((float(xmin), float(xmax), color))
        return real_hlines(self, y, xmin, xmax, *args, color=color, **kwargs)

    def legend(self, *args, handles=(), **kwargs):
        labels.extend(h.get_label() for h in handles)
        return real_legend(self, *args, handles=handles, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "hlines", hlines)
    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    improvements = [
        Improvement(5, 0.0, "seeds", float("inf"), 0.100),
        Improvement(300, 0.1, "policy_moves", 0.100, 0.070),
        Improvement(900, 0.2, "local_search", 0.070, 0.060),
        Improvement(2000, 0.3, "policy_moves", 0.060, 0.050),
    ]
    path = plot_search_by_phase(improvements, tmp_path / "phases.png")
    assert path.read_bytes()[:4] == PNG_MAGIC
    assert [(a, b) for a, b, _ in stretches] == [(5, 300), (300, 900), (900, 2000), (2000, 3000)]
    assert [c for _, _, c in stretches] == [PHASE_COLOURS[p] for p in ("seeds", "policy_moves", "local_search",
                                                                       "policy_moves")]
    # policy_moves took 0.030 + 0.010 of the 0.050 s gained over the seeds, local search 0.010.
    assert labels == ["seeds (1)", "policy_moves (2, 80% of the gain)", "local_search (1, 20% of the gain)"]


def test_search_curve_by_phase_of_a_search_without_improvements_is_still_a_picture(tmp_path):
    from placer.report.plots import plot_search_by_phase

    assert plot_search_by_phase([], tmp_path / "empty.png").read_bytes()[:4] == PNG_MAGIC
