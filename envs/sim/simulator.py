"""The batched training-step simulator: step time, busy time and peak memory of placements.

Semantics (the reference simulator, :mod:`envs.sim.reference_simulator`, implements exactly
the same rules as an event-driven simulation, and the tests hold the two to 1e-9):

* **Compute**: one in-order stream per device. A device runs the forward ops placed on it
  in the problem's topological order, then the backward ops placed on it in reverse
  order (as autograd queues them on each device's stream). An op starts when its device
  is free and all its inputs have arrived.
* **Forward**: node i's input from predecessor p arrives when p finished, or, when p sits
  on another device, when the copy of the edge's tensor over the link p→i finished.
* **Backward**: only nodes that require grad have a backward op. Node i's backward waits
  for the gradient from every successor c that requires grad: when c's backward
  finished, or, across devices, when the gradient copy over the link c→i finished.
* **Transfers**: every cut edge is one transfer forward (and one gradient transfer back
  when both ends require grad), costing ``latency + bytes / bandwidth``. Transfers occupy
  the link, not the devices, so they overlap compute. Each ordered device pair (a, b) is
  one channel (a copy engine/link direction) that carries one transfer at a time, FIFO in
  the order the simulator issues them: forward transfers by (consumer in topological
  order, producer ascending), then gradient transfers by (receiving node in reverse
  order, sender ascending). A transfer starts when its tensor is ready and its channel
  is free.
* **Step time** is when the last op finishes. **Busy time** per device is the sum of its
  ops' forward and backward times.
* **Memory** per device: parameters + gradients + optimizer state of its nodes, plus the
  activations its nodes keep for backward (``act_bytes``), plus the received copy of
  every cut edge's tensor on the consumer's device. Activations and received copies are
  allocated during the forward and freed by backward ops; since a device's stream runs
  all its forward ops before any backward op, and every copy into a device feeds one of
  its forward ops, all allocations on a device precede all its frees: the peak over the
  schedule is reached at the forward/backward boundary and equals that sum.
* A placement that does not fit is not an error: ``fits`` is False and ``over_memory``
  says by how many bytes each device is over.

Three implementations of the same loop: a numpy path (loop over nodes, vectorised over
the batch) and a plain-Python path for small batches, always available, and a numba path
(:mod:`envs.sim.simulator_numba`, threads over groups of placements) used when numba imports
(:data:`HAS_NUMBA`; set ``PLACER_DISABLE_NUMBA=1`` to force numpy). All three give
the same step times and memory bit for bit; the reference agrees to ~1e-15 relative (it
divides by the bandwidth where the batched paths multiply by its inverse).
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from envs.sim.problem import PlacementError, PlacementProblem

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
    """

    step_time: float
    busy_time: np.ndarray
    peak_memory: np.ndarray
    fits: bool
    over_memory: np.ndarray
    transfer_time: float
    transfer_bytes: float

    def memory_problems(self, device_names: Sequence[str]) -> list[str]:
        """One line per device over its capacity, e.g. ``"gpu0: 13.20 GiB needed, 1.20 GiB over"``."""
        return [
            f"{name}: {peak / 2**30:.2f} GiB needed, {over / 2**30:.2f} GiB over"
            for name, peak, over in zip(device_names, self.peak_memory, self.over_memory)
            if over > 0
        ]

    def describe(self, device_names: Sequence[str]) -> str:
        """A one-line summary: step time, whether it fits (and where not), transfers."""
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
        )


