"""The numba drivers of :mod:`envs.sim.simulator` (imported only when numba is installed).

They compile the loops of :mod:`envs.sim.kernels` (``register_jitable`` functions: the
same source the ``"python"`` backend runs, so every path performs the same floating-point
operations in the same order) and spread the placements of a batch over numba's threads.
Each placement runs the certified static pass; the ones it does not certify run the
exact engine (:func:`envs.sim.kernels.event_pass`) right away, on the same thread.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from envs.sim.kernels import event_pass, one_thread, static_pass

_NO_TRACE = np.zeros((0, 8))
_NO_XTRACE = np.zeros((0, 2))


@njit(cache=True, nogil=True)
def _one(pl, b, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd, wr,
         thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, force_events, step, recv, acc, ok,
         trace, xtrace):  # pragma: no cover - compiled
    """Placement ``b`` of ``pl``: static pass, else the engine; writes row ``b`` of the outputs."""
    n = op_group.shape[0]
    row = np.empty(pl.shape[1], dtype=np.int64)
    for g in range(pl.shape[1]):
        row[g] = pl[b, g]
    s = np.zeros(nd + 2)
    t = np.zeros(n_threads)
    done = np.zeros(n)
    mark = np.zeros(nd, dtype=np.int64)
    dst = np.zeros(nd, dtype=np.int64)
    nb = np.zeros(nd)
    xr = np.zeros(nd)
    lastissue = np.zeros(nd + 2)
    lastthread = np.zeros(nd + 2, dtype=np.int64)
    maxidle = np.zeros(n_threads)
    mem = recv[b]
    a = acc[b]
    certified = False
    if not force_events and one_thread(row, thread_of):
        value, certified = static_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, rd,
                                       wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, s, t, done,
                                       mark, dst, nb, xr, lastissue, lastthread, maxidle, mem, a, trace, xtrace)
    if certified:
        step[b] = value
        ok[b] = 1
        return
    for k in range(nd):
        mem[k] = 0.0
    a[0] = 0.0
    a[1] = 0.0
    step[b] = event_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr,
                         gpred_src, rd, wr, thread_of, n_threads, lat, inv_bw, blocking, consts, s, mark, dst, nb,
                         mem, a, trace, xtrace)
    ok[b] = 0


@njit(cache=True, nogil=True)
def batch_serial(pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd, wr,
                 thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, force_events, step, recv, acc,
                 ok):  # pragma: no cover - compiled
    """Every placement on the calling thread (small batches: waking workers costs more)."""
    trace = np.zeros((0, 8))
    xtrace = np.zeros((0, 2))
    for b in range(pl.shape[0]):
        _one(pl, b, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd, wr,
             thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, force_events, step, recv, acc, ok,
             trace, xtrace)


@njit(cache=True, nogil=True, parallel=True)
def batch_parallel(pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd,
                   wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, force_events, step, recv, acc,
                   ok):  # pragma: no cover - compiled
    """Placements spread over numba's threads (each writes only its own output rows)."""
    for b in prange(pl.shape[0]):
        trace = np.zeros((0, 8))
        xtrace = np.zeros((0, 2))
        _one(pl, b, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd, wr,
             thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, force_events, step, recv, acc, ok,
             trace, xtrace)
