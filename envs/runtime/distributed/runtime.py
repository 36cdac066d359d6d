"""The per-rank training step of a placement split over processes (point-to-point schedule).

Every rank holds only its own stages of the :class:`envs.runtime.split.SplitPlan` (their
tensors are materialised by :mod:`envs.runtime.distributed.stage_state`). One training step on
one rank:

* **forward**: post every receive of the step at once (``torch.distributed.irecv``, in
  the order the peers send), then run the stages in schedule order: wait for the values
  the stage reads, run it, queue its outputs for the ranks that read them
  (``torch.distributed.isend``). Every value that crosses a stage boundary is handed over
  as a detached leaf (``requires_grad`` where the original required grad), so each
  stage's autograd graph ends at its own inputs;
* the output rank gathers the model output and computes the loss;
* **backward**: post every gradient receive, then run the stages in reverse: collect the
  gradients of the stage's outputs (from the leaf copies of later local stages, or
  received from the ranks that read them), call ``torch.autograd.backward`` on the outputs
  with those gradients, then send the gradients of the values the stage received back to
  their producers;
* the optimizer steps the rank's own parameters.

Posting receives ahead lets a value land while the rank computes: a stage waits for its
producer, not for a receive to be posted and matched after the data arrived.

Why point-to-point and not RPC with distributed autograd: ``torch.distributed.rpc`` is in
maintenance mode, needs a TensorPipe agent per process and pickles every call; the
schedule here handles arbitrary (non-contiguous) cuts with two collectives-free
primitives that both gloo (CPU) and NCCL (GPU) implement, and a contiguous split is just
the special case of one stage per rank.

Ordering rule (why it cannot deadlock or mismatch): between two ranks, messages are
matched in order (NCCL ignores tags). The receiver takes values in the order of its own
schedule — by consumer stage, then by the plan's transfer order — so the sender keeps
one queue per peer sorted the same way and sends the head of the queue as soon as it is
computed. Every value a stage needs comes from an earlier stage in the global schedule
(see :mod:`envs.runtime.split`), so by induction on the schedule every receive is eventually
matched. The backward mirrors this in reverse. Sends are non-blocking; their handles are
awaited at the end of each pass.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from envs.runtime.gradient_reach import loss_of_a_cut_output
from envs.runtime.split import SplitPlan, Transfer
from graphs.loss_reach import cut_off_graph

__all__ = ["LeafMeta", "value_meta", "pack_meta", "unpack_meta", "RankStep", "Comm", "TorchComm", "CountingComm"]


@dataclass(frozen=True)
class LeafMeta:
    """One leaf of a value that crosses ranks: a tensor's shape/dtype/grad flag, or a constant."""

    shape: tuple[int, ...] | None
    dtype: torch.dtype | None
    requires_grad: bool = False
    const: Any = None

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    @property
    def needs_grad(self) -> bool:
        return self.is_tensor and self.requires_grad


def _leaf_meta(x: Any) -> LeafMeta:
    if isinstance(x, torch.Tensor):
        return LeafMeta(tuple(x.shape), x.dtype, bool(x.requires_grad))
    return LeafMeta(None, None, False, x)


