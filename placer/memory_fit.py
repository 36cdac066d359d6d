"""Before the search: can the model fit the devices at all, and if not, by how much?

The simulator charges each op's static memory (parameters, their gradients, the
optimizer's state — :meth:`PlacementProblem.static_memory` — and the activations it keeps
for the backward) to the device it runs on for the whole step; transient buffers come on
top. Two necessary conditions follow, each checked before any search time is spent:

* the model's static memory must fit in all devices' capacity together;
* the largest group (groups are never split) must fit on the largest device, at its own
  peak: its static memory and kept activations with its backward's working set, or, when
  larger, its static memory with its optimizer step's temporaries (the simulator's rules;
  a device holding the group holds at least that).

When either fails no placement can fit, and the message says how much the model needs,
per device at best, and against which limits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from envs.hardware.cluster import Cluster
from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError

__all__ = ["MemoryFitError", "group_peaks", "memory_needs", "check_memory_fits", "memory_margins"]


class MemoryFitError(PlacerError):
    """The model cannot fit the devices, whatever the placement."""


def group_peaks(problem: PlacementProblem) -> np.ndarray:
    """[N] each group's peak alone on a device: static memory and kept activations plus its
    backward's working set, or its static memory (with the batch and output the loop holds)
    plus its optimizer step's temporaries, whichever is larger (the simulator's rules)."""
    static = problem.static_memory() + np.asarray(problem.act_bytes, dtype=np.float64)
    return np.maximum(static + problem.backward_work(), problem.at_step_memory() + problem.step_work())


def memory_needs(problem: PlacementProblem, cluster: Cluster | None = None) -> tuple[np.ndarray, str]:
    """Per-group static bytes and one line describing what the model needs against the limits
    (with ``cluster``, each limit that is less than its device's memory says what is reserved:
    a spec's ``memory: 700MiB`` GPU is 188 MiB usable after its CUDA context)."""
    static = problem.static_memory() + np.asarray(problem.act_bytes, dtype=np.float64)
    params = float(np.sum(problem.param_bytes))
    state = float(np.sum(problem.static_memory())) - params
    acts = float(np.sum(problem.act_bytes))
    total = float(np.sum(static))
    peaks = group_peaks(problem)
    largest = int(np.argmax(peaks)) if peaks.size else 0
    limits = ", ".join(f"{d}={format_bytes(c)}{_reserve_note(cluster, d)}"
                       for d, c in zip(problem.device_names, problem.memory_capacity))
    alone = ""
    if peaks.size:
        g = largest
        backward = float(problem.backward_work()[g])
        how = (f"in the backward: parameters, gradients, state and kept activations {format_bytes(float(static[g]))} "
               f"and the backward's working set {format_bytes(backward)}" if peaks[g] == static[g] + backward else
               f"at the optimizer step: parameters, gradients and state {format_bytes(float(problem.at_step_memory()[g]))} "
               f"and the update's temporaries {format_bytes(float(problem.step_work()[g]))}")
        alone = f", the largest group alone ({problem.node_names[g]}) {format_bytes(float(peaks[g]))} at its peak ({how})"
    text = (
        f"the model needs {format_bytes(total)} for a training step (parameters {format_bytes(params)}, "
        f"their gradients and optimizer state {format_bytes(state)}, kept activations {format_bytes(acts)}), "
        f"at best {format_bytes(total / max(problem.num_devices, 1))} per device if spread evenly{alone}; "
        f"device limits: {limits}"
    )
    return static, text


def _reserve_note(cluster: Cluster | None, name: str) -> str:
    if cluster is None or name not in cluster.device_names:
        return ""
    device = cluster.device(name)
    if not device.reserved_bytes:
        return ""
    what = "the CUDA context" if device.kind != "cpu" else "the process"
    return (f" (of {format_bytes(float(device.memory_bytes))}, {format_bytes(float(device.reserved_bytes))} "
            f"reserved for {what})")


def check_memory_fits(problem: PlacementProblem, cluster: Cluster | None = None) -> None:
    """Raise :class:`MemoryFitError` when no placement can fit (see the module doc); with
    ``cluster``, the limits say what each device reserves (:func:`memory_needs`)."""
    static, text = memory_needs(problem, cluster)
    capacity = np.asarray(problem.memory_capacity, dtype=np.float64)
    total, largest = float(static.sum()), float(group_peaks(problem).max(initial=0.0))
    if total > float(capacity.sum()):
        raise MemoryFitError(
            f"no placement can fit: {text}; together the devices hold {format_bytes(float(capacity.sum()))}. "
            "Expected more or larger devices (--cluster, --devices), a higher --memory cap, or a smaller model or batch"
        )
    if largest > float(capacity.max(initial=0.0)):
        raise MemoryFitError(
            f"no placement can fit: {text}; its largest group does not fit the largest device "
            f"({format_bytes(float(capacity.max()))}). Expected larger devices or a smaller model or batch"
        )


def memory_margins(device_names: Sequence[str], peak: Sequence[float] | np.ndarray,
                   capacity: Sequence[float] | np.ndarray) -> str:
    """Each device's peak against the memory a placement may fill there, and the margin left:
    what a user with a model near its devices' limits reads first.

    >>> memory_margins(["gpu0", "gpu1"], [195 * 2**20, 600 * 2**20], [512 * 2**20, 512 * 2**20])
    'gpu0=195 MiB of 512 MiB usable (317 MiB spare), gpu1=600 MiB of 512 MiB usable (88 MiB over)'
    """
    parts = []
    for name, used, cap in zip(device_names, peak, capacity):
        left = float(cap) - float(used)
        margin = f"{format_bytes(left)} spare" if left >= 0 else f"{format_bytes(-left)} over"
        parts.append(f"{name}={format_bytes(float(used))} of {format_bytes(float(cap))} usable ({margin})")
    return ", ".join(parts)
