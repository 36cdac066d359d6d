"""The batched training-step simulator: step time, busy time and peak memory of placements.

A placement is a row of devices per *group* (``problem.node_names``); what executes are the
*ops* (``problem.ops``): op i runs on ``row[ops.op_group[i]]``, gathered inside the loops,
so a group row is never expanded in Python (issue 15: ops execute, groups only constrain).

The rules are those of :mod:`envs.sim.reference_simulator` (one process: a host thread
issuing the forward in program order, asynchronous GPU streams, CPU ops on the host
thread, copies with PyTorch's stream semantics, the autograd engine's threads in the
backward, the optimizer on the host); the tests hold every path here to that oracle.

* **Step time** is when the host and every stream are done (plus the fixed step cost).
* **Busy time** per device: the sum of its ops' host and device seconds (forward,
  backward, optimizer update): ``problem.fwd_time + problem.bwd_time`` of its groups.
* **Memory** per device: parameters + gradients + optimizer state of its ops, their kept
  activations (``act_bytes``: what autograd saves, :mod:`graphs.saved_activations`), and
  one received copy per (producer, device) as apply.py makes them. All allocations happen
  in the forward and all frees in the backward (the backward is issued after the whole
  forward), so the peak is that sum (the oracle checks it on its event series), plus the
  backward's working set: :data:`~envs.sim.memory_rules.BACKWARD_WORK_FACTOR` times the largest
  gradient (an output's, or a shared parameter's) among the device's ops (measured,
  benchmarks/results/memory.md), added here outside the loops
  (:func:`~envs.sim.memory_rules.device_max`). The optimizer step comes after the backward has
  freed those activations and copies; its peak, parameters + gradients + state + the batch
  and the model's output (the training loop holds them) plus the temporaries of the
  device's largest parameters
  (:data:`~envs.sim.optimizer_state.OPTIMIZER_STEP_WORK`; on a GPU, torch.optim's foreach
  default, those of all its parameters: ``OPTIMIZER_FOREACH_WORK``,
  :func:`~envs.sim.memory_rules.step_temporaries`), is the device's peak when larger.
* A placement that does not fit is not an error: ``fits`` is False and ``over_memory``
  says by how many bytes each device is over.

**Backward: the autograd engine's rule, fast where it is simple.** A placement whose ops
all back onto one thread (one GPU, or CPUs only) runs its backward in decreasing sequence
number (:func:`envs.sim.kernels.static_pass`), which is then the engine's order, and the
pass checks it (``certified``). Every other placement runs the engine's event loop on
arrays (:func:`envs.sim.kernels_engine.event_pass`: per thread the highest-sequence ready node,
streams fed in enqueue-time order), as the oracle does. The design of issue 15 planned the
static pass, certified, for every placement, with the engine as a fallback; measured, the
certification fails on ~100% of random and block placements over several GPUs (a thread
that idles for one node while an older one is ready, or two threads feeding one stream out
of order, is the common case), and the static order's step was 5-11% slower than the
engine's on them, so the engine is the path for several threads.

Paths: numba (:mod:`envs.sim.simulator_numba`, the same loops compiled, threads over
placements) when numba imports (:data:`HAS_NUMBA`; ``PLACER_DISABLE_NUMBA=1`` forces
numpy); numpy (:mod:`envs.sim.simulator_numpy`: the static pass vectorised over the
one-thread rows of the batch, the other rows through the engine run as Python: slow, ms per
placement); python (the loops of :mod:`envs.sim.kernels` run as Python). All read the
problem as :mod:`envs.sim.loop_arrays` lays it out and give the same results bit for bit.

Speed (benchmarks/results/simulator.md): the engine's event loop costs ~11x the static pass
per op (~240 vs ~20 ns of CPU per op at 1,000 ops x 4 GPUs: ~2.2 events per op, each a
data-dependent choice), so several-GPU placements run at ~4,000 per CPU-second, not the
issue's 100,000 per second for 1,000 ops. The numba drivers split a batch into contiguous
chunks, each with one work space (:func:`envs.sim.kernels.workspace`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from envs.sim import kernels as _py
from envs.sim import kernels_engine as _py_engine
from envs.sim.loop_arrays import LoopArrays, loop_arrays
from envs.sim.memory_report import memory_problem_lines
from envs.sim.memory_rules import device_max, step_temporaries
from envs.sim.problem import PlacementError, PlacementProblem
from envs.sim.rank_schedule import RankSchedule, runnable_times
from envs.sim.simulator_numpy import NUMPY_CHUNK, static_pass_rows

try:  # numba is an optional extra ("placer[jit]"): the numpy path always works.
    from envs.sim import simulator_numba as _kernels  # defines the kernels; compiles nothing yet

    HAS_NUMBA = os.environ.get("PLACER_DISABLE_NUMBA", "") not in ("1", "true", "yes")
except ImportError:  # pragma: no cover - depends on the environment
    _kernels = None
    HAS_NUMBA = False


@dataclass(frozen=True)
class StepResult:
    """The simulated training step of one placement.

    Attributes:
        step_time: seconds.
        busy_time: [D] seconds of compute per device.
        peak_memory: [D] bytes.
        fits: every device within its capacity.
        over_memory: [D] bytes over capacity (0 where it fits).
        transfer_time: total seconds links spent transferring.
        transfer_bytes: total bytes transferred (forward copies + gradients).
        refusal: why the runtime refuses the placement (over ranks: a value handed to
            another stage before an in-place update of it), None when it runs it; the
            step time is then infinite.
    """

    step_time: float
    busy_time: np.ndarray
    peak_memory: np.ndarray
    fits: bool
    over_memory: np.ndarray
    transfer_time: float
    transfer_bytes: float
    refusal: str | None = None

    def memory_problems(self, device_names: Sequence[str]) -> list[str]:
        """One line per device over its capacity (:func:`envs.sim.memory_report.memory_problem_lines`)."""
        return memory_problem_lines({n: float(p) for n, p in zip(device_names, self.peak_memory)},
                                    {n: float(o) for n, o in zip(device_names, self.over_memory) if o > 0})

    def describe(self, device_names: Sequence[str]) -> str:
        """A one-line summary: step time, whether it fits (and where not), transfers."""
        if self.refusal is not None:
            return f"refused by the runtime: {self.refusal}"
        fit = "fits" if self.fits else "does not fit (" + "; ".join(self.memory_problems(device_names)) + ")"
        return (f"step {self.step_time * 1e3:.3f} ms, {fit}, "
                f"{self.transfer_bytes / 2**20:.1f} MiB transferred in {self.transfer_time * 1e3:.3f} ms of link time")


@dataclass(frozen=True)
class SimResult:
    """Results for a batch of B placements (arrays indexed by placement, then device)."""

    step_time: np.ndarray  # [B]
    busy_time: np.ndarray  # [B, D]
    peak_memory: np.ndarray  # [B, D]
    fits: np.ndarray  # [B] bool
    over_memory: np.ndarray  # [B, D] bytes over capacity, 0 where within
    transfer_time: np.ndarray  # [B] seconds links were busy
    transfer_bytes: np.ndarray  # [B]
    certified: np.ndarray | None = None  # [B] bool: the fast backward pass was exact (else the engine ran)
    refusal: tuple[str | None, ...] | None = None  # [B] over ranks: why the runtime refuses it (step inf), else None

    def __len__(self) -> int:
        return int(self.step_time.shape[0])

    def __getitem__(self, b: int) -> StepResult:
        return StepResult(
            float(self.step_time[b]),
            self.busy_time[b],
            self.peak_memory[b],
            bool(self.fits[b]),
            self.over_memory[b],
            float(self.transfer_time[b]),
            float(self.transfer_bytes[b]),
            None if self.refusal is None else self.refusal[b],
        )


@dataclass(frozen=True)
class Schedule:
    """Start and finish of every op, thread slice and copy of one placement (Gantt charts, tests).

    Op-level, in ``problem.ops.names`` order (NaN where an op has no such part).

    Attributes:
        placement: [G] device index per group (the row simulated).
        op_device: [N] device index per op.
        fwd_host_start, fwd_host_end: [N] the op's dispatch on the host thread (the whole op
            on a CPU).
        fwd_start, fwd_end: [N] the op's kernel on its GPU stream (the host slice on a CPU).
        bwd_thread_start, bwd_thread_end: [N] the backward op's host part on its engine thread
            (the host for a CPU device).
        bwd_start, bwd_end: [N] the backward kernel on the GPU stream (the thread slice on a CPU).
        copy_start, copy_end: [N, D] the forward copy of op i's output to device b.
        grad_copy_thread_start, grad_copy_thread_end: [N, D] the backward node of that copy
            (the gradient flowing back from b to op i's device): its issuing slice on b's
            thread (the engine thread of a GPU b, the host for a CPU); NaN where no gradient
            comes back.
        grad_copy_start, grad_copy_end: [N, D] that gradient copy itself (it holds both
            devices' streams, R5 reversed).
        certified: the fast backward pass was exact (else the engine's event loop ran).
        result: the step's :class:`StepResult`.
    """

    placement: np.ndarray
    op_device: np.ndarray
    fwd_host_start: np.ndarray
    fwd_host_end: np.ndarray
    fwd_start: np.ndarray
    fwd_end: np.ndarray
    bwd_thread_start: np.ndarray
    bwd_thread_end: np.ndarray
    bwd_start: np.ndarray
    bwd_end: np.ndarray
    copy_start: np.ndarray
    copy_end: np.ndarray
    grad_copy_thread_start: np.ndarray
    grad_copy_thread_end: np.ndarray
    grad_copy_start: np.ndarray
    grad_copy_end: np.ndarray
    certified: bool
    result: StepResult


def _as_batch(problem: PlacementProblem, placements: object) -> np.ndarray:
    """Validate placements ([B, G] or [G] ints, or a dict) and return a C-contiguous int32 [B, G]."""
    if isinstance(placements, Mapping):
        placements = problem.placement_to_array(placements)
    try:
        arr = problem.check_array(placements)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, PlacementError):
            raise
        raise PlacementError(f"placements must be an int array of device indices; {exc}") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    return np.ascontiguousarray(arr, dtype=np.int32)


def _workspace(a: LoopArrays, n_ops: int) -> tuple[np.ndarray, ...]:
    """The work arrays of the single-placement loops (:func:`envs.sim.kernels.workspace`)."""
    return _py.workspace(n_ops, a.n_devices, a.n_threads, a.id_op.shape[0])


_NO_TRACE = np.zeros((0, 8))
_NO_XTRACE = np.zeros((0, 6))


def _one(a: LoopArrays, row: np.ndarray, op_group: np.ndarray, ws: tuple[np.ndarray, ...], mem: np.ndarray,
         acc: np.ndarray, force_events: bool = False, trace: np.ndarray = _NO_TRACE,
         xtrace: np.ndarray = _NO_XTRACE) -> tuple[float, bool]:
    """Step of one placement (row over the slots of ``op_group``): the certified static pass,
    else (or when forced) the exact engine. ``mem`` and ``acc`` receive the copies; ``ws``
    is a :func:`_workspace`."""
    nd = a.n_devices
    ok = False
    if not force_events and _py.one_thread(row, a.thread_of):
        s, t, done, mark, dst, nb, xr, lastissue, lastthread, maxidle = ws[:10]
        step, ok = _py.static_pass(row, op_group, a.cost, nd, a.succ_ptr, a.succ_dst, a.succ_bytes, a.succ_grad,
                                   a.rg, a.rd, a.wr, a.thread_of, a.n_threads, a.lat_flat, a.inv_bw_flat,
                                   a.blocking, a.is_cpu, a.consts, s, t, done, mark, dst, nb, xr, lastissue,
                                   lastthread, maxidle, mem, acc, trace, xtrace)
        if ok:
            return step, True
        mem[:] = 0.0
        acc[:] = 0.0
    step = _py_engine.event_pass(row, op_group, a.cost, nd, a.succ_ptr, a.succ_dst, a.succ_bytes, a.succ_grad, a.rg,
                          a.gpred_ptr, a.gpred_src, a.rd, a.wr, a.thread_of, a.n_threads, a.lat_flat,
                          a.inv_bw_flat, a.blocking, a.consts, a.id_base, a.id_op, ws, mem, acc, trace, xtrace)
    return step, ok


# --------------------------------------------------------------------------- python path


def _simulate_python(a: LoopArrays, pl: np.ndarray, op_group: np.ndarray, force_events: bool = False):
    """One placement at a time through the loops of :mod:`envs.sim.kernels`, run as Python."""
    b_count = pl.shape[0]
    nd = a.n_devices
    step = np.empty(b_count)
    recv = np.zeros((b_count, nd))
    acc = np.zeros((b_count, 2))
    ok = np.zeros(b_count, dtype=bool)
    ws = _workspace(a, op_group.shape[0])
    for b in range(b_count):
        step[b], ok[b] = _one(a, pl[b].astype(np.int64), op_group, ws, recv[b], acc[b], force_events)
    return step, recv, acc[:, 0], acc[:, 1], ok


# --------------------------------------------------------------------------- numpy path


def _simulate_numpy(a: LoopArrays, pl: np.ndarray, op_group: np.ndarray):
    """The static pass vectorised over the batch (same operations as :func:`kernels.static_pass`
    in the same order), uncertified rows again through the Python engine."""
    threads = a.thread_of[pl]
    single = np.flatnonzero(np.all(threads == threads[:, :1], axis=1))  # kernels.one_thread, per row
    b_count = pl.shape[0]
    step, recv = np.zeros(b_count), np.zeros((b_count, a.n_devices))
    xt, xb, ok = np.zeros(b_count), np.zeros(b_count), np.zeros(b_count, dtype=bool)
    for lo in range(0, single.size, NUMPY_CHUNK):
        idx = single[lo:lo + NUMPY_CHUNK]
        step[idx], recv[idx], xt[idx], xb[idx], ok[idx] = static_pass_rows(a, pl[idx], op_group)
    bad = np.flatnonzero(~ok)
    if bad.size:
        step[bad], recv[bad], xt[bad], xb[bad], _ = _simulate_python(a, pl[bad], op_group, force_events=True)
    return step, recv, xt, xb, ok




# --------------------------------------------------------------------------- numba path

#: Batches smaller than this many placements run the numba loops on one thread: waking
#: worker threads costs more than a few placements take (~ms on a loaded machine).
SERIAL_BELOW = 32


def _simulate_numba(a: LoopArrays, pl: np.ndarray, op_group: np.ndarray, force_events: bool = False):
    b_count = pl.shape[0]
    nd = a.n_devices
    step = np.empty(b_count)
    recv = np.zeros((b_count, nd))
    acc = np.zeros((b_count, 2))
    ok = np.zeros(b_count, dtype=np.uint8)
    args = (pl, op_group, a.cost, nd, a.succ_ptr, a.succ_dst, a.succ_bytes, a.succ_grad, a.rg, a.gpred_ptr,
            a.gpred_src, a.rd, a.wr, a.thread_of, a.n_threads, a.lat_flat, a.inv_bw_flat, a.blocking, a.is_cpu,
            a.consts, a.id_base, a.id_op, force_events, step, recv, acc, ok)
    if b_count < SERIAL_BELOW:
        _kernels.batch_serial(*args)
    else:
        _kernels.batch_parallel(*args, _kernels.chunk_count(b_count))
    return step, recv, acc[:, 0], acc[:, 1], ok.astype(bool)


# --------------------------------------------------------------------------- public API


def _result(a: LoopArrays, pl: np.ndarray, raw, level: str) -> SimResult:
    step, recv, xt, xb, ok = raw
    b_count = pl.shape[0]
    nd = a.n_devices
    static, busy_t = (a.group_static, a.group_busy) if level == "group" else (a.op_static, a.op_busy)
    work = a.group_work if level == "group" else a.op_work
    flat = (np.arange(b_count)[:, None] * nd + pl).ravel()
    cols = np.arange(pl.shape[1])[None, :]
    busy = np.bincount(flat, weights=busy_t[cols, pl].ravel(), minlength=b_count * nd).reshape(b_count, nd)
    mem = np.bincount(flat, weights=np.broadcast_to(static, pl.shape).ravel(), minlength=b_count * nd)
    mem = mem.reshape(b_count, nd) + recv + device_max(pl, work, nd)
    # The optimizer step runs after the backward freed the kept activations and received
    # copies: its own peak is the parameters, gradients and state plus its temporaries.
    params, step_work, foreach = ((a.group_params, a.group_step_work, a.group_foreach) if level == "group"
                                  else (a.op_params, a.op_step_work, a.op_foreach))
    at_step = np.bincount(flat, weights=np.broadcast_to(params, pl.shape).ravel(), minlength=b_count * nd)
    foreach_sum = np.bincount(flat, weights=np.broadcast_to(foreach, pl.shape).ravel(), minlength=b_count * nd)
    temporaries = step_temporaries(a.kind_is_cpu, device_max(pl, step_work, nd), foreach_sum.reshape(b_count, nd))
    mem = np.maximum(mem, at_step.reshape(b_count, nd) + temporaries)
    over = np.maximum(mem - a.capacity[None, :], 0.0)
    return SimResult(step, busy, mem, ~np.any(over > 0, axis=1), over, xt, xb, ok)


BACKENDS = ("auto", "numba", "numpy", "python")


def simulate_batch(problem: PlacementProblem, placements: np.ndarray | Sequence[Sequence[int]],
                   backend: str = "auto") -> SimResult:
    """Simulate one training step for each placement of a batch.

    Args:
        problem: the compiled problem.
        placements: int array [B, G] (or [G]) of device indices in ``problem.node_names``
            (group) order.
        backend: ``"auto"`` (numba when available, else numpy), ``"numba"``, ``"numpy"`` (the
            static pass vectorised over the batch), or ``"python"`` (the loops as Python). All
            give the same results.

    Raises:
        PlacementError: wrong shape, non-integer entries, or a device index out of range.
    """
    pl = _as_batch(problem, placements)
    a = loop_arrays(problem)
    step, *rest = _run(a, pl, a.op_group, backend)
    if problem.rank_simulator is None:
        return _result(a, pl, (step, *rest), "group")
    # Ranks: the multi-process runtime's rules (envs.sim.ranks), its refusals included.
    return _with_rank_steps(_result(a, pl, (step, *rest), "group"),
                            problem.rank_simulator.schedules_rows(pl, problem.node_names))


def simulate_ops(problem: PlacementProblem, placements: object, backend: str = "auto") -> SimResult:
    """Simulate op placements: ``{op name: device name}`` or int rows [B, N] in ``problem.ops.names``
    order (e.g. a placement file's assignment, which may split a group). Same rules and
    numbers as :func:`simulate_batch` for the op rows of group rows."""
    ops = problem.ops
    if isinstance(placements, Mapping):
        dev_index = {d: i for i, d in enumerate(problem.device_names)}
        missing = [o for o in ops.names if o not in placements]
        if missing:
            raise PlacementError(f"op placement misses {len(missing)} of {ops.num_ops} ops, e.g. {missing[:3]}")
        unknown = sorted({str(d) for d in placements.values() if d not in dev_index})
        if unknown:
            raise PlacementError(f"op placement names unknown device(s) {unknown[:3]}; devices are {list(problem.device_names)}")
        placements = np.array([[dev_index[placements[o]] for o in ops.names]])
    pl = np.asarray(placements)
    if pl.ndim == 1:
        pl = pl[None, :]
    if pl.ndim != 2 or pl.shape[1] != ops.num_ops or not np.issubdtype(pl.dtype, np.integer):
        raise PlacementError(f"op placements have shape {pl.shape} ({pl.dtype}); expected int rows of {ops.num_ops} ops")
    if pl.size and (pl.min() < 0 or pl.max() >= problem.num_devices):
        raise PlacementError(f"op placement holds a device index outside 0..{problem.num_devices - 1}")
    pl = np.ascontiguousarray(pl, dtype=np.int32)
    a = loop_arrays(problem)
    step, *rest = _run(a, pl, np.arange(ops.num_ops, dtype=np.int64), backend)
    if problem.rank_simulator is None:
        return _result(a, pl, (step, *rest), "op")
    return _with_rank_steps(_result(a, pl, (step, *rest), "op"),
                            problem.rank_simulator.schedules([dict(zip(ops.names, row.tolist())) for row in pl]))


def _with_rank_steps(result: SimResult, schedules: Sequence[RankSchedule]) -> SimResult:
    """``result`` with the rank simulator's step times, infinite where the runtime refuses the
    cut, and the reasons (the one-process memory figures stay: each rank holds its share)."""
    return replace(result, step_time=runnable_times(schedules), refusal=tuple(s.plan.refusal for s in schedules))


def _run(a: LoopArrays, pl: np.ndarray, op_group: np.ndarray, backend: str):
    if backend not in BACKENDS:
        raise PlacementError(f"unknown simulator backend {backend!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "numba" and not HAS_NUMBA:
        raise PlacementError("the numba backend was asked for but numba is not installed (pip install 'placer[jit]')")
    if backend == "python":
        return _simulate_python(a, pl, op_group)
    if backend == "numpy" or not HAS_NUMBA:
        return _simulate_numpy(a, pl, op_group)
    return _simulate_numba(a, pl, op_group)


def simulate(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
             backend: str = "auto") -> StepResult:
    """Simulate one placement (a ``{group: device}`` dict or a [G] index array)."""
    pl = _as_batch(problem, placement)
    if pl.shape[0] != 1:
        raise PlacementError(f"simulate takes one placement; got a batch of {pl.shape[0]} (use simulate_batch)")
    return simulate_batch(problem, pl, backend)[0]


def schedule(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
             ops: bool = False) -> Schedule:
    """The full timeline (every op, thread slice and copy) of one placement, for Gantt charts.

    ``placement`` is a group placement, or an op placement when ``ops`` is True (as
    :func:`simulate_ops` takes).
    """
    a = loop_arrays(problem)
    if ops:
        res = simulate_ops(problem, placement, backend="python")
        pl = np.asarray(placement if not isinstance(placement, Mapping) else
                        [problem.device_names.index(placement[o]) for o in problem.ops.names])
        op_group = np.arange(problem.ops.num_ops, dtype=np.int64)
    else:
        res = simulate_batch(problem, placement, backend="python")
        pl = _as_batch(problem, placement)[0]
        op_group = a.op_group
    row = np.asarray(pl, dtype=np.int64).ravel()
    n, nd = op_group.shape[0], a.n_devices
    trace = np.full((n, 8), np.nan)
    xtrace = np.full((n * nd, 6), np.nan)
    certified = bool(res.certified[0])
    _one(a, row, op_group, _workspace(a, n), np.zeros(nd), np.zeros(2), force_events=not certified, trace=trace, xtrace=xtrace)
    op_dev = row[op_group]
    cpu = a.is_cpu[op_dev] != 0
    no_bwd = a.rg == 0
    for col in (4, 5, 6, 7):
        trace[no_bwd, col] = np.nan
    return Schedule(
        placement=row,
        op_device=op_dev,
        fwd_host_start=trace[:, 0],
        fwd_host_end=trace[:, 1],
        fwd_start=np.where(cpu, trace[:, 0], trace[:, 2]),
        fwd_end=np.where(cpu, trace[:, 1], trace[:, 3]),
        bwd_thread_start=trace[:, 4],
        bwd_thread_end=trace[:, 5],
        bwd_start=np.where(cpu, trace[:, 4], trace[:, 6]),
        bwd_end=np.where(cpu, trace[:, 5], trace[:, 7]),
        copy_start=xtrace[:, 0].reshape(n, nd),
        copy_end=xtrace[:, 1].reshape(n, nd),
        grad_copy_thread_start=xtrace[:, 2].reshape(n, nd),
        grad_copy_thread_end=xtrace[:, 3].reshape(n, nd),
        grad_copy_start=xtrace[:, 4].reshape(n, nd),
        grad_copy_end=xtrace[:, 5].reshape(n, nd),
        certified=certified,
        result=res[0],
    )