@dataclass(frozen=True)
class Schedule:
    """Start and finish time of every op and transfer of one placement (for Gantt charts).

    Attributes:
        placement: [N] device index per node.
        fwd_start, fwd_end, bwd_start, bwd_end: [N] seconds (bwd_* are NaN where the node
            has no backward op).
        fwd_xfer_start, fwd_xfer_end: [E] forward copy of each edge (NaN when not cut).
        bwd_xfer_start, bwd_xfer_end: [E] gradient copy of each edge (NaN when none).
        result: the step's :class:`StepResult`.
    """

    placement: np.ndarray
    fwd_start: np.ndarray
    fwd_end: np.ndarray
    bwd_start: np.ndarray
    bwd_end: np.ndarray
    fwd_xfer_start: np.ndarray
    fwd_xfer_end: np.ndarray
    bwd_xfer_start: np.ndarray
    bwd_xfer_end: np.ndarray
    result: StepResult


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class _Arrays:
    """Contiguous arrays in the layout both kernels read (built once per problem).

    Ordered device pairs are flattened to ``src * D + dst``; ``lat_flat`` and ``inv_bw_flat``
    are 0 on the diagonal, so a same-device "transfer" costs exactly 0 and the kernels can
    update channels without branching. Both kernels compute a transfer as
    ``latency + bytes * (1 / bandwidth)`` (a multiply instead of a division, identical in the
    two paths; within an ulp of the reference's ``latency + bytes / bandwidth``). A per-slot
    table of durations was tried: equal at D=4, 6x slower at D=9 (it streams D*D doubles per edge).
    """

    fwd: np.ndarray  # [N, D] float64
    bwd: np.ndarray  # [N, D] (0 where the node has no backward op)
    busy: np.ndarray  # [N, D] fwd + bwd
    rg: np.ndarray  # [N] uint8, node has a backward op
    pred_ptr: np.ndarray  # [N+1] int64: incoming-edge slots of node i
    pred_src: np.ndarray  # [S] source node of each slot
    pred_bytes: np.ndarray  # [S]
    pred_eid: np.ndarray  # [S] edge id of each slot
    gsucc_ptr: np.ndarray  # [N+1] outgoing gradient edges (both ends require grad)
    gsucc_dst: np.ndarray
    gsucc_bytes: np.ndarray
    gsucc_eid: np.ndarray
    static_mem: np.ndarray  # [N] params + grads + optimizer state + kept activations
    capacity: np.ndarray  # [D]
    lat_flat: np.ndarray  # [D*D] latency of pair src*D+dst, 0 on the diagonal
    inv_bw_flat: np.ndarray  # [D*D] 1/bandwidth, 0 on the diagonal


# Problems are frozen and compared by identity: cache their kernel arrays beside them.
_ARRAYS_CACHE: "weakref.WeakKeyDictionary[PlacementProblem, _Arrays]" = weakref.WeakKeyDictionary()


