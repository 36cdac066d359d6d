"""Module scopes of the move policy: which sets of groups one move may relocate, and a placement
that only a whole-module move reaches."""

from __future__ import annotations

import numpy as np

from envs.sim.simulator import simulate_batch
from placer.search.agents.move_features import feature_statics, move_features
from placer.search.agents.move_policy import MovePolicy
from placer.search.local_search import apply_moves, neighbourhood
from placer.search.move_scopes import attached_modules, module_scopes
from placer.search.search import search
from placer.search.tracker import StopSearch
from tests.helpers.arrays import make_problem
from tests.helpers.problems import branch_trap_problem


def test_glue_written_in_forward_joins_the_module_it_connects():
    # An unrolled two-layer recurrence: layer.0's step, a residual add written in the model's
    # forward (no module) over the embedding and layer.0, layer.1's step, two more glue ops after
    # it, then a cat of layer.1, its glue and the embedding feeding the head and the loss.
    paths = ("embed", "layer.0.cell", "", "layer.1.cell", "", "", "", "head", "loss")
    src = np.array([0, 1, 0, 2, 3, 2, 4, 5, 0, 3, 6, 6])
    dst = np.array([1, 2, 2, 3, 4, 4, 5, 6, 6, 6, 7, 8])
    attached = attached_modules(paths, src, dst)
    # Groups that have a module keep it.
    assert [attached[i] for i in (0, 1, 3, 7, 8)] == [paths[i] for i in (0, 1, 3, 7, 8)]
    # Glue after layer.1 follows its producer that has a module; a chain of glue follows that.
    assert attached[4] == "layer.1.cell" and attached[5] == "layer.1.cell"
    # The residual add's producers (embed, layer.0) share no module: it joins its consumers'.
    assert attached[2] == "layer.1.cell"
    # The cat's producers with a module (embed, layer.1) and its consumers share nothing but the
    # root: it stays without a module.
    assert attached[6] == ""
    # The layer's scope now carries its glue: one move takes the cell and what feeds and follows it.
    scopes = module_scopes(attached)
    assert (2, 3, 4, 5) in {tuple(int(i) for i in m) for m in scopes.members}


def test_scopes_are_module_subtrees_and_roles_across_blocks_each_set_once():
    paths = ("stem", "blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.mlp", "blocks.1.attn.q", "blocks.1.attn.k",
             "blocks.1.mlp", "head")
    scopes = module_scopes(paths)
    found = {tuple(int(i) for i in m): bool(r) for m, r in zip(scopes.members, scopes.is_role)}
    assert found[(1, 2, 3)] is False and found[(4, 5, 6)] is False  # blocks.0 and blocks.1
    assert found[(1, 2)] is False and found[(4, 5)] is False  # each block's attention
    assert found[(1, 2, 4, 5)] is True  # the attention of every block: a role
    assert found[(3, 6)] is True and found[(1, 4)] is True  # every block's mlp; every q
    assert (1, 2, 3, 4, 5, 6) in found  # blocks
    assert all(1 < len(m) < len(paths) for m in found)  # no single groups, not the whole graph
    assert len(found) == len(scopes.members)  # each set once (blocks.* = blocks is not repeated)
    # A group expands to its smallest scopes first, at most per_node of them.
    sizes = scopes.sizes
    for i in range(len(paths)):
        own = scopes.node_scope[scopes.node_ptr[i]:scopes.node_ptr[i + 1]]
        assert list(sizes[own]) == sorted(sizes[own]) and all(i in scopes.members[s] for s in own)
    assert all(len(x[x >= 0]) <= 2 for x in module_scopes(paths, per_node=2).of_nodes(np.arange(len(paths)), 2))


def test_numbered_variants_of_a_branch_share_its_role():
    paths = ("Mixed_5b.branch3x3dbl_1.conv", "Mixed_5b.branch3x3dbl_2.conv", "Mixed_5c.branch3x3dbl_1.conv",
             "Mixed_5c.branch1x1.conv", "fc")
    found = {tuple(int(i) for i in m) for m in module_scopes(paths).members}
    assert (0, 1, 2) in found  # every double-3x3 convolution, in every block


