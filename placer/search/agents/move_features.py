"""Features of the move policy (:mod:`placer.search.agents.move_policy`): what moving each group to
each device would do, from the current placement, as ratios that carry to any graph and
cluster size; and the coupling of a further move to the moves a proposal already made."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.move_scopes import MoveScopes, problem_scopes

__all__ = ["NUM_FEATURES", "NUM_COUPLING", "FeatureStatics", "feature_statics", "critical_share", "move_features",
           "coupling_features"]

#: Number of per-move features (:func:`move_features`).
NUM_FEATURES = 12
#: Number of coupling features of a further move (:func:`coupling_features`).
NUM_COUPLING = 3


@dataclass(frozen=True)
class FeatureStatics:
    """What the features need of a problem, computed once per search."""

    cost: np.ndarray  # [N, D] forward + backward seconds
    static_mem: np.ndarray  # [N] bytes a group pins on its device (parameters, optimizer state, activations)
    src: np.ndarray  # [E]
    dst: np.ndarray  # [E]
    nbytes: np.ndarray  # [E]
    nbr_ptr: np.ndarray  # CSR of neighbours (both directions)
    nbr: np.ndarray
    mean_bw: float
    scopes: MoveScopes | None = None  # the module scopes a move may expand to (None: single moves only)


def feature_statics(problem: PlacementProblem) -> FeatureStatics:
    """The placement-independent arrays the features read (computed once per search)."""
    n = problem.num_nodes
    cost = np.asarray(problem.fwd_time, dtype=np.float64) + np.asarray(problem.bwd_time, dtype=np.float64)
    static_mem = np.asarray(problem.static_memory(), dtype=np.float64) + np.asarray(problem.act_bytes, dtype=np.float64)
    src = np.asarray(problem.edge_src, dtype=np.int64)
    dst = np.asarray(problem.edge_dst, dtype=np.int64)
    nbytes = np.asarray(problem.edge_bytes, dtype=np.float64)
    both_a = np.concatenate([src, dst])
    both_b = np.concatenate([dst, src])
    order = np.argsort(both_a, kind="stable")
    ptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(ptr, both_a + 1, 1)
    bw = np.asarray(problem.bandwidth, dtype=np.float64)
    finite = bw[np.isfinite(bw) & (bw > 0)]
    return FeatureStatics(cost, static_mem, src, dst, nbytes, np.cumsum(ptr), both_b[order],
                          float(finite.mean()) if finite.size else 1e10, problem_scopes(problem))


def critical_share(problem: PlacementProblem, st: FeatureStatics, row: np.ndarray) -> np.ndarray:
    """[N] length of the longest path through each group over the longest path (1 = on the critical path).

    Node weights are the group's compute on its device, edge weights the transfer time of a cut
    edge; edges run from lower to higher index (the problem's topological order)."""
    n = problem.num_nodes
    w = st.cost[np.arange(n), row]
    cut = row[st.src] != row[st.dst]
    ew = np.where(cut, st.nbytes / st.mean_bw, 0.0)
    top = np.zeros(n)
    bottom = np.zeros(n)
    # Relax in node order: sources precede destinations, so one pass per direction is exact.
    order = np.argsort(st.dst, kind="stable")
    s_o, d_o, e_o = st.src[order], st.dst[order], ew[order]
    bounds = np.searchsorted(d_o, np.arange(n + 1))
    for v in range(n):
        a, b = bounds[v], bounds[v + 1]
        if a < b:
            top[v] = float(np.max(top[s_o[a:b]] + w[s_o[a:b]] + e_o[a:b]))
    order = np.argsort(st.src, kind="stable")
    s_o, d_o, e_o = st.src[order], st.dst[order], ew[order]
    bounds = np.searchsorted(s_o, np.arange(n + 1))
    for v in range(n - 1, -1, -1):
        a, b = bounds[v], bounds[v + 1]
        if a < b:
            bottom[v] = float(np.max(bottom[d_o[a:b]] + w[d_o[a:b]] + e_o[a:b]))
    through = top + w + bottom
    longest = float(through.max()) if n else 1.0
    return through / max(longest, 1e-30)


def move_features(problem: PlacementProblem, row: np.ndarray, peak_memory: np.ndarray | None = None,
                  static: FeatureStatics | None = None) -> np.ndarray:
    """Features [N * D, F] of moving each group to each device, from placement ``row`` [N].

    Move ``g * D + d`` puts group ``g`` on device ``d``. Every feature is a ratio, so the same
    weights score graphs and clusters of any size. ``peak_memory`` [D] is the placement's
    simulated peak per device (None: estimated from the groups' static bytes).
    """
    st = static or feature_statics(problem)
    row = np.asarray(row, dtype=np.int64)
    n, d = problem.num_nodes, problem.num_devices
    g = np.arange(n)
    cost = st.cost
    own = cost[g, row]
    load = np.bincount(row, weights=own, minlength=d)
    max_load = max(float(load.max()), 1e-30)
    # Traffic of each group with each device (bytes of its edges whose other end is there).
    traffic = np.zeros((n, d))
    np.add.at(traffic, (st.src, row[st.dst]), st.nbytes)
    np.add.at(traffic, (st.dst, row[st.src]), st.nbytes)
    total = traffic.sum(axis=1, keepdims=True)
    share = np.where(total > 0, traffic / np.maximum(total, 1e-30), 0.0)
    cut_time = (total[:, 0] - traffic[g, row]) / st.mean_bw
    crit = critical_share(problem, st, row)
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    if peak_memory is None:
        peak_memory = np.bincount(row, weights=st.static_mem, minlength=d)
    peak = np.asarray(peak_memory, dtype=np.float64).reshape(-1)
    headroom = (cap[None, :] - peak[None, :] - st.static_mem[:, None]) / np.maximum(cap[None, :], 1.0)
    over_here = (peak[row] > cap[row]).astype(np.float64)
    f = np.empty((n, d, NUM_FEATURES))
    f[..., 0] = np.clip(np.log((cost + 1e-12) / (own[:, None] + 1e-12)), -5.0, 5.0)
    f[..., 1] = (own / max_load)[:, None]
    f[..., 2] = (load / max_load)[None, :]
    f[..., 3] = (load[row] / max_load)[:, None]
    f[..., 4] = share
    f[..., 5] = share[g, row][:, None]
    f[..., 6] = np.log1p(cut_time / np.maximum(own, 1e-12))[:, None] / 5.0
    f[..., 7] = crit[:, None]
    f[..., 8] = np.clip(headroom, -1.0, 1.0)
    f[..., 9] = (headroom < 0).astype(np.float64)
    f[..., 10] = over_here[:, None]
    f[..., 11] = ((load[None, :] + cost) / max_load - 1.0).clip(-1.0, 5.0)  # d's load if g joined it
    return f.reshape(n * d, NUM_FEATURES).astype(np.float32)


def coupling_features(st: FeatureStatics, row: np.ndarray, moved_g: np.ndarray, moved_d: np.ndarray,
              d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coupling indicators of further moves given one move (g_b -> d_b) per proposal b, each [B, N * D]:
    a neighbour of g_b to d_b (follow), a neighbour of g_b to g_b's old device (swap), any group
    to g_b's old device (fill what was freed)."""
    b, n = len(moved_g), len(row)
    follow = np.zeros((b, n * d), dtype=np.float32)
    swap = np.zeros((b, n * d), dtype=np.float32)
    fill = np.zeros((b, n, d), dtype=np.float32)
    starts, ends = st.nbr_ptr[moved_g], st.nbr_ptr[moved_g + 1]
    counts = ends - starts
    old = row[moved_g]
    if counts.sum():
        which = np.repeat(np.arange(b), counts)
        offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        idx = st.nbr[np.repeat(starts, counts) + offsets]
        follow[which, idx * d + moved_d[which]] = 1.0
        swap[which, idx * d + old[which]] = 1.0
    fill[np.arange(b), :, old] = 1.0
    return follow, swap, fill.reshape(b, n * d)