def value_meta(gm: fx.GraphModule, inputs: Sequence[Any], names: set[str] | None = None) -> dict[str, tuple[Any, list[LeafMeta]]]:
    """Tree structure and leaf metadata of the value of each node in ``names`` (all when None).

    Runs the model once with autograd on (so ``requires_grad`` is the training one); the
    caller restores any state the run updated (BatchNorm statistics).
    """
    out: dict[str, tuple[Any, list[LeafMeta]]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            value = super().run_node(n)
            if n.op not in ("placeholder", "output") and (names is None or n.name in names):
                leaves, spec = tree_flatten(value)
                out[n.name] = (spec, [_leaf_meta(x) for x in leaves])
            return value

    with torch.enable_grad():
        _Recorder(gm).run(*inputs)
    return out


def pack_meta(meta: Mapping[str, tuple[Any, list[LeafMeta]]]) -> dict[str, tuple[Any, list[LeafMeta]]]:
    """:func:`value_meta` in a form that unpickles without torch's TreeSpec pickling path:
    tree structures as pytree JSON where they have a serialised form, as-is otherwise."""
    from torch.utils._pytree import treespec_dumps

    out = {}
    for name, (spec, leaves) in meta.items():
        try:
            out[name] = (("json", treespec_dumps(spec)), leaves)
        except (NotImplementedError, TypeError):
            out[name] = (("spec", spec), leaves)
    return out


def unpack_meta(packed: Mapping[str, tuple[Any, list[LeafMeta]]]) -> dict[str, tuple[Any, list[LeafMeta]]]:
    """The inverse of :func:`pack_meta`."""
    from torch.utils._pytree import treespec_loads

    return {name: (treespec_loads(s) if kind == "json" else s, leaves)
            for name, ((kind, s), leaves) in packed.items()}


class Comm:
    """Point-to-point messaging between ranks (the runtime's only use of torch.distributed)."""

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def recv(self, tensor: torch.Tensor, src: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def irecv(self, tensor: torch.Tensor, src: int) -> Any:
        """Post a receive into ``tensor``; the handle's ``wait()`` returns once it has landed.

        Receives from one peer complete in the order they are posted. This default receives
        when waited on (nothing in flight); :class:`TorchComm` posts it at once.
        """
        return _DeferredRecv(self, tensor, src)


class _DeferredRecv:
    def __init__(self, comm: Comm, tensor: torch.Tensor, src: int) -> None:
        self.comm, self.tensor, self.src = comm, tensor, src

    def wait(self) -> None:
        self.comm.recv(self.tensor, self.src)


class _StagedRecv:
    """A receive into a host buffer, copied to the device tensor when waited on (gloo + CUDA)."""

    def __init__(self, work: Any, buf: torch.Tensor, tensor: torch.Tensor) -> None:
        self.work, self.buf, self.tensor = work, buf, tensor

    def wait(self) -> None:
        self.work.wait()
        self.tensor.copy_(self.buf)


class TorchComm(Comm):
    """``torch.distributed`` send/recv; gloo moves CUDA tensors through host memory."""

    def __init__(self, backend: str) -> None:
        self.host_staging = backend == "gloo"

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        import torch.distributed as dist

        t = tensor.detach()
        if self.host_staging and t.device.type != "cpu":
            t = t.cpu()
        return dist.isend(t.contiguous(), dst)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        import torch.distributed as dist

        if self.host_staging and tensor.device.type != "cpu":
            buf = torch.empty(tensor.shape, dtype=tensor.dtype)
            dist.recv(buf, src)
            tensor.copy_(buf)
        else:
            dist.recv(tensor, src)

    def irecv(self, tensor: torch.Tensor, src: int) -> Any:
        import torch.distributed as dist

        if self.host_staging and tensor.device.type != "cpu":
            buf = torch.empty(tensor.shape, dtype=tensor.dtype)
            return _StagedRecv(dist.irecv(buf, src), buf, tensor)
        return dist.irecv(tensor, src)


class CountingComm(Comm):
    """Wraps a :class:`Comm` and counts what crosses: messages and bytes sent, receives, and
    the time spent blocked in receives (what the rank waited for its peers, in seconds).

    With a ``status`` (:class:`envs.runtime.distributed.rank_status.RankStatus`), every
    blocking wait is recorded as "waiting for rank p", so a hang is blamed on the peer.
    """

    def __init__(self, inner: Comm, status: Any = None) -> None:
        self.inner = inner
        self.status = status
        self.reset()

    def reset(self) -> None:
        """Zero the counters."""
        self.sent = self.received = self.sent_bytes = 0
        self.recv_wait_s = 0.0

    def _waiting(self, peer: int) -> Any:
        return self.status.waiting(peer) if self.status is not None else contextlib.nullcontext()

    def isend(self, tensor: torch.Tensor, dst: int) -> Any:
        self.sent += 1
        self.sent_bytes += tensor.numel() * tensor.element_size()
        return _TimedWait(self, self.inner.isend(tensor, dst), dst, count=False)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        start = time.perf_counter()
        with self._waiting(src):
            self.inner.recv(tensor, src)
        self.recv_wait_s += time.perf_counter() - start
        self.received += 1

    def irecv(self, tensor: torch.Tensor, src: int) -> Any:
        self.received += 1
        return _TimedWait(self, self.inner.irecv(tensor, src), src)


class _TimedWait:
    def __init__(self, owner: CountingComm, handle: Any, peer: int, count: bool = True) -> None:
        self.owner, self.handle, self.peer, self.count = owner, handle, peer, count

    def wait(self) -> None:
        start = time.perf_counter()
        with self.owner._waiting(self.peer):
            self.handle.wait()
        if self.count:
            self.owner.recv_wait_s += time.perf_counter() - start


class _Outbox:
    """Per-peer send queues in the receiver's order; a message leaves once it is ready."""

    def __init__(self, comm: Comm, order: Mapping[int, list[Any]]) -> None:
        self.comm = comm
        self.queues = {peer: list(keys) for peer, keys in order.items()}
        self.pos = {peer: 0 for peer in order}
        self.ready: dict[Any, list[torch.Tensor]] = {}
        self.handles: list[Any] = []

    def put(self, key: Any, tensors: list[torch.Tensor]) -> None:
        self.ready[key] = tensors
        self.flush()

    def flush(self) -> None:
        for peer, queue in self.queues.items():
            while self.pos[peer] < len(queue) and queue[self.pos[peer]] in self.ready:
                for t in self.ready.pop(queue[self.pos[peer]]):
                    self.handles.append(self.comm.isend(t, peer))
                self.pos[peer] += 1

    def wait(self) -> None:
        for h in self.handles:
            h.wait()
        self.handles.clear()
        unsent = {p: q[self.pos[p]:] for p, q in self.queues.items() if self.pos[p] < len(q)}
        if unsent:
            raise RuntimeError(f"internal schedule error: messages never sent {unsent}")


class RankStep:
    """Runs training steps of one rank's share of a split placement.

    Args:
        plan: the split plan (same on every rank).
        rank: this rank.
        meta: :func:`value_meta` for every transferred value.
        inputs: the model's example inputs (every rank holds them), on this rank's device.
        loss_fn: ``loss_fn(output, *inputs)``; used on the output rank only.
        device: this rank's torch device.
        comm: messaging; :class:`TorchComm` in workers.
    """

    def __init__(
        self,
        plan: SplitPlan,
        rank: int,
        meta: Mapping[str, tuple[Any, list[LeafMeta]]],
        inputs: Sequence[Any],
        loss_fn: Callable[..., torch.Tensor],
        device: torch.device | str,
        comm: Comm,
    ) -> None:
        self.plan, self.rank, self.meta = plan, rank, meta
        self.device = torch.device(device)
        leaves = plan.process_inputs(*inputs) if plan.process_inputs is not None else inputs
        self.inputs = dict(zip(plan.placeholders, leaves))
        self.loss_inputs = tuple(inputs)
        self.loss_fn, self.comm = loss_fn, comm
        self.stages = plan.stages_of(rank)
        self.out_stage = len(plan.stages)
        self.by_value: dict[str, list[Transfer]] = {}
        for t in plan.transfers:
            self.by_value.setdefault(t.value, []).append(t)
        idx = {t: i for i, t in enumerate(plan.transfers)}
        self._idx = idx
        # Forward: what each of my stages (and the output pseudo-stage) receives, in order.
        self.recv_at: dict[int, list[Transfer]] = {}
        for t in sorted((t for t in plan.transfers if t.dst_rank == rank and t.src_rank != rank),
                        key=lambda t: (t.dst_stage, idx[t])):
            self.recv_at.setdefault(t.dst_stage, []).append(t)
        fwd_order: dict[int, list[Transfer]] = {}
        for t in sorted((t for t in plan.transfers if t.src_rank == rank and t.dst_rank != rank),
                        key=lambda t: (t.dst_stage, idx[t])):
            fwd_order.setdefault(t.dst_rank, []).append(t)
        self.fwd_order = fwd_order
        # Backward: gradients come back in the producer's reverse schedule.
        self.grad_recv_at: dict[int, list[Transfer]] = {}
        for t in sorted((t for t in plan.transfers if t.src_rank == rank and t.dst_rank != rank),
                        key=lambda t: (-t.src_stage, idx[t])):
            self.grad_recv_at.setdefault(t.src_stage, []).append(t)
        bwd_order: dict[int, list[Transfer]] = {}
        for t in sorted((t for t in plan.transfers if t.dst_rank == rank and t.src_rank != rank),
                        key=lambda t: (-t.src_stage, idx[t])):
            bwd_order.setdefault(t.src_rank, []).append(t)
        self.bwd_order = bwd_order
        # Values of this rank read by the loss alone: the loss takes them with their autograd graph
        # (no leaf copy), so that a loss differentiating through the model (a WGAN-GP critic's
        # gradient penalty: torch.autograd.grad of the output by the input) runs on a placement
        # that keeps the model in one process; a cut anywhere still leaves it unreachable.
        self.to_loss_whole = {v for v, ts in self.by_value.items()
                              if all(t.src_rank == rank == t.dst_rank and t.dst_stage == self.out_stage for t in ts)}

    # ------------------------------------------------------------------ helpers

    def _post_receives(self) -> dict[str, list[tuple[Any, torch.Tensor]]]:
        """Post every forward receive of the step at once, in the order the senders send.

        The values land while this rank computes, so a stage rarely waits for the
        network, only for its producer; the buffers are the received values themselves
        (kept for the backward pass anyway), so posting early costs no memory.
        """
        posted: dict[str, list[tuple[Any, torch.Tensor]]] = {}
        for stage_index in sorted(self.recv_at):
            for t in self.recv_at[stage_index]:
                bufs = []
                for m in self.meta[t.value][1]:
                    if m.is_tensor:
                        buf = torch.empty(m.shape, dtype=m.dtype, device=self.device)
                        bufs.append((self.comm.irecv(buf, t.src_rank), buf))
                posted[t.value] = bufs
        return posted

    def _receive(self, t: Transfer, posted: Mapping[str, list[tuple[Any, torch.Tensor]]]) -> Any:
        spec, leaves = self.meta[t.value]
        arrived = iter(posted[t.value])
        values = []
        for m in leaves:
            if not m.is_tensor:
                values.append(m.const)
                continue
            handle, buf = next(arrived)
            handle.wait()
            values.append(buf.requires_grad_(True) if m.needs_grad else buf)
        return tree_unflatten(values, spec)

    def _post_grad_receives(self) -> dict[tuple[str, int], list[tuple[Any, torch.Tensor]]]:
        """Post every gradient receive of the backward pass, in the order the peers send them."""
        posted: dict[tuple[str, int], list[tuple[Any, torch.Tensor]]] = {}
        for stage in reversed(self.stages):
            for name in stage.outputs:
                grads_meta = [m for m in self.meta[name][1] if m.needs_grad]
                if not grads_meta:
                    continue
                for t in self.by_value.get(name, []):
                    if t.dst_rank == self.rank:
                        continue
                    bufs = []
                    for m in grads_meta:
                        buf = torch.empty(m.shape, dtype=m.dtype, device=self.device)
                        bufs.append((self.comm.irecv(buf, t.dst_rank), buf))
                    posted[(name, t.dst_rank)] = bufs
        return posted

    @staticmethod
    def _tensor_leaves(value: Any, leaves: list[LeafMeta], grad_only: bool) -> list[torch.Tensor]:
        flat, _ = tree_flatten(value)
        return [x for x, m in zip(flat, leaves) if m.is_tensor and (m.needs_grad or not grad_only)]

    # ------------------------------------------------------------------ one step

    def step(self) -> float | None:
        """Forward, loss (output rank), backward; gradients land in ``.grad`` of own parameters.

        Returns:
            the loss on the output rank, None elsewhere.
        """
        produced: dict[str, Any] = {}  # value -> output of my stage (with its autograd graph)
        copies: dict[str, Any] = {}  # value -> the leaf copy stages on this rank read
        outbox = _Outbox(self.comm, {p: [("f", self._idx[t]) for t in ts] for p, ts in self.fwd_order.items()})
        posted = self._post_receives()
        for stage in self.stages:
            for t in self.recv_at.get(stage.index, []):
                copies[t.value] = self._receive(t, posted)
            args = [self.inputs[n] if n in self.inputs else copies[n] for n in stage.inputs]
            outs = stage.module(*args)
            for name, value in zip(stage.outputs, outs):
                produced[name] = value
                for t in self.by_value.get(name, []):
                    if t.dst_rank == self.rank:
                        copies[name] = value if name in self.to_loss_whole else cut_off_graph(value)
                    else:
                        outbox.put(("f", self._idx[t]),
                                   self._tensor_leaves(value, self.meta[name][1], grad_only=False))

        loss = None
        if self.rank == self.plan.output_rank:
            for t in self.recv_at.get(self.out_stage, []):
                copies[t.value] = self._receive(t, posted)
            output = tree_map(lambda x: copies[x] if isinstance(x, str) and x in copies
                              else self.inputs.get(x, x) if isinstance(x, str) else x,
                              self.plan.output_args)
            loss = loss_of_a_cut_output(self.loss_fn, output, self.loss_inputs)
        outbox.wait()

        # ---- backward
        grad_outbox = _Outbox(self.comm, {p: [("b", self._idx[t]) for t in ts] for p, ts in self.bwd_order.items()})
        grad_posted = self._post_grad_receives()
        if loss is not None:
            loss.backward()
            self._send_back(self.out_stage, copies, grad_outbox)
        for stage in reversed(self.stages):
            roots: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            for name in stage.outputs:
                leaves_meta = self.meta[name][1]
                outs = self._tensor_leaves(produced[name], leaves_meta, grad_only=True)
                if not outs or name in self.to_loss_whole:
                    # nothing here needs a gradient (the consumers send none either), or the loss's
                    # backward already ran through this value's graph
                    continue
                total = [None] * len(outs)
                for t in self.by_value.get(name, []):
                    if t.dst_rank == self.rank:
                        got = [c.grad for c in self._tensor_leaves(copies[name], leaves_meta, grad_only=True)]
                    else:
                        got = []
                        for handle, buf in grad_posted[(name, t.dst_rank)]:
                            handle.wait()
                            got.append(buf)
                    total = [g if acc is None else (acc if g is None else acc + g) for acc, g in zip(total, got)]
                for o, g in zip(outs, total):
                    if g is not None and o.requires_grad:
                        roots.append(o)
                        grads.append(g)
            if roots:
                torch.autograd.backward(roots, grads)
            self._send_back(stage.index, copies, grad_outbox)
        grad_outbox.wait()
        return None if loss is None else float(loss.detach())

    def _send_back(self, stage_index: int, copies: Mapping[str, Any], outbox: _Outbox) -> None:
        """Send the gradients of the values first read at ``stage_index`` back to their producers."""
        for t in self.recv_at.get(stage_index, []):
            leaves = self._tensor_leaves(copies[t.value], self.meta[t.value][1], grad_only=True)
            grads = [c.grad if c.grad is not None else torch.zeros_like(c) for c in leaves]
            outbox.put(("b", self._idx[t]), [g.detach() for g in grads])