def _arrays(problem: PlacementProblem) -> _Arrays:
    cached = _ARRAYS_CACHE.get(problem)
    if cached is not None:
        return cached
    src = np.asarray(problem.edge_src, dtype=np.int64)
    dst = np.asarray(problem.edge_dst, dtype=np.int64)
    nbytes = np.asarray(problem.edge_bytes, dtype=np.float64)
    rg = np.asarray(problem.requires_grad, dtype=bool)
    pred_edge = np.asarray(problem.pred_edge, dtype=np.int64)
    succ_ptr = np.asarray(problem.succ_ptr, dtype=np.int64)
    succ_edge = np.asarray(problem.succ_edge, dtype=np.int64)
    latency = np.asarray(problem.latency, dtype=np.float64)
    bandwidth = np.asarray(problem.bandwidth, dtype=np.float64)
    n = problem.num_nodes
    # Keep only gradient edges in the backward CSR, preserving the (src, dst) order.
    keep = (rg[src] & rg[dst])[succ_edge]
    owner = np.repeat(np.arange(n), np.diff(succ_ptr))
    g_edges = succ_edge[keep]
    g_ptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner[keep], minlength=n), out=g_ptr[1:])
    fwd = np.ascontiguousarray(problem.fwd_time, dtype=np.float64)
    bwd = np.ascontiguousarray(np.where(rg[:, None], problem.bwd_time, 0.0), dtype=np.float64)
    # The schedule arithmetic (and the numba kernel's branch-free channel update) relies on
    # every time and size being a finite number >= 0; a cost model that broke this is a bug
    # worth a clear message rather than a silently wrong step time.
    for label, values in (("fwd_time", fwd), ("bwd_time", bwd), ("edge_bytes", nbytes), ("latency", latency)):
        if values.size and not (np.all(np.isfinite(values)) and values.min() >= 0):
            raise PlacementError(f"problem.{label} must hold finite numbers >= 0; got min {np.min(values)!r}")
    if not np.all(bandwidth > 0):  # inf (a device to itself) is fine; 0, negative or NaN is not
        raise PlacementError(f"problem.bandwidth must be > 0; got min {np.min(bandwidth)!r}")
    arrays = _Arrays(
        fwd=fwd,
        bwd=bwd,
        busy=np.ascontiguousarray(fwd + bwd),
        rg=rg.astype(np.uint8),
        pred_ptr=np.ascontiguousarray(problem.pred_ptr, dtype=np.int64),
        pred_src=np.ascontiguousarray(src[pred_edge]),
        pred_bytes=np.ascontiguousarray(nbytes[pred_edge]),
        pred_eid=np.ascontiguousarray(pred_edge),
        gsucc_ptr=g_ptr,
        gsucc_dst=np.ascontiguousarray(dst[g_edges]),
        gsucc_bytes=np.ascontiguousarray(nbytes[g_edges]),
        gsucc_eid=np.ascontiguousarray(g_edges),
        static_mem=np.ascontiguousarray(problem.static_memory() + problem.act_bytes, dtype=np.float64),
        capacity=np.ascontiguousarray(problem.memory_capacity, dtype=np.float64),
        lat_flat=np.ascontiguousarray(latency.ravel() * (1 - np.eye(len(latency)).ravel())),
        inv_bw_flat=np.ascontiguousarray((1.0 / bandwidth).ravel()),
    )
    _ARRAYS_CACHE[problem] = arrays
    return arrays


def _as_batch(problem: PlacementProblem, placements: object) -> np.ndarray:
    """Validate placements ([B, N] or [N] ints, or a dict) and return a C-contiguous int32 [B, N]."""
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


# --------------------------------------------------------------------------- numpy path


