"""``PlacementEnv``: one step places the whole graph (the hierarchical planner's formulation).

Observation (``gymnasium.spaces.Dict``, see docs/contracts.md):

* ``node_features`` [max_nodes, F] float32 — :func:`envs.gym.features.node_features`, padded rows 0;
* ``node_mask`` [max_nodes] float32 — 1 for real nodes;
* ``edge_index`` [2, max_edges] int64 — (source, destination) node indices, padding 0;
* ``edge_mask`` [max_edges] float32;
* ``device_features`` [D, F_dev] float32 — :func:`envs.gym.features.device_features`.

The observation is the same at every reset: the problem does not change between episodes.

Action:

* hierarchical (default): ``MultiDiscrete([G] * max_nodes + [D] * G)`` — entry ``i < max_nodes``
  puts node i into a group, entry ``max_nodes + g`` puts group g on a device; node i runs on
  ``action[max_nodes + action[i]]``. Entries of padded nodes are ignored. G defaults to
  :func:`envs.gym.config.default_num_groups`.
* flat: ``MultiDiscrete([D] * max_nodes)`` — a device per node.

Every step ends the episode (``terminated=True``). The reward and ``info`` come from the
reward model (:mod:`envs.gym.rewards`); ``info`` holds ``step_time``, ``peak_memory`` [D],
``fits``, ``valid``, ``source``, ``placement`` ([N] device indices in
``problem.node_names`` order), ``over_memory`` ({device: bytes over}), ``reason`` and
``reference_time``.

``render_mode="ansi"`` makes :meth:`PlacementEnv.render` return a text summary of the last
placement (step time, reward, nodes per device); with the default ``None`` it returns None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.gym.config import (
    RENDER_MODES,
    EnvConfigError,
    Padding,
    check_render_mode,
    resolve_num_groups,
    resolve_padding,
)
from envs.gym.features import OpKind, device_features, node_features, pad_rows, padded_edges
from envs.gym.reward_modes import make_reward_model
from envs.gym.rewards import Evaluation, RewardModel
from envs.sim.problem import PlacementError, PlacementProblem

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from envs.runtime.measurer import Measurer

#: Upper bound of every node/device feature (they are non-negative and squashed to about [0, 3];
#: the clip only guards against absurd inputs such as hours-long ops).
FEATURE_MAX = 10.0


def check_problem(problem: Any) -> PlacementProblem:
    """``problem`` if it is a PlacementProblem, else a clear :class:`EnvConfigError`."""
    if not isinstance(problem, PlacementProblem):
        raise EnvConfigError(
            f"problem must be an envs.sim.problem.PlacementProblem (from compile_problem(graph, cluster)), "
            f"got {type(problem).__name__}"
        )
    return problem


def graph_observation_space(padding: Padding, num_node_features: int, num_devices: int,
                            num_device_features: int) -> dict[str, spaces.Space]:
    """The graph part of the observation space (the five keys of the contract)."""
    return {
        "node_features": spaces.Box(0.0, FEATURE_MAX, (padding.max_nodes, num_node_features), np.float32),
        "node_mask": spaces.Box(0.0, 1.0, (padding.max_nodes,), np.float32),
        "edge_index": spaces.Box(0, padding.max_nodes - 1, (2, padding.max_edges), np.int64),
        "edge_mask": spaces.Box(0.0, 1.0, (padding.max_edges,), np.float32),
        "device_features": spaces.Box(0.0, FEATURE_MAX, (num_devices, num_device_features), np.float32),
    }


def graph_observation(problem: PlacementProblem, padding: Padding,
                      ops: Sequence[OpKind] | None = None) -> dict[str, np.ndarray]:
    """The static graph observation of ``problem`` padded to ``padding``."""
    node_mask = np.zeros(padding.max_nodes, dtype=np.float32)
    node_mask[: problem.num_nodes] = 1.0
    edge_index, edge_mask = padded_edges(problem, padding.max_edges)
    return {
        "node_features": pad_rows(np.clip(node_features(problem, ops), 0.0, FEATURE_MAX), padding.max_nodes),
        "node_mask": node_mask,
        "edge_index": edge_index,
        "edge_mask": edge_mask,
        "device_features": np.clip(device_features(problem), 0.0, FEATURE_MAX),
    }


def placement_text(problem: PlacementProblem, row: np.ndarray, evaluation: Evaluation | None = None) -> str:
    """A few lines on placement ``row``: its step time, reward and validity when ``evaluation``
    (of that row alone) is given, then the nodes on each device (the ``"ansi"`` rendering)."""
    lines = []
    if evaluation is not None:
        head = f"step {float(evaluation.step_time[0]) * 1e3:.3f} ms ({evaluation.source[0]}), " \
               f"reward {float(evaluation.reward[0]):.4f}"
        lines.append(head + (", valid" if evaluation.valid[0] else f", invalid: {evaluation.reason[0]}"))
    counts = np.bincount(np.asarray(row, dtype=np.int64), minlength=problem.num_devices)
    lines.extend(f"  {name}: {int(c)} node(s)" for name, c in zip(problem.device_names, counts))
    return "\n".join(lines)


class ActionDecoder:
    """Turns (batches of) actions into placement rows, and placements back into actions.

    Attributes:
        num_nodes, max_nodes, num_devices: N, padded N, D.
        num_groups: G, or None for the flat action.
        nvec: the MultiDiscrete sizes of one action.
    """

    def __init__(self, num_nodes: int, max_nodes: int, num_devices: int, num_groups: int | None) -> None:
        self.num_nodes, self.max_nodes, self.num_devices = num_nodes, max_nodes, num_devices
        self.num_groups = num_groups
        if num_groups is None:
            self.nvec = np.full(max_nodes, num_devices, dtype=np.int64)
        else:
            self.nvec = np.concatenate([np.full(max_nodes, num_groups), np.full(num_groups, num_devices)]).astype(np.int64)

    @property
    def hierarchical(self) -> bool:
        return self.num_groups is not None

    def decode(self, actions: Any) -> np.ndarray:
        """[B, N] device rows from [B, len(nvec)] (or one [len(nvec)]) actions.

        Raises:
            PlacementError: wrong length, or an entry outside its range.
        """
        a = np.asarray(actions)
        if a.ndim == 1:
            a = a[None]
        if a.ndim != 2 or a.shape[1] != self.nvec.size:
            raise PlacementError(f"action has shape {np.shape(actions)}; expected ({self.nvec.size},) or (batch, {self.nvec.size})")
        if not np.issubdtype(a.dtype, np.integer):
            # SB3 hands actions back as floats from its buffers; they must still be whole numbers.
            if not np.all(np.mod(a, 1) == 0):
                raise PlacementError("action entries must be whole numbers")
        a = a.astype(np.int64, copy=False)
        if a.size and (a.min() < 0 or np.any(a >= self.nvec[None, :])):
            bad = int(np.argwhere((a < 0) | (a >= self.nvec[None, :]))[0, 1])
            raise PlacementError(f"action entry {bad} is outside 0..{int(self.nvec[bad]) - 1}")
        n = self.num_nodes
        if self.num_groups is None:
            return np.ascontiguousarray(a[:, :n])
        groups = a[:, :n]
        group_device = a[:, self.max_nodes:]
        return np.take_along_axis(group_device, groups, axis=1)

    def encode(self, row: Any) -> np.ndarray:
        """An action that decodes to the placement ``row`` ([N] device indices).

        Hierarchical: node i goes to group ``row[i]`` and group g to device g (groups past
        D to device 0), so it needs G >= D.

        Raises:
            PlacementError: a bad row, or G < D.
        """
        r = np.asarray(row, dtype=np.int64)
        if r.shape != (self.num_nodes,) or (r.size and (r.min() < 0 or r.max() >= self.num_devices)):
            raise PlacementError(f"placement row must have {self.num_nodes} device indices in 0..{self.num_devices - 1}")
        if self.num_groups is None:
            out = np.zeros(self.max_nodes, dtype=np.int64)
            out[: self.num_nodes] = r
            return out
        if self.num_groups < self.num_devices:
            raise PlacementError(
                f"with {self.num_groups} groups and {self.num_devices} devices not every placement is an action; "
                "use num_groups >= the device count"
            )
        out = np.zeros(self.nvec.size, dtype=np.int64)
        out[: self.num_nodes] = r
        group_device = np.zeros(self.num_groups, dtype=np.int64)
        group_device[: self.num_devices] = np.arange(self.num_devices)
        out[self.max_nodes:] = group_device
        return out


class PlacementEnv(gym.Env):
    """Place every node of a problem in one step; reward ``-sqrt(step_time / t_ref)``.

    Args:
        problem: the compiled problem (:func:`envs.sim.problem_compile.compile_problem`).
        num_groups: G of the hierarchical action (default :func:`envs.gym.config.default_num_groups`).
        max_nodes, max_edges: padding (default: the graph's own size).
        hierarchical: group-then-device action (True) or a device per node (False).
        reward_mode: "simulated", "measured" or "hybrid" (:mod:`envs.gym.rewards`).
        reference: "single" (fastest fitting single device), a step time in seconds, or a placement.
        invalid_penalty: reward of an invalid placement (default: below any valid reward,
            see :mod:`envs.gym.rewards`).
        measurer: for measured/hybrid: an object with ``.measure(placement dict)``.
        seed: seeds the env's RNG and its action space (reproducible ``action_space.sample()``).
        node_ops: op kind per node in ``problem.node_names`` order (an fx op name, or for a
            group its members' op counts; :func:`envs.gym.features.graph_ops`); None makes every
            node ``op_other``.
        render_mode: None (``render()`` returns None) or ``"ansi"`` (a text summary).
        reward_options: hybrid options (``measure_every``, ``measure_top_k``, ``pool_size``).

    Raises:
        EnvConfigError: a bad argument (not a problem, graph larger than the padding,
            unknown reward mode, ...).
    """

    metadata = {"render_modes": list(RENDER_MODES)}

    def __init__(self, problem: PlacementProblem, num_groups: int | None = None, max_nodes: int | None = None,
                 max_edges: int | None = None, hierarchical: bool = True, reward_mode: str = "simulated",
                 reference: Any = "single", invalid_penalty: float | None = None, measurer: Measurer | None = None,
                 seed: int | None = None, node_ops: Sequence[OpKind] | None = None,
                 render_mode: str | None = None, **reward_options: Any) -> None:
        super().__init__()
        # A named parameter: gym.make and SB3's make_vec_env pass render_mode, which must not
        # fall into reward_options.
        self.render_mode = check_render_mode(render_mode)
        self.problem = check_problem(problem)
        self.padding = resolve_padding(problem.num_nodes, problem.num_edges, max_nodes, max_edges)
        self.num_groups = resolve_num_groups(num_groups, problem.num_nodes, problem.num_devices) if hierarchical else None
        self.decoder = ActionDecoder(problem.num_nodes, self.padding.max_nodes, problem.num_devices, self.num_groups)
        self.reward_model: RewardModel = make_reward_model(
            problem, reward_mode, reference=reference, invalid_penalty=invalid_penalty, measurer=measurer,
            **reward_options)
        if node_ops is not None and len(node_ops) != problem.num_nodes:
            raise EnvConfigError(f"node_ops has {len(node_ops)} entries; the problem has {problem.num_nodes} nodes")
        self._obs = graph_observation(problem, self.padding, node_ops)
        self.observation_space = spaces.Dict(graph_observation_space(
            self.padding, self._obs["node_features"].shape[1], problem.num_devices,
            self._obs["device_features"].shape[1]))
        self.action_space = spaces.MultiDiscrete(self.decoder.nvec)
        #: A measurer this env made itself (gym.make with model=) and closes in close().
        self.owned_measurer: Measurer | None = None
        self.last_evaluation: Evaluation | None = None
        if seed is not None:
            self._seed(seed)

    @property
    def reward_mode(self) -> str:
        return self.reward_model.mode

    @property
    def hierarchical(self) -> bool:
        return self.decoder.hierarchical

    def _seed(self, seed: int) -> None:
        # Both, as gymnasium's reset(seed=) sets them: np_random_seed re-seeds np_random when
        # _np_random_seed is unset, which would throw this seed away.
        self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
        self.action_space.seed(seed)
        self.observation_space.seed(seed)

    def observation(self) -> dict[str, np.ndarray]:
        """A fresh copy of the (static) observation."""
        return {k: v.copy() for k, v in self._obs.items()}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode; ``seed`` also seeds the action space. Returns ``(obs, info)``."""
        super().reset(seed=seed)
        if seed is not None:
            self.action_space.seed(seed)
            self.observation_space.seed(seed)
        return self.observation(), self.reset_info()

    def reset_info(self) -> dict[str, Any]:
        """The ``info`` of :meth:`reset` (also each index's of the batched vector env)."""
        return {"reference_time": self.reward_model.reference_time, "num_nodes": self.problem.num_nodes}

    def step(self, action: Any):
        """Place the whole graph as ``action`` says; the episode ends here."""
        ev = self.evaluate(self.decoder.decode(action))
        self.last_evaluation = ev
        info = ev.info(0, self.problem, self.reward_model.reference_time)
        return self.observation(), float(ev.reward[0]), True, False, info

    def evaluate(self, placements: Any) -> Evaluation:
        """Reward and figures of a batch of placement rows ([B, N] device indices), in the env's mode."""
        return self.reward_model.evaluate(placements)

    def decode(self, actions: Any) -> np.ndarray:
        """Placement rows [B, N] of a batch of actions."""
        return self.decoder.decode(actions)

    def encode(self, row: Any) -> np.ndarray:
        """An action placing the nodes as ``row`` says (see :meth:`ActionDecoder.encode`)."""
        return self.decoder.encode(row)

    def single_device_action(self, device: int | str) -> np.ndarray:
        """The action that puts every node on one device (index or name)."""
        names = list(self.problem.device_names)
        if isinstance(device, str):
            if device not in names:
                raise PlacementError(f"unknown device {device!r}; devices are {names}")
            d = names.index(device)
        else:
            d = int(device)
            if not 0 <= d < len(names):
                raise PlacementError(f"device index {d} is outside 0..{len(names) - 1}")
        if not self.hierarchical:
            return self.encode(np.full(self.problem.num_nodes, d, dtype=np.int64))
        # Every node in group 0 and every group on d: works for any G, even G < D.
        action = np.zeros(self.decoder.nvec.size, dtype=np.int64)
        action[self.padding.max_nodes:] = d
        return action

    def placement_dict(self, row: Any) -> dict[str, str]:
        """``{node name: device name}`` of a placement row."""
        return self.problem.array_to_placement(row)

    def render(self) -> str | None:
        """``"ansi"``: the last step's placement as text (:func:`placement_text`); None otherwise."""
        if self.render_mode is None:
            return None
        ev = self.last_evaluation
        if ev is None:
            return "no placement yet"
        return placement_text(self.problem, ev.placements[0], ev)

    def close(self) -> None:
        """Release what the env owns: the measurement worker it started, if any."""
        if self.owned_measurer is not None:
            self.owned_measurer.close()
            self.owned_measurer = None
        super().close()
