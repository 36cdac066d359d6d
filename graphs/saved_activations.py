"""What autograd keeps for the backward, per fx node: the ``act_bytes`` of the placement graph.

The PyTorch behaviour: during a forward with grad enabled, each autograd ``Node`` stores
the tensors its backward formula needs (``SavedVariable``; derivatives.yaml names them):
``linear``/``mm`` keep their *inputs* (and the weight, a parameter), ``relu``/``softmax``/
``tanh`` their *output*, ``dropout`` its boolean mask, ``add`` and views nothing. A saved
tensor keeps its whole storage alive until the backward has used it, and views of one
storage share it. ``torch.autograd.graph.saved_tensors_hooks`` sees every one of them as it
is packed; this pass runs the captured GraphModule's forward (and the model's loss) once
under such a hook and sums the unique storages packed, parameters and buffers excluded
(they are ``param_bytes``). The model's outputs count too: the training loop holds them
(``out = model(x); loss_fn(out, y).backward()``) until the step ends, measured on the CPU
allocator as the logits alive through a language model's backward.

Attribution: a storage belongs to the fx node whose output first held it (a view's storage
is its base's); a storage no node returned (the gates and workspaces a leaf LSTM makes
inside its call, the loss's own intermediates) belongs to the node running when it was
packed (the loss's to the node producing the model's output, whose device runs it).

The forward runs on fake tensors (``FakeTensorMode``: no memory, no compute, so paper sizes
capture in seconds); a model whose ops have no fake implementation runs on real tensors,
as shape propagation does. On the small zoo models the fake and the real sums agree byte
for byte (tests/test_saved_activations.py). Graph files written before this pass have no
``act_bytes``: :func:`envs.sim.problem_compile.compile_problem` then keeps the older estimate (each
op that requires grad keeps its output), documented there as the fallback.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Iterable
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from graphs.probe_run import probe_module
from graphs.tensor_tree import tensors_in

log = logging.getLogger(__name__)

#: Graph attribute naming how ``act_bytes`` was measured ("fake" or "real" tensors).
SAVED_FROM = "act_bytes_from"


def _key(t: torch.Tensor) -> int | None:
    """The StorageImpl's address: one key per storage, shared by all of its views."""
    try:
        return int(t.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError):  # sparse and other storage-less tensors
        return None


def _nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return int(t.numel() * t.element_size())


class _SavedRecorder(fx.Interpreter):
    """Runs a GraphModule node by node, noting which node produced each storage."""

    def __init__(self, gm: fx.GraphModule, excluded: set[int]) -> None:
        super().__init__(gm)
        self.excluded = excluded
        self.producer: dict[int, str] = {}
        self.saved: dict[int, tuple[str, int]] = {}  # storage -> (node it is charged to, bytes)
        self.current = ""
        # Outputs stay referenced while recording: a freed storage's address could be reused
        # by a later node's output and inherit the wrong producer.
        self.keep: list[torch.Tensor] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _key(t)
        if key is not None and key not in self.excluded and key not in self.saved:
            self.saved[key] = (self.producer.get(key, self.current), _nbytes(t))
        return t

    def run_node(self, n: fx.Node) -> Any:
        self.current = n.name
        out = super().run_node(n)
        for t in tensors_in(out):
            key = _key(t)
            if key is not None:
                self.producer.setdefault(key, n.name)
                self.keep.append(t)
        return out


def _output_owner(gm: fx.GraphModule) -> str:
    """The node whose device runs the loss: the producer of the model's first output."""
    for node in gm.graph.nodes:
        if node.op == "output":
            inputs = node.all_input_nodes
            return inputs[0].name if inputs else node.name
    return ""


def measure_saved_bytes(gm: fx.GraphModule, inputs: tuple, *, fake: bool = True,
                        loss_fn: Callable[..., torch.Tensor] | None = None) -> dict[str, int]:
    """Bytes of the storages autograd saves for the backward, and of the model's outputs, per fx node name.

    ``fake``: run on fake tensors (no memory, no compute); False runs real tensors (the
    module's buffers and the random state are restored afterwards, :mod:`graphs.probe_run`).
    ``loss_fn(output, *inputs)``: the model's loss, whose saved tensors are charged to the node
    producing the first output.
    Raises whatever the forward raises (an op without a fake kernel, for one).
    """
    names = {n.name: 0 for n in gm.graph.nodes}
    with contextlib.ExitStack() as stack:
        module, run_inputs = stack.enter_context(probe_module(gm, inputs, fake=fake))
        excluded = {k for t in list(module.parameters()) + list(module.buffers()) if (k := _key(t)) is not None}
        recorder = _SavedRecorder(module, excluded)
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t))
        out = recorder.run(*run_inputs)
        recorder.current = _output_owner(gm)
        if loss_fn is not None:
            loss_fn(out, *run_inputs)
        # The training loop holds the model's output (``out = model(x); loss_fn(out).backward()``)
        # until the step ends, saved by autograd or not.
        for t in tensors_in(out):
            recorder.pack(t)
    for name, nbytes in recorder.saved.values():
        names[name] = names.get(name, 0) + nbytes
    return names


def annotate_saved_bytes(graph: nx.DiGraph, gm: fx.GraphModule, inputs: tuple, *, fake: bool = True,
                         loss_fn: Callable[..., torch.Tensor] | None = None) -> str:
    """Set ``act_bytes`` on every node of ``graph`` (the placement graph of ``gm``).

    Tries fake tensors first when ``fake``; an op with no fake implementation falls back to
    real tensors. Returns which ran (``"fake"`` or ``"real"``), also recorded as the graph
    attribute :data:`SAVED_FROM`.
    """
    used = "fake" if fake else "real"
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            saved = measure_saved_bytes(gm, inputs, fake=fake, loss_fn=loss_fn)
    except Exception as exc:
        if not fake:
            raise
        log.info("saved activations: fake tensors failed (%s); measuring on real tensors", type(exc).__name__)
        saved = measure_saved_bytes(gm, inputs, fake=False, loss_fn=loss_fn)
        used = "real"
    for name in graph.nodes:
        graph.nodes[name]["act_bytes"] = int(saved.get(name, 0))
    graph.graph[SAVED_FROM] = used
    return used


# --------------------------------------------------------------------------- the allocator's peak


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum({_key(t): _nbytes(t) for t in tensors}.values())


def measure_step_peak(model: nn.Module, inputs: tuple, loss_fn: Callable[..., torch.Tensor],
                      optimizer_fn: Callable[[Any], torch.optim.Optimizer]) -> float:
    """Peak bytes the CPU allocator holds during one real training step of ``model``.

    The check of the simulator's memory rule (benchmarks/bench_memory.py): one warm-up step
    (the optimizer creates its state on its first step), then ``zero_grad`` and one step
    (forward, ``loss_fn(output, *inputs)``, backward, optimizer step) under
    ``torch.profiler.profile(profile_memory=True)``; its allocation events, replayed in time
    order, give the peak above the bytes alive when it starts (parameters, buffers,
    optimizer state, the input batch), which are added. Runs real tensors on the CPU.
    """
    from torch.profiler import ProfilerActivity, profile

    model.train()
    opt = optimizer_fn(model.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(*inputs)  # held through the backward, as a training loop holds it
        loss_fn(out, *inputs).backward()
        opt.step()

    step()
    opt.zero_grad(set_to_none=True)
    state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    base = _storage_bytes(list(model.parameters()) + list(model.buffers()) + state + list(tensors_in(inputs)))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return float(base + peak)
