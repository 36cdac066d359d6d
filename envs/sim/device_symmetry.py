"""Devices a placement problem cannot tell apart, and one name for placements that differ only by them.

On a cluster of identical GPUs behind a uniform interconnect (the ``4xK40`` preset, a box of
four V100s without NVLink pairs) "everything on gpu0" and "everything on gpu2" are the same
placement on different hardware: the same costs, the same links, the same step. Methods
often find such twins, and a user trying candidates on real steps (the tuner) would spend
steps on each. Two devices are *interchangeable* when swapping them leaves every
per-device figure of the problem unchanged: the kind, the memory, CPU or not, every op's
times on them, and the links to them, to and from every other device and between the two.
Swappable with one representative is enough for a whole class: the transpositions
``(a b)``, ``(a c)``, ... generate every permutation of ``{a, b, c, ...}``.

:func:`canonical_row` writes a row of a problem with the devices of each class renamed in
the order the row first uses them, so twins get one row.

>>> import numpy as np
>>> canonical_row(np.array([3, 3, 1, 0]), [[1, 2, 3]]).tolist()
[1, 1, 2, 0]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from envs.sim.problem import PlacementProblem

__all__ = ["interchangeable", "device_classes", "canonical_row", "canonical_rows", "twin_targets"]


def _device_axis_arrays(problem: PlacementProblem) -> list[np.ndarray]:
    """The problem's per-device figures with the device on axis 1 (op and node times, costs)."""
    arrays = [problem.fwd_time, problem.bwd_time]
    ops = problem.ops
    if ops is not None:
        arrays += [a for a in (ops.cost, ops.fixed_host, ops.accumulate) if a is not None]
    return [np.asarray(a) for a in arrays]


def interchangeable(problem: PlacementProblem, a: int, b: int) -> bool:
    """Whether swapping devices ``a`` and ``b`` leaves every per-device figure of ``problem``
    unchanged (the module doc).

    The rank simulator of worker processes (``problem.rank_simulator``) keeps state of its
    own per process, such as which rank computes the loss, so its devices are never taken as
    interchangeable.
    """
    if a == b:
        return True
    if problem.rank_simulator is not None:
        return False
    if problem.device_kinds[a] != problem.device_kinds[b] or problem.memory_capacity[a] != problem.memory_capacity[b]:
        return False
    if problem.ops is not None and bool(problem.ops.is_cpu[a]) != bool(problem.ops.is_cpu[b]):
        return False
    if not all(np.array_equal(arr[:, a], arr[:, b]) for arr in _device_axis_arrays(problem)):
        return False
    swap = np.arange(problem.num_devices)
    swap[[a, b]] = [b, a]
    return all(np.array_equal(m, m[np.ix_(swap, swap)]) for m in (problem.latency, problem.bandwidth))


def device_classes(problem: PlacementProblem) -> list[list[int]]:
    """The classes of two or more interchangeable devices (:func:`interchangeable`), each
    sorted, in device order.

    >>> from envs.hardware.loading import load_cluster
    >>> from envs.sim.problem_compile import compile_problem
    >>> import networkx as nx
    >>> g = nx.DiGraph(); g.add_node("a", fwd_time={"cpu": 1e-3, "gpu": 1e-4}, param_bytes=4, out_bytes=4)
    >>> device_classes(compile_problem(g, load_cluster("4xK40")))
    [[1, 2, 3, 4]]
    """
    classes: list[list[int]] = []
    for d in range(problem.num_devices):
        for members in classes:
            if interchangeable(problem, members[0], d):
                members.append(d)
                break
        else:
            classes.append([d])
    return [c for c in classes if len(c) > 1]


def canonical_row(row: np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """``row`` (a device index per node) with each class's devices renamed in the order the
    row first uses them: the class's first device for the first one used, and so on. Rows
    that differ only by a permutation of interchangeable devices get the same result."""
    return canonical_rows(np.asarray(row, dtype=np.int64)[None], classes)[0]


def canonical_rows(rows: np.ndarray, classes: Sequence[Sequence[int]]) -> np.ndarray:
    """:func:`canonical_row` of every row of ``rows`` [B, N], without a loop over rows."""
    rows = np.asarray(rows, dtype=np.int64)
    if not classes or rows.size == 0:
        return rows.copy()
    b, n = rows.shape
    num_devices = max(int(rows.max()) + 1, max(max(c) for c in classes) + 1)
    rename = np.tile(np.arange(num_devices), (b, 1))
    for members in classes:
        m = np.asarray(members, dtype=np.int64)
        hit = rows[:, :, None] == m[None, None, :]  # [B, N, K]
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), n)  # [B, K]: first node on each member
        order = np.argsort(first, axis=1, kind="stable")  # members by first use, unused last
        rename[np.arange(b)[:, None], m[order]] = m[None, :]
    return np.take_along_axis(rename, rows, axis=1)


def twin_targets(row: np.ndarray, classes: Sequence[Sequence[int]], num_devices: int) -> np.ndarray:
    """[num_devices] bool: the devices ``row`` does not use that are not the first unused one of
    their class. Moving nodes to such a device gives a twin of the same move to that first one,
    so a neighbourhood can leave those moves out.

    >>> twin_targets(np.array([1, 1, 0]), [[1, 2, 3, 4]], 5).tolist()
    [False, False, False, True, True]
    """
    used = np.zeros(num_devices, dtype=bool)
    used[np.asarray(row, dtype=np.int64)] = True
    twin = np.zeros(num_devices, dtype=bool)
    for members in classes:
        unused = [d for d in members if not used[d]]
        twin[unused[1:]] = True
    return twin
