"""The exact backward of the op-level simulator: the autograd engine's event loop on arrays.

:func:`event_pass` runs every placement whose ops use more than one backward thread
(:func:`envs.sim.kernels.one_thread`), and those :func:`envs.sim.kernels.static_pass` does
not certify: per device thread, the ready node with the highest sequence number first,
streams fed in enqueue-time order (rule R7 of :mod:`envs.sim.reference_simulator`).
(Measured: random and block placements over several GPUs are almost never certified, see
benchmarks/results/simulator.md, so the static pass is tried only where it is exact by
construction.) Its work arrays come from :func:`envs.sim.kernels.workspace`, allocated once
per batch chunk, not per placement; the node ids are fixed per problem (:func:`node_ids`).
The arrays are those of :mod:`envs.sim.kernels`; like those loops, these are plain Python
that :mod:`envs.sim.simulator_numba` compiles.
"""

from __future__ import annotations

import numpy as np

from envs.sim.jit import jitable, leading_zeros, overload
from envs.sim.kernels import clear_streams, finish_step

__all__ = ["event_pass", "node_ids", "numbered_forward", "highest_bit"]


def highest_bit(word):
    """Index of the highest set bit of a non-zero 64-bit word (numba: one ``lzcnt``)."""
    return int(word).bit_length() - 1


if overload is not None:
    @overload(highest_bit)
    def _highest_bit_jit(word):  # pragma: no cover - compiled
        def impl(word):
            return 63 - np.int64(leading_zeros(word))
        return impl


_ONE = np.uint64(1)