def _simulate_numpy(problem: PlacementProblem, pl: np.ndarray, trace: bool = False):
    """Loop over nodes and edges, vectorised over the batch (rows of ``pl``).

    Channel state is a flat [B * D * D] array; a transfer between devices ``x`` and ``y``
    of placement ``b`` uses slot ``b * D*D + x * D + y``. Updates are branch-free: the
    diagonal slot of a non-cut edge receives a value that is never read back as a
    channel time (its arrival is the producer's finish instead).
    """
    a = _arrays(problem)
    b_count, n = pl.shape
    d_count = problem.num_devices
    dd = d_count * d_count
    rows = np.arange(b_count)
    plt = np.ascontiguousarray(pl.T.astype(np.intp))  # node-major: plt[i] is node i's device in every row
    dev_base = rows * d_count
    chan_base = rows * dd
    dev_free = np.zeros(b_count * d_count)
    chan_free = np.zeros(b_count * dd)
    fin_f = np.zeros((n, b_count))
    fin_b = np.zeros((n, b_count))
    xfer_time = np.zeros(b_count)
    xfer_bytes = np.zeros(b_count)
    recv = np.zeros(b_count * d_count)
    if trace:
        st_f = np.zeros((n, b_count))
        st_b = np.full((n, b_count), np.nan)
        fin_b[:] = np.nan
        xf = np.full((4, problem.num_edges, b_count), np.nan)

    def pass_(i, d, k_lo, k_hi, other_nodes, nbytes, finish, eids, trace_row, count_recv):
        ready = np.zeros(b_count)
        for k in range(k_lo, k_hi):
            o = other_nodes[k]
            do = plt[o]
            cut = do != d
            pair = do * d_count + d
            slot = chan_base + pair
            dur = a.lat_flat[pair] + nbytes[k] * a.inv_bw_flat[pair]
            arrival = finish[o]
            begin = np.maximum(arrival, chan_free[slot])
            end = begin + dur
            chan_free[slot] = end
            ready = np.maximum(ready, np.where(cut, end, arrival))
            xfer_time[:] += dur
            moved = np.where(cut, nbytes[k], 0.0)
            xfer_bytes[:] += moved
            if count_recv:
                recv[dev_base + d] += moved
            if trace:
                xf[trace_row, eids[k]] = np.where(cut, begin, np.nan)
                xf[trace_row + 1, eids[k]] = np.where(cut, end, np.nan)
        return ready

    for i in range(n):
        d = plt[i]
        ready = pass_(i, d, a.pred_ptr[i], a.pred_ptr[i + 1], a.pred_src, a.pred_bytes,
                      fin_f, a.pred_eid, 0, True)
        slot = dev_base + d
        start = np.maximum(ready, dev_free[slot])
        fin_f[i] = start + a.fwd[i, d]
        dev_free[slot] = fin_f[i]
        if trace:
            st_f[i] = start

    for i in range(n - 1, -1, -1):
        if not a.rg[i]:
            continue
        d = plt[i]
        ready = pass_(i, d, a.gsucc_ptr[i], a.gsucc_ptr[i + 1], a.gsucc_dst, a.gsucc_bytes,
                      fin_b, a.gsucc_eid, 2, False)
        slot = dev_base + d
        start = np.maximum(ready, dev_free[slot])
        fin_b[i] = start + a.bwd[i, d]
        dev_free[slot] = fin_b[i]
        if trace:
            st_b[i] = start

    flat = (dev_base[:, None] + pl).ravel()
    cost = a.busy[np.arange(n)[None, :], pl].ravel()
    size = b_count * d_count
    busy = np.bincount(flat, weights=cost, minlength=size).reshape(b_count, d_count)
    mem = np.bincount(flat, weights=np.broadcast_to(a.static_mem, pl.shape).ravel(), minlength=size)
    mem = (mem + recv).reshape(b_count, d_count)
    step = dev_free.reshape(b_count, d_count).max(axis=1)
    result = (step, busy, mem, xfer_time, xfer_bytes)
    if trace:
        return result, (st_f, fin_f, st_b, fin_b, xf)
    return result


# --------------------------------------------------------------------------- scalar path

#: Without numba, batches smaller than this run a plain-Python loop per placement: the
#: numpy path pays ~15 numpy calls per edge whatever the batch size, so for one placement
#: a scalar loop is ~25x faster (1,000 nodes: ~7/s vectorised vs ~150/s scalar).
SCALAR_BELOW = 8


