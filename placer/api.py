"""Using a saved placement in one's own code: ``placer.load`` and ``placer.apply``.

Example::

    import placer
    placement = placer.load("out/placement.json", model=model, example_inputs=(x,))
    placed = placer.apply(model, placement, example_inputs=(x,))
    optimizer = torch.optim.SGD(placed.parameters(), lr=0.1)
    loss = placed(x).sum(); loss.backward(); optimizer.step()
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping
from typing import Any

import torch

from envs.hardware.rank_devices import is_rank_device_list
from envs.runtime.apply import apply_placement, realize_placement
from envs.runtime.transfers import to_device
from graphs.capture import CapturedModel, capture
from graphs.cpu_allocator import retain_freed_memory
from graphs.errors import PlacerError
from graphs.forward_inputs import positional_inputs
from graphs.graph_inputs import placeholder_values
from graphs.loss_targets import accepting_targets
from graphs.model_file import ModelSpec
from graphs.random_state import kept_random_state
from placer.optimizing.config import ClusterSource
from placer.placement_file import Placement, PlacementFileError, load_placement

log = logging.getLogger(__name__)


def real_devices_of(placement: Placement, cluster: ClusterSource | None = None) -> dict[str, str]:
    """Device name → torch device for a placement: from ``cluster``, else its recorded map, else identity."""
    if cluster is not None:
        from envs.hardware.loading import load_cluster

        return load_cluster(cluster).real_device_map()
    recorded = placement.metadata.get("real_devices")
    if isinstance(recorded, Mapping):
        # A map edited by hand that lacks a used device was reported as "devices that the
        # cluster does not define" of a cluster that defines them: the map is what is short.
        lacking = sorted(set(placement.assignment.values()) - {str(k) for k in recorded})
        if lacking:
            raise PlacementFileError(
                f"the placement's metadata 'real_devices' maps no real device for {lacking}, which its assignment "
                "uses; expected one for every device it uses (or name the cluster it was made for: --cluster, "
                "cluster=)")
        return {str(k): str(v) for k, v in recorded.items()}
    # No map (a file written before placer recorded one, or by hand): the cluster it names, as
    # `placer apply --help` says; a 4xK40 placement's 'gpu0' was taken for a torch device.
    named = placement.metadata.get("cluster_spec") or placement.metadata.get("cluster")
    if isinstance(named, str) and placement.metadata.get("simulated_cluster") is not False:
        from envs.hardware.cluster import ClusterSpecError
        from envs.hardware.loading import load_cluster

        try:
            return load_cluster(named).real_device_map()
        except ClusterSpecError:  # a real-device or rank cluster's name: not a preset
            pass
    return {d: d for d in placement.devices}


def _captured(model: torch.nn.Module | CapturedModel, example_inputs: Any = None) -> CapturedModel:
    if isinstance(model, CapturedModel):
        return model
    if not isinstance(model, torch.nn.Module):
        raise PlacerError(f"expected an nn.Module or a CapturedModel, got {type(model).__name__}")
    if example_inputs is None:
        raise PlacerError("example_inputs are needed to capture the model (the same ones the placement was made with)")
    # a dict by forward's parameter names as optimize took it; inputs beyond what forward()
    # takes are the loss targets the placement was made with
    inputs = positional_inputs(model, example_inputs, "example_inputs", targets=True)
    return capture(accepting_targets(model, len(inputs)), inputs)


@kept_random_state()
def load(path: str | os.PathLike, model: torch.nn.Module | CapturedModel | None = None, example_inputs: Any = None,
         cluster: ClusterSource | None = None) -> Placement:
    """Read a placement file; with ``model``, refuse one made for another model.

    Raises:
        PlacementFileError: malformed file, another model's placement, unknown devices.
    """
    captured = _captured(model, example_inputs) if model is not None else None
    placement = load_placement(path, graph=captured)
    if cluster is not None:
        devices = set(real_devices_of(placement, cluster))
        unknown = sorted(set(placement.assignment.values()) - devices)
        if unknown:
            raise PlacementFileError(f"placement uses device(s) {unknown} that cluster {cluster!r} does not define")
    return placement


@kept_random_state()
def apply(model: torch.nn.Module | CapturedModel, placement: Placement | str | os.PathLike, example_inputs: Any = None,
          cluster: ClusterSource | None = None, output_device: str | None = None) -> torch.fx.GraphModule:
    """The model with ``placement`` applied: a trainable GraphModule spread over the devices,
    in training mode even for a model handed over in eval mode, as :func:`placer.place`
    returns it; call ``.eval()`` on it for inference."""
    captured = _captured(model, example_inputs)
    if not isinstance(placement, Placement):
        placement = load_placement(placement, graph=captured)
    elif placement.fingerprint != captured.fingerprint:
        raise PlacerError(
            f"placement was made for model {placement.fingerprint}, not for this one ({captured.fingerprint})"
        )
    if placement.pipeline is not None:
        # What `placer apply` notes and placer.place logs: in one process a pipeline's stages run
        # one after the other on the whole batch, so its speed-up is not what this module shows.
        log.warning("the placement is %s; placer.apply runs its stages' assignment un-pipelined in this "
                    "process (run it as a pipeline with `placer apply` over worker processes or torchrun: "
                    "docs/distributed.md)", placement.pipeline.describe())
    return apply_placement(captured, placement.assignment, output_device=output_device,
                           real_devices=real_devices_of(placement, cluster))


def pipeline_run_mode(placement: Placement, cluster: ClusterSource | None = None) -> str | None:
    """How ``placement``'s pipeline is applied: ``"processes"`` when its stage devices are
    worker processes on this machine (``cpu:0,cpu:1``, a placement made over real rank
    devices) or GPUs of this machine (``cuda:0,cuda:1``, a placement made over the real
    GPUs): one process per stage device under ``torch.distributed.pipelining``; else the
    reason it runs un-pipelined in one process (devices of a simulated cluster, mapped onto
    their real device; CPU workers mixed with GPUs; GPUs this machine lacks); None without a
    pipeline. A pipeline x DDP hybrid (``replicas``) runs as processes when every replica's
    stage devices do (one per stage device of every replica)."""
    from envs.hardware.rank_devices import RankDeviceError, parse_rank_devices
    from envs.runtime.pipeline.worker import check_stage_devices
    from envs.sim.pipeline_layout import PipelineError

    pipe = placement.pipeline
    if pipe is None:
        return None
    simulated = placement.metadata.get("simulated_cluster") is True
    if cluster is not None:
        from envs.hardware.loading import load_cluster

        simulated = bool(load_cluster(cluster).simulated)
    try:
        devices = parse_rank_devices(list(pipe.rank_devices))
    except RankDeviceError:
        devices = []
    why = ""
    if not simulated and devices and all(d.local for d in devices):
        try:
            check_stage_devices(devices)
            return "processes"
        except PipelineError as exc:
            why = f" ({exc})"
    where = ("a simulated cluster's" if simulated
             else "not CPU worker processes (cpu:N) or GPUs (cuda:N) of this machine" + why)
    first = " (replica 0's, on the whole batch)" if pipe.replicas else ""
    return (f"the placement, {pipe.describe()}, is not run as one: its devices ({', '.join(pipe.ranks)}) are "
            f"{where}, so its stages' assignment{first} runs un-pipelined in one process; place over worker "
            "processes (optimize --devices cpu:0,cpu:1) or this machine's GPUs to run it as it is")


def train_pipeline_steps(spec: ModelSpec, captured: CapturedModel, placement: Placement, steps: int = 10,
                         warmup: int = 2, threads: int = 1, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run ``placement``'s pipeline for ``warmup + steps`` training steps through
    ``torch.distributed.pipelining``, one process per stage device on this machine
    (:func:`envs.runtime.pipeline.launcher.run_training`, the model's optimizer and loss);
    returns what :func:`train_steps` returns, each step's time the slowest rank's.

    Raises:
        PipelineError: ``M`` does not divide the batch, a data-dependent boundary shape (before starting).
        PipelineRunError: a rank died or the job outlasted ``timeout_s``.
    """
    from envs.runtime.pipeline.launcher import run_training

    pipe = placement.pipeline
    if pipe is None:
        raise PlacerError("the placement carries no pipeline; expected a pipelined placement (schema 2)")
    gm = captured.gm
    run = run_training(gm, placeholder_values(gm, spec.example_inputs), pipe, steps=warmup + steps, warmup=warmup,
                       optimizer=spec.optimizer_fn, loss_fn=spec.loss_fn, threads=threads, timeout_s=timeout_s,
                       batch_dim=spec.batch_dim)
    times = list(run.step_times[warmup:])
    stage_list = "; ".join(
        (f"replica {r}: " if pipe.replicas else "") + ", ".join(
            f"{d} (stage{'s' if devs.count(d) > 1 else ''} {', '.join(str(s) for s, x in enumerate(devs) if x == d)})"
            for d in dict.fromkeys(devs))
        for r, devs in enumerate(pipe.replica_devices))
    processes = pipe.num_replicas * len(pipe.ranks)
    if pipe.is_data_parallel:
        how = (f"{pipe.describe()}: each process on 1/{pipe.num_replicas} of the batch, gradients averaged by "
               "torch DistributedDataParallel (the stage wrapped in DDP, run by torch.distributed.pipelining)")
    else:
        how = (f"{pipe.describe()}" + (f": each replica on 1/{pipe.num_replicas} of the batch, gradients averaged "
                                       "per stage" if pipe.replicas else "")
               + "; run by torch.distributed.pipelining")
    return {
        "losses": list(run.losses[warmup:]), "times": times, "median": statistics.median(times), "min": min(times),
        "devices": stage_list,
        "note": f"{how}, in {processes} processes ({threads} thread(s) each); a step's time is its slowest rank's",
    }


