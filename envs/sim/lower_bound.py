"""A lower bound on the step time of any placement of a problem, for reports.

It reads the op arrays (``problem.ops``) and ignores the groups: a bound for every op
placement is a bound for every group placement too. The rules are those of
:mod:`envs.sim.reference_simulator` (one process); per op i and device d the costs are
``hF, dF, hB, dB, hO, dO`` and the fixed host costs ``loss_s, backward_call_s, step_s``.
Copies only make real steps longer, so every bound ignores them. Three bounds, the
largest wins:

* **Host** (:func:`host_bound`): one process has one host thread, and it runs every op's
  dispatch ``hF`` and update ``hO``, the backward ``hB`` of the ops on a CPU, and the fixed
  costs, one after the other:
  ``H = loss_s + backward_call_s + step_s + sum_i min_d (hF + hO + [d is a CPU] hB)[i, d]``.
* **Work** (:func:`work_bound`): the resources are the host, each GPU's stream and each
  GPU's engine thread; under any placement each is busy at most the step time. Per
  (op, device) the loads are host ``hF + hO + [cpu] hB`` (+ the fixed costs, placement
  independent), stream ``dF + dB + dO``, thread ``hB`` (GPU only). For any weights ``y`` on
  the resource simplex, ``sum_i min_d sum_r y_r load_r[i, d] (+ y_host * fixed) <= T*`` (LP
  duality for the fractional assignment), so every evaluated ``y`` gives a valid bound;
  exponentiated supergradient ascent from the uniform weights keeps the best value seen.
  ``y = e_host`` is the host bound.
* **Critical path** (:func:`critical_path_bound`): with ``P(i) = sum_{j<i} min_d hF[j, d]``
  (the host dispatches in program order), the forward of op i cannot finish before
  ``F(i) = max(max_pred F(p) + min_d c_f, P(i) + min_d (hF + dF))`` with ``c_f = dF`` on a
  GPU and ``hF`` on a CPU (a GPU kernel waits for its inputs' kernels and its own launch;
  a CPU op runs on the host after its inputs arrived); its backward cannot finish before
  ``G(i) = max(P(N) + loss_s + min_d (hB + dB), max_grad_succ G(c) + min_d c_b, F(i) + min_d c_b)``
  with ``c_b = dB`` on a GPU and ``hB`` on a CPU; the step lasts at least
  ``max(F, G) + step_s``, and at least ``G(i) + min_d c_o`` for every op, its update
  ``c_o = dO`` on a GPU (the optimizer's kernel queued behind the op's backward on the
  stream that ran it) and ``hO`` on a CPU (run by the host after ``backward()`` returned).

On a rank cluster (``--devices cpu:0,cpu:1``: ``problem.rank_simulator`` is set) the step
is the multi-process runtime's (:mod:`envs.sim.ranks`), where each rank has its own host
thread: the bounds above charge one thread with every op and can exceed a real rank step
(two independent halves run side by side), so :func:`lower_bound` returns
:func:`envs.sim.ranks.rank_lower_bound` there instead (work over the ranks and the
forward/loss/backward critical path, with the rank simulator's own constants).
"""

from __future__ import annotations

import numpy as np

from envs.sim.problem import PlacementProblem


def _fixed(problem: PlacementProblem) -> tuple[float, float, float]:
    host = problem.ops.host
    return host.loss_s, host.backward_call_s, host.step_s


def host_bound(problem: PlacementProblem) -> float:
    """The single host thread's unavoidable work (module doc)."""
    ops = problem.ops
    c = ops.cost
    cpu = ops.is_cpu[None, :]
    load = c[:, :, 0] + c[:, :, 4] + np.where(cpu, c[:, :, 2], 0.0)
    return float(load.min(axis=1).sum() + sum(_fixed(problem)))


