"""Start one worker process per rank on this machine, watch them, and stop them all on failure.

:func:`write_job` writes the job a set of ranks runs (model source, initial weights and
example inputs, devices, tasks) into a directory; :class:`WorkerGroup` starts
``python -m envs.runtime.distributed.worker JOB_DIR`` once per local rank with the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` — loopback by
default — and a free ``MASTER_PORT``) through one :class:`envs.runtime.supervisor.Supervisor`
(one process group; every worker dies with this process), and collects the per-task
results. A worker that exits, hangs past the time-out or never connects ends the job with
a reason naming the rank — the rank that hung, read from the ranks' status records
(:mod:`envs.runtime.distributed.rank_status`), not a peer that gave up waiting for it —
and every worker is killed, so none outlives the call. :func:`run_job` is the one-call
form (its job directory, holding the model's weights, is removed on return, on an
exception — SIGTERM in ``placer`` included — and by the next run after a SIGKILL);
:func:`measure_links` measures latency/bandwidth between local ranks by ping-pong.

Backend: gloo when any rank computes on the CPU (CUDA tensors then cross through host
memory), NCCL when every rank is a GPU.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from envs.hardware.rank_devices import RankDevice, RankDeviceError, parse_rank_devices
from envs.runtime.distributed.rank_status import STARTING, Status, culprit, read_status
from envs.runtime.file_modules import write_file_modules
from envs.runtime.listening import nccl_environment
from envs.runtime.supervisor import Supervisor, make_job_dir

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from graphs.capture import CapturedModel

__all__ = ["JobOutcome", "WorkerGroup", "write_job", "run_job", "measure_links", "free_port", "backend_for"]

_POLL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the rendezvous port of rank 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def backend_for(devices: Sequence[RankDevice]) -> str:
    """``nccl`` when every rank is a GPU, else ``gloo``."""
    return "nccl" if all(d.kind == "cuda" for d in devices) else "gloo"


def write_job(
    job_dir: str | os.PathLike,
    spec: Any,
    model_source: str,
    model_args: Mapping[str, Any] | None,
    devices: str | Sequence[str],
    tasks: Sequence[Mapping[str, Any]],
    threads: int = 1,
    timeout_s: float = 300.0,
    fingerprint: str | None = None,
    captured: CapturedModel | None = None,
) -> Path:
    """Write ``job_dir/job.pt`` for the ranks (also what ``torchrun`` workers on other hosts read).

    The job holds the whole model's tensors by attribute path of the captured graph; each
    rank maps the file (``mmap``) and copies only the tensors of its own stages, so no rank
    reads the others' weights into memory. It also holds the shape, dtype and grad flag of
    every value (:func:`envs.runtime.distributed.runtime.value_meta`), computed here on the real
    model because the ranks build theirs on the ``meta`` device and cannot run it.

    Args:
        spec: the loaded ModelSpec; its weights and example inputs are shipped so every rank
            (and a single-process reference) starts from identical numbers.
        model_source: model file path or ``"zoo:<name>"`` the workers load the code from.
        devices: the rank device list (``"cpu:0,cpu:1"``).
        tasks: ``{"kind": "train", "ranks": {node: rank}, "steps": 3}``,
            ``{"kind": "measure", "ranks": ..., "warmup": 2, "repeats": 5}`` or ``{"kind": "links"}``.
        threads: torch threads per CPU worker.
        timeout_s: torch.distributed's own time-out for a collective or receive.
        captured: ``spec``'s CapturedModel when the caller has one (else it is captured here).
    """
    devs = parse_rank_devices(devices)
    path = Path(job_dir)
    path.mkdir(parents=True, exist_ok=True)
    if captured is None:
        from graphs.capture import capture

        captured = capture(spec.model, spec.example_inputs, name=spec.name, batch_dim=spec.batch_dim)
    state, meta = _state_and_meta(captured.gm, tuple(spec.example_inputs))
    job = {
        "model_source": model_source,
        "model_args": dict(model_args or {}),
        # The ranks capture the model again: with the caller's leaf modules, or their graph differs.
        "leaf_modules": list(captured.leaf_paths),
        "state": state,
        "meta": meta,
        "inputs": tuple(spec.example_inputs),
        "devices": [dict(name=d.name, rank=d.rank, host=d.host, kind=d.kind, index=d.index,
                         torch_device=d.torch_device) for d in devs],
        "backend": backend_for(devs),
        "threads": int(threads),
        "timeout_s": float(timeout_s),
        "fingerprint": fingerprint,
        "tasks": [dict(t) for t in tasks],
    }
    torch.save(job, path / "job.pt")
    write_file_modules(path)
    return path / "job.pt"


def _state_and_meta(gm: Any, inputs: tuple) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of ``gm`` by path (detached, CPU) and the value metadata of every node.

    The metadata run is a training-mode forward, which moves BatchNorm statistics: the
    buffers and the module's mode are put back, so the caller's model is left as it was.
    """
    from envs.runtime.distributed.runtime import pack_meta, value_meta
    from envs.runtime.distributed.stage_state import data_on, module_tensors
    from graphs.buffers import preserved_buffers

    modes = [(m, m.training) for m in gm.modules()]
    gm.train()
    try:
        with preserved_buffers(gm):
            meta = value_meta(gm, inputs)
    finally:
        for m, mode in modes:
            m.training = mode
    state = {p: data_on(t.detach(), "cpu") for p, t in module_tensors(gm)}
    return state, pack_meta(meta)


