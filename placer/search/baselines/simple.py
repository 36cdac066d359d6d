"""The simplest placements: one device, round-robin, and the best of k random ones.

* ``single:<device>``: every node on that device.
* ``single``: the fastest single device (by the simulator) among those that hold the model.
* ``round_robin``: node i (topological order) on accelerator ``i mod G``. This is the
  per-layer cycling round-robin of the device-placement literature, not a contiguous
  split (that is ``pipeline_dp`` / ``expert``); it deliberately ignores communication.
* ``random``: the best, by simulated step time, of k placements drawn uniformly over the
  accelerators (seeded); k is the placement budget (default 1,000).
"""

from __future__ import annotations

import time

import numpy as np

from envs.hardware.units import format_bytes
from envs.sim.problem import PlacementProblem
from placer.search.baselines.common import (
    BaselineError,
    BaselineInputs,
    NoFit,
    accelerators,
    device_memory,
    node_memory,
    overflow_reason,
)

DEFAULT_RANDOM_SAMPLES = 1000
_BATCH = 256


def simulate_rows(problem: PlacementProblem, rows: np.ndarray):
    """Simulate a batch of placements with the project's simulator (``envs.sim.simulator``)."""
    from envs.sim.simulator import simulate_batch  # imported late: heuristics do not need it

    return simulate_batch(problem, np.atleast_2d(np.asarray(rows, dtype=np.int64)))


def single_on(problem: PlacementProblem, device: str) -> np.ndarray:
    """All nodes on ``device``; :class:`NoFit` when the model does not fit there."""
    if device not in problem.device_names:
        raise BaselineError(f"single:{device}: no device {device!r}; devices are {list(problem.device_names)}")
    d = problem.device_names.index(device)
    row = np.full(problem.num_nodes, d, dtype=np.int64)
    if device_memory(problem, row)[d] > problem.memory_capacity[d]:
        raise NoFit(f"the model does not fit on {device}: {overflow_reason(problem, row)}")
    return row


def best_single(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """The single device with the lowest simulated step time among those that hold the model.

    When none does, :class:`NoFit` says what one device would need: the simulated peak of the
    whole step on the largest device (parameters, gradients, optimizer state, activations and
    working space), the figure the simulator holds a placement to, not the static part alone.
    """
    need = node_memory(problem).sum()  # static bytes: a device below them cannot hold the model
    roomy = [d for d in range(problem.num_devices) if need <= problem.memory_capacity[d]]
    if roomy:
        rows = np.array([[d] * problem.num_nodes for d in roomy], dtype=np.int64)
        res = simulate_rows(problem, rows)
        step = np.where(np.asarray(res.fits), np.asarray(res.step_time, dtype=float), np.inf)
        if np.isfinite(step).any():
            return rows[int(np.argmin(step))]
    biggest = int(np.argmax(problem.memory_capacity))
    peak = float(simulate_rows(problem, np.full((1, problem.num_nodes), biggest)).peak_memory[0, biggest])
    raise NoFit(
        f"the model needs {format_bytes(max(peak, float(need)))} on one device (the simulated peak of its training "
        f"step); the largest device ({problem.device_names[biggest]}) holds "
        f"{format_bytes(problem.memory_capacity[biggest])}"
    )


def round_robin(problem: PlacementProblem, inputs: BaselineInputs) -> np.ndarray:
    """Node i on accelerator i mod G; :class:`NoFit` when that overfills a device."""
    devices = np.asarray(accelerators(problem), dtype=np.int64)
    row = devices[np.arange(problem.num_nodes) % len(devices)]
    if np.any(device_memory(problem, row) > problem.memory_capacity):
        raise NoFit(f"round-robin overfills memory: {overflow_reason(problem, row)}")
    return row


def random_search(problem: PlacementProblem, inputs: BaselineInputs) -> tuple[np.ndarray, int, list]:
    """Best of k seeded uniform placements over the accelerators, by simulated step time.

    Returns ``(row, evaluated, history)`` with history points ``(seconds, evaluated, best)``.
    """
    k = inputs.placements or DEFAULT_RANDOM_SAMPLES
    if k <= 0:
        raise BaselineError(f"random needs a positive number of placements, got {k}")
    rng = np.random.default_rng(inputs.seed)
    devices = np.asarray(accelerators(problem), dtype=np.int64)
    best_row, best_time = None, np.inf
    history: list[tuple[float, int, float]] = []
    t0, done = time.perf_counter(), 0
    while done < k:
        b = min(_BATCH, k - done)
        rows = devices[rng.integers(0, len(devices), size=(b, problem.num_nodes))]
        res = simulate_rows(problem, rows)
        step = np.where(np.asarray(res.fits), np.asarray(res.step_time, dtype=float), np.inf)
        i = int(np.argmin(step))
        done += b
        if step[i] < best_time:
            best_time, best_row = float(step[i]), rows[i].copy()
        if np.isfinite(best_time):
            history.append((time.perf_counter() - t0, done, best_time))
    if best_row is None:
        raise NoFit(f"none of {k} random placements fits device memory")
    return best_row, done, history
