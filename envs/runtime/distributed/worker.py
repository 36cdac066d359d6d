"""One rank of a distributed placement job: ``python -m envs.runtime.distributed.worker JOB_DIR``.

Reads the torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT``; ``LOCAL_RANK`` when set), so the same entry point runs under
:mod:`envs.runtime.distributed.launcher` on this machine or under ``torchrun`` on several hosts.
``JOB_DIR/job.pt`` (written by :func:`envs.runtime.distributed.launcher.write_job`) holds the
model source, the initial weights and example inputs (so every rank and the
single-process reference start from the same numbers), the devices and the tasks.

A rank never holds the whole model: it builds it on the ``meta`` device, captures it, and
for each task materialises only the tensors of its own stages from the mapped job file
(:mod:`envs.runtime.distributed.stage_state`); its optimizer covers those parameters only.

Task kinds, each answered by ``JOB_DIR/result-<task>-<rank>.pt``:

* ``train``: ``steps`` optimizer steps of a placement; returns the losses (output rank),
  the rank's own parameters after the steps and the bytes it held (model tensors,
  optimizer state);
* ``measure``: ``warmup`` + ``repeats`` steps, each between two barriers (the step time is
  the slowest rank's), returns the timed steps; with ``min_timed_s``, as many more timed
  steps as fill that time at the slowest rank's median warm-up step (up to ``max_repeats``);
* ``links``: ping-pong between every pair of ranks, returns (latency, bandwidth) per pair.

Any exception writes ``JOB_DIR/error-<rank>.txt`` and exits with status 1: the launcher
then stops every rank (the others would wait for this one forever).
"""

from __future__ import annotations

import signal

if __name__ == "__main__":  # a rank process: Ctrl-C ends it by the signal from here on (supervisor.rank_dies_by_sigint)
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import dataclasses
import datetime
import itertools
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

from envs.runtime.listening import listening_socket
from envs.runtime.rank_optimizer import rank_optimizer
from envs.runtime.supervisor import worker_main
from graphs.cpu_allocator import retain_freed_memory
from graphs.errors import PlacerError


class RendezvousError(PlacerError, RuntimeError):
    """Rank 0 cannot serve the rendezvous store (its port is in use, say)."""

__all__ = ["main", "run_rank"]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # the launcher never reads a half-written result