def test_a_graph_without_module_paths_has_no_scopes():
    problem = make_problem(3, [(0, 1), (1, 2)], np.full(3, 0.01), kinds=("K40", "K40"))
    assert problem.node_modules == () and feature_statics(problem).scopes is None


def test_the_policy_moves_a_whole_branch_that_no_single_or_edge_move_reaches():
    problem = branch_trap_problem()
    seed = np.zeros(problem.num_nodes, dtype=np.int64)
    first = simulate_batch(problem, seed[None]).step_time[0]
    nodes, devs, _ = neighbourhood(problem, seed)
    around = simulate_batch(problem, apply_moves(seed, nodes, devs))
    assert np.all(around.step_time > first)  # local search is stuck at the seed
    res = search(problem, agent="moves", budget=256, seed=0, num_envs=32, initial_placements=[seed],
                 local_search=False, patience=None)
    moved = set(np.flatnonzero(res.best_row != res.best_row[0]).tolist())
    assert moved in ({1, 2, 3, 4}, {5, 6, 7, 8})  # one branch beside the other
    assert res.best_step_time < first * 0.75
    assert res.credit() == {"policy_moves": 1.0}


def test_proposals_move_whole_scopes_and_their_log_probabilities_are_finite():
    problem = branch_trap_problem()
    st = feature_statics(problem)
    row = np.zeros(problem.num_nodes, dtype=np.int64)
    policy = MovePolicy(seed=0)
    rows, logp, entropy = policy.propose(problem, st, row, move_features(problem, row, static=st), 64,
                                         np.random.default_rng(0))
    assert st.scopes is not None
    scope_sets = {tuple(int(i) for i in m) for m in st.scopes.members}
    moved = [tuple(np.flatnonzero(r != row).tolist()) for r in rows]
    assert any(m in scope_sets for m in moved)  # some proposals relocate a whole scope
    assert any(len(m) == 1 for m in moved)  # and some a single group
    assert np.isfinite(logp.detach().numpy()).all() and np.isfinite(entropy.detach().numpy()).all()
    logp.sum().backward()  # the scope choice is learned: its scorer gets a gradient
    grad = policy.net.scope.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_local_search_given_the_scopes_scans_whole_module_moves_too():
    from placer.search.local_search import LocalSearch
    from placer.search.move_scopes import problem_scopes
    from placer.search.tracker import BestTracker

    problem = branch_trap_problem()
    seed = np.zeros(problem.num_nodes, dtype=np.int64)
    first = simulate_batch(problem, seed[None]).step_time[0]

    def evaluate(rows):
        sim = simulate_batch(problem, rows)
        return sim.step_time, sim.fits

    ends = {}
    for wide in (False, True):
        tracker = BestTracker(problem, 40, patience=None, agent="local_search")
        tracker.record(seed[None], *evaluate(seed[None]), phase="seeds")
        ls = LocalSearch(problem, evaluate, tracker, rng=np.random.default_rng(0),
                         scopes=problem_scopes(problem) if wide else None)
        try:
            ls.run(39)
        except StopSearch:
            pass
        ends[wide] = tracker.best_step_time
    assert ends[False] == first  # single and edge moves: stuck at the seed
    assert ends[True] < first * 0.75  # a branch moved whole


def test_the_zoo_nmt_glue_joins_its_layers():
    # The small zoo NMT writes its residual adds, direction cats and per-step attention in its
    # own forward: 17 of its 32 groups have no module path until attached.
    from envs.hardware.loading import load_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare
    from placer.search.move_scopes import problem_scopes

    prep = prepare("zoo:nmt", model_args={"size": "small"}, profile=False)
    problem = compile_problem(prep.captured.graph, load_cluster("4xK40"), grouping=prep.grouping)
    attached = attached_modules(problem.node_modules, problem.edge_src, problem.edge_dst)
    assert sum(1 for m in problem.node_modules if not m) > problem.num_nodes // 3
    assert sum(1 for m in attached if not m) <= 1  # at most the target tokens, read only by the loss
    layer = [i for i, m in enumerate(problem.node_modules) if m == "encoder.0"]
    with_glue = [i for i, m in enumerate(attached) if m == "encoder.0"]
    assert len(with_glue) > len(layer)
    scopes = problem_scopes(problem)
    assert scopes is not None and tuple(with_glue) in {tuple(int(i) for i in s) for s in scopes.members}
