"""Measured step time of placements through the multi-process runtime.

A :class:`DistributedMeasurer` implements the :class:`envs.runtime.measurer.Measurer`
protocol: warm-up steps, then the median of timed steps (the one step timer,
:func:`envs.runtime.step_timer.time_steps`, on every rank), each candidate bounded by a
time-out, results in the one :class:`~envs.runtime.measurer.MeasureCache`. A step is a
distributed one: every rank runs its stages of the split placement, and a timed step
starts and ends with a barrier, so it lasts as long as the slowest rank.

Many placements are measured in one job (start-up with the torch import is seconds per
worker). A placement whose run fails — a worker that dies, hangs or cannot connect —
gets an invalid :class:`~envs.runtime.measure.MeasureResult` with the reason; every worker of
that job is killed, and the remaining placements go to a fresh job.

Pipelined placements (a :class:`envs.sim.pipeline_layout.Pipeline`: contiguous stages, ``M``
micro-batches, a schedule) are measured by :meth:`DistributedMeasurer.measure_pipelines`
through ``torch.distributed.pipelining`` (:func:`envs.runtime.pipeline.launcher.run_training`,
one job per pipeline, the model's own optimizer). Un-pipelined placements (node -> device)
stay on the point-to-point runtime (:mod:`envs.runtime.distributed.runtime`), because
``PipelineStage`` cannot run them: its stages talk to their neighbours only
(``stage.py``: stage ``s`` receives from ``s - 1`` and sends to ``s + 1``), so a placement
that sends back to an earlier rank (rnnlm's layer split, whose two ranks hand the LSTM
wavefront to each other every time step) is not a chain of stages, and without
micro-batches a chain keeps one rank busy at a time anyway. The rank simulator
(:mod:`envs.sim.ranks`) models that runtime, and its measured agreement is recorded
against it.

Example::

    with DistributedMeasurer("zoo:rnnlm", {"size": "small"}, "cpu:0,cpu:1") as m:
        [r] = m.measure([{node: "cpu:0" for node in names}])
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from envs.hardware.rank_devices import parse_rank_devices
from envs.runtime.distributed.launcher import run_job
from envs.runtime.measure import BUDGET_CUT, BUDGET_SPENT, budget_timeout, check_timeouts
from envs.runtime.measurer import MeasureCache, MeasureError, MeasureResult, check_timing, program_key
from envs.runtime.step_timer import MAX_REPEATS, MIN_TIMED_S, median_step_time, repeats_for
from graphs.graph_inputs import placeholder_values

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from envs.sim.pipeline_layout import Pipeline
    from graphs.capture import CapturedModel

__all__ = ["DistributedMeasurer"]


class DistributedMeasurer:
    """Measures placements over rank devices (``cpu:0,cpu:1``) with real worker processes.

    Args:
        model_source: model file path or ``"zoo:<name>"`` (workers load the code from it).
        model_args: model file keyword arguments (``{"size": "small"}``).
        devices: the rank device list; placements name these devices.
        warmup, repeats: untimed and timed steps per placement (``repeats`` at least).
        min_timed_s: the timed steps of a placement fill at least this many seconds, judged
            from its warm-up steps (:func:`envs.runtime.step_timer.repeats_for`), up to
            ``max_repeats``; 0 times exactly ``repeats`` (the benchmarks that fix a count).
        timeout_s: limit for one placement's steps; ``load_timeout_s`` for start-up.
        threads: torch threads per CPU worker.
        spec: an already loaded ModelSpec of the same source (its weights/inputs are shipped).
        fingerprint: the model fingerprint (workers check they captured the same model).
        captured: ``spec``'s CapturedModel, if the caller has one (else captured once, here).
        leaf_modules: module paths or class names kept whole when the model is captured here
            (without ``captured``); the ranks capture with ``captured.leaf_paths``.

    Attributes:
        deadline: a ``time.monotonic()`` instant no job may pass (the caller's budget);
            placements not measured by then come back invalid and are not cached.
    """

    def __init__(
        self,
        model_source: str,
        model_args: Mapping[str, Any] | None,
        devices: str | Sequence[str],
        warmup: int = 2,
        repeats: int = 5,
        min_timed_s: float = MIN_TIMED_S,
        max_repeats: int = MAX_REPEATS,
        timeout_s: float = 300.0,
        load_timeout_s: float = 300.0,
        threads: int = 1,
        spec: Any = None,
        fingerprint: str | None = None,
        captured: CapturedModel | None = None,
        leaf_modules: Sequence[str] = (),
    ) -> None:
        check_timing(warmup, repeats, min_timed_s, max_repeats)
        check_timeouts(timeout_s, load_timeout_s)
        if not isinstance(model_source, str):
            raise MeasureError(
                f"distributed measurement loads the model in every worker, so it needs a model file path or "
                f"'zoo:<name>', got {type(model_source).__name__}"
            )
        self.model_source, self.model_args = model_source, dict(model_args or {})
        self.devices = parse_rank_devices(devices)
        self.rank_of = {d.name: d.rank for d in self.devices}
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.min_timed_s, self.max_repeats = float(min_timed_s), int(max_repeats)
        self.timeout_s, self.load_timeout_s = float(timeout_s), float(load_timeout_s)
        self.threads = int(threads)
        self._spec, self.fingerprint = spec, fingerprint
        self._captured = captured
        self.leaf_modules = tuple(leaf_modules)
        self._ignored: frozenset[str] | None = None
        self.deadline: float | None = None
        self._cache = MeasureCache([d.name for d in self.devices], {
            "threads": self.threads, "warmup": self.warmup, "repeats": self.repeats, "runtime": "distributed",
            "min_timed_s": self.min_timed_s, "max_repeats": self.max_repeats})
        self._cache.set_fingerprint(fingerprint or "")
        #: By placement hash: per-rank figures of the timed steps (messages and bytes sent,
        #: seconds blocked in receives) and the plan's shape — why a placement is slow.
        self.details: dict[str, dict[str, Any]] = {}
        self.jobs = 0

    @property
    def spec(self) -> Any:
        if self._spec is None:
            from graphs.pipeline import load_source

            self._spec = load_source(self.model_source, self.model_args)
        return self._spec

    @property
    def captured(self) -> Any:
        """The captured model whose tensors and value shapes every job ships."""
        if self._captured is None:
            from graphs.capture import capture

            spec = self.spec
            self._captured = capture(spec.model, spec.example_inputs, leaf_modules=self.leaf_modules,
                                     name=spec.name, batch_dim=spec.batch_dim)
        return self._captured

    @property
    def ignored_nodes(self) -> frozenset[str]:
        """The model inputs (placeholders): every rank holds them (:mod:`envs.runtime.split`),
        so where a placement puts them does not change the program that runs."""
        if self._ignored is None:
            self._ignored = frozenset(n.name for n in self.captured.gm.graph.nodes if n.op == "placeholder")
        return self._ignored

    def _ranks(self, placement: Mapping[str, str]) -> dict[str, int]:
        unknown = sorted({d for d in placement.values() if d not in self.rank_of})
        if unknown:
            raise MeasureError(
                f"placement uses device(s) {unknown} that are not among the workers {list(self.rank_of)}"
            )
        return {n: self.rank_of[d] for n, d in placement.items()}

    def clear_cache(self) -> None:
        """Forget every result, so the next call measures again."""
        self._cache.clear()

    def close(self) -> None:
        """Nothing to stop between calls: every job's workers are gone when ``measure`` returns."""

    def __enter__(self) -> DistributedMeasurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def measure(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """Measure placements (node → device name) in as few jobs as failures allow; never
        raises for a failed run (see :class:`envs.runtime.measurer.Measurer`).

        Raises:
            MeasureError: a placement names a device that is not a worker.
        """
        items = [{str(k): str(v) for k, v in p.items()} for p in placements]
        ranks = [self._ranks(p) for p in items]
        keys = [self._cache.key(dict(program_key(self, p))) for p in items]
        return self._cache.measure(keys, lambda todo: self._run([ranks[i] for i in todo], [keys[i] for i in todo]))

    def measure_pipelines(self, pipelines: Sequence[Pipeline],
                          expected_s: Sequence[float] | None = None) -> list[MeasureResult]:
        """Measure pipelined placements through ``torch.distributed.pipelining`` (module doc),
        pipeline x DDP hybrids included (one process per stage of every replica):
        per pipeline one job of ``warmup`` and :meth:`timed_steps` training steps with the
        model's optimizer (``expected_s``: each pipeline's expected step, e.g. the simulator's
        scaled by the measurements so far), the median of the timed steps (each the slowest
        rank's). A pipeline that is refused
        (``M`` not dividing the batch, a data-dependent boundary shape) or whose job fails comes
        back invalid with the reason; results are cached like placements.

        Raises:
            MeasureError: a stage on a device that is not a local worker.
        """
        import json

        local = {d.name for d in self.devices if d.local}
        for p in pipelines:
            unknown = sorted({d for devs in (p.devices, *p.replicas) for d in devs} - local)
            if unknown:
                raise MeasureError(f"pipeline stage device(s) {unknown} are not among the local workers "
                                   f"{sorted(local)}; pipelines are measured on this machine")
        keys = [self._cache.key(p.assignment(), pipeline=json.dumps(p.to_dict(), sort_keys=True)) for p in pipelines]
        note = (f"{{}} worker processes ({self.threads} thread(s) each), torch.distributed.pipelining")

        def run(todo: Sequence[int]) -> list[MeasureResult]:
            return [self._training_job(pipelines[i], None, note.format(pipelines[i].num_replicas * len(pipelines[i].ranks)),
                                       None if expected_s is None else expected_s[i])
                    for i in todo]

        return self._cache.measure(keys, run)

    def measure_data_parallel(self, expected_s: float | None = None) -> MeasureResult:
        """Measure DDP over the local workers: one replica per device, each on ``1/N`` of the batch
        (``run_training(pipeline=None, world=N)``), the model's optimizer, the median of the
        timed steps (each the slowest rank's; :meth:`timed_steps` of them at ``expected_s``).
        A refused or failed job comes back invalid with the reason; the result is cached like a
        placement's."""
        world = sum(1 for d in self.devices if d.local)
        note = f"{world} worker processes ({self.threads} thread(s) each), DDP"
        key = self._cache.key({}, data_parallel=world)
        return self._cache.measure([key], lambda todo: [self._training_job(None, world, note, expected_s)])[0]

    def one_process_threads(self) -> int | None:
        """The threads of the local CPU workers together, at most one per core this process may
        run on, when every worker is one (two at least): what one process of the unsplit model
        may use on the same cores (:meth:`measure_one_process`); None for GPUs or a single
        worker. Four workers on two cores share two: four threads in one process there ran a
        two-tower MLP in 39.1 ms, two threads in 32.0 (2026-12-07, measured)."""
        cpus = [d for d in self.devices if d.local and d.kind == "cpu"]
        if len(cpus) != len(self.devices) or len(cpus) < 2:
            return None
        return max(1, min(self.threads * len(cpus), len(os.sched_getaffinity(0))))

    def measure_one_process(self) -> MeasureResult:
        """The unsplit model in one worker process with the threads of all the workers together
        (:meth:`one_process_threads`; torch's intra-op threads): what the same cores give
        without placer, the figure a split over the workers has to beat. The same runtime and
        timing as a placement all on the first worker (one job, ``warmup`` steps, then as many
        timed ones as fill ``min_timed_s``); cached like a placement's.

        Raises:
            MeasureError: the workers are not all local CPUs, or there is one only.
        """
        threads = self.one_process_threads()
        if threads is None:
            raise MeasureError(f"one process over the workers' threads needs two local CPU workers or more; the "
                               f"workers are {[d.name for d in self.devices]}")
        note = f"1 worker process ({threads} threads), torch.distributed"
        key = self._cache.key({}, one_process=threads)
        alone = {n.name: 0 for n in self.captured.gm.graph.nodes}
        return self._cache.measure([key], lambda todo: self._run([alone], [key], [self.devices[0].name], threads,
                                                                 note))[0]

    def timed_steps(self, expected_s: float | None) -> int:
        """Timed steps of a training job whose step should take ``expected_s``: as many as fill
        ``min_timed_s`` (:func:`envs.runtime.step_timer.repeats_for`), ``repeats`` without an
        expectation. A job trains a fixed count, so it is chosen before it starts."""
        if expected_s is None or not math.isfinite(expected_s):
            return self.repeats
        return repeats_for(float(expected_s), self.repeats, self.min_timed_s, self.max_repeats)

    def _training_job(self, pipeline: Pipeline | None, world: int | None, note: str,
                      expected_s: float | None = None) -> MeasureResult:
        """One ``run_training`` job (a pipeline, or DDP over ``world`` processes) of
        ``warmup`` and :meth:`timed_steps` steps with the model's optimizer: the median timed
        step, or an invalid result with the reason (refused, failed, or no budget left to start it)."""
        from envs.runtime.pipeline.launcher import PipelineRunError, run_training
        from envs.sim.pipeline_layout import PipelineError

        timeout = budget_timeout(self.timeout_s + self.load_timeout_s, self.deadline)
        if timeout <= 0:
            return MeasureResult(step_time=float("inf"), valid=False, reason=BUDGET_SPENT, note=note, budget_cut=True)
        spec, gm = self.spec, self.captured.gm
        self.jobs += 1
        try:
            run_ = run_training(gm, placeholder_values(gm, spec.example_inputs), pipeline, world=world,
                                steps=self.warmup + self.timed_steps(expected_s), warmup=self.warmup,
                                optimizer=spec.optimizer_fn,
                                loss_fn=spec.loss_fn, threads=self.threads, timeout_s=timeout,
                                batch_dim=spec.batch_dim)
        except (PipelineError, PipelineRunError) as exc:
            return MeasureResult(step_time=float("inf"), valid=False, reason=str(exc), note=note)
        times = tuple(run_.step_times[self.warmup:])
        return MeasureResult(step_time=median_step_time(times), times=times, note=note)

    def _run(self, ranks: list[dict[str, int]], keys: list[str], devices: Sequence[str] | None = None,
             threads: int | None = None, note: str | None = None) -> list[MeasureResult]:
        """Measure placements (node -> rank) in as few jobs as failures allow, over ``devices``
        (default: every worker) with ``threads`` each (default: the measurer's)."""
        devices = [d.name for d in self.devices] if devices is None else list(devices)
        threads = self.threads if threads is None else threads
        results: list[MeasureResult | None] = [None] * len(ranks)
        note = note or f"{len(devices)} worker processes ({threads} thread(s) each), torch.distributed"
        while True:
            pending = [i for i, r in enumerate(results) if r is None]
            if not pending:
                break
            if budget_timeout(1.0, self.deadline) <= 0:
                for i in pending:
                    results[i] = MeasureResult(step_time=float("inf"), valid=False, reason=BUDGET_SPENT,
                                               note=note, budget_cut=True)
                break
            tasks = [{"kind": "measure", "ranks": ranks[i], "warmup": self.warmup, "repeats": self.repeats,
                      "min_timed_s": self.min_timed_s, "max_repeats": self.max_repeats} for i in pending]
            self.jobs += 1
            out = run_job(self.spec, self.model_source, devices, tasks,
                          model_args=self.model_args, threads=threads, timeout_s=self.timeout_s,
                          load_timeout_s=self.load_timeout_s, fingerprint=self.fingerprint,
                          captured=self.captured, deadline=self.deadline)
            for j, i in enumerate(pending):
                per_rank = out.results[j]
                if per_rank is not None:
                    # A step lasts as long as its slowest rank (the barriers make them equal).
                    times = tuple(max(r["times"][s] for r in per_rank) for s in range(len(per_rank[0]["times"])))
                    results[i] = MeasureResult(step_time=median_step_time(times), times=times, note=note)
                    self.details[keys[i]] = {
                        "plan": per_rank[0].get("describe", ""),
                        **{k: [r.get(k) for r in per_rank]
                           for k in ("messages_sent", "bytes_sent", "recv_wait_s", "cpu_s")},
                    }
                elif j == out.failed_task:
                    cut = self.deadline is not None and budget_timeout(1.0, self.deadline) <= 0
                    reason = BUDGET_CUT if cut else out.error
                    results[i] = MeasureResult(step_time=float("inf"), valid=False, reason=reason,
                                               note=note, budget_cut=cut)
                # else: not reached because an earlier placement failed: the next job runs it
            if out.failed_task is None and any(results[i] is None for i in pending):
                raise MeasureError("internal error: a job ended without results or a failure")  # pragma: no cover
        return [r for r in results if r is not None]
