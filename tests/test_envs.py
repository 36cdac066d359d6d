"""PlacementEnv: spaces, checkers, rewards against the simulator, seeding, padding, errors, registration."""

from __future__ import annotations

import warnings

import gymnasium as gym
import networkx as nx
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs  # noqa: F401 - registers the gymnasium ids
from envs.gym.config import EnvConfigError, default_num_groups
from envs.gym.features import DEVICE_FEATURES, node_feature_names
from envs.gym.placement_env import PlacementEnv
from envs.sim.problem import PlacementError
from tests.helpers.problems import expected_rewards, random_problem, tight_problem

PROBLEMS = {
    "chain12x3": lambda: random_problem(n=12, d=3, seed=0),
    "dag40x4": lambda: random_problem(n=40, d=4, seed=5, extra_edges=30),
    "tight10x3": tight_problem,
    "one_device": lambda: random_problem(n=6, d=1, seed=2),
}


def _quiet_checks(env):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SB3 recommends flat observations; ours are graph tensors by design
        gym_check_env(env, skip_render_check=True)
        sb3_check_env(env, warn=False)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
@pytest.mark.parametrize("hierarchical", [True, False])
def test_checkers_pass(name, hierarchical):
    problem = PROBLEMS[name]()
    _quiet_checks(PlacementEnv(problem, hierarchical=hierarchical, seed=0))
    if hierarchical:  # padding: checked once per problem
        _quiet_checks(PlacementEnv(problem, max_nodes=problem.num_nodes + 7, max_edges=problem.num_edges + 5, seed=0))


@pytest.mark.parametrize("name", ["chain12x3", "dag40x4", "tight10x3"])
@pytest.mark.parametrize("hierarchical", [True, False])
def test_random_and_single_device_rewards_equal_simulator(name, hierarchical):
    problem = PROBLEMS[name]()
    env = PlacementEnv(problem, hierarchical=hierarchical, seed=3)
    env.reset(seed=3)
    actions = [env.action_space.sample() for _ in range(12)]
    actions += [env.single_device_action(d) for d in range(problem.num_devices)]
    got, rows, infos = [], [], []
    for a in actions:
        _, reward, terminated, truncated, info = env.step(a)
        assert terminated and not truncated
        got.append(reward)
        rows.append(info["placement"])
        infos.append(info)
    rows = np.stack(rows)
    want, res = expected_rewards(problem, rows, env.reward_model.invalid_penalty)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose([i["step_time"] for i in infos], res.step_time, rtol=1e-12)
    np.testing.assert_allclose(np.stack([i["peak_memory"] for i in infos]), res.peak_memory)
    assert [i["fits"] for i in infos] == res.fits.tolist()
    assert {i["source"] for i in infos} == {"simulated"}
    for d in range(problem.num_devices):  # the single-device actions really place everything on d
        assert np.all(rows[12 + d] == d)


def test_hierarchical_action_decodes_group_then_device():
    problem = random_problem(n=8, d=3, seed=1)
    env = PlacementEnv(problem, num_groups=4, max_nodes=10)
    assert env.action_space.nvec.tolist() == [4] * 10 + [3] * 4
    groups = np.array([0, 1, 2, 3, 3, 2, 1, 0, 2, 2])  # the last two are padding
    group_device = np.array([2, 0, 1, 1])
    _, _, _, _, info = env.step(np.concatenate([groups, group_device]))
    assert info["placement"].tolist() == group_device[groups[:8]].tolist()


def test_padding_entries_are_ignored_and_masked():
    problem = random_problem(n=9, d=3, seed=4)
    env = PlacementEnv(problem, max_nodes=16, max_edges=40, hierarchical=False)
    obs, _ = env.reset(seed=0)
    assert obs["node_mask"].sum() == 9 and obs["edge_mask"].sum() == problem.num_edges
    assert not obs["node_features"][9:].any() and not obs["edge_index"][:, problem.num_edges:].any()
    a = np.zeros(16, dtype=np.int64)
    b = a.copy()
    b[9:] = 2
    assert env.step(a)[1] == env.step(b)[1]


