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

* :func:`event_pass`, the exact engine (the reference's event loop on arrays), used for
  every placement whose ops use more than one backward thread (:func:`one_thread`), and
  for those :func:`static_pass` does not certify. (Measured: random and block placements
  over several GPUs are almost never certified, see benchmarks/results/simulator.md, so
  the static pass is tried only where it is exact by construction.)

Arrays (built by :func:`envs.sim.simulator._arrays`): ``cost`` [N*D*6] as
``(i*D + d)*6 + k``; ``rd``/``wr`` the stream slot a device reads/writes (a GPU its own
index; a CPU reads slot D, always 0.0, and writes slot D+1, never read), ``lat``/``inv_bw``
[D*D] (0 on the diagonal and between CPU devices), ``blocking`` [D*D] (a copy with a CPU end
holds its thread until done), ``consts`` = (copy_s, loss_s, backward_call_s, step_s).
"""

from __future__ import annotations

import numpy as np

try:  # numba is optional: without it these are plain Python functions.
    from numba.extending import register_jitable as _jitable
except ImportError:  # pragma: no cover - depends on the environment
    def _jitable(fn):
        return fn


@_jitable
def one_thread(row, thread_of):
    """Whether every device of ``row`` backs onto one thread (one GPU, or CPUs only): then the
    static pass is the engine's order (each node's gradients come from nodes run before it on
    the same thread), and it is the path taken; otherwise :func:`event_pass` runs."""
    first = thread_of[row[0]]
    for g in range(1, row.shape[0]):
        if thread_of[row[g]] != first:
            return False
    return True


@_jitable
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


@_jitable
def forward_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, rd, wr, lat, inv_bw, blocking,
                 copy_s, s, mark, dst, nb, mem, acc, trace, xtrace):
    """R1-R5 over the ops in program order; returns the host clock after the forward.

    ``s`` [D+2] stream clocks (zeroed here), ``mark``/``dst``/``nb`` [D] scratch, ``mem`` [D]
    += received copies, ``acc`` [2] += (copy seconds, copy bytes). ``trace`` [N, 4] (or
    shape (0, 4)) receives host start/end and stream start/end of each op; ``xtrace``
    [N*D, 2] the interval of each copy ``(i*D + b)``.
    """
    n = op_group.shape[0]
    for k in range(s.shape[0]):
        s[k] = 0.0
    for k in range(nd):
        mark[k] = -1
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


@_jitable
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


@_jitable
def step_end(h, s, nd, step_s):
    """R9: the step ends when the host and every stream are done."""
    m = h
    for d in range(nd):
        if s[d] > m:
            m = s[d]
    return m + step_s


@_jitable
def static_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, rd, wr, thread_of,
                n_threads, lat, inv_bw, blocking, is_cpu, consts, s, t, done, mark, dst, nb, xr, lastissue,
                lastthread, maxidle, mem, acc, trace, xtrace):
    """One placement, backward in decreasing sequence number (module doc).

    Returns ``(step, certified)``; ``mem`` [D] += received copies, ``acc`` [2] += copy
    seconds and bytes. ``trace`` [N, 8] (or shape (0, 8)) receives forward host/stream
    intervals (columns 0-3) and backward thread/stream intervals (4-7).
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
            st = (tb if tb > r else r) + copy_s
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
    h = t[0]
    for p in range(1, n_threads):
        if t[p] > h:
            h = t[p]
    h = optimizer_pass(row, op_group, cost, nd, rd, wr, h + consts[2], s)
    return step_end(h, s, nd, consts[3]), ok


@_jitable
def _heap_push(keys, vals, base, size, key, val):
    """Push (key, val) on the min-heap ``keys[base:base+size]`` (ties: smaller val first); new size."""
    k = size
    keys[base + k] = key
    vals[base + k] = val
    while k > 0:
        parent = (k - 1) // 2
        pk = keys[base + parent]
        if pk < key or (pk == key and vals[base + parent] <= val):
            break
        keys[base + k] = pk
        vals[base + k] = vals[base + parent]
        k = parent
    keys[base + k] = key
    vals[base + k] = val
    return size + 1