def _simulate_scalar(problem: PlacementProblem, pl: np.ndarray):
    """One placement at a time in plain Python, same operations in the same order as numba."""
    a = _arrays(problem)
    b_count, n = pl.shape
    nd = problem.num_devices
    pred_ptr, pred_src, pred_bytes = a.pred_ptr.tolist(), a.pred_src.tolist(), a.pred_bytes.tolist()
    gs_ptr, gs_dst, gs_bytes = a.gsucc_ptr.tolist(), a.gsucc_dst.tolist(), a.gsucc_bytes.tolist()
    lat, inv_bw = a.lat_flat.tolist(), a.inv_bw_flat.tolist()
    fwd, bwd, busy_t = a.fwd.tolist(), a.bwd.tolist(), a.busy.tolist()
    static, rg = a.static_mem.tolist(), a.rg.tolist()
    out = (np.empty(b_count), np.empty((b_count, nd)), np.empty((b_count, nd)), np.empty(b_count), np.empty(b_count))
    for b in range(b_count):
        row = pl[b].tolist()
        dev = [0.0] * nd
        chan = [0.0] * (nd * nd)
        fin_f = [0.0] * n
        fin_b = [0.0] * n
        busy = [0.0] * nd
        mem = [0.0] * nd
        tt = tb = 0.0
        for i in range(n):
            d = row[i]
            ready = received = 0.0
            for k in range(pred_ptr[i], pred_ptr[i + 1]):
                p = pred_src[k]
                dp = row[p]
                pair = dp * nd + d
                arrival = fin_f[p]
                dur = lat[pair] + pred_bytes[k] * inv_bw[pair]
                c = chan[pair]
                end = (arrival if arrival > c else c) + dur
                chan[pair] = end
                tt += dur
                if dp != d:
                    arrival = end
                    received += pred_bytes[k]
                ready = arrival if arrival > ready else ready
            free = dev[d]
            fin = (ready if ready > free else free) + fwd[i][d]
            fin_f[i] = fin
            dev[d] = fin
            tb += received
            busy[d] += busy_t[i][d]
            mem[d] += static[i] + received
        for i in range(n - 1, -1, -1):
            if not rg[i]:
                continue
            d = row[i]
            ready = 0.0
            for k in range(gs_ptr[i], gs_ptr[i + 1]):
                cn = gs_dst[k]
                dc = row[cn]
                pair = dc * nd + d
                arrival = fin_b[cn]
                dur = lat[pair] + gs_bytes[k] * inv_bw[pair]
                c = chan[pair]
                end = (arrival if arrival > c else c) + dur
                chan[pair] = end
                tt += dur
                if dc != d:
                    arrival = end
                    tb += gs_bytes[k]
                ready = arrival if arrival > ready else ready
            free = dev[d]
            fin = (ready if ready > free else free) + bwd[i][d]
            fin_b[i] = fin
            dev[d] = fin
        out[0][b] = max(dev)
        out[1][b] = busy
        out[2][b] = mem
        out[3][b] = tt
        out[4][b] = tb
    return out


# --------------------------------------------------------------------------- numba path

#: Batches smaller than this many placements run the numba kernel on one thread: waking
#: worker threads costs more than a few groups of placements take (~ms on a loaded machine).
SERIAL_BELOW = 32
#: Batches smaller than this run one placement at a time (one lane): padding 1-3 placements
#: to a group of 8 interleaved lanes costs more than the interleaving gains.
ONE_BY_ONE_BELOW = 4

# Kernel inputs in the layout :mod:`envs.sim.simulator_numba` reads, cached beside the problem.
_NUMBA_INPUTS_CACHE: "weakref.WeakKeyDictionary[PlacementProblem, dict[int, tuple]]" = weakref.WeakKeyDictionary()


def _numba_inputs(problem: PlacementProblem, lanes: int) -> tuple:
    """The read-only arguments of a ``lanes``-wide kernel: device-index dtype, [N * D] cost
    tables, uint64 CSR whose node indices are pre-multiplied by ``lanes``."""
    per_problem = _NUMBA_INPUTS_CACHE.setdefault(problem, {})
    if lanes in per_problem:
        return per_problem[lanes]
    a = _arrays(problem)

    def u64(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.uint64)

    row_type = np.zeros(0, dtype=np.uint8 if problem.num_devices <= 256 else np.uint32)
    inputs = (row_type, a.fwd.ravel(), a.bwd.ravel(), a.busy.ravel(), a.rg, u64(a.pred_ptr), u64(a.pred_src * lanes),
              a.pred_bytes, u64(a.gsucc_ptr), u64(a.gsucc_dst * lanes), a.gsucc_bytes, a.lat_flat,
              a.inv_bw_flat, a.static_mem)
    per_problem[lanes] = inputs
    return inputs