#: How long ``placer apply`` over worker processes waits while no rank makes progress (no step
#: begun, no message received) before calling the run hung. A no-progress limit, not a limit on
#: the run: ``--steps 100000`` of a slow model may take hours and is never cut while it steps.
APPLY_STALL_TIMEOUT_S = 300.0


def train_rank_steps(spec: ModelSpec, captured: CapturedModel, placement: Placement, source: str,
                     model_args: Mapping[str, Any] | None = None, steps: int = 10, warmup: int = 2,
                     stall_timeout_s: float = APPLY_STALL_TIMEOUT_S,
                     load_timeout_s: float = 300.0) -> dict[str, Any]:
    """Run an un-pipelined placement over worker processes (``cpu:0,cpu:1``) as ``optimize``
    measured it: one process per device, one thread each, the point-to-point runtime
    (:func:`envs.runtime.distributed.launcher.run_job`). One measuring task of ``warmup +
    steps`` steps gives both the losses and the times (each step the slowest rank's): a
    separate training task ran the same steps from the same start a second time for its
    losses alone. ``source``: the model file or ``zoo:<name>`` the workers load the model's
    code from. The run is stopped as hung only when no rank has made progress for
    ``stall_timeout_s`` (plus ``load_timeout_s`` while a rank is starting), never for its length.

    Raises:
        PlacerError: the job failed (the reason names the rank and the step it was at).
    """
    from envs.runtime.distributed.launcher import run_job

    devices = list(placement.devices)
    ranks = {node: devices.index(dev) for node, dev in placement.assignment.items()}
    tasks = [{"kind": "measure", "ranks": ranks, "warmup": warmup, "repeats": steps}]
    out = run_job(spec, source, devices, tasks, model_args=model_args, threads=1, captured=captured,
                  timeout_s=None, stall_timeout_s=stall_timeout_s, load_timeout_s=load_timeout_s)
    if not out.ok:
        raise PlacerError(f"the placement did not run over {', '.join(devices)} ({warmup} warm-up + {steps} "
                          f"steps): {out.error}")
    [measured] = out.results
    assert measured is not None  # out.ok: every task finished
    # The output rank computes the loss; the others return None for it.
    losses = next((r["losses"] for r in measured if r["losses"] and r["losses"][0] is not None), None)
    if losses is None:
        raise PlacerError(f"the placement ran over {', '.join(devices)} but no rank returned the loss")
    losses = losses[warmup:]
    times = [max(r["times"][i] for r in measured) for i in range(steps)]
    return {
        "losses": [float(x) for x in losses], "times": times, "median": statistics.median(times), "min": min(times),
        "devices": ", ".join(devices),
        "note": f"un-pipelined over {len(devices)} worker processes (1 thread each), as optimize measured it; "
                "a step's time is its slowest rank's",
    }


