"""The move policy trained across graphs ships with the package: it loads safely, places graphs of
sizes and clusters it never saw, it is trained by imitating local search (reproducibly), and a search
or ``optimize`` starts from it unless asked for fresh weights (``--fresh``)."""

from __future__ import annotations

import time

import networkx as nx
import numpy as np
import pytest
import torch

from envs.sim.problem_compile import compile_problem
from envs.sim.simulator import simulate_batch
from graphs import synthetic
from graphs.errors import GraphError
from graphs.grouping import group_graph
from placer.search.agents.move_policy import MovePolicy
from placer.search.agents.move_start import first_placement
from placer.search.agents.moves import PRETRAINED_PATH
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


def test_a_search_starts_from_the_shipped_policy_unless_asked_for_fresh_weights(monkeypatch):
    from placer.search.agents import moves

    loaded = []
    real = moves.MoveAgent.resume
    monkeypatch.setattr(moves.MoveAgent, "resume", lambda self, path: (loaded.append(path), real(self, path))[1])
    problem = _problem(synthetic.layered(layers=3, width=2, seed=1), "4xK40")
    default = search(problem, agent="moves", budget=300, seed=0, num_envs=32, patience=None)
    assert loaded == [PRETRAINED_PATH] and default.best_fits
    loaded.clear()
    fresh = search(problem, agent="moves", budget=300, seed=0, num_envs=32, patience=None, pretrained=False)
    assert loaded == [] and fresh.best_fits
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


@pytest.mark.parametrize("flags, pretrained", [([], True), (["--pretrained"], True), (["--fresh"], False)])
def test_optimize_starts_from_the_shipped_policy_unless_asked_for_fresh_weights(monkeypatch, flags, pretrained):
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


def _imitation_tasks():
    tasks = [t for t in training_tasks() if t.name in ("layered-8x3 s1 #1@4xV100-nvlink", "recurrent-2x8 s0.1 #21@4xV100-nvlink")]
    assert len(tasks) == 2
    return tasks


def test_imitation_examples_weigh_only_the_moves_that_improved_the_placement():
    from placer.search.agents.move_features import NUM_FEATURES, feature_statics, move_features
    from placer.search.agents.move_start import start_row
    from placer.search.agents.pretrain import MoveExamples, _descent_states, heuristic_seeds, move_examples

    problem, graph = _imitation_tasks()[0].build()
    seeds, _, _ = heuristic_seeds(problem, graph)
    ex = move_examples(problem, seeds, np.random.default_rng(0), steps=4, candidates=10_000)
    assert ex.features and len(ex.features) == len(ex.targets) and ex.placements > len(ex.features)
    for f, t in zip(ex.features, ex.targets):
        assert f.shape == (len(t), NUM_FEATURES) and t.min() >= 0 and t.sum() == pytest.approx(1.0)
    # The first state of the walk from the policy's start: every single move simulated, and a move weighs
    # more than another exactly when it shortened the step more.
    first = MoveExamples()
    _descent_states(problem, start_row(problem), 1, 10_000, np.random.default_rng(0), first)
    row, d = start_row(problem), problem.num_devices
    moves = np.flatnonzero((np.arange(problem.num_nodes * d) % d) != np.repeat(row, d))
    rows = np.repeat(row[None], len(moves), axis=0)
    rows[np.arange(len(moves)), moves // d] = moves % d
    ev, base = simulate_batch(problem, rows), simulate_batch(problem, row[None])
    gain = np.where(ev.fits, base.step_time[0] - ev.step_time, -np.inf)
    target = first.targets[0]
    assert np.array_equal(target > 0, gain > 0)
    better = np.flatnonzero(gain > 0)
    assert np.argmax(target) == better[np.argmax(gain[better])]
    np.testing.assert_allclose(first.features[0], move_features(problem, row, base.peak_memory[0],
                                                                feature_statics(problem))[moves])


def test_fitting_the_scorer_puts_more_probability_on_the_improving_moves_than_fresh_weights():
    from placer.search.agents.pretrain import fit_move_scorer, heuristic_seeds, move_examples

    ex = None
    for task in _imitation_tasks():
        problem, graph = task.build()
        ex = move_examples(problem, heuristic_seeds(problem, graph)[0], np.random.default_rng(1), steps=6, out=ex)
    assert ex is not None

    def cross_entropy(policy: MovePolicy) -> float:
        with torch.no_grad():
            return float(np.mean([-(torch.from_numpy(t) * torch.log_softmax(policy.net(torch.from_numpy(f)), 0)).sum()
                                  for f, t in zip(ex.features, ex.targets)]))

    fitted = fit_move_scorer(ex, epochs=15)
    assert cross_entropy(fitted) < cross_entropy(MovePolicy()) - 0.2


def test_imitation_training_writes_the_same_file_from_the_same_seed(tmp_path):
    from placer.search.agents.pretrain import pretrain_imitation

    a, b = tmp_path / "1" / "p.pt", tmp_path / "2" / "p.pt"  # torch.save records the file's stem
    report = pretrain_imitation(_imitation_tasks(), a, steps=3, candidates=64, epochs=2)
    pretrain_imitation(_imitation_tasks(), b, steps=3, candidates=64, epochs=2)
    assert len(report.lines) == 2 and report.placements > 0 and report.cpu_s > 0
    assert a.read_bytes() == b.read_bytes()
    MovePolicy.load(a)
