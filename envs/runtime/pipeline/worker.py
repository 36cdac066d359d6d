"""One rank of a pipelined (or DDP) training job: ``python -m envs.runtime.pipeline.worker JOB_DIR``.

Started by :mod:`envs.runtime.pipeline.launcher` (one process per stage device, through the
supervisor) or by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).
The rendezvous store and gloo listen on ``MASTER_ADDR`` only (loopback by default:
:func:`envs.runtime.distributed.worker._rendezvous_store` and ``_bound_gloo``).

The job file (``job.pt``) holds the captured ``GraphModule``, the full batch of model inputs
by placeholder name, the pipeline (or none: DDP), the steps, the optimizer and the loss.
Pipeline: rank ``r`` builds the stage modules of its stages (stage ``s`` on rank
``s mod W``, torch's loop mapping), wraps each in ``PipelineStage`` in static mode (input
and output metadata from one micro-batch forward: dynamic mode would run BatchNorm on
uninitialised buffers) and runs the schedule's ``step`` per training step, then its
optimizer over its stages' parameters. A parameter read by stages on several ranks (tied
weights) has a copy on each; its gradient is summed over those ranks before the optimizer
step, so the copies stay equal. A pipeline x DDP hybrid (``replicas``) runs ``R x P``
ranks: replica ``r``'s pipeline rank ``l`` is global rank ``r * P + l``; each replica's
stages talk over the replica's own process group, take the replica's ``1/R`` of the batch,
and each stage module is wrapped in ``DistributedDataParallel`` over the process group of
the ``R`` ranks holding that stage (one group per pipeline rank): ``PipelineStage`` runs
every micro-batch but the last under ``no_sync()`` and the last one's backward with DDP's
reducer, so the stage's gradients are averaged over its replicas in buckets overlapped with
that backward (``stage.py``: ``backward_maybe_with_nosync``), as the simulator's rules
H2-H3 assume (:mod:`envs.sim.data_parallel`). DDP: rank ``r`` trains the whole model on its
``1/W`` of the batch under ``DistributedDataParallel``. Each rank writes ``result-r.pt``.

**BatchNorm.** With one micro-batch per replica (DDP, or a hybrid with ``M = 1``) every
BatchNorm in training mode is swapped for
:class:`~envs.runtime.replica_batch_norm.ReplicaBatchNorm` over a process group of the
stage's replicas, so it normalises by the whole batch's statistics, as the unsplit model
does and as the split check compared (``torch.nn.SyncBatchNorm`` would, on GPUs only). With
``M > 1`` a stage runs each micro-batch on its own; the check refuses that split.

**Devices.** A rank computes on its stage device (:func:`rank_device`): the CPU for a worker
``cpu:N``, GPU ``N`` for ``cuda:N``. Every rank a GPU: NCCL (``init_process_group`` bound to
the rank's GPU); every rank a CPU: gloo on ``MASTER_ADDR``. A job that mixes them is refused
(:func:`check_stage_devices`): ``PipelineStage`` sends its activations from the stage's
device, and gloo's point-to-point ops take CPU tensors only while NCCL's take GPU ones. A GPU
rank moves its stage modules (``PipelineStage`` does, and DDP's wrapper needs them there
first), the batch and the loss's target to its GPU (:func:`onto_device`: ``PipelineStage`` only
records its device; what the capture baked as a device — torch.export's ``device=cpu`` in
factory ops, an ``x.device`` crossing a stage boundary as a constant — follows the rank),
waits for the GPU before reading a step's time (``torch.cuda.synchronize``: kernels and
NCCL transfers are asynchronous; NCCL's streams included), and writes its results as CPU
tensors.
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # a rank process: Ctrl-C ends it by the signal from here on (supervisor.rank_dies_by_sigint)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import datetime
import gc
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from envs.runtime.distributed.stage_state import data_on
from envs.runtime.file_modules import load_file_modules
from envs.runtime.rank_optimizer import rank_optimizer
from envs.runtime.replica_batch_norm import (
    process_group_gather,
    replace_batch_norms,
    training_batch_norms,
    unsynced_batch_norms,
)
from envs.runtime.supervisor import worker_main
from envs.sim.pipeline_layout import Pipeline, PipelineError
from graphs.cpu_allocator import retain_freed_memory
from graphs.gc_pause import frozen_gc
from graphs.graph_inputs import input_spec, model_args
from graphs.input_batch import batch_size_of, batch_slice

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _schedule_class(name: str) -> Any:
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved_1f1b": ScheduleInterleaved1F1B}[name]


def check_optimizer(optimizer: Any) -> None:
    """Raise :class:`PipelineError` unless ``optimizer`` is ``(name, keyword arguments)`` with a
    name of :data:`OPTIMIZERS`, or a function of the parameters (a model file's ``get_optimizer``)."""
    if callable(optimizer):
        return
    name = optimizer[0] if isinstance(optimizer, (tuple, list)) and len(optimizer) == 2 else None
    if name not in OPTIMIZERS:
        raise PipelineError(f"unknown optimizer {optimizer!r}; expected (name, keyword arguments) with a name "
                            f"in {sorted(OPTIMIZERS)}, or a function of the parameters")


def check_stage_devices(devices: list[Any], gpus: int | None = None) -> None:
    """Raise :class:`PipelineError` unless the job's rank devices (:class:`~envs.hardware.rank_devices.RankDevice`)
    are all CPU workers or all GPUs, and every GPU on this machine (of ``gpus``, default
    ``torch.cuda.device_count()``) exists. See the module docstring for why a mix cannot run."""
    kinds = {d.kind for d in devices}
    if len(kinds) > 1:
        cpus = [d.name for d in devices if d.kind == "cpu"]
        cuda = [d.name for d in devices if d.kind == "cuda"]
        raise PipelineError(f"the pipeline mixes CPU workers ({', '.join(cpus)}) with GPUs ({', '.join(cuda)}): "
                            "torch.distributed.pipelining sends activations from each stage's device, gloo sends "
                            "CPU tensors only and NCCL GPU ones; expected every stage device a CPU worker (cpu:N) "
                            "or every one a GPU (cuda:N)")
    local_gpus = [d for d in devices if d.kind == "cuda" and d.local]
    if local_gpus:
        have = torch.cuda.device_count() if gpus is None else int(gpus)
        absent = [d.name for d in local_gpus if d.index >= have]
        if absent:
            expected = f"expected cuda:0 to cuda:{have - 1}" if have else "torch.cuda.device_count() is 0"
            raise PipelineError(f"the pipeline's GPU(s) {', '.join(absent)} are not on this machine, which has "
                                f"{have} GPU(s); {expected}")


def onto_device(stage: Any, device: torch.device) -> Any:
    """``stage`` (a :class:`~envs.runtime.pipeline.stages.StageModule`) computing on ``device``:
    its parameters and buffers moved there (``Module.to``: from the CPU to a GPU the same
    ``Parameter`` objects, ``nn.modules.module._apply``'s ``set_data`` path, which the
    tied-weight bookkeeping matches by identity), its graph's factory ops making their tensors
    there (torch.export bakes the capture's ``device=cpu``, fx's ``torch.arange(n)`` names none;
    a random draw stays where the original draws and is copied over, as ``apply`` does for one
    process: :func:`~envs.runtime.transfers.factories_where_placed`) and every device among the
    constants it rebuilds instead of receiving (an ``x.device`` read across a stage boundary,
    recorded on the CPU probe) replaced by ``device``."""

    def moved(value: Any) -> Any:
        if isinstance(value, torch.device):
            return device
        if isinstance(value, (tuple, list)):
            return type(value)(moved(v) for v in value)
        return value

    from envs.runtime.transfers import factories_where_placed

    factories_where_placed(stage.gm.graph, lambda n: (str(device), str(device)))
    stage.gm.recompile()
    stage.constants = {k: moved(v) for k, v in stage.constants.items()}
    # Module.to would copy the model's meta tensors too, which have no data (data_on).
    return stage._apply(lambda t: data_on(t, device))


def rank_device(pipeline: Pipeline, rank: int) -> torch.device:
    """The torch device global rank ``rank`` of ``pipeline``'s job computes on: its stages'
    device (:attr:`~envs.sim.pipeline_layout.Pipeline.rank_devices`), ``cpu`` for a worker ``cpu:N``,
    ``cuda:N`` for a GPU.

    >>> from envs.sim.pipeline import Pipeline
    >>> pipe = Pipeline(stages=(("a",), ("b",)), devices=("cuda:0", "cuda:1"), microbatches=2,
    ...                 schedule="gpipe", replicas=(("cuda:2", "cuda:3"),))
    >>> rank_device(pipe, 1), rank_device(pipe, 2)
    (device(type='cuda', index=1), device(type='cuda', index=2))
    """
    from envs.hardware.rank_devices import parse_rank_devices

    return torch.device(parse_rank_devices([pipeline.rank_devices[rank]])[0].torch_device)


def check_world(pipeline: Pipeline, world: int) -> None:
    """Raise :class:`PipelineError` unless the job has one rank per stage device of every replica."""
    n_rep, p_ = pipeline.num_replicas, len(pipeline.ranks)
    if world != n_rep * p_:
        raise PipelineError(f"the pipeline needs {n_rep} x {p_} ranks; the job has {world}")


def check_ddp_batch(batch: int, world: int) -> None:
    """Raise :class:`PipelineError` unless ``world`` DDP processes share the batch equally."""
    if batch % world:
        raise PipelineError(f"DDP over {world} processes needs a batch divisible by {world}; got {batch}")


def make_optimizer(optimizer: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
    """The job's optimizer over ``params`` (:func:`check_optimizer`), None where this process has
    nothing of them to update (:func:`envs.runtime.rank_optimizer.rank_optimizer`)."""
    check_optimizer(optimizer)
    if callable(optimizer):
        return rank_optimizer(optimizer, params)
    name, kwargs = optimizer
    return rank_optimizer(lambda ps: OPTIMIZERS[name](ps, **kwargs), params)


def tied_holders(specs: list[Any], rank_of: list[int], canonical: Mapping[int, str]) -> dict[str, tuple[int, ...]]:
    """``{parameter name: ranks}`` of the parameters that stages on more than one rank read
    (GPT-2's ``wte.weight``: the embedding in the first stage, the tied head in the last).
    ``canonical``: ``id(parameter)`` -> its one name (:func:`canonical_names`), so a weight tied
    under two names (``emb.weight`` and ``out.weight``) is recognised as one."""
    holders: dict[str, set[int]] = {}
    for spec in specs:
        for name, p in spec.gm.named_parameters():
            holders.setdefault(canonical.get(id(p), name), set()).add(rank_of[spec.index])
    return {name: tuple(sorted(ranks)) for name, ranks in sorted(holders.items()) if len(ranks) > 1}


def canonical_names(gm: torch.nn.Module) -> dict[int, str]:
    """``id(parameter)`` -> the name ``named_parameters`` gives it first: one name per tensor,
    however many modules hold it (a head whose weight is the embedding's)."""
    return {id(p): n for n, p in gm.named_parameters()}


def _tied_groups(tied: dict[str, tuple[int, ...]], world: int) -> dict[tuple[int, ...], Any]:
    """One process group per set of holding ranks. ``new_group`` is collective over the whole
    world and must be called in the same order everywhere: every rank creates every group,
    in sorted order, whether it belongs to it or not."""
    import torch.distributed as dist

    groups: dict[tuple[int, ...], Any] = {}
    for ranks in sorted(set(tied.values())):
        groups[ranks] = None if len(ranks) == world else dist.new_group(list(ranks))
    return groups


def replica_layout(num_replicas: int, ranks_per_replica: int) -> tuple[list[list[int]], list[list[int]]]:
    """``(replica groups, stage groups)`` of a pipeline x DDP hybrid's global ranks: replica
    ``r``'s pipeline rank ``l`` is global rank ``r * P + l``; a replica group holds one
    replica's ranks (its schedule's p2p), a stage group the ``R`` ranks running the same
    pipeline rank in every replica (its gradients' all-reduce)."""
    p = ranks_per_replica
    replicas = [[r * p + lr for lr in range(p)] for r in range(num_replicas)]
    stages = [[r * p + lr for r in range(num_replicas)] for lr in range(p)]
    return replicas, stages


def _new_groups(members: list[list[int]], world: int) -> list[Any]:
    """A process group per list of ranks (None: the whole world, the default group), created by
    every rank in the same order (``new_group`` is collective over the world)."""
    import torch.distributed as dist

    return [None if len(m) == world else dist.new_group(m) for m in members]


def _reduce_tied(params: dict[str, torch.nn.Parameter], tied: dict[str, tuple[int, ...]],
                 groups: dict[tuple[int, ...], Any], rank: int) -> None:
    """Sum the gradient of each tied parameter over the ranks holding a copy, so each copy gets
    the whole model's gradient and the identical optimizer steps keep the copies equal."""
    import torch.distributed as dist

    for name, ranks in tied.items():
        if rank not in ranks:
            continue
        p = params[name]
        if p.grad is None:  # a holder whose stages did not reach it contributes zeros
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=groups[ranks])


def _run_pipeline(job: dict[str, Any], pipeline: Pipeline, rank: int, world: int, res: dict[str, Any],
                  job_dir: Path, device: torch.device) -> None:
    """Train ``pipeline`` (the job's, checked against ``world`` by :func:`run_rank`) as rank ``rank`` on ``device``."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage
    from torch.nn.parallel import DistributedDataParallel

    from envs.runtime.pipeline.stages import (
        StageModule,
        boundary_metas,
        chunk_specs,
        microbatch,
        schedule_keys,
        sparse_batch_inputs,
        split_stages,
    )

    gm, inputs = job["gm"], job["inputs"]
    dim = job.get("batch_dim", 0)  # a job file written before it was recorded: dim 0
    batch = batch_size_of(dict(inputs), dim) or 0
    pipeline.check_batch(batch)
    m, s_, n_rep = pipeline.microbatches, pipeline.num_stages, pipeline.num_replicas
    p_ = len(pipeline.ranks)
    replica, local = divmod(rank, p_)
    replica_ranks, stage_ranks = replica_layout(n_rep, p_)
    replica_groups = _new_groups(replica_ranks, world) if n_rep > 1 else [None]
    stage_groups = _new_groups(stage_ranks, world) if n_rep > 1 else [None] * p_
    # One micro-batch per replica: each stage's BatchNorms take their statistics over the
    # stage's replicas (the full batch's, as the split check compared), over groups of their
    # own so that their small gathers do not queue behind DDP's buckets.
    norm_groups = ([dist.new_group(ranks) for ranks in stage_ranks]
                   if n_rep > 1 and m == 1 and training_batch_norms(gm) else None)
    # Replica r takes the r-th of R equal slices of the batch (DDP's DistributedSampler shards).
    share = batch // n_rep
    inputs = {k: batch_slice(v, batch, replica * share, (replica + 1) * share, dim) for k, v in inputs.items()}
    batch = share
    specs = split_stages(gm, pipeline)
    rank_of = [s % p_ for s in range(s_)]
    canonical = canonical_names(gm)  # the stages hold gm's own parameter objects
    tied_local = tied_holders(specs, rank_of, canonical)
    # Every rank creates every replica's tied groups, replica by replica, in the same order.
    tied_groups = [_tied_groups({n: tuple(r * p_ + x for x in hs) for n, hs in tied_local.items()}, world)
                   for r in range(n_rep)]
    tied = {n: tuple(replica * p_ + x for x in hs) for n, hs in tied_local.items()}
    groups = tied_groups[replica]
    mine = [spec for spec in specs if rank_of[spec.index] == local]
    own_memory(spec.gm for spec in mine)  # before DDP and PipelineStage take their tensors
    metas = boundary_metas(gm, microbatch(inputs, 0, m, dim), {v for spec in specs for v in spec.recv + spec.send})
    names = list(inputs)
    nesting = input_spec(gm)
    keys = schedule_keys(names)
    cut = chunk_specs({keys[k]: v for k, v in inputs.items()}, dim)
    cut_here = sparse_batch_inputs(inputs, dim)
    inputs = {keys[k]: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    stages = []
    for spec in mine:
        last = spec.index == s_ - 1
        plain = onto_device(StageModule(spec, last, m, names, job.get("loss_fn"), planned=metas, input_keys=keys,
                                         inputs_spec=nesting, cut_here=cut_here), device)
        mod: torch.nn.Module = plain
        if norm_groups is not None:
            replace_batch_norms(plain, process_group_gather(norm_groups[local]))
        if n_rep > 1 and any(p.requires_grad for p in plain.parameters()):
            # DDP over the stage's replicas: averaged gradients (each replica's loss is its
            # slice's mean, so the average is the full batch's gradient). Buffers stay per
            # replica (each normalises its own slice), as without DDP. A parameter off the
            # loss's autograd path gets no gradient: find_unused_parameters lets the reducer
            # finish without it, the same in every replica; it costs every step, so only a
            # stage holding one searches (the job's list; a job file without one, as before,
            # every stage). A stage with nothing to train (its layers frozen, or no parameters)
            # has no gradient to average, and DDP refuses it ("DistributedDataParallel is not
            # needed when a module doesn't have any parameter that requires a gradient"): it runs plain.
            unused = job.get("unused_parameters")
            searching = unused is None or any(canonical.get(id(p)) in unused for p in plain.parameters())
            _meta_state_ignored(plain)
            mod = DistributedDataParallel(plain, process_group=stage_groups[local],
                                          device_ids=[device] if device.type == "cuda" else None,
                                          broadcast_buffers=False, find_unused_parameters=searching)
        out_meta = (torch.empty((), device="meta", requires_grad=True) if last
                    else tuple(metas[v] for v in plain.send_tensors))
        # With a group, the stage's peers are group ranks (stage s -> s mod P in the group),
        # mapped to global ranks by dist.get_global_rank (stage.py, _resolve_peer_global_rank).
        stages.append(PipelineStage(mod, spec.index, s_, device,
                                    input_args=tuple(metas[v] for v in plain.recv_tensors), output_args=out_meta,
                                    group=replica_groups[replica]))
    # The rank keeps its own stages only: the whole model (every other stage's parameters and
    # buffers) would otherwise stay alive through the run, charged to no simulated rule (a
    # ResNet-50 rank holding 9 MiB of parameters kept all 98). fx modules hold reference
    # cycles (graph <-> owning module), hence the collection.
    del gm, specs
    job.pop("gm", None)
    gc.collect()
    res["held_param_bytes"] = held_parameter_bytes() - int(job.get("imported_param_bytes", 0))
    cls = _schedule_class(pipeline.schedule)
    # The last stage returns loss / M already: the schedule's loss is that value, unscaled.
    # The target is this module's own placeholder of the batch's size, cut along its dim 0.
    sched = cls(stages if pipeline.schedule == "interleaved_1f1b" else stages[0], m,
                loss_fn=lambda out, _target: out, scale_grads=False, kwargs_chunk_spec=cut)
    # By canonical name: a parameter read by two stages of this rank, or under two names, is
    # one tensor, optimised once.
    gms = [_stage_graph(st.submod) for st in stages]
    named = {canonical.get(id(p), n): p for gm_ in gms for n, p in gm_.named_parameters()}
    params = list(named.values())
    # A rank whose stages hold no parameter (reshapes, activations), or none the optimizer keeps, has nothing to step.
    opt = make_optimizer(job["optimizer"], params)
    has_last = any(spec.index == s_ - 1 for spec in mine)
    res["stages"] = [spec.index for spec in mine]
    res["replica"] = replica
    for step in _steps(job):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        losses: list[torch.Tensor] = []
        kw: dict[str, Any] = {"target": torch.zeros(batch, device=device), "losses": losses} if has_last else {}
        sched.step(return_outputs=False, **kw, **inputs)
        _reduce_tied(named, tied, groups, rank)
        if step == 0:
            _wait_for(device)  # the backward belongs to the step: the copy below would wait for it uncounted
        paused = save_first_gradients(job_dir, rank, named) if step == 0 else (0.0, 0.0)
        if opt is not None:
            opt.step()
        _wait_for(device)
        res["step_s"].append(time.perf_counter() - t - paused[0])
        res["cpu_s"].append(time.process_time() - c - paused[1])
        if has_last:
            total = sum(float(x.detach()) for x in losses)
            if n_rep > 1:  # the full batch's mean: the average of the replicas' means
                both = torch.tensor(total, dtype=torch.float64, device=device)
                dist.all_reduce(both, group=stage_groups[local])
                total = float(both) / n_rep
            res["losses"].append(total)
    # Not cloned (a CPU tensor's .cpu() is itself): nothing changes them before run_rank saves the result.
    res["params"] = {n: data_on(p.detach(), "cpu") for n, p in named.items()}


def _steps(job: Mapping[str, Any]) -> Iterator[int]:
    """The job's step indices; from its first timed step on (after ``warmup``), Python's
    collector leaves the objects alive then out of its walks, as every timed step
    (:func:`graphs.gc_pause.frozen_gc`; ``envs.runtime.step_timer``)."""
    steps, warmup = int(job["steps"]), int(job.get("warmup", 0))
    yield from range(min(warmup, steps))
    with frozen_gc():
        yield from range(warmup, steps)


def _wait_for(device: torch.device) -> None:
    """Block until ``device`` has run what was queued on it (a GPU's kernels and transfers are
    asynchronous: the step's time is read after them)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def own_memory(modules: Iterable[torch.nn.Module]) -> None:
    """Copy the tensors of ``modules`` (parameters, buffers, tensor constants) out of the job
    file's memory map into this process's own memory. :func:`run_rank` maps the file, so ranks
    on one host share its pages instead of each reading the whole model into memory of its
    own; a rank then owns only what it keeps, and trains it in private memory as the
    simulator counts it. Once nothing refers to the map (the other stages freed), it is
    released."""
    seen: set[int] = set()
    for module in modules:
        for sub in module.modules():
            for t in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
                if id(t) not in seen:
                    seen.add(id(t))
                    t.data = t.data.clone()
            for name, value in list(vars(sub).items()):
                if isinstance(value, torch.Tensor) and id(value) not in seen:  # fx's _tensor_constant
                    seen.add(id(value))
                    setattr(sub, name, value.clone())


def held_parameter_bytes() -> int:
    """Bytes of every ``nn.Parameter`` alive in this process (each storage once)."""
    storages = {}
    for obj in gc.get_objects():
        # type(), not isinstance(): Parameter's metaclass check on every object took twice as
        # long and warned on torch.distributed's deprecated names
        if type(obj) is torch.nn.Parameter:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


def save_first_gradients(job_dir: Path, rank: int, params: Mapping[str, torch.nn.Parameter]) -> tuple[float, float]:
    """Write the first step's gradients of ``params`` (name -> parameter; those with one) to
    ``grads-<rank>.pt`` before the optimizer step can change them (for the numerical check, :func:`envs.runtime.pipeline.launcher.read_results`);
    returns the (wall, CPU) seconds it took, which the step's timing leaves out. Kept in memory
    until the job's end, they were one more gradient set alive through every later step, which
    no simulated rule charges; written here, no copy of them is made."""
    wall, cpu = time.perf_counter(), time.process_time()
    tmp = job_dir / f".grads-{rank}.pt"
    torch.save({n: p.grad.detach().cpu() for n, p in params.items() if p.grad is not None}, tmp)
    os.replace(tmp, job_dir / f"grads-{rank}.pt")
    return time.perf_counter() - wall, time.process_time() - cpu


def _stage_graph(submod: torch.nn.Module) -> torch.fx.GraphModule:
    """The stage's GraphModule, inside its DDP wrapper if it has one."""
    inner = submod.module if isinstance(submod, torch.nn.parallel.DistributedDataParallel) else submod
    gm = getattr(inner, "gm", None)
    if not isinstance(gm, torch.fx.GraphModule):
        raise PipelineError(f"a pipeline stage holds {type(inner).__name__}, not a StageModule")
    return gm


def _run_ddp(job: dict[str, Any], rank: int, world: int, res: dict[str, Any], job_dir: Path) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    gm, inputs = job["gm"], job["inputs"]
    dim = job.get("batch_dim", 0)
    batch = batch_size_of(dict(inputs), dim) or 0
    check_ddp_batch(batch, world)
    shard = batch // world
    mine = {k: batch_slice(v, batch, rank * shard, (rank + 1) * shard, dim) for k, v in inputs.items()}
    own_memory([gm])
    loss_fn = job.get("loss_fn")
    order = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    nesting = input_spec(gm)  # the inputs by placeholder are leaves; the model and its loss take them nested
    # A parameter that gets no gradient stalls DDP's reducer ("Expected to have finished
    # reduction in the prior iteration"); the user's DDP of such a model needs the same flag.
    # The job lists them (None: not known, so search).
    unused = job.get("unused_parameters")
    if world > 1 and training_batch_norms(gm):  # every replica's BatchNorms normalise by the whole batch's statistics
        replace_batch_norms(gm, process_group_gather(dist.new_group(list(range(world)))))
    _meta_state_ignored(gm)
    model = DistributedDataParallel(gm, find_unused_parameters=unused is None or bool(unused))
    opt = make_optimizer(job["optimizer"], list(model.parameters()))
    for step in _steps(job):
        dist.barrier()
        t, c = time.perf_counter(), time.process_time()
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        args = model_args(nesting, [mine[k] for k in order])
        out = model(*args)
        loss = loss_fn(out, *args) if loss_fn is not None else out
        loss.backward()
        paused = save_first_gradients(job_dir, rank, dict(gm.named_parameters())) if step == 0 else (0.0, 0.0)
        if opt is not None:
            opt.step()
        res["step_s"].append(time.perf_counter() - t - paused[0])
        res["cpu_s"].append(time.process_time() - c - paused[1])
        total = loss.detach().clone()
        # the output (a language model's logits) would stay alive through the next forward
        del out, loss
        dist.all_reduce(total)
        res["losses"].append(float(total) / world)
    res["params"] = {n: p.detach() for n, p in gm.named_parameters()}  # saved before anything changes them


def load_job(job_dir: Path) -> dict[str, Any]:
    """The job file, its model mapped rather than read (``torch.load(mmap=True)``): each rank
    of a job on one host would otherwise hold the whole model in memory of its own until it
    frees the stages it does not run (N ranks, N copies); mapped, they share the file's pages
    and each copies out only what it keeps (:func:`own_memory`). The inputs are copied at
    once: a tensor left in the map keeps the whole map alive."""
    # On the CPU whatever the writer's devices: a rank moves only its own stages to its device.
    job = torch.load(job_dir / "job.pt", weights_only=False, mmap=True, map_location="cpu")
    job["inputs"] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in job["inputs"].items()}
    job["gm"] = job["gm"].module()  # graphs.portable_graph.PortableGraph: the graph, node for node
    # Under the job's process group a SyncBatchNorm would sync with every rank, whatever layers
    # they hold; the stages whose replicas do share a BatchNorm's batch swap it for a
    # ReplicaBatchNorm over their own group (replace_batch_norms).
    unsynced_batch_norms(job["gm"])
    return job


def run_rank(job_dir: Path, rank: int, world: int) -> None:
    """Join the job's process group, train its steps, write ``result-<rank>.pt``."""
    import torch.distributed as dist

    from envs.runtime.distributed.worker import _bound_gloo, _listening_addresses, _rendezvous_store

    load_file_modules(job_dir)
    # What the model files' own imports keep alive (a module-level model) is not the job's.
    imported = held_parameter_bytes()
    job = load_job(job_dir)
    job["imported_param_bytes"] = imported
    # One seed per rank: with one for all, DDP's replicas drew the same dropout mask for
    # sample i of each shard, and stages of equal shapes the same masks as one another.
    torch.manual_seed(int(job.get("seed", 0)) + rank)
    torch.set_num_threads(int(job.get("threads", 1)))
    retain_freed_memory()  # as the profile that priced this job ran (graphs.cpu_allocator)
    timeout = datetime.timedelta(seconds=float(job.get("timeout_s", 60)))
    pipeline = Pipeline.from_dict(job["pipeline"]) if job.get("pipeline") is not None else None
    device = torch.device("cpu")
    if pipeline is not None:
        from envs.hardware.rank_devices import parse_rank_devices

        check_stage_devices(parse_rank_devices(list(pipeline.rank_devices)))
        check_world(pipeline, world)
        device = rank_device(pipeline, rank)
    store = _rendezvous_store(rank, world, timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout, device_id=device)
    else:
        backend = _bound_gloo(os.environ.get("MASTER_ADDR", "127.0.0.1"))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    (job_dir / f"ready-{rank}").touch()
    res: dict[str, Any] = {"rank": rank, "losses": [], "step_s": [], "cpu_s": [], "params": {}}
    try:
        if pipeline is None:
            _run_ddp(job, rank, world, res, job_dir)
        else:
            _run_pipeline(job, pipeline, rank, world, res, job_dir, device)
        res["listening"] = _listening_addresses()
        tmp = job_dir / f".result-{rank}.pt"
        torch.save(res, tmp)
        os.replace(tmp, job_dir / f"result-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return worker_main("envs.runtime.pipeline.worker", run_rank, argv)


def _meta_state_ignored(module: torch.nn.Module) -> None:
    """Have DDP leave out the parameters and buffers the model keeps on meta (a template module
    whose parameters torch.func's functional_call replaces, PyTorch's model-ensembling recipe):
    they have no data to average, and DDP refused the module ("input module must be on the same
    type of devices, but input module parameters locate in {'meta', 'cpu'}")."""
    from torch.nn.parallel import DistributedDataParallel

    named = [*module.named_parameters(), *module.named_buffers()]
    meta = [name for name, t in named if t.is_meta]
    if meta:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, meta)


if __name__ == "__main__":
    sys.exit(main())
