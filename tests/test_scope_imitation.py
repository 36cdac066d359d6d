"""Imitation of whole-module moves: the scope scorer learns from the options that paid."""

from __future__ import annotations

import numpy as np
import torch

from envs.sim.simulator import simulate_batch
from placer.search.agents.move_features import feature_statics, move_features
from placer.search.agents.move_policy import MovePolicy, scope_scores
from placer.search.agents.scope_imitation import ScopeExamples, fit_scope_scorer, scope_examples
from tests.helpers.problems import branch_trap_problem


def _branch_choice(policy: MovePolicy, problem, st, row: np.ndarray, features: np.ndarray) -> tuple[float, float]:
    """Probability that the first move of branch a's first op to GPU 1 stays single, and that it
    takes the whole branch (block.a) with it."""
    d = problem.num_devices
    with torch.no_grad():
        raw = policy.net(torch.from_numpy(features))
        score, cand = scope_scores(policy.net, st.scopes, raw, row, np.array([1 * d + 1]), problem.num_nodes, d)
        probs = torch.softmax(score, dim=1)[0].numpy()
    branch = [k for k, s in enumerate(cand[0]) if s >= 0 and tuple(st.scopes.members[s]) == (1, 2, 3, 4)]
    return float(probs[0]), float(probs[1 + branch[0]])


def _trap_examples(seed: int):
    """The branch trap with every group on GPU 0, and the scope examples drawn there."""
    problem = branch_trap_problem()
    st = feature_statics(problem)
    row = np.zeros(problem.num_nodes, dtype=np.int64)
    ev = simulate_batch(problem, row[None])
    features = move_features(problem, row, np.asarray(ev.peak_memory[0]), st)
    examples = ScopeExamples()
    scope_examples(problem, st, row, float(ev.step_time[0]), features, np.zeros(0, dtype=np.int64),
                   np.random.default_rng(seed), examples, first_moves=18)
    return problem, st, row, features, examples


def test_scope_examples_record_the_branch_move_that_pays_and_the_fit_prefers_it():
    problem, st, row, features, examples = _trap_examples(0)
    assert examples.placements > 0 and len(examples.states) == 1
    state = examples.states[0]
    # Only first moves with an option that shortened the step are kept, and for each of them the
    # single move (column 0, a cut 200 MiB edge) earned nothing: the whole branch did.
    assert len(state.first) > 0 and np.allclose(state.targets.sum(axis=1), 1.0)
    assert (state.targets[:, 0] == 0).all()
    assert all(1 <= f // problem.num_devices <= 8 for f in state.first)  # the branch ops

    policy = MovePolicy(seed=0)
    single_before, branch_before = _branch_choice(policy, problem, st, row, features)
    fit_scope_scorer(policy, examples, epochs=30)
    single_after, branch_after = _branch_choice(policy, problem, st, row, features)
    # The fit moves probability from the single move to the whole branch.
    assert branch_after > branch_before and single_after < single_before


def test_scope_imitation_leaves_the_move_scorer_as_it_was():
    *_, examples = _trap_examples(1)
    policy = MovePolicy(seed=3)
    before = {k: v.clone() for k, v in policy.net.state_dict().items()}
    fit_scope_scorer(policy, examples, epochs=5)
    after = policy.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("scope."))
    assert not torch.equal(before["scope.weight"], after["scope.weight"])
