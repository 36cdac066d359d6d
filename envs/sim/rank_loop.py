"""The rank simulator's event loop (:mod:`envs.sim.ranks`): ranks advance in time order through
their programs, a rank blocking on a message until gloo's rendezvous (R5) has landed it, with
the wake-up, late wake-up and cold-after-sleep charges (R3, R3b); and one placement's run from
its compiled inputs, its programs cached per placement, scaled by a calibration's factors.

The loop is the one engine behind the reference simulator, the batch simulator and the
calibration; it stands apart from the rules' translation into programs
(:mod:`envs.sim.rank_program`) and from the callers that pick placements.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np

from envs.sim.rank_compile import _Compiled
from envs.sim.rank_costs import RankCosts, RankSimError
from envs.sim.rank_plan import rank_plan
from envs.sim.rank_program import _build, _Program
from envs.sim.rank_schedule import RankEvent, RankMessage, RankSchedule
from graphs.gc_pause import paused_gc

__all__ = ["RankScale"]


def _run(programs: list[_Program], messages: list[RankMessage], channel: dict[tuple[int, int], list[int]],
         lat: np.ndarray, bw: np.ndarray, costs: RankCosts, trace: bool,
         rng: np.random.Generator | None = None,
         rank_scale: Sequence[float] | None = None) -> tuple[list[float], list[float], list[RankEvent], list[RankMessage]]:
    """The event loop: ranks advance in time order; a rank blocks on a message until it is resolved.

    A sleeping wait costs the expected wake-up (``costs.expected_wake_s``), or with ``rng`` a
    drawn one: ``wake_s``, plus ``late_s`` with probability ``late_p`` (R3)."""
    W = len(programs)
    unit = {f.name: getattr(costs, f.name) for f in fields(RankCosts)}
    unit[""] = 1.0
    # A calibration's compute scale multiplies the op times of each rank (envs.sim.calibration).
    op_unit = [costs.op_scale * (float(rank_scale[r]) if rank_scale is not None else 1.0) for r in range(W)]
    clock = [0.0] * W
    busy = [0.0] * W
    pc = [0] * W
    events: list[RankEvent] = []
    ready: list[set[int]] = [set() for _ in range(W)]
    head = [[0] * len(p.queues) for p in programs]
    M = len(messages)
    posted, issued, start, arrival, sent_done = ([math.nan] * M for _ in range(5))
    chan_of = {m: k for k, ms in channel.items() for m in ms}
    chan_next = dict.fromkeys(channel, 0)
    chan_free = dict.fromkeys(channel, 0.0)
    waiting: dict[int, list[int]] = {}  # message -> ranks blocked on it
    heap = [(0.0, r) for r in range(W)]
    blocked = [False] * W  # waiting for a message that is not resolved yet
    cold_left = [0.0] * W  # R3b: op seconds each rank still runs slower after its last sleep

    def resolve(key: tuple[int, int]) -> None:
        # R5: payloads leave one after another once issued and their receive is known to the sender.
        a, b = key
        order = channel[key]
        while chan_next[key] < len(order):
            m = order[chan_next[key]]
            if math.isnan(issued[m]) or math.isnan(posted[m]):
                return
            start[m] = max(issued[m], posted[m] + lat[a, b], chan_free[key])
            chan_free[key] = sent_done[m] = start[m] + messages[m].nbytes / bw[a, b]
            arrival[m] = chan_free[key] + lat[a, b]
            for r in waiting.pop(m, []):
                if blocked[r]:
                    blocked[r] = False
                    heapq.heappush(heap, (clock[r], r))
            chan_next[key] += 1

    def work(r: int, kind: str, name: str, dt: float) -> None:
        if cold_left[r] > 0.0 and kind in ("fwd", "bwd", "opt"):
            hot = min(dt, cold_left[r])
            cold_left[r] -= hot
            dt += costs.cold_factor * hot
        if trace:
            events.append(RankEvent(r, kind, name, clock[r], clock[r] + dt))
        clock[r] += dt
        busy[r] += dt

    def block_on(r: int, times: list[float], ids: Sequence[int], kind: str, name: str) -> bool:
        for m in ids:
            if math.isnan(times[m]):
                waiting.setdefault(m, []).append(r)
                blocked[r] = True
                return True
        until = max((times[m] for m in ids), default=clock[r])
        if until > clock[r]:
            # R3: the thread slept; it runs again once woken and given a core, sometimes a tick late.
            until += wake if rng is None else costs.wake_s + (costs.late_s if rng.random() < costs.late_p else 0.0)
            if trace:
                events.append(RankEvent(r, kind, name, clock[r], until))
            clock[r] = until
            # R3b: the ops run after a sleep run slower for a while.
            cold_left[r] = costs.cold_s
        return False

    send_s, wake = costs.send_s, costs.expected_wake_s
    # A rank runs until it blocks (or ends); a blocked rank is pushed back when its message
    # resolves. Every time computed depends only on the ranks' own clocks and the fixed
    # FIFO order of each connection, not on the order the ranks are advanced in.
    while heap:
        _, r = heapq.heappop(heap)
        code = programs[r].instrs
        while pc[r] < len(code) and not blocked[r]:
            ins = code[pc[r]]
            if ins.op == "work":
                work(r, ins.kind, ins.name, ins.dt * (op_unit[r] if ins.unit == "op_scale" else unit[ins.unit]))
            elif ins.op == "post":
                m = ins.msgs[0]
                posted[m] = clock[r]
                resolve(chan_of[m])
            elif ins.op == "put":
                ready[r].update(ins.msgs)
                for q, queue in enumerate(programs[r].queues):  # runtime.py:_Outbox.flush
                    while head[r][q] < len(queue) and queue[head[r][q]] in ready[r]:
                        m = queue[head[r][q]]
                        work(r, "send", messages[m].value, send_s)
                        issued[m] = clock[r]
                        resolve(chan_of[m])
                        head[r][q] += 1
            elif ins.op == "wait":
                if block_on(r, arrival, ins.msgs, ins.kind, ins.name):
                    break
            elif ins.op == "sent":
                if block_on(r, sent_done, ins.msgs, ins.kind, ins.name):
                    break
            pc[r] += 1
    stuck = [r for r in range(W) if pc[r] < len(programs[r].instrs)]
    if stuck:  # pragma: no cover - the stage cut makes the schedule deadlock-free (split.py)
        raise RankSimError(f"internal error: ranks {stuck} wait for messages that are never sent")
    events.sort(key=lambda e: (e.start, e.rank))
    timed = [replace(m, posted=posted[i], issued=issued[i], start=start[i], arrival=arrival[i])
             for i, m in enumerate(messages)] if trace else []
    return clock, busy, events, timed


@dataclass(frozen=True)
class RankScale:
    """A calibration's factors on the rank simulator (:func:`envs.sim.calibration.scaled_problem`):
    each rank's op times, and every link's latency and bandwidth."""

    ranks: tuple[float, ...]
    latency: float = 1.0
    bandwidth: float = 1.0


def _simulate(c: _Compiled, ranks: Mapping[str, int], costs: RankCosts, trace: bool,
              rng: np.random.Generator | None = None, scale: RankScale | None = None) -> RankSchedule:
    # Building and running allocate thousands of small acyclic objects; the cyclic collector
    # rescanning the long-lived graph and the cached templates meanwhile was 2/3 of the build
    # (inception_v3: 38 -> 13 ms per placement) and 45% of a batch of random resnet50
    # placements (182 -> 347 per CPU-s), so it pauses (graphs.gc_pause).
    with paused_gc():
        key = tuple(sorted(ranks.items()))
        built = c.templates.get(key)
        if built is None:
            plan = rank_plan(c.graph, ranks, c.cluster.num_devices)
            built = (plan, *_build(c.graph, plan, c.cost, c.opt_fixed))
            if len(c.templates) < 4096:  # the fit re-simulates the same placements with other constants
                c.templates[key] = built
        plan, programs, messages, channel = built
        lat = c.lat if costs.latency_s is None else np.where(c.lat > 0, costs.latency_s, 0.0)
        bw = c.bw
        if scale is not None:
            lat, bw = lat * scale.latency, bw * scale.bandwidth
        clock, busy, events, timed = _run(programs, messages, channel, lat, bw, costs, trace, rng,
                                          scale.ranks if scale is not None else None)
    return RankSchedule(float(max(clock)), [float(x) for x in clock], [float(x) for x in busy], plan, events, timed)
