"""``placer.optimize``: from a model to a checked, saved placement in one call.

The CLI's ``optimize`` subcommand is a thin layer over :func:`optimize`. The steps:

1. load and capture the model, profile its ops on the real devices present, group them;
2. resolve the devices: real ones (``devices=["cpu", "cuda:0"]``, step times measured to
   confirm the winner) or a simulated cluster (``cluster="4xK40"`` or a spec file);
3. run the baselines, then the agent's search from the best of them, keeping the best
   placement so far on disk; the search's reward (``reward=``) is the batched simulator
   (``simulated``), the measured step time of every placement the agent proposes
   (``measured``), or the simulator recalibrated from measurements of its best candidates
   in rounds during the search (``hybrid``, the default on real devices) — see
   :mod:`placer.measurement`;
4. on real devices, measure the best candidates and keep the measured fastest;
5. apply the winner and check outputs and gradients against the original model.

Example::

    result = placer.optimize(model, (x,), cluster="4xK40", budget="1m")
    placed = result.apply()
    print(result.compare())
    result.save("out/")
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from envs.gym.reward_modes import REWARD_MODES
from envs.hardware.cluster import Cluster
from envs.hardware.loading import load_cluster
from envs.runtime.check import check_placement
from envs.sim.optimizer_state import optimizer_state_kind
from envs.sim.problem import PlacementProblem, compile_problem
from graphs.errors import PlacerError
from graphs.model_file import ModelSpec, check_inputs_fit, default_loss, default_optimizer
from graphs.pipeline import prepare
from placer.options import Budget, OptionError, parse_budget, parse_device_list, parse_memory_limits
from placer.placement_file import Placement, save_placement
from placer.report.compare import Candidate, comparison_table
from placer.result import OptimizeResult

log = logging.getLogger("placer")

DEFAULT_CLUSTER = "4xK40"
DEFAULT_BUDGET = "2m"
#: Baselines run by default: fast, constructive, and the ones users compare against.
DEFAULT_BASELINES: tuple[str, ...] = (
    "single", "expert", "round_robin", "balanced", "sequential", "pipeline_dp",
    "m_topo", "m_etf", "m_sct", "heft", "critical_path", "mincut",
)


def resolve_cluster(
    devices: str | Sequence[str] | None = None,
    cluster: str | os.PathLike | Cluster | Mapping | None = None,
    memory: str | Mapping[str, Any] | None = None,
) -> Cluster:
    """The devices to place on: real ``devices``, a ``cluster`` preset/spec, or the default.

    Without either, all real devices are used when there are at least two, else the
    :data:`DEFAULT_CLUSTER` preset (simulated). ``memory`` caps device memory,
    accelerate ``max_memory`` style (``"cuda:0=20GiB"``).

    Raises:
        OptionError: both given, a device that is not present, a memory limit for an
            unknown device.
    """
    from envs.hardware.loading import discover_cluster

    if devices is not None and cluster is not None:
        raise OptionError("give either real devices (--devices) or a simulated cluster (--cluster), not both")
    if devices is not None:
        wanted = parse_device_list(devices)
        if _is_rank_device_list(wanted):
            result = _distributed_cluster(wanted)
        else:
            real = discover_cluster()
            absent = [d for d in wanted if d not in set(real.device_names)]
            if absent:
                raise OptionError(
                    f"device(s) {absent} not present on this machine; present: {sorted(real.device_names)}"
                )
            result = _subset(real, wanted)
    elif cluster is not None:
        result = load_cluster(cluster)
    else:
        real = discover_cluster()
        result = real if real.num_devices >= 2 else load_cluster(DEFAULT_CLUSTER)
    limits = parse_memory_limits(memory)
    if limits:
        result = _with_memory_limits(result, limits)
    return result


def _subset(cluster: Cluster, names: Sequence[str]) -> Cluster:
    from envs.hardware.cluster import make_cluster

    devices = [cluster.device(n) for n in names]
    links = [link for link in cluster.links if link.src in names and link.dst in names]
    return make_cluster(devices, links, name=cluster.name, simulated=cluster.simulated,
                        default_link=cluster.default_link)


def _with_memory_limits(cluster: Cluster, limits: Mapping[str, int]) -> Cluster:
    import dataclasses

    unknown = sorted(set(limits) - set(cluster.device_names))
    if unknown:
        raise OptionError(
            f"memory limit for unknown device(s) {unknown}; devices are {cluster.device_names}"
        )
    devices = [
        dataclasses.replace(d, memory_bytes=min(d.memory_bytes, limits[d.name])) if d.name in limits else d
        for d in cluster.devices
    ]
    return dataclasses.replace(cluster, devices=tuple(devices) if isinstance(cluster.devices, tuple) else devices)


def _to_spec(model: Any, example_inputs: Any, loss_fn: Callable | None, optimizer_fn: Callable | None,
             name: str | None) -> ModelSpec:
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"expected a torch.nn.Module, a model file path or 'zoo:<name>'; got {type(model).__name__}")
    if example_inputs is None:
        raise OptionError("optimize(model, example_inputs, ...) needs example inputs for an nn.Module")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    label = name or type(model).__name__
    check_inputs_fit(model, inputs, label)
    return ModelSpec(model=model, example_inputs=inputs, loss_fn=loss_fn or default_loss,
                     optimizer_fn=optimizer_fn or default_optimizer, name=label)


def _check_out_dir(out_dir: str | os.PathLike | None) -> Path | None:
    """Refuse an output directory that cannot be written, without creating it.

    The directory is created by the first file written into it, so a run that fails
    early (bad input, a model that does not fit) leaves no empty directory behind.
    """
    if out_dir is None:
        return None
    path = Path(out_dir)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise OptionError(f"cannot write to output directory {str(path)!r}: {str(existing)!r} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OptionError(f"cannot write to output directory {str(path)!r}: {str(existing)!r} is not writable")
    if existing != path:
        return path
    try:
        probe = path / f".placer-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise OptionError(f"cannot write to output directory {str(path)!r}: {exc.strerror or exc}") from exc
    return path


def optimize(
    model: Any,
    example_inputs: Any = None,
    *,
    devices: str | Sequence[str] | None = None,
    cluster: str | os.PathLike | Cluster | None = None,
    budget: str | int | float | Budget = DEFAULT_BUDGET,
    reward: str | None = None,
    groups: int | None = None,
    seed: int = 0,
    memory: str | Mapping[str, Any] | None = None,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    agent: str = "hierarchical",
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    model_args: Mapping[str, Any] | None = None,
    loss_fn: Callable | None = None,
    optimizer_fn: Callable | None = None,
    check: bool = True,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
    verbose: int = 1,
    measurer: Any = None,
    measure_timeout: float | None = None,
    leaf_modules: Sequence[Any] = (),
) -> OptimizeResult:
    """Find a fast placement of ``model`` and check it.

    Args:
        model: an ``nn.Module`` (with ``example_inputs``), a model file path, or ``"zoo:<name>"``.
        example_inputs: a tuple of inputs (for an ``nn.Module``).
        devices: real devices, e.g. ``"cpu,cuda:0"``; or ``cluster``: a preset name or spec
            file (simulated). Default: real devices when at least two exist, else ``4xK40``.
        budget: ``"5m"``, ``"90s"``, ``"20k"`` placements, or both ``"5m,20k"``.
        reward: what the search optimises. ``simulated``: the batched simulator (the
            default on a simulated cluster). ``measured``: the measured step time of every
            placement the agent proposes (real devices; slow, so few placements). ``hybrid``
            (the default on real devices when the model is a file or zoo name): the
            simulator, recalibrated from measurements of its best candidates in rounds
            during the search. On real devices the best candidates are measured at the end
            and the measured fastest wins, whatever the mode.
        groups: number of groups for the hierarchical agent (default from graph and devices).
        seed: makes the search reproducible.
        memory: per-device memory caps, ``"cuda:0=20GiB"`` or a dict.
        baselines: baseline names run first; their best placements seed the search.
        agent: ``hierarchical``, ``flat``, ``sequential`` or ``reinforce``.
        out_dir: where the best placement so far is kept during the search and results go.
        resume: start from the placement (and policy) saved in ``out_dir`` by an earlier run.
        check: apply the winner and compare outputs and gradients with the original model.
        leaf_modules: modules to keep as single ops (module paths such as ``"encoder.rnn"``,
            class names such as ``"Block"``, or ``nn.Module`` subclasses).
        measurer: measures op placements instead of the default worker processes (an
            :class:`envs.runtime.measurer.Measurer`: ``measure(placements) -> [MeasureResult]``,
            ``close()``), e.g. for devices this machine cannot start workers on.
        measure_timeout: seconds one placement's measurement may run (default 300); the
            search's time budget bounds every measurement during the search as well.

    Raises:
        PlacerError subclasses for bad input, before any long work starts.
    """
    seconds: dict[str, float] = {}
    budget = parse_budget(budget)
    if reward is not None and reward not in REWARD_MODES:
        raise OptionError(f"unknown reward mode {reward!r}; expected one of {', '.join(REWARD_MODES)}")
    if groups is not None and groups < 1:
        raise OptionError(f"--groups must be at least 1, got {groups}")
    _check_reward_source(reward, model, measurer, agent)
    out_path = _check_out_dir(out_dir)
    the_cluster = resolve_cluster(devices, cluster, memory)
    if the_cluster.simulated:  # the check runs on these; a missing one must not wait for the search's end
        from envs.runtime.real_devices import check_real_devices

        check_real_devices(the_cluster.real_device_map(), f"cluster {the_cluster.name!r}")
    if reward not in (None, "simulated") and the_cluster.simulated:
        raise OptionError(
            f"reward {reward!r} needs real devices (--devices), but cluster {the_cluster.name!r} is simulated; "
            "use --reward simulated"
        )
    reward = reward or _default_reward(the_cluster, model, measurer)
    from placer.search.baselines import get_baseline

    for name in baselines:
        get_baseline(name)  # unknown names fail now, not after profiling

    start = time.perf_counter()
    if isinstance(model, torch.nn.Module):
        source: Any = _to_spec(model, example_inputs, loss_fn, optimizer_fn, None)
    else:
        source = model
    profile_devices = None if the_cluster.simulated else list(dict.fromkeys(
        d.real_device or d.name for d in the_cluster.devices  # rank workers share one real kind
    ))
    prepared = prepare(source, model_args=model_args, profile=True, devices=profile_devices,
                       cache_dir=cache_dir, leaf_modules=leaf_modules)
    seconds["prepare"] = time.perf_counter() - start
    spec, captured, grouping = prepared.spec, prepared.captured, prepared.grouping

    problem = compile_problem(grouping.graph, the_cluster, optimizer=optimizer_state_kind(spec.optimizer_fn))
    if verbose:
        kind = "simulated on cluster spec" if the_cluster.simulated else "measured on real devices"
        print(f"placer: {spec.name}: {captured.graph.number_of_nodes()} ops in {problem.num_nodes} groups; "
              f"{problem.num_devices} devices ({the_cluster.name}, step times {kind}); reward {reward}")

    # Baselines first: they are seconds of work and their best placements seed the search.
    from placer.search.baselines import run_baseline

    start = time.perf_counter()
    candidates: list[Candidate] = []
    for name in baselines:
        res = run_baseline(name, problem, grouping.graph, seed=seed, captured=captured,
                           op_to_group=grouping.op_to_group)
        candidates.append(Candidate(name, res.placement, res.search_time, res.evaluated,
                                    res.reason, history=list(res.history)))
    seconds["baselines"] = time.perf_counter() - start
    from envs.sim.simulator import simulate

    if not any(simulate(problem, c.row).fits for c in candidates if c.row is not None):
        # No baseline fits: say now, before the search, whether anything can and what is needed.
        from placer.memory_fit import check_memory_fits, memory_needs

        check_memory_fits(problem)
        log.warning("no baseline placement fits in device memory; %s", memory_needs(problem)[1])

    initial = [c.row for c in candidates if c.row is not None]
    if resume and out_path is not None:
        previous = _resume_row(out_path, captured, grouping, problem)
        if previous is not None:
            initial.insert(0, previous)

    # placement.json is written only once the winner passed the numerical check; until
    # then the best so far lives in best_placement.json (which --resume reads too).
    best_so_far_file = out_path / "best_placement.json" if out_path is not None else None

    def placement_of(row: np.ndarray, meta: Mapping[str, Any]) -> Placement:
        return _op_placement(row, problem, grouping, captured, the_cluster, spec, meta)

    def save_measured_best(rec: Any) -> None:
        # Hybrid: a new measured best goes to disk at once, so Ctrl-C keeps it.
        if best_so_far_file is not None:
            meta = {"step_time": rec.step_time, "source": "measured", "method": f"placer ({agent})"}
            save_placement(placement_of(rec.row, meta), best_so_far_file)

    the_measurer = None
    if not the_cluster.simulated and (reward != "simulated" or measurer is not None
                                      or isinstance(source, (str, os.PathLike))):
        from placer.measurement import make_measurer

        the_measurer = make_measurer(the_cluster, source, model_args, problem, grouping.expand,
                                     captured.fingerprint, backend=measurer, timeout_s=measure_timeout)
    try:
        start = time.perf_counter()
        if the_measurer is not None and budget.seconds is not None:
            # A measurement (a hang, say) may not outlast the search's budget.
            the_measurer.set_deadline(time.monotonic() + budget.seconds)
        # The search keeps its best placement so far (op level) in out_dir/best_placement.json.
        search_result, rounds = _search_with_reward(
            reward, the_measurer, problem, agent=agent, budget=budget, seed=seed, groups=groups, initial=initial,
            out_dir=out_path, progress=progress, fingerprint=captured.fingerprint, expand=grouping.expand,
            resume=resume, save_best=save_measured_best,
        )
        seconds["search"] = time.perf_counter() - start
        if the_measurer is not None:
            the_measurer.set_deadline(None)  # confirming: each run bounded by measure_timeout
        agent_row = search_result.best_row
        if reward == "hybrid" and the_measurer is not None:
            agent_row = _hybrid_agent_row(the_measurer, search_result,
                                          interrupted=search_result.stop_reason == "interrupted")
        candidates.append(Candidate(
            f"placer ({agent})", agent_row, seconds["search"], search_result.evaluated,
            f"stopped: {search_result.stop_reason}", history=list(search_result.history),
        ))
        measurement = None
        if the_measurer is not None:
            from placer.measurement import confirm_candidates, mark_measured, single_device_rows, summarize

            start = time.perf_counter()
            if search_result.stop_reason == "interrupted":
                mark_measured(the_measurer, candidates)  # Ctrl-C: no more runs, use what was measured
            else:
                confirm_candidates(the_measurer, candidates, extra_rows=single_device_rows(problem))
            measurement = summarize(the_measurer, reward, rounds)
            seconds["measure"] = time.perf_counter() - start
    finally:
        if the_measurer is not None:
            the_measurer.close()

    table = comparison_table(problem, candidates)
    if the_measurer is not None:
        from placer.measurement import measured_speedups

        table = measured_speedups(table, the_measurer)
    fitting = table[table["fits"]]
    if fitting.empty:
        from placer.memory_fit import memory_needs

        raise PlacerError(f"no method found a placement that fits in device memory: {memory_needs(problem)[1]}")
    winning_row = pick_winner(fitting)
    winner_name = str(winning_row["method"])
    winner = next(c for c in candidates if c.method == winner_name)
    step_time = float(winning_row["step_time"])
    source_label = str(winning_row["source"])
    placement = placement_of(winner.row, {"step_time": step_time, "source": source_label, "method": winner_name,
                                          "reward": reward})
    if best_so_far_file is not None:
        save_placement(placement, best_so_far_file)

    report = None
    if check:
        start = time.perf_counter()
        report = check_placement(spec, captured, placement.assignment, real_devices=the_cluster.real_device_map())
        seconds["check"] = time.perf_counter() - start
        if not report.ok:
            raise PlacerError(f"the applied placement does not compute the same thing: {report.describe()}")

    result = OptimizeResult(
        placement=placement, step_time=step_time, source=source_label, cluster=the_cluster,
        problem=problem, group_row=np.asarray(winner.row), prepared=prepared, table=table,
        check=report, search=search_result, candidates=candidates, winner=winner_name, seconds=seconds,
        reward=reward, measurement=measurement,
    )
    if out_path is not None:
        result.save(out_path)
    return result


def pick_winner(fitting: pd.DataFrame) -> pd.Series:
    """The fastest fitting row; where some rows were measured, the fastest measured one.

    Measured and simulated step times are not comparable (the simulator leaves out the
    runtime's overheads), so once real measurements exist only they decide.
    """
    measured = fitting[fitting["source"] == "measured"]
    pool = measured if not measured.empty else fitting
    return pool.sort_values("step_time", kind="stable").iloc[0]


def _op_placement(row: np.ndarray, problem: PlacementProblem, grouping: Any, captured: Any,
                  cluster: Cluster, spec: ModelSpec, metadata: Mapping[str, Any]) -> Placement:
    group_placement = problem.array_to_placement(row)
    assignment = grouping.expand(group_placement)
    meta = {"model": spec.name, "cluster": cluster.name, "simulated_cluster": cluster.simulated,
            "real_devices": cluster.real_device_map()}
    meta.update(metadata)
    return Placement(assignment=assignment, fingerprint=captured.fingerprint,
                     devices=list(cluster.device_names), metadata=meta)


def _resume_row(out_dir: Path, captured: Any, grouping: Any, problem: PlacementProblem) -> np.ndarray | None:
    """The group-level row of the placement an earlier run left in ``out_dir`` (None if there is none)."""
    from placer.placement_file import PlacementFileError, load_placement

    paths = [p for p in (out_dir / "placement.json", out_dir / "best_placement.json") if p.exists()]
    if not paths:
        return None
    placement, first_error = None, None
    for path in paths:  # a corrupt file next to a valid one: resume from the valid one, and say so
        try:
            placement = load_placement(path, graph=captured, devices=problem.device_names)
            break
        except PlacementFileError as exc:
            first_error = first_error or exc
            log.warning("--resume: skipping %s: %s", path.name, exc)
    if placement is None:
        assert first_error is not None
        raise first_error
    group_placement = {}
    for op, group in grouping.op_to_group.items():
        group_placement.setdefault(group, placement.assignment[op])
    return problem.placement_to_array(group_placement)


def _check_reward_source(reward: str | None, model: Any, measurer: Any, agent: str) -> None:
    """Refuse reward/model/agent combinations that cannot work, before any long work."""
    if reward not in ("measured", "hybrid"):
        return
    if measurer is None and not isinstance(model, (str, os.PathLike)):
        raise OptionError(
            f"reward {reward!r} measures placements in worker processes that load the model themselves, so it "
            f"needs a model file or 'zoo:<name>', not an in-memory {type(model).__name__}; "
            "use reward 'simulated' or pass measurer="
        )
    if reward == "hybrid" and agent == "sequential":
        raise OptionError(
            "reward 'hybrid' recalibrates the one simulator an agent searches on, but the sequential agent runs "
            "several environments with a simulator each; use --reward measured or another --agent "
            "(hierarchical, flat, reinforce)"
        )


def _default_reward(cluster: Cluster, model: Any, measurer: Any) -> str:
    """``hybrid`` on real devices when placements can be measured, else ``simulated``."""
    if cluster.simulated or cluster.num_devices < 2:
        return "simulated"
    return "hybrid" if measurer is not None or isinstance(model, (str, os.PathLike)) else "simulated"


def _search_with_reward(reward: str, measurer: Any, problem: PlacementProblem, *, agent: str, budget: Budget,
                        seed: int, groups: int | None, initial: list[np.ndarray], out_dir: Path | None,
                        progress: bool, fingerprint: str, expand: Callable, resume: bool,
                        save_best: Callable | None) -> tuple[Any, list[dict[str, Any]]]:
    """Run the agent's search with ``reward``'s reward model; returns (search result, hybrid rounds)."""
    from placer.search.search import search

    kwargs: dict[str, Any] = {}
    rounds = None
    if reward == "measured":
        # Every batch of proposals is one measuring call: small batches, so the agent
        # learns between them.
        from placer.measurement import MEASURED_BATCH, MEASURED_IMITATION_STEPS

        kwargs = dict(env_kwargs={"reward_mode": "measured", "measurer": measurer}, num_envs=MEASURED_BATCH,
                      imitation_steps=MEASURED_IMITATION_STEPS)
    elif reward == "hybrid":
        from placer.measurement import HybridRounds

        rounds = HybridRounds(measurer, budget, on_best=save_best)  # owns the hybrid reward model
        kwargs = dict(env_kwargs={"reward_mode": rounds.reward_model}, callback=rounds)
    result = search(
        problem, agent=agent, budget=budget, seed=seed, out_dir=out_dir, initial_placements=initial,
        num_groups=groups, progress=progress, fingerprint=fingerprint, expand=expand,
        resume=resume and out_dir is not None, **kwargs,
    )
    return result, (rounds.log if rounds is not None else [])


def _hybrid_agent_row(measurer: Any, search_result: Any, interrupted: bool) -> np.ndarray | None:
    """Hybrid: the search's placement is the measured fastest of those it found.

    The search's own best is by simulated time, on a simulator that was recalibrated under
    it; it is measured too (unless the run was interrupted), then every measured candidate
    of the search competes on measured time.
    """
    row = search_result.best_row
    if row is not None and not interrupted:
        measurer.phase = "confirm"
        measurer.measure_rows(row[None])
        measurer.phase = "search"
    best = measurer.best()
    return best.row.copy() if best is not None else row


# --------------------------------------------------------------------------- distributed hook
# Devices named by rank ("cpu:0,cpu:1", "host:cpu:0") are worker processes of the
# torch.distributed runtime (envs.runtime.distributed, issue 10): the cluster is built from
# ping-pong measured links, and placements are measured through the runtime
# (placer.measurement.make_measurer).


def _is_rank_device_list(names: Sequence[str]) -> bool:
    from envs.hardware.rank_devices import is_rank_device_list

    return is_rank_device_list(list(names))


def _distributed_cluster(names: Sequence[str]) -> Cluster:
    from envs.hardware.rank_devices import RankDeviceError
    from envs.runtime.distributed.rank_cluster import rank_cluster

    try:
        return rank_cluster(list(names))
    except RankDeviceError as exc:
        raise OptionError(str(exc)) from exc
