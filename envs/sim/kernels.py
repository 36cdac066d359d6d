"""The single-placement loops of the op-level simulator, in plain Python that numba can compile.

:mod:`envs.sim.simulator` runs these as they are (its ``"python"`` backend, and the exact
engine for the rows the numpy path cannot certify); :mod:`envs.sim.simulator_numba`
compiles the very same functions, so every path performs the same floating-point
operations in the same order. The rules are those of :mod:`envs.sim.reference_simulator`.

Two ways to run the backward (R7, the autograd engine):

* :func:`static_pass`, the fast path: every backward node in decreasing sequence number
  (ops from last to first, each op's copy nodes before it). It equals the engine exactly
  when the engine picks the nodes of each thread in that order and every stream receives
  its work in that order; the pass *certifies* both as it goes:

  - a thread that idled waiting for node n (ready after the thread was free) must not
    have a lower-sequence node that was ready earlier (the engine would have run that one
    first): ``ready[m] < max(ready of earlier idled nodes of the thread)`` fails;
  - on each GPU stream, the enqueue times in pass order must not decrease, and two
    threads must not enqueue on one stream at the same instant.

* :func:`envs.sim.kernels_engine.event_pass`, the exact engine (the reference's event loop on
  arrays), in a module of its own, for every placement whose ops use more than one backward
  thread (:func:`one_thread`) and those :func:`static_pass` does not certify. Both passes
  share the work arrays of :func:`workspace`, allocated once per batch chunk.

Arrays (built by :func:`envs.sim.loop_arrays.loop_arrays`): ``cost`` [N*D*6] as
``(i*D + d)*6 + k``; ``rd``/``wr`` the stream slot a device reads/writes (a GPU its own
index; a CPU reads slot D, always 0.0, and writes slot D+1, never read), ``lat``/``inv_bw``
[D*D] (0 on the diagonal and between CPU devices), ``blocking`` [D*D] (a copy with a CPU end
holds its thread until done), ``consts`` = (copy_s, loss_s, backward_call_s, step_s).
"""

from __future__ import annotations

import numpy as np

from envs.sim.jit import inlined, jitable


@inlined
def clear_streams(s, mark, nd):
    """The forward starts with idle streams and no copy target seen for any op."""
    for k in range(s.shape[0]):
        s[k] = 0.0
    for k in range(nd):
        mark[k] = -1


@inlined
def finish_step(thread_end, n_threads, row, op_group, cost, nd, rd, wr, s, consts):
    """``backward()`` returns when its last thread is done (``thread_end``), plus the call's
    host cost (``consts[2]``); then R8 (the optimizer) and R9 (the step end). Returns the step."""
    h = thread_end[0]
    for p in range(1, n_threads):
        if thread_end[p] > h:
            h = thread_end[p]
    h = optimizer_pass(row, op_group, cost, nd, rd, wr, h + consts[2], s)
    return step_end(h, s, nd, consts[3])


@jitable
def one_thread(row, thread_of):
    """Whether every device of ``row`` backs onto one thread (one GPU, or CPUs only): then the
    static pass is the engine's order (each node's gradients come from nodes run before it on
    the same thread), and it is the path taken; otherwise :func:`event_pass` runs."""
    first = thread_of[row[0]]
    for g in range(1, row.shape[0]):
        if thread_of[row[g]] != first:
            return False
    return True


@jitable
def copy_targets(i, d, row, op_group, succ_ptr, succ_dst, succ_bytes, mark, dst, nb):
    """The devices op ``i`` (on ``d``) is copied to: one copy per device, as apply inserts them.

    Fills ``dst[:count]`` in consumer order and ``nb[b]`` with the largest edge's bytes to
    ``b``; ``mark[b] == i`` marks the devices seen for this op. Returns ``count``.
    """
    count = 0
    for k in range(succ_ptr[i], succ_ptr[i + 1]):
        b = row[op_group[succ_dst[k]]]
        if b != d:
            if mark[b] != i:
                mark[b] = i
                dst[count] = b
                count += 1
                nb[b] = succ_bytes[k]
            elif succ_bytes[k] > nb[b]:
                nb[b] = succ_bytes[k]
    return count


