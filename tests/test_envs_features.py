"""Node and device features against straightforward networkx / numpy recomputations."""

from __future__ import annotations

import networkx as nx
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.gym.features import (
    DEVICE_FEATURES,
    device_features,
    log_bytes,
    log_time,
    node_feature_names,
    node_features,
    node_memory,
    padded_edges,
    topological_depth,
)
from tests.helpers.problems import random_problem


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 25), extra=st.integers(0, 30), seed=st.integers(0, 1000))
def test_depth_and_degrees_match_networkx(n, extra, seed):
    problem = random_problem(n=n, d=2, seed=seed, extra_edges=extra)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    g.add_edges_from(zip(problem.edge_src.tolist(), problem.edge_dst.tolist()))
    want = np.zeros(n, dtype=int)
    for v in nx.topological_sort(g):
        for u in g.predecessors(v):
            want[v] = max(want[v], want[u] + 1)
    np.testing.assert_array_equal(topological_depth(problem), want)
    names = node_feature_names(problem.device_names)
    x = node_features(problem)
    np.testing.assert_allclose(x[:, names.index("log_in_degree")], np.log1p([g.in_degree(v) for v in range(n)]) / 5,
                               rtol=1e-6)
    np.testing.assert_allclose(x[:, names.index("log_out_degree")],
                               np.log1p([g.out_degree(v) for v in range(n)]) / 5, rtol=1e-6)
    if want.max() > 0:
        np.testing.assert_allclose(x[:, names.index("depth")], want / want.max(), rtol=1e-6)
    assert np.all(np.isfinite(x)) and x.min() >= 0


def test_per_device_columns_and_device_features():
    problem = random_problem(n=10, d=3, seed=3)
    names = node_feature_names(problem.device_names)
    x = node_features(problem)
    times = problem.fwd_time + problem.bwd_time
    for d, dev in enumerate(problem.device_names):
        np.testing.assert_allclose(x[:, names.index(f"log_time@{dev}")], log_time(times[:, d]), rtol=1e-6)
        share = np.clip(node_memory(problem) / problem.memory_capacity[d], 0, 1)
        np.testing.assert_allclose(x[:, names.index(f"mem_share@{dev}")], share, rtol=1e-6)
    np.testing.assert_allclose(x[:, names.index("log_out_bytes")], log_bytes(problem.out_bytes), rtol=1e-6)
    f = device_features(problem)
    col = {c: i for i, c in enumerate(DEVICE_FEATURES)}
    assert f[:, col["is_cpu"]].tolist() == [1, 0, 0] and f[:, col["is_gpu"]].tolist() == [0, 1, 1]
    total = times.sum(axis=0)
    np.testing.assert_allclose(f[:, col["speed_share"]], total.min() / total, rtol=1e-6)
    assert f[0, col["speed_share"]] < 1.0 and f[:, col["speed_share"]].max() == 1.0  # the cpu is slowest


def test_padded_edges():
    problem = random_problem(n=5, d=2, seed=0, extra_edges=2)
    index, mask = padded_edges(problem, 10)
    e = problem.num_edges
    assert index.shape == (2, 10) and index.dtype == np.int64 and mask.sum() == e
    assert index[0, :e].tolist() == problem.edge_src.tolist() and not index[:, e:].any()


def test_group_op_kinds_are_member_fractions():
    import networkx as nx

    from envs.gym.features import OP_KINDS, graph_ops, op_one_hot

    ops = nx.DiGraph()
    ops.add_nodes_from([("a", {"op": "placeholder"}), ("b", {"op": "call_module"}), ("c", {"op": "call_module"}),
                        ("d", {"op": "weird"})])
    groups = nx.DiGraph()
    groups.add_nodes_from([("g0", {"op": "group", "members": ["a", "b", "c", "d"]}), ("g1", {"op": "output"})])
    kinds = graph_ops(groups, ["g0", "g1"], ops)
    assert kinds[0] == {"placeholder": 1, "call_module": 2, "weird": 1} and kinds[1] == "output"
    x = op_one_hot(kinds, 2)
    col = {k: i for i, k in enumerate(OP_KINDS)}
    assert x[0, col["placeholder"]] == 0.25 and x[0, col["call_module"]] == 0.5 and x[0, -1] == 0.25
    assert x[1, col["output"]] == 1.0 and x.sum() == 2.0
    assert graph_ops(groups, ["g0"]) == ["group"]  # without the op graph: the group's own op