def node_ids(succ_ptr: np.ndarray, nd: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed backward node ids in sequence order (placement-independent): op i is
    ``base[i]``, its k-th copy node in program order ``base[i] + 1 + k`` (an op has at most
    ``min(consumers, D - 1)`` copies). Returns ``(base [N+1], op of each id [M])``."""
    slots = 1 + np.minimum(np.diff(succ_ptr), max(nd - 1, 0))
    base = np.zeros(slots.shape[0] + 1, dtype=np.int64)
    np.cumsum(slots, out=base[1:])
    return base, np.repeat(np.arange(slots.shape[0], dtype=np.int64), slots)


@jitable
def numbered_forward(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, rd, wr, thread_of,
                     n_threads, lat, inv_bw, blocking, copy_s, id_base, ws, mem, acc, trace, xtrace):
    """The forward of :func:`event_pass` (R1-R5, the same operations as :func:`envs.sim.kernels.forward_pass`),
    which also gives each of this placement's copy nodes its id, counts every backward
    node's gradient producers, puts the nodes with none in their thread's ready bitset and
    counts the nodes per thread (``off[p + 1]``). Returns ``(host clock, node count)``.
    (Apart from the engine's loop for reading; measured no slower.)"""
    (s, _t, _done, mark, dst, nb, _xr, _li, _lt, _mi, dev, xid, rem, rmax, node_dev, node_bytes, gcount, off,
     words, summary, top, count, fut_k, fut_v, fut_n, free, cand_e, cand_pick, cand_id, dirty, node_host) = ws
    n = op_group.shape[0]
    nw = words.shape[0] // n_threads
    ns = summary.shape[0] // n_threads
    tracing = trace.shape[0] > 0
    for i in range(n):
        dev[i] = row[op_group[i]]
    clear_streams(s, mark, nd)
    for p in range(n_threads + 1):
        off[p] = 0
    h = 0.0
    m = 0
    for i in range(n):
        d = dev[i]
        base = (i * nd + d) * 6
        h0 = h
        h = h + cost[base]
        sd = s[rd[d]]
        st = h if h > sd else sd
        s[wr[d]] = st + cost[base + 1]
        if tracing:
            trace[i, 0] = h0
            trace[i, 1] = h
            trace[i, 2] = st
            trace[i, 3] = st + cost[base + 1]
        n_copies = 0
        own = 0  # gradients op i receives from its own device's consumers and its copies
        for k in range(succ_ptr[i], succ_ptr[i + 1]):
            b = dev[succ_dst[k]]
            if b != d:
                if mark[b] != i:
                    mark[b] = i
                    dst[n_copies] = b
                    n_copies += 1
                    nb[b] = succ_bytes[k]
                    gcount[b] = 0
                elif succ_bytes[k] > nb[b]:
                    nb[b] = succ_bytes[k]
                if succ_grad[k]:
                    gcount[b] += 1
            elif succ_grad[k]:
                own += 1
        v0 = id_base[i]
        for j in range(n_copies - 1, -1, -1):  # inserted after the producer: the last found runs first
            b = dst[j]
            pair = d * nd + b
            x = lat[pair] + nb[b] * inv_bw[pair]
            hh = h + copy_s
            sa = s[rd[d]]
            sb = s[rd[b]]
            e = hh if hh > sa else sa
            e = (e if e > sb else sb) + x
            s[wr[d]] = e
            s[wr[b]] = sb if sb > e else e
            h = e if blocking[pair] else hh
            mem[b] += nb[b]
            acc[0] += x
            acc[1] += nb[b]
            if tracing:
                xtrace[i * nd + b, 0] = e - x
                xtrace[i * nd + b, 1] = e
            if gcount[b] > 0:  # a gradient comes back: the copy's backward node, on b's thread
                w = v0 + n_copies - j
                xid[i * nd + b] = w
                rem[w] = gcount[b]
                rmax[w] = 0.0
                node_dev[w] = b
                node_bytes[w] = nb[b]
                node_host[w] = copy_s
                off[thread_of[b] + 1] += 1
                own += 1
                m += 1
        if rg[i]:
            rem[v0] = own
            rmax[v0] = 0.0
            node_dev[v0] = -1
            node_host[v0] = cost[base + 2]
            p = thread_of[d]
            off[p + 1] += 1
            m += 1
            if own == 0:  # ready when backward() starts, as its thread is: into the bitset
                wi = v0 >> 6
                words[p * nw + wi] |= _ONE << np.uint64(v0 & 63)
                j = wi >> 6
                summary[p * ns + j] |= _ONE << np.uint64(wi & 63)
                if count[p] == 0 or j > top[p]:
                    top[p] = j
                count[p] += 1
    return h, m


@jitable
def event_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd,
               wr, thread_of, n_threads, lat, inv_bw, blocking, consts, id_base, id_op, ws, mem, acc, trace, xtrace):
    """One placement with the exact engine (the reference's event loop, R7); returns the step.

    Backward nodes have the fixed ids of :func:`node_ids` (sequence order); the forward
    (:func:`numbered_forward`) numbers this placement's copy nodes and counts every node's
    gradient producers. Per thread p, the nodes ready by ``free[p]`` (when the thread is free)
    are a bitset over ids (a word per 64 ids, a summary word per 64 words, the highest
    non-empty summary word in ``top[p]``), so the engine's pick, the highest id, is two
    bit scans; nodes ready later wait in a heap by (ready time, decreasing id) and move to
    the bitset once ``free[p]`` reaches them. Each thread's next node (picked when the
    thread is free, or when its earliest node gets ready) is enqueued after its host part;
    enqueues happen one at a time in time order, at equal times the higher id first.
    ``ws`` is a :func:`envs.sim.kernels.workspace`; ``trace`` and ``xtrace`` as for :func:`envs.sim.kernels.static_pass`.

    The set and heap operations, and the forward's op and copy, are written out in the
    loops rather than called: a compiled call that passes arrays takes a reference on
    each, two atomic operations that cost more here than the operation itself, and
    numba's ``inline="always"`` did not remove the cost (measured: :func:`envs.sim.jit.inlined`).
    """
    (s, _t, _done, mark, dst, nb, _xr, _li, _lt, _mi, dev, xid, rem, rmax, node_dev, node_bytes, gcount, off,
     words, summary, top, count, fut_k, fut_v, fut_n, free, cand_e, cand_pick, cand_id, dirty, node_host) = ws
    nw = words.shape[0] // n_threads
    ns = summary.shape[0] // n_threads
    copy_s = consts[0]
    tracing = trace.shape[0] > 0
    h, m = numbered_forward(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, rd, wr,
                            thread_of, n_threads, lat, inv_bw, blocking, copy_s, id_base, ws, mem, acc, trace, xtrace)
    # ---- backward (R7), the engine
    t_root = h + consts[1]
    for p in range(n_threads):
        off[p + 1] += off[p]
        fut_n[p] = 0
        free[p] = t_root
        cand_id[p] = -1
        dirty[p] = 1
    left = m
    while left > 0:
        best_p = -1
        for p in range(n_threads):
            if dirty[p]:
                dirty[p] = 0
                hb = off[p]
                when = free[p]
                # Nodes that got ready while the thread was busy move to its bitset (a node
                # already run from the heap, rem -1, is dropped: see below).
                while fut_n[p] > 0 and fut_k[hb] <= when:
                    v = -fut_v[hb]
                    size = fut_n[p] - 1  # heap pop: the last leaf sifts down from the root
                    fut_n[p] = size
                    key = fut_k[hb + size]
                    val = fut_v[hb + size]
                    k = 0
                    while True:
                        c = 2 * k + 1
                        if c >= size:
                            break
                        if c + 1 < size and (fut_k[hb + c + 1] < fut_k[hb + c] or (
                                fut_k[hb + c + 1] == fut_k[hb + c] and fut_v[hb + c + 1] < fut_v[hb + c])):
                            c += 1
                        if fut_k[hb + c] > key or (fut_k[hb + c] == key and fut_v[hb + c] >= val):
                            break
                        fut_k[hb + k] = fut_k[hb + c]
                        fut_v[hb + k] = fut_v[hb + c]
                        k = c
                    if size > 0:
                        fut_k[hb + k] = key
                        fut_v[hb + k] = val
                    if rem[v] == 0:
                        wi = v >> 6
                        words[p * nw + wi] |= _ONE << np.uint64(v & 63)
                        j = wi >> 6
                        summary[p * ns + j] |= _ONE << np.uint64(wi & 63)
                        if count[p] == 0 or j > top[p]:
                            top[p] = j
                        count[p] += 1
                if count[p] > 0:  # the highest ready id
                    j = top[p]
                    wi = j * 64 + highest_bit(summary[p * ns + j])
                    vid = wi * 64 + highest_bit(words[p * nw + wi])
                elif fut_n[p] > 0:  # idle until the earliest ready node (the highest id among equals)
                    when = fut_k[hb]
                    vid = -fut_v[hb]
                else:
                    cand_id[p] = -1
                    continue
                cand_id[p] = vid
                cand_pick[p] = when
                cand_e[p] = when + node_host[vid]
        for p in range(n_threads):  # a loop of its own: measured ~8% faster than one with the above
            if cand_id[p] >= 0 and (best_p < 0 or cand_e[p] < cand_e[best_p] or (
                    cand_e[p] == cand_e[best_p] and cand_id[p] > cand_id[best_p])):
                best_p = p
        p = best_p
        v = cand_id[p]
        pick = cand_pick[p]
        enq = cand_e[p]
        if count[p] > 0:  # the candidate is the bitset's highest id: clear it
            wi = v >> 6
            k = p * nw + wi
            words[k] &= ~(_ONE << np.uint64(v & 63))
            count[p] -= 1
            if words[k] == 0:
                j = wi >> 6
                summary[p * ns + j] &= ~(_ONE << np.uint64(wi & 63))
                if count[p] > 0:
                    while summary[p * ns + j] == 0:
                        j -= 1
                    top[p] = j
        else:  # the heap's top: left there, marked run (rem -1); it has ready time
            rem[v] = -1  # ``pick`` <= the thread's next free time, so the next refresh drops it
        dirty[p] = 1
        left -= 1
        i = id_op[v]
        d = dev[i]
        b = node_dev[v]
        if b < 0:  # the op: launched at ``enq``, its kernel queued on its stream
            base_c = (i * nd + d) * 6
            sd = s[rd[d]]
            s0 = enq if enq > sd else sd
            s[wr[d]] = s0 + cost[base_c + 3]
            if tracing:
                trace[i, 4] = pick
                trace[i, 5] = enq
                trace[i, 6] = s0
                trace[i, 7] = s0 + cost[base_c + 3]
            fin = enq
            k0 = gpred_ptr[i]  # gradients for its producers: op q's node (same device) or
            k1 = gpred_ptr[i + 1]  # the node of q's copy to d
        else:  # the gradient copy b -> d, issued at ``enq``
            pair = b * nd + d
            x = lat[pair] + node_bytes[v] * inv_bw[pair]
            sb = s[rd[b]]
            sa = s[rd[d]]
            e = enq if enq > sb else sb
            e = (e if e > sa else sa) + x
            s[wr[b]] = e
            s[wr[d]] = sa if sa > e else e
            fin = e if blocking[pair] else enq
            acc[0] += x
            acc[1] += node_bytes[v]
            if tracing:  # the row of the forward copy (i, b) whose gradient this is
                xtrace[i * nd + b, 2] = pick
                xtrace[i * nd + b, 3] = enq
                xtrace[i * nd + b, 4] = e - x
                xtrace[i * nd + b, 5] = e
            k0 = 0  # its gradient goes to op i's node
            k1 = 1
        free[p] = fin
        pw = thread_of[d]  # every node fed here runs on d's thread (for an op, this thread)
        for k in range(k0, k1):
            if b < 0:
                q = gpred_src[k]
                w = id_base[q] if dev[q] == d else xid[q * nd + d]
            else:
                w = id_base[i]
            if fin > rmax[w]:
                rmax[w] = fin
            rem[w] -= 1
            if rem[w] == 0:
                r = rmax[w]
                if r <= free[pw]:  # ready by the time its thread is free: the bitset
                    wi = w >> 6
                    words[pw * nw + wi] |= _ONE << np.uint64(w & 63)
                    j = wi >> 6
                    summary[pw * ns + j] |= _ONE << np.uint64(wi & 63)
                    if count[pw] == 0 or j > top[pw]:
                        top[pw] = j
                    count[pw] += 1
                else:  # heap push: sift up from a new leaf
                    hb = off[pw]
                    c = fut_n[pw]
                    fut_n[pw] = c + 1
                    while c > 0:
                        parent = (c - 1) // 2
                        pk = fut_k[hb + parent]
                        if pk < r or (pk == r and fut_v[hb + parent] <= -w):
                            break
                        fut_k[hb + c] = pk
                        fut_v[hb + c] = fut_v[hb + parent]
                        c = parent
                    fut_k[hb + c] = r
                    fut_v[hb + c] = -w
                dirty[pw] = 1
    return finish_step(free, n_threads, row, op_group, cost, nd, rd, wr, s, consts)
