"""SequentialPlacementEnv: checkers, telescoping rewards against the simulator, masks, seeding, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

from envs.gym.config import EnvConfigError
from envs.gym.features import node_memory
from envs.gym.sequential_env import EpisodeOverError, SequentialPlacementEnv
from envs.sim.problem import PlacementError
from envs.sim.simulator import simulate_batch
from tests.helpers.problems import expected_rewards, random_problem, tight_problem


def run_episode(env, policy, seed=None):
    """Play one episode; returns (rewards, infos, final placement)."""
    obs, info = env.reset(seed=seed)
    rewards, infos = [], []
    done = False
    while not done:
        obs, r, done, truncated, info = env.step(policy(env, obs))
        assert not truncated
        rewards.append(r)
        infos.append(info)
    return rewards, infos, infos[-1]["placement"]


def masked_random(env, obs):
    return int(env.action_space.sample(mask=env.action_masks().astype(np.int8)))


@pytest.mark.parametrize("problem_fn", [lambda: random_problem(n=12, d=3), tight_problem,
                                        lambda: random_problem(n=5, d=1, seed=3)])
def test_checkers_pass(problem_fn):
    problem = problem_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for env in (SequentialPlacementEnv(problem, seed=0),
                    SequentialPlacementEnv(problem, max_nodes=problem.num_nodes + 4, seed=0)):
            gym_check_env(env, skip_render_check=True)
            sb3_check_env(env, warn=False)


@pytest.mark.parametrize("problem_fn", [lambda: random_problem(n=14, d=3, seed=4), tight_problem])
def test_rewards_telescope_to_simulated_final_reward(problem_fn):
    problem = problem_fn()
    env = SequentialPlacementEnv(problem, seed=2)
    _, start = env.reset(seed=2)
    assert start["score"] == pytest.approx(-1.0)  # the default device is the single-device reference
    for policy in (masked_random, lambda e, o: int(e.action_space.sample())):
        rewards, infos, row = run_episode(env, policy)
        want, _ = expected_rewards(problem, row[None], env.reward_model.invalid_penalty)
        assert infos[-1]["score"] == pytest.approx(want[0], rel=1e-12)
        assert sum(rewards) == pytest.approx(want[0] - start["score"], abs=1e-12)
        # every intermediate score is the simulated reward of the completed placement
        for k, info in enumerate(infos):
            completed = np.full(problem.num_nodes, env.default_device)
            completed[: k + 1] = row[: k + 1]
            assert np.array_equal(info["placement"], completed)
            assert info["step_time"] == pytest.approx(simulate_batch(problem, completed[None]).step_time[0], rel=1e-12)


def test_single_device_agent_matches_simulator():
    problem = random_problem(n=10, d=3, seed=8)
    env = SequentialPlacementEnv(problem)
    for d in range(3):
        rewards, infos, row = run_episode(env, lambda e, o, d=d: d)
        assert np.all(row == d)
        want, res = expected_rewards(problem, row[None], env.reward_model.invalid_penalty)
        assert infos[-1]["score"] == pytest.approx(want[0], rel=1e-12)
        assert infos[-1]["step_time"] == pytest.approx(res.step_time[0], rel=1e-12)
        assert sum(rewards) == pytest.approx(want[0] + 1.0, abs=1e-12)


def test_action_masks_exclude_devices_that_would_run_out_of_memory():
    problem = tight_problem()
    env = SequentialPlacementEnv(problem, seed=0)
    mem = node_memory(problem)
    cap = problem.memory_capacity
    rng = np.random.default_rng(0)
    saw_masked = False
    for _ in range(10):
        env.reset()
        used = np.zeros(problem.num_devices)
        done = False
        while not done:
            mask = env.action_masks()
            k = env.current_node
            np.testing.assert_array_equal(mask, (used + mem[k] <= cap) if (used + mem[k] <= cap).any() else True)
            saw_masked |= not mask.all()
            a = int(rng.choice(np.flatnonzero(mask)))
            used[a] += mem[k]
            _, _, done, _, info = env.step(a)
        assert np.all(used <= cap)
    assert saw_masked  # the tight problem really forces the mask


def test_observation_carries_partial_placement():
    problem = random_problem(n=6, d=3, seed=1)
    env = SequentialPlacementEnv(problem, max_nodes=8)
    obs, _ = env.reset()
    d = problem.num_devices
    f = obs["node_features"].shape[1]
    assert obs["current_node"] == 0 and obs["node_features"][0, f - 1] == 1.0
    assert not obs["node_features"][:, f - d - 2:f - 1].any()  # nothing placed yet
    obs, *_ = env.step(2)
    obs, *_ = env.step(1)
    assert obs["current_node"] == 2
    onehot = obs["node_features"][:, f - d - 2:f - 2]
    assert onehot[0].tolist() == [0, 0, 1] and onehot[1].tolist() == [0, 1, 0] and not onehot[2:].any()
    assert obs["node_features"][:2, f - 2].tolist() == [1, 1] and obs["node_features"][2, f - 1] == 1.0
    dev = obs["device_features"]
    assert dev[0, -2] == 0 and dev[1, -2] > 0 and dev[2, -2] > 0  # used memory share on devices 1 and 2


def test_seeding_reproduces_episodes():
    def run(seed):
        env = SequentialPlacementEnv(random_problem(n=9, d=3, seed=5), seed=seed)
        return run_episode(env, masked_random, seed=seed)[0]

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_errors():
    problem = random_problem(n=4, d=2, seed=0)
    env = SequentialPlacementEnv(problem)
    with pytest.raises(PlacementError, match="outside"):
        env.step(5)
    with pytest.raises(PlacementError, match="one device index"):
        env.step([0, 1])
    run_episode(env, lambda e, o: 0)
    with pytest.raises(EpisodeOverError, match="reset"):
        env.step(0)
    with pytest.raises(EnvConfigError, match="default_device"):
        SequentialPlacementEnv(problem, default_device="tpu0")
    with pytest.raises(EnvConfigError, match="max_nodes=2"):
        SequentialPlacementEnv(problem, max_nodes=2)
    with pytest.raises(EnvConfigError, match="unknown reward mode"):
        SequentialPlacementEnv(problem, reward_mode="guess")


@pytest.mark.slow
def test_maskable_ppo_trains():
    from sb3_contrib import MaskablePPO

    env = SequentialPlacementEnv(tight_problem(), seed=0)
    model = MaskablePPO("MultiInputPolicy", env, n_steps=40, batch_size=20, n_epochs=1, seed=0, verbose=0)
    model.learn(80)
    obs, _ = env.reset()
    action, _ = model.predict(obs, action_masks=env.action_masks())
    assert env.action_masks()[int(action)]


def test_sparse_rewards_keep_the_episode_total():
    problem = random_problem(n=11, d=3, seed=6)
    dense = SequentialPlacementEnv(problem, seed=1)
    sparse = SequentialPlacementEnv(problem, seed=1, dense_rewards=False)
    actions = [0, 2, 1, 1, 2, 0, 2, 2, 1, 0, 1]
    r_dense, _, row_dense = run_episode(dense, lambda e, o: actions[e.current_node])
    r_sparse, infos, row_sparse = run_episode(sparse, lambda e, o: actions[e.current_node])
    assert np.array_equal(row_dense, row_sparse) and r_sparse[:-1] == [0.0] * 10
    assert sum(r_sparse) == pytest.approx(sum(r_dense), abs=1e-12)
    assert infos[-1]["source"] == "simulated" and "step_time" in infos[-1]
