"""The hierarchical placement policy: log-probabilities, padding, save/load, learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gymnasium import spaces

from envs.gym.placement_env import PlacementEnv
from envs.gym.vector_env import BatchedPlacementVecEnv
from placer.search.agents.hierarchical.policy import HierarchicalPlacementPolicy, PolicySpaceError
from placer.search.agents.hierarchical.ppo import PPOConfig, make_ppo
from placer.search.agents.imitation import behaviour_clone
from tests.helpers.agents import chain_problem, diamond_problem


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_env(problem, n: int, groups: int | None) -> BatchedPlacementVecEnv:
    return BatchedPlacementVecEnv(problem, n_envs=n, num_groups=groups, hierarchical=groups is not None, seed=0)


def _policy(env) -> HierarchicalPlacementPolicy:
    return HierarchicalPlacementPolicy(env.observation_space, env.action_space, lambda _: 1e-3)


def _obs(env) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v) for k, v in env.reset().items()}


@pytest.mark.parametrize("groups", [6, None], ids=["hierarchical", "flat"])
def test_sampled_and_reevaluated_log_probs_agree(groups):
    torch.manual_seed(0)
    env = make_env(chain_problem(10), 16, groups)
    pol = _policy(env)
    obs = _obs(env)
    with torch.no_grad():
        actions, values, logp = pol(obs)
        # The rollout buffer hands actions back as float32.
        values2, logp2, entropy = pol.evaluate_actions(obs, actions.float())
    assert actions.shape == (16, env.action_space.shape[0])
    assert logp.shape == (16,) and logp2.shape == (16,) and entropy.shape == (16,)
    assert values.shape == (16, 1)
    assert torch.allclose(logp, logp2, atol=1e-4)
    assert torch.all(entropy > 0)
    # Log-probabilities are proper: sum of per-entry log-probs is below 0 and not -inf.
    assert torch.all(logp < 0) and torch.all(torch.isfinite(logp))
    # Actions stay in the action space.
    assert all(env.action_space.contains(a) for a in actions.numpy())


def test_deterministic_prediction_is_greedy_and_repeatable():
    torch.manual_seed(1)
    env = make_env(chain_problem(8), 4, 4)
    pol = _policy(env)
    a1, _ = pol.predict(env.reset(), deterministic=True)
    a2, _ = pol.predict(env.reset(), deterministic=True)
    assert np.array_equal(a1, a2)
    with torch.no_grad():
        greedy = pol.action_log_prob(_obs(env), torch.as_tensor(a1))
        sampled, _, logp = pol(_obs(env))
    assert torch.all(greedy >= logp - 1e-4)


def test_padded_nodes_do_not_change_the_log_prob():
    problem = chain_problem(6)
    m, g = 10, 3
    env = PlacementEnv(problem, num_groups=g, max_nodes=m, max_edges=8)
    pol = HierarchicalPlacementPolicy(env.observation_space, env.action_space, lambda _: 1e-3)
    one = env.observation()
    obs = {k: torch.as_tensor(np.repeat(v[None], 2, axis=0)) for k, v in one.items()}
    torch.manual_seed(0)
    with torch.no_grad():
        actions, _, logp = pol(obs)
        changed = actions.clone()
        changed[:, problem.num_nodes:m] = (changed[:, problem.num_nodes:m] + 1) % g
        assert torch.allclose(pol.action_log_prob(obs, changed), logp, atol=1e-4)
    assert np.array_equal(env.decode(actions.numpy()), env.decode(changed.numpy()))


def test_wrong_spaces_are_refused_with_a_clear_error():
    env = make_env(chain_problem(5), 2, 3)
    with pytest.raises(PolicySpaceError, match="Dict observation"):
        HierarchicalPlacementPolicy(spaces.Box(0, 1, (3,)), env.action_space, lambda _: 1e-3)
    with pytest.raises(PolicySpaceError, match="MultiDiscrete"):
        HierarchicalPlacementPolicy(env.observation_space, spaces.Discrete(3), lambda _: 1e-3)
    with pytest.raises(PolicySpaceError, match="fewer than"):
        HierarchicalPlacementPolicy(env.observation_space, spaces.MultiDiscrete([3, 3]), lambda _: 1e-3)


def test_behaviour_cloning_makes_the_placement_likely():
    torch.manual_seed(0)
    problem = chain_problem(8)
    env = make_env(problem, 1, 5)
    pol = _policy(env)
    row = np.full(problem.num_nodes, 2)
    action = env.env.encode(row)
    losses = behaviour_clone(pol, {k: v[0] for k, v in env.reset().items()}, action, steps=60, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    pred, _ = pol.predict(env.reset(), deterministic=True)
    assert np.array_equal(env.env.decode(pred)[0], row)


def test_save_load_round_trip(tmp_path):
    from stable_baselines3 import PPO

    env = make_env(chain_problem(8), 8, 4)
    model = make_ppo(env, PPOConfig(n_steps=1, batch_size=8, n_epochs=1), seed=3)
    model.learn(total_timesteps=16)
    obs = _obs(env)
    with torch.no_grad():
        actions, _, logp = model.policy(obs)
    model.save(tmp_path / "policy.zip")
    loaded = PPO.load(tmp_path / "policy.zip", device="cpu")
    assert type(loaded.policy) is HierarchicalPlacementPolicy
    with torch.no_grad():
        assert torch.allclose(loaded.policy.action_log_prob(obs, actions), logp, atol=1e-5)
        v1 = model.policy.predict_values(obs)
        v2 = loaded.policy.predict_values(obs)
    assert torch.allclose(v1, v2)


def _mean_reward(env, policy, n: int = 4) -> float:
    rewards = []
    for _ in range(n):
        with torch.no_grad():
            actions, _, _ = policy(_obs(env))
        r, _ = env.evaluate_actions(actions.numpy())
        rewards.append(r.mean())
    return float(np.mean(rewards))


@pytest.mark.parametrize("problem_fn", [chain_problem, diamond_problem], ids=["chain", "diamond"])
def test_short_ppo_training_beats_the_random_policy(problem_fn):
    torch.manual_seed(0)
    env = make_env(problem_fn(), 64, 6)
    model = make_ppo(env, PPOConfig(n_steps=1, batch_size=64, n_epochs=2, learning_rate=1e-2), seed=0)
    torch.manual_seed(0)
    before = _mean_reward(env, model.policy)
    model.learn(total_timesteps=64 * 40)
    torch.manual_seed(0)
    after = _mean_reward(env, model.policy)
    # Rewards are -sqrt(step / best single device): a clear margin, not noise.
    assert after > before + 0.3, (before, after)


def test_rollout_buffer_stores_a_shared_observation_once_and_falls_back_when_rows_differ():
    from placer.search.agents.hierarchical.rollout_buffer import SharedObservationRolloutBuffer

    env = make_env(chain_problem(6), 4, 3)
    n_steps = 3

    def fill(changed_step: int | None):
        buf = SharedObservationRolloutBuffer(n_steps, env.observation_space, env.action_space, device="cpu",
                                             gamma=1.0, gae_lambda=1.0, n_envs=4)
        obs_seen = []
        for step in range(n_steps):
            obs = env.reset()
            if step == changed_step:
                obs["node_features"][2] += 1.0  # env 2 sees another graph at this step
            obs_seen.append(obs)
            actions = np.stack([env.action_space.sample() for _ in range(4)])
            buf.add(obs, actions, np.full(4, float(step)), np.ones(4), torch.zeros(4), torch.zeros(4))
        buf.compute_returns_and_advantage(torch.zeros(4), np.ones(4))
        return buf, obs_seen

    buf, seen = fill(None)
    assert buf._all_shared and not buf.observations["node_features"].any()  # never written
    batches = list(buf.get(5))
    assert [len(b.actions) for b in batches] == [5, 5, 2]
    feats = batches[0].observations["node_features"]
    assert feats.stride(0) == 0 and torch.equal(feats[3], torch.as_tensor(seen[0]["node_features"][0]))

    buf, seen = fill(1)
    assert not buf._all_shared
    (batch,) = list(buf.get(None))
    assert len(batch.actions) == 12
    # Each stored transition kept its own observation: only env 2 at step 1 saw the changed graph.
    flat = batch.observations["node_features"].numpy()
    changed = [i for i, f in enumerate(flat) if not np.array_equal(f, seen[0]["node_features"][0])]
    assert len(changed) == 1 and np.array_equal(flat[changed[0]], seen[1]["node_features"][2])
