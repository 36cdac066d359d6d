"""Simulating a placement over processes (ranks: ``--devices cpu:0,cpu:1``), op by op.

One process per device, each with one host thread that runs its share of the training
step exactly as :class:`envs.runtime.distributed.runtime.RankStep` (called by
``envs/runtime/distributed/worker.py``, ``measure`` task) runs it. Rules, each with its
source (file:function of our runtime, gloo or torch) or the measurement behind it:

**R1 Stages.** Each rank's ops run as the stages :func:`envs.sim.stages.cut_stages` cuts
(the very function ``envs/runtime/split.py:stage_assignment`` calls). A stage is one
``GraphModule`` call: its outputs exist only when the call returns
(``runtime.py:RankStep.step``: ``outs = stage.module(*args)``), so every value it sends
leaves at the stage's end. Values and their receivers are :func:`rank_plan`, the same
``Transfer`` list ``split.py:split_by_rank`` builds (one per (value, reading rank),
``dst_stage`` = the first stage there that reads it, sorted by producer stage, output
position, reading rank). A cut the runtime refuses (a value handed to another stage before an
in-place update of it, ``split.py:_refuse_updates_after_handover``) is refused here by the same
rule (:func:`envs.sim.stages.refused_handover`, ``RankPlan.refusal``): its step time is
infinite in :meth:`~envs.sim.rank_simulator.RankSimulator.step_times` and the batched simulator's rows, so no search
picks a placement the runtime would then refuse.

**R2 Host thread.** A CPU rank runs every op on its one host thread (``torch.set_num_threads``
= 1 in ``worker.py:run_rank``), one after another in program order. An op costs its
profiled CPU time (``fwd_time``/``bwd_time``/``opt_time``, in-situ ticks that already hold
the per-node Python and dispatcher time, ``graphs/profile/in_situ.py``) times
``RankCosts.op_scale``; a stage call adds ``stage_fwd_s`` (GraphModule call, pytree of
inputs/outputs), a backward call ``stage_bwd_s`` (``torch.autograd.backward`` set-up; the
engine runs CPU nodes on the calling thread, ``engine.cpp:execute_with_graph_task``).

**R3 Receives are posted up front.** At the start of the forward the rank posts every
receive of the pass (``RankStep._post_receives``: one ``irecv`` per tensor leaf, in the
order the peers send); a stage first waits for the messages it reads (``recv_at[stage]``,
in order), then runs. Gradient receives are posted the same way when the rank's backward
starts (``RankStep._post_grad_receives``). Consuming a message costs the receiver
``recv_s`` once it has landed: the blocked thread is woken by gloo's I/O thread (a futex
wake-up and a reschedule) and the buffer wrapped; posting is cheap (``torch.empty`` +
``irecv``) and sits in ``step_s``. A wait that finds its message not yet landed puts the
thread to sleep (gloo ``UnboundBuffer::waitRecv``, a condition variable): it runs again
``wake_s`` after the payload lands. Measured here (each rank's CPU seconds per step over
half of 6 models x 19-24 placements, regressed on the plan's counts, :func:`envs.sim.rank_calibration.fit_host_costs`):
~210 us per stage call (forward or backward: the GraphModule or ``autograd.backward`` call
and the runtime's Python around it), ~90 us per message at each end, ~165 us per step (at
load 7-14); on a quiet machine ~96 us per stage call each way, ~112 us per message end,
~235 us per step (benchmarks/results/agreement_ranks.md). A stage call is charged per call,
not per value: the runtime's per-value work (``_handoff``'s ``tree_map``, one
``AccumulateGrad`` per leaf input, one root per output in ``autograd.backward``) measures
~10 us per value read or gradient root and ~23 us per hand-over against ~75 us per call, in
one process with a comm that never waits (``benchmarks/rank_stage_costs.py``), and a
per-value term fits to ~0 in both the ranks' CPU time and their steps.

**Late wake-ups (R3, continued).** A thread that sleeps in a receive is now and then woken
late, by about a scheduler tick: with probability ``late_p`` a sleeping wait ends
``late_s`` after ``wake_s`` (``late_s`` = 3.5 ms, the jump between the fast and the slow
mode of the quiet runs' steps; this kernel ticks at CONFIG_HZ=250, every 4 ms). Measured
steps are therefore a distribution with a slow tail whose weight grows with the sleeping
waits: on the quiet runs (benchmarks/results/agreement_ranks.md, "Late wake-ups"), a
placement's mean step exceeds its 10th-percentile step by an amount that goes with the
simulated count of sleeping waits (15-repeat run: Spearman 0.81-0.92 per model, 30-210 us
per wait); counting only the waits that sleep longer than 100 or 300 us fits no better,
longer than 1 ms much worse, so every sleeping wait counts. Likely cause, from a two-process
ping-pong (``benchmarks/rank_wake.py``, quiet and loaded): a late delivery costs about one
tick, mostly as runnable-but-not-running time of the woken thread (its ``run_delay``), and on
a quiet machine it comes when the woken thread must run on a vCPU other than the waker's:
pinned processes are late 2-35% of the time, more often the longer the vCPU idled; free ones
0-0.5%. This VM halts an idle vCPU at once (``haltpoll.guest_halt_poll_ns=0``). In a real
step the peer's vCPU idles while one rank computes, and its main and gloo I/O threads are
woken there. How often depends on idle lengths and on other jobs, which the simulator does
not know: hence one fitted probability. The simulator's step is the **expected** step:
each sleeping wait costs ``wake_s + late_p * late_s`` (:attr:`RankCosts.expected_wake_s`) and the delay
propagates like any other, so it is compared with the *mean* measured step;
:meth:`~envs.sim.rank_simulator.RankSimulator.step_time_samples` draws the late wake-ups instead (each sleeping
wait independently), whose median is compared with the *median* measured step. Fitted on
the mean steps, ``late_p`` comes out at 0.6% (~21 us per sleeping wait); held at 0-4% it
leaves the held-out ranking unchanged: sleeping waits go with messages, whose per-message
constants already carry most of their cost.

**R3b Cold after a sleep.** The ops a thread runs right after it slept in a wait run slower:
after a sleeping wait, the rank's next ``cold_s`` seconds of op time (forward, backward or
update; scaled times) take ``1 + cold_factor`` times as long. Measured here in one process
with no peer at all (``benchmarks/rank_cold.py``: a pass over ResNet-50's first stages, CPU
time per module call, after a ``time.sleep`` against back to back): after a 20 ms sleep the
work costs 2.1-3.2 ms more CPU, most of it in the first few ms and little after ~20 ms
(after 1-5 ms of sleep 0.1-1.9 ms), so ``cold_s`` = 20 ms is held and ``cold_factor`` is
fitted on measured steps; every sleeping wait is charged alike (the measured extra grows with
the sleep's length; the fit averages over a real step's waits). In the runtime
(``benchmarks/agreement_ranks.py``, 40 timed steps per placement, 2026-12-05) each rank's CPU
time per step grew with its time spent waiting (0.34-0.98 CPU s per second waited, per
model), while gloo's wait itself burns no CPU (a receive waiting 1-20 ms used 2-15% of a
core); without the rule, two-stage splits of ResNet-50 and Inception-v3 measured 5-15 ms
slower than one rank, but were simulated as fast as one rank, which ranked them wrongly
(held-out Spearman 0.84-0.89 on the two models in two runs); with it, 0.93-0.96, the other four
models unchanged (0.91-0.97; ``benchmarks/results/agreement_ranks.md``). A thread that
never sleeps (one rank doing all the work) is never cold. Likely cause: an idle vCPU halts at
once here (``haltpoll.guest_halt_poll_ns=0``) and its caches and frequency are not what the
work left them; not traced.

**R4 Per-peer FIFO send queues in the receiver's order.** ``runtime.py:_Outbox`` keeps one
queue per peer, sorted as the receiver consumes (forward: ``(dst_stage, transfer
index)``; backward: ``(-src_stage, transfer index)``), and issues ``isend`` for the head of a
queue as soon as it is ready, so a ready message waits behind an earlier, unready one to
the same peer. An ``isend`` costs the sender ``send_s`` (detach, ``contiguous``, gloo op).
A value read by a later stage of the same rank is handed over locally (``_handoff``,
``handoff_s``).

**R5 Gloo tcp rendezvous, one connection per pair.** ``gloo/transport/tcp/pair.cc``:
``Pair::send`` writes the payload at once only "if there is a remote pending receive",
else it waits for the peer's ``NOTIFY_RECV_READY`` (which ``Pair::recv`` sends when the
receive is posted); ``sendAsyncMode`` queues a write behind "an earlier operation [that]
hasn't finished transmitting" (FIFO per direction). So the payload of message m from a to
b starts at ``max(issued, posted_at_b + lat, previous payload a->b done)``, occupies the
connection ``bytes/bw`` and lands ``lat`` later; the sender's ``wait()`` on it returns when
its payload is written (``UnboundBuffer::waitSend``). ``lat``/``bw`` are the cluster's link
(ping-pong between two gloo workers, ``worker.py:_ping_pong``).

**R6 Loss and backward.** The output rank receives the output values, computes the loss
and runs ``loss.backward()`` (``loss_s`` in all: the loss is outside the profiled graph),
then sends back the gradients of the values it received for the output. Before its
backward every rank waits for its forward sends (``outbox.wait()``). Then stages run in
reverse: a stage waits for the gradients of all its outputs (local ones are already
there; remote ones in ``(value, transfer)`` order), calls ``torch.autograd.backward`` once
(if any output needs a gradient: ``stage_bwd_s`` + its ops' ``bwd_time``), then sends the
gradients of the values it first read back to their producers (``RankStep._send_back``).
The rank waits for its gradient sends (``grad_outbox.wait()``).

**R7 Optimizer and step.** Each rank steps its own parameters (``worker.py``:
``optimizer.step()`` over its stages' parameters): its ops' ``opt_time`` plus the
profiled per-step ``optimizer_fixed`` if it holds parameters; every rank adds ``step_s``
(``zero_grad``, the outboxes, the two barriers that bracket a timed step). A timed step
lasts until the slowest rank is done (the closing ``dist.barrier()``; the measurer takes
the slowest rank's time, ``distributed/measure.py``): **step = max over ranks**.

Limits (documented, not modelled): a GPU rank is costed like a CPU one with its profiled
times on the host thread (no asynchronous stream, no host staging copy); gloo's own I/O
thread and other processes competing for the cores are not modelled (the fitted
constants absorb their average); every value is one message per tensor leaf
(``leaves``; default 1, 0 for a value of no bytes) of ``out_bytes`` split evenly.

API: :func:`~envs.sim.rank_plan.rank_plan` (stages and transfers of a placement, the
runtime's cut), :func:`simulate_ranks` (the readable event-driven reference, op-level trace),
:func:`simulate_ranks_batch` and :class:`~envs.sim.rank_simulator.RankSimulator` (many
placements, op dicts or group rows: same rules, compiled once, plans cached per placement, no
trace), :func:`~envs.sim.rank_bound.rank_lower_bound` (re-exported here),
:class:`~envs.sim.rank_costs.RankCosts` (constants); calibration from measured steps is
:mod:`envs.sim.rank_calibration`.

Where the rules live in code: :mod:`envs.sim.rank_compile` (the placement-independent
inputs: op costs per rank, links, ``value_leaves``), :mod:`envs.sim.rank_program` (R1-R7 as
each rank's instruction list), :mod:`envs.sim.rank_loop` (the event loop: R3, R3b, R5),
:mod:`envs.sim.rank_schedule` (the results: ``RankSchedule``, its events and messages).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx
import numpy as np

from envs.hardware.cluster import Cluster
from envs.sim.rank_bound import rank_lower_bound
from envs.sim.rank_compile import _compile, _ranks_of
from envs.sim.rank_costs import RankCosts
from envs.sim.rank_loop import _simulate
from envs.sim.rank_schedule import RankSchedule

__all__ = [
    "simulate_ranks",
    "simulate_ranks_batch",
    "rank_lower_bound",
]


def simulate_ranks(graph: nx.DiGraph, placement: Mapping[str, str | int], cluster: Cluster,
                   costs: RankCosts | None = None, leaves: Mapping[str, int] | None = None) -> RankSchedule:
    """Simulate one training step of ``placement`` run by one process per device of ``cluster``.

    The readable reference (rules R1-R7 in the module doc): each rank's step is built as
    the list of what its thread does (post receives, run a stage's ops, issue sends, wait),
    and an event loop advances the ranks in time order, a rank blocking on a message until
    its payload has landed.

    Args:
        graph: the op-level placement graph, profiled on the cluster's device kinds.
        placement: ``{node: device name or index}``; every compute node must be placed
            (the output node's entry, if any, names the rank that computes the loss).
        cluster: the rank cluster (``rank_cluster("cpu:0,cpu:1")``): devices in rank order
            and the measured links between them.
        costs: the runtime's constants (default :class:`RankCosts`).
        leaves: tensors per value (a value of k tensors is k messages); default 1 each.

    Returns:
        the :class:`RankSchedule` with the step time (slowest rank), each rank's end and
        busy time, the plan, every host-thread interval and every message.

    Raises:
        RankSimError: a node on an unknown device, an unplaced node, bad constants.
    """
    return _simulate(_compile(graph, cluster, leaves), _ranks_of(placement, cluster),
                     costs or RankCosts(), trace=True)


def simulate_ranks_batch(graph: nx.DiGraph, placements: Sequence[Mapping[str, str | int]], cluster: Cluster,
                         costs: RankCosts | None = None, leaves: Mapping[str, int] | None = None) -> np.ndarray:
    """Step times of many placements (same rules as :func:`simulate_ranks`, compiled once, no trace)."""
    c = _compile(graph, cluster, leaves)
    k = costs or RankCosts()
    return np.array([_simulate(c, _ranks_of(p, cluster), k, trace=False).step_time for p in placements])