def train_steps(spec: ModelSpec, captured: CapturedModel, placement: Placement, steps: int = 10,
                warmup: int = 2, cluster: ClusterSource | None = None, source: str | None = None,
                model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run ``warmup + steps`` full training steps with ``placement``; returns losses and step times.

    A pipelined placement over worker processes runs as a pipeline
    (:func:`train_pipeline_steps`); one over other devices runs its stages' assignment
    un-pipelined, and the note says so (:func:`pipeline_run_mode`). An un-pipelined placement
    over worker processes runs over them when the model's ``source`` is given
    (:func:`train_rank_steps`); without it, in this process, and the note says so.

    Raises:
        PlacerError: a pipeline whose ``R x M`` does not divide the batch.
    """
    mode = pipeline_run_mode(placement, cluster)
    over_ranks = placement.pipeline is None and is_rank_device_list(list(placement.devices))
    if over_ranks and source is not None:
        return train_rank_steps(spec, captured, placement, source, model_args, steps=steps, warmup=warmup)
    if over_ranks:
        mode = (f"the devices are worker processes, but without the model's source this runs in one process "
                f"({torch.get_num_threads()} thread(s)), not as optimize measured it")
    if placement.pipeline is not None:
        from graphs.input_batch import batch_size_of

        batch = batch_size_of(spec.example_inputs, spec.batch_dim)
        if batch is None:
            raise PlacerError("the placement is pipelined but the model's inputs have no batch dimension; "
                              f"expected inputs whose dim {spec.batch_dim} the micro-batches split")
        placement.pipeline.check_batch(batch)  # the same rule pipelined or not: the file is wrong either way
    if mode == "processes":
        return train_pipeline_steps(spec, captured, placement, steps=steps, warmup=warmup)
    real = real_devices_of(placement, cluster)
    realized = realize_placement(placement.assignment, real)
    placed = apply_placement(captured, placement.assignment, real_devices=real)
    placed.train()
    retain_freed_memory()  # as optimize's profile and measurement ran (graphs.cpu_allocator)
    optimizer = spec.optimizer_fn(placed.parameters())
    used = sorted(set(realized.assignment.values()))
    inputs = spec.example_inputs
    losses, times = [], []
    for i in range(warmup + steps):
        for d in used:
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        output = placed(*inputs)
        loss = spec.loss_fn(output, *[to_device(x, "cpu") for x in inputs])
        loss = to_device(loss, "cpu")
        loss.backward()
        optimizer.step()
        for d in used:
            if d.startswith("cuda"):
                torch.cuda.synchronize(d)
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            losses.append(float(loss.detach()))
    return {
        "losses": losses, "times": times, "median": statistics.median(times), "min": min(times),
        "devices": ", ".join(f"{v}→{r}" for v, r in sorted(realized.virtual_to_real.items())
                             if v in set(placement.assignment.values())),
        "note": "; ".join(x for x in (realized.note, mode) if x),
    }