def _ping_pong(dist: Any, rank: int, a: int, b: int, device: torch.device, repeats: int) -> tuple[float, float] | None:
    """Latency and bandwidth between ranks ``a`` and ``b``: fit through two message sizes, each
    the fastest of ``repeats`` round trips.

    The fastest, not the median: a receive that sleeps and is woken late (a scheduler tick,
    another process on the core) adds milliseconds to a round trip, and the rank simulator
    charges those wake-ups apart (rule R3 of :mod:`envs.sim.ranks`); the link is what is left.
    Measured here (2026-12-07, ``/tmp`` ping-pong script, 4 KiB, 9 round trips): quiet, the
    fastest 64-100 us and the median 78-121 us; with two busy processes on the two cores, the
    fastest 31-62 us and the median 0.21-1.97 ms. An optimize run whose links were measured
    by the median read 1.69 ms of latency, and its uncalibrated simulator priced a split of a
    small MLP at 7.0 ms that measured 2.5 ms (its calibration then scaled the latency by 0.01);
    re-simulated with the fastest trips' figures (60 us, 2.6 GB/s) its 12 measured placements
    agree at MAPE 11.1% instead of 125.8% (Spearman 0.88 either way). On three runs whose links
    were measured on a quiet machine (71-150 us) the same swap moved MAPE by -0.1 to +2.2 points.
    """
    from envs.hardware.links import link_from_trips

    small, large = 4 * 1024, 8 * 1024 * 1024
    trips: dict[int, list[float]] = {}
    for nbytes in (small, large):
        buf = torch.zeros(nbytes // 4, device=device)
        samples = trips.setdefault(nbytes, [])
        for i in range(repeats + 1):
            start = time.perf_counter()
            if rank == a:
                dist.send(buf, b)
                dist.recv(buf, b)
            else:
                dist.recv(buf, a)
                dist.send(buf, a)
            if i:  # the first round trip sets up the connection
                samples.append((time.perf_counter() - start) / 2)
    if rank != a:
        return None
    try:
        return link_from_trips(trips)
    except ValueError:  # the large message was no slower than the small: no bandwidth to fit
        return (min(trips[small]), large / max(min(trips[large]), 1e-9))


def run_rank(job_dir: Path, rank: int, world: int) -> None:
    """Run every task of the job in ``job_dir`` as ``rank`` of ``world``."""
    import torch.distributed as dist

    from envs.runtime.distributed.rank_status import DONE, STARTING, RankStatus
    from envs.runtime.distributed.runtime import CountingComm, RankStep, TorchComm, unpack_meta
    from envs.runtime.distributed.stage_state import hold, owned_paths, resident_bytes, tensor_bytes
    from envs.runtime.file_modules import load_file_modules
    from envs.runtime.split import split_by_rank
    from envs.runtime.step_timer import time_steps

    status = RankStatus(job_dir, rank)
    load_file_modules(job_dir)  # the job's pickle may name what a model file defines (a namedtuple output)
    # Mapped, not read: the weights of other ranks' stages are never paged in.
    job = torch.load(job_dir / "job.pt", weights_only=False, mmap=True)
    if world != len(job["devices"]):
        raise RuntimeError(f"WORLD_SIZE is {world} but the job has {len(job['devices'])} devices")
    me = job["devices"][rank]
    device = torch.device(me["torch_device"])
    retain_freed_memory()  # as the profile that priced this job ran (graphs.cpu_allocator)
    if device.type == "cpu":
        torch.set_num_threads(int(job["threads"]))
    else:
        torch.cuda.set_device(device)
    backend = job["backend"]
    timeout = datetime.timedelta(seconds=float(job["timeout_s"]))
    # Local ranks take their peers' connections on loopback only; a HOST:... rank on HOST's address.
    init_backend = _bound_gloo(me["host"] or "127.0.0.1") if backend == "gloo" else backend
    with status.waiting(barrier=True):
        store = _rendezvous_store(rank, world, timeout)
        dist.init_process_group(init_backend, store=store, rank=rank, world_size=world, timeout=timeout)
    status.set(STARTING)
    try:
        spec, gm, built_on = _capture_skeleton(job, rank)
        gm.train()
        meta = unpack_meta(job["meta"])
        inputs = tuple(job["inputs"])
        comm = CountingComm(TorchComm(backend), status=status)

        def barrier() -> None:
            with status.waiting(barrier=True):
                dist.barrier()
        dev_inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)

        for i, task in enumerate(job["tasks"]):
            kind = task["kind"]
            status.at(i, -1)
            if kind == "links":
                pairs = {}
                for a in range(world):
                    for b in range(a + 1, world):
                        if rank in (a, b):
                            fig = _ping_pong(dist, rank, a, b, device, int(task.get("repeats", 9)))
                            if fig is not None:
                                pairs[(a, b)] = fig
                        barrier()
                _atomic_save({"links": pairs}, job_dir / f"result-{i}-{rank}.pt")
                continue
            # Every task starts from the job's initial values, holding only its own stages' tensors.
            plan = split_by_rank(gm, task["ranks"], world, output_rank=task.get("output_rank"))
            held = hold(gm, owned_paths(plan, rank), job["state"], device)
            # Split again: stage modules keep references to the tensors present when they were built.
            plan = split_by_rank(gm, task["ranks"], world, output_rank=task.get("output_rank"))
            mine = plan.stages_of(rank)
            params: dict[int, torch.nn.Parameter] = {}
            for st in mine:
                for p in st.module.parameters():
                    params[id(p)] = p
            runner = RankStep(plan, rank, meta, dev_inputs, spec.loss_fn, device, comm)
            # None: no parameter here, or none the model's optimizer keeps (a frozen teacher's)
            optimizer = rank_optimizer(spec.optimizer_fn, list(params.values()))
            if kind == "train":
                losses = []
                for s in range(int(task["steps"])):
                    status.at(i, s)  # each step shows as progress to the launcher's watchdog
                    if optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
                    losses.append(runner.step())
                    if optimizer is not None:
                        optimizer.step()
                own = {name: p.detach().cpu().clone() for name, p in gm.named_parameters() if id(p) in params}
                opt_state = [v for st in (optimizer.state.values() if optimizer is not None else ())
                             for v in st.values() if isinstance(v, torch.Tensor)]
                result: dict[str, Any] = {
                    "losses": losses, "params": own, "stages": len(mine), "describe": plan.describe(),
                    # What this rank holds: the model's tensors (params, buffers, constants) and
                    # the optimizer's state, in bytes; the model was built on meta: "built_on".
                    "held_bytes": held, "resident_bytes": resident_bytes(gm, *(st.module for st in mine)),
                    "optimizer_state_bytes": tensor_bytes(opt_state), "built_on": built_on,
                    "listening_on": _listening_addresses(),
                }
            elif kind == "measure":
                counter = itertools.count()
                measured_losses: list[float | None] = []

                def step() -> None:
                    status.at(i, next(counter))
                    if optimizer is not None:
                        optimizer.zero_grad(set_to_none=True)
                    # Kept so one task gives both the losses and the times (placer apply).
                    measured_losses.append(runner.step())
                    if optimizer is not None:
                        optimizer.step()

                def sync() -> None:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    barrier()  # a step lasts until the slowest rank is done

                def slowest_rank(step_s: float) -> float:
                    # Every rank times as many steps as the slowest rank's warm-up asks for.
                    t = torch.tensor([step_s], dtype=torch.float64, device=device if backend == "nccl" else "cpu")
                    with status.waiting(barrier=True):
                        dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    return float(t.item())

                timed = time_steps(step, int(task["warmup"]), int(task["repeats"]), sync=sync,
                                   on_timing=comm.reset,  # count the timed steps only
                                   min_timed_s=float(task.get("min_timed_s", 0.0)),
                                   max_repeats=int(task.get("max_repeats", task["repeats"])), agree=slowest_rank)
                n = len(timed.times)
                result = {"times": list(timed.times), "describe": plan.describe(),
                          # Every step's loss, warm-up included (None on ranks without the output).
                          "losses": measured_losses,
                          # Per timed step: messages this rank sent / received, bytes sent, and
                          # the time it sat in receives waiting for its peers.
                          "messages_sent": comm.sent / n, "messages_received": comm.received / n,
                          "bytes_sent": comm.sent_bytes / n, "recv_wait_s": comm.recv_wait_s / n,
                          # CPU seconds of this process per step (all its threads, incl. gloo's).
                          "cpu_s": timed.cpu_s / n}
            else:
                raise RuntimeError(f"unknown task kind {kind!r}")
            _atomic_save(result, job_dir / f"result-{i}-{rank}.pt")
        status.set(DONE)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a broken group is being torn down anyway
            pass


