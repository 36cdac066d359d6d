"""Transfers in a placed graph: the :func:`to_device` nodes that move a value between devices.

A transfer node sits on every cut edge of a placed graph (:func:`_transfer_node`, named after
its producer and destination, marked ``placer_transfer`` in its meta so that
:func:`transfer_nodes` finds them), and right after a random draw made where the original
draws it (:func:`factories_where_placed`, which also gives factories their node's device).
Non-blocking only towards an accelerator (:mod:`envs.runtime.apply`'s module doc says why).
Apart from the rest of apply because a pipeline stage (:mod:`envs.runtime.pipeline.worker`)
places its factories with the same code, and the check and integrations move values with
:func:`to_device`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from envs.runtime.device_names import _canonical
from graphs.ops import draws_random, is_factory
from graphs.tensor_tree import map_tensors

__all__ = ["factories_where_placed", "to_device", "transfer_nodes"]


def to_device(value: Any, device: str, non_blocking: bool = False, copy: bool = False) -> Any:
    """Move every tensor inside ``value`` (nested containers and dataclasses,
    :func:`graphs.tensor_tree.map_tensors`) to ``device``.

    Non-tensor leaves pass through unchanged. This is the target of every transfer
    node that :func:`apply_placement` inserts. ``copy``: a tensor already on ``device``
    is cloned rather than passed on as itself, as a move between two real devices gives
    the destination its own storage.
    """
    if isinstance(value, fx.Proxy):
        # Unpickling a GraphModule re-traces its code (fx's _deserialize_graph_module): tree_map
        # would pass the Proxy through and the transfer would vanish from the graph, the loaded
        # model's ops on one device then reading tensors of another.
        return value.tracer.create_proxy("call_function", to_device, (value, device),
                                         {"non_blocking": non_blocking, **({"copy": True} if copy else {})})

    def move(x: torch.Tensor) -> torch.Tensor:
        moved = x.to(device, non_blocking=non_blocking)
        return moved.clone() if copy and moved is x else moved

    # Into dataclasses too: pytree leaves an unregistered one whole, and its tensors stayed where
    # they were made, not on the output device the loss code was promised (walkthrough).
    return map_tensors(move, value)


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_") or "dev"


def _transfer_node(graph: fx.Graph, producer: fx.Node, src: str | None, dst: str, real: str, non_blocking: bool,
                   copy_transfers: bool) -> fx.Node:
    """A :func:`to_device` node moving ``producer``'s value from ``src`` to ``dst`` (``real`` on this
    machine), at the graph's insertion point; non-blocking only towards an accelerator (module doc)."""
    t = graph.call_function(
        to_device,
        (producer, real),
        {"non_blocking": bool(non_blocking and torch.device(real).type != "cpu"),
         **({"copy": True} if copy_transfers else {})},
    )
    t.name = graph._graph_namespace.create_name(f"{producer.name}_to_{_ident(dst)}", None)
    t.meta["placer_transfer"] = (src, dst)
    return t


def factories_where_placed(graph: fx.Graph, placed: Callable[[fx.Node], tuple[str, str]],
                           non_blocking: bool = True, copy_transfers: bool = False) -> list[fx.Node]:
    """Make every op of ``graph`` that names a device, and every factory that names none, make its
    tensor on its node's device; returns the transfers it inserted. ``placed(node)``: the node's
    device name and this machine's device for it (apply: the placement's; a pipeline stage: its one
    device).

    A constant ``device=`` (torch.export bakes the capture's into factory ops and ``.to``) is
    replaced. A factory without one (``torch.arange(n)``, ``torch.zeros(n)`` in an fx graph:
    :func:`graphs.ops.is_factory`) would make its tensor on the default device whatever the
    placement, and its consumers on the placed device would get no transfer (the value is not
    where the placement, and the simulator, say it is), so it is given its node's device; its
    dtype and other arguments stay. A device computed in the graph (``device=x.device``)
    follows its data already and is left alone.

    A random draw (:func:`graphs.ops.draws_random`: ``torch.randn``) is not moved: another
    device's generator draws other numbers, and the placed model must compute the original's.
    It draws where the original does (its constant ``device=``, else the default device at the
    time of this call), and a transfer right after it brings its value to its placed device,
    where its consumers (and the simulator) expect it. That transfer's source is the real device
    the draw is made on, not a device name of the placement.
    """
    copies: list[fx.Node] = []
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        named = n.kwargs.get("device")
        if not isinstance(named, (torch.device, str)) and (named is not None or not is_factory(n)):
            continue
        name, real = placed(n)
        device = torch.device(real)
        if not draws_random(n):
            if named is None or torch.device(named) != device:
                n.kwargs = {**n.kwargs, "device": device}
            continue
        drawn = torch.device(named) if named is not None else torch.get_default_device()
        if _canonical(drawn) == _canonical(device):
            continue
        with graph.inserting_after(n):
            t = _transfer_node(graph, n, str(drawn), name, real, non_blocking, copy_transfers)
        n.replace_all_uses_with(t, delete_user_cb=lambda user: user is not t)
        copies.append(t)
    return copies


def transfer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The transfer nodes :func:`apply_placement` inserted into ``gm``."""
    return [n for n in gm.graph.nodes if "placer_transfer" in n.meta]
