"""The numba kernels of :mod:`envs.sim.simulator` (imported only when numba is installed).

The rules simulated are those of :mod:`envs.sim.simulator`'s docstring; this module holds only
the compiled loop, written for speed. The numpy and plain-Python paths of
:mod:`envs.sim.simulator` perform the same floating-point operations in the same order, so all
three give bit-identical results.

What makes it fast (each measured on the 1,000-node benchmark graph, 4 devices, one thread,
CPU time, same-process A/B; see ``benchmarks/results/simulator.md``):

* **Interleaved placements**: a thread simulates :data:`GROUP` placements side by side,
  state laid out ``[node or slot, lane]`` so one node's lanes share a cache line. The
  schedule is a chain of dependent loads, max and add; independent lanes let the CPU
  overlap them (4 lanes ~0.8x, 16 lanes ~0.9x the speed of 8).
* **Unsigned indices**: numba wraps negative signed indices around (a compare and a select
  per access, and the registers they need); every index here is ``uint64`` (``_U``), so no
  wraparound code is emitted: ~1.6x.
* **Accumulators in registers, no "is it cut" select**: the per-lane running values live
  in the stack frame (:func:`_stack_doubles`) instead of heap arrays, and an uncut edge
  updates a channel slot that always holds 0.0 (see ``real`` below): ~1.3x together.
* **One compiled function per driver**: numba's on-disk cache keys entries by function and
  signature, not by ``parallel=``, so the previous single ``batch`` function compiled twice
  (serial and parallel) shared one cache entry and, once the serial one was cached, the
  "parallel" kernel ran on one thread. :func:`batch_serial` and :func:`batch_parallel` are
  distinct functions calling the same :func:`simulate_group`.
"""

from __future__ import annotations

import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

#: Placements one thread simulates side by side (lanes).
GROUP = 8

# Times and bytes are finite and never NaN: these flags cannot change results. No "contract"
# (fused multiply-add) and no reassociation, so the arithmetic is exactly the numpy path's.
_FLAGS = {"nnan", "ninf", "nsz"}
_U = np.uint64


@intrinsic
def _stack_doubles(typingctx, count):  # pragma: no cover - runs inside the compiler
    """A pointer to ``count`` (a compile-time constant) uninitialised float64 in the stack frame.

    The per-lane accumulators (``ready``, ``received``, transfer totals) are updated on every
    edge. In an ``np.empty`` array they are a load and a store each time (the compiler cannot
    prove the heap array distinct from the others); in the stack frame, indexed by the
    unrolled lane loop with constant indices, LLVM keeps them in registers.
    """
    if not isinstance(count, types.IntegerLiteral):
        return None
    size = count.literal_value

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(types.float64), size=size)

    return types.CPointer(types.float64)(count), codegen


