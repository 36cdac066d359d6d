"""A Gantt chart (PNG) of one simulated training step, op by op.

Rows, as the simulator runs the step (:mod:`envs.sim.reference_simulator`): the **host
thread** (every op's dispatch in program order, the whole op for a CPU device, and the
backward of CPU ops), then per GPU its **stream** (forward and backward kernels) and its
autograd **engine thread** (backward launches), then one row per direction between two
devices that carried copies: the forward's copies and the backward's gradient copies (the
gradient of a value copied a→b flows b→a) in their own colours. A gradient copy's issuing
slice also shows on the thread that issues it (the engine thread of its source GPU, the
host for a CPU). Shared time axis in milliseconds; the timeline comes from
:func:`envs.sim.simulator.schedule`.

On a rank cluster (``--devices cpu:0,cpu:1``) the step is the multi-process runtime's
(:mod:`envs.sim.ranks`), so the chart is drawn from the rank simulator's trace instead: one
row per rank (its host thread: forward, backward and optimizer of its ops, and the runtime's
own work: stage calls, sends, receives, hand-overs, the loss, the step's fixed costs), then
one row per direction between two ranks with every message from its first byte to its
arrival, forward values and the backward's gradients apart.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from envs.sim.problem import PlacementProblem
from envs.sim.rank_schedule import RankSchedule
from envs.sim.simulator import Schedule, schedule, simulate_batch, simulate_ops
from graphs.atomic_write import atomic_path
from graphs.errors import PlacerError

COLOURS = {"forward": "#4C72B0", "backward": "#DD8452", "optimizer": "#8172B3", "runtime": "#937860",
           "copy": "#55A868", "gradient copy": "#C44E52"}
#: Rank trace event kinds (envs.sim.ranks.RankEvent.kind) by chart category; waits are gaps.
_RANK_KINDS = {"fwd": "forward", "bwd": "backward", "opt": "optimizer", "stage": "runtime", "send": "runtime",
               "recv": "runtime", "handoff": "runtime", "loss": "runtime", "step": "runtime"}
HOST_ROW = "host thread"


def _bars(start: np.ndarray, end: np.ndarray) -> list[tuple[float, float]]:
    keep = ~np.isnan(start) & ~np.isnan(end) & (end > start)
    return [(float(s) * 1e3, float(e - s) * 1e3) for s, e in zip(start[keep], end[keep])]


def gantt_rows(problem: PlacementProblem, sched: Schedule) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """The chart's content without drawing it: ``[(row label, {category: [(start_ms, width_ms)]})]``."""
    cpu_kind = np.array([k == "cpu" for k in problem.device_kinds])
    on_cpu = cpu_kind[sched.op_device]
    rows = [(HOST_ROW, {
        "forward": _bars(sched.fwd_host_start, sched.fwd_host_end),
        "backward": _bars(sched.bwd_thread_start[on_cpu], sched.bwd_thread_end[on_cpu]),
        "gradient copy": _bars(sched.grad_copy_thread_start[:, cpu_kind].ravel(),
                               sched.grad_copy_thread_end[:, cpu_kind].ravel()),
    })]
    for d, name in enumerate(problem.device_names):
        on = sched.op_device == d
        if cpu_kind[d] or not on.any():
            continue
        rows.append((name, {
            "forward": _bars(sched.fwd_start[on], sched.fwd_end[on]),
            "backward": _bars(sched.bwd_start[on], sched.bwd_end[on]),
        }))
        rows.append((f"{name} engine thread", {
            "backward": _bars(sched.bwd_thread_start[on], sched.bwd_thread_end[on]),
            "gradient copy": _bars(sched.grad_copy_thread_start[:, d], sched.grad_copy_thread_end[:, d]),
        }))
    for a, name_a in enumerate(problem.device_names):
        for b, name_b in enumerate(problem.device_names):
            if a == b:
                continue
            # a's values copied to b, and the gradients of b's values copied to a (they flow a→b)
            of_a, of_b = sched.op_device == a, sched.op_device == b
            bars = {"copy": _bars(sched.copy_start[of_a, b], sched.copy_end[of_a, b]),
                    "gradient copy": _bars(sched.grad_copy_start[of_b, a], sched.grad_copy_end[of_b, a])}
            if any(bars.values()):
                rows.append((f"{name_a}→{name_b}", bars))
    return rows


