"""Baselines by stable name, and one call that runs any of them.

>>> res = run_baseline("m_etf", problem)  # doctest: +SKIP
>>> res.placement, res.reason, res.search_time  # doctest: +SKIP

(``problem`` is an :class:`envs.sim.problem.PlacementProblem`; :mod:`placer.search.baselines` runs
this example on a small one.)

Names: ``single`` (best single device), ``single:<device>``, ``round_robin``, ``random``,
``expert``, ``balanced``, ``sequential``, ``accelerate``, ``fx_size_based``, ``fx_cost_aware``,
``fx_kl_based``, ``mincut``, ``m_topo``, ``m_etf``, ``m_sct``, ``heft``,
``critical_path``, ``pipeline_dp``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import networkx as nx
import numpy as np

from envs.sim.problem import PlacementProblem
from placer.search.baselines import (
    accelerate_auto,
    baechi,
    expert,
    fx_partitioner,
    list_scheduling,
    mincut,
    module_split,
    pipeline_dp,
    simple,
)
from placer.search.baselines.common import BaselineError, BaselineInputs, BaselineResult, NoFit, fits, overflow_reason

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from graphs.capture import CapturedModel

BaselineFn = Callable[[PlacementProblem, BaselineInputs], Any]


@dataclass(frozen=True)
class Baseline:
    """A registered baseline: its function and what it needs beyond the problem."""

    name: str
    fn: BaselineFn
    summary: str
    needs_graph: bool = False
    needs_captured: bool = False


def _single(device: str) -> BaselineFn:
    return lambda problem, inputs: simple.single_on(problem, device)


BASELINES: dict[str, Baseline] = {
    b.name: b
    for b in [
        Baseline("single", simple.best_single, "fastest single device that holds the model (simulated)"),
        Baseline("round_robin", simple.round_robin, "node i on accelerator i mod G"),
        Baseline("random", simple.random_search, "best of k seeded random placements (simulated)"),
        Baseline("expert", expert.expert, "human-expert placement of the literature for the model family", True),
        Baseline("balanced", module_split.balanced, "accelerate-style module split balancing the training "
                 "footprint (parameters, gradients, optimizer state, activations), not parameters alone", True),
        Baseline("sequential", module_split.sequential, "accelerate-style module split by training footprint, "
                 "fill devices in order", True),
        Baseline("accelerate", accelerate_auto.accelerate_auto, "accelerate's own infer_auto_device_map with "
                 "get_balanced_memory (device_map='auto'; parameters only), when accelerate is installed", True, True),
        Baseline("fx_size_based", fx_partitioner.size_based, "torch.fx accelerator partitioner, size_based", True, True),
        Baseline("fx_cost_aware", fx_partitioner.cost_aware, "torch.fx accelerator partitioner, cost_aware", True, True),
        Baseline("fx_kl_based", fx_partitioner.kl_based, "torch.fx accelerator partitioner, kl_based", True, True),
        Baseline("mincut", mincut.mincut, "k-way min-cut (METIS or Kernighan-Lin), memory repaired"),
        Baseline("m_topo", baechi.m_topo, "Baechi m-TOPO"),
        Baseline("m_etf", baechi.m_etf, "Baechi m-ETF"),
        Baseline("m_sct", baechi.m_sct, "Baechi m-SCT (LP favourite children + ETF)"),
        Baseline("heft", list_scheduling.heft, "HEFT list scheduling (insertion, memory-aware)"),
        Baseline("critical_path", list_scheduling.critical_path, "CPOP critical-path list scheduling"),
        Baseline("pipeline_dp", pipeline_dp.pipeline_dp, "optimal contiguous split (bottleneck DP)"),
    ]
}


def baseline_names(problem: PlacementProblem | None = None) -> list[str]:
    """All registered names; with a problem, ``single:<device>`` for each of its devices too."""
    names = list(BASELINES)
    if problem is not None:
        names[1:1] = [f"single:{d}" for d in problem.device_names]
    return names


def get_baseline(name: str) -> Baseline:
    """The baseline called ``name`` (``single:<device>`` is built on demand)."""
    if not isinstance(name, str):
        raise BaselineError(f"a baseline name must be a string, got {name!r}")
    if name.startswith("single:"):
        device = name.split(":", 1)[1]
        if not device:
            raise BaselineError("'single:' needs a device name, e.g. 'single:gpu0'")
        return Baseline(name, _single(device), f"every node on {device}")
    if name not in BASELINES:
        raise BaselineError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)} and single:<device>")
    return BASELINES[name]


def run_baseline(
    name: str,
    problem: PlacementProblem,
    graph: nx.DiGraph | None = None,
    seed: int = 0,
    *,
    captured: CapturedModel | None = None,
    op_to_group: Mapping[str, str] | None = None,
    placements: int | None = None,
) -> BaselineResult:
    """Run baseline ``name`` on ``problem``.

    Returns a :class:`BaselineResult`; when no placement fitting device memory is found
    the placement is None and ``reason`` says why. Raises :class:`BaselineError` only for
    wrong use (unknown name, missing graph or captured model the baseline needs).
    """
    baseline = get_baseline(name)
    if baseline.needs_captured and captured is None and (baseline.name.startswith("fx_") or name == "accelerate"):
        return BaselineResult(name, None, "needs the captured model (pass captured=...)", 0.0)
    inputs = BaselineInputs(graph=graph, captured=captured, op_to_group=op_to_group, seed=seed, placements=placements)
    t0 = time.perf_counter()
    try:
        out = baseline.fn(problem, inputs)
    except NoFit as exc:
        return BaselineResult(name, None, str(exc), time.perf_counter() - t0)
    elapsed = time.perf_counter() - t0
    evaluated, history = 0, []
    if isinstance(out, tuple):
        out, evaluated, history = out
    row = problem.check_array(np.asarray(out))
    if row.shape != (problem.num_nodes,):
        raise BaselineError(f"baseline {name!r} returned shape {row.shape}; expected ({problem.num_nodes},)")
    if not fits(problem, row):
        return BaselineResult(name, None, f"its placement overfills memory: {overflow_reason(problem, row)}", elapsed, evaluated, history)
    return BaselineResult(name, row, "", elapsed, evaluated, history)