def test_observation_columns_match_feature_names():
    problem = random_problem(n=10, d=4, seed=2)
    obs, _ = PlacementEnv(problem).reset()
    assert obs["node_features"].shape[1] == len(node_feature_names(problem.device_names))
    assert obs["device_features"].shape == (4, len(DEVICE_FEATURES))
    names = node_feature_names(problem.device_names)
    col = names.index("depth")
    assert obs["node_features"][0, col] == 0.0 and obs["node_features"][:, col].max() == 1.0
    # the slow cpu (device 0) shows a larger per-node time than any gpu
    cpu, gpu = names.index("log_time@cpu"), names.index("log_time@gpu0")
    assert np.all(obs["node_features"][:, cpu] > obs["node_features"][:, gpu])


def test_node_ops_give_op_kind_one_hot():
    problem = random_problem(n=4, d=2, seed=0, extra_edges=0)
    ops = ["placeholder", "call_module", "call_function", "output"]
    obs, _ = PlacementEnv(problem, node_ops=ops).reset()
    names = node_feature_names(problem.device_names)
    for i, op in enumerate(ops):
        assert obs["node_features"][i, names.index(f"op_{op}")] == 1.0
        assert obs["node_features"][i, : names.index("op_other") + 1].sum() == 1.0


def test_seeding_reproduces_episodes():
    def run(seed):
        env = PlacementEnv(random_problem(n=15, d=3, seed=7), seed=seed)
        env.reset(seed=seed)
        return [env.step(env.action_space.sample())[1] for _ in range(5)]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_invalid_placement_gets_penalty_below_every_valid_reward():
    problem = tight_problem()
    env = PlacementEnv(problem, hierarchical=False, seed=0)
    gpu = problem.device_names.index("gpu0")
    _, reward, _, _, info = env.step(env.single_device_action(gpu))
    assert not info["fits"] and not info["valid"]
    assert reward == env.reward_model.invalid_penalty
    assert set(info["over_memory"]) == {"gpu0"} and info["over_memory"]["gpu0"] > 0
    assert "out of memory" in info["reason"]
    valid = [r for r, i in (env.step(env.action_space.sample())[1:5:3] for _ in range(30)) if i["valid"]]
    assert valid and min(valid) > env.reward_model.invalid_penalty


def test_evaluate_matches_step_and_default_groups():
    problem = random_problem(n=20, d=4, seed=9)
    env = PlacementEnv(problem, seed=1)
    assert env.num_groups == default_num_groups(20, 4) == 20
    assert default_num_groups(200, 4) == 60 and default_num_groups(5000, 8) == 256
    assert default_num_groups(3, 5) == 5  # every placement stays an action with fewer nodes than devices
    actions = np.stack([env.action_space.sample() for _ in range(6)])
    ev = env.evaluate(env.decode(actions))
    assert ev.reward.tolist() == [env.step(a)[1] for a in actions]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_nodes=5), "max_nodes=5"),
        (dict(max_edges=2), "max_edges=2"),
        (dict(max_nodes=0), "positive integer"),
        (dict(num_groups=0), "num_groups"),
        (dict(reward_mode="fastest"), "unknown reward mode"),
        (dict(reward_mode="measured"), "measurer"),
        (dict(invalid_penalty=-1.0), "invalid_penalty"),
        (dict(reference="best"), "unknown reference"),
        (dict(reference=-3.0), "positive seconds"),
        (dict(reference={"n0": "tpu"}), "bad reference placement"),
        (dict(node_ops=["call_module"]), "node_ops"),
        (dict(measure_every=3), "hybrid"),
    ],
)
def test_bad_arguments_raise_env_config_error(kwargs, match):
    with pytest.raises(EnvConfigError, match=match):
        PlacementEnv(random_problem(n=12, d=3), **kwargs)


def test_a_missing_cluster_hint_names_the_command_that_lists_presets_when_they_cannot_be_listed(monkeypatch):
    """Its fallback pointed at envs.hardware.loading.list_presets(), a function the user never calls."""
    import envs.hardware.loading as loading
    from envs.gym.registration import build_problem

    def broken() -> list[str]:
        raise OSError("presets folder unreadable")

    monkeypatch.setattr(loading, "list_presets", broken)
    with pytest.raises(EnvConfigError) as exc:
        build_problem(graph=nx.DiGraph())
    assert "()" not in str(exc.value) and "`placer presets` lists them" in str(exc.value)


def test_not_a_problem_and_bad_actions():
    with pytest.raises(EnvConfigError, match="PlacementProblem"):
        PlacementEnv({"nodes": 3})
    env = PlacementEnv(random_problem(n=6, d=2, seed=0), hierarchical=False)
    with pytest.raises(PlacementError, match="shape"):
        env.step(np.zeros(5, dtype=np.int64))
    with pytest.raises(PlacementError, match="outside"):
        env.step(np.full(6, 2))
    with pytest.raises(PlacementError, match="unknown device"):
        env.single_device_action("gpu7")