def rank_gantt_rows(sched: RankSchedule, device_names: Sequence[str]) -> list[tuple[str, dict[str, list[tuple[float, float]]]]]:
    """A rank schedule's chart content: one row per rank, then one per direction that carried messages."""
    rows: list[tuple[str, dict[str, list[tuple[float, float]]]]] = []
    for r, name in enumerate(device_names):
        bars: dict[str, list[tuple[float, float]]] = {}
        for e in sched.events:
            category = _RANK_KINDS.get(e.kind)
            if e.rank == r and category is not None and e.end > e.start:
                bars.setdefault(category, []).append((e.start * 1e3, (e.end - e.start) * 1e3))
        rows.append((f"{name} (rank {r})", bars))
    for a, name_a in enumerate(device_names):
        for b, name_b in enumerate(device_names):
            bars = {}
            for m in sched.messages:
                if m.src == a and m.dst == b and np.isfinite(m.start) and m.arrival > m.start:
                    bars.setdefault("gradient copy" if m.grad else "copy", []).append(
                        (m.start * 1e3, (m.arrival - m.start) * 1e3))
            if bars:
                rows.append((f"{name_a}→{name_b}", bars))
    return rows


def _rank_schedule(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
                   op_level: bool) -> RankSchedule:
    sim = problem.rank_simulator
    assert sim is not None
    if op_level:
        return sim.simulate(placement)  # type: ignore[arg-type]  # an op placement is a mapping
    if isinstance(placement, Mapping):
        row = [problem.device_names.index(placement[g]) for g in problem.node_names]
    else:
        row = np.asarray(placement, dtype=np.int64).ravel().tolist()
    return sim.simulate(sim.placement_of_row(row, problem.node_names))


class NoSchedule(PlacerError, ValueError):
    """The simulator gives the placement no finite step, so there is no schedule to draw."""


def plot_gantt(problem: PlacementProblem, placement: Mapping[str, str] | Sequence[int] | np.ndarray,
               path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw the simulated step of ``placement`` to a PNG at ``path`` and return the path.

    Raises:
        NoSchedule: the simulator refuses the placement (its step is not finite), with its reason.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    op_level = _is_op_placement(problem, placement)
    if problem.rank_simulator is not None:
        ranks = _rank_schedule(problem, placement, op_level)
        rows = rank_gantt_rows(ranks, problem.device_names)
        res = (simulate_ops(problem, placement, backend="python") if op_level
               else simulate_batch(problem, placement, backend="python"))[0]
    else:
        sched = schedule(problem, placement, ops=op_level)
        rows = gantt_rows(problem, sched)
        res = sched.result
    if not np.isfinite(res.step_time):
        raise NoSchedule(f"the simulator gives no finite step for this placement "
                         f"({getattr(res, 'refusal', '') or 'no reason given'})")
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    for y, (_, bars) in enumerate(rows):
        for category, spans in bars.items():
            if spans:
                ax.broken_barh(spans, (y - 0.38, 0.76), facecolors=COLOURS[category], edgecolor="white", linewidth=0.3)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([label for label, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, max(res.step_time * 1e3, 1e-6) * 1.01)
    source = "simulated" if problem.simulated else "simulated with measured device figures"
    ax.set_title(title or (
        f"{problem.name} on {problem.cluster_name or 'cluster'}: step {res.step_time * 1e3:.3f} ms ({source})"
        + ("" if res.fits else " — does not fit in memory")
    ))
    shown = {category for _, bars in rows for category, spans in bars.items() if spans}
    if shown:
        ax.legend(handles=[Patch(color=c, label=k) for k, c in COLOURS.items() if k in shown],
                  loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.3 / (len(rows) + 2)), fontsize=8,
                  ncol=6)  # below the axis: a legend over the bars hides the step's end
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    try:
        with atomic_path(out) as tmp:  # a crash or second Ctrl-C never leaves half a PNG
            fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".") or "png")
    finally:
        plt.close(fig)
    return out


def _is_op_placement(problem: PlacementProblem, placement: object) -> bool:
    """A dict naming ops (not groups) of a grouped problem is an op placement."""
    if isinstance(placement, Mapping):
        return problem.ops.num_ops != problem.num_nodes and not set(placement) <= set(problem.node_names)
    return False