@dataclass
class JobOutcome:
    """What a job returned.

    Attributes:
        results: per task, the list of per-rank results (None for tasks that did not finish).
        error: why the job stopped early ("" when every task finished).
        failed_task: index of the task that was running when it failed (None when none).
    """

    results: list[list[Any] | None] = field(default_factory=list)
    error: str = ""
    failed_task: int | None = None

    @property
    def ok(self) -> bool:
        return not self.error


#: Extra seconds torch.distributed waits beyond the launcher: the launcher must be the one
#: to notice a hang, since it can tell which rank hung; a rank's own time-out blames a peer.
TORCH_TIMEOUT_MARGIN_S = 60.0
#: Error text of a rank that gave up on a peer (time-out, peer closed the connection).
_PEER_ERRORS = ("timed out", "timeout", "connection closed", "connection reset", "connection refused",
                "broken pipe", "peer", "disconnected")


class WorkerGroup:
    """The local worker processes of one job, started and stopped by one supervisor.

    Args:
        job_dir: directory holding ``job.pt`` (see :func:`write_job`).
        devices: the rank device list; every rank must be on this machine.
        master_addr, master_port: rendezvous of rank 0 (loopback and a free port by default).
    """

    def __init__(self, job_dir: str | os.PathLike, devices: str | Sequence[str],
                 master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        self.job_dir = Path(job_dir)
        self.devices = parse_rank_devices(devices)
        remote = [d.name for d in self.devices if not d.local]
        if remote:
            raise RankDeviceError(
                f"device(s) {remote} are on other hosts: start their ranks there with torchrun "
                "(see docs/distributed.md); this launcher starts ranks on this machine only"
            )
        self.master_addr = master_addr
        self.master_port = master_port or free_port(master_addr)
        self.supervisor = Supervisor()
        self.procs: list[subprocess.Popen] = []

    @property
    def pids(self) -> list[int]:
        """Worker process ids by rank."""
        return [p.pid for p in self.procs]

    def start(self) -> None:
        """Start every rank (returns at once; :meth:`wait_task` waits)."""
        world = len(self.devices)
        threads = str(torch.load(self.job_dir / "job.pt", weights_only=False, mmap=True)["threads"])
        for d in self.devices:
            env = dict(RANK=str(d.rank), WORLD_SIZE=str(world), LOCAL_RANK=str(d.rank),
                       LOCAL_WORLD_SIZE=str(world), MASTER_ADDR=self.master_addr,
                       MASTER_PORT=str(self.master_port), OMP_NUM_THREADS=threads,
                       **nccl_environment(self.master_addr))
            with open(self.job_dir / f"stderr-{d.rank}.txt", "wb") as err:
                self.procs.append(self.supervisor.start(
                    f"rank {d.rank}", [sys.executable, "-m", "envs.runtime.distributed.worker", str(self.job_dir)],
                    env=env, stdout=subprocess.DEVNULL, stderr=err))

    def kill(self) -> None:
        """Kill every rank and reap them."""
        self.supervisor.stop()

    def _error_line(self, rank: int) -> str | None:
        err = self.job_dir / f"error-{rank}.txt"
        try:
            return err.read_text().split("\n", 1)[0][:400]
        except OSError:
            return None

    def _blame(self, prefix: str) -> str:
        """Why the job stalled, naming the rank the others were waiting for when the records tell."""
        alive = [p.poll() is None for p in self.procs]
        statuses = []
        for d, up in zip(self.devices, alive):
            st = read_status(self.job_dir, d.rank)
            if st is None and up:  # alive but no record yet: still importing torch
                st = Status(d.rank, STARTING, -1, -1, -1, 0.0)
            statuses.append(st)
        hung = culprit(statuses, alive)
        others = "; ".join(f"rank {s.rank} {s.describe()}" for s in statuses if s is not None and s.rank != hung)
        if hung is None:
            return f"{prefix} (no rank was computing: {others or 'no status recorded'})"
        d, st = self.devices[hung], statuses[hung]
        assert st is not None
        return f"worker rank {hung} ({d.name}) hung: {prefix}, it was {st.describe()}" + (
            f" while {others}" if others else "")

    def _failure(self) -> str | None:
        failed = self.supervisor.failures()
        if not failed:
            return None
        ranks = {f"rank {d.rank}": d for d in self.devices}
        # A rank that crashed or failed on its own is the cause; one that gave up on a peer is not.
        for e in failed:
            d = ranks[e.label]
            line = self._error_line(d.rank)
            if line is None:
                return f"worker rank {d.rank} ({d.name}) {e.reason}"
            if not any(m in line.lower() for m in _PEER_ERRORS):
                return f"worker rank {d.rank} ({d.name}) failed: {line}"
        d = ranks[failed[0].label]
        return self._blame(f"rank {d.rank} ({d.name}) gave up waiting ({self._error_line(d.rank)})")

    def _progress_marks(self) -> tuple[tuple[Any, ...], bool]:
        """Every rank's status record as a comparable mark, and whether some rank is still starting.

        A rank with no record yet (importing torch) or not yet in a task (rendezvous,
        capture) is starting; start-up gets its own allowance (``run_job``'s ``load_timeout_s``).
        """
        marks: list[Any] = []
        starting = False
        for d in self.devices:
            st = read_status(self.job_dir, d.rank)
            marks.append(None if st is None else st.progress_mark())
            if st is None or st.task < 0:
                starting = True
        return tuple(marks), starting

    def wait_task(self, index: int, timeout_s: float | None, stall_timeout_s: float | None = None,
                  start_allowance_s: float = 0.0) -> tuple[list[Any] | None, str]:
        """Per-rank results of task ``index``, or (None, reason) on failure, time-out or stall.

        Args:
            timeout_s: wall-clock limit of the task (None: none), for callers that bound
                what one task may cost (the measured search cuts a slow placement).
            stall_timeout_s: no-progress limit (None: none): the task is hung when no rank's
                status record has changed (no step begun, no message received, no barrier
                passed, no result written) for this long. A long run that keeps stepping is
                never cut by it, which a wall-clock limit cannot promise.
            start_allowance_s: added to ``stall_timeout_s`` while some rank is still starting
                (importing, connecting, capturing: one long state with no steps to show).
        """
        if timeout_s is None and stall_timeout_s is None:
            raise ValueError("wait_task needs a timeout_s or a stall_timeout_s, else a hang waits forever")
        files = [self.job_dir / f"result-{index}-{d.rank}.pt" for d in self.devices]
        start = last_move = time.monotonic()
        seen: tuple[Any, ...] | None = None
        while True:
            done = [f.exists() for f in files]
            if all(done):
                return [torch.load(f, weights_only=False) for f in files], ""
            why = self._failure()
            if why is not None:
                return None, why
            if not self.supervisor.running():
                return None, "every worker exited before finishing the task"
            now = time.monotonic()
            missing = [d.rank for d, ok in zip(self.devices, done) if not ok]
            if timeout_s is not None and now - start >= timeout_s:
                return None, self._blame(f"timed out after {timeout_s:g}s (rank(s) {missing} did not finish)")
            if stall_timeout_s is not None:
                marks, starting = self._progress_marks()
                marks += tuple(done)
                if marks != seen:
                    seen, last_move = marks, now
                limit = stall_timeout_s + (start_allowance_s if starting else 0.0)
                if now - last_move >= limit:
                    return None, self._blame(
                        f"no rank made progress for {limit:g}s (rank(s) {missing} did not finish task {index})")
            time.sleep(_POLL_S)

    def finish(self, timeout_s: float = 30.0) -> None:
        """Let the ranks exit after their last task; kill whatever is left."""
        self.supervisor.wait_all(timeout_s)
        self.kill()

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def run_job(
    spec: Any,
    model_source: str,
    devices: str | Sequence[str],
    tasks: Sequence[Mapping[str, Any]],
    model_args: Mapping[str, Any] | None = None,
    threads: int = 1,
    timeout_s: float | None = 300.0,
    load_timeout_s: float = 300.0,
    fingerprint: str | None = None,
    master_addr: str = "127.0.0.1",
    job_dir: str | os.PathLike | None = None,
    captured: CapturedModel | None = None,
    deadline: float | None = None,
    stall_timeout_s: float | None = None,
) -> JobOutcome:
    """Run ``tasks`` on local worker processes, one per device; never leaves a process behind.

    ``load_timeout_s`` bounds start-up (imports, rendezvous, capture) plus the first task;
    ``timeout_s`` each later task (None: no wall-clock limit); ``deadline`` (a
    ``time.monotonic()`` instant, e.g. the end of the run's budget) bounds them all.
    ``stall_timeout_s`` is a no-progress watchdog instead (see :meth:`WorkerGroup.wait_task`):
    a job of many steps, e.g. ``placer apply --steps 100000``, has no sensible wall-clock
    limit but must still stop when a rank hangs; start-up gets ``load_timeout_s`` more. At
    least one of ``timeout_s`` and ``stall_timeout_s`` is needed. A failure ends the job:
    later tasks get no result. Without ``job_dir`` the job's files go to a fresh :func:`~envs.runtime.supervisor.make_job_dir`
    that is removed on return.
    """
    if timeout_s is None and stall_timeout_s is None:
        raise ValueError("run_job needs a timeout_s or a stall_timeout_s, else a hung rank waits forever")
    tmp = Path(job_dir) if job_dir is not None else make_job_dir()
    try:
        # torch.distributed's own time-out is longer than any wait of ours (see TORCH_TIMEOUT_MARGIN_S).
        waits = [t for t in (timeout_s, stall_timeout_s) if t is not None]
        write_job(tmp, spec, model_source, model_args, devices, tasks, threads=threads,
                  timeout_s=load_timeout_s + max(waits) + TORCH_TIMEOUT_MARGIN_S, fingerprint=fingerprint,
                  captured=captured)
        outcome = JobOutcome(results=[None] * len(tasks))
        with WorkerGroup(tmp, devices, master_addr=master_addr) as group:
            group.start()
            for i in range(len(tasks)):
                limit = None if timeout_s is None else load_timeout_s + timeout_s if i == 0 else timeout_s
                if deadline is not None:
                    left = max(0.0, deadline - time.monotonic())
                    limit = left if limit is None else min(limit, left)
                res, why = group.wait_task(i, limit, stall_timeout_s=stall_timeout_s,
                                           start_allowance_s=load_timeout_s)
                if res is None:
                    outcome.error, outcome.failed_task = why, i
                    break
                outcome.results[i] = res
            if outcome.ok:
                group.finish()
        return outcome
    finally:
        if job_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)


