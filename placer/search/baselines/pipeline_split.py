"""Pipeline partitioners: the splits people make by hand, and PipeDream's dynamic programme.

Each returns a :class:`envs.sim.pipeline_layout.Pipeline`: the problem's nodes (a topological order,
``problem.node_names``) cut into one contiguous stage per device (the accelerators in
index order, else all devices; :func:`pipeline_devices`), ``M`` micro-batches and a schedule.

* :func:`even_split_layers`: equal numbers of *layers* (nodes that hold parameters) per
  stage, what users of ``torch.distributed.pipelining`` do with ``split_spec`` at every
  k-th block, and DeepSpeed's ``partition_method="uniform"``.
* :func:`even_split_params`: equal parameter bytes per stage (DeepSpeed's
  ``partition_method="parameters"``).
* :func:`pipedream_dp`: the split minimising the bottleneck (PipeDream, Narayanan et
  al. 2019, section 3.1: the slowest stage bounds a pipeline's throughput), with each
  stage within its device's memory for this ``M`` and schedule. A stage's cost is the
  larger of the seconds it keeps its process busy in one step, as the simulator charges
  them (:func:`envs.sim.stage_costs.segment_step_seconds`: ``M`` micro-batch forwards and
  backwards with their fixed parts, the adds into ``.grad``, calls, sends, receives, the
  loss, the optimizer update), and the time its outgoing boundary's link is occupied in
  either direction (the values read by later stages are relayed, P3). Until 2026-12-06 it
  was the forward and backward over the whole batch plus the transfers, which left out
  what does not shrink with the micro-batch and the optimizer: on ResNet-50 over two CPU
  processes (batch 32, M=4) it balanced 0.46 + 0.46 s where the simulator charged
  0.50 + 0.70 s, a step 7.9% slower than the best cut's (``benchmarks/results/pipeline.md``).
  Its memory: parameters, gradients and optimizer state, the in-flight micro-batches'
  activations (GPipe ``M``, 1F1B ``min(M, S - s)``) and the receive buffers of all ``M``
  micro-batches (:mod:`envs.sim.pipeline`, P5). Exact for that objective.

:func:`best_pipeline` tries the three over micro-batch counts and schedules, scores each
with :func:`envs.sim.pipeline.simulate_pipeline` and keeps the fastest that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.pipeline import PipelineResult, engine_host_costs, simulate_pipeline
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from envs.sim.rank_costs import RankCosts
from envs.sim.stage_costs import pipeline_tables, segment_step_seconds
from placer.search.baselines.common import NoFit, accelerators

__all__ = ["pipeline_devices", "even_split_layers", "even_split_params", "pipedream_dp", "PipelineCandidate",
           "best_pipeline", "PARTITIONERS"]

#: The O(S N^2) DP is built for graphs up to this many nodes (group graphs are far smaller).
MAX_NODES = 4000


def pipeline_devices(problem: PlacementProblem) -> list[int]:
    """The devices a pipeline runs on, in stage order: the accelerators, else every device."""
    return accelerators(problem)


def _too_few_groups(stages: int, groups: int) -> str:
    # No ';' before the count: the comparison table's note keeps what comes before the first one.
    return (f"the model is {groups} group(s), and {stages} stages need {stages} at least (a stage holds whole "
            "groups)")


def _cut_even(weights: np.ndarray, stages: int) -> list[int]:
    """Cut points (start index of stages 1..S-1) giving each stage ~1/S of ``weights``, none empty."""
    n = len(weights)
    if stages > n:
        raise NoFit(_too_few_groups(stages, n))
    total = float(weights.sum())
    cum = np.cumsum(weights)
    cuts: list[int] = []
    prev = 0
    for j in range(1, stages):
        target = total * j / stages
        i = int(np.searchsorted(cum, target, side="left")) + 1 if total > 0 else round(n * j / stages)
        # at least one node per stage, and room for the stages still to come
        i = min(max(i, prev + 1), n - (stages - j))
        cuts.append(i)
        prev = i
    return cuts


def _pipeline(problem: PlacementProblem, cuts: Sequence[int], devices: Sequence[int], m: int,
              schedule: str) -> Pipeline:
    names = problem.node_names
    bounds = [0, *cuts, len(names)]
    stages = tuple(tuple(names[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1))
    return Pipeline(stages, tuple(problem.device_names[d] for d in devices), m, schedule)


def even_split_layers(problem: PlacementProblem, microbatches: int, schedule: str = "1f1b",
                      devices: Sequence[int] | None = None, costs: RankCosts | None = None) -> Pipeline:
    """Equal numbers of parameterised nodes per stage (module doc); ``costs`` unused (it counts nodes)."""
    devs = list(devices) if devices is not None else pipeline_devices(problem)
    layers = (np.asarray(problem.param_bytes) > 0).astype(np.float64)
    if layers.sum() < len(devs):
        layers = np.ones(problem.num_nodes)
    return _pipeline(problem, _cut_even(layers, len(devs)), devs, microbatches, schedule)


def even_split_params(problem: PlacementProblem, microbatches: int, schedule: str = "1f1b",
                      devices: Sequence[int] | None = None, costs: RankCosts | None = None) -> Pipeline:
    """Equal parameter bytes per stage (module doc); ``costs`` unused (it counts bytes)."""
    devs = list(devices) if devices is not None else pipeline_devices(problem)
    weights = np.asarray(problem.param_bytes, dtype=np.float64)
    if weights.sum() <= 0:
        weights = np.ones(problem.num_nodes)
    return _pipeline(problem, _cut_even(weights, len(devs)), devs, microbatches, schedule)


def _boundary_bytes(problem: PlacementProblem) -> np.ndarray:
    """[N+1] bytes crossing a cut before node i (every edge from < i to >= i: relayed values)."""
    n = problem.num_nodes
    diff = np.zeros(n + 2)
    src = np.asarray(problem.edge_src, dtype=np.int64)
    dst = np.asarray(problem.edge_dst, dtype=np.int64)
    b = np.asarray(problem.edge_bytes, dtype=np.float64)
    np.add.at(diff, src + 1, b)
    np.add.at(diff, dst + 1, -b)
    return np.cumsum(diff)[: n + 1]


def pipedream_dp(problem: PlacementProblem, microbatches: int, schedule: str = "1f1b",
                 devices: Sequence[int] | None = None, costs: RankCosts | None = None) -> Pipeline:
    """The contiguous split minimising the bottleneck stage under memory (module doc);
    ``costs``: the CPU processes' host constants the pipeline will be simulated with.

    Raises:
        NoFit: the graph is too large for the tables, or no split fits memory.
    """
    devs = list(devices) if devices is not None else pipeline_devices(problem)
    n, s_, m = problem.num_nodes, len(devs), microbatches
    if n > MAX_NODES:
        raise NoFit(f"pipedream_dp is limited to {MAX_NODES} nodes; this graph has {n}")
    if s_ > n:
        raise NoFit(_too_few_groups(s_, n))
    tables = pipeline_tables(problem)
    static = np.asarray(problem.static_memory(), dtype=np.float64)
    act = np.asarray(problem.act_bytes, dtype=np.float64)
    cut = _boundary_bytes(problem)
    pre_static = np.concatenate([[0.0], np.cumsum(static)])
    pre_act = np.concatenate([[0.0], np.cumsum(act)])
    cap = np.asarray(problem.memory_capacity, dtype=np.float64)
    ks = np.arange(n + 1)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((s_, n + 1), dtype=np.int64)
    for j, d in enumerate(devs):
        host = engine_host_costs(problem, d, costs)
        in_flight = m if schedule == "gpipe" else min(m, s_ - j)
        nxt = devs[j + 1] if j + 1 < s_ else None
        new = np.full(n + 1, np.inf)
        for i in range(j + 1, n + 1 - (s_ - 1 - j)):
            k = ks[j:i]  # stage j holds [k, i), non-empty
            if nxt is None and i != n:
                continue
            stage = segment_step_seconds(problem, k, i, d, m, host, first=j == 0, last=nxt is None)
            if nxt is not None and nxt != d:  # each direction of a boundary is one FIFO channel (P3)
                stage = np.maximum(stage, max(tables.cross_f[i] / problem.bandwidth[d, nxt],
                                              tables.cross_b[i] / problem.bandwidth[nxt, d]))
            # kept activations of the micro-batches in flight, and PipelineStage's receive buffers
            # for all M micro-batches of the incoming boundary and the outgoing gradients
            mem = (pre_static[i] - pre_static[k]) + in_flight * (pre_act[i] - pre_act[k]) / m + cut[k] + (
                cut[i] if nxt is not None else 0.0)
            val = np.where(mem <= cap[d], np.maximum(best[k], stage), np.inf)
            a = int(np.argmin(val))
            new[i], choice[j, i] = val[a], k[a]
        best = new
    if not np.isfinite(best[n]):
        raise NoFit(f"no {s_}-stage split fits the devices' memory with {m} micro-batch(es) under {schedule}")
    cuts: list[int] = []
    i = n
    for j in reversed(range(1, s_)):
        i = int(choice[j, i])
        cuts.append(i)
    return _pipeline(problem, sorted(cuts), devs, m, schedule)


PARTITIONERS: dict[str, Callable[..., Pipeline]] = {
    "even_layers": even_split_layers,
    "even_params": even_split_params,
    "pipedream_dp": pipedream_dp,
}


@dataclass(frozen=True)
class PipelineCandidate:
    """A partitioner's pipeline and its simulated step (``result`` None: it does not fit; ``reason`` why)."""

    method: str
    pipeline: Pipeline | None
    result: PipelineResult | None
    reason: str = ""
    evaluated: int = 0  # pipelines simulated to choose it (the budget the partitioner spent)

    @property
    def step_time(self) -> float:
        return self.result.step_time if self.result is not None and self.result.fits else float("inf")


