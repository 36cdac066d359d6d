"""The reward modes by name: ``simulated``, ``measured`` (real step times) and ``hybrid``
(simulated, recalibrated from measurements of the best candidates)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from envs.gym.config import EnvConfigError
from envs.gym.measured_rewards import HybridReward, MeasuredReward
from envs.gym.rewards import RewardModel, SimulatedReward
from envs.sim.problem import PlacementProblem

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from envs.runtime.measurer import Measurer

#: The reward modes :func:`make_reward_model` knows.
REWARD_MODES: tuple[str, ...] = ("simulated", "measured", "hybrid")

#: The options of reward mode "hybrid" (:class:`envs.gym.measured_rewards.HybridReward`).
HYBRID_OPTIONS: tuple[str, ...] = ("measure_every", "measure_top_k", "pool_size")


def make_reward_model(problem: PlacementProblem, mode: str | RewardModel = "simulated", reference: Any = "single",
                      invalid_penalty: float | None = None, measurer: Measurer | None = None,
                      **hybrid_options: Any) -> RewardModel:
    """Build the reward model for ``mode`` (one of :data:`REWARD_MODES`), or use ``mode`` if it is one.

    ``hybrid_options`` (``measure_every``, ``measure_top_k``, ``pool_size``) apply to hybrid only.
    A reward model built by the caller (who keeps it, e.g. to run hybrid measurement rounds)
    comes with its own settings, so no other option may be given with it.

    Raises:
        EnvConfigError: unknown mode, a missing measurer, a bad reference or penalty.
    """
    # Every keyword an environment does not know lands here: name a typo (num_group=) as
    # unknown before telling the user which mode the known ones belong to.
    unknown = sorted(set(hybrid_options) - set(HYBRID_OPTIONS))
    if unknown:
        raise EnvConfigError(f"unknown option(s) {unknown}; besides the environment's own arguments, only the "
                             f"hybrid reward options {', '.join(HYBRID_OPTIONS)} are accepted")
    if isinstance(mode, RewardModel):
        if mode.problem is not problem:
            raise EnvConfigError("the reward model given as reward_mode was built for another problem")
        if measurer is not None or hybrid_options:
            raise EnvConfigError("a reward model given as reward_mode carries its own measurer and options")
        return mode
    if mode not in REWARD_MODES:
        raise EnvConfigError(f"unknown reward mode {mode!r}; expected one of {list(REWARD_MODES)}")
    if hybrid_options and mode != "hybrid":
        raise EnvConfigError(f"options {sorted(hybrid_options)} apply to reward_mode='hybrid' only")
    if mode == "simulated":
        return SimulatedReward(problem, reference, invalid_penalty)
    if mode == "measured":
        return MeasuredReward(problem, measurer, reference, invalid_penalty)
    return HybridReward(problem, measurer, reference, invalid_penalty, **hybrid_options)
