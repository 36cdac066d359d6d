"""The benchmark harness: chosen methods × zoo models × clusters, one honest table.

Every method's placement goes through the same simulator (:func:`placer.report.compare.comparison_table`)
and, with ``measure=True`` on a real cluster, through the same measurement
(:class:`envs.runtime.measure.SingleProcessMeasurer`). The table has one row per (model, cluster, method):
model, cluster, method, step_time, speedup_vs_single, ratio_to_lower_bound, peak_memory
(per device, text), fits, search_time, evaluated, source (simulated / measured), note.

Memory-constrained scenarios: a cluster name ending in ``-tight`` (``"4xK40-tight"``), or
``memory_fraction=f``, caps every device's memory at ``f`` × the model's whole training
footprint (default 0.4 for ``-tight``; never below 1.25x the largest node), so no single
device holds the model and a placement is forced. Speed-ups there are over the best
single device of the *uncapped* cluster (what one device would do if the model fitted).
With ``measure=True`` every single-device placement is measured too, and a measured row's
speed-up is over the fastest measured one (as optimize reports it).

Methods are a registry (:data:`METHODS`): every baseline by name, ``single:<device>``,
and ``agent:<name>`` for the search agents (:mod:`placer.search.search`). More can be
added with :func:`register_method`. A method is
``callable(problem, graph, captured, budget, seed, op_to_group) -> MethodOutcome``.

Example::

    table = run_benchmark(["rnnlm"], ["4xK40"], ["single", "expert", "m_etf"], out_dir="out")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import pandas as pd

from envs.hardware.cluster import Cluster
from envs.sim.problem import PlacementProblem
from graphs.capture import CapturedModel
from graphs.errors import PlacerError
from graphs.grouping import Grouping
from graphs.model_file import ModelSpec
from placer.options import OptionError
from placer.out_dir import check_out_dir
from placer.report.benchmark import markdown, plot_bars, write_outputs  # noqa: F401 (re-exported)
from placer.search.agents.registry import UnknownAgentError, get_agent
from placer.search.budget import DEFAULT_BUDGET, Budget, parse_budget

log = logging.getLogger(__name__)

#: Memory fraction used by a ``<preset>-tight`` cluster name.
TIGHT_FRACTION = 0.4
TIGHT_SUFFIX = "-tight"
COLUMNS = [
    "model", "cluster", "method", "step_time", "speedup_vs_single", "ratio_to_lower_bound",
    "peak_memory", "fits", "search_time", "evaluated", "source", "note",
]


class BenchmarkError(PlacerError, ValueError):
    """A benchmark request that cannot run: unknown method or model, bad fraction, bad output dir."""


@dataclass
class MethodOutcome:
    """What a method returns: a placement row (or None with ``reason``) and its search cost.

    ``interrupted``: the method stopped on Ctrl-C or SIGTERM (an agent's search returns its
    best so far); the benchmark then stops as a whole and keeps the rows so far.
    """

    placement: np.ndarray | None
    reason: str = ""
    search_time: float = 0.0
    evaluated: int = 0
    history: list[tuple[float, int, float]] = field(default_factory=list)
    interrupted: bool = False


class BenchmarkInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`run_case`: carries the case's rows up to and including
    the interrupted method, so :func:`run_benchmark` can keep them."""

    def __init__(self, table: pd.DataFrame, histories: dict) -> None:
        super().__init__("benchmark interrupted")
        self.table = table
        self.histories = histories


MethodFn = Callable[[PlacementProblem, nx.DiGraph | None, Any, Budget | None, int, Mapping[str, str] | None], MethodOutcome]


@dataclass
class BenchCase:
    """One (model, cluster) problem to run methods on.

    ``reference_single`` is the best single-device step time speed-ups are taken over
    (None: the best fitting single device of ``problem`` itself).
    """

    model: str
    cluster: str
    problem: PlacementProblem
    graph: nx.DiGraph | None = None
    captured: CapturedModel | None = None
    op_to_group: Mapping[str, str] | None = None
    reference_single: float | None = None
    note: str = ""
    grouping: Grouping | None = None
    source: str | None = None  # model source for measurement ("zoo:<name>")
    model_args: Mapping[str, Any] | None = None
    cluster_obj: Cluster | None = None


