"""Run a pipelined placement (or DDP) as one process per stage device on this machine.

:func:`run_training` writes the job (the captured graph, the batch, the pipeline, the
optimizer) into a fresh job directory, starts ``python -m envs.runtime.pipeline.worker``
once per rank through one :class:`envs.runtime.supervisor.Supervisor` (one process group;
the workers die with this process), and waits. The rendezvous store and gloo listen on
``host`` only (127.0.0.1 unless the caller gives an address). A worker that dies ends the
job at once with :class:`PipelineRunError` naming its rank and how it ended (a rank killed
by a signal is blamed before the peers that lost their connection to it); a job past
``timeout_s`` is stopped, naming the ranks that had not finished. Either way every worker
is killed and reaped and the job directory removed, so nothing is left running or
listening.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from envs.hardware.rank_devices import RankDeviceError, parse_rank_devices
from envs.runtime.distributed.launcher import free_port
from envs.runtime.file_modules import write_file_modules
from envs.runtime.listening import nccl_environment
from envs.runtime.pipeline.stages import check_static_shapes, whole_pipeline
from envs.runtime.pipeline.worker import check_ddp_batch, check_optimizer, check_stage_devices
from envs.runtime.supervisor import Exit, Supervisor, make_job_dir, process_state
from envs.sim.hybrid import check_runnable
from envs.sim.pipeline_layout import Pipeline, PipelineError
from envs.sim.problem import PlacementProblem
from graphs.errors import PlacerError, one_line_reason
from graphs.input_batch import batch_size_of, batch_slice
from graphs.portable_graph import PortableGraph, portable_pickle

__all__ = ["PipelineRunError", "TrainingRun", "PipelineJob", "check_port", "run_training", "write_job", "read_results"]

_POLL_S = 0.05

log = logging.getLogger(__name__)


#: ``(name, keyword arguments)`` (``sgd``, ``adam``, ``adamw``) or a model file's ``get_optimizer(params)``.
OptimizerSpec = tuple[str, dict[str, Any]] | Callable[..., torch.optim.Optimizer]


class PipelineRunError(PlacerError, RuntimeError):
    """A pipelined or DDP job that failed: the message names the rank and why."""


@dataclass
class TrainingRun:
    """What the ranks reported.

    Attributes:
        losses: the loss of each step (mean over micro-batches / replicas).
        grads: parameter name -> gradient after the first step's backward.
        params: parameter name -> value after the last step.
        step_times: per step, the slowest rank's seconds.
        cpu_times: per step, the CPU seconds of all ranks together (every thread of each process).
        rank_cpu_times: per rank, its CPU seconds of each step (an unbalanced split shows here).
        listening: per rank, the addresses it listened on.
        tied_gap: for parameters held by several ranks (tied weights), the largest absolute
            difference between the copies after the last step (0.0: the copies stayed equal).
        held_param_bytes: per rank, the bytes of every parameter alive in its process once
            its stages were built, less those its imports of the model files made (a pipeline
            rank holds its stages' own, not the model's).
    """

    losses: list[float]
    grads: dict[str, torch.Tensor]
    params: dict[str, torch.Tensor]
    step_times: list[float]
    cpu_times: list[float] = field(default_factory=list)
    listening: dict[int, list[str]] = field(default_factory=dict)
    tied_gap: dict[str, float] = field(default_factory=dict)
    rank_cpu_times: dict[int, list[float]] = field(default_factory=dict)
    held_param_bytes: dict[int, int] = field(default_factory=dict)


def _blame(failures: list[Exit], job_dir: Path) -> str:
    # A rank killed by a signal is the cause; its peers only lost their connection to it.
    failures = sorted(failures, key=lambda e: (e.code >= 0, e.label))
    first = failures[0]
    rank = first.label.split()[-1]
    err = job_dir / f"error-{rank}.txt"
    detail = ""
    if err.exists():
        detail = ": " + err.read_text().splitlines()[0][:300]
    return f"{first.label} {first.reason}{detail}"


def _untyped(gm: fx.GraphModule) -> fx.GraphModule:
    # A captured graph's type annotations ("torch.Tensor | None") are strings that
    # GraphModule's pickling cannot import; they only annotate the generated code.
    if any(n.type is not None for n in gm.graph.nodes):
        gm = copy.deepcopy(gm)
        for n in gm.graph.nodes:
            n.type = None
        gm.recompile()
    return gm


def _portable_loss(loss_fn: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor] | None:
    """``loss_fn`` as the workers can unpickle it: a function of a module they cannot import (a
    model file loaded by path) travels as its traced graph."""
    if loss_fn is None or isinstance(loss_fn, torch.nn.Module):
        return loss_fn
    module = getattr(loss_fn, "__module__", None)
    if module is not None and module != "__main__" and _importable(module):
        return loss_fn
    return _untyped(fx.symbolic_trace(loss_fn))


def _importable(module: str) -> bool:
    # find_spec raises rather than answers for a script's __main__ (its __spec__ is None: a
    # loss given to placer.optimize from a script failed every measured pipeline and DDP with
    # "ValueError: __main__.__spec__ is None") and for a module whose parent package is gone.
    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):
        return False


def write_job(job_dir: str | Path, gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], pipeline: Pipeline | None,
              steps: int = 3, optimizer: OptimizerSpec = ("sgd", {"lr": 0.1}),
              loss_fn: Callable[..., torch.Tensor] | None = None, threads: int = 1, timeout_s: float = 120.0,
              warmup: int = 0, batch_dim: int = 0) -> Path:
    """Write the job file every rank reads (``job_dir/job.pt``); for ``torchrun`` runs (docs/distributed.md).

    ``batch_dim``: the inputs' batch dimension (:attr:`graphs.model_file.ModelSpec.batch_dim`),
    along which replicas and micro-batches take their share.

    ``warmup``: the first steps are untimed warm-up; the later ones run with Python's
    collector's older objects frozen, as every timed step (:func:`graphs.gc_pause.frozen_gc`).

    Raises:
        PipelineError: ``steps`` is not a positive whole number (with none, the ranks would
            report no gradients, and a reused folder another job's).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PipelineError(f"a training job needs at least one step; got steps={steps!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps:
        raise PipelineError(f"warm-up steps must be a whole number from 0 to steps - 1 = {steps - 1}; got warmup={warmup!r}")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / "job.pt"
    # DDP replicas, and a hybrid's stage replicas, need find_unused_parameters only where they hold a
    # parameter the loss does not reach; it costs every step (:func:`_reached_by_no_loss`). Found
    # once here, where the whole model and batch are, not by every rank.
    ddp = pipeline is None or pipeline.num_replicas > 1
    unused = _reached_by_no_loss(gm, inputs, loss_fn) if ddp else []
    gm, loss_fn = _untyped(gm), _portable_loss(loss_fn)
    # By node (graphs.portable_graph): pickled as a GraphModule, a graph torch.export captured
    # would come back re-traced under other node names, or not at all.
    torch.save({"gm": PortableGraph.of(gm), "inputs": dict(inputs), "pipeline": pipeline.to_dict() if pipeline else None,
                "steps": steps, "optimizer": optimizer, "loss_fn": loss_fn, "threads": threads,
                "timeout_s": timeout_s, "warmup": warmup, "batch_dim": batch_dim, "unused_parameters": unused},
               path, pickle_module=portable_pickle)
    write_file_modules(job_dir)
    for stale in job_dir.glob("grads-*.pt"):  # a reused job folder (torchrun's job/): not this job's
        stale.unlink()
    return path


def _reached_by_no_loss(gm: fx.GraphModule, inputs: Mapping[str, Any],
                        loss_fn: Callable[..., torch.Tensor] | None) -> list[str] | None:
    """The parameters of ``gm`` (by name) that the loss sends no gradient to, from one forward of
    the whole model on the full batch (:func:`envs.runtime.gradient_reach.parameters_without_gradient`).

    A stage replica wrapped in DDP with ``find_unused_parameters=True`` pays a search of its
    autograd graph and the reducer's bookkeeping every step, a cost the simulator does not
    charge: DDP of MLPs of 200 to 800 parameters (gloo on 2 local processes, 1 thread each) ran
    1.04-1.26x slower per step with it in every run (``benchmarks/bench_ddp_unused_search.py``,
    ``benchmarks/results/pipeline.md``; at 100 parameters within the noise).
    Every parameter the loss reaches gets a gradient in its stage (the gradients of the values a
    stage sends come back to it), so only a stage holding one of these needs the search (a DDP
    replica holds them all). None where that forward cannot run here (a model on ``meta``): every
    replica searches.
    """
    from envs.runtime.gradient_reach import parameters_without_gradient
    from graphs.graph_inputs import input_spec, model_args

    order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    try:
        return parameters_without_gradient(gm, model_args(input_spec(gm), [inputs[k] for k in order]), loss_fn)
    except Exception as exc:  # noqa: BLE001 - the search is the safe default
        log.info("every stage replica searches for unused parameters: one forward of the model did not run here (%s)",
                 one_line_reason(exc))
        return None


def read_results(job_dir: str | Path, world: int) -> TrainingRun:
    """The ranks' ``result-<rank>.pt`` of a finished job, merged."""
    results = [torch.load(Path(job_dir) / f"result-{r}.pt", weights_only=False) for r in range(world)]
    losses = next((r["losses"] for r in reversed(results) if r["losses"]), [])
    grads: dict[str, torch.Tensor] = {}
    params: dict[str, torch.Tensor] = {}
    tied_gap: dict[str, float] = {}
    for rank, r in enumerate(results):
        grads.update(torch.load(Path(job_dir) / f"grads-{rank}.pt", weights_only=False))  # its first step's
        for name, value in r["params"].items():
            if name in params:
                if params[name].shape != value.shape:
                    gap = float("inf")
                elif value.is_meta or params[name].is_meta:  # a template on meta: no values to differ
                    gap = 0.0 if value.is_meta and params[name].is_meta else float("inf")
                else:
                    gap = float((params[name] - value).abs().max())
                tied_gap[name] = max(tied_gap.get(name, 0.0), gap)
            params[name] = value
    steps = [max(r["step_s"][i] for r in results) for i in range(len(results[0]["step_s"]))]
    cpu = [sum(r["cpu_s"][i] for r in results) for i in range(len(results[0].get("cpu_s", [])))]
    return TrainingRun(losses, grads, params, steps, cpu, {r["rank"]: r.get("listening", []) for r in results},
                       tied_gap, {r["rank"]: list(r.get("cpu_s", [])) for r in results},
                       {r["rank"]: int(r.get("held_param_bytes", 0)) for r in results})


def resolved(host: str, port: int = 0) -> tuple:
    """The first stream address of ``host:port`` (``socket.getaddrinfo``).

    Raises:
        PipelineRunError: ``host`` does not resolve, naming it.
    """
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError) as exc:
        raise PipelineRunError(f"cannot resolve the rendezvous host {host!r}: {exc}; expected an address or a "
                               "host name of this machine (default 127.0.0.1)") from None


