"""The machine a placement runs on: devices, links, clusters, units, presets and discovery.

Nothing here knows about models or placements; :mod:`envs.sim` and :mod:`envs.runtime` build on it.
"""
