"""The placement problem: devices and clusters, cost model, simulator, measurement, and the
Gymnasium environments.

Importing ``envs`` registers ``placer/Placement-v0`` and ``placer/SequentialPlacement-v0``
with gymnasium (string entry points: nothing heavy is imported until an environment is
made). See :mod:`envs.registration`.
"""

from envs.registration import PLACEMENT_ENV_ID, SEQUENTIAL_ENV_ID, register_envs

register_envs()

__all__ = ["PLACEMENT_ENV_ID", "SEQUENTIAL_ENV_ID", "register_envs"]
