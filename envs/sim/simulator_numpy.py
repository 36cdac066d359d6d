"""The numpy path of :mod:`envs.sim.simulator`: the static pass vectorised over a batch of
placements whose ops all back onto one thread. The simulator sends the other rows, and the
rows this pass does not certify, through the engine run as Python (:mod:`envs.sim.kernels`)."""

from __future__ import annotations

import numpy as np

from envs.sim.loop_arrays import LoopArrays

__all__ = ["NUMPY_CHUNK", "static_pass_rows"]

#: Rows the numpy path simulates at once (its state is [N, chunk]).
NUMPY_CHUNK = 256


def static_pass_rows(a: LoopArrays, pl: np.ndarray, op_group: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`envs.sim.kernels.static_pass` vectorised over rows ``pl`` [B, G] whose ops all back
    onto one thread (same operations in the same order): step, received bytes per device,
    copy seconds and bytes, and whether each row's static order was certified."""
    b_count = pl.shape[0]
    nd = a.n_devices
    n = op_group.shape[0]
    rows = np.arange(b_count)
    cost = a.cost3
    copy_s, loss_s, bwd_call_s, step_s = (float(c) for c in a.consts)
    dev = np.ascontiguousarray(pl.T.astype(np.int64))[op_group]  # [N, B]: a gather, as the loops do
    S = np.zeros((b_count, nd + 2))
    recv = np.zeros((b_count, nd))
    xt = np.zeros(b_count)
    xb = np.zeros(b_count)
    seen = np.zeros((b_count, nd), dtype=bool)
    dst = np.zeros((b_count, nd), dtype=np.int64)
    nb = np.zeros((b_count, nd))
    h = np.zeros(b_count)

    def copies(i: int, d: np.ndarray, grad_ready: bool, done: np.ndarray | None):
        """First-found destination devices of op i's consumers, their bytes and (backward)
        the latest gradient from each: (count, r_op) with dst/nb/xr filled."""
        seen[:] = False
        count = np.zeros(b_count, dtype=np.int64)
        r_op = None
        xr = None
        if grad_ready:
            r_op = np.full(b_count, 0.0)
            xr = np.full((b_count, nd), -1.0)
        for k in range(a.succ_ptr[i], a.succ_ptr[i + 1]):
            c = a.succ_dst[k]
            b = dev[c]
            cut = b != d
            new = cut & ~seen[rows, b]
            nbytes = a.succ_bytes[k]
            dst[rows, count] = np.where(new, b, dst[rows, count])
            count += new
            old = nb[rows, b]
            nb[rows, b] = np.where(new, nbytes, np.where(cut & (nbytes > old), nbytes, old))
            seen[rows, b] |= cut
            if grad_ready and a.succ_grad[k]:
                dc = done[c]
                r_op = np.where(cut, r_op, np.maximum(r_op, dc))
                old_x = xr[rows, b]
                xr[rows, b] = np.where(cut, np.maximum(old_x, dc), old_x)
        return count, r_op, xr

    # ---- forward (R1-R5)
    for i in range(n):
        d = dev[i]
        c = cost[i][d]  # [B, 6]
        h = h + c[:, 0]
        sd = S[rows, a.rd[d]]
        st = np.maximum(h, sd)
        S[rows, a.wr[d]] = st + c[:, 1]
        count, _, _ = copies(i, d, False, None)
        for j in range(int(count.max(initial=0)) - 1, -1, -1):
            act = j < count
            b = np.where(act, dst[:, j], d)
            pair = d * nd + b
            nbb = np.where(act, nb[rows, b], 0.0)
            x = a.lat_flat[pair] + nbb * a.inv_bw_flat[pair]
            hh = h + copy_s
            sa = S[rows, a.rd[d]]
            sb = S[rows, a.rd[b]]
            e = np.maximum(np.maximum(hh, sa), sb) + x
            S[rows, a.wr[d]] = np.where(act, e, S[rows, a.wr[d]])
            S[rows, a.wr[b]] = np.where(act, np.maximum(sb, e), S[rows, a.wr[b]])
            h = np.where(act, np.where(a.blocking[pair] != 0, e, hh), h)
            recv[rows, b] += np.where(act, nbb, 0.0)
            xt += np.where(act, x, 0.0)
            xb += nbb

    # ---- backward (R7), static order with certification
    t_root = h + loss_s
    T = np.repeat(t_root[:, None], a.n_threads, axis=1)
    maxidle = np.full((b_count, a.n_threads), -1.0)
    last = np.full((b_count, nd + 2), -1.0)
    last_thread = np.full((b_count, nd + 2), -1, dtype=np.int64)
    ok = np.ones(b_count, dtype=bool)
    done = np.zeros((n, b_count))

    def certify(act, p, r, tb):
        nonlocal ok
        mi = maxidle[rows, p]
        ok &= ~(act & (r < mi))
        maxidle[rows, p] = np.where(act & (r > tb) & (r > mi), r, mi)

    def stream_order(act, dev_idx, when, p):
        nonlocal ok
        gpu = act & (a.is_cpu[dev_idx] == 0)
        slot = np.where(gpu, dev_idx, nd + 1)
        li, lt = last[rows, slot], last_thread[rows, slot]
        ok &= ~(gpu & ((when < li) | ((when == li) & (lt != p))))
        last[rows, slot] = np.where(gpu, when, li)
        last_thread[rows, slot] = np.where(gpu, p, lt)

    for i in range(n - 1, -1, -1):
        if not a.rg[i]:
            continue
        d = dev[i]
        count, r_op, xr = copies(i, d, True, done)
        r_op = np.maximum(r_op, t_root)
        for j in range(int(count.max(initial=0))):
            b = np.where(j < count, dst[:, j], d)
            r = np.where(j < count, xr[rows, b], -1.0)
            act = r >= 0.0
            p = a.thread_of[b]
            tb = T[rows, p]
            certify(act, p, r, tb)
            st = np.maximum(tb, r) + copy_s
            pair = b * nd + d
            nbb = np.where(act, nb[rows, b], 0.0)
            x = a.lat_flat[pair] + nbb * a.inv_bw_flat[pair]
            stream_order(act, b, st, p)
            stream_order(act, d, st, p)
            sb = S[rows, a.rd[b]]
            sa = S[rows, a.rd[d]]
            e = np.maximum(np.maximum(st, sb), sa) + x
            S[rows, a.wr[b]] = np.where(act, e, S[rows, a.wr[b]])
            S[rows, a.wr[d]] = np.where(act, np.maximum(sa, e), S[rows, a.wr[d]])
            tt = np.where(a.blocking[pair] != 0, e, st)
            T[rows, p] = np.where(act, tt, tb)
            r_op = np.where(act, np.maximum(r_op, tt), r_op)
            xt += np.where(act, x, 0.0)
            xb += nbb
        p = a.thread_of[d]
        tb = T[rows, p]
        everyone = np.ones(b_count, dtype=bool)
        certify(everyone, p, r_op, tb)
        c = cost[i][d]
        st = np.maximum(tb, r_op)
        he = st + c[:, 2]
        stream_order(everyone, d, he, p)
        sd = S[rows, a.rd[d]]
        S[rows, a.wr[d]] = np.maximum(he, sd) + c[:, 3]
        T[rows, p] = he
        done[i] = he

    # ---- optimizer (R8) and step end (R9)
    h = T[:, 0]
    for p in range(1, a.n_threads):
        h = np.maximum(h, T[:, p])
    h = h + bwd_call_s
    for i in range(n):
        d = dev[i]
        c = cost[i][d]
        h = h + c[:, 4]
        sd = S[rows, a.rd[d]]
        S[rows, a.wr[d]] = np.maximum(h, sd) + c[:, 5]
    m = h
    for d in range(nd):
        m = np.maximum(m, S[:, d])
    return m + step_s, recv, xt, xb, ok