def _listening_addresses() -> list[str]:
    """IPv4 addresses this process listens on (TCP), read from /proc; [] where unavailable.

    Reported with training results so a multi-host run shows which address each rank's
    gloo device took connections on.
    """
    try:
        inodes = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed since the listing (the listing's own descriptor)
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        found = set()
        with open("/proc/self/net/tcp") as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    ip = bytes.fromhex(cols[1].split(":")[0])[::-1]
                    found.add(".".join(str(b) for b in ip))
        return sorted(found)
    except OSError:
        return []


#: The rendezvous server's listening socket (rank 0), kept open as long as the store lives.
_STORE_SOCKET: socket.socket | None = None


def _rendezvous_store(rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """The rendezvous store at ``MASTER_ADDR:MASTER_PORT``; rank 0 serves it on that address only.

    ``torch.distributed.TCPStore(host, port, is_master=True)`` listens on every interface
    whatever ``host`` says (torch 2.13: ``*:port``, checked with ``ss -ltn``), which would
    expose the job to the network. Rank 0 therefore binds the listening socket itself to
    ``MASTER_ADDR`` (loopback unless the user gives an address) and hands it to the store
    (``master_listen_fd``). Under ``torchrun``'s agent store (``TORCHELASTIC_USE_AGENT_STORE``)
    the agent serves and every rank is a client, as torch's ``env://`` does.
    """
    import torch.distributed as dist

    global _STORE_SOCKET
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    if rank != 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return dist.TCPStore(addr, port, world, False, timeout=timeout)
    try:
        sock = listening_socket(addr, port, max(128, world))
    except OSError as exc:
        raise RendezvousError(f"rank 0 cannot serve the rendezvous on {addr}:{port}: {exc.strerror}; expected a "
                              "free port (set MASTER_PORT to another)") from None
    _STORE_SOCKET = sock
    return dist.TCPStore(addr, port, world, True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.fileno(), use_libuv=True)


def _bound_gloo(host: str) -> str:
    """Register a gloo backend whose device listens on ``host``'s address; returns its name.

    A local rank (``cpu:N``) listens on 127.0.0.1: gloo's default device listens on the
    address this machine's host name resolves to, often a public one. A rank named ``HOST:cpu:N`` then takes its peers' connections on the address ``HOST``
    resolves to, not on whatever this machine's host name resolves to (the default), so the
    device list decides which network a multi-homed machine uses — and two loopback
    addresses (127.0.0.1, 127.0.0.2) act as two hosts on one machine.
    """
    import torch.distributed as dist

    def create(store: Any, group_rank: int, group_size: int, timeout: datetime.timedelta) -> Any:
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        return dist.ProcessGroupGloo(store, group_rank, group_size, options)

    dist.Backend.register_backend("placer_gloo", create, devices=["cpu"])
    return "placer_gloo"


def _capture_skeleton(job: dict[str, Any], rank: int) -> tuple[Any, Any, str]:
    """The model's spec and captured graph with every tensor on ``meta`` (no storage).

    The model is built under ``torch.device("meta")`` (``get_model()``; the file is imported as
    usual) and captured on meta copies of the example inputs, so no rank ever allocates the
    whole model. Model code that cannot run
    on meta (a data-dependent op, an explicit device) falls back to a normal build; its
    tensors are then moved to meta right after capture; so does one whose capture on meta
    gives another graph than the parent's. Returns (spec, gm, "meta" | "cpu").
    """
    from torch.utils._pytree import tree_map

    from envs.runtime.distributed.stage_state import to_meta
    from envs.runtime.measure_worker import load_spec
    from envs.runtime.replica_batch_norm import unsynced_batch_norms
    from graphs.capture import capture

    inputs = tuple(job["inputs"])
    leaves = tuple(job.get("leaf_modules", ()))
    to_meta_inputs = lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x  # noqa: E731
    def loaded(build_device: str | None = None) -> Any:
        # The parent checked the file's inputs; here, under the job's process group, a trial
        # forward of a SyncBatchNorm would try to sync with ranks that hold other layers.
        spec = load_spec(job["model_source"], job["model_args"], check_inputs=False, build_device=build_device)
        unsynced_batch_norms(spec.model)
        return spec

    built_at_import = None
    try:
        # get_model() on meta, not the file's import: a tensor the file makes at module level
        # (QUANTILES = torch.tensor(...), read by its loss) was made on meta, and every
        # placement over worker processes failed ("Tensor on device cpu is not on the expected
        # device meta!")
        spec = loaded("meta")
        if any(not t.is_meta for t in itertools.chain(spec.model.parameters(), spec.model.buffers())):
            built_at_import = spec  # `model = Net()` in the file: built already, not built twice
            raise RuntimeError("the model file builds its model when imported")
        captured = capture(spec.model, tree_map(to_meta_inputs, inputs), leaf_modules=leaves, name=spec.name,
                           batch_dim=spec.batch_dim)
        if job.get("fingerprint") and captured.fingerprint != job["fingerprint"]:
            # Another graph than the parent's: on meta, fx's shape propagation cannot run an op whose
            # output size depends on values (torch.nonzero in a top-k router), so the capture fell
            # back to torch.export, which the parent did not use. Every run of such a model failed.
            raise RuntimeError("captured on meta as another graph")
        built_on = "meta"
    except Exception:  # noqa: BLE001 - any failure on meta means: build it for real
        spec = built_at_import or loaded()
        captured = capture(spec.model, inputs, leaf_modules=leaves, name=spec.name, batch_dim=spec.batch_dim)
        built_on = "cpu"
    if job.get("fingerprint") and captured.fingerprint != job["fingerprint"]:
        raise RuntimeError(f"rank {rank} captured model {captured.fingerprint}, the job is for {job['fingerprint']}")
    to_meta(captured.gm)
    # Drop the user's module object: only the captured graph's modules are kept (all on meta).
    return dataclasses.replace(spec, model=captured.gm), captured.gm, built_on


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    return worker_main("envs.runtime.distributed.worker", run_rank, argv)


if __name__ == "__main__":
    sys.exit(main())