# --------------------------------------------------------------------------- registration


def _hand_graph() -> nx.DiGraph:
    """A small placement graph with the contract's attributes (no capture needed)."""
    g = nx.DiGraph(name="hand", fingerprint="0" * 16)
    spec = [("x", "placeholder", 0, 0), ("fc1", "call_module", 4_000_000, 2e8), ("relu", "call_function", 0, 1e5),
            ("fc2", "call_module", 4_000_000, 2e8), ("out", "output", 0, 0)]
    for name, op, params, flops in spec:
        g.add_node(name, op=op, target=name, module="", shape=[64, 1024], dtype="torch.float32",
                   out_bytes=262_144, param_bytes=params, flops=int(flops), bytes_moved=524_288 + params,
                   requires_grad=op not in ("placeholder", "output"), fwd_time={}, bwd_time={}, time={})
    for a, b in zip(spec, spec[1:]):
        g.add_edge(a[0], b[0], bytes=262_144)
    return g


def test_gym_make_from_problem_graph_and_saved_graph(tmp_path):
    from graphs.graph_io import save_graph

    problem = random_problem(n=10, d=3, seed=1)
    env = gym.make("placer/Placement-v0", problem=problem, hierarchical=False)
    assert env.unwrapped.problem is problem
    _quiet_checks(gym.make("placer/SequentialPlacement-v0", problem=problem).unwrapped)

    graph = _hand_graph()
    env = gym.make("placer/Placement-v0", graph=graph, cluster="4xK40")
    obs, _ = env.reset(seed=0)
    assert env.unwrapped.problem.num_nodes == 5 and obs["node_mask"].sum() == 5
    names = node_feature_names(env.unwrapped.problem.device_names)
    assert obs["node_features"][0, names.index("op_placeholder")] == 1.0
    _quiet_checks(env.unwrapped)

    path = save_graph(graph, tmp_path / "hand.json")
    env2 = gym.make("placer/SequentialPlacement-v0", graph=str(path), cluster="4xK40")
    assert env2.unwrapped.problem.node_names == env.unwrapped.problem.node_names


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model="zoo:no_such_model", cluster="4xK40"), "no_such_model"),
        (dict(graph="__graph__", cluster="16xTPU"), "unknown cluster '16xTPU'"),
        (dict(graph="__graph__"), "cluster is needed"),
        (dict(graph="/nonexistent/graph.json", cluster="4xK40"), "does not exist"),
        (dict(), "exactly one of"),
        (dict(problem="__problem__", graph="__graph__", cluster="4xK40"), "exactly one of"),
        (dict(problem="__problem__", reward_mode="bogus"), "unknown reward mode"),
        (dict(problem="__problem__", max_nodes=4), "padded to max_nodes=4"),
        (dict(graph="__graph__", cluster="4xK40", max_nodes=3), "max_nodes=3"),
    ],
)
@pytest.mark.parametrize("env_id", ["placer/Placement-v0", "placer/SequentialPlacement-v0"])
def test_gym_make_bad_arguments(kwargs, match, env_id):
    subst = {"__graph__": _hand_graph(), "__problem__": random_problem(n=10, d=3)}
    kwargs = {k: subst.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(EnvConfigError, match=match):
        gym.make(env_id, **kwargs)


def test_import_envs_is_light():
    import subprocess
    import sys

    code = "import sys, envs, gymnasium as gym; assert 'placer/Placement-v0' in gym.registry; " \
           "print('torch' in sys.modules, 'envs.sim.simulator' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_graph_env_is_costed_with_the_optimizer_the_graph_was_profiled_with():
    """optimizer=None (the default) is the graph's own, as compile_problem's default; not plain SGD."""
    from envs.gym.registration import build_problem
    from envs.sim.optimizer_state import OPTIMIZER_STATE_FACTOR

    graph = _hand_graph()
    graph.graph["optimizer"] = "adam"
    problem, _ = build_problem(graph=graph, cluster="4xK40")
    assert problem.optimizer_state_factor == OPTIMIZER_STATE_FACTOR["adam"]
    env = gym.make("placer/Placement-v0", graph=graph, cluster="4xK40")
    assert env.unwrapped.problem.optimizer_state_factor == OPTIMIZER_STATE_FACTOR["adam"]


@pytest.mark.parametrize("env_id", ["placer/Placement-v0", "placer/SequentialPlacement-v0"])
def test_sb3_make_vec_env_builds_the_registered_envs(env_id):
    # SB3's make_vec_env asks gym.make for render_mode="rgb_array" and retries without it only
    # on a TypeError; an env that took render_mode for a reward option could not be built.
    from stable_baselines3.common.env_util import make_vec_env

    venv = make_vec_env(env_id, n_envs=2, seed=0, env_kwargs=dict(problem=random_problem(n=8, d=3, seed=1)))
    venv.reset()
    _, rewards, _, _ = venv.step(np.stack([venv.action_space.sample() for _ in range(2)]))
    assert rewards.shape == (2,) and np.all(np.isfinite(rewards))
    venv.close()


@pytest.mark.parametrize("env_id", ["placer/Placement-v0", "placer/SequentialPlacement-v0"])
def test_render_mode_none_renders_nothing_and_ansi_describes_the_placement(env_id):
    problem = random_problem(n=8, d=3, seed=1)
    quiet = gym.make(env_id, problem=problem)
    quiet.reset(seed=0)
    assert quiet.unwrapped.render_mode is None and quiet.render() is None

    env = gym.make(env_id, problem=problem, render_mode="ansi")
    assert env.unwrapped.render_mode == "ansi"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gym_check_env(env.unwrapped)  # render check included
    env.reset(seed=0)
    env.step(env.action_space.sample())
    text = env.render()
    assert isinstance(text, str) and " ms" in text and problem.device_names[0] in text

    with pytest.raises(EnvConfigError, match="render_mode='rgb_array'") as err:
        gym.make(env_id, problem=problem, render_mode="rgb_array")
    assert isinstance(err.value, TypeError)  # what SB3's make_vec_env retries on


@pytest.mark.parametrize("env_id", ["placer/Placement-v0", "placer/SequentialPlacement-v0"])
def test_a_misspelt_env_keyword_is_called_unknown_not_hybrid_only(env_id):
    # num_group= (for num_groups=) is no hybrid option; "apply to reward_mode='hybrid' only"
    # sent the user to the reward mode instead of the typo.
    with pytest.raises(EnvConfigError, match=r"unknown option.*'num_group'") as err:
        gym.make(env_id, problem=random_problem(n=8, d=3, seed=1), num_group=4)
    assert "hybrid only" not in str(err.value)
    with pytest.raises(EnvConfigError, match="apply to reward_mode='hybrid' only"):
        gym.make(env_id, problem=random_problem(n=8, d=3, seed=1), measure_every=4)


@pytest.mark.parametrize("reward_mode", ["measured", "hybrid"])
def test_a_measured_env_on_a_simulated_spec_is_refused_before_the_model_is_captured(monkeypatch, reward_mode):
    # 4xK40's gpu0..gpu3 have no real device to run on. The refusal came after the model's
    # capture and profile, worded for the CLI ("name the cluster ... `--cluster 4xK40`").
    from envs.gym import registration

    def no_capture(*args, **kwargs):
        raise AssertionError("the model was prepared before the cluster was checked")

    monkeypatch.setattr(registration, "_prepare", no_capture)
    with pytest.raises(EnvConfigError, match=r"gpu0, gpu1, gpu2, gpu3.*real_device") as err:
        gym.make("placer/Placement-v0", model="zoo:rnnlm", cluster="4xK40", reward_mode=reward_mode)
    assert "--cluster" not in str(err.value)


@pytest.mark.parametrize("env_class", ["PlacementEnv", "SequentialPlacementEnv"])
def test_a_seed_given_at_construction_is_the_envs_np_random_seed(env_class):
    # gymnasium's np_random_seed re-seeds np_random when _np_random_seed is unset: reading it
    # threw the constructor's seed away.
    from envs.gym.sequential_env import SequentialPlacementEnv

    cls = {"PlacementEnv": PlacementEnv, "SequentialPlacementEnv": SequentialPlacementEnv}[env_class]
    problem = random_problem(n=8, d=3, seed=1)
    first = cls(problem, seed=3)
    assert first.np_random_seed == 3
    second = cls(problem, seed=3)
    assert first.np_random.integers(1 << 30) == second.np_random.integers(1 << 30)
