"""A stable-baselines3 model as a :class:`~placer.search.agents.registry.SearchAgent`.

The PPO agents (hierarchical, flat) and the sequential agent (MaskablePPO) differ in how
they are built, not in how a search drives them: SB3's ``learn`` loop runs until the
tracker (through :class:`~placer.search.agents.callbacks.TrackerCallback`) says stop.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from envs.gym.vector_env import BatchedPlacementVecEnv
from placer.search.agents.callbacks import TrackerCallback
from placer.search.agents.imitation import ImitablePolicy, imitate_best
from placer.search.local_search import LocalSearch
from placer.search.tracker import BestTracker


class SB3Agent:
    """Drives an SB3 ``model``; ``steps_per_placement`` env steps make one placement.

    ``env`` is the batched environment the imitation warm start reads its observation
    from (None when the model has environments of its own and does not imitate).
    """

    def __init__(self, model: OnPolicyAlgorithm, env: BatchedPlacementVecEnv | None = None, steps_per_placement: int = 1) -> None:
        self.model = model
        self.env = env
        self.steps_per_placement = int(steps_per_placement)

    def resume(self, path: Path) -> None:
        """Load weights saved by :meth:`save` (SB3 ``set_parameters``)."""
        self.model.set_parameters(str(path), device="cpu")

    def imitate(self, tracker: BestTracker, steps: int, lr: float) -> None:
        """Behaviour-clone the tracker's best placement into the policy."""
        if self.env is None:
            raise TypeError("this agent has no batched environment to imitate in")
        # The placement policy scores given actions (HierarchicalPlacementPolicy.action_log_prob).
        imitate_best(cast(ImitablePolicy, self.model.policy), self.env, tracker, steps, lr)

    def learn(self, tracker: BestTracker, improver: LocalSearch | None) -> str:
        """Run ``model.learn`` until the tracker stops it; return the stop reason."""
        cb = TrackerCallback(tracker, improver=improver)
        total = tracker.remaining_placements()
        # The tracker, not SB3, ends the search; SB3 only needs a horizon (in env steps) for
        # its learning-rate schedule.
        model = self.model
        horizon = (total * self.steps_per_placement + model.n_envs * model.n_steps) if total is not None else 10**12
        if model.tensorboard_log is None:
            # Without a logger of its own, SB3's learn() configures one that creates an empty
            # directory tempdir/SB3-<date> on every call, even with nothing to log: one per
            # search left behind in /tmp.
            model.set_logger(Logger(folder=None, output_formats=[]))
        model.learn(total_timesteps=horizon, callback=cb, progress_bar=False)
        return cb.stop_reason or "finished"

    def save(self, path: Path) -> None:
        """Write the SB3 ``.zip``."""
        self.model.save(str(path))
