"""BatchedPlacementVecEnv: equal to per-env results, SB3 VecEnv API, one simulator call per step, throughput."""

from __future__ import annotations

import time

import numpy as np
import pytest

from envs.gym.config import EnvConfigError
from envs.gym.placement_env import PlacementEnv
from envs.gym.registration import make_vec_env
from envs.gym.vector_env import BatchedPlacementVecEnv
from tests.helpers.problems import random_problem, tight_problem


@pytest.mark.parametrize("hierarchical", [True, False])
@pytest.mark.parametrize("problem_fn", [lambda: random_problem(n=30, d=4, seed=2, extra_edges=20), tight_problem])
def test_vec_results_equal_per_env_results(hierarchical, problem_fn):
    problem = problem_fn()
    venv = BatchedPlacementVecEnv(problem, n_envs=16, hierarchical=hierarchical, seed=0)
    single = PlacementEnv(problem, hierarchical=hierarchical)
    obs = venv.reset()
    ref_obs, _ = single.reset()
    for key, space in venv.observation_space.spaces.items():
        assert obs[key].shape == (16,) + space.shape
        assert np.array_equal(obs[key][5], ref_obs[key])
    actions = np.stack([venv.action_space.sample() for _ in range(16)])
    obs2, rewards, dones, infos = venv.step(actions)
    assert dones.all() and rewards.dtype == np.float32 and len(infos) == 16
    for b in range(16):
        _, r, _, _, info = single.step(actions[b])
        assert rewards[b] == pytest.approx(r, rel=1e-6)
        assert infos[b]["step_time"] == info["step_time"] and infos[b]["fits"] == info["fits"]
        assert np.array_equal(infos[b]["placement"], info["placement"])
        assert set(infos[b]["terminal_observation"]) == set(obs)
    # float actions (as SB3's buffers return them) decode the same
    assert np.array_equal(venv.step(actions.astype(np.float32))[1], rewards)


def test_one_simulator_call_per_step(monkeypatch):
    import envs.sim.simulator as sim

    calls = []
    real = sim.simulate_batch

    def counting(problem, placements, *args, **kwargs):
        calls.append(np.shape(placements))
        return real(problem, placements, *args, **kwargs)

    monkeypatch.setattr(sim, "simulate_batch", counting)
    venv = BatchedPlacementVecEnv(random_problem(n=20, d=3), n_envs=32)
    venv.reset()
    calls.clear()
    venv.step(np.stack([venv.action_space.sample() for _ in range(32)]))
    assert calls == [(32, 20)]


def test_vec_env_api_and_rollout_engine():
    problem = random_problem(n=12, d=3, seed=1)
    venv = make_vec_env(n_envs=4, problem=problem, hierarchical=False)
    assert venv.get_attr("reward_mode") == ["simulated"] * 4
    assert venv.env_method("single_device_action", 1, indices=[0, 2])[0].tolist() == [1] * 12
    assert venv.env_is_wrapped(PlacementEnv) == [True] * 4
    venv.seed(3)
    venv.reset()
    rewards, ev = venv.evaluate_placements(np.zeros((100, 12), dtype=np.int64))
    assert rewards.shape == (100,) and np.all(rewards == rewards[0]) and len(ev) == 100
    rewards2, _ = venv.evaluate_actions(np.ones((7, 12), dtype=np.int64))
    assert rewards2.shape == (7,)
    with pytest.raises(EnvConfigError, match="n_envs"):
        BatchedPlacementVecEnv(problem, n_envs=0)
    with pytest.raises(EnvConfigError, match="not both"):
        BatchedPlacementVecEnv(problem, n_envs=2, env=PlacementEnv(problem))


def test_seeded_vec_env_samples_reproducibly():
    def run(seed):
        venv = BatchedPlacementVecEnv(random_problem(n=15, d=3, seed=3), n_envs=4)
        venv.seed(seed)
        venv.reset()
        venv.action_space.seed(seed)
        return venv.step(np.stack([venv.action_space.sample() for _ in range(4)]))[1].tolist()

    assert run(1) == run(1)


@pytest.mark.slow
def test_sb3_ppo_trains_on_vec_env():
    from stable_baselines3 import PPO

    venv = BatchedPlacementVecEnv(random_problem(n=10, d=3, seed=0), n_envs=8, hierarchical=False)
    model = PPO("MultiInputPolicy", venv, n_steps=8, batch_size=32, n_epochs=1, seed=0, verbose=0)
    model.learn(128)
    assert venv.env.reward_model.evaluated >= 128


@pytest.mark.slow
def test_throughput_200_nodes_4_devices():
    """The agent issue needs >= 2,000 evaluated placements/s on a 200-group graph."""
    venv = BatchedPlacementVecEnv(random_problem(n=200, d=4, seed=3, extra_edges=100), n_envs=256, seed=0)
    venv.reset()
    actions = np.stack([venv.action_space.sample() for _ in range(256)])
    venv.step(actions)  # JIT warm-up
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        venv.step(actions)
        steps += 1
    rate = steps * 256 / (time.perf_counter() - start)
    assert rate >= 2000, f"{rate:.0f} placements/s"


@pytest.mark.parametrize("count", [3, 5])
def test_a_step_with_another_number_of_actions_than_envs_names_both(count):
    from envs.sim.problem import PlacementError

    venv = BatchedPlacementVecEnv(random_problem(n=10, d=3, seed=1), n_envs=4)
    venv.reset()
    actions = np.stack([venv.action_space.sample() for _ in range(count)])
    with pytest.raises(PlacementError, match=rf"{count} action\(s\) for 4 envs"):
        venv.step(actions)
    # one action per env, flat or stacked, still steps
    _, rewards, _, _ = venv.step(np.stack([venv.action_space.sample() for _ in range(4)]).reshape(-1))
    assert rewards.shape == (4,)


def test_vec_reset_infos_equal_a_dummy_vec_envs():
    # The batched env stands for DummyVecEnv([PlacementEnv] * n): its reset infos lacked num_nodes.
    from stable_baselines3.common.vec_env import DummyVecEnv

    problem = random_problem(n=10, d=3, seed=1)
    venv = BatchedPlacementVecEnv(problem, n_envs=2)
    dummy = DummyVecEnv([lambda: PlacementEnv(problem) for _ in range(2)])
    venv.seed(0)
    dummy.seed(0)
    venv.reset()
    dummy.reset()
    assert venv.reset_infos == dummy.reset_infos
