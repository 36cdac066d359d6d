"""Observations in the contract's format, built straight from a :class:`PlacementProblem`.

The agents' own rollout environment (:mod:`placer.agents.common.sim_vec_env`) needs the
observation of docs/contracts.md ("Gymnasium environments") for a problem.  These features
are the agent's reading of the problem's arrays; the policy works with any feature width,
so it equally takes the observations of ``envs.placement_env.PlacementEnv``.
"""

from __future__ import annotations

import numpy as np
from gymnasium import spaces

from envs.problem import PlacementProblem

#: Node feature names, in column order.
NODE_FEATURES = (
    "log_time_mean",
    "log_time_min",
    "log_time_spread",
    "log_out_bytes",
    "log_param_bytes",
    "log_act_bytes",
    "log_flops",
    "depth",
    "in_degree",
    "out_degree",
    "requires_grad",
    "position",
)
#: Device feature names, in column order.
DEVICE_FEATURES = ("log_memory", "relative_speed", "log_mean_bandwidth", "log_mean_latency")


def _log_scaled(x: np.ndarray) -> np.ndarray:
    """log1p of a non-negative column, scaled to about [0, 1] over the graph."""
    y = np.log1p(np.maximum(np.asarray(x, dtype=np.float64), 0.0))
    top = y.max() if y.size else 0.0
    return y / top if top > 0 else y


def node_features(problem: PlacementProblem) -> np.ndarray:
    """[N, len(NODE_FEATURES)] float32 features of the problem's nodes (topological order)."""
    n = problem.num_nodes
    time = problem.fwd_time + problem.bwd_time  # [N, D]
    us = time * 1e6  # microseconds, so log1p separates tiny and large ops
    depth = np.zeros(n)
    for e in np.argsort(problem.edge_dst, kind="stable"):  # edges sorted by destination: sources are final
        s, d = problem.edge_src[e], problem.edge_dst[e]
        depth[d] = max(depth[d], depth[s] + 1)
    indeg = np.bincount(problem.edge_dst, minlength=n)
    outdeg = np.bincount(problem.edge_src, minlength=n)
    cols = [
        _log_scaled(us.mean(1)),
        _log_scaled(us.min(1)),
        _log_scaled(us.max(1) - us.min(1)),
        _log_scaled(problem.out_bytes),
        _log_scaled(problem.param_bytes),
        _log_scaled(problem.act_bytes),
        _log_scaled(problem.flops),
        depth / max(depth.max(), 1.0),
        np.log1p(indeg) / np.log1p(max(indeg.max(initial=0), 1)),
        np.log1p(outdeg) / np.log1p(max(outdeg.max(initial=0), 1)),
        problem.requires_grad.astype(np.float64),
        np.arange(n) / max(n - 1, 1),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def device_features(problem: PlacementProblem) -> np.ndarray:
    """[D, len(DEVICE_FEATURES)] float32 features of the devices."""
    time = problem.fwd_time + problem.bwd_time
    total = time.sum(0)
    speed = total.min() / np.where(total > 0, total, 1.0) if total.max() > 0 else np.ones(problem.num_devices)
    d = problem.num_devices
    off = ~np.eye(d, dtype=bool)
    bw = np.where(off, problem.bandwidth, np.nan)
    lat = np.where(off, problem.latency, np.nan)
    mean_bw = np.nan_to_num(np.nanmean(bw, axis=1) if d > 1 else np.zeros(d), nan=0.0, posinf=0.0)
    mean_lat = np.nan_to_num(np.nanmean(lat, axis=1) if d > 1 else np.zeros(d), nan=0.0)
    cols = [
        np.log1p(problem.memory_capacity) / np.log1p(max(problem.memory_capacity.max(), 1.0)),
        speed,
        np.log1p(mean_bw) / max(np.log1p(mean_bw).max(), 1.0),
        np.log1p(mean_lat * 1e6) / max(np.log1p(mean_lat * 1e6).max(), 1.0),
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def observation_space(max_nodes: int, max_edges: int, num_devices: int) -> spaces.Dict:
    """The contract's observation space for these sizes and this module's feature widths."""
    return spaces.Dict(
        {
            "node_features": spaces.Box(-np.inf, np.inf, (max_nodes, len(NODE_FEATURES)), np.float32),
            "node_mask": spaces.Box(0.0, 1.0, (max_nodes,), np.float32),
            "edge_index": spaces.Box(0, max(max_nodes - 1, 0), (2, max_edges), np.int64),
            "edge_mask": spaces.Box(0.0, 1.0, (max_edges,), np.float32),
            "device_features": spaces.Box(-np.inf, np.inf, (num_devices, len(DEVICE_FEATURES)), np.float32),
        }
    )


def observation(problem: PlacementProblem, max_nodes: int | None = None, max_edges: int | None = None) -> dict:
    """The padded observation of ``problem`` (numpy arrays, no batch axis)."""
    n, e = problem.num_nodes, problem.num_edges
    max_nodes = n if max_nodes is None else max_nodes
    max_edges = max(e, 1) if max_edges is None else max_edges
    feats = np.zeros((max_nodes, len(NODE_FEATURES)), np.float32)
    feats[:n] = node_features(problem)
    mask = np.zeros(max_nodes, np.float32)
    mask[:n] = 1.0
    edge_index = np.zeros((2, max_edges), np.int64)
    edge_index[0, :e] = problem.edge_src
    edge_index[1, :e] = problem.edge_dst
    edge_mask = np.zeros(max_edges, np.float32)
    edge_mask[:e] = 1.0
    return {
        "node_features": feats,
        "node_mask": mask,
        "edge_index": edge_index,
        "edge_mask": edge_mask,
        "device_features": device_features(problem),
    }