@jitable
def forward_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, rd, wr, lat, inv_bw, blocking,
                 copy_s, s, mark, dst, nb, mem, acc, trace, xtrace):
    """R1-R5 over the ops in program order; returns the host clock after the forward.

    ``s`` [D+2] stream clocks (zeroed here), ``mark``/``dst``/``nb`` [D] scratch, ``mem`` [D]
    += received copies, ``acc`` [2] += (copy seconds, copy bytes). ``trace`` [N, 4] (or
    shape (0, 4)) receives host start/end and stream start/end of each op; ``xtrace``
    [N*D, 6] (or shape (0, 6)) in columns 0-1 the interval of each copy ``(i*D + b)``
    (columns 2-5 are the backward's: :func:`static_pass`).
    """
    n = op_group.shape[0]
    clear_streams(s, mark, nd)
    tracing = trace.shape[0] > 0
    h = 0.0
    for i in range(n):
        d = row[op_group[i]]
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
        count = copy_targets(i, d, row, op_group, succ_ptr, succ_dst, succ_bytes, mark, dst, nb)
        for j in range(count - 1, -1, -1):  # inserted after the producer: the last found runs first
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
    return h


@jitable
def optimizer_pass(row, op_group, cost, nd, rd, wr, h, s):
    """R8: ``optimizer.step()`` on the host in program order; returns the host clock."""
    n = op_group.shape[0]
    for i in range(n):
        d = row[op_group[i]]
        base = (i * nd + d) * 6
        h = h + cost[base + 4]
        sd = s[rd[d]]
        s[wr[d]] = (h if h > sd else sd) + cost[base + 5]
    return h


@jitable
def step_end(h, s, nd, step_s):
    """R9: the step ends when the host and every stream are done."""
    m = h
    for d in range(nd):
        if s[d] > m:
            m = s[d]
    return m + step_s


