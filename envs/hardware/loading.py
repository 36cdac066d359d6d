"""Where a cluster comes from: a shipped preset, a spec file or mapping, or this machine.

>>> cluster = load_cluster("4xK40")
>>> cluster.device_names
['cpu', 'gpu0', 'gpu1', 'gpu2', 'gpu3']
>>> "4xK40" in list_presets()
True
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

from envs.hardware.cluster import Cluster, ClusterSpecError, cluster_from_spec, read_spec_file
from envs.hardware.links import measure_machine

PRESET_DIR = Path(__file__).resolve().parent / "presets"


def list_presets() -> list[str]:
    """Names of the shipped cluster presets (``envs/hardware/presets/*.yaml``)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_cluster(source: "str | os.PathLike | Mapping | Cluster") -> Cluster:
    """A cluster from a preset name, a spec file path, a parsed spec mapping, or a Cluster.

    ``"real"`` (or ``"discover"``) returns :func:`discover_cluster`.
    """
    if isinstance(source, Cluster):
        return source
    if isinstance(source, Mapping):
        return cluster_from_spec(source)
    text = os.fspath(source)
    if not text.strip():  # Path("") is ".": "cannot read cluster spec '.': Is a directory"
        raise ClusterSpecError(f"the cluster is empty; expected a preset ({', '.join(list_presets())}), "
                               "a .yaml/.json spec file, or 'real'")
    if text in ("real", "discover"):
        return discover_cluster()
    if text in list_presets():
        return cluster_from_spec(read_spec_file(PRESET_DIR / f"{text}.yaml"), default_name=text)
    p = Path(text)
    if p.suffix.lower() in (".yaml", ".yml", ".json") or p.exists():
        if not p.exists():
            raise ClusterSpecError(f"cluster spec file {text!r} does not exist")
        return dataclasses.replace(cluster_from_spec(read_spec_file(p), default_name=p.stem), spec_path=str(p.resolve()))
    raise ClusterSpecError(
        f"unknown cluster {text!r}; expected a preset ({', '.join(list_presets())}), "
        f"a .yaml/.json spec file, or 'real'"
    )


def discover_cluster(cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> Cluster:
    """The real devices of this machine: ``cpu`` and every ``cuda:i``, with measured links.

    Device figures (peak FLOP/s, memory bandwidth) and link figures are measured once by
    :mod:`envs.hardware.links` and cached on disk (``cache_dir``, default ``~/.cache/placer``).
    """
    return measure_machine(cache_dir=cache_dir, refresh=refresh)
