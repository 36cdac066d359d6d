"""Both environments on zoo graphs (captured and grouped by graphs.pipeline, costed on a preset cluster)."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401 - registers the gymnasium ids
from envs.gym.placement_env import PlacementEnv
from envs.gym.registration import build_problem
from envs.gym.sequential_env import SequentialPlacementEnv
from envs.sim.simulator import simulate_batch

FAST = ["gpt2", "moe"]
SLOW = ["nmt", "rnnlm", "resnet50", "inception_v3"]
ZOO = FAST + [pytest.param(name, marks=pytest.mark.slow) for name in SLOW]

_BUILT: dict = {}


def zoo_problem(name):
    """(problem, node_ops) of a zoo model's group graph on 4xK40, built once per session.

    Unprofiled (``profile=False``): the K40s are costed by the roofline model, which keeps the
    test to the capture's seconds.
    """
    if name not in _BUILT:
        _BUILT[name] = build_problem(model=f"zoo:{name}", cluster="4xK40", profile=False)
    return _BUILT[name]


def _checks(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=False)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_graphs_pass_checkers_and_match_simulator(name):
    problem, ops = zoo_problem(name)
    assert problem.num_devices == 5 and problem.num_nodes > 5
    flat = PlacementEnv(problem, hierarchical=False, node_ops=ops, seed=0)
    hier = PlacementEnv(problem, node_ops=ops, max_nodes=problem.num_nodes + 10, seed=0)
    seq = SequentialPlacementEnv(problem, node_ops=ops, seed=0)
    for env in (flat, hier, seq):
        _checks(env)
    obs, _ = hier.reset(seed=0)
    kinds = obs["node_features"][: problem.num_nodes, :7]  # op-kind fractions of each group's members
    np.testing.assert_allclose(kinds.sum(axis=1), 1.0, rtol=1e-6)
    assert not kinds[:, 6].any()  # every member's fx op is known: nothing falls in op_other

    # random and single-device agents: rewards are the simulator's figures
    rows, rewards = [], []
    for env in (flat, hier):
        for a in [env.action_space.sample() for _ in range(4)] + [env.single_device_action(d) for d in range(5)]:
            _, r, _, _, info = env.step(a)
            rows.append(info["placement"])
            rewards.append(r)
    res = simulate_batch(problem, np.stack(rows))
    model = flat.reward_model
    want = np.where(res.fits, -np.sqrt(res.step_time / model.reference_time), model.invalid_penalty)
    np.testing.assert_allclose(rewards, want, rtol=1e-12)

    for policy in ("random", "single"):
        _, start = seq.reset(seed=1)
        total, done = 0.0, False
        while not done:
            a = seq.action_space.sample(mask=seq.action_masks().astype(np.int8)) if policy == "random" \
                else seq.default_device
            _, r, done, _, info = seq.step(a)
            total += r
        t = simulate_batch(problem, info["placement"][None])
        expect = -np.sqrt(t.step_time[0] / model.reference_time) if t.fits[0] else model.invalid_penalty
        assert info["score"] == pytest.approx(expect, rel=1e-12)
        assert total == pytest.approx(expect - start["score"], abs=1e-9)


@pytest.mark.slow
def test_gym_make_from_zoo_model_with_profiling():
    env = gym.make("placer/Placement-v0", model="zoo:gpt2", cluster="cpu+gpu", num_groups=8)
    obs, info = env.reset(seed=0)
    assert info["reference_time"] > 0 and obs["node_mask"].sum() == env.unwrapped.problem.num_nodes
    _, r, terminated, _, info = env.step(env.action_space.sample())
    assert terminated and np.isfinite(r) and info["source"] == "simulated"


@pytest.mark.slow
def test_measured_mode_with_real_measurer_on_this_machine():
    """gym.make with model= and reward_mode="measured" runs placements for real (here: the CPU)."""
    env = gym.make("placer/Placement-v0", model="zoo:gpt2", cluster="real", reward_mode="measured",
                   hierarchical=False, profile=False)
    try:
        env.reset(seed=0)
        _, r, _, _, info = env.step(env.unwrapped.single_device_action(0))
        assert info["source"] == "measured" and info["valid"] and info["step_time"] > 0
        assert r == pytest.approx(-np.sqrt(info["step_time"] / info["reference_time"]))
    finally:
        env.close()
    assert env.unwrapped.owned_measurer is None


def test_measured_mode_on_a_cluster_without_real_devices_is_a_clear_error():
    from envs.gym.config import EnvConfigError

    problem, _ = zoo_problem("gpt2")
    with pytest.raises(EnvConfigError, match="measurer"):
        gym.make("placer/Placement-v0", problem=problem, reward_mode="measured")
    with pytest.raises(EnvConfigError, match="measurer='auto' needs model="):
        gym.make("placer/Placement-v0", problem=problem, reward_mode="measured", measurer="auto")


def test_a_model_env_is_costed_with_the_models_own_optimizer():
    """gym.make(model=...) simulates the step optimize, show and the benchmark simulate: the
    model's own optimizer's state (GPT-2: AdamW, 2 bytes of state per parameter byte), not SGD's."""
    from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR

    problem, _ = zoo_problem("gpt2")
    assert problem.optimizer_state_factor == OPTIMIZER_STATE_FACTOR["adamw"]
    sgd, _ = build_problem(model="zoo:gpt2", cluster="4xK40", profile=False, optimizer="sgd")
    assert sgd.optimizer_state_factor == OPTIMIZER_STATE_FACTOR["sgd"]  # an explicit choice still wins