def best_pipeline(problem: PlacementProblem, batch_size: int | None = None,
                  microbatches: Sequence[int] = (1, 2, 4, 8, 16, 32),
                  schedules: Sequence[str] = ("1f1b", "gpipe"), methods: Sequence[str] | None = None,
                  costs: RankCosts | None = None, min_samples: int = 1) -> dict[str, PipelineCandidate]:
    """Per partitioner, its fastest fitting pipeline over ``microbatches`` (those dividing
    ``batch_size`` into micro-batches of at least ``min_samples`` samples, when it is given)
    and ``schedules``, simulated (module doc)."""
    out: dict[str, PipelineCandidate] = {}
    ms = [m for m in microbatches
          if batch_size is None or (batch_size % m == 0 and batch_size // m >= min_samples)] or [1]
    for name in methods or list(PARTITIONERS):
        fn = PARTITIONERS[name]
        best: PipelineCandidate | None = None
        reason = ""
        evaluated = 0
        for schedule in schedules:
            for m in ms:
                try:
                    pipe = fn(problem, m, schedule, costs=costs)
                    evaluated += 1
                    res = simulate_pipeline(problem, pipe, costs)
                except (NoFit, PipelineError) as exc:
                    reason = str(exc)
                    continue
                if not res.fits:
                    reason = "; ".join(res.memory_problems())
                    continue
                cand = PipelineCandidate(name, pipe, res)
                if best is None or cand.step_time < best.step_time:
                    best = cand
        if best is None:
            out[name] = PipelineCandidate(name, None, None, reason or "no pipeline fits", evaluated)
        else:
            out[name] = PipelineCandidate(name, best.pipeline, best.result, best.reason, evaluated)
    return out