@_jitable
def _heap_pop(keys, vals, base, size):
    """Remove the top of the heap ``keys[base:base+size]``; returns its val (new size is size - 1)."""
    top = vals[base]
    size -= 1
    key = keys[base + size]
    val = vals[base + size]
    k = 0
    while True:
        c = 2 * k + 1
        if c >= size:
            break
        if c + 1 < size and (keys[base + c + 1] < keys[base + c]
                             or (keys[base + c + 1] == keys[base + c] and vals[base + c + 1] < vals[base + c])):
            c += 1
        if keys[base + c] > key or (keys[base + c] == key and vals[base + c] >= val):
            break
        keys[base + k] = keys[base + c]
        vals[base + k] = vals[base + c]
        k = c
    if size > 0:
        keys[base + k] = key
        vals[base + k] = val
    return top


@_jitable
def event_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, succ_grad, rg, gpred_ptr, gpred_src, rd,
               wr, thread_of, n_threads, lat, inv_bw, blocking, consts, s, mark, dst, nb, mem, acc, trace, xtrace):
    """One placement with the exact engine (the reference's event loop, R7); returns the step.

    Backward nodes get ids in sequence order: op i, then its copy nodes in program order.
    Per thread two heaps: nodes whose ready time is after the thread is free (by ready
    time, then decreasing id) and nodes ready by then (by decreasing id). Each thread's next
    node (picked when the thread is free, or when its earliest node gets ready) is enqueued
    after its host part; enqueues happen one at a time in time order, at equal times the
    higher id first.
    """
    copy_s = consts[0]
    h = forward_pass(row, op_group, cost, nd, succ_ptr, succ_dst, succ_bytes, rd, wr, lat, inv_bw, blocking,
                     copy_s, s, mark, dst, nb, mem, acc, trace, xtrace)
    tracing = trace.shape[0] > 0
    t_root = h + consts[1]
    n = op_group.shape[0]
    # ---- backward nodes in sequence order
    op_id = np.full(n, -1, dtype=np.int64)
    copy_id = np.full(n * nd, -1, dtype=np.int64)
    m_cap = n * (nd + 1)
    kind_op = np.zeros(m_cap, dtype=np.int64)  # op index
    kind_dev = np.full(m_cap, -1, dtype=np.int64)  # -1: op node; else the copy's device b
    node_bytes = np.zeros(m_cap)
    for k in range(nd):
        mark[k] = -1
    m = 0
    for i in range(n):
        if rg[i] == 0:
            continue
        d = row[op_group[i]]
        op_id[i] = m
        kind_op[m] = i
        m += 1
        count = copy_targets(i, d, row, op_group, succ_ptr, succ_dst, succ_bytes, mark, dst, nb)
        for j in range(count - 1, -1, -1):  # program order of the copies
            b = dst[j]
            has_grad = False
            for k in range(succ_ptr[i], succ_ptr[i + 1]):
                if succ_grad[k] and row[op_group[succ_dst[k]]] == b:
                    has_grad = True
            if has_grad:
                copy_id[i * nd + b] = m
                kind_op[m] = i
                kind_dev[m] = b
                node_bytes[m] = nb[b]
                m += 1
    # ---- dependency counts
    remaining = np.zeros(m, dtype=np.int64)
    rmax = np.full(m, t_root)
    node_thread = np.zeros(m, dtype=np.int64)
    for v in range(m):
        i = kind_op[v]
        if kind_dev[v] < 0:
            node_thread[v] = thread_of[row[op_group[i]]]
        else:
            node_thread[v] = thread_of[kind_dev[v]]
    for i in range(n):
        if op_id[i] < 0:
            continue
        d = row[op_group[i]]
        for k in range(succ_ptr[i], succ_ptr[i + 1]):
            if succ_grad[k]:
                b = row[op_group[succ_dst[k]]]
                if b == d:
                    remaining[op_id[i]] += 1
                else:
                    remaining[copy_id[i * nd + b]] += 1
        for b in range(nd):
            if copy_id[i * nd + b] >= 0:
                remaining[op_id[i]] += 1
    # ---- per-thread heaps: ready after the thread is free (key ready time, val -id) and
    # ready by then (key -id); each thread's candidate cached until its heaps change.
    # Heap p lives at [off[p], off[p] + nodes of thread p): one slot per node in all.
    off = np.zeros(n_threads + 1, dtype=np.int64)
    for v in range(m):
        off[node_thread[v] + 1] += 1
    for p in range(n_threads):
        off[p + 1] += off[p]
    fut_k = np.empty(m + 1)
    fut_v = np.empty(m + 1, dtype=np.int64)
    now_k = np.empty(m + 1)
    now_v = np.empty(m + 1, dtype=np.int64)
    fut_n = np.zeros(n_threads, dtype=np.int64)
    now_n = np.zeros(n_threads, dtype=np.int64)
    free = np.full(n_threads, t_root)
    cand_e = np.zeros(n_threads)  # enqueue time of the thread's next node
    cand_pick = np.zeros(n_threads)  # when the thread picks it
    cand_id = np.full(n_threads, -1, dtype=np.int64)
    dirty = np.ones(n_threads, dtype=np.uint8)
    for v in range(m - 1, -1, -1):
        if remaining[v] == 0:
            p = node_thread[v]
            fut_n[p] = _heap_push(fut_k, fut_v, off[p], fut_n[p], t_root, -v)
    left = m
    while left > 0:
        best_p = -1
        for p in range(n_threads):
            if dirty[p]:
                dirty[p] = 0
                base = off[p]
                when = free[p]
                while fut_n[p] > 0 and fut_k[base] <= when:  # ready while the thread was busy
                    v = -_heap_pop(fut_k, fut_v, base, fut_n[p])
                    fut_n[p] -= 1
                    now_n[p] = _heap_push(now_k, now_v, base, now_n[p], -float(v), v)
                if now_n[p] > 0:
                    vid = now_v[base]
                elif fut_n[p] > 0:  # idle until the earliest ready node (the highest id among equals)
                    when = fut_k[base]
                    vid = -fut_v[base]
                else:
                    cand_id[p] = -1
                    continue
                i = kind_op[vid]
                host = cost[(i * nd + row[op_group[i]]) * 6 + 2] if kind_dev[vid] < 0 else copy_s
                cand_id[p] = vid
                cand_pick[p] = when
                cand_e[p] = when + host
            if cand_id[p] >= 0 and (best_p < 0 or cand_e[p] < cand_e[best_p] or (
                    cand_e[p] == cand_e[best_p] and cand_id[p] > cand_id[best_p])):
                best_p = p
        p = best_p
        v = cand_id[p]
        pick = cand_pick[p]
        enq = cand_e[p]
        base = off[p]
        if now_n[p] > 0 and now_v[base] == v:
            _heap_pop(now_k, now_v, base, now_n[p])
            now_n[p] -= 1
        else:
            _heap_pop(fut_k, fut_v, base, fut_n[p])
            fut_n[p] -= 1
        dirty[p] = 1
        left -= 1
        i = kind_op[v]
        d = row[op_group[i]]
        if kind_dev[v] < 0:  # the op: launched at ``enq``, its kernel queued on its stream
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
            for k in range(gpred_ptr[i], gpred_ptr[i + 1]):  # gradients for the producers
                q = gpred_src[k]
                dq = row[op_group[q]]
                w = op_id[q] if dq == d else copy_id[q * nd + d]
                if fin > rmax[w]:
                    rmax[w] = fin
                remaining[w] -= 1
                if remaining[w] == 0:
                    pw = node_thread[w]
                    fut_n[pw] = _heap_push(fut_k, fut_v, off[pw], fut_n[pw], rmax[w], -w)
                    dirty[pw] = 1
        else:  # the gradient copy b -> d, issued at ``enq``
            b = kind_dev[v]
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
            w = op_id[i]
            if fin > rmax[w]:
                rmax[w] = fin
            remaining[w] -= 1
            if remaining[w] == 0:
                pw = node_thread[w]
                fut_n[pw] = _heap_push(fut_k, fut_v, off[pw], fut_n[pw], rmax[w], -w)
                dirty[pw] = 1
        free[p] = fin
    h = free[0]
    for p in range(1, n_threads):
        if free[p] > h:
            h = free[p]
    h = optimizer_pass(row, op_group, cost, nd, rd, wr, h + consts[2], s)
    return step_end(h, s, nd, consts[3])
