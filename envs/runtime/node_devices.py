"""The device each node of a placed graph runs on: the placement, adjusted by the mutation rules.

State that an op updates in place (BatchNorm running statistics) goes to the device of the op
that updates it, an in-place op on an activation runs where that activation lives, and a
view of a tensor updated in place runs where that tensor lives (:func:`_effective_devices`);
otherwise an update would land on a transferred copy and be lost. An input that forward()
updates in place is moved once, to the device of its first update (:func:`written_inputs`),
and its final value is written back into the caller's tensor (:func:`write_back`). Kept
apart from the graph rewriting (:mod:`envs.runtime.apply`) because these rules decide where
things run, before any node or tensor is moved.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.fx as fx

from envs.runtime.apply_error import ApplyError
from graphs.ops import in_place_writes, storage_roots, view_parent, written_nodes

__all__ = ["written_inputs", "write_back"]


def _effective_devices(
    gm: fx.GraphModule, placement: Mapping[str, str], output_device: str
) -> tuple[dict[str, str | None], dict[str, str]]:
    """Device each node runs on: its placement, adjusted for mutation; None for inputs. With it
    the inputs forward() updates in place and the device each is moved to (:func:`written_inputs`,
    which the adjustment needs first: apply moves those inputs there without computing it again)."""
    nodes = list(gm.graph.nodes)
    first = next((placement[n.name] for n in nodes if n.name in placement), output_device)
    dev: dict[str, str | None] = {}
    for n in nodes:
        if n.op == "placeholder":
            dev[n.name] = None  # the caller's tensor: moved to each consuming device
        elif n.op == "output":
            dev[n.name] = output_device
        elif n.name in placement:
            dev[n.name] = placement[n.name]
        elif n.op == "get_attr":
            placed_users = [u for u in n.users if u.name in placement]
            dev[n.name] = placement[placed_users[0].name] if placed_users else None
        else:
            # Unplaced compute (e.g. nodes added after capture) runs with its first input.
            ins = [dev.get(a.name) for a in n.all_input_nodes if dev.get(a.name) is not None]
            dev[n.name] = ins[0] if ins else first
    for n in nodes:  # unplaced get_attr whose users were unplaced too
        if n.op == "get_attr" and dev[n.name] is None:
            ins = [dev[u.name] for u in n.users if dev[u.name] is not None]
            dev[n.name] = ins[0] if ins else first

    # Mutation: state follows the op that updates it; an in-place op on an activation
    # runs where that activation lives. A view of a tensor that something updates in place
    # (h.narrow(...), buf[:2]) runs where that tensor lives too: a view made on another
    # device would be a copy, so a write through it would miss the tensor, and the tensor's
    # updates would miss it.
    root = storage_roots(gm.graph.nodes, gm)
    written = {root[arg].name for n in nodes for arg in written_nodes(n, gm)}
    state_owner: dict[str, str] = {}
    for n in nodes:
        for arg in written_nodes(n, gm):
            base = root[arg]
            if base.op != "get_attr" or (arg is not base and base.name in state_owner):
                continue
            prev = state_owner.get(base.name)
            if prev is not None and prev != dev[n.name]:
                raise ApplyError(
                    f"state {base.target!r} is updated in place on {prev} and on {dev[n.name]}; "
                    f"the ops that update it must be on one device"
                )
            state_owner[base.name] = dev[n.name]  # type: ignore[assignment]
    dev.update(state_owner)
    homes = written_inputs(gm, dev, root)
    for n in nodes:
        parent = view_parent(n)
        if root[n].name in homes and (parent is not None or written_nodes(n, gm)):
            dev[n.name] = homes[root[n].name]  # a view or an update of an input: where it is moved to
            continue
        if parent is not None and root[n].name in written and dev.get(parent.name) is not None:
            dev[n.name] = dev[parent.name]
        for arg in written_nodes(n, gm):
            if arg.op != "get_attr" and dev.get(arg.name) is not None:
                dev[n.name] = dev[arg.name]
    return dev, homes


def written_inputs(gm: fx.GraphModule, dev: Mapping[str, str | None],
                   roots: Mapping[fx.Node, fx.Node] | None = None) -> dict[str, str]:
    """``{input: device}`` for the inputs (placeholders) that forward() updates in place
    (``x.mul_(2)``, ``x[:, 0] = 0``), each with the device of its first update.

    Every other input is copied to each device that reads it; such an input is moved once, to
    that device, where all its updates and views run and from which its readers elsewhere get
    their copies, and its final value is written back into the caller's tensor
    (:func:`write_back`), as the original model updates it. Copied per reader, each update
    landed on a copy of its own and the caller's tensor was left as it was (walkthrough: outputs
    2.19 off, the input 4.93 off, over two devices with copying transfers).
    """
    if roots is None:
        roots = storage_roots(gm.graph.nodes, gm)
    homes: dict[str, str] = {}
    for writer, written in in_place_writes(gm, roots):
        device = dev.get(writer.name)
        if written.op == "placeholder" and device is not None:
            homes.setdefault(written.name, device)
    return homes


def write_back(caller: Any, value: Any) -> None:
    """Copy ``value`` (an input forward() updated in place, on the device it was moved to) into
    ``caller`` (the caller's tensor), unless it is that tensor: see :func:`written_inputs`."""
    if isinstance(caller, fx.Proxy):  # fx re-traces the code when a placed model is unpickled
        caller.tracer.create_proxy("call_function", write_back, (caller, value), {})
        return
    if isinstance(caller, torch.Tensor) and isinstance(value, torch.Tensor) and value is not caller:
        caller.copy_(value)


def _updated_in_place(gm: fx.GraphModule) -> set[str]:
    """Nodes whose storage some op updates in place: the written tensor, its views and the
    in-place ops' results (a view made before the update sees it; a copy made then would not)."""

    def tensor(n: fx.Node) -> str:  # two get_attr nodes of one attribute read one tensor
        return f"attr:{n.target}" if n.op == "get_attr" else n.name

    roots = storage_roots(gm.graph.nodes, gm)
    targets = {tensor(written) for _, written in in_place_writes(gm)}
    return {n.name for n in gm.graph.nodes if tensor(roots[n]) in targets}
