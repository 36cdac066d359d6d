"""Interchangeable devices: found from the problem's figures, and twins of a placement named once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.hardware.cluster import Device, Link, make_cluster
from envs.hardware.loading import load_cluster
from envs.sim.device_symmetry import canonical_row, device_classes, interchangeable
from envs.sim.problem_compile import compile_problem
from envs.sim.simulator import simulate_batch
from graphs.pipeline import prepare


@pytest.fixture(scope="module")
def rnnlm_graph():
    return prepare("zoo:rnnlm", {"size": "small"}, profile=False).grouping.graph


@pytest.fixture(scope="module")
def k40(rnnlm_graph):
    return compile_problem(rnnlm_graph, load_cluster("4xK40"))


def test_identical_gpus_behind_one_interconnect_form_one_class_and_the_cpu_none(k40):
    assert k40.device_names[0] == "cpu"
    assert device_classes(k40) == [[1, 2, 3, 4]]
    assert not interchangeable(k40, 0, 1)


def test_a_faster_link_between_two_gpus_splits_them_from_the_others(rnnlm_graph):
    gpus = [Device(f"gpu{i}", "V100", 16 * 2**30, 1.5e13, 9e11) for i in range(4)]
    pcie = [Link(a.name, b.name, 1e-5, 1.2e10) for a in gpus for b in gpus if a is not b]
    nvlink = [Link("gpu0", "gpu1", 5e-6, 2.5e10), Link("gpu1", "gpu0", 5e-6, 2.5e10)]
    links = {(lk.src, lk.dst): lk for lk in pcie + nvlink}
    problem = compile_problem(rnnlm_graph, make_cluster(gpus, links.values()))
    # Swapping gpu0 and gpu1 keeps their fast link between them; gpu0 and gpu2 cannot swap.
    assert device_classes(problem) == [[0, 1], [2, 3]]


def test_worker_process_ranks_are_never_taken_as_interchangeable(rnnlm_graph):
    from envs.runtime.distributed.rank_cluster import rank_cluster

    links = {("cpu:0", "cpu:1"): (1e-4, 1e9), ("cpu:1", "cpu:0"): (1e-4, 1e9)}
    problem = compile_problem(rnnlm_graph, rank_cluster("cpu:0,cpu:1", links=links))
    assert device_classes(problem) == []


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_a_placement_and_its_twins_by_interchangeable_devices_share_a_row_and_a_step_time(k40, data):
    n = k40.num_nodes
    row = np.array(data.draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)))
    perm = data.draw(st.permutations([1, 2, 3, 4]))
    rename = np.arange(5)
    rename[[1, 2, 3, 4]] = perm
    twin = rename[row]
    classes = device_classes(k40)
    assert np.array_equal(canonical_row(twin, classes), canonical_row(row, classes))
    sim = simulate_batch(k40, np.stack([row, twin, canonical_row(row, classes)]))
    assert sim.step_time[1] == pytest.approx(sim.step_time[0], rel=1e-9)
    assert sim.step_time[2] == pytest.approx(sim.step_time[0], rel=1e-9)


def test_rows_are_made_canonical_together_as_one_by_one():
    from envs.sim.device_symmetry import canonical_rows

    rng = np.random.default_rng(0)
    rows = rng.integers(0, 7, size=(50, 12))
    classes = [[1, 2, 3], [4, 6]]
    assert np.array_equal(canonical_rows(rows, classes), np.stack([canonical_row(r, classes) for r in rows]))


def test_moves_to_a_second_unused_interchangeable_device_are_twins_and_left_out(k40):
    from envs.sim.device_symmetry import twin_targets
    from placer.search.local_search import apply_moves, neighbourhood

    row = np.ones(k40.num_nodes, dtype=np.int64)  # everything on gpu0
    classes = device_classes(k40)
    assert twin_targets(row, classes, k40.num_devices).tolist() == [False, False, False, True, True]
    all_nodes, all_devs, _ = neighbourhood(k40, row)
    nodes, devs, _ = neighbourhood(k40, row, classes)
    assert not np.isin(devs, [3, 4]).any() and np.isin(all_devs, [3, 4]).any()
    # Nothing is lost: every move left out has a twin that is kept.
    kept = {canonical_row(r, classes).tobytes() for r in apply_moves(row, nodes, devs)}
    assert all(canonical_row(r, classes).tobytes() in kept for r in apply_moves(row, all_nodes, all_devs))
