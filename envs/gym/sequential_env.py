"""``SequentialPlacementEnv``: one node (group) placed per step (the Placeto formulation).

Nodes are placed in the problem's topological order (``problem.node_names``), one per
step, with a ``Discrete(D)`` action. Nodes not yet placed count as sitting on the
*default device* (the reference placement's device when the reference is a single
device, else the fastest fitting single device), so every prefix of the episode is a
complete placement: the *completion* ``c_k`` after k steps is the placed prefix plus the
default device for the rest.

**Reward (telescoping).** Let ``s_k`` be the normalised reward (:mod:`envs.gym.rewards`) of the
completion ``c_k``: simulated for ``k < N`` (on the calibrated simulator in hybrid mode),
in the env's reward mode for the final, complete placement ``c_N``. Step k earns
``s_k - s_{k-1}``, so an episode's rewards add up to ``s_N - s_0``: the final placement's
normalised reward minus the default placement's (``s_0 = -1`` when the default is the
single-device reference). With ``dense_rewards=False`` intermediate steps earn 0 and are
not simulated; the last step earns ``s_N - s_0``. Only the last step can be measured, so measured mode costs one
measurement per episode.

**Observation** (``Dict``): the five graph keys of :class:`envs.gym.placement_env.PlacementEnv`
with the partial placement folded in, plus the node being placed:

* ``node_features`` [max_nodes, F + D + 2]: the static features, then a one-hot of the
  node's assigned device (all 0 while unplaced), then ``placed`` and ``current`` flags;
* ``device_features`` [D, F_dev + 2]: the static features, then ``used_memory_share``
  (memory pinned by the nodes placed there / capacity, clipped to [0, 4]) and
  ``log_assigned_time`` (their compute time on it, ``log1p(µs) / 10``);
* ``node_mask``, ``edge_index``, ``edge_mask`` as in ``PlacementEnv``;
* ``current_node``: ``Discrete(max_nodes)``, the index of the node this step places.

**Action mask** (:meth:`SequentialPlacementEnv.action_masks`, for sb3-contrib's
MaskablePPO): device d is allowed when the memory already pinned there by placed nodes plus
this node's (parameters + gradients + optimizer state + kept activations,
:func:`envs.gym.features.node_memory`) is within d's capacity; that sum is a lower bound of the
simulator's peak, so a masked device would surely run out of memory. When no device
passes, every device is allowed (the episode then ends with the invalid penalty rather than
with no legal action).

``render_mode="ansi"`` makes :meth:`SequentialPlacementEnv.render` return the current
completion as text (nodes placed, nodes per device, and its step time once simulated);
with the default ``None`` it returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.gym.config import RENDER_MODES, EnvConfigError, check_render_mode, resolve_padding
from envs.gym.features import OpKind, log_time, node_memory
from envs.gym.placement_env import (
    FEATURE_MAX,
    check_problem,
    graph_observation,
    graph_observation_space,
    placement_text,
)
from envs.gym.reward_modes import make_reward_model
from envs.gym.rewards import Evaluation, RewardModel
from envs.sim.problem import PlacementError, PlacementProblem
from graphs.errors import PlacerError

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from envs.runtime.measurer import Measurer


class EpisodeOverError(PlacerError, RuntimeError):
    """``step`` called on a finished episode (call ``reset`` first)."""


class SequentialPlacementEnv(gym.Env):
    """Place one node per step in topological order; reward = improvement of the completed placement.

    Args:
        problem: the compiled problem.
        max_nodes, max_edges: padding (default: the graph's own size).
        reward_mode, reference, invalid_penalty, measurer, reward_options: as for
            :class:`envs.gym.placement_env.PlacementEnv`.
        default_device: device (index or name) unplaced nodes count as on; default as in
            the module docstring.
        seed: seeds the env's RNG and its action space.
        node_ops: fx op kind per node (op-kind features).
        dense_rewards: reward every step with the change of the completion's score (default);
            False gives 0 until the last step, which earns ``s_N - s_0`` — the same episode
            total without one simulator call per step (faster on large graphs).
        render_mode: None (``render()`` returns None) or ``"ansi"`` (a text summary).

    Raises:
        EnvConfigError: a bad argument.
    """

    metadata = {"render_modes": list(RENDER_MODES)}

    def __init__(self, problem: PlacementProblem, max_nodes: int | None = None, max_edges: int | None = None,
                 reward_mode: str = "simulated", reference: Any = "single", invalid_penalty: float | None = None,
                 measurer: Measurer | None = None, default_device: int | str | None = None, seed: int | None = None,
                 node_ops: Sequence[OpKind] | None = None, dense_rewards: bool = True,
                 render_mode: str | None = None, **reward_options: Any) -> None:
        super().__init__()
        # A named parameter: gym.make and SB3's make_vec_env pass render_mode, which must not
        # fall into reward_options.
        self.render_mode = check_render_mode(render_mode)
        self.problem = check_problem(problem)
        self.dense_rewards = bool(dense_rewards)
        self.padding = resolve_padding(problem.num_nodes, problem.num_edges, max_nodes, max_edges)
        self.reward_model: RewardModel = make_reward_model(
            problem, reward_mode, reference=reference, invalid_penalty=invalid_penalty, measurer=measurer,
            **reward_options)
        if node_ops is not None and len(node_ops) != problem.num_nodes:
            raise EnvConfigError(f"node_ops has {len(node_ops)} entries; the problem has {problem.num_nodes} nodes")
        self.default_device = self._resolve_default(default_device)
        self._static = graph_observation(problem, self.padding, node_ops)
        n, d = problem.num_nodes, problem.num_devices
        self._node_memory = node_memory(problem)
        self._times = problem.fwd_time + problem.bwd_time
        self._capacity = np.asarray(problem.memory_capacity, dtype=np.float64)
        f_node = self._static["node_features"].shape[1] + d + 2
        f_dev = self._static["device_features"].shape[1] + 2
        graph_spaces = graph_observation_space(self.padding, f_node, d, f_dev)
        graph_spaces["current_node"] = spaces.Discrete(self.padding.max_nodes)
        self.observation_space = spaces.Dict(graph_spaces)
        self.action_space = spaces.Discrete(d)
        #: A measurer this env made itself (gym.make with model=) and closes in close().
        self.owned_measurer: Measurer | None = None
        self.last_evaluation: Evaluation | None = None
        # Episode state (reset() sets it; a fresh env starts as if reset).
        self._row = np.full(n, self.default_device, dtype=np.int64)
        self._k = 0
        self._done = False
        self._score = 0.0
        self._used_memory = np.zeros(d)
        self._used_time = np.zeros(d)
        if seed is not None:
            # Both, as gymnasium's reset(seed=) sets them: np_random_seed re-seeds np_random when
            # _np_random_seed is unset, which would throw this seed away.
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.action_space.seed(seed)
            self.observation_space.seed(seed)
        self._start()

    @property
    def reward_mode(self) -> str:
        return self.reward_model.mode

    @property
    def current_node(self) -> int:
        """Index (in ``problem.node_names``) of the node the next step places."""
        return self._k

    @property
    def placement(self) -> np.ndarray:
        """The current completion: placed prefix, default device for the rest."""
        return self._row.copy()

    def _resolve_default(self, default_device: int | str | None) -> int:
        names = list(self.problem.device_names)
        if default_device is None:
            ref = self.reward_model.reference_placement
            if ref is not None and np.all(ref == ref[0]):
                return int(ref[0])
            return int(self.reward_model.single_device_order()[0])
        if isinstance(default_device, str):
            if default_device not in names:
                raise EnvConfigError(f"unknown default_device {default_device!r}; devices are {names}")
            return names.index(default_device)
        if isinstance(default_device, bool) or not hasattr(default_device, "__index__") \
                or not 0 <= int(default_device) < len(names):
            raise EnvConfigError(f"default_device must be a device name or an index in 0..{len(names) - 1}, "
                                 f"got {default_device!r}")
        return int(default_device)

    def _start(self) -> Evaluation:
        self._row[:] = self.default_device
        self._k = 0
        self._done = False
        self._used_memory[:] = 0.0
        self._used_time[:] = 0.0
        ev = self.reward_model.simulate(self._row.copy())
        self._score = float(ev.reward[0])
        return ev

    def _observation(self) -> dict[str, np.ndarray]:
        n, d = self.problem.num_nodes, self.problem.num_devices
        max_nodes = self.padding.max_nodes
        dynamic = np.zeros((max_nodes, d + 2), dtype=np.float32)
        k = self._k
        dynamic[np.arange(k), self._row[:k]] = 1.0
        dynamic[:k, d] = 1.0
        if k < n:
            dynamic[k, d + 1] = 1.0
        dev_dynamic = np.column_stack([
            np.clip(self._used_memory / np.maximum(self._capacity, 1.0), 0.0, 4.0),
            log_time(self._used_time),
        ])
        obs = {key: v.copy() for key, v in self._static.items() if key not in ("node_features", "device_features")}
        obs["node_features"] = np.concatenate([self._static["node_features"], dynamic], axis=1)
        obs["device_features"] = np.clip(
            np.concatenate([self._static["device_features"], dev_dynamic], axis=1), 0.0, FEATURE_MAX
        ).astype(np.float32)
        obs["current_node"] = int(min(k, n - 1))
        return obs

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode with nothing placed; ``seed`` also seeds the action space."""
        super().reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
            self.observation_space.seed(seed)
        ev = self._start()
        info = {
            "reference_time": self.reward_model.reference_time,
            "num_nodes": self.problem.num_nodes,
            "default_device": self.default_device,
            "step_time": float(ev.step_time[0]),
            "score": self._score,
        }
        return self._observation(), info

    def action_masks(self) -> np.ndarray:
        """[D] bool: devices the current node may go to without surely running out of memory."""
        if self._done or self._k >= self.problem.num_nodes:
            return np.ones(self.problem.num_devices, dtype=bool)
        ok = self._used_memory + self._node_memory[self._k] <= self._capacity
        return ok if ok.any() else np.ones_like(ok)

    def step(self, action: Any):
        """Place the current node on device ``action``; reward = change of the completion's score."""
        if self._done:
            raise EpisodeOverError("the episode is over (every node is placed); call reset() first")
        a = np.asarray(action)
        if a.size != 1 or not np.all(np.mod(a, 1) == 0):
            raise PlacementError(f"action must be one device index, got {action!r}")
        dev = int(a.reshape(-1)[0])
        if not 0 <= dev < self.problem.num_devices:
            raise PlacementError(f"action {dev} is outside 0..{self.problem.num_devices - 1}")
        k = self._k
        self._row[k] = dev
        self._used_memory[dev] += self._node_memory[k]
        self._used_time[dev] += self._times[k, dev]
        self._k = k + 1
        terminated = self._k == self.problem.num_nodes
        if not terminated and not self.dense_rewards:
            # Sparse rewards: no simulation until the end (the episode total is unchanged).
            info = {"node": self.problem.node_names[k], "placement": self._row.copy(), "score": self._score}
            return self._observation(), 0.0, False, False, info
        # Only the final, complete placement goes through the reward mode (e.g. measured).
        row = self._row.copy()  # the evaluation keeps its rows; _row changes next step
        ev = self.reward_model.evaluate(row) if terminated else self.reward_model.simulate(row)
        self.last_evaluation = ev
        score = float(ev.reward[0])
        reward = score - self._score
        self._score = score
        self._done = terminated
        info = ev.info(0, self.problem, self.reward_model.reference_time)
        info["score"] = score
        info["node"] = self.problem.node_names[k]
        return self._observation(), float(reward), terminated, False, info

    def render(self) -> str | None:
        """``"ansi"``: the current completion as text (with its step time when the last
        evaluation was of it); None otherwise."""
        if self.render_mode is None:
            return None
        ev = self.last_evaluation
        if ev is not None and not np.array_equal(ev.placements[0], self._row):
            ev = None  # an earlier completion's figures (sparse rewards, or a new episode)
        head = f"placed {self._k}/{self.problem.num_nodes} nodes, the rest on {self.problem.device_names[self.default_device]}"
        return head + "\n" + placement_text(self.problem, self._row, ev)

    def close(self) -> None:
        """Release what the env owns: the measurement worker it started, if any."""
        if self.owned_measurer is not None:
            self.owned_measurer.close()
            self.owned_measurer = None
        super().close()
