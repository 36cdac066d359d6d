"""The isolated profiling method: every distinct op signature timed once, alone, and reused.

``method="isolated"`` of :func:`graphs.profile.profiler.profile_graph` (and its fallback when
the whole graph cannot run on a device): one run under a :class:`torch.fx.Interpreter`
(:class:`ProfilingInterpreter`) records every node's real inputs; each distinct *signature*
(:func:`graphs.profile.signatures.node_signature`) is timed once, alone
(:func:`graphs.profile.op_timing.time_call`), and reused by every node with that signature
(the same LSTM cell at every unrolled time step), so a 50,000-node graph costs a few hundred
timings. Forward = median of looped calls; backward = median of ``torch.autograd.grad`` over
inputs and parameters, minus the engine's fixed per-call cost.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from graphs.profile.errors import ProfileError
from graphs.profile.in_situ import COMPUTE_OPS
from graphs.profile.op_timing import median_loop, time_call
from graphs.profile.profile_info import ProfileInfo
from graphs.profile.signatures import node_signature
from graphs.tensor_tree import map_tensors


def _callable_for(node: fx.Node, gm: nn.Module, device: torch.device
                  ) -> tuple[Callable[..., Any], list[torch.Tensor]]:
    if node.op == "call_module":
        module = copy.deepcopy(gm.get_submodule(str(node.target))).to(device)
        return module, list(module.parameters())
    if node.op == "call_method":
        name = str(node.target)
        return (lambda self_, *a, **k: getattr(self_, name)(*a, **k)), []
    if isinstance(node.target, str):  # fx gives call_function nodes a callable target
        raise ProfileError(f"node {node.name!r} ({node.op}) has no callable target {node.target!r}")
    return node.target, []


class ProfilingInterpreter(fx.Interpreter):
    """Runs the graph once; times every node whose signature is new on every device."""

    def __init__(self, gm: fx.GraphModule, devices: list[torch.device], repeats: int,
                 infos: dict[str, ProfileInfo]) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.devices = devices
        self.repeats = repeats
        self.infos = infos
        self.by_signature: dict[tuple, dict[str, tuple[float, float]]] = {}
        self.times: dict[str, dict[str, tuple[float, float]]] = {}

    def run_node(self, n: fx.Node) -> Any:
        with self._set_current_node(n):
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            if n.op in COMPUTE_OPS:
                self._time(n, args, kwargs)
            try:
                return getattr(self, n.op)(n.target, args, kwargs)
            except Exception as exc:
                raise ProfileError(
                    f"the example inputs do not run through node {n.name!r} ({n.op} {n.target}): "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; expected "
                    "the inputs the graph was captured with") from exc

    def _time(self, n: fx.Node, args: tuple, kwargs: dict) -> None:
        module = self.module.get_submodule(str(n.target)) if n.op == "call_module" else None
        try:
            sig = node_signature(n, module, args, kwargs)
            hash(sig)
        except TypeError:  # an unhashable constant argument: time this node on its own
            sig = ("node", n.name)
        known = self.by_signature.get(sig)
        if known is None:
            known = {}
            for dev in self.devices:
                info = self.infos[dev.type]
                start = time.perf_counter()
                known[dev.type] = self._time_on(n, args, kwargs, dev, info)
                info.seconds += time.perf_counter() - start
                info.signatures += 1
            self.by_signature[sig] = known
        for dev in self.devices:
            self.infos[dev.type].compute_nodes += 1
        self.times[n.name] = known

    def _time_on(self, n: fx.Node, args: tuple, kwargs: dict, dev: torch.device,
                 info: ProfileInfo) -> tuple[float, float]:
        fn, params = _callable_for(n, self.module, dev)
        try:
            return time_call(fn, args, kwargs, dev, self.repeats, params)
        except Exception as exc:  # noqa: BLE001 - an op that cannot run alone must not stop profiling
            # Fall back to the forward without autograd; backward is then estimated as 2x the
            # forward (the usual ratio for matmul-like ops) and the node is reported.
            info.failures.append(f"{n.name} timed without autograd: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            with torch.no_grad():
                fwd_args = map_tensors(lambda t: t.detach().to(dev, copy=True), args)
                fwd_kwargs = map_tensors(lambda t: t.detach().to(dev, copy=True), kwargs)
                try:
                    fwd = median_loop(lambda: fn(*fwd_args, **fwd_kwargs), dev, self.repeats, 1)
                except Exception:  # noqa: BLE001
                    fwd = 0.0
            return fwd, 2.0 * fwd
