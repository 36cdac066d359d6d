"""Each rank's step as a list of instructions (post receives, run a stage's ops, queue sends,
wait), every message and each connection's FIFO order, built from a placement's plan by the
rules R1-R7 of :mod:`envs.sim.ranks`.

Building the programs is the rules' translation, once per placement (and cached); it stands
apart from the event loop that runs them (:mod:`envs.sim.rank_loop`), which knows no rule but
the message protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import networkx as nx

from envs.sim.rank_compile import _OpCost
from envs.sim.rank_plan import RankPlan, RankTransfer
from envs.sim.rank_schedule import RankMessage


@dataclass
class _Instr:
    op: str  # "work" | "post" | "put" | "wait" | "sent"
    kind: str = ""
    name: str = ""
    dt: float = 0.0  # seconds, times the RankCosts field ``unit`` when one is named
    msgs: tuple[int, ...] = ()
    unit: str = ""


@dataclass
class _Program:
    instrs: list[_Instr]
    queues: list[list[int]]  # the outbox's per-peer queues (forward, then backward), message ids


def _build(graph: nx.DiGraph, plan: RankPlan, cost: Mapping[str, list[_OpCost]],
           opt_fixed: Sequence[float]) -> tuple[list[_Program], list[RankMessage], dict[tuple[int, int], list[int]]]:
    """Each rank's instruction list, every message, and each connection's FIFO order (R1-R7)."""
    W, num = plan.world_size, len(plan.stages)
    idx = {t: i for i, t in enumerate(plan.transfers)}
    by_value: dict[str, list[RankTransfer]] = {}
    for t in plan.transfers:
        by_value.setdefault(t.value, []).append(t)
    remote = [t for t in plan.transfers if t.src_rank != t.dst_rank]
    fwd_order = sorted(remote, key=lambda t: (t.dst_stage, idx[t]))  # RankStep.fwd_order / recv_at
    bwd_order = sorted(remote, key=lambda t: (-t.src_stage, idx[t]))  # RankStep.bwd_order / grad_recv_at
    messages: list[RankMessage] = []
    fmsg: dict[RankTransfer, tuple[int, ...]] = {}
    gmsg: dict[RankTransfer, tuple[int, ...]] = {}
    for t in remote:
        c = cost[t.value][t.src_rank]
        per = c.out_bytes / max(c.leaves, 1)
        fmsg[t] = tuple(range(len(messages), len(messages) + c.leaves))
        messages.extend(RankMessage(t.value, t.src_rank, t.dst_rank, False, per) for _ in range(c.leaves))
        g = c.leaves if c.grad else 0
        gmsg[t] = tuple(range(len(messages), len(messages) + g))
        messages.extend(RankMessage(t.value, t.dst_rank, t.src_rank, True, per) for _ in range(g))
    # One connection per ordered pair (R5): a rank issues all its forward sends before its
    # backward starts (outbox.wait()), so a connection carries the forward queue, then the backward one.
    channel: dict[tuple[int, int], list[int]] = {}
    for t in fwd_order:
        channel.setdefault((t.src_rank, t.dst_rank), []).extend(fmsg[t])
    for t in bwd_order:
        channel.setdefault((t.dst_rank, t.src_rank), []).extend(gmsg[t])

    programs: list[_Program] = []
    for r in range(W):
        code: list[_Instr] = []
        mine = plan.stages_of(r)
        recv_at: dict[int, list[RankTransfer]] = {}
        for t in fwd_order:
            if t.dst_rank == r:
                recv_at.setdefault(t.dst_stage, []).append(t)
        queues = [[m for t in fwd_order if t.src_rank == r and t.dst_rank == peer for m in fmsg[t]]
                  for peer in range(W) if peer != r]
        queues += [[m for t in bwd_order if t.dst_rank == r and t.src_rank == peer for m in gmsg[t]]
                   for peer in range(W) if peer != r]
        fwd_sends = tuple(m for t in fwd_order if t.src_rank == r for m in fmsg[t])
        bwd_sends = tuple(m for t in bwd_order if t.dst_rank == r for m in gmsg[t])

        # R3: every forward receive is posted before the first stage runs.
        for s in sorted(recv_at):
            for t in recv_at[s]:
                for m in fmsg[t]:
                    code.append(_Instr("post", msgs=(m,)))
        # R1/R2/R4: per stage, wait for its inputs, run its ops, queue its outputs.
        for st in mine:
            for t in recv_at.get(st.index, []):
                code.append(_Instr("wait", "wait", t.value, msgs=fmsg[t]))
                code.append(_Instr("work", "recv", t.value, len(fmsg[t]), unit="recv_s"))
            code.append(_Instr("work", "stage", f"stage{st.index}", 1.0, unit="stage_fwd_s"))
            code.extend(_Instr("work", "fwd", n, cost[n][r].fwd, unit="op_scale") for n in st.nodes)
            for v in st.outputs:
                for t in by_value.get(v, []):
                    if t.dst_rank == r:
                        code.append(_Instr("work", "handoff", v, 1.0, unit="handoff_s"))
                    else:
                        code.append(_Instr("put", "send", v, msgs=fmsg[t]))
        # R6: the output rank gathers the output and computes the loss (and its backward).
        out_recv = recv_at.get(num, []) if r == plan.output_rank else []
        for t in out_recv:
            code.append(_Instr("wait", "wait", t.value, msgs=fmsg[t]))
            code.append(_Instr("work", "recv", t.value, len(fmsg[t]), unit="recv_s"))
        if r == plan.output_rank:
            code.append(_Instr("work", "loss", "loss", 1.0, unit="loss_s"))
        code.append(_Instr("sent", "wait", "forward sends", msgs=fwd_sends))
        for st in reversed(mine):  # RankStep._post_grad_receives
            for v in st.outputs:
                for t in by_value.get(v, []):
                    for m in gmsg.get(t, ()):
                        code.append(_Instr("post", msgs=(m,)))
        for t in out_recv:  # RankStep._send_back(out_stage)
            if gmsg[t]:
                code.append(_Instr("put", "send", t.value, msgs=gmsg[t]))
        for st in reversed(mine):
            roots = False
            for v in st.outputs:
                if not cost[v][r].grad:
                    continue  # nothing needs its gradient: no consumer sends one
                roots = True
                for t in by_value.get(v, []):
                    if t.dst_rank != r and gmsg[t]:
                        code.append(_Instr("wait", "wait", v, msgs=gmsg[t]))
                        code.append(_Instr("work", "recv", v, len(gmsg[t]), unit="recv_s"))
            if roots:
                code.append(_Instr("work", "stage", f"stage{st.index}", 1.0, unit="stage_bwd_s"))
                code.extend(_Instr("work", "bwd", n, cost[n][r].bwd, unit="op_scale") for n in reversed(st.nodes))
            for t in recv_at.get(st.index, []):
                if gmsg[t]:
                    code.append(_Instr("put", "send", t.value, msgs=gmsg[t]))
        code.append(_Instr("sent", "wait", "gradient sends", msgs=bwd_sends))
        # R7: the rank's own optimizer, then the step's fixed costs.
        owners = [n for st in mine for n in st.nodes
                  if cost[n][r].opt > 0 or graph.nodes[n].get("param_bytes", 0) > 0]
        code.extend(_Instr("work", "opt", n, cost[n][r].opt, unit="op_scale") for n in owners)
        if owners:
            code.append(_Instr("work", "opt", "optimizer_fixed", opt_fixed[r]))
        code.append(_Instr("work", "step", "step", 1.0, unit="step_s"))
        programs.append(_Program(code, queues))
    return programs, messages, channel
