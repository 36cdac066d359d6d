"""The placement problem, in four layers that import downward only:

* :mod:`envs.hardware` — devices, links, clusters, units, presets, discovery;
* :mod:`envs.sim` — the compiled problem, cost model, simulators, lower bound, calibration;
* :mod:`envs.runtime` — apply a placement, split it over processes, check and measure it;
* :mod:`envs.gym` — the Gymnasium environments, features and rewards.

Importing ``envs`` registers ``placer/Placement-v0`` and ``placer/SequentialPlacement-v0``
with gymnasium (string entry points: nothing heavy is imported until an environment is
made). See :mod:`envs.gym.registration`.
"""

from envs.gym.registration import PLACEMENT_ENV_ID, SEQUENTIAL_ENV_ID, register_envs

register_envs()

__all__ = ["PLACEMENT_ENV_ID", "SEQUENTIAL_ENV_ID", "register_envs"]