def measure_links(devices: str | Sequence[str], threads: int = 1, repeats: int = 9,
                  timeout_s: float = 120.0) -> dict[tuple[str, str], tuple[float, float]]:
    """Latency (s) and bandwidth (B/s) between every pair of local ranks, by ping-pong.

    Raises:
        RankDeviceError: the workers could not be started or connected (the reason says why).
    """
    from graphs.model_file import ModelSpec, default_loss, default_optimizer

    devs = parse_rank_devices(devices)
    # The links task needs no model; a one-layer stand-in keeps the worker's loading path one.
    spec = ModelSpec(model=torch.nn.Linear(1, 1), example_inputs=(torch.zeros(1, 1),),
                     loss_fn=default_loss, optimizer_fn=default_optimizer, name="links")
    src = str(Path(__file__).resolve().parent / "_links_model.py")
    out = run_job(spec, src, [d.name for d in devs], [{"kind": "links", "repeats": repeats}],
                  threads=threads, timeout_s=timeout_s, load_timeout_s=timeout_s)
    if not out.ok:
        raise RankDeviceError(f"could not measure the links between {[d.name for d in devs]}: {out.error}")
    pairs: dict[tuple[int, int], tuple[float, float]] = {}
    for per_rank in out.results[0] or []:
        pairs.update(per_rank["links"])
    links = {}
    for (a, b), fig in pairs.items():
        links[(devs[a].name, devs[b].name)] = fig
    return links