# ----------------------------------------------------------------------------- methods


def _baseline_method(name: str) -> MethodFn:
    def run(problem, graph, captured, budget, seed, op_to_group):
        from placer.search.baselines import run_baseline

        placements = budget.placements if budget is not None and budget.placements else None
        res = run_baseline(name, problem, graph, seed, captured=captured, op_to_group=op_to_group, placements=placements)
        return MethodOutcome(res.placement, res.reason, res.search_time, res.evaluated, list(res.history))

    return run


def _agent_method(agent: str) -> MethodFn:
    def run(problem, graph, captured, budget, seed, op_to_group):
        try:
            from placer.search.search import search
        except ImportError as exc:
            raise BenchmarkError(f"method 'agent:{agent}' needs placer.search.search, which is not available ({exc})") from None
        t0 = time.perf_counter()
        result = search(problem, agent=agent, budget=budget or parse_budget(DEFAULT_BUDGET), seed=seed, progress=False)
        found = result.best_row is not None and bool(result.best_fits)
        reason = f"stopped: {result.stop_reason}" if found else f"no fitting placement found (stopped: {result.stop_reason})"
        return MethodOutcome(
            np.asarray(result.best_row) if found else None, reason,
            time.perf_counter() - t0, int(result.evaluated), list(result.history),
            interrupted=result.stop_reason == "interrupted",  # search() turned the Ctrl-C into its stop reason
        )

    return run


METHODS: dict[str, MethodFn] = {}


def register_method(name: str, fn: MethodFn) -> None:
    """Add a method to :data:`METHODS` (e.g. a new agent) under ``name``."""
    if not name or not isinstance(name, str):
        raise BenchmarkError(f"a method name must be a non-empty string, got {name!r}")
    METHODS[name] = fn


def _register_baselines() -> None:
    from placer.search.baselines import BASELINES

    for name in BASELINES:
        METHODS.setdefault(name, _baseline_method(name))


_register_baselines()


def get_method(name: str) -> MethodFn:
    """The method called ``name``: registered, ``single:<device>`` or ``agent:<name>``."""
    if name in METHODS:
        return METHODS[name]
    if name.startswith("single:") and len(name) > len("single:"):
        return _baseline_method(name)
    if name.startswith("agent:") and len(name) > len("agent:"):
        agent = name.split(":", 1)[1]
        try:  # checked here, not when the method runs: that was after every model was prepared
            get_agent(agent)
        except UnknownAgentError as exc:
            raise BenchmarkError(f"method {name!r}: {exc}") from None
        return _agent_method(agent)
    raise BenchmarkError(
        f"unknown method {name!r}; known: {', '.join(METHODS)}, single:<device>, agent:<name>, or 'baselines' for all"
    )


def expand_methods(names: Iterable[str], problem: PlacementProblem | None = None) -> list[str]:
    """Expand ``baselines``/``all`` to every baseline and ``single:*`` to each device."""
    from placer.search.baselines import baseline_names

    out: list[str] = []
    for name in names:
        if name in ("baselines", "all"):
            out.extend(baseline_names(problem))
        elif name == "single:*":
            if problem is None:
                raise BenchmarkError("'single:*' needs a problem to know the devices")
            out.extend(f"single:{d}" for d in problem.device_names)
        else:
            get_method(name)  # validates
            out.append(name)
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- scenarios


def split_cluster_name(name: str) -> tuple[str, float | None]:
    """``"4xK40-tight"`` -> ``("4xK40", TIGHT_FRACTION)``; other names -> ``(name, None)``."""
    if name.endswith(TIGHT_SUFFIX) and len(name) > len(TIGHT_SUFFIX):
        return name[: -len(TIGHT_SUFFIX)], TIGHT_FRACTION
    return name, None


