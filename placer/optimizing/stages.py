"""The stages of ``placer.optimize``, each a small function over the frozen config and typed data.

    prepare   → Prepared run: devices resolved, model loaded, captured, profiled, grouped
    compile   → Compiled: the placement problem the search and the baselines score on
    baselines → BaselineRun: every baseline's placement (they seed the search)
    search    → Searched: the agent's best, with the reward the config asks for
    confirm   → Confirmed: on real devices the best candidates measured; the comparison
                table and the winner
    check     → the winner applied and compared with the original model
    write     → the :class:`~placer.result.OptimizeResult`, saved to ``out_dir``

:func:`placer.optimizing.run.run` chains them; a measurer (real devices) lives from the
search to the confirmation (:func:`measuring`). The stages' outputs are the dataclasses of
:mod:`placer.optimizing.stage_outputs`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.hardware.cluster import Cluster
from envs.runtime.check import CheckReport, check_placement, check_trainable
from envs.sim.optimizer_state import optimizer_state_kind
from envs.sim.problem_compile import compile_problem
from envs.sim.rank_compile import value_leaves
from envs.sim.simulator import simulate
from graphs.batch_agreement import batch_disagreement
from graphs.errors import PlacerError
from graphs.input_batch import batch_size_of, check_batch_dim
from graphs.inputs_fit import check_inputs_fit
from graphs.loss_targets import target_count
from graphs.model_file import ModelSpec, default_loss, default_optimizer, model_and_inputs
from graphs.pipeline import Prepared, load_source, prepare
from graphs.profile.batch_scaling import min_microbatch_samples
from graphs.profile.devices import resolve_devices
from placer.measuring.measurer import MeasuredPlacement, PlacementMeasurer
from placer.optimizing.config import OptimizeConfig
from placer.optimizing.devices import profiles_microbatches, resolve_cluster
from placer.optimizing.earlier_results import _result_files_in
from placer.optimizing.host_checks import within_host_memory
from placer.optimizing.resume import _resume_pipeline, _resume_rows, read_earlier_run
from placer.optimizing.stage_outputs import BaselineRun, Compiled, Confirmed, PreparedRun, Searched
from placer.optimizing.winner import _set_aside_inexact_splits, pick_winner
from placer.options import OptionError
from placer.out_dir import check_out_dir
from placer.report.compare import Candidate, comparison_table
from placer.result import OptimizeResult
from placer.search.agents.registry import get_agent
from placer.search.baselines.pipeline_rows import parallel_rows
from placer.search.config import SearchConfig, check_policy_readable
from placer.search.pipeline_search import DEFAULT_PIPELINE_PLACEMENTS
from placer.search.tracker import SearchResult
from placer.write_failure import OutputWriteError, new_run_in, rescue, save_best_so_far

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- stages


def prepare_run(config: OptimizeConfig) -> PreparedRun:
    """Check the output folder, resolve the devices and the reward, then load, capture, profile, group."""
    out_dir = check_out_dir(config.out_dir)
    if config.resume and out_dir is not None:
        policy = SearchConfig(agent=config.agent, out_dir=out_dir).policy_path
        if policy is not None and policy.exists():
            check_policy_readable(policy)
    cluster = resolve_cluster(config.devices, config.cluster, config.memory)
    if cluster.simulated:  # the check runs on these; a missing one must not wait for the search's end
        from envs.runtime.real_devices import check_real_devices

        check_real_devices(cluster.real_device_map(), f"cluster {cluster.name!r}")
    if config.reward not in (None, "simulated") and cluster.simulated:
        raise OptionError(
            f"reward {config.reward!r} needs real devices (--devices), but cluster {cluster.name!r} is simulated; "
            "use --reward simulated"
        )
    if config.groups is not None and config.groups < cluster.num_devices and get_agent(config.agent).hierarchical:
        # The grouper's action gives each group a device: fewer groups than devices cannot say
        # every placement (envs.gym.placement_env), found once the search ran.
        raise OptionError(f"--groups {config.groups} is fewer than the cluster's {cluster.num_devices} devices; the "
                          f"{config.agent} agent needs --groups {cluster.num_devices} or more")
    reward = config.reward or _default_reward(cluster, config)
    start = time.perf_counter()
    source: ModelSpec | str | os.PathLike = config.model if config.from_source else _to_spec(config)  # type: ignore[assignment]
    profile_devices = None if cluster.simulated else list(dict.fromkeys(
        d.real_device or d.name for d in cluster.devices  # rank workers share one real kind
    ))
    microbatches = profiles_microbatches(cluster)
    # A model the check cannot train (no parameters, a loss without gradient or not finite)
    # is refused here, not after the search: loaded once, checked, then captured and profiled.
    spec = load_source(source, config.model_args)
    if config.batch_dim is not None and config.batch_dim != spec.batch_dim:
        raise OptionError(f"batch_dim={config.batch_dim!r} was given, but {spec.path or spec.name} says "
                          f"batch_dim = {spec.batch_dim}; expected one batch dimension: set it in the file only")
    check_trainable(spec)
    level = logging.INFO if config.verbose else logging.DEBUG
    # Timing every op of a large model takes minutes on a CPU (the 8-layer paper NMT's 16,172
    # ops: several minutes here), with nothing else to print meanwhile: say what runs.
    log.log(level, "%s: capturing the model and timing each op's forward, backward and update on %s; a model "
            "profiled here before is read from the profile cache instead", spec.name,
            ", ".join(str(d) for d in resolve_devices(profile_devices)))
    prepared = prepare(spec, profile=True, devices=profile_devices,
                       cache_dir=config.cache_dir, leaf_modules=config.leaf_modules, microbatch_profile=microbatches)
    _log_profile(level, prepared)
    if microbatches:
        _log_microbatch_profile(config, prepared)
    return PreparedRun(cluster, reward, out_dir, source, prepared, time.perf_counter() - start,
                       _provenance(config, prepared.captured.leaf_paths))


def _provenance(config: OptimizeConfig, leaf_paths: tuple[str, ...]) -> dict[str, Any]:
    """``model_args`` (when they can be written as JSON), ``leaf_modules`` (the module paths
    kept whole, when there are any) and ``cache_dir`` (when given) for the placement file's
    metadata (:attr:`PreparedRun.provenance`): what ``apply`` and ``show`` capture the model
    again with."""
    out: dict[str, Any] = {}
    if leaf_paths:
        out["leaf_modules"] = list(leaf_paths)
    if config.model_args:
        try:
            json.dumps(dict(config.model_args))
            out["model_args"] = dict(config.model_args)
        except (TypeError, ValueError):
            log.debug("model arguments not recorded in the placement file: not JSON")
    if config.cache_dir is not None:
        out["cache_dir"] = str(Path(config.cache_dir).expanduser().resolve())
    return out


def compile_run(config: OptimizeConfig, run: PreparedRun) -> Compiled:
    """The placement problem of the prepared model on the run's cluster: its op graph executes,
    its groups are the placement unit (the problem show, the report and the benchmarks simulate)."""
    problem = compile_problem(run.captured.graph, run.cluster, optimizer=optimizer_state_kind(run.spec.optimizer_fn),
                              grouping=run.grouping, leaves=value_leaves(run.captured.gm))
    if run.cluster.simulated:
        kind = "step times simulated on cluster spec"
    elif run.reward == "measured":
        kind = "step times measured on real devices"
    else:  # the op costs were profiled there; a placement's step time is still the simulator's
        kind = "step times simulated from op costs profiled on the real devices"
        if run.reward == "hybrid":
            kind += ", recalibrated from measured ones"
    log.log(logging.INFO if config.verbose else logging.DEBUG,
            "%s: %d ops in %d groups; %d devices (%s, %s); reward %s", run.spec.name,
            run.captured.graph.number_of_nodes(), problem.num_nodes, problem.num_devices, run.cluster.name, kind,
            run.reward)
    return Compiled(run, problem)


def run_baselines(config: OptimizeConfig, compiled: Compiled) -> BaselineRun:
    """Every configured baseline on the problem: seconds of work, and their placements seed the search."""
    from placer.search.baselines import run_baseline

    start = time.perf_counter()
    run = compiled.run
    candidates = []
    for name in config.baselines:
        res = run_baseline(name, compiled.problem, run.grouping.graph, seed=config.seed, captured=run.captured,
                           op_to_group=run.grouping.op_to_group)
        candidates.append(Candidate(name, res.placement, res.search_time, res.evaluated,
                                    res.reason, history=list(res.history)))
    seconds = time.perf_counter() - start
    if not any(simulate(compiled.problem, c.row).fits for c in candidates if c.row is not None):
        # No baseline fits: say now, before the search, whether anything can and what is needed.
        from placer.memory_fit import check_memory_fits, memory_needs

        check_memory_fits(compiled.problem, compiled.run.cluster)
        log.warning("no baseline placement fits in device memory; %s", memory_needs(compiled.problem, compiled.run.cluster)[1])
    return BaselineRun(tuple(candidates), seconds)


@contextmanager
def measuring(config: OptimizeConfig, compiled: Compiled) -> Iterator[PlacementMeasurer | None]:
    """The measurer of a run on real devices (None when nothing is measured); closed on exit."""
    run = compiled.run
    if run.cluster.simulated or not (run.reward != "simulated" or config.measurer is not None or config.from_source):
        yield None
        return
    from placer.measuring.measurer import make_measurer

    measurer = make_measurer(run.cluster, run.source, config.model_args, compiled.problem, run.grouping.expand,
                             run.captured.fingerprint, backend=config.measurer, timeout_s=config.measure_timeout,
                             spec=run.spec, captured=run.captured)
    try:
        yield measurer
    finally:
        measurer.close()


def search_run(config: OptimizeConfig, compiled: Compiled, baselines: BaselineRun,
               measurer: PlacementMeasurer | None) -> Searched:
    """The agent's search from the baselines' placements, with the run's reward.

    The search keeps its best placement so far (op level) in ``out_dir/best_placement.json``;
    with the hybrid reward a new measured best goes there at once, so Ctrl-C keeps it.
    ``placement.json`` is written only once the winner passed the numerical check. On real
    devices no measurement may outlast the search's time budget.
    """
    from placer.search.search import search

    run = compiled.run
    initial = [c.row for c in baselines.candidates if c.row is not None]
    # Read once, now, for the rows and the pipeline alike: the search's first improvement may
    # replace best_placement.json (always, in a process that wrote it before), and a pipeline
    # it held was gone when the pipeline search came to read it.
    earlier = None
    if config.resume and run.out_dir is not None:
        earlier = read_earlier_run(run.out_dir)
        previous = _resume_rows(earlier, run.captured, run.grouping, compiled.problem)
        initial[:0] = previous
        if not previous and not _result_files_in(run.out_dir):
            log.warning("--resume: %s holds no earlier run (no placement or policy); starting fresh", run.out_dir)
    resumed_pipeline = _resume_pipeline(earlier, compiled.problem) if earlier is not None else None
    if run.out_dir is not None:
        new_run_in(run.out_dir)
    method = f"placer ({config.agent})"
    search_config = SearchConfig(
        agent=config.agent, budget=config.budget, seed=config.seed, out_dir=run.out_dir, num_groups=config.groups,
        progress=config.progress, fingerprint=run.captured.fingerprint, expand=run.grouping.expand,
        resume=config.resume and run.out_dir is not None, pretrained=config.pretrained,
        # The best so far is what an interrupted run leaves: `placer apply` must rebuild the
        # model (its arguments) and find its devices from it, as from placement.json.
        metadata=compiled.run_metadata(),
    )
    rounds = None
    if run.reward == "measured":
        # Every batch of proposals is one measuring call: small batches, so the agent
        # learns between them.
        from placer.measuring.measurer import MEASURED_BATCH, MEASURED_IMITATION_STEPS

        search_config = search_config.replace(
            env_kwargs={"reward_mode": "measured", "measurer": measurer}, num_envs=MEASURED_BATCH,
            imitation_steps=MEASURED_IMITATION_STEPS)
    elif run.reward == "hybrid":
        from placer.measuring.hybrid_rounds import HybridRounds

        if measurer is None:
            raise PlacerError("reward 'hybrid' needs a measurer of the real devices")

        def save_measured_best(rec: MeasuredPlacement) -> None:
            if run.out_dir is not None:
                meta = {"step_time": rec.step_time, "source": "measured", "method": method}
                save_best_so_far(compiled.op_placement(rec.row, meta), run.out_dir)

        rounds = HybridRounds(measurer, config.budget, on_best=save_measured_best)  # owns the hybrid reward model
        search_config = search_config.replace(env_kwargs={"reward_mode": rounds.reward_model})
    start = time.perf_counter()
    if measurer is not None and config.budget.seconds is not None:
        # A measurement (a hang, say) may not outlast the search's budget.
        measurer.set_deadline(time.monotonic() + config.budget.seconds)
    try:
        result = search(compiled.problem, search_config, initial_placements=initial, callback=rounds)
    except OSError as exc:
        # The tracker stopped on an unwritable best_placement.json (its placement rescued);
        # saving the policy into the same directory then failed too: report the first.
        if isinstance(exc.__context__, OutputWriteError):
            raise exc.__context__ from None
        raise
    seconds = time.perf_counter() - start
    if measurer is not None:
        measurer.set_deadline(None)  # confirming: each run bounded by measure_timeout
    row = result.best_row
    if run.reward == "hybrid" and measurer is not None:
        row = _hybrid_agent_row(measurer, result, interrupted=result.stop_reason == "interrupted")
    candidate = Candidate(method, row, seconds, result.evaluated, f"stopped: {result.stop_reason}",
                          history=list(result.history))
    return Searched(result, candidate, tuple(rounds.log) if rounds is not None else (), seconds, resumed_pipeline)


def confirm(config: OptimizeConfig, compiled: Compiled, baselines: BaselineRun, searched: Searched,
            measurer: PlacementMeasurer | None) -> Confirmed:
    """Measure the best candidates (real devices), compare every method, pick the winner.

    The winner goes to ``out_dir/best_placement.json``; ``placement.json`` is written by
    :func:`write`, after the check.

    Raises:
        PlacerError: no method found a placement that fits in device memory.
    """
    run = compiled.run
    candidates = [*baselines.candidates, searched.candidate]
    seconds: dict[str, float] = {}
    measurement = None
    if measurer is not None:
        from placer.measuring.confirm import confirm_candidates, mark_measured, single_device_rows

        start = time.perf_counter()
        if searched.result.stop_reason == "interrupted":
            mark_measured(measurer, candidates)  # Ctrl-C: no more runs, use what was measured
        else:
            # The search's measured placements (its rounds', or every proposal of a measured
            # search) compete again beside its pick: it kept the fastest of noisy runs.
            searched_rows = [r.row for r in measurer.records if r.valid and r.phase != "confirm"]
            confirm_candidates(measurer, candidates, extra_rows=single_device_rows(compiled.problem),
                               contenders=searched_rows, search=searched.candidate,
                               single=next((c for c in baselines.candidates if c.method == "single"), None))
        seconds["measure"] = time.perf_counter() - start
    table = comparison_table(compiled.problem, candidates)
    if measurer is not None:
        from placer.measuring.confirm import measured_speedups

        table = measured_speedups(table, measurer)
    # DDP, the pipeline partitioners and placer's pipeline search, simulated, beside the
    # placements (issue 16). A placement or a pipeline can win (placement.json holds either);
    # DDP and pipeline x DDP hybrids cannot be written: the final line recommends the fastest.
    resumed = searched.resumed_pipeline
    # Timed apart: with a placement budget the pipeline search simulates as many pipelines as
    # the search placements, and took longer than the placement search itself (a 535-op
    # transformer at --budget 20000: about 15 s against 1.3 s) without showing in -v's stages.
    start = time.perf_counter()
    table, pipelines = parallel_rows(table, compiled.problem, batch_size_of(run.spec.example_inputs, run.spec.batch_dim),
                                     search_budget=config.budget.placements or DEFAULT_PIPELINE_PLACEMENTS,
                                     seed=config.seed, initial=[resumed] if resumed is not None else [],
                                     min_samples=min_microbatch_samples(run.prepared.captured.graph),
                                     batch_refusal=batch_disagreement(run.spec.example_inputs, run.spec.batch_dim,
                                                                      target_count(run.spec.model)))
    seconds["pipelines"] = time.perf_counter() - start
    if measurer is not None:
        from placer.measuring.confirm import (
            confirm_data_parallel,
            confirm_one_process,
            confirm_pipelines,
            measured_first,
        )
        from placer.measuring.summary import summarize

        # Pipelined candidates are measured as pipelines (their un-pipelined assignment is
        # another program); only measured rows compete once some exist (pick_winner).
        start = time.perf_counter()
        if searched.result.stop_reason != "interrupted":
            table = confirm_pipelines(measurer, table, pipelines, compiled.op_pipeline)
            table = confirm_data_parallel(measurer, table)
            table = confirm_one_process(measurer, table)
        table = measured_first(table)
        seconds["measure"] += time.perf_counter() - start
        measurement = summarize(measurer, run.reward, list(searched.rounds))
    fitting = table[table["fits"] & table["kind"].isin(["placement", "pipeline", "ddp"])]
    if fitting.empty:
        from placer.memory_fit import memory_margins, memory_needs
        from placer.search.baselines.common import node_memory
        from placer.search.baselines.expert import contiguous_split

        # The needs alone can read as if the model fits (per device "at best" below every
        # limit) when what overflows is a device's working set or the optimizer step's
        # temporaries: say how far the closest placement is over, device by device (of the
        # search's best and the split of the groups' memory into equal contiguous runs).
        problem = compiled.problem
        rows = [contiguous_split(node_memory(problem), list(range(problem.num_devices)))]
        if searched.result.best_row is not None:
            rows.append(np.asarray(searched.result.best_row, dtype=np.int64))
        peaks = [simulate(problem, row).peak_memory for row in rows]
        peak = min(peaks, key=lambda p: float(np.max(p - problem.memory_capacity)))
        closest = ("; the closest placement tried (simulated) needs "
                   + memory_margins(problem.device_names, peak, problem.memory_capacity))
        raise PlacerError(f"no method found a placement that fits in device memory: "
                          f"{memory_needs(compiled.problem, compiled.run.cluster)[1]}{closest}")
    split_checks: dict[tuple[int, int], CheckReport] = {}
    fitting, table = _set_aside_inexact_splits(config, compiled, fitting, table, pipelines, split_checks)
    winning_row = pick_winner(fitting)
    step_time, source = float(winning_row["step_time"]), str(winning_row["source"])
    pipeline = pipelines.get(str(winning_row["method"]))
    if pipeline is not None:
        # A pipelined winner: its stages' devices (replica 0's) are its placement, which the
        # numerical check applies un-pipelined, and its batch split, checked apart.
        winner = Candidate(str(winning_row["method"]), compiled.problem.placement_to_array(pipeline.assignment()),
                           float(winning_row["search_time"]), int(winning_row["evaluated"]), str(winning_row["note"]))
        candidates.append(winner)
    else:
        winner = next(c for c in candidates if c.method == str(winning_row["method"]))
    assert winner.row is not None  # only rows that fit are in the table
    placement = compiled.op_placement(winner.row, {"step_time": step_time, "source": source,
                                                   "method": winner.method, "reward": run.reward}, pipeline)
    if run.out_dir is not None:  # the best so far; placement.json waits for the check
        save_best_so_far(placement, run.out_dir)
    return Confirmed(tuple(candidates), table, winner, step_time, source, placement, measurement, seconds,
                     split_checks)


def check_winner(config: OptimizeConfig, compiled: Compiled, confirmed: Confirmed) -> tuple[CheckReport | None, float]:
    """Apply the winner and compare outputs and gradients with the original model (None when off).

    A pipelined winner (``M`` micro-batches, ``R`` replicas) is also checked for what its
    batch split changes: the loss, gradients and buffers of ``R x M`` equal parts against the full batch's.

    On CPUs the check runs within the memory the machine has free
    (:func:`placer.optimizing.host_checks.within_host_memory`): a model too large to train
    twice side by side fails it with a message, where the kernel would have killed the process.

    Raises:
        PlacerError: the placed model computes something else; the pipeline's micro-batches
            change the result (BatchNorm statistics); the original model's own loss is not finite;
            the check ran out of host memory.
    """
    if not config.check:
        return None, 0.0
    run = compiled.run
    start = time.perf_counter()
    pipeline = confirmed.placement.pipeline
    split = (pipeline.microbatches, pipeline.num_replicas) if pipeline is not None else (1, 1)
    with within_host_memory(run.cluster, "the numerical check", "a copy of the model and the placed copy side by side"):
        report = check_placement(run.spec, run.captured, confirmed.placement.assignment,
                                 real_devices=run.cluster.real_device_map(), microbatches=split[0],
                                 replicas=split[1], split=confirmed.split_checks.get(split))
    if report.original_nonfinite:
        # Both sides agree on it: the model diverges by itself, the placement is not to blame.
        raise PlacerError(f"the original model's loss is {report.original_nonfinite} of training on the example "
                          f"inputs (the model itself, with its optimizer); expected finite values. Check: "
                          f"{report.describe()}")
    if not report.placement_ok:
        raise PlacerError(f"the applied placement does not compute the same thing: {report.describe()}")
    if not report.split_ok:
        # No other candidate is checked or written in its place: placement.json stays unwritten.
        raise PlacerError(f"the winner {confirmed.winner.method!r} is a pipeline, and its {report.describe_split()}; "
                          "expected a model that computes each sample on its own (BatchNorm frozen in eval mode, or "
                          "GroupNorm/LayerNorm) for a pipeline or DDP; placement.json not written")
    return report, time.perf_counter() - start


def write(config: OptimizeConfig, compiled: Compiled, searched: Searched, confirmed: Confirmed,
          check: CheckReport | None, seconds: Mapping[str, float]) -> OptimizeResult:
    """The result; with an ``out_dir``, the placement, report and pictures written there.

    Raises:
        OutputWriteError: ``out_dir`` could not be written; the placement was saved elsewhere.
    """
    run = compiled.run
    result = OptimizeResult(
        placement=confirmed.placement, step_time=confirmed.step_time, source=confirmed.source, cluster=run.cluster,
        problem=compiled.problem, group_row=np.asarray(confirmed.winner.row), prepared=run.prepared,
        table=confirmed.table, check=check, search=searched.result, candidates=list(confirmed.candidates),
        winner=confirmed.winner.method, seconds=dict(seconds), reward=run.reward, measurement=confirmed.measurement,
        out_dir=run.out_dir,
    )
    if run.out_dir is not None:
        try:
            result.save(run.out_dir)
        except OSError as exc:  # a full disk, a directory made read-only during the run
            raise rescue(confirmed.placement, run.out_dir, exc) from exc
    return result


# ----------------------------------------------------------------------------- helpers


def _to_spec(config: OptimizeConfig) -> ModelSpec:
    model = config.model
    if not isinstance(model, torch.nn.Module):
        raise OptionError(f"expected a torch.nn.Module, a model file path or 'zoo:<name>'; got {type(model).__name__}")
    if config.example_inputs is None:
        raise OptionError("optimize(model, example_inputs, ...) needs example inputs for an nn.Module")
    label = type(model).__name__
    model, inputs = model_and_inputs(model, config.example_inputs, config.loss_fn is not None, "example_inputs")
    batch_dim = check_batch_dim(config.batch_dim or 0, inputs)
    check_inputs_fit(model, inputs, label)
    return ModelSpec(model=model, example_inputs=inputs, loss_fn=config.loss_fn or default_loss,
                     optimizer_fn=config.optimizer_fn or default_optimizer, name=label, batch_dim=batch_dim)


#: A fresh profile that took longer than this many seconds is reported, with where it is kept.
SLOW_PROFILE_S = 10.0


def _log_profile(level: int, prepared: Prepared) -> None:
    """Say how long a fresh profile took when it was long, and that the next run reads it back."""
    seconds = prepared.seconds.get("profile", 0.0)
    info = prepared.captured.graph.graph.get("profile_info") or {}
    fresh = [kind for kind, entry in info.items() if not entry.get("cached", False)]
    if fresh and seconds >= SLOW_PROFILE_S:
        log.log(level, "profiled %s in %.0f s; kept in the profile cache, so the next run of this model reads it",
                ", ".join(fresh), seconds)


def _log_microbatch_profile(config: OptimizeConfig, prepared: Prepared) -> None:
    """Say what the micro-batch profile measured and what it cost. Why it was not taken is
    already the profiler's warning (:mod:`graphs.profile.batch_scaling`), said once."""
    scaling = prepared.captured.graph.graph.get("batch_scaling") or {}
    if "ratio" in scaling:
        log.log(logging.INFO if config.verbose else logging.DEBUG,
                "micro-batch profile (the fixed part of every op, for pipelines and DDP): batch %d of %d, %.1f s%s",
                scaling["batch"], scaling["full_batch"], prepared.seconds.get("microbatch_profile", 0.0),
                " (cached)" if scaling.get("cached") else "")


def _default_reward(cluster: Cluster, config: OptimizeConfig) -> str:
    """``hybrid`` on real devices when placements can be measured, else ``simulated``."""
    if cluster.simulated or cluster.num_devices < 2:
        return "simulated"
    return "hybrid" if config.measurer is not None or config.from_source else "simulated"


def _hybrid_agent_row(measurer: PlacementMeasurer, result: SearchResult, interrupted: bool) -> np.ndarray | None:
    """Hybrid: the search's placement is the measured fastest of those it found.

    The search's own best is by simulated time, on a simulator that was recalibrated under
    it; it is measured too (unless the run was interrupted), then every measured candidate
    of the search competes on measured time.
    """
    row = result.best_row
    if row is not None and not interrupted:
        measurer.phase = "confirm"
        measurer.measure_rows(row[None])
        measurer.phase = "search"
    best = measurer.best()
    return best.row.copy() if best is not None else row

