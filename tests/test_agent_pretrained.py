"""The move policy trained across graphs ships with the package: it loads safely, places graphs of
sizes and clusters it never saw, and a search or ``optimize --pretrained`` starts from it when asked."""

from __future__ import annotations

import time

import networkx as nx
import numpy as np
import pytest
import torch

from envs.sim.problem import compile_problem
from envs.sim.simulator import simulate_batch
from graphs import synthetic
from graphs.errors import GraphError
from graphs.grouping import group_graph
from placer.search.agents.moves import PRETRAINED_PATH, MovePolicy, first_placement
from placer.search.agents.pretrain import held_out_tasks, pretrain, sub_cluster, training_tasks
from placer.search.search import search


def _problem(graph: nx.DiGraph, cluster: str = "8xH100"):
    grouping = group_graph(graph)
    return compile_problem(graph, cluster, grouping=grouping)


def test_the_shipped_policy_is_package_data_that_loads_without_pickled_code():
    assert PRETRAINED_PATH.exists(), "scripts/train_policy.py writes it; it ships with the package"
    assert PRETRAINED_PATH.stat().st_size < 200_000
    state = torch.load(PRETRAINED_PATH, map_location="cpu", weights_only=True)
    assert set(state) == {"config", "net"}
    policy = MovePolicy.load(PRETRAINED_PATH)
    fresh = MovePolicy()
    assert any(not torch.equal(a, b) for a, b in zip(policy.net.state_dict().values(),
                                                     fresh.net.state_dict().values()))


def test_the_shipped_policy_places_a_graph_of_a_size_and_cluster_it_never_saw():
    # 5 branching blocks of 3 on 8 H100s: no branching graph and no 8xH100 task is in the training set.
    assert not any("branching" in t.name or "8xH100" in t.name for t in training_tasks())
    problem = _problem(synthetic.branching(blocks=5, branches=3, seed=7))
    policy = MovePolicy.load(PRETRAINED_PATH)
    started = time.perf_counter()
    row, t, fits = first_placement(policy, problem, lambda r: (simulate_batch(problem, r).step_time,
                                                               simulate_batch(problem, r).fits), batch=64)
    assert time.perf_counter() - started < 2.0
    assert fits and np.isfinite(t)
    assert row.shape == (problem.num_nodes,) and row.min() >= 0 and row.max() < problem.num_devices
    ev = simulate_batch(problem, row[None])
    assert bool(ev.fits[0]) and ev.step_time[0] == pytest.approx(t)


def test_a_search_starts_from_fresh_weights_unless_asked_for_the_shipped_policy(monkeypatch):
    from placer.search.agents import moves

    loaded = []
    real = moves.MoveAgent.resume
    monkeypatch.setattr(moves.MoveAgent, "resume", lambda self, path: (loaded.append(path), real(self, path))[1])
    problem = _problem(synthetic.layered(layers=3, width=2, seed=1), "4xK40")
    shipped = search(problem, agent="moves", budget=300, seed=0, num_envs=32, patience=None, pretrained=True)
    assert loaded == [PRETRAINED_PATH] and shipped.best_fits
    loaded.clear()
    default = search(problem, agent="moves", budget=300, seed=0, num_envs=32, patience=None)
    assert loaded == [] and default.best_fits
    with pytest.raises(FileNotFoundError, match="no move policy at"):
        search(problem, agent="moves", budget=300, seed=0, num_envs=32, patience=None,
               pretrained=PRETRAINED_PATH.with_name("missing.pt"))


def test_pretraining_resumes_one_policy_across_tasks_and_saves_it(tmp_path):
    tasks = [t for t in training_tasks() if t.name.startswith(("layered-8x3", "recurrent-2x8"))][:2]
    assert len(tasks) == 2
    out = tmp_path / "p.pt"
    report = pretrain(tasks, out, placements=200)
    assert len(report.lines) == 2 and report.placements == 400 and report.cpu_s > 0
    assert "seeded" in report.lines[0] or "seeded" in report.lines[1]
    MovePolicy.load(out)


@pytest.mark.parametrize("family", sorted(synthetic.FAMILIES))
def test_generated_graphs_are_seeded_dags_with_the_contract_attributes(family):
    make = synthetic.FAMILIES[family]
    a, b, c = make(seed=3), make(seed=3), make(seed=4)
    assert nx.is_directed_acyclic_graph(a)
    assert nx.utils.graphs_equal(a, b) and not nx.utils.graphs_equal(a, c)
    for _, attrs in a.nodes(data=True):
        assert {"op", "flops", "bytes_moved", "out_bytes", "param_bytes", "requires_grad"} <= set(attrs)
    assert all(d["bytes"] == a.nodes[u]["out_bytes"] for u, _, d in a.edges(data=True))
    big = make(seed=3, scale=10.0)
    assert sum(d["param_bytes"] for _, d in big.nodes(data=True)) > 5 * sum(
        d["param_bytes"] for _, d in a.nodes(data=True))


def test_an_unrolled_recurrent_layer_is_one_group_and_the_steps_between_layers_stay_apart():
    g = synthetic.recurrent(layers=3, steps=5, seed=0)
    grouping = group_graph(g)
    for layer in range(3):
        cells = {grouping.op_to_group[f"cell{layer}_{t}"] for t in range(5)}
        assert len(cells) == 1
    assert len({grouping.op_to_group[f"mix1_{t}"] for t in range(5)}) == 5


def test_bad_generator_arguments_are_refused_with_the_argument_named():
    with pytest.raises(GraphError, match="experts must be a positive number"):
        synthetic.moe(experts=0)


def test_a_cluster_cut_from_a_preset_keeps_its_first_devices():
    c = sub_cluster("8xK40", 3)
    assert [d.name for d in c.devices] == ["cpu", "gpu0", "gpu1"]
    with pytest.raises(ValueError, match="has 9 devices"):
        sub_cluster("8xK40", 12)


def test_the_held_out_tasks_are_not_in_the_training_set():
    train = {t.name for t in training_tasks()}
    assert train.isdisjoint(t.name for t in held_out_tasks())


@pytest.mark.parametrize("flags, pretrained", [([], False), (["--pretrained"], True)])
def test_optimize_starts_from_the_shipped_policy_only_when_asked(monkeypatch, flags, pretrained):
    from graphs.errors import PlacerError
    from placer.cli.main import main
    from placer.optimizing import run as run_module

    seen = {}

    def fake_optimize(model, **options):
        seen.update(options)
        raise PlacerError("stopped by the test")

    monkeypatch.setattr(run_module, "optimize", fake_optimize)
    assert main(["optimize", "zoo:gpt2", "--cluster", "4xK40", *flags]) == 2
    assert seen["pretrained"] is pretrained