def tighten(problem: PlacementProblem, fraction: float) -> PlacementProblem:
    """A copy of ``problem`` whose devices hold at most ``fraction`` of the model's training footprint.

    Footprints are the simulator's peaks (what a placement is judged by), not a per-node sum:
    the whole model on one device for the footprint, and each of the largest nodes alone on a
    device for the floor. The cap never goes below 1.25 x the largest of those: a node cannot
    be split, so a lower cap would leave no placement at all.
    """
    from envs.sim.simulator import simulate_batch
    from placer.search.baselines.common import node_memory

    if not (isinstance(fraction, (int, float)) and 0 < fraction and math.isfinite(fraction)):
        raise BenchmarkError(f"memory fraction must be a positive number (e.g. 0.4), got {fraction!r}")
    mem = node_memory(problem)
    inbound = np.bincount(problem.edge_dst, weights=problem.edge_bytes.astype(np.float64), minlength=problem.num_nodes)
    n, d = problem.num_nodes, problem.num_devices
    rows = [np.zeros(n, dtype=np.int64)]
    if d > 1:  # each of the largest nodes alone on device 1, the rest on device 0
        for node in np.argsort(-(mem + inbound), kind="stable")[:3]:
            alone = np.zeros(n, dtype=np.int64)
            alone[node] = 1
            rows.append(alone)
    peaks = simulate_batch(problem, np.stack(rows)).peak_memory
    need = float(peaks[0, 0])
    floor = 1.25 * (float(peaks[1:, 1].max()) if d > 1 else float((mem + inbound).max()))
    cap = np.minimum(np.asarray(problem.memory_capacity, dtype=np.float64), max(fraction * need, floor))
    return dataclasses.replace(problem, memory_capacity=cap, _index=dict(problem._index))


def best_single_time(problem: PlacementProblem, ignore_memory: bool = False) -> float:
    """Simulated step time of the fastest single device (that fits, unless ``ignore_memory``)."""
    from envs.sim.simulator import simulate_batch

    rows = np.repeat(np.arange(problem.num_devices)[:, None], problem.num_nodes, axis=1)
    sim = simulate_batch(problem, rows)
    ok = np.ones(problem.num_devices, dtype=bool) if ignore_memory else np.asarray(sim.fits)
    return float(np.min(np.asarray(sim.step_time)[ok])) if ok.any() else float("nan")


# ----------------------------------------------------------------------------- running