def check_job(gm: fx.GraphModule, pipeline: Pipeline | None, world: int | None, batch: int,
              optimizer: OptimizerSpec) -> None:
    """What can be refused before any process starts: stages naming nodes the model does not
    have or devices that are no rank device, CPU workers mixed with GPUs or a GPU this
    machine lacks (:func:`~envs.runtime.pipeline.worker.check_stage_devices`), a DDP world
    that does not divide the batch, an optimizer name the workers do not know.

    Raises:
        PipelineError: naming what is wrong and what was expected.
    """
    check_optimizer(optimizer)
    if pipeline is None:
        if world is not None and world >= 1:
            check_ddp_batch(batch, world)
        return
    nodes = {n.name for n in gm.graph.nodes}
    unknown = sorted(n for s in pipeline.stages for n in s if n not in nodes)
    if unknown:
        raise PipelineError(f"the pipeline names {len(unknown)} node(s) the model does not have, e.g. "
                            f"{unknown[:3]}; expected node names of the captured graph")
    try:
        devices = parse_rank_devices(list(pipeline.rank_devices))
    except RankDeviceError as exc:
        raise PipelineError(f"pipeline devices: {exc}") from None
    check_stage_devices(devices)


def check_port(host: str, port: int) -> int:
    """``port`` if this machine can listen on ``host:port`` now (rank 0 will, for the rendezvous).

    Raises:
        PipelineRunError: the port is out of range or in use, before any process starts.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise PipelineRunError(f"rendezvous port {port!r} is not a TCP port; expected an integer from 1 to 65535")
    family, kind, proto, _, where = resolved(host, port)
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as rank 0 binds it
        try:
            s.bind(where)
        except OSError as exc:
            raise PipelineRunError(f"cannot listen on {host}:{port} for the rendezvous: {exc.strerror}; expected a "
                                   "free port (or none: a free one is chosen)") from None
    return port


class PipelineJob:
    """A started job (:func:`run_training` starts and waits; tests use this to reach the pids)."""

    def __init__(self, gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], world: int, pipeline: Pipeline | None,
                 steps: int, optimizer: OptimizerSpec, loss_fn: Callable[..., torch.Tensor] | None,
                 threads: int, timeout_s: float, host: str, port: int | None = None, warmup: int = 0,
                 batch_dim: int = 0) -> None:
        self.world = world
        self.timeout_s = timeout_s
        if port is None:
            resolved(host)  # a PipelineRunError naming the host, not socket.gaierror from free_port
            port = free_port(host)
        else:
            port = check_port(host, port)
        self.job_dir = make_job_dir()
        write_job(self.job_dir, gm, inputs, pipeline, steps, optimizer, loss_fn, threads, timeout_s, warmup, batch_dim)
        self.sup = Supervisor()
        for r in range(world):
            env = {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": host,
                   "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads), **nccl_environment(host)}
            log = open(self.job_dir / f"rank-{r}.log", "wb")  # noqa: SIM115 - closed with the process
            self.sup.start(f"rank {r}", [sys.executable, "-m", "envs.runtime.pipeline.worker", str(self.job_dir)],
                           env=env, stdout=log, stderr=log)
            log.close()

    @property
    def pids(self) -> list[int]:
        return self.sup.pids

    def ready(self, rank: int) -> bool:
        """The rank has joined the process group."""
        return (self.job_dir / f"ready-{rank}").exists()

    def wait(self) -> TrainingRun:
        """Wait for every rank; the results, or :class:`PipelineRunError` (module doc)."""
        deadline = time.monotonic() + self.timeout_s
        try:
            while self.sup.running():
                failures = self.sup.failures()
                if failures:
                    raise PipelineRunError(f"the job failed: {_blame(failures, self.job_dir)}")
                if time.monotonic() > deadline:
                    late = [r for r in range(self.world) if not (self.job_dir / f"result-{r}.pt").exists()]
                    stopped = [r for r in late if process_state(self.pids[r]) == "T"]
                    raise PipelineRunError(f"the job timed out after {self.timeout_s:g}s; rank(s) {late} had not "
                                           "finished" + (f"; rank(s) {stopped} stopped (SIGSTOP or a debugger), "
                                                         "the others waiting for them" if stopped else ""))
                time.sleep(_POLL_S)
            failures = self.sup.failures()
            if failures:
                raise PipelineRunError(f"the job failed: {_blame(failures, self.job_dir)}")
            return read_results(self.job_dir, self.world)
        finally:
            self.close()

    def close(self) -> None:
        """Kill every worker and remove the job directory; idempotent."""
        self.sup.stop()
        shutil.rmtree(self.job_dir, ignore_errors=True)


def run_training(gm: fx.GraphModule, inputs: Mapping[str, torch.Tensor], pipeline: Pipeline | None = None,
                 world: int | None = None, steps: int = 3, optimizer: OptimizerSpec = ("sgd", {"lr": 0.1}),
                 loss_fn: Callable[..., torch.Tensor] | None = None, threads: int = 1, timeout_s: float = 120.0,
                 host: str = "127.0.0.1", port: int | None = None,
                 problem: PlacementProblem | None = None, warmup: int = 0, batch_dim: int = 0) -> TrainingRun:
    """Train ``steps`` steps of ``gm`` on ``inputs`` (placeholder name -> full batch) with
    ``pipeline`` (one process per stage device; a pipeline x DDP hybrid: one per stage device
    of every replica, each replica on its ``1/R`` of the batch, gradients averaged per stage
    across replicas) or, without one, DDP over ``world`` processes.

    Args:
        loss_fn: ``loss_fn(output, *inputs)`` (placer's contract); None: the graph's output is the loss.
        optimizer: (name in ``sgd``/``adam``/``adamw``, keyword arguments), or a function of the
            parameters that builds it (a model file's ``get_optimizer``; picklable).
        host: the address every listening socket binds to.
        port: the rendezvous port on ``host`` (default: a free one).
        problem: the placement problem compiled over the pipeline's devices, one node per op
            (no grouping), from the graph ``gm`` was captured with: when given, a
            pipeline whose stages do not fit their devices' memory is refused before starting
            (:func:`envs.sim.hybrid.check_runnable`).
        warmup: how many of the ``steps`` are untimed warm-up (the step times of all are
            returned; the later ones run as every timed step does, see :func:`write_job`).

    Raises:
        PipelineRunError: a rank died or the job timed out (module doc).
        PipelineError: ``R x M`` does not divide the batch, a value crossing a stage boundary
            has a shape that depends on the data, or a stage does not fit its device (all
            checked before starting).
    """
    batch = batch_size_of(dict(inputs), batch_dim) or 0
    check_job(gm, pipeline, world, batch, optimizer)
    if port is None:
        resolved(host)
    else:
        check_port(host, port)
    if pipeline is not None:
        pipeline.check_batch(batch)
        replicas = pipeline.replica_pipelines()
        if problem is not None:
            check_runnable(problem, [whole_pipeline(gm, p) for p in replicas], batch)
        # Every replica runs replica 0's stages on its own 1/R of the batch: check each slice.
        share = batch // len(replicas)
        for r in range(len(replicas)):
            check_static_shapes(gm, {k: batch_slice(v, batch, r * share, (r + 1) * share, batch_dim)
                                     for k, v in inputs.items()}, replicas[0], batch_dim)
        world = len(replicas) * len(pipeline.ranks)
    if world is None or world < 1:
        raise PipelineRunError("DDP needs world >= 1 processes")
    job = PipelineJob(gm, inputs, world, pipeline, steps, optimizer, loss_fn, threads, timeout_s, host, port, warmup,
                      batch_dim)
    return job.wait()
