"""What one profiling pass did on one device kind: :class:`ProfileInfo`, stored per kind in
``graph.graph["profile_info"]``.

Filled by the pass (:func:`graphs.profile.profiler.profile_graph`) and by the isolated timing
(:class:`graphs.profile.isolated.ProfilingInterpreter`, which counts the signatures it timed
and the failures it fell back on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProfileInfo:
    """What one profiling pass did on one device kind (stored in ``graph.graph["profile_info"]``)."""

    kind: str
    device_name: str
    cached: bool
    signatures: int = 0
    compute_nodes: int = 0
    seconds: float = 0.0
    method: str = ""
    failures: list[str] = field(default_factory=list)
    optimizer_fixed: float = 0.0  # seconds of the optimizer step no node owns (paid once per step)
    optimizer_whole: float = 0.0  # seconds of the optimizer step over all parameters, timed alone
    autograd_nodes: int = 0  # backward ops of one step (in situ); with the compute nodes and the
    #                          parameter updates, the op count of a TF-style training graph

    def as_dict(self) -> dict[str, Any]:
        return {"device_name": self.device_name, "cached": self.cached, "signatures": self.signatures,
                "compute_nodes": self.compute_nodes, "seconds": self.seconds,
                "method": self.method, "optimizer_fixed": self.optimizer_fixed,
                "optimizer_whole": self.optimizer_whole, "autograd_nodes": self.autograd_nodes,
                "failures": list(self.failures)}