def _simulate_numba(problem: PlacementProblem, pl: np.ndarray):
    if pl.shape[0] < ONE_BY_ONE_BELOW:
        kernel, lanes = _kernels.batch_one_by_one, 1
    else:
        kernel = _kernels.batch_serial if pl.shape[0] < SERIAL_BELOW else _kernels.batch_parallel
        lanes = _kernels.GROUP
    b_count = pl.shape[0]
    d_count = problem.num_devices
    step = np.empty(b_count)
    busy = np.empty((b_count, d_count))
    mem = np.empty((b_count, d_count))
    xt = np.empty(b_count)
    xb = np.empty(b_count)
    kernel(pl, *_numba_inputs(problem, lanes), step, busy, mem, xt, xb)
    return step, busy, mem, xt, xb


# --------------------------------------------------------------------------- public API


def _result(problem: PlacementProblem, raw) -> SimResult:
    step, busy, mem, xt, xb = raw
    over = np.maximum(mem - _arrays(problem).capacity[None, :], 0.0)
    return SimResult(step, busy, mem, ~np.any(over > 0, axis=1), over, xt, xb)


def simulate_batch(problem: PlacementProblem, placements: np.ndarray | Sequence[Sequence[int]],
                   backend: str = "auto") -> SimResult:
    """Simulate one training step for each placement of a batch.

    Args:
        problem: the compiled problem.
        placements: int array [B, N] (or [N]) of device indices in ``problem.node_names`` order.
        backend: ``"auto"`` (numba when available), ``"numba"``, ``"numpy"`` (no JIT: a
            plain-Python loop for batches under :data:`SCALAR_BELOW`, vectorised numpy
            above), or ``"python"`` (always the plain-Python loop). All give the same
            step times and memory.

    Raises:
        PlacementError: wrong shape, non-integer entries, or a device index out of range.
    """
    return _simulate_checked(problem, _as_batch(problem, placements), backend)


def _simulate_checked(problem: PlacementProblem, pl: np.ndarray, backend: str) -> SimResult:
    if backend not in ("auto", "numba", "numpy", "python"):
        raise PlacementError(f"unknown simulator backend {backend!r}; expected 'auto', 'numba', 'numpy' or 'python'")
    if backend == "numba" and not HAS_NUMBA:
        raise PlacementError("the numba backend was asked for but numba is not installed (pip install 'placer[jit]')")
    if backend == "python" or ((backend == "numpy" or not HAS_NUMBA) and pl.shape[0] < SCALAR_BELOW):
        return _result(problem, _simulate_scalar(problem, pl))
    if backend == "numpy" or not HAS_NUMBA:
        return _result(problem, _simulate_numpy(problem, pl))
    return _result(problem, _simulate_numba(problem, pl))


def simulate(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
             backend: str = "auto") -> StepResult:
    """Simulate one placement (a ``{node: device}`` dict or an [N] index array)."""
    pl = _as_batch(problem, placement)
    if pl.shape[0] != 1:
        raise PlacementError(f"simulate takes one placement; got a batch of {pl.shape[0]} (use simulate_batch)")
    return _simulate_checked(problem, pl, backend)[0]


def schedule(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray) -> Schedule:
    """The full timeline (every op and transfer) of one placement, for Gantt charts and debugging."""
    pl = _as_batch(problem, placement)
    if pl.shape[0] != 1:
        raise PlacementError(f"schedule takes one placement; got a batch of {pl.shape[0]}")
    raw, (st_f, fin_f, st_b, fin_b, xf) = _simulate_numpy(problem, pl, trace=True)
    return Schedule(
        placement=pl[0],
        fwd_start=st_f[:, 0],
        fwd_end=fin_f[:, 0],
        bwd_start=st_b[:, 0],
        bwd_end=fin_b[:, 0],
        fwd_xfer_start=xf[0, :, 0],
        fwd_xfer_end=xf[1, :, 0],
        bwd_xfer_start=xf[2, :, 0],
        bwd_xfer_end=xf[3, :, 0],
        result=_result(problem, raw)[0],
    )