def run_case(case: BenchCase, methods: Sequence[str], budget: Budget | None = None, seed: int = 0,
             measure: bool = False, progress: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Run ``methods`` on one case. Returns its table rows and the search histories by method.

    Raises:
        BenchmarkInterrupted: Ctrl-C or SIGTERM stopped a method (an agent's search that
            returned "interrupted", or a KeyboardInterrupt in any other method). The methods
            after it do not run and nothing is measured; the rows so far travel with it.
    """
    from placer.report.compare import Candidate, comparison_table

    candidates = []
    histories: dict[str, list] = {}
    interrupted = False
    for name in expand_methods(methods, case.problem):
        if progress:
            progress(f"{case.model} on {case.cluster}: {name}")
        t0 = time.perf_counter()
        method = get_method(name)
        try:
            out = method(case.problem, case.graph, case.captured, budget, seed, case.op_to_group)
        except PlacerError:
            raise  # wrong use (missing graph, unknown device): the user must fix the request
        except KeyboardInterrupt:  # Ctrl-C in a method that does not catch it itself (the baselines)
            out = MethodOutcome(None, "interrupted before it found a placement", interrupted=True)
        except Exception as exc:  # noqa: BLE001 - one broken method must not void the whole table
            out = MethodOutcome(None, f"method failed: {type(exc).__name__}: {exc}")
        search_time = out.search_time or (time.perf_counter() - t0)
        candidates.append(Candidate(name, out.placement, search_time, out.evaluated, out.reason, None, out.history))
        if out.history:
            histories[name] = out.history
        if out.interrupted:
            interrupted = True
            break  # the first Ctrl-C stops the whole benchmark, as it stops optimize
    # Interrupted: no measurement runs (as optimize's confirm stage); the rows stay simulated.
    measured_single = _measure(case, candidates) if measure and not interrupted else None
    table = comparison_table(case.problem, candidates)
    if case.reference_single is not None:
        table["speedup_vs_single"] = case.reference_single / table["step_time"]
    if measure:
        # A measured step over a measured single device, as optimize reports it
        # (placer.measuring.confirm.measured_speedups): the simulated one is another clock.
        rows = table["source"] == "measured"
        table.loc[rows, "speedup_vs_single"] = (measured_single / table.loc[rows, "step_time"]
                                                if measured_single is not None else float("nan"))
    table.insert(0, "cluster", case.cluster)
    table.insert(0, "model", case.model)
    if interrupted:
        raise BenchmarkInterrupted(table[COLUMNS], histories)
    return table[COLUMNS], histories


def _measure(case: BenchCase, candidates: list) -> float | None:
    """Measure every found placement on the real devices of ``case`` (same protocol for all),
    and every single-device placement: returns the fastest of those that ran (the measured
    rows' speed-up denominator), or None."""
    if case.cluster_obj is None or getattr(case.cluster_obj, "simulated", True):
        raise BenchmarkError(
            f"cluster {case.cluster!r} is a simulated spec: measuring needs real devices (use --clusters real; clusters=['real'] in run_benchmark)"
        )
    if case.grouping is None or case.source is None:
        raise BenchmarkError("measuring needs the model source and its grouping (run_benchmark provides them)")
    from envs.runtime.measure import SingleProcessMeasurer

    with SingleProcessMeasurer(case.source, model_args=case.model_args, devices=case.cluster_obj) as m:
        for c in candidates:
            if c.row is None:
                continue
            ops = case.grouping.expand(case.problem.array_to_placement(c.row))
            [r] = m.measure([ops])
            if r.valid:
                c.measured_step_time = float(r.step_time)
            else:
                c.note = f"{c.note}; measurement invalid: {r.reason}".lstrip("; ")
        singles = []
        for d in range(case.problem.num_devices):  # the measurer's cache answers rows measured above
            row = np.full(case.problem.num_nodes, d, dtype=np.int64)
            [r] = m.measure([case.grouping.expand(case.problem.array_to_placement(row))])
            if r.valid:
                singles.append(float(r.step_time))
    return min(singles) if singles else None


def optimizer_name(spec: ModelSpec) -> str:
    """Name (a key of ``envs.sim.optimizer_state.OPTIMIZER_STATE_FACTOR``) of the optimizer the model file builds."""
    from envs.sim.optimizer_state import optimizer_state_kind

    return optimizer_state_kind(spec.optimizer_fn)


def model_source(model: str) -> str:
    """What ``--models`` names, as :func:`graphs.pipeline.prepare` reads it: a bare zoo name
    (``rnnlm``) becomes ``zoo:rnnlm``; a model file or ``zoo:<name>`` stays as it is."""
    return model if ":" in model or model.endswith(".py") else f"zoo:{model}"


def check_model_sources(models: Sequence[str], size: str = "small") -> None:
    """Refuse an unknown zoo model or a missing model file among ``models`` before any is
    prepared: a bad name after the first was found only once the models before it had been
    captured and profiled (minutes for the whole zoo).

    Raises:
        ModelFileError: an unknown zoo model. BenchmarkError: a model file that does not exist,
            or a ``size`` the zoo does not have (the zoo models' only argument here).
    """
    from graphs.zoo import ZOO_MODELS, zoo_path
    from graphs.zoo.presets import SIZES

    if size not in SIZES and any(model_source(m).startswith("zoo:") for m in models):
        raise BenchmarkError(f"unknown zoo size {size!r}; expected one of {', '.join(SIZES)}")
    for model in models:
        source = model_source(model)
        if source.startswith("zoo:"):
            zoo_path(source[len("zoo:"):])
        elif not Path(source).is_file():
            raise BenchmarkError(f"model file {source!r} does not exist; expected a model file (.py) or a zoo model "
                                 f"({', '.join(ZOO_MODELS)})")


def prepare_cases(models: Sequence[str], clusters: Sequence[str], size: str = "small",
                  memory_fraction: float | None = None, cache_dir: str | Path | None = None,
                  progress: Callable[[str], None] | None = None) -> list[BenchCase]:
    """Capture, profile and group each zoo model once; compile it on each cluster."""
    from envs.hardware.loading import discover_cluster, load_cluster
    from envs.sim.problem_compile import compile_problem
    from graphs.pipeline import prepare

    check_model_sources(models, size)
    loaded = []
    for cname in clusters:
        base, fraction = split_cluster_name(cname)
        fraction = memory_fraction if memory_fraction is not None else fraction
        cluster = discover_cluster() if base == "real" else load_cluster(base)
        loaded.append((cname, cluster, fraction))
    cases = []
    for model in models:
        source = model_source(model)
        # The size preset is the zoo's: a model file need not take a `size` argument.
        model_args = {"size": size} if source.startswith("zoo:") else {}
        if progress:
            progress(f"preparing {source}" + (f" (size={size})" if model_args else ""))
        prep = prepare(source, model_args=model_args, cache_dir=cache_dir)
        graph = prep.grouping.graph
        label = prep.spec.name or model
        optimizer = optimizer_name(prep.spec)
        for cname, cluster, fraction in loaded:
            # The op graph with its groups: the ops execute, the groups are the placement unit
            # (the problem optimize, show and the report simulate).
            problem = compile_problem(prep.captured.graph, cluster, optimizer=optimizer, grouping=prep.grouping)
            reference, note = None, ""
            if fraction is not None:
                reference = best_single_time(problem, ignore_memory=True)
                problem = tighten(problem, fraction)
                note = f"memory capped at {fraction:g}x model; speed-up over uncapped single device"
                cname = cname if cname.endswith(TIGHT_SUFFIX) else f"{cname}@{fraction:g}"
            cases.append(BenchCase(label, cname, problem, graph, prep.captured, prep.grouping.op_to_group,
                                   reference, note, prep.grouping, source, model_args, cluster))
    return cases


def run_benchmark(models: Sequence[str], clusters: Sequence[str], methods: Sequence[str] = ("baselines",),
                  size: str = "small", budget: Budget | str | int | float | None = None,
                  out_dir: str | Path | None = None, seed: int = 0, memory_fraction: float | None = None,
                  measure: bool = False, cases: Sequence[BenchCase] | None = None,
                  progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Run ``methods`` over ``models`` × ``clusters`` and return the table (see the module docstring).

    ``cases`` replaces model preparation (tests, or callers with their own problems). With
    ``out_dir`` it writes ``results.csv``, ``results.md``, ``bars_<model>.png`` and
    ``search_<model>_<cluster>.png`` (methods that report a history).

    Ctrl-C or SIGTERM while the methods run stops the whole benchmark, as it stops
    ``optimize``: no further model, cluster or method runs; the rows so far (the interrupted
    agent's with its best so far, note "stopped: interrupted") are returned and written, and
    the table's ``attrs["interrupted"]`` is True. The CLI then exits 130 (143 for SIGTERM).
    """
    if budget is not None and not isinstance(budget, Budget):
        budget = parse_budget(budget)
    if not methods:
        raise BenchmarkError("no methods given; name baselines (e.g. 'm_etf') or 'baselines' for all of them")
    for name in methods:
        if name not in ("baselines", "all", "single:*"):
            get_method(name)
    try:
        out = check_out_dir(out_dir)
    except OptionError as exc:
        raise BenchmarkError(str(exc)) from None
    if cases is None:
        cases = prepare_cases(models, clusters, size, memory_fraction, progress=progress)
    tables, histories = [], {}
    interrupted = False
    for case in cases:
        try:
            table, hist = run_case(case, methods, budget, seed, measure, progress)
        except BenchmarkInterrupted as stop:
            table, hist, interrupted = stop.table, stop.histories, True
        except KeyboardInterrupt:  # outside a method (while measuring): this case's rows are lost
            table, hist, interrupted = None, {}, True
        if table is not None:
            tables.append(table)
        if hist:
            histories[(case.model, case.cluster)] = hist
        if interrupted:
            log.warning("benchmark interrupted during %s on %s: stopped; %d row(s) so far kept",
                        case.model, case.cluster, sum(len(t) for t in tables))
            break
    result = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=COLUMNS)
    result.attrs["interrupted"] = interrupted
    if out is not None:
        from placer.report.results import interrupts_deferred

        # A second Ctrl-C while the files are written takes effect once all are.
        with interrupts_deferred():
            out.mkdir(parents=True, exist_ok=True)
            write_outputs(result, histories, out)
    return result


