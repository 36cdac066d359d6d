"""A lower bound on the step time of any placement of a problem, for reports.

Two bounds, the larger wins:

* **Critical path**: every node on its fastest device and no transfer cost. The forward of
  node i cannot finish before ``F(i) = min_d fwd[i, d] + max_pred F(p)``; its backward
  (when it requires grad) cannot finish before
  ``G(i) = min_d bwd[i, d] + max(F(i), max_grad_succ G(c))``, because a device runs an
  op's backward after its forward and after the gradients of its successors arrived.
* **Work**: the step lasts at least as long as the busiest device computes. The fewest
  seconds the busiest device can have is the optimum ``T*`` of the fractional assignment
  ``min T  s.t.  sum_d x[i,d] = 1,  sum_i x[i,d] * t[i,d] <= T,  x >= 0`` with
  ``t = fwd + bwd``. By LP duality, for any weights ``y`` on the simplex,
  ``sum_i min_d y[d] * t[i,d] <= T*``, so evaluating that sum at any ``y`` is a valid
  bound. We take ``y`` from the LP's dual (scipy HiGHS) and also the uniform ``y = 1/D``
  (which gives ``sum_i min_d t[i,d] / D``, the identical-devices bound) and keep the
  larger; the evaluated sum is certified whatever the solver's tolerance.

Memory limits and transfers only make real step times longer, so both stay valid.
"""

from __future__ import annotations

import numpy as np

from envs.problem import PlacementProblem


def critical_path_bound(problem: PlacementProblem) -> float:
    """Longest forward+backward chain with every node at its fastest device time, no transfers."""
    fwd_min = problem.fwd_time.min(axis=1)
    rg = problem.requires_grad
    bwd_min = np.where(rg[:, None], problem.bwd_time, 0.0).min(axis=1)
    n = problem.num_nodes
    src, dst = problem.edge_src, problem.edge_dst
    fin_f = np.zeros(n)
    for i in range(n):
        preds = src[problem.pred_edge[problem.pred_ptr[i]:problem.pred_ptr[i + 1]]]
        fin_f[i] = fwd_min[i] + (fin_f[preds].max() if preds.size else 0.0)
    fin_b = np.zeros(n)
    for i in range(n - 1, -1, -1):
        if not rg[i]:
            continue
        succs = dst[problem.succ_edge[problem.succ_ptr[i]:problem.succ_ptr[i + 1]]]
        succs = succs[rg[succs]]
        after = max(fin_f[i], fin_b[succs].max() if succs.size else 0.0)
        fin_b[i] = bwd_min[i] + after
    return float(max(fin_f.max(initial=0.0), fin_b.max(initial=0.0)))


def _work_bound_at(times: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.min(times * y[None, :], axis=1)))


def work_bound(problem: PlacementProblem, max_lp_variables: int = 200_000) -> float:
    """Optimum of the fractional load balance (see the module docstring); certified via its dual."""
    times = problem.fwd_time + np.where(problem.requires_grad[:, None], problem.bwd_time, 0.0)
    n, d = times.shape
    best = _work_bound_at(times, np.full(d, 1.0 / d))
    if d == 1 or n * d > max_lp_variables:
        return best
    try:
        from scipy.optimize import linprog
        from scipy.sparse import coo_matrix, hstack
    except ImportError:  # pragma: no cover - scipy is a dependency, but the bound must not fail
        return best
    # variables: x[i, d] (row-major), then T. Constraints: sum_i x[i,d] t[i,d] - T <= 0.
    rows = np.tile(np.arange(d), n)
    cols = np.arange(n * d)
    a_ub = hstack([coo_matrix((times.ravel(), (rows, cols)), shape=(d, n * d)), coo_matrix(-np.ones((d, 1)))])
    a_eq = hstack([coo_matrix((np.ones(n * d), (np.repeat(np.arange(n), d), cols)), shape=(n, n * d)),
                   coo_matrix((n, 1))])
    c = np.zeros(n * d + 1)
    c[-1] = 1.0
    res = linprog(c, A_ub=a_ub.tocsr(), b_ub=np.zeros(d), A_eq=a_eq.tocsr(), b_eq=np.ones(n), method="highs")
    if res.status != 0 or getattr(res, "ineqlin", None) is None:
        return best
    y = np.maximum(-np.asarray(res.ineqlin.marginals, dtype=np.float64), 0.0)
    if y.sum() <= 0:
        return best
    return max(best, _work_bound_at(times, y / y.sum()))


def lower_bound(problem: PlacementProblem) -> float:
    """Seconds no placement of ``problem`` can beat: max(critical path, work / aggregate speed)."""
    return max(critical_path_bound(problem), work_bound(problem))
