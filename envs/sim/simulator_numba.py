"""The numba drivers of :mod:`envs.sim.simulator` (imported only when numba is installed).

They compile the loops of :mod:`envs.sim.kernels` (``register_jitable`` functions: the
same source the ``"python"`` backend runs, so every path performs the same floating-point
operations in the same order) and spread the placements of a batch over numba's threads
in contiguous chunks, each with one :func:`envs.sim.kernels.workspace` reused from
placement to placement. A placement whose ops back onto one thread runs the certified
static pass; every other one (and any the pass does not certify) runs the exact engine
(:func:`envs.sim.kernels_engine.event_pass`) on the same thread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from numba import get_num_threads, njit, prange

from envs.sim import jit, kernels, kernels_engine
from envs.sim.kernels import one_thread, static_pass, workspace
from envs.sim.kernels_engine import event_pass


def chunk_count(count: int) -> int:
    """How many chunks :func:`batch_parallel` splits ``count`` placements into: a few per
    thread, so a slow chunk does not leave the other threads idle."""
    return min(count, 4 * get_num_threads())


@njit(cache=True, nogil=True)
def _rows(lo, hi, pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd,
          wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, id_base, id_op, force_events, step, recv,
          acc, ok):  # pragma: no cover - compiled
    """Placements ``lo..hi-1`` of ``pl``: static pass, else the engine; writes their output rows."""
    ws = workspace(op_group.shape[0], nd, n_threads, id_op.shape[0])
    s, t, done, mark, dst, nb, xr, lastissue, lastthread, maxidle = ws[0:10]
    trace = np.zeros((0, 8))
    xtrace = np.zeros((0, 6))
    for b in range(lo, hi):
        row = pl[b]
        mem = recv[b]
        a = acc[b]
        certified = False
        if not force_events and one_thread(row, thread_of):
            value, certified = static_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg,
                                           rd, wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, s, t,
                                           done, mark, dst, nb, xr, lastissue, lastthread, maxidle, mem, a, trace,
                                           xtrace)
        if certified:
            step[b] = value
            ok[b] = 1
            continue
        for k in range(nd):
            mem[k] = 0.0
        a[0] = 0.0
        a[1] = 0.0
        step[b] = event_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr,
                             gpred_src, rd, wr, thread_of, n_threads, lat, inv_bw, blocking, consts, id_base, id_op,
                             ws, mem, a, trace, xtrace)
        ok[b] = 0


@njit(cache=True, nogil=True)
def batch_serial(pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd, wr,
                 thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, id_base, id_op, force_events, step, recv,
                 acc, ok):  # pragma: no cover - compiled
    """Every placement on the calling thread (small batches: waking workers costs more)."""
    # A typed zero, not the literal 0: a literal gives _rows a second compiled signature
    # beside batch_parallel's (~5 s more on a cold cache).
    first = np.int64(0)
    _rows(first, pl.shape[0], pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src,
          rd, wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, id_base, id_op, force_events, step,
          recv, acc, ok)


@njit(cache=True, nogil=True, parallel=True)
def batch_parallel(pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd,
                   wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts, id_base, id_op, force_events, step,
                   recv, acc, ok, chunks):  # pragma: no cover - compiled
    """Placements in ``chunks`` contiguous chunks (:func:`chunk_count`) spread over numba's
    threads; each chunk allocates its work arrays once and writes only its own rows."""
    count = pl.shape[0]
    for c in prange(chunks):
        _rows(c * count // chunks, (c + 1) * count // chunks, pl, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes,
              succ_grad, rg, gpred_ptr, gpred_src, rd, wr, thread_of, n_threads, lat, inv_bw, blocking, is_cpu, consts,
              id_base, id_op, force_events, step, recv, acc, ok)


#: The files whose source the drivers compile (:func:`kernels_digest`).
KERNEL_SOURCES = (kernels, kernels_engine, jit)


def kernels_digest() -> str:
    """One hash of the loops' source files (:data:`KERNEL_SOURCES`)."""
    digest = hashlib.sha256()
    for module in KERNEL_SOURCES:
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _key_cache_on_kernels(*dispatchers) -> None:
    """numba's disk cache keys a compiled function on the contents of its own file only
    (``numba.core.caching``: the index is stale when that file's hash changes). The loops
    these drivers compile live in kernels.py and kernels_engine.py, so their hash joins the
    key: otherwise an edit there (a checkout, a pull) would keep running the machine code of
    the old loops."""
    digest = kernels_digest()
    for fn in dispatchers:
        cache_file = getattr(getattr(fn, "_cache", None), "_cache_file", None)
        if cache_file is not None:
            cache_file._source_stamp = (cache_file._source_stamp, digest)


_key_cache_on_kernels(_rows, batch_serial, batch_parallel)