def _group_kernel(lanes: int):
    """Compile-once kernel simulating ``lanes`` placements side by side (a constant to numba).

    Closures over different ``lanes`` are distinct entries in numba's disk cache (the key
    includes the closure's values), unlike one function compiled with different options.
    """

    @njit(cache=True, nogil=True, fastmath=_FLAGS)
    def simulate_group(pl, lo, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr, gs_dst_g,
                       gs_bytes, lat, inv_bw, static_mem, step, busy, mem, xt, xb):  # pragma: no cover - compiled
        """Simulate placements ``lo .. lo + lanes - 1`` of ``pl`` and write their rows of the outputs.

        ``fwd``/``bwd``/``busy_t`` are [N * D] (node-major); CSR pointers are uint64, and so are
        ``pred_src_g``/``gs_dst_g``: node index * ``lanes``, the offset of the node's lane 0
        (multiplying in the kernel measured ~1.3x slower).
        ``row_type`` is an empty array whose dtype holds device indices (uint8 up to 256 devices:
        a quarter of the cache lines of uint32, ~5% faster). A short last group pads with
        all-on-device-0 lanes whose results are dropped.
        """
        bsz = pl.shape[0]
        n = static_mem.shape[0]
        nd = busy.shape[1]
        G = _U(lanes)
        ndu = _U(nd)
        rows = np.zeros(n * lanes, dtype=row_type.dtype)  # rows[i * G + g]: device of node i in lane g
        for g in range(lanes):
            if lo + g < bsz:
                for i in range(n):
                    rows[_U(i) * G + _U(g)] = pl[lo + g, i]
        # A 1.0/0.0 "is this pair a real channel" table: an uncut edge multiplies its channel
        # update by 0, so a diagonal slot always holds 0.0, which is <= every time; then the
        # "transfer" end of an uncut edge is max(arrival, 0.0) + 0.0 == arrival exactly, and the
        # kernel needs neither the compare nor the select of "is this edge cut" (times are >= 0,
        # see envs.sim.simulator._arrays). Bit-identical to the numpy path, which selects.
        real = np.ones(nd * nd)
        for j in range(nd):
            real[j * nd + j] = 0.0
        dev = np.zeros(nd * lanes)  # device stream free at, [device, lane]
        chan = np.zeros(nd * nd * lanes)  # channel free at, [src * D + dst, lane]
        # Finish times, forward then backward: the backward pass reads only successors' backward
        # finishes, written earlier in the same (reverse) pass, so it may overwrite the forward ones.
        fin = np.empty(n * lanes)
        busy_l = np.zeros(nd * lanes)
        mem_l = np.zeros(nd * lanes)
        ready = carray(_stack_doubles(lanes), lanes)
        received = carray(_stack_doubles(lanes), lanes)
        tt = carray(_stack_doubles(lanes), lanes)
        tb = carray(_stack_doubles(lanes), lanes)
        tt[:] = 0.0
        tb[:] = 0.0
        for ii in range(n):
            i = _U(ii)
            i_g = i * G
            for g in range(lanes):
                ready[g] = 0.0
                received[g] = 0.0
            for k in range(pred_ptr[i], pred_ptr[i + _U(1)]):
                p_g = pred_src_g[k]
                nb = pred_bytes[k]
                for gg in range(lanes):
                    g = _U(gg)
                    pair = rows[p_g + g] * ndu + rows[i_g + g]
                    arrival = fin[p_g + g]
                    slot = pair * G + g
                    c = chan[slot]
                    dur = lat[pair] + nb * inv_bw[pair]  # 0 on the diagonal
                    on_link = real[pair]
                    end = (arrival if arrival > c else c) + dur  # == arrival for an uncut edge
                    chan[slot] = end * on_link
                    tt[g] += dur
                    received[g] += nb * on_link
                    r = ready[g]
                    ready[g] = end if end > r else r
            for gg in range(lanes):
                g = _U(gg)
                d = rows[i_g + g]
                slot = d * G + g
                free = dev[slot]
                r = ready[g]
                f = (r if r > free else free) + fwd[i * ndu + d]
                fin[i_g + g] = f
                dev[slot] = f
                tb[g] += received[g]
                busy_l[slot] += busy_t[i * ndu + d]
                mem_l[slot] += static_mem[i] + received[g]
        for ii in range(n - 1, -1, -1):
            i = _U(ii)
            if rg[i] == 0:
                continue
            i_g = i * G
            for g in range(lanes):
                ready[g] = 0.0
            for k in range(gs_ptr[i], gs_ptr[i + _U(1)]):
                c_g = gs_dst_g[k]
                nb = gs_bytes[k]
                for gg in range(lanes):
                    g = _U(gg)
                    pair = rows[c_g + g] * ndu + rows[i_g + g]
                    arrival = fin[c_g + g]
                    slot = pair * G + g
                    c = chan[slot]
                    dur = lat[pair] + nb * inv_bw[pair]
                    on_link = real[pair]
                    end = (arrival if arrival > c else c) + dur
                    chan[slot] = end * on_link
                    tt[g] += dur
                    tb[g] += nb * on_link
                    r = ready[g]
                    ready[g] = end if end > r else r
            for gg in range(lanes):
                g = _U(gg)
                d = rows[i_g + g]
                slot = d * G + g
                free = dev[slot]
                r = ready[g]
                f = (r if r > free else free) + bwd[i * ndu + d]
                fin[i_g + g] = f
                dev[slot] = f
        for g in range(lanes):
            b = lo + g
            if b < bsz:
                m = 0.0
                for j in range(nd):
                    v = dev[j * lanes + g]
                    m = v if v > m else m
                    busy[b, j] = busy_l[j * lanes + g]
                    mem[b, j] = mem_l[j * lanes + g]
                step[b] = m
                xt[b] = tt[g]
                xb[b] = tb[g]

    return simulate_group


#: The batch kernel: :data:`GROUP` placements per call.
simulate_group = _group_kernel(GROUP)
#: One placement per call: for a batch of a few placements (a Gym step), padding it to
#: GROUP lanes costs ~5x what simulating it alone does.
simulate_one = _group_kernel(1)


@njit(cache=True, nogil=True)
def batch_serial(pl, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr, gs_dst_g, gs_bytes,
                 lat, inv_bw, static_mem, step, busy, mem, xt, xb):  # pragma: no cover - compiled
    """All groups of the batch on the calling thread (small batches: waking workers costs more)."""
    for grp in range((pl.shape[0] + GROUP - 1) // GROUP):
        simulate_group(pl, grp * GROUP, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr,
                       gs_dst_g, gs_bytes, lat, inv_bw, static_mem, step, busy, mem, xt, xb)


@njit(cache=True, nogil=True)
def batch_one_by_one(pl, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr, gs_dst_g, gs_bytes,
                     lat, inv_bw, static_mem, step, busy, mem, xt, xb):  # pragma: no cover - compiled
    """Each placement alone on the calling thread (batches of fewer than a few placements)."""
    for b in range(pl.shape[0]):
        simulate_one(pl, b, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr,
                     gs_dst_g, gs_bytes, lat, inv_bw, static_mem, step, busy, mem, xt, xb)


@njit(cache=True, nogil=True, parallel=True)
def batch_parallel(pl, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr, gs_dst_g, gs_bytes,
                   lat, inv_bw, static_mem, step, busy, mem, xt, xb):  # pragma: no cover - compiled
    """Groups spread over numba's threads (each group writes only its own output rows)."""
    for grp in prange((pl.shape[0] + GROUP - 1) // GROUP):
        simulate_group(pl, grp * GROUP, row_type, fwd, bwd, busy_t, rg, pred_ptr, pred_src_g, pred_bytes, gs_ptr,
                       gs_dst_g, gs_bytes, lat, inv_bw, static_mem, step, busy, mem, xt, xb)