@jitable
def static_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, rd, wr, thread_of,
                n_threads, lat, inv_bw, blocking, is_cpu, consts, s, t, done, mark, dst, nb, xr, lastissue,
                lastthread, maxidle, mem, acc, trace, xtrace):
    """One placement, backward in decreasing sequence number (module doc).

    Returns ``(step, certified)``; ``mem`` [D] += received copies, ``acc`` [2] += copy
    seconds and bytes. ``trace`` [N, 8] (or shape (0, 8)) receives forward host/stream
    intervals (columns 0-3) and backward thread/stream intervals (4-7). ``xtrace`` [N*D, 6]
    (or shape (0, 6)) receives, for the copy of op i's output to device b (row ``i*D + b``),
    the forward copy's interval (columns 0-1), then its backward node's, the gradient
    flowing back from b to op i's device: the slice on b's thread that issues it (2-3) and
    the copy itself (4-5), as the reference's ``XB`` events.
    """
    copy_s = consts[0]
    h = forward_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, rd, wr, lat, inv_bw, blocking,
                     copy_s, s, mark, dst, nb, mem, acc, trace, xtrace)
    tracing = trace.shape[0] > 0
    t_root = h + consts[1]
    for p in range(n_threads):
        t[p] = t_root
        maxidle[p] = -1.0
    for k in range(s.shape[0]):
        lastissue[k] = -1.0
        lastthread[k] = -1
    for k in range(nd):
        mark[k] = -1
    ok = True
    n = op_group.shape[0]
    for i in range(n - 1, -1, -1):
        if rg[i] == 0:
            continue
        d = row[op_group[i]]
        r_op = t_root
        count = 0
        for k in range(succ_ptr[i], succ_ptr[i + 1]):
            c = succ_dst[k]
            b = row[op_group[c]]
            if b != d:
                if mark[b] != i:
                    mark[b] = i
                    dst[count] = b
                    count += 1
                    nb[b] = succ_bytes[k]
                    xr[b] = -1.0
                elif succ_bytes[k] > nb[b]:
                    nb[b] = succ_bytes[k]
            if succ_grad[k]:
                dc = done[c]
                if b == d:
                    r_op = dc if dc > r_op else r_op
                elif dc > xr[b]:
                    xr[b] = dc
        # Copy nodes, highest sequence number first: the first-found device's copy was
        # created last (it sits right after the producer in program order).
        for j in range(count):
            b = dst[j]
            r = xr[b]
            if r < 0.0:
                continue  # no gradient reaches this copy: the engine never runs it
            p = thread_of[b]
            tb = t[p]
            if r < maxidle[p]:
                ok = False
            if r > tb and r > maxidle[p]:
                maxidle[p] = r
            pick = tb if tb > r else r
            st = pick + copy_s
            pair = b * nd + d
            x = lat[pair] + nb[b] * inv_bw[pair]
            if is_cpu[b] == 0:
                if st < lastissue[b] or (st == lastissue[b] and lastthread[b] != p):
                    ok = False
                lastissue[b] = st
                lastthread[b] = p
            if is_cpu[d] == 0:
                if st < lastissue[d] or (st == lastissue[d] and lastthread[d] != p):
                    ok = False
                lastissue[d] = st
                lastthread[d] = p
            sb = s[rd[b]]
            sa = s[rd[d]]
            e = st if st > sb else sb
            e = (e if e > sa else sa) + x
            s[wr[b]] = e
            s[wr[d]] = sa if sa > e else e
            tt = e if blocking[pair] else st
            t[p] = tt
            r_op = tt if tt > r_op else r_op
            acc[0] += x
            acc[1] += nb[b]
            if tracing:
                xtrace[i * nd + b, 2] = pick
                xtrace[i * nd + b, 3] = st
                xtrace[i * nd + b, 4] = e - x
                xtrace[i * nd + b, 5] = e
        p = thread_of[d]
        tb = t[p]
        if r_op < maxidle[p]:
            ok = False
        if r_op > tb and r_op > maxidle[p]:
            maxidle[p] = r_op
        base = (i * nd + d) * 6
        st = tb if tb > r_op else r_op
        he = st + cost[base + 2]
        if is_cpu[d] == 0:
            if he < lastissue[d] or (he == lastissue[d] and lastthread[d] != p):
                ok = False
            lastissue[d] = he
            lastthread[d] = p
        sd = s[rd[d]]
        s0 = he if he > sd else sd
        s[wr[d]] = s0 + cost[base + 3]
        t[p] = he
        done[i] = he
        if tracing:
            trace[i, 4] = st
            trace[i, 5] = he
            trace[i, 6] = s0
            trace[i, 7] = s0 + cost[base + 3]
    return finish_step(t, n_threads, row, op_group, cost, nd, rd, wr, s, consts), ok


@jitable
def workspace(n, nd, n_threads, m_cap):
    """The work arrays of :func:`static_pass` and :func:`envs.sim.kernels_engine.event_pass` for ``n`` ops, ``nd``
    devices and ``m_cap`` node ids: allocated once and reused placement after placement
    (the ready bitsets are empty again when a placement ends)."""
    nw = (m_cap + 63) // 64
    ns = (nw + 63) // 64
    return (np.zeros(nd + 2), np.zeros(n_threads), np.zeros(n), np.zeros(nd, dtype=np.int64),
            np.zeros(nd, dtype=np.int64), np.zeros(nd), np.zeros(nd), np.zeros(nd + 2),
            np.zeros(nd + 2, dtype=np.int64), np.zeros(n_threads),
            # event_pass
            np.zeros(n, dtype=np.int64), np.zeros(n * nd, dtype=np.int64), np.zeros(m_cap, dtype=np.int64),
            np.zeros(m_cap), np.zeros(m_cap, dtype=np.int64), np.zeros(m_cap), np.zeros(nd, dtype=np.int64),
            np.zeros(n_threads + 1, dtype=np.int64), np.zeros(n_threads * nw, dtype=np.uint64),
            np.zeros(n_threads * ns, dtype=np.uint64), np.zeros(n_threads, dtype=np.int64),
            np.zeros(n_threads, dtype=np.int64), np.zeros(m_cap + 1), np.zeros(m_cap + 1, dtype=np.int64),
            np.zeros(n_threads, dtype=np.int64), np.zeros(n_threads), np.zeros(n_threads), np.zeros(n_threads),
            np.zeros(n_threads, dtype=np.int64), np.zeros(n_threads, dtype=np.uint8), np.zeros(m_cap))