def critical_path_bound(problem: PlacementProblem) -> float:
    """Longest forward/backward chain with each op at its cheapest device and no copies (module doc)."""
    ops = problem.ops
    c = ops.cost
    cpu = ops.is_cpu[None, :]
    n = ops.num_ops
    loss_s, _, step_s = _fixed(problem)
    c_f = np.where(cpu, c[:, :, 0], c[:, :, 1]).min(axis=1)
    h_f = c[:, :, 0].min(axis=1)
    start_f = (c[:, :, 0] + c[:, :, 1]).min(axis=1)
    c_b = np.where(cpu, c[:, :, 2], c[:, :, 3]).min(axis=1)
    root_b = (c[:, :, 2] + c[:, :, 3]).min(axis=1)
    prefix = np.concatenate([[0.0], np.cumsum(h_f)])
    rg = ops.requires_grad
    ptr, dst, grad = ops.succ_ptr, ops.succ_dst, ops.succ_grad
    preds: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for k in range(ptr[i], ptr[i + 1]):
            preds[int(dst[k])].append(i)
    fin_f = np.zeros(n)
    for i in range(n):
        chain = max((fin_f[p] for p in preds[i]), default=0.0) + c_f[i]
        fin_f[i] = max(chain, prefix[i] + start_f[i])
    t_root = prefix[n] + loss_s
    fin_b = np.zeros(n)
    for i in range(n - 1, -1, -1):
        if not rg[i]:
            continue
        after = fin_f[i]
        for k in range(ptr[i], ptr[i + 1]):
            if grad[k]:
                after = max(after, fin_b[dst[k]])
        fin_b[i] = max(t_root + root_b[i], after + c_b[i])
    # An op's update runs after its own backward: on a GPU the optimizer's kernel is queued
    # on the stream that ran it, on a CPU the host runs it once backward() has returned.
    c_o = np.where(cpu, c[:, :, 4], c[:, :, 5]).min(axis=1)
    update = float((fin_b + c_o)[rg].max(initial=0.0))
    return float(max(fin_f.max(initial=0.0) + step_s, fin_b.max(initial=0.0) + step_s, update))


def _loads(problem: PlacementProblem) -> tuple[np.ndarray, float]:
    """[N, D, R] load of op i on device d on each resource (host, then stream and thread of
    each GPU), and the fixed host seconds."""
    ops = problem.ops
    c = ops.cost
    cpu = ops.is_cpu
    gpus = np.flatnonzero(~cpu)
    n, d = c.shape[:2]
    loads = np.zeros((n, d, 1 + 2 * len(gpus)))
    loads[:, :, 0] = c[:, :, 0] + c[:, :, 4] + np.where(cpu[None, :], c[:, :, 2], 0.0)
    for k, g in enumerate(gpus):
        loads[:, g, 1 + 2 * k] = c[:, g, 1] + c[:, g, 3] + c[:, g, 5]
        loads[:, g, 2 + 2 * k] = c[:, g, 2]
    return loads, float(sum(_fixed(problem)))


def _dual_value(loads: np.ndarray, fixed: float, y: np.ndarray) -> tuple[float, np.ndarray]:
    """``sum_i min_d y . load[i, d] + y_host * fixed`` and its supergradient in ``y``."""
    weighted = loads @ y  # [N, D]
    best = np.argmin(weighted, axis=1)
    rows = np.arange(loads.shape[0])
    value = float(weighted[rows, best].sum() + y[0] * fixed)
    grad = loads[rows, best].sum(axis=0)
    grad[0] += fixed
    return value, grad


def work_bound(problem: PlacementProblem, iterations: int = 300) -> float:
    """The fractional load-balance bound over host, streams and engine threads (module doc),
    certified via its dual: every evaluated value is a proven bound."""
    loads, fixed = _loads(problem)
    if loads.shape[0] == 0:
        return fixed
    r = loads.shape[2]
    y = np.full(r, 1.0 / r)
    best, grad = _dual_value(loads, fixed, y)
    for vertex in range(r):  # each resource alone (the host bound among them)
        e = np.zeros(r)
        e[vertex] = 1.0
        best = max(best, _dual_value(loads, fixed, e)[0])
    if r == 1:
        return best
    for step in range(iterations):
        scale = float(np.max(np.abs(grad))) or 1.0
        y = y * np.exp((1.0 / np.sqrt(step + 1.0)) * grad / scale)
        y /= y.sum()
        value, grad = _dual_value(loads, fixed, y)
        best = max(best, value)
    return best


def lower_bound(problem: PlacementProblem) -> float:
    """Seconds no placement of ``problem`` can beat: max(critical path, work, host); on a rank
    cluster the rank simulator's bound (module doc)."""
    if problem.rank_simulator is not None:
        return problem.rank_simulator.lower_bound()
    return max(critical_path_bound(problem), work_bound(problem), host_bound(problem))
